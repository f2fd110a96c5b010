"""`post-train validate`: everything a run reads, checked before any work, every problem reported at once.

The configuration, the model and its tokenizer, every dataset row (and, with a tokenizer at hand, what truncation
does to them), the judge against the evaluation set, the executors' own checks and the directories a run writes.
`post-train run` and the flows (so the deployments too) call it first: a run that would fail on its input stops
here, before any MLflow run, run directory or stage.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from post_train.config import DATASET_SECTIONS, STAGES, PipelineConfig, load_config
from post_train.data import Checked, DataError, Truncation, load_dataset_checked, pair_rows, sft_rows
from post_train.errors import ConfigError

TOKEN_CHECKS = {"sft": sft_rows, "preferences": pair_rows}
"""How each training dataset becomes token sequences, to count what truncation drops and cuts."""


class InvalidInputs(ConfigError, DataError):
    """Every problem `validate` found (configuration, model, data, judge, outputs): bad input, never retried."""


@dataclass
class Validation:
    recipe: str
    scale: str
    config: PipelineConfig | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        """What was found: the problems (or that there are none), then the notes."""
        if len(self.problems) == 1:
            lines = [f"post-train: {self.problems[0]}"]
        elif self.problems:
            lines = [f"post-train: {len(self.problems)} problems; nothing was run:"]
            lines += ["  - " + problem.replace("\n", "\n    ") for problem in self.problems]
        else:
            lines = [f"post-train: recipe {self.recipe} at scale {self.scale}: no problems found"]
        if self.notes:
            lines += ["notes:"] + ["  - " + note.replace("\n", "\n    ") for note in self.notes]
        return "\n".join(lines)


def _looks_local(name: str) -> bool:
    """A path rather than a Hub name (`name` or `org/name`)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _hub_snapshot(name: str, field_name: str, found: Validation) -> Path | None:
    """The local copy of a Hub model, if the Hugging Face cache has one; otherwise a problem (offline) or a note."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except HFValidationError as error:
        found.problems.append(f"{field_name} {name!r}: neither a local directory nor a Hub model name ({error})")
        return None
    if isinstance(cached, str):
        found.notes.append(f"{field_name} {name!r}: a Hub model found in the local Hugging Face cache")
        return Path(cached).parent
    if constants.HF_HUB_OFFLINE:
        found.problems.append(
            f"{field_name} {name!r}: not a local directory and not in the local Hugging Face cache, and "
            "HF_HUB_OFFLINE is set, so it cannot be downloaded; download it first or give a local directory"
        )
    else:
        found.notes.append(
            f"{field_name} {name!r}: a Hub model, not in the local cache; it is downloaded when the run needs it "
            "(HF_HUB_OFFLINE is unset), so its files are not checked here"
        )
    return None


def _weights_problems(directory: Path) -> list[str]:
    """Every safetensors file's header parses and the file holds the tensors it declares; some weights exist."""
    from safetensors import SafetensorError, safe_open

    files = sorted(directory.glob("*.safetensors"))
    index = directory / "model.safetensors.index.json"
    problems = []
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        problems += [
            f"{index}: lists {shard}, which is missing" for shard in sorted(shards) if not (directory / shard).is_file()
        ]
    if not files and not list(directory.glob("*.bin")):
        problems.append(f"{directory}: no weights (*.safetensors or *.bin)")
    for file in files:
        try:
            with safe_open(str(file), "np"):
                pass
        except (SafetensorError, OSError) as error:
            problems.append(f"{file}: not a readable safetensors file ({error}); is it truncated?")
    return problems


