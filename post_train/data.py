"""Datasets in every TRL format (https://huggingface.co/docs/trl/dataset_formats): loading, row checks, tokenisation
with the truncation a training section asks for, and the report of what was dropped or truncated and why.

A row is conversational (lists of `{"role", "content"}` messages, rendered with the chat template) or text (strings,
tokenised as they are, EOS appended to completions as TRL does). Its prompt is the context and its completion what
the loss covers:

- SFT: `{"messages": [...]}` (the prompt is every message before the last, which must be the assistant's),
  `{"text": str}` (language modelling: every token counts), `{"prompt", "completion"}`.
- Preferences: `{"prompt", "chosen", "rejected"}`, or `{"chosen", "rejected"}` whose shared start is the prompt
  (TRL's `extract_prompt`).
- Evaluation: `{"prompt", "reference" | "completion", "split" (optional)}`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

from post_train.errors import ConfigError, DataError

DatasetKind = Literal["sft", "preferences", "eval"]
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ROLES = {"system", "user", "assistant"}
PROBLEMS_SHOWN = 20
"""Problems listed per dataset; the rest are counted."""
FIRST_ROWS_SHOWN = 3

Messages = list[dict[str, str]]
Prompt = Messages | str
"""Conversational (messages) or text."""


class PromptTooLong(DataError):
    """A prompt that leaves no room for its response within `max_length`."""


# ------------------------------------------------------------------------------------------------------ loading


def _read_json_lines(file: Path) -> list[Any]:
    """JSON Lines (or one JSON array) read directly, so a broken line is reported by its number."""
    text = file.read_text()
    if file.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{file}: not valid JSON: {error}") from None
    rows, broken = [], []
    for number, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                broken.append(f"{file}, row {len(rows) + len(broken)} (line {number + 1}): not valid JSON: {error}")
    if broken:
        raise DataError(_listed(broken))
    return rows


Located = list[tuple[str, Any]]
"""Rows, each with where it came from ("file, row N") for error messages."""


def _located(origin: str, rows: list[Any]) -> Located:
    return [(f"{origin}, row {index}", row) for index, row in enumerate(rows)]


def _loaded_rows(*args: Any, **kwargs: Any) -> list[Any]:
    """The rows of `datasets.load_dataset(*args, **kwargs)`; `datasets` (~1 s to import) is imported only for a Hub
    dataset or a file other than JSON lines."""
    import datasets

    return datasets.load_dataset(*args, **kwargs).to_list()


def load_rows(source: str) -> Located:
    """Rows of a local file or directory of files, or of a Hub dataset given as `name` or `name:split`."""
    path = Path(source)
    if not path.exists():
        name, _, split = source.partition(":")
        try:
            return _located(source, _loaded_rows(name, split=split or "train"))
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
            rows.extend(_located(str(file), _loaded_rows(builder, data_files=str(file), split="train")))
        except Exception as error:  # pyarrow and datasets raise many types for unreadable files
            raise DataError(f"{file}: could not be read as {builder}: {error}") from error
    return rows


# ------------------------------------------------------------------------------------------------------ examples


@dataclass(frozen=True)
class SFTExample:
    prompt: Prompt
    """The context; `""` for language modelling (`{"text"}`)."""
    completion: Messages | str
    where: str = ""

    @property
    def conversational(self) -> bool:
        return isinstance(self.completion, list)


@dataclass(frozen=True)
class PreferenceExample:
    prompt: Prompt
    chosen: Messages | str
    rejected: Messages | str
    where: str = ""

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass(frozen=True)
class EvalExample:
    prompt: Prompt
    reference: str
    split: str
    where: str = ""

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)

    @property
    def messages(self) -> Messages:
        """The prompt as messages, for judges: a text prompt is one user message."""
        return self.prompt if isinstance(self.prompt, list) else [{"role": "user", "content": self.prompt}]

    @property
    def instruction(self) -> str:
        """What the user asked last: the last user message, or the text prompt."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


def response_completion(prompt: Prompt, response: str) -> Messages | str:
    """A response as the completion of `prompt`, in its format."""
    return [{"role": "assistant", "content": response}] if isinstance(prompt, list) else response


