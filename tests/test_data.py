"""Datasets: every TRL format with TRL's meaning, truncation (token-exact, on a tiny world tokenizer), the rows left
out and their counts, and the reference pass over the rows a run draws."""

import json
from pathlib import Path

import pytest

from post_train.data import (
    COMPLETION_TRUNCATED,
    EMPTY_COMPLETION,
    IDENTICAL_RESPONSES,
    PROMPT_TOO_LONG,
    PROMPT_TRUNCATED,
    DataError,
    EvalExample,
    PreferenceExample,
    SFTExample,
    Truncation,
    Unusable,
    fit,
    load_dataset_checked,
    pair_rows,
    prompt_and_completion_ids,
    prompt_text,
    sft_rows,
)
from post_train.errors import ConfigError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


USER = user("Reverse: a b")
ASSISTANT = assistant("b a")


def load(tmp_path: Path, kind: str, rows: list):
    return load_dataset_checked(str(write_jsonl(tmp_path / f"{kind}.jsonl", rows)), kind)


@pytest.fixture(scope="module")
def tokenizer():
    """The world's tokenizer (one token per letter, role tokens special, EOS `<|end|>`) trained on a few texts."""
    from post_train.world.model import train_tokenizer

    texts = ["Copy: a b c d", "Reverse: a b", "Sort: c b a", "You are terse.", "b a", "a b c"]
    return train_tokenizer(texts * 5, vocab_size=64)


