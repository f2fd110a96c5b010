"""Generate the demo world's data files, deterministically from `WorldParams`.

Each file draws from its own `random.Random` seeded by (seed, file name), so changing
how one file is sampled never shifts the others. Eval tasks are drawn first and every
training file (pretraining included) avoids them, so eval measures generalisation
rather than recall. SFT and DPO draw from the trained families only; the held-out families
appear in pretraining alone (terse and chat forms), so the held_out split measures what SFT
keeps of the base's skills rather than a length the base never saw.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from post_train.world.demonstrator import Demonstrator
from post_train.world.families import FAMILIES, LETTERS, Task
from post_train.world.params import WorldParams
from post_train.world.reward import gold_reward

PRETRAIN_FILE = "pretrain.jsonl"
SFT_FILE = "sft.jsonl"
PREFERENCES_FILE = "preferences.jsonl"
EVAL_FILE = "eval.jsonl"
WORLD_FILES = (PRETRAIN_FILE, SFT_FILE, PREFERENCES_FILE, EVAL_FILE)
IN_DISTRIBUTION = "in_distribution"
HELD_OUT = "held_out"

# Runs of consecutive letters ("letters c d e f") teach the alphabet's order, which
# sorting and shifting both rely on, without being any of the tasks themselves.
FILLER_DOC_FRACTION = 0.1

Row = dict[str, Any]


def build_world(params: WorldParams) -> dict[str, list[Row]]:
    """All rows of all files, keyed by file name."""
    eval_rows, eval_prompts = _eval_rows(params)
    return {
        PRETRAIN_FILE: _pretrain_rows(params, eval_prompts),
        SFT_FILE: _sft_rows(params, eval_prompts),
        PREFERENCES_FILE: _preference_rows(params, eval_prompts),
        EVAL_FILE: eval_rows,
    }


def write_world(params: WorldParams, out_dir: Path) -> None:
    """Write the four JSONL files into `out_dir`, replacing it as a whole.

    Files are written to a sibling staging directory first, so an interrupted run never
    leaves a half-written `out_dir` behind.
    """
    files = build_world(params)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for name, rows in files.items():
            (staging / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        _replace_directory(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def iter_world_texts(data_dir: Path) -> Iterator[str]:
    """Every text of a generated world: pretraining docs and all chat contents.

    Meant for tokenizer training, so that instruction words merge as well as the
    pretraining vocabulary.
    """
    for name in WORLD_FILES:
        with (data_dir / name).open() as lines:
            for line in lines:
                row = json.loads(line)
                if "text" in row:
                    yield row["text"]
                for field in ("messages", "prompt", "chosen", "rejected"):
                    yield from (message["content"] for message in row.get(field, []))


def _replace_directory(new: Path, target: Path) -> None:
    if not target.exists():
        new.rename(target)
        return
    previous = target.with_name(f".{target.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    target.rename(previous)
    new.rename(target)
    shutil.rmtree(previous)


def _file_rng(params: WorldParams, file_name: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so it is stable across processes.
    return random.Random(f"{params.seed}/{file_name}")


def _lengths(bounds: tuple[int, int]) -> list[int]:
    return list(range(bounds[0], bounds[1] + 1))


def _sample_task(rng: random.Random, params: WorldParams, families: Sequence[str], excluded: set[str]) -> Task:
    lengths = _lengths(params.lengths)
    while True:
        family = FAMILIES[rng.choice(families)]
        letters = family.input_letters(params.alphabet_size)
        task = Task(family, tuple(rng.choice(letters) for _ in range(rng.choice(lengths))))
        if task.prompt not in excluded:
            return task


def _demonstrator(params: WorldParams, rng: random.Random) -> Demonstrator:
    return Demonstrator(params.demonstrator_error_rate, LETTERS[: params.alphabet_size], rng)


def _user(content: str) -> list[Row]:
    return [{"role": "user", "content": content}]


def _assistant(content: str) -> list[Row]:
    return [{"role": "assistant", "content": content}]


def _eval_rows(params: WorldParams) -> tuple[list[Row], set[str]]:
    rng = _file_rng(params, EVAL_FILE)
    demonstrator = _demonstrator(params, rng)
    rows: list[Row] = []
    prompts: set[str] = set()
    for split, families in ((IN_DISTRIBUTION, params.trained_families), (HELD_OUT, params.held_out_families)):
        for _ in range(params.n_eval_per_split):
            task = _sample_task(rng, params, families, excluded=prompts)
            prompts.add(task.prompt)
            reference = " ".join(demonstrator.respond(task))
            rows.append({"prompt": _user(task.prompt), "reference": reference, "split": split})
    return rows, prompts


def _pretrain_rows(params: WorldParams, excluded: set[str]) -> list[Row]:
    """Terse task documents ("reverse c a f b = b f a c"), runs of letters and, for a share
    `chat_pretrain_fraction`, conversations in the chat format from a noisier demonstrator
    (`chat_pretrain_error_rate`; `messages` rows, which the pretraining stage renders with the world's chat
    template)."""
    rng = _file_rng(params, PRETRAIN_FILE)
    chat_source = Demonstrator(params.chat_pretrain_error_rate, LETTERS[: params.alphabet_size], rng)
    rows: list[Row] = []
    for _ in range(params.n_pretrain_docs):
        draw = rng.random()
        if draw < params.chat_pretrain_fraction:
            task = _sample_task(rng, params, params.families, excluded)
            rows.append({"messages": _user(task.prompt) + _assistant(" ".join(chat_source.respond(task)))})
        elif draw < params.chat_pretrain_fraction + FILLER_DOC_FRACTION:
            rows.append({"text": _letter_run(rng, params.alphabet_size, rng.choice(_lengths(params.lengths)))})
        else:
            rows.append({"text": _sample_task(rng, params, params.families, excluded).pretrain_text})
    return rows


def _letter_run(rng: random.Random, alphabet_size: int, length: int) -> str:
    length = min(length, alphabet_size)
    start = rng.randint(0, alphabet_size - length)
    return "letters " + " ".join(LETTERS[start : start + length])


def _sft_rows(params: WorldParams, excluded: set[str]) -> list[Row]:
    rng = _file_rng(params, SFT_FILE)
    demonstrator = _demonstrator(params, rng)
    rows = []
    for _ in range(params.n_sft):
        task = _sample_task(rng, params, params.trained_families, excluded)
        response = " ".join(demonstrator.respond(task))
        rows.append({"messages": _user(task.prompt) + _assistant(response)})
    return rows


def _preference_rows(params: WorldParams, excluded: set[str]) -> list[Row]:
    """Pairs of a demonstration and a corrupted second demonstration, ordered by gold reward.

    Two plain demonstrations mostly tie (both right), so the second one always gets one
    extra mistake; the pair is kept only when the rewards differ, which it often does.
    """
    rng = _file_rng(params, PREFERENCES_FILE)
    demonstrator = _demonstrator(params, rng)
    rows: list[Row] = []
    while len(rows) < params.n_preference_pairs:
        task = _sample_task(rng, params, params.trained_families, excluded)
        first = " ".join(demonstrator.respond(task))
        second = " ".join(demonstrator.corrupt(demonstrator.respond(task)))
        first_reward, second_reward = gold_reward(task.prompt, first), gold_reward(task.prompt, second)
        if first_reward == second_reward:
            continue
        chosen, rejected = (first, second) if first_reward > second_reward else (second, first)
        rows.append({"prompt": _user(task.prompt), "chosen": _assistant(chosen), "rejected": _assistant(rejected)})
    return rows