def prompt_text(prompt: Prompt) -> str:
    """The whole prompt as one readable text: a single message's content, else every message as `role: content`."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"{message['role']}: {message['content']}" for message in prompt)


# ------------------------------------------------------------------------------------------------------ row checks


class RowProblem(DataError):
    """Why one row is malformed (the dataset collects every row's)."""


class Unusable(Exception):
    """A well-formed row that cannot be trained on; it is dropped and counted under `reason`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


EMPTY_COMPLETION = "empty_completion"
IDENTICAL_RESPONSES = "identical_responses"
PROMPT_TOO_LONG = "prompt_too_long"
PROMPT_TRUNCATED = "prompt_truncated"
COMPLETION_TRUNCATED = "completion_truncated"
REASONS = {
    EMPTY_COMPLETION: "the completion (or a preference response) is empty",
    IDENTICAL_RESPONSES: "chosen and rejected are the same",
    PROMPT_TOO_LONG: "the prompt leaves no room for the completion (max_length, max_prompt_length; for a "
    "conversation under keep_start, or whose last turn alone is too long, no turn can be dropped)",
    PROMPT_TRUNCATED: "the prompt was cut (text) or lost its first turns (conversation) to fit",
    COMPLETION_TRUNCATED: "the completion lost its end to fit max_completion_length or max_length",
}
"""Every reason a row is dropped or truncated, as the report, the errors and the README name them."""


def _require_object(row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise RowProblem(f"expected an object, got {type(row).__name__}")
    return row


def _messages(value: Any, name: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise RowProblem(f"field {name!r} must be a non-empty list of messages or a string")
    for index, message in enumerate(value):
        if not isinstance(message, dict) or set(message) < {"role", "content"}:
            raise RowProblem(f"{name}[{index}] must be a message with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise RowProblem(f"{name}[{index}].role is {message['role']!r}; expected one of {sorted(ROLES)}")
        if not isinstance(message["content"], str):
            raise RowProblem(f"{name}[{index}].content must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _value(row: dict[str, Any], name: str) -> Messages | str:
    """A field as text or as messages."""
    value = row.get(name)
    if value is None:
        raise RowProblem(f"missing field {name!r}; found {sorted(row)}")
    return value if isinstance(value, str) else _messages(value, name)


def _is_empty(value: Messages | str) -> bool:
    return not any(m["content"].strip() for m in value) if isinstance(value, list) else not value.strip()


def _completion(value: Messages | str, name: str) -> Messages | str:
    """A completion: text, or assistant messages; an empty one makes the row unusable."""
    if isinstance(value, list):
        roles = sorted({m["role"] for m in value} - {"assistant"})
        if roles:
            raise RowProblem(f"field {name!r} must hold assistant messages only; found role(s) {roles}")
    if _is_empty(value):
        raise Unusable(EMPTY_COMPLETION)
    return value


def _same_kind(prompt: Prompt, completion: Messages | str, names: tuple[str, str]) -> None:
    if isinstance(prompt, list) != isinstance(completion, list):
        kinds = ["messages" if isinstance(v, list) else "text" for v in (prompt, completion)]
        raise RowProblem(
            f"field {names[0]!r} is {kinds[0]} but {names[1]!r} is {kinds[1]}; TRL expects both conversational "
            "(lists of messages) or both text"
        )


SFT_FORMATS = '{"messages"}, {"text"} or {"prompt", "completion"}'


def sft_row(row: Any) -> SFTExample:
    row = _require_object(row)
    if "completion" in row:
        prompt, completion = _value(row, "prompt"), _value(row, "completion")
        _same_kind(prompt, completion, ("prompt", "completion"))
        return SFTExample(prompt, _completion(completion, "completion"))
    if "messages" in row:
        messages = _messages(row["messages"], "messages")
        if messages[-1]["role"] != "assistant":
            raise RowProblem("the last message must be the assistant's response to train on")
        return SFTExample(messages[:-1], _completion(messages[-1:], "messages[-1]"))
    if "text" in row:
        if not isinstance(row["text"], str):
            raise RowProblem("field 'text' must be a string")
        return SFTExample("", _completion(row["text"], "text"))
    raise RowProblem(f"expected one of TRL's SFT formats {SFT_FORMATS}; found field(s) {sorted(row)}")


def preference_row(row: Any) -> PreferenceExample:
    row = _require_object(row)
    missing = [name for name in ("chosen", "rejected") if row.get(name) is None]
    if missing:
        raise RowProblem(
            f"missing field(s) {missing}; expected {{'prompt', 'chosen', 'rejected'}} or {{'chosen', 'rejected'}} "
            f"(implicit prompt); found {sorted(row)}"
        )
    chosen, rejected = _value(row, "chosen"), _value(row, "rejected")
    _same_kind(chosen, rejected, ("chosen", "rejected"))
    if _is_empty(chosen) or _is_empty(rejected):
        raise Unusable(EMPTY_COMPLETION)
    example = {"chosen": chosen, "rejected": rejected}
    if row.get("prompt") is not None:
        example["prompt"] = _value(row, "prompt")
        if isinstance(example["prompt"], list) and not isinstance(chosen, list):
            _same_kind(example["prompt"], chosen, ("prompt", "chosen"))
    if "prompt" not in example or isinstance(example["prompt"], list) != isinstance(chosen, list):
        # No prompt, or a text one beside whole conversations (UltraFeedback): the prompt is what chosen and
        # rejected share, as TRL's maybe_extract_prompt reads it.
        from trl.data_utils import extract_prompt

        example = extract_prompt({"chosen": chosen, "rejected": rejected})
        if not example["prompt"]:
            raise RowProblem("chosen and rejected share no start, so there is no prompt (TRL's implicit prompt)")
    prompt = example["prompt"]
    responses = [_completion(example[name], name) for name in ("chosen", "rejected")]
    if responses[0] == responses[1]:
        raise Unusable(IDENTICAL_RESPONSES)
    return PreferenceExample(prompt, *responses)


def eval_row(row: Any) -> EvalExample:
    row = _require_object(row)
    prompt = _value(row, "prompt")
    given = [name for name in ("reference", "completion") if row.get(name) is not None]
    if not given:
        raise RowProblem(
            f"missing field 'reference' (or TRL's 'completion'), the response to beat; found {sorted(row)}"
        )
    if len(given) > 1:
        raise RowProblem("both 'reference' and 'completion' are given; the response to beat is one of them")
    reference = row[given[0]]
    if isinstance(reference, list):
        messages = _messages(reference, given[0])
        if [m["role"] for m in messages] != ["assistant"]:
            raise RowProblem(f"field {given[0]!r} must be a string or one assistant message")
        reference = messages[0]["content"]
    if not isinstance(reference, str):
        raise RowProblem(f"field {given[0]!r} must be a string")
    split = row.get("split") or "eval"
    return EvalExample(prompt, reference, str(split))


ROW_READERS: dict[str, Callable[[Any], Any]] = {"sft": sft_row, "preferences": preference_row, "eval": eval_row}


# ------------------------------------------------------------------------------------------------------ report


@dataclass
class DataReport:
    """What happened to a dataset's rows: how many, which were dropped and which truncated, by reason."""

    dataset: str
    source: str
    rows: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)
    """Reason -> where each dropped row came from."""
    truncated: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, where: str) -> None:
        self.dropped.setdefault(reason, []).append(where)

    def truncate(self, reason: str, where: str) -> None:
        self.truncated.setdefault(reason, []).append(where)

    @property
    def used(self) -> int:
        return self.rows - sum(len(rows) for rows in self.dropped.values())

    def metrics(self) -> dict[str, float]:
        """`data/<dataset>/rows`, `.../used`, `.../dropped/<reason>`, `.../truncated/<reason>` (row counts)."""
        prefix = f"data/{self.dataset}"
        found = {f"{prefix}/rows": float(self.rows), f"{prefix}/used": float(self.used)}
        for outcome, reasons in (("dropped", self.dropped), ("truncated", self.truncated)):
            found.update({f"{prefix}/{outcome}/{reason}": float(len(rows)) for reason, rows in reasons.items()})
        return found

    def table(self) -> list[dict[str, Any]]:
        """One row per (outcome, reason) with its count, its share of the dataset and the first rows."""
        return [
            {
                "dataset": self.dataset,
                "source": self.source,
                "outcome": outcome,
                "reason": reason,
                "rows": len(rows),
                "share": len(rows) / max(self.rows, 1),
                "first_rows": "; ".join(rows[:FIRST_ROWS_SHOWN]),
            }
            for outcome, reasons in (("dropped", self.dropped), ("truncated", self.truncated))
            for reason, rows in sorted(reasons.items())
        ]

    def refuse_excess(self, max_share: float, setting: str) -> None:
        """DataError when nothing is left, or more than `max_share` of the rows were dropped (`setting` names it)."""
        dropped = self.rows - self.used
        if dropped == 0 or (self.used > 0 and dropped <= max_share * self.rows):
            return
        causes = "; ".join(
            f"{reason} ({REASONS[reason]}): {len(rows)}, first {', '.join(rows[:FIRST_ROWS_SHOWN])}"
            for reason, rows in sorted(self.dropped.items())
        )
        if self.used == 0:
            raise DataError(f"{self.source}: none of its {self.rows} rows can be used; {causes}")
        raise DataError(
            f"{self.source}: {dropped} of {self.rows} rows ({100 * dropped / self.rows:.1f}%) cannot be used, more "
            f"than {setting} ({100 * max_share:g}%); {causes}"
        )

    def describe(self) -> str:
        return describe_counts(self.metrics())[0][1]

    def log(self) -> None:
        """The counts as metrics of the active MLflow run, and the table as `data_report_<dataset>.json`."""
        import mlflow

        mlflow.log_metrics(self.metrics())
        table = self.table() or [
            {"dataset": self.dataset, "source": self.source, "outcome": "used", "reason": "", "rows": self.rows}
        ]
        mlflow.log_table({key: [row.get(key) for row in table] for key in table[0]}, f"data_report_{self.dataset}.json")


