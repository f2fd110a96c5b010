"""Bad input refused before any work: a table of bad inputs, each through the real CLI (`post-train validate` and
`post-train run`) in a child process, checked for its message, its exit status, its time to fail and that it
created nothing (no MLflow store, run or cache directory, no Prefect database).

The cases run a few at a time (each is a fresh Python process that imports torch and transformers); the
assertions are one test per case.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import REPO_ROOT, make_dvc_repo

CLI = str(Path(sys.executable).parent / "post-train")
SECONDS_TO_FAIL = 30
"""A refusal takes a few seconds on an idle machine (mostly importing torch and transformers); the bound leaves room
for cases running side by side on a busy 2-core one. A run that got as far as training would take minutes."""

PAIRS = [(f"Copy: {a} {b}", f"{a} {b}") for a in "abcd" for b in "efgh"]
LONG_PROMPT = "Copy: " + " ".join("abcdefgh" * 3)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


SFT = [{"messages": user(q) + assistant(a)} for q, a in PAIRS]
PREFERENCES = [{"prompt": user(q), "chosen": assistant(a), "rejected": assistant(a[:1])} for q, a in PAIRS]
EVAL = [{"prompt": user(q), "reference": a} for q, a in PAIRS[:4]]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer Llama with the world's tokenizer and chat template."""
    from transformers import LlamaForCausalLM

    from post_train.world.model import tiny_llama_config, train_tokenizer

    directory = tmp_path_factory.mktemp("model") / "tiny"
    tokenizer = train_tokenizer([text for pair in PAIRS for text in pair] + [LONG_PROMPT], vocab_size=64)
    tokenizer.save_pretrained(directory)
    config = tiny_llama_config(tokenizer, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def truncate_weights(model: Path) -> None:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def break_config(model: Path) -> None:
    (model / "config.json").write_text("{")


def remove_chat_template(model: Path) -> None:
    (model / "chat_template.jinja").unlink(missing_ok=True)
    settings = json.loads((model / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(settings))


@dataclass(frozen=True)
class Case:
    name: str
    expected: tuple[str, ...]
    overrides: tuple[str, ...] = ()
    files: dict[str, object] = field(default_factory=dict)
    """Files of the case's directory: rows (JSON Lines) or text, over the good datasets."""
    command: tuple[str, ...] = ("validate",)
    model: Callable[[Path], None] | None = None
    """How the case spoils its own copy of the tiny model."""
    absent: tuple[str, ...] = ("Traceback",)
    returncode: int = 2
    """2: bad input; 1: an exception (with --debug)."""


def bad_rows(count: int, row: dict, good: list) -> list:
    return good[: len(good) - count] + [row] * count


CASES = [
    Case(
        "misspelled key",
        ("sft.lerning_rate: Extra inputs are not permitted; did you mean sft.learning_rate?",),
        ("sft.lerning_rate=1e-3",),
    ),
    Case("unknown judge", ("unknown judge 'oracle'; known: gold, reward_model, llm",), ("evaluation.judge=oracle",)),
    Case("prompt budget", ("max_prompt_length (96) must be below max_length (96)",), ("sft.max_prompt_length=96",)),
    Case(
        "truncation mode",
        ("dpo.truncation_mode: Input should be 'keep_start' or 'keep_end'",),
        ("dpo.truncation_mode=left",),
    ),
    Case(
        "no such model",
        ("model.name_or_path ./missing-model: no such directory",),
        ("model.name_or_path=./missing-model",),
    ),
    Case(
        "truncated weights",
        ("model.safetensors: not a readable safetensors file", "is it truncated?"),
        model=truncate_weights,
    ),
    Case("broken model config", ("config.json: does not load as a model configuration",), model=break_config),
    Case(
        "hub model offline",
        (
            "'some-org/some-model': not a local directory and not in the local Hugging Face cache, "
            "and HF_HUB_OFFLINE is set",
        ),
        ("model.name_or_path=some-org/some-model",),
    ),
    Case(
        "no chat template",
        (
            "the tokenizer has no chat template and model.chat_template is not set, but the eval, "
            "preferences, sft data is conversational",
        ),
        model=remove_chat_template,
    ),
    Case(
        "missing dataset",
        ("missing.jsonl: not a local path, and loading it as a Hub dataset failed",),
        ("data.sft=missing.jsonl",),
    ),
    Case(
        "broken JSON line",
        ("sft.jsonl, row 1 (line 2): not valid JSON",),
        files={"sft.jsonl": json.dumps(SFT[0]) + "\n{not json\n"},
    ),
    Case(
        "unknown SFT format",
        ("sft.jsonl, row 0: expected one of TRL's SFT formats",),
        files={"sft.jsonl": [{"input": "Copy: a", "output": "a"}]},
    ),
    Case(
        "every bad row at once",
        (
            "sft.jsonl, row 1: the last message must be the assistant's",
            "sft.jsonl, row 3: field 'text' must be a string",
        ),
        files={"sft.jsonl": [SFT[0], {"messages": user("Copy: a")}, SFT[1], {"text": 7}]},
    ),
    Case(
        "all completions empty",
        ("sft.jsonl: none of its 3 rows can be used; empty_completion",),
        files={"sft.jsonl": [{"prompt": "Copy: a", "completion": " "}] * 3},
    ),
    Case(
        "identical pairs",
        (
            "prefs.jsonl: 8 of 16 rows (50.0%) cannot be used, more than dpo.max_dropped_share (10%); "
            "identical_responses",
        ),
        files={
            "prefs.jsonl": bad_rows(
                8, {"prompt": user("Copy: a"), "chosen": assistant("a"), "rejected": assistant("a")}, PREFERENCES
            )
        },
    ),
    Case(
        "no implicit prompt",
        ("prefs.jsonl, row 0: chosen and rejected share no start",),
        files={"prefs.jsonl": [{"chosen": "yes", "rejected": "no"}]},
    ),
    Case(
        "gold judge on other data",
        ("evaluation.judge gold scores demo-world prompts only", "'Write a poem.'"),
        files={"eval.jsonl": [{"prompt": user("Write a poem."), "reference": "Roses."}]},
    ),
    Case(
        "prompts too long",
        ("sft.jsonl: 8 of 16 rows (50.0%) cannot be used, more than sft.max_dropped_share (10%); prompt_too_long",),
        ("sft.max_length=16",),
        files={"sft.jsonl": bad_rows(8, {"messages": user(LONG_PROMPT) + assistant("a")}, SFT)},
    ),
    Case(
        "runs_dir is a file",
        ("runs_dir: ", "runs_file exists and is not a directory"),
        ("runs_dir=runs_file",),
        files={"runs_file": "not a directory"},
    ),
    Case("dvc_root without dvc.yaml", ("no dvc.yaml here; set data.dvc_root",), ("data.world=smoke",)),
    Case(
        "several problems at once",
        (
            "2 problems; nothing was run:",
            "./missing-model: no such directory",
            "sft.jsonl, row 1: the last message must be the assistant's",
        ),
        ("model.name_or_path=./missing-model",),
        files={"sft.jsonl": [SFT[0], {"messages": user("Copy: a")}]},
    ),
    Case(
        "run refuses bad data before Prefect",
        ("sft.jsonl, row 0: expected one of TRL's SFT formats",),
        files={"sft.jsonl": [{"input": "Copy: a"}]},
        command=("run",),
    ),
    Case(
        "run --debug shows the traceback",
        ("Traceback", "InvalidInputs", "sft.jsonl, row 0: expected one of"),
        files={"sft.jsonl": [{"input": "Copy: a"}]},
        command=("run", "--debug"),
        absent=(),
        returncode=1,
    ),
]


@dataclass(frozen=True)
class Outcome:
    returncode: int
    output: str
    seconds: float
    created: list[str]
    lingered: float
    """Seconds from the command's exit until its output pipes closed: a process it left running holds them."""


def run_case(case: Case, directory: Path, model: Path) -> Outcome:
    directory.mkdir(parents=True)
    if case.model is not None:
        model = Path(shutil.copytree(model, directory / "spoilt-model"))
        case.model(model)
    datasets = {"sft.jsonl": SFT, "prefs.jsonl": PREFERENCES, "eval.jsonl": EVAL, **case.files}
    for name, content in datasets.items():
        rows = "".join(json.dumps(row) + "\n" for row in content) if isinstance(content, list) else content
        (directory / name).write_text(rows)
    before = {path.name for path in directory.iterdir()}
    overrides = [
        f"model.name_or_path={model}",
        "data.world=null",
        "data.sft=sft.jsonl",
        "data.preferences=prefs.jsonl",
        "data.eval=eval.jsonl",
        "runs_dir=runs",
        "cache_dir=cache",
        *case.overrides,
    ]
    command, *options = case.command
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "PREFECT_API"))}
    env.update(HF_HUB_OFFLINE="1", PREFECT_HOME=str(directory / ".prefect"))
    started = time.perf_counter()
    process = subprocess.Popen(
        [CLI, command, *options, "--scale", "smoke", *[item for o in overrides for item in ("-o", o)]],
        cwd=directory,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    returncode = process.wait(timeout=300)  # a report fits in the pipe's buffer
    exited = time.perf_counter()
    output = process.communicate(timeout=300)[0]
    created = sorted({path.name for path in directory.iterdir()} - before)
    return Outcome(returncode, output, exited - started, created, time.perf_counter() - exited)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("cases")
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        futures = {
            case.name: pool.submit(run_case, case, root / f"case{i}", tiny_model) for i, case in enumerate(CASES)
        }
    return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_refused_at_once_with_every_problem_named_and_nothing_created(case: Case, outcomes):
    outcome = outcomes[case.name]
    assert outcome.returncode == case.returncode, outcome.output
    for expected in case.expected:
        assert expected in outcome.output, outcome.output
    for absent in case.absent:
        assert absent not in outcome.output, outcome.output
    assert outcome.seconds < SECONDS_TO_FAIL
    # No MLflow store or artifacts, no run or cache directory, no Prefect database.
    assert outcome.created == [], outcome.created
    # Nothing left running: `run` starts its stage server while it checks, and stops it (mid-import) on a refusal.
    assert outcome.lingered < 2, outcome.lingered


def test_the_matrix_covers_at_least_eighteen_refusals():
    assert len(CASES) >= 18


def test_good_input_passes_with_the_counts_of_what_truncation_does(tmp_path: Path, tiny_model: Path):
    case = Case("good", (), ("sft.max_completion_length=1",))
    outcome = run_case(case, tmp_path / "good", tiny_model)
    assert outcome.returncode == 0, outcome.output
    assert "no problems found" in outcome.output
    assert "data.sft with sft's truncation: 16 of 16 rows used; truncated: completion_truncated 16" in outcome.output
    assert "data.preferences with dpo's truncation: 16 of 16 rows used" in outcome.output
    assert outcome.created == []


def test_the_demo_world_is_checked_as_far_as_it_exists(tmp_path: Path):
    """Before the first `dvc repro` there is no world data: validate says so, and passes."""
    from post_train.validate import validate

    repo = make_dvc_repo(tmp_path / "repo")
    found = validate("lowlr", "smoke", {"data.dvc_root": str(repo), "runs_dir": str(tmp_path / "runs")})
    assert found.problems == [] and any("not generated yet" in note for note in found.notes)
    assert not (repo / "data").exists() and not (tmp_path / "runs").exists()
    assert (REPO_ROOT / "dvc.yaml").is_file()
