"""Datasets in TRL's formats: loading (local paths or the Hub), row validation, tokenisation.

Formats (https://huggingface.co/docs/trl/dataset_formats):
- SFT, conversational: `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}`;
  the loss covers the last assistant message.
- Preferences: `{"prompt": [...messages...], "chosen": [assistant message], "rejected": [...]}`;
  plain strings are accepted too and read as one user / one assistant message.
- Evaluation: `{"prompt": [...messages...] | str, "reference": str, "split": str (optional)}`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets

DatasetKind = Literal["sft", "preferences", "eval"]
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ROLES = {"system", "user", "assistant"}


class DataError(ValueError):
    """A dataset that cannot be used, with the file (or dataset name) and row that says why."""


class PromptTooLong(DataError):
    """A prompt that leaves no room for its response within `max_length`."""


def _read_json_lines(file: Path) -> list[Any]:
    """JSON Lines (or one JSON array) read directly, so a broken line is reported by its number."""
    text = file.read_text()
    if file.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{file}: not valid JSON: {error}") from None
    rows = []
    for number, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{file}, row {len(rows)} (line {number + 1}): not valid JSON: {error}") from None
    return rows


Located = list[tuple[str, Any]]
"""Rows, each with where it came from ("file, row N") for error messages."""


def _located(origin: str, rows: list[Any]) -> Located:
    return [(f"{origin}, row {index}", row) for index, row in enumerate(rows)]


def load_rows(source: str) -> Located:
    """Rows of a local file or directory of files, or of a Hub dataset given as `name` or `name:split`."""
    path = Path(source)
    if not path.exists():
        name, _, split = source.partition(":")
        try:
            return _located(source, datasets.load_dataset(name, split=split or "train").to_list())
        except Exception as error:  # the Hub client raises many types; the user needs the cause
            raise DataError(f"{source}: not a local path, and loading it as a Hub dataset failed: {error}") from error
    files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_FORMATS) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{source}: no data files ({', '.join(LOCAL_FORMATS)}) found")
    rows: Located = []
    for file in files:
        builder = LOCAL_FORMATS.get(file.suffix)
        if builder is None:
            raise DataError(f"{file}: unsupported file type; expected one of {', '.join(LOCAL_FORMATS)}")
        if builder == "json":
            rows.extend(_located(str(file), _read_json_lines(file)))
            continue
        try:
            rows.extend(
                _located(str(file), datasets.load_dataset(builder, data_files=str(file), split="train").to_list())
            )
        except Exception as error:  # pyarrow and datasets raise many types for unreadable files
            raise DataError(f"{file}: could not be read as {builder}: {error}") from error
    return rows


def _messages(value: Any, where: str, field: str, default_role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of messages or a string")
    for index, message in enumerate(value):
        if not isinstance(message, dict) or set(message) < {"role", "content"}:
            raise DataError(f"{where}: {field}[{index}] must be a message with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: {field}[{index}].role is {message['role']!r}; expected one of {sorted(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: {field}[{index}].content must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _require(row: Any, where: str, fields: tuple[str, ...]) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    missing = [field for field in fields if row.get(field) is None]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; found {sorted(row)}")


@dataclass(frozen=True)
class SFTExample:
    messages: list[dict[str, str]]


@dataclass(frozen=True)
class PreferenceExample:
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]


@dataclass(frozen=True)
class EvalExample:
    prompt: list[dict[str, str]]
    reference: str
    split: str


def validate_sft(rows: Located, source: str) -> list[SFTExample]:
    examples = []
    for where, row in rows:
        _require(row, where, ("messages",))
        messages = _messages(row["messages"], where, "messages", "user")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's response to train on")
        examples.append(SFTExample(messages))
    return _non_empty(examples, source)


def validate_preferences(rows: Located, source: str) -> list[PreferenceExample]:
    examples = []
    for where, row in rows:
        _require(row, where, ("prompt", "chosen", "rejected"))
        prompt = _messages(row["prompt"], where, "prompt", "user")
        responses = []
        for field in ("chosen", "rejected"):
            messages = _messages(row[field], where, field, "assistant")
            # Some datasets (UltraFeedback) repeat the prompt in front of each response.
            if len(messages) > 1 and messages[:-1] == prompt:
                messages = messages[-1:]
            if [m["role"] for m in messages] != ["assistant"]:
                raise DataError(
                    f"{where}: field {field!r} must hold one assistant message, optionally after the prompt's messages"
                )
            responses.append(messages)
        examples.append(PreferenceExample(prompt, *responses))
    return _non_empty(examples, source)


def validate_eval(rows: Located, source: str) -> list[EvalExample]:
    examples = []
    for where, row in rows:
        _require(row, where, ("prompt", "reference"))
        if not isinstance(row["reference"], str):
            raise DataError(f"{where}: field 'reference' must be a string")
        split = row.get("split") or "eval"
        examples.append(EvalExample(_messages(row["prompt"], where, "prompt", "user"), row["reference"], str(split)))
    return _non_empty(examples, source)


def _non_empty(examples: list, source: str) -> list:
    if not examples:
        raise DataError(f"{source}: the dataset has no rows")
    return examples


VALIDATORS = {"sft": validate_sft, "preferences": validate_preferences, "eval": validate_eval}


def load_dataset_checked(source: str, kind: DatasetKind) -> list:
    return VALIDATORS[kind](load_rows(source), source)


def chat_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return list(encoded["input_ids"])


def prompt_and_completion_ids(
    tokenizer, prompt: list[dict[str, str]], completion: list[dict[str, str]], max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (with the generation prompt) and of the completion that follows it.

    The completion's ids are the full conversation's ids past the prompt; a chat template for
    which the prompt is not a prefix of the conversation cannot be trained completion-only.
    Sequences longer than `max_length` lose the end of their completion.
    """
    prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    full_ids = chat_ids(tokenizer, prompt + completion)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise DataError("the tokenizer's chat template does not render the prompt as a prefix of the conversation")
    if len(prompt_ids) >= max_length:
        raise PromptTooLong(
            f"a prompt of {len(prompt_ids)} tokens leaves no room for its response within max_length {max_length}"
        )
    return prompt_ids, full_ids[len(prompt_ids) : max_length]


def completion_example(tokenizer, prompt: list[dict], completion: list[dict], max_length: int) -> dict[str, Any]:
    """Input ids with a loss mask over the completion tokens only."""
    prompt_ids, completion_ids = prompt_and_completion_ids(tokenizer, prompt, completion, max_length)
    return {
        "input_ids": prompt_ids + completion_ids,
        "loss_mask": [False] * len(prompt_ids) + [True] * len(completion_ids),
    }


def tokenize_examples(examples: list, encode, max_length: int, source: str) -> list:
    """`encode(example)` for every example, leaving out those whose prompt alone fills `max_length`."""
    encoded = []
    for example in examples:
        try:
            encoded.append(encode(example))
        except PromptTooLong:
            continue
    skipped = len(examples) - len(encoded)
    if skipped == len(examples):
        raise DataError(f"{source}: every prompt is longer than max_length {max_length}; raise max_length")
    if skipped:
        logging.getLogger(__name__).warning(
            "%s: left out %d of %d examples whose prompt is longer than max_length %d",
            source,
            skipped,
            len(examples),
            max_length,
        )
    return encoded