def data_counts(metrics: dict[str, float]) -> dict[str, float]:
    """The `data/...` counts among a stage's metrics."""
    return {key: value for key, value in metrics.items() if key.startswith("data/")}


def describe_counts(counts: dict[str, float]) -> list[tuple[str, str]]:
    """(dataset, "U of N rows used; dropped: reason n, ...; truncated: ...") for each dataset in `counts`."""
    described = []
    for dataset in dict.fromkeys(key.split("/")[1] for key in counts):
        prefix = f"data/{dataset}/"
        text = f"{int(counts.get(prefix + 'used', 0))} of {int(counts.get(prefix + 'rows', 0))} rows used"
        for outcome in ("dropped", "truncated"):
            found = [
                f"{key.removeprefix(prefix + outcome + '/')} {int(value)}"
                for key, value in counts.items()
                if key.startswith(f"{prefix}{outcome}/")
            ]
            if found:
                text += f"; {outcome}: {', '.join(found)}"
        described.append((dataset, text))
    return described


class Checked(list):
    """The usable examples of a dataset, in order, with the report of the rows left out."""

    def __init__(self, examples: list, report: DataReport):
        super().__init__(examples)
        self.report = report


def _listed(problems: list[str]) -> str:
    shown = problems[:PROBLEMS_SHOWN]
    more = len(problems) - len(shown)
    return "\n".join(shown) + (f"\n... and {more} more rows with problems" if more else "")