def check_model(name: str, field_name: str, found: Validation) -> Any:
    """The model at `name` (a directory or a Hub name) resolves, its config loads, its weights' headers parse and its
    tokenizer loads; returns the tokenizer when everything could be checked."""
    path = Path(name).expanduser()
    if path.is_dir():
        directory = path
    elif path.exists():
        found.problems.append(f"{field_name} {name}: a file, not a model directory (config.json, weights, tokenizer)")
        return None
    elif _looks_local(name):
        found.problems.append(f"{field_name} {name}: no such directory")
        return None
    else:
        directory = _hub_snapshot(name, field_name, found)
        if directory is None:
            return None
    from transformers import AutoConfig, AutoTokenizer

    problems = []
    if not (directory / "config.json").is_file():
        problems.append(f"{directory}: no config.json; a model directory holds config.json, weights and a tokenizer")
    else:
        try:
            AutoConfig.from_pretrained(directory)
        except (OSError, ValueError, KeyError) as error:
            problems.append(f"{directory / 'config.json'}: does not load as a model configuration ({error})")
    problems += _weights_problems(directory)
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as error:
        problems.append(f"{directory}: the tokenizer does not load ({error})")
    found.problems += [f"{field_name} {name}: {problem}" for problem in problems]
    return None if problems else tokenizer


def world_sources(config: PipelineConfig, found: Validation) -> dict[str, str]:
    """The world's dataset files as the last `dvc repro` left them; none (with a note) before the first one."""
    from tasks.prepare import WORLD_FILES, world_stage

    root = Path(config.data.dvc_root).resolve()
    if not (root / "dvc.yaml").is_file():
        found.problems.append(f"data.dvc_root {root}: no dvc.yaml here; set data.dvc_root to the directory holding it")
        return {}
    lock = root / "dvc.lock"
    locked = (yaml.safe_load(lock.read_text()) or {}) if lock.is_file() else {}
    outs = locked.get("stages", {}).get(world_stage(config.data.world), {})
    directory = root / outs["outs"][0]["path"] if outs.get("outs") else None
    if directory is None or not directory.is_dir():
        found.notes.append(
            f"demo world {config.data.world}: not generated yet; the prepare stage generates it "
            f"(`dvc repro {world_stage(config.data.world)}`, seconds) and checks every row then"
        )
        return {}
    found.notes.append(
        f"demo world {config.data.world}: checked as last generated ({directory}); the prepare stage regenerates it "
        "first if its parameters or code changed"
    )
    return {kind: str(directory / file) for kind, file in WORLD_FILES.items()}


def check_data(config: PipelineConfig, found: Validation) -> dict[str, Checked]:
    """Every row of every dataset that exists; the share of rows left out per training section's limit."""
    sources = world_sources(config, found) if config.data.world is not None else {}
    sources.update(
        {kind: getattr(config.data, kind) for kind in ("sft", "preferences", "eval") if getattr(config.data, kind)}
    )
    checked = {}
    for kind, source in sources.items():
        try:
            checked[kind] = load_dataset_checked(source, kind)
        except DataError as error:
            found.problems.append(f"data.{kind}: {error}")
    for kind, section in dataset_sections(config):
        if kind in checked:
            _refuse_excess(checked[kind], config, section, found)
    return checked


def dataset_sections(config: PipelineConfig) -> list[tuple[str, str]]:
    """(dataset, training section) for each stage that will train on a dataset with its section's truncation and
    `max_dropped_share`: the joint stage reads both datasets with its own."""
    stages = config.stages_run()
    pairs = [(kind, section) for kind, section in DATASET_SECTIONS.items() if section in stages]
    if "joint" in stages:
        pairs += [(kind, "joint") for kind in DATASET_SECTIONS]
    return pairs


def _refuse_excess(examples: Checked, config: PipelineConfig, section: str, found: Validation) -> bool:
    try:
        examples.report.refuse_excess(getattr(config, section).max_dropped_share, f"{section}.max_dropped_share")
    except DataError as error:
        found.problems.append(f"data: {error}")
        return False
    return True


def check_tokens(config: PipelineConfig, tokenizer, checked: dict[str, Checked], found: Validation) -> None:
    """With the model's tokenizer: a chat template where conversational data needs one, and what each training
    section's truncation drops and cuts."""
    if tokenizer.chat_template is None:
        tokenizer.chat_template = config.model.resolved_chat_template()
    conversational = sorted(kind for kind, examples in checked.items() if any(e.conversational for e in examples))
    if conversational and tokenizer.chat_template is None:
        found.problems.append(
            f"model.name_or_path {config.model.name_or_path}: the tokenizer has no chat template and "
            f"model.chat_template is not set, but the {', '.join(conversational)} data is conversational; set "
            "model.chat_template (e.g. `default`) or give the data in a text format"
        )
        return
    for kind, section in dataset_sections(config):
        if kind not in checked:
            continue
        # A report of its own per section: two sections tokenising one dataset must not add up their drops.
        examples = Checked(list(checked[kind]), copy.deepcopy(checked[kind].report))
        TOKEN_CHECKS[kind](tokenizer, examples, Truncation.of(getattr(config, section)))
        if _refuse_excess(examples, config, section, found):
            found.notes.append(f"data.{kind} with {section}'s truncation: {examples.report.describe()}")