class Ids:
    """Token-exact expectations: the special tokens and the ids of a text tokenised on its own."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos, self.system, self.user, self.assistant, self.end = tokenizer.convert_tokens_to_ids(
            ["<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
        )

    def __call__(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def turn(self, role: str, text: str) -> list[int]:
        return [getattr(self, role), *self(text), self.end]


@pytest.fixture(scope="module")
def ids(tokenizer):
    return Ids(tokenizer)


# ------------------------------------------------------------------------------------------------ formats


def test_every_trl_sft_format_is_read_with_trls_meaning(tmp_path: Path):
    rows = [
        {"messages": [USER, ASSISTANT]},
        {"text": "a b c"},
        {"prompt": [USER], "completion": [ASSISTANT]},
        {"prompt": "Reverse: a b", "completion": " b a"},
    ]
    examples = load(tmp_path, "sft", rows)
    assert [(e.prompt, e.completion, e.conversational) for e in examples] == [
        ([USER], [ASSISTANT], True),
        ("", "a b c", False),  # language modelling: no prompt, every token counts
        ([USER], [ASSISTANT], True),
        ("Reverse: a b", " b a", False),
    ]
    assert [e.where for e in examples] == [f"{tmp_path / 'sft.jsonl'}, row {i}" for i in range(4)]


def test_every_trl_preference_format_is_read_with_trls_meaning(tmp_path: Path):
    rows = [
        {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [assistant("a b")]},  # explicit, conversational
        {"prompt": "Sort: b a", "chosen": " a b", "rejected": " b a"},  # explicit, text
        {"chosen": [USER, ASSISTANT], "rejected": [USER, assistant("a b")]},  # implicit, conversational
        {"chosen": "Sort: b a = a b", "rejected": "Sort: b a = b a"},  # implicit, text: TRL's extract_prompt
        {"prompt": "Reverse: a b", "chosen": [USER, ASSISTANT], "rejected": [USER, assistant("a b")]},  # UltraFeedback
    ]
    pairs = load(tmp_path, "preferences", rows)
    assert pairs[0] == PreferenceExample([USER], [ASSISTANT], [assistant("a b")], pairs[0].where)
    assert (pairs[1].prompt, pairs[1].chosen, pairs[1].rejected) == ("Sort: b a", " a b", " b a")
    assert (pairs[2].prompt, pairs[2].chosen, pairs[2].rejected) == ([USER], [ASSISTANT], [assistant("a b")])
    # The shared start is the prompt; the space before the first difference goes with the responses.
    assert (pairs[3].prompt, pairs[3].chosen, pairs[3].rejected) == ("Sort: b a =", " a b", " b a")
    assert (pairs[4].prompt, pairs[4].chosen) == ([USER], [ASSISTANT])
    assert [p.conversational for p in pairs] == [True, False, True, False, True]


def test_implicit_prompt_is_trls_extract_prompt(tmp_path: Path):
    from trl.data_utils import extract_prompt

    row = {"chosen": "Sort: b a = a b", "rejected": "Sort: b a = b a"}
    pair = load(tmp_path, "preferences", [row])[0]
    assert {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected} == extract_prompt(row)
    assert pair.prompt == "Sort: b a =" and pair.chosen == " a b"


def test_evaluation_rows_take_a_reference_or_trls_completion(tmp_path: Path):
    rows = [
        {"prompt": [USER], "reference": "b a", "split": "held_out"},
        {"prompt": "Reverse: a b", "completion": "b a"},
        {"prompt": [USER], "completion": [ASSISTANT]},
    ]
    examples = load(tmp_path, "eval", rows)
    assert [(e.reference, e.split, e.conversational) for e in examples] == [
        ("b a", "held_out", True),
        ("b a", "eval", False),
        ("b a", "eval", True),
    ]
    assert examples[1].messages == [USER] and examples[1].instruction == "Reverse: a b"


def test_the_samples_table_holds_the_whole_conversation_of_each_prompt():
    from post_train.judges.base import Verdict
    from post_train.judging import samples_table

    conversation = [{"role": "system", "content": "Be terse."}, USER, ASSISTANT, user("Again: c d")]
    examples = [
        EvalExample(conversation, "d c", "x"),
        EvalExample([USER], "b a", "x"),
        EvalExample("Copy: a", "a", "x"),
    ]
    rows = samples_table(examples, ["d c", "a b", "a"], ["d c", "b a", "a"], [Verdict(0.5)] * 3)
    assert [row["prompt"] for row in rows] == [
        "system: Be terse.\n\nuser: Reverse: a b\n\nassistant: b a\n\nuser: Again: c d",
        "Reverse: a b",  # one message: its content, as before
        "Copy: a",
    ]
    assert prompt_text(conversation) == rows[0]["prompt"]


def test_text_formats_are_tokenised_as_text_and_conversations_through_the_chat_template(tokenizer, ids):
    conversation = fit(tokenizer, [USER], [[ASSISTANT]], Truncation(64))
    assert conversation.prompt_ids == [ids.bos, *ids.turn("user", "Reverse: a b"), ids.assistant]
    assert conversation.completion_ids == [[*ids("b a"), ids.end]]
    # TRL's text prompt-completion: prompt + completion + EOS tokenised together, no template, no role tokens.
    text = fit(tokenizer, "Reverse: a b", [" b a"], Truncation(64))
    assert text.prompt_ids == ids("Reverse: a b")
    assert text.completion_ids == [ids("Reverse: a b b a")[len(ids("Reverse: a b")) :] + [ids.end]]
    assert fit(tokenizer, "Reverse: a b", [" b a<|end|>"], Truncation(64)) == text  # EOS not doubled
    language_modelling = fit(tokenizer, "", ["a b c"], Truncation(64))
    assert (language_modelling.prompt_ids, language_modelling.completion_ids) == ([], [[*ids("a b c"), ids.end]])


def test_a_text_preference_is_not_wrapped_in_a_chat_template(tmp_path: Path, tokenizer, ids):
    pairs = load(tmp_path, "preferences", [{"prompt": "Sort: b a", "chosen": " a b", "rejected": " b a"}])
    [pair] = pair_rows(tokenizer, pairs, Truncation(64))
    prompt = ids("Sort: b a")
    assert pair["chosen"]["input_ids"] == ids("Sort: b a a b") + [ids.end]
    assert pair["rejected"]["input_ids"] == ids("Sort: b a b a") + [ids.end]
    assert pair["chosen"]["loss_mask"] == [False] * len(prompt) + [True] * 3


def test_conversational_data_needs_a_chat_template_and_text_data_does_not(tokenizer):
    from copy import deepcopy

    bare = deepcopy(tokenizer)
    bare.chat_template = None
    assert fit(bare, "Copy: a", [" a"], Truncation(16)).prompt_ids == list(bare("Copy: a")["input_ids"])
    with pytest.raises(ConfigError, match="no chat template, which conversational data needs"):
        fit(bare, [USER], [[ASSISTANT]], Truncation(16))


# ------------------------------------------------------------------------------------------------ truncation

LONG = "Copy: a b c d a b c d a b c d"  # 14 tokens
SYSTEM = {"role": "system", "content": "You are terse."}


def test_keep_start_cuts_the_completions_end_and_drops_a_prompt_that_fills_max_length(tokenizer, ids):
    prompt = [ids.bos, *ids.turn("user", "Reverse: a b"), ids.assistant]
    cut = fit(tokenizer, [USER], [[ASSISTANT]], Truncation(len(prompt) + 1))
    assert (cut.prompt_ids, cut.completion_ids, cut.truncated) == (prompt, [ids("b a")[:1]], {COMPLETION_TRUNCATED})
    with pytest.raises(Unusable) as dropped:
        fit(tokenizer, [USER], [[ASSISTANT]], Truncation(len(prompt)))
    assert dropped.value.reason == PROMPT_TOO_LONG


def test_max_completion_length_cuts_the_completions_end(tokenizer, ids):
    fitted = fit(tokenizer, [USER], [[ASSISTANT], [assistant("a")]], Truncation(64, max_completion_length=1))
    assert fitted.completion_ids == [ids("b a")[:1], ids("a")] and fitted.truncated == {COMPLETION_TRUNCATED}


def test_max_prompt_length_on_text_keeps_the_end_or_the_start(tokenizer, ids):
    keep_end = fit(tokenizer, LONG, [" a"], Truncation(64, max_prompt_length=3, mode="keep_end"))
    keep_start = fit(tokenizer, LONG, [" a"], Truncation(64, max_prompt_length=3, mode="keep_start"))
    assert keep_end.prompt_ids == ids(LONG)[-3:] and keep_start.prompt_ids == ids(LONG)[:3]
    assert keep_end.truncated == keep_start.truncated == {PROMPT_TRUNCATED}
    assert keep_end.completion_ids == keep_start.completion_ids == [ids(LONG + " a")[len(ids(LONG)) :] + [ids.end]]


def test_keep_end_drops_whole_turns_from_the_front_and_keeps_the_system_message(tokenizer, ids):
    conversation = [SYSTEM, user(LONG), assistant("a b c d"), user("Reverse: a b")]
    last_turn = [ids.bos, *ids.turn("system", "You are terse."), *ids.turn("user", "Reverse: a b"), ids.assistant]
    fitted = fit(
        tokenizer, conversation, [[ASSISTANT]], Truncation(64, max_prompt_length=len(last_turn), mode="keep_end")
    )
    assert fitted.prompt_ids == last_turn and fitted.completion_ids == [[*ids("b a"), ids.end]]
    assert fitted.truncated == {PROMPT_TRUNCATED}
    # max_length alone: as many first turns go as needed for prompt + completion to fit.
    completion = len(ids("b a")) + 1
    fitted = fit(tokenizer, conversation, [[ASSISTANT]], Truncation(len(last_turn) + completion, mode="keep_end"))
    assert fitted.prompt_ids == last_turn and fitted.completion_ids == [[*ids("b a"), ids.end]]
    # When even the last turn leaves too little room, the completion loses its end.
    fitted = fit(tokenizer, conversation, [[ASSISTANT]], Truncation(len(last_turn) + 1, mode="keep_end"))
    assert fitted.prompt_ids == last_turn and fitted.completion_ids == [ids("b a")[:1]]
    assert fitted.truncated == {PROMPT_TRUNCATED, COMPLETION_TRUNCATED}


def test_a_conversation_is_never_cut_inside_a_turn(tokenizer, ids):
    conversation = [user(LONG), assistant("a"), user(LONG)]
    for mode in ("keep_start", "keep_end"):  # keep_start would lose the message the completion answers
        with pytest.raises(Unusable) as dropped:
            fit(tokenizer, conversation, [[ASSISTANT]], Truncation(64, max_prompt_length=8, mode=mode))
        assert dropped.value.reason == PROMPT_TOO_LONG


def test_keep_end_shortens_a_text_prompt_from_its_front_to_fit_max_length(tokenizer, ids):
    completion = ids(LONG + " a b")[len(ids(LONG)) :] + [ids.end]
    fitted = fit(tokenizer, LONG, [" a b"], Truncation(len(completion) + 4, mode="keep_end"))
    assert fitted.prompt_ids == ids(LONG)[-4:] and fitted.completion_ids == [completion]


def test_language_modelling_keeps_the_texts_start_or_its_end(tokenizer, ids):
    text = [*ids(LONG), ids.end]
    assert fit(tokenizer, "", [LONG], Truncation(5)).completion_ids == [text[:5]]
    assert fit(tokenizer, "", [LONG], Truncation(5, mode="keep_end")).completion_ids == [text[-5:]]


def test_pairs_share_one_fitted_prompt(tokenizer, ids):
    conversation = [user(LONG), assistant("a"), user("Reverse: a b")]
    limits = Truncation(64, max_prompt_length=10, mode="keep_end")
    fitted = fit(tokenizer, conversation, [[ASSISTANT], [assistant("a b c")]], limits)
    assert fitted.prompt_ids == [ids.bos, *ids.turn("user", "Reverse: a b"), ids.assistant]
    assert fitted.completion_ids == [[*ids("b a"), ids.end], [*ids("a b c"), ids.end]]


def test_the_demo_worlds_token_ids_are_unchanged(tokenizer, ids):
    """Today's rule (prompt with generation prompt, completion = the rest up to max_length) is keep_start's."""
    prompt, completion = prompt_and_completion_ids(tokenizer, [USER], [ASSISTANT], max_length=64)
    full = tokenizer.apply_chat_template([USER, ASSISTANT], tokenize=True, return_dict=True)["input_ids"]
    assert prompt + completion == list(full) and len(prompt) == len(
        tokenizer.apply_chat_template([USER], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    )


# ------------------------------------------------------------------------------------------------ rows left out


def test_unusable_rows_are_dropped_and_counted_per_reason(tmp_path: Path, tokenizer):
    rows = [{"prompt": [USER], "chosen": [ASSISTANT], "rejected": [assistant("a b")]}] * 18 + [
        {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [ASSISTANT]},
        {"prompt": "Sort: b a", "chosen": " ", "rejected": " b a"},
    ]
    pairs = load(tmp_path, "preferences", rows)
    where = str(tmp_path / "preferences.jsonl")
    assert len(pairs) == 18
    assert pairs.report.dropped == {IDENTICAL_RESPONSES: [f"{where}, row 18"], EMPTY_COMPLETION: [f"{where}, row 19"]}
    pair_rows(tokenizer, pairs, Truncation(64, max_completion_length=1))
    assert pairs.report.metrics() == {
        "data/preferences/rows": 20.0,
        "data/preferences/used": 18.0,
        "data/preferences/dropped/identical_responses": 1.0,
        "data/preferences/dropped/empty_completion": 1.0,
        "data/preferences/truncated/completion_truncated": 18.0,
    }
    with pytest.raises(
        DataError, match=r"2 of 20 rows \(10.0%\) cannot be used, more than dpo.max_dropped_share \(5%\)"
    ):
        pairs.report.refuse_excess(0.05, "dpo.max_dropped_share")
    pairs.report.refuse_excess(0.1, "dpo.max_dropped_share")  # 10% is allowed at 10%


def test_a_dataset_with_nothing_usable_is_refused_naming_the_reason_and_the_first_rows(tmp_path: Path):
    examples = load(tmp_path, "sft", [{"prompt": "Copy: a", "completion": ""}] * 4)
    with pytest.raises(DataError) as error:
        examples.report.refuse_excess(1.0, "sft.max_dropped_share")
    message = str(error.value)
    assert "none of its 4 rows can be used" in message and "empty_completion" in message
    assert f"{tmp_path / 'sft.jsonl'}, row 0, {tmp_path / 'sft.jsonl'}, row 1" in message


def test_rows_whose_prompt_fills_max_length_are_dropped_and_counted(tmp_path: Path, tokenizer):
    examples = load(tmp_path, "sft", [{"messages": [USER, ASSISTANT]}, {"messages": [user(LONG), ASSISTANT]}])
    rows = sft_rows(tokenizer, examples, Truncation(12))
    assert len(rows) == 1 and examples.report.dropped == {PROMPT_TOO_LONG: [f"{tmp_path / 'sft.jsonl'}, row 1"]}
    assert examples.report.describe() == "1 of 2 rows used; dropped: prompt_too_long 1"


# ------------------------------------------------------------------------------------------------ malformed rows


@pytest.mark.parametrize(
    ("kind", "row", "message"),
    [
        ("sft", {"input": "x", "output": "y"}, "expected one of TRL's SFT formats"),
        ("sft", {"messages": [USER]}, "the last message must be the assistant's"),
        ("sft", {"messages": [{"role": "robot", "content": "x"}, ASSISTANT]}, "messages[0].role is 'robot'"),
        ("sft", {"messages": [{"role": "user"}, ASSISTANT]}, "messages[0] must be a message with 'role' and 'content'"),
        ("sft", {"prompt": [USER], "completion": "b a"}, "TRL expects both conversational"),
        ("sft", {"completion": "b a"}, "missing field 'prompt'"),
        ("sft", {"text": 3}, "field 'text' must be a string"),
        ("preferences", {"prompt": [USER], "chosen": [ASSISTANT]}, "missing field(s) ['rejected']"),
        ("preferences", {"prompt": [USER], "chosen": [USER], "rejected": [ASSISTANT]}, "assistant messages only"),
        ("preferences", {"chosen": "yes", "rejected": "no"}, "share no start"),
        ("preferences", {"prompt": "x", "chosen": [ASSISTANT], "rejected": " b"}, "TRL expects both"),
        ("preferences", {"prompt": [USER], "chosen": "b a", "rejected": "a b"}, "'prompt' is messages but 'chosen'"),
        ("eval", {"prompt": [USER], "reference": 3}, "field 'reference' must be a string"),
        ("eval", {"prompt": [USER]}, "missing field 'reference' (or TRL's 'completion')"),
        ("eval", {"prompt": [USER], "completion": [USER]}, "must be a string or one assistant message"),
    ],
)
def test_a_malformed_row_is_named_with_its_file_index_and_field(tmp_path: Path, kind, row, message):
    good = {
        "sft": {"messages": [USER, ASSISTANT]},
        "preferences": {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [assistant("a b")]},
        "eval": {"prompt": [USER], "reference": "b a"},
    }[kind]
    path = write_jsonl(tmp_path / f"{kind}.jsonl", [good, row])
    with pytest.raises(DataError) as error:
        load_dataset_checked(str(path), kind)
    assert str(error.value).startswith(f"{path}, row 1: ") and message in str(error.value)


def test_every_malformed_row_is_reported_at_once(tmp_path: Path):
    rows = [{"messages": [USER, ASSISTANT]}, {"messages": [USER]}, {"text": 1}, {"nothing": 0}]
    with pytest.raises(DataError) as error:
        load(tmp_path, "sft", rows)
    lines = str(error.value).splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [f"{tmp_path / 'sft.jsonl'}, row {i}" for i in (1, 2, 3)]


def test_empty_and_unknown_sources_are_refused(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files"):
        load_dataset_checked(str(tmp_path / "empty"), "sft")
    # Not a local path, so it is tried as a Hub dataset, which offline mode refuses.
    with pytest.raises(DataError, match="not a local path, and loading it as a Hub dataset failed"):
        load_dataset_checked("no-such-org/no-such-dataset", "sft")


def test_rows_are_located_in_their_own_file_and_broken_json_is_named(tmp_path: Path):
    folder = tmp_path / "sft"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"messages": [USER, ASSISTANT]}] * 2)
    write_jsonl(folder / "b.jsonl", [{"messages": [USER, ASSISTANT]}, {"messages": [USER]}])
    with pytest.raises(DataError, match=r"b\.jsonl, row 1: the last message"):
        load_dataset_checked(str(folder), "sft")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"messages": [USER, ASSISTANT]}) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl, row 1 \(line 3\): not valid JSON"):
        load_dataset_checked(str(broken), "sft")


def test_example_records_carry_their_row(tmp_path: Path):
    [example] = load(tmp_path, "eval", [{"prompt": "Copy: a", "reference": "a"}])
    assert example == EvalExample("Copy: a", "a", "eval", f"{tmp_path / 'eval.jsonl'}, row 0")
    assert SFTExample([USER], [ASSISTANT]).conversational


# ------------------------------------------------------------------------------------------------ reference pass


@pytest.mark.parametrize(("max_steps", "rollout_steps"), [(None, 1), (2, 1), (3, 2), (1, 1)])
def test_rows_drawn_are_the_rows_training_puts_in_its_batches(max_steps, rollout_steps):
    import torch

    from post_train.config import TrainConfig
    from post_train.training import StepOutput, make_accelerator, rows_drawn, train

    config = TrainConfig(
        learning_rate=1e-3, batch_size=4, micro_batch_size=2, max_steps=max_steps, epochs=2, log_every=1, seed=3
    )
    accelerator = make_accelerator("no")
    collated: set[int] = set()

    def collate(rows):
        collated.update(row["index"] for row in rows)
        return {"rows": torch.tensor([row["index"] for row in rows]), "num_units": len(rows), "num_tokens": len(rows)}

    weight = torch.nn.Linear(1, 1)

    def step(model, batch):
        return StepOutput((model(batch["rows"][:, None].float()) ** 2).sum() * 1e-6)

    dataset = [{"index": i} for i in range(13)]
    expected = rows_drawn(len(dataset), config, accelerator, rollout_steps)
    train(weight, dataset, collate, step, config, accelerator, rollout_steps=rollout_steps)
    assert expected == sorted(collated)
    if max_steps == 1:
        assert len(expected) < len(dataset)  # one step and the batch read ahead: 6 of 13 rows


def test_dpo_logs_its_data_counts_and_scores_only_the_pairs_it_draws_with_the_reference(
    smoke_stages, smoke_workspace: Path, shared_mlflow_store: str, tmp_path: Path
):
    import dataclasses

    import torch
    from mlflow import MlflowClient

    from post_train.config import load_config
    from tasks import dpo
    from tests.conftest import smoke_overrides
    from tests.test_mlflow_ui import dataset_inputs

    _, data, base = smoke_stages
    rows = [json.loads(line) for line in Path(data.preferences).read_text().splitlines()]
    spoilt = {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [ASSISTANT]}, {**rows[0], "chosen": [assistant("")]}
    preferences = write_jsonl(tmp_path / "prefs.jsonl", rows + list(spoilt))
    overrides = {
        **smoke_overrides(smoke_workspace),
        "cache_dir": str(tmp_path / "cache"),
        "dpo.max_steps": 1,
        "dpo.max_completion_length": 2,
    }
    config = load_config("lowlr", "smoke", overrides)
    result = dpo.run(config, base.path, dataclasses.replace(data, preferences=str(preferences)), str(tmp_path / "out"))

    logged = MlflowClient(shared_mlflow_store).get_run(result.run_id).data.metrics
    counts = {key: value for key, value in logged.items() if key.startswith("data/")}
    assert counts == {
        "data/preferences/rows": len(rows) + 2.0,
        "data/preferences/used": float(len(rows)),
        "data/preferences/dropped/identical_responses": 1.0,
        "data/preferences/dropped/empty_completion": 1.0,
        "data/preferences/truncated/completion_truncated": float(len(rows)),  # every response is over 2 tokens
    }
    assert {key: result.metrics[key] for key in counts} == counts  # the summary and the model card read these
    artifacts = {artifact.path for artifact in MlflowClient(shared_mlflow_store).list_artifacts(result.run_id)}
    assert "data_report_preferences.json" in artifacts
    # The file it read, under the content hash its cache key takes.
    run = MlflowClient(shared_mlflow_store).get_run(result.run_id)
    assert dataset_inputs(run) == {"preferences": (data.hashes["preferences"], "training", str(preferences.resolve()))}
    # One step of 8 pairs in micro-batches of 4, and the micro-batch the loader reads ahead: 12 of 32 pairs.
    assert logged["reference_rows"] == 12 < len(rows)
    [cached] = (tmp_path / "cache" / "reference-logps").glob("*.pt")
    assert len(torch.load(cached, weights_only=True)["lengths"]) == 2 * 12  # chosen and rejected of each pair