def load_dataset_checked(source: str, kind: DatasetKind) -> Checked:
    """Every row of `source` read as `kind`: a DataError names every malformed row (file, row, field, what was
    expected); well-formed rows that cannot be trained on are dropped and counted in the report."""
    read = ROW_READERS[kind]
    report = DataReport(kind, source)
    examples, problems = [], []
    rows = load_rows(source)
    report.rows = len(rows)
    for where, row in rows:
        try:
            example = read(row)
        except RowProblem as problem:
            problems.append(f"{where}: {problem}")
        except Unusable as unusable:
            report.drop(unusable.reason, where)
        else:
            examples.append(dataclasses.replace(example, where=where))
    if problems:
        raise DataError(_listed(problems))
    if not rows:
        raise DataError(f"{source}: the dataset has no rows")
    return Checked(examples, report)


# ------------------------------------------------------------------------------------------------------ tokens


@dataclass(frozen=True)
class Truncation:
    """How a training section fits a prompt and its completion(s) into `max_length` tokens (TRL's settings).

    - `max_completion_length`: a longer completion loses its end.
    - `max_prompt_length`: a longer prompt keeps its end (`keep_end`: whole turns are dropped from the front of a
      conversation, its system message kept) or its start (`keep_start`: text only; a conversation is dropped,
      since cutting its end removes the message the completion answers).
    - `max_length`, the whole sequence: `keep_start` keeps the prompt and cuts the completion's end, dropping a row
      whose prompt alone fills it; `keep_end` first shortens the prompt from its front (to one token of text, or
      the last turn of a conversation) and then cuts the completion's end. Language modelling (`{"text"}`, no
      prompt) keeps the text's first tokens, or its last under `keep_end`, as TRL does.
    """

    max_length: int
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    mode: Literal["keep_start", "keep_end"] = "keep_start"

    @classmethod
    def of(cls, settings: Any) -> "Truncation":
        """The truncation of an `sft` or `dpo` section."""
        return cls(
            settings.max_length, settings.max_prompt_length, settings.max_completion_length, settings.truncation_mode
        )