def check_judge(config: PipelineConfig, checked: dict[str, Checked], found: Validation) -> None:
    from post_train.judges import judge_class

    if "eval" not in checked:
        return
    try:
        judge_class(config.evaluation.judge).check(config.evaluation.judge_settings(), checked["eval"])
    except ConfigError as error:
        found.problems.append(str(error))


def _writable(path: Path) -> str | None:
    """Why a directory cannot be created or written at `path`, if it cannot; creates nothing."""
    path = path.resolve()
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a directory"
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable" + ("" if existing == path else f", so {path} cannot be created")
    return None


def check_outputs(config: PipelineConfig, found: Validation) -> None:
    from post_train.tracking import tracking_uri

    outputs = {"runs_dir": Path(config.runs_dir), "cache_dir": Path(config.cache_dir)}
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        outputs["the MLflow store (MLFLOW_TRACKING_URI)"] = Path(uri.removeprefix("sqlite:///")).parent
    for name, path in outputs.items():
        problem = _writable(path)
        if problem is not None:
            found.problems.append(f"{name}: {problem}")


def check_executors(config: PipelineConfig, found: Validation) -> None:
    """Each command stage's executor checks what it can before any work (cloud setup, reachable paths)."""
    from post_train.executors import executor_class

    refused: dict[str, list[str]] = {}
    for stage in STAGES:
        placed = config.model_copy(update={"compute": config.compute.for_stage(stage)})
        try:
            executor_class(placed.compute.backend)(placed).preflight({})
        except ConfigError as error:
            refused.setdefault(str(error), []).append(stage)
    found.problems += [f"stage(s) {', '.join(stages)}: {error}" for error, stages in refused.items()]


def check_inputs(config: PipelineConfig, found: Validation) -> None:
    """Everything past the configuration itself: executors, outputs, data, judge, model and tokens."""
    found.config = config
    check_executors(config, found)
    check_outputs(config, found)
    checked = check_data(config, found)
    check_judge(config, checked, found)
    if config.model.name_or_path is None and config.data.world is None:
        found.problems.append(
            "model.name_or_path is not set, so the flow pretrains the demo base model on a demo world's corpus, but "
            "data.world is null; give model.name_or_path or data.world"
        )
    elif config.model.name_or_path is None:
        found.notes.append(
            "model: the demo base model, pretrained by the flow with the world's tokenizer and chat template; the "
            "SFT and DPO stages count what truncation drops and cuts, and refuse too many drops"
        )
    else:
        tokenizer = check_model(config.model.name_or_path, "model.name_or_path", found)
        if tokenizer is not None:
            check_tokens(config, tokenizer, checked, found)


def validate(recipe: str, scale: str, overrides: dict[str, Any] | list[str] | None = None) -> Validation:
    """Every check, every problem; nothing is created. A configuration that does not validate is the one problem
    (every bad field of it): the other checks read the configuration."""
    found = Validation(recipe, scale)
    try:
        config = load_config(recipe, scale, overrides)
    except ConfigError as error:
        found.problems.append(str(error))
        return found
    check_inputs(config, found)
    return found


def validated_config(recipe: str, scale: str, overrides: dict[str, Any] | list[str] | None = None) -> PipelineConfig:
    """The configuration, once `validate` finds nothing wrong: the ConfigError of a bad configuration, or
    InvalidInputs with every other problem."""
    found = Validation(recipe, scale)
    check_inputs(load_config(recipe, scale, overrides), found)
    if found.problems:
        raise InvalidInputs(found.report().removeprefix("post-train: "))
    return found.config