def chat_ids(tokenizer, messages: Messages, add_generation_prompt: bool = False) -> list[int]:
    if tokenizer.chat_template is None:
        raise ConfigError(
            f"{tokenizer.name_or_path}: the tokenizer has no chat template, which conversational data needs; set "
            "model.chat_template (e.g. `default`) or give the data in a text format"
        )
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return list(encoded["input_ids"])


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """The prompt's token ids for generation: with the chat template's generation prompt, or the text as it is."""
    if isinstance(prompt, list):
        return chat_ids(tokenizer, prompt, add_generation_prompt=True)
    return list(tokenizer(prompt)["input_ids"])


def render(tokenizer, prompt: Prompt, completions: Sequence[Messages | str]) -> tuple[list[int], list[list[int]]]:
    """Token ids of the prompt and of each completion after it, as TRL's SFT and DPO trainers make them.

    Conversations go through the chat template (the prompt with its generation prompt); text is tokenised as it
    is, each completion followed by EOS unless it ends with it. Each completion starts where the tokenised prompt
    and prompt + completion diverge (TRL's `common_prefix_length`), the same point for all of them.
    """
    from trl.data_utils import common_prefix_length, is_conversational

    if is_conversational({"completion": completions[0]}):
        full = [chat_ids(tokenizer, prompt + completion) for completion in completions]
    else:
        eos = tokenizer.eos_token or ""
        full = [
            list(tokenizer(prompt + completion + ("" if completion.endswith(eos) else eos))["input_ids"])
            for completion in completions
        ]
    alone = prompt_ids(tokenizer, prompt)
    shared = min(common_prefix_length(alone, ids) for ids in full)
    if shared < len(alone):  # shown once per place, as Python shows warnings
        warnings.warn(
            "the tokenised prompt is not a prefix of prompt + completion (the chat template renders it differently "
            "alone, or tokens merge across the boundary); completions start where they diverge, as in TRL",
            stacklevel=2,
        )
    return full[0][:shared], [ids[shared:] for ids in full]


def _shorter_prompts(prompt: Messages) -> Iterator[Messages]:
    """The conversation with its first turns dropped, one more each time, down to its last turn; a leading system
    message stays. A turn starts at a user message."""
    system = 0
    while system < len(prompt) and prompt[system]["role"] == "system":
        system += 1
    for start in range(system + 1, len(prompt)):
        if prompt[start]["role"] == "user":
            yield prompt[:system] + prompt[start:]


@dataclass(frozen=True)
class Fitted:
    prompt_ids: list[int]
    completion_ids: list[list[int]]
    truncated: frozenset[str]


def fit(tokenizer, prompt: Prompt, completions: Sequence[Messages | str], limits: Truncation) -> Fitted:
    """The prompt and its completions tokenised and fitted into `limits` (see `Truncation`), with what was cut;
    `Unusable` when nothing sensible is left."""
    truncated: set[str] = set()

    def rendered(candidate: Prompt) -> tuple[list[int], list[list[int]]]:
        ids, outputs = render(tokenizer, candidate, completions)
        if limits.max_completion_length is not None:
            if any(len(c) > limits.max_completion_length for c in outputs):
                truncated.add(COMPLETION_TRUNCATED)
            outputs = [c[: limits.max_completion_length] for c in outputs]
        return ids, outputs

    ids, outputs = rendered(prompt)
    keep_end = limits.mode == "keep_end"
    length = limits.max_length
    if prompt == "":  # language modelling: the text alone, its start or (keep_end) its end
        if len(outputs[0]) > length:
            truncated.add(COMPLETION_TRUNCATED)
            outputs = [c[-length:] if keep_end else c[:length] for c in outputs]
        return Fitted(ids, outputs, frozenset(truncated))
    budget = min(
        limits.max_prompt_length or math.inf,
        length - max(len(c) for c in outputs) if keep_end else math.inf,
    )
    if len(ids) > budget:
        truncated.add(PROMPT_TRUNCATED)
        if isinstance(prompt, str):
            keep = max(int(budget), 1)
            ids = ids[-keep:] if keep_end else ids[:keep]
        elif not keep_end:
            raise Unusable(PROMPT_TOO_LONG)
        else:
            for shorter in _shorter_prompts(prompt):
                ids, outputs = rendered(shorter)
                if len(ids) <= budget:
                    break
            if limits.max_prompt_length is not None and len(ids) > limits.max_prompt_length:
                raise Unusable(PROMPT_TOO_LONG)
    if len(ids) >= length:
        raise Unusable(PROMPT_TOO_LONG)
    room = length - len(ids)
    if any(len(c) > room for c in outputs):
        truncated.add(COMPLETION_TRUNCATED)
        outputs = [c[:room] for c in outputs]
    return Fitted(ids, outputs, frozenset(truncated))


def masked_sequence(fitted_prompt: list[int], completion: list[int]) -> dict[str, Any]:
    return {
        "input_ids": fitted_prompt + completion,
        "loss_mask": [False] * len(fitted_prompt) + [True] * len(completion),
    }


def prompt_and_completion_ids(
    tokenizer, prompt: Prompt, completion: Messages | str, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the completion after it, the completion's end cut to `max_length` (keep_start);
    PromptTooLong when the prompt alone fills it."""
    try:
        fitted = fit(tokenizer, prompt, [completion], Truncation(max_length))
    except Unusable:
        raise PromptTooLong(f"the prompt leaves no room for its response within max_length {max_length}") from None
    return fitted.prompt_ids, fitted.completion_ids[0]


def completion_example(tokenizer, prompt: Prompt, completion: Messages | str, max_length: int) -> dict[str, Any]:
    """Input ids with a loss mask over the completion tokens only (keep_start truncation)."""
    return masked_sequence(*prompt_and_completion_ids(tokenizer, prompt, completion, max_length))


def tokenize_examples(
    examples: Checked, encode: Callable[[Any], tuple[dict[str, Any], frozenset[str]]]
) -> list[dict[str, Any]]:
    """`encode(example)` for every example; drops and truncations go into `examples.report`."""
    encoded = []
    for example in examples:
        try:
            row, truncated = encode(example)
        except Unusable as unusable:
            examples.report.drop(unusable.reason, example.where)
            continue
        for reason in sorted(truncated):
            examples.report.truncate(reason, example.where)
        encoded.append(row)
    report = examples.report
    if report.dropped or report.truncated:
        logging.getLogger(__name__).warning("%s: %s", report.source, report.describe())
    return encoded


def sft_rows(tokenizer, examples: Checked, limits: Truncation) -> list[dict[str, Any]]:
    """SFT sequences: the loss covers the completion's tokens."""

    def encode(example: SFTExample) -> tuple[dict[str, Any], frozenset[str]]:
        fitted = fit(tokenizer, example.prompt, [example.completion], limits)
        return masked_sequence(fitted.prompt_ids, fitted.completion_ids[0]), fitted.truncated

    return tokenize_examples(examples, encode)


def pair_rows(tokenizer, examples: Checked, limits: Truncation) -> list[dict[str, Any]]:
    """Preference pairs: the chosen and the rejected sequence, both after the same (fitted) prompt."""

    def encode(pair: PreferenceExample) -> tuple[dict[str, Any], frozenset[str]]:
        fitted = fit(tokenizer, pair.prompt, [pair.chosen, pair.rejected], limits)
        chosen, rejected = fitted.completion_ids
        return {
            "chosen": masked_sequence(fitted.prompt_ids, chosen),
            "rejected": masked_sequence(fitted.prompt_ids, rejected),
        }, fitted.truncated

    return tokenize_examples(examples, encode)
