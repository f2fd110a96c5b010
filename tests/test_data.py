import json
from pathlib import Path

import pytest

from post_train.data import DataError, load_dataset_checked, prompt_and_completion_ids


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


USER = {"role": "user", "content": "Reverse: a b"}
ASSISTANT = {"role": "assistant", "content": "b a"}


def test_trl_formats_load_from_a_file_and_from_a_directory(tmp_path: Path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [USER, ASSISTANT]}] * 3)
    assert len(load_dataset_checked(str(sft), "sft")) == 3
    folder = tmp_path / "prefs"
    folder.mkdir()
    write_jsonl(
        folder / "a.jsonl",
        [{"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": "a b"}]}],
    )
    write_jsonl(folder / "b.jsonl", [{"prompt": "Sort: b a", "chosen": "a b", "rejected": "b a"}])
    pairs = load_dataset_checked(str(folder), "preferences")
    assert [p.prompt[0]["role"] for p in pairs] == ["user", "user"]
    assert pairs[1].chosen == [{"role": "assistant", "content": "a b"}]
    rows = load_dataset_checked(
        str(write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "Copy: a", "reference": "a"}])), "eval"
    )
    assert rows[0].split == "eval"


@pytest.mark.parametrize(
    ("kind", "row", "message"),
    [
        ("sft", {"text": "hello"}, "row 1: missing field(s) ['messages']"),
        ("sft", {"messages": [USER]}, "row 1: the last message must be the assistant's"),
        ("sft", {"messages": [{"role": "robot", "content": "x"}, ASSISTANT]}, "row 1: messages[0].role is 'robot'"),
        (
            "sft",
            {"messages": [{"role": "user"}, ASSISTANT]},
            "row 1: messages[0] must be a message with 'role' and 'content'",
        ),
        ("preferences", {"prompt": [USER], "chosen": [ASSISTANT]}, "row 1: missing field(s) ['rejected']"),
        (
            "preferences",
            {"prompt": [USER], "chosen": [USER], "rejected": [ASSISTANT]},
            "field 'chosen' must hold one assistant message",
        ),
        ("eval", {"prompt": [USER], "reference": 3}, "row 1: field 'reference' must be a string"),
    ],
)
def test_a_malformed_row_is_named_with_its_file_and_index(tmp_path: Path, kind, row, message):
    good = {
        "sft": {"messages": [USER, ASSISTANT]},
        "preferences": {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [ASSISTANT]},
        "eval": {"prompt": [USER], "reference": "b a"},
    }[kind]
    path = write_jsonl(tmp_path / f"{kind}.jsonl", [good, row])
    with pytest.raises(DataError) as error:
        load_dataset_checked(str(path), kind)
    assert str(error.value).startswith(f"{path}, row 1") and message in str(error.value)


def test_empty_and_unknown_sources_are_refused(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files"):
        load_dataset_checked(str(tmp_path / "empty"), "sft")
    # Not a local path, so it is tried as a Hub dataset, which offline mode refuses.
    with pytest.raises(DataError, match="not a local path, and loading it as a Hub dataset failed"):
        load_dataset_checked("no-such-org/no-such-dataset", "sft")


def test_completion_ids_follow_the_prompt_exactly(smoke_stages):
    from post_train.modeling import load_tokenizer

    _, _, base = smoke_stages
    tokenizer = load_tokenizer(base.path)
    prompt_ids, completion_ids = prompt_and_completion_ids(tokenizer, [USER], [ASSISTANT], max_length=64)
    assert tokenizer.decode(completion_ids, skip_special_tokens=True) == "b a"
    assert completion_ids[-1] == tokenizer.eos_token_id
    truncated = prompt_and_completion_ids(tokenizer, [USER], [ASSISTANT], max_length=len(prompt_ids) + 1)[1]
    assert truncated == completion_ids[:1]
    with pytest.raises(DataError, match="leaves no room"):
        prompt_and_completion_ids(tokenizer, [USER], [ASSISTANT], max_length=len(prompt_ids))


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


def test_preference_responses_may_repeat_the_prompt_as_ultrafeedback_does(tmp_path: Path):
    row = {
        "prompt": "Reverse: a b",
        "chosen": [USER, ASSISTANT],
        "rejected": [USER, {"role": "assistant", "content": "a b"}],
    }
    pairs = load_dataset_checked(str(write_jsonl(tmp_path / "prefs.jsonl", [row])), "preferences")
    assert pairs[0].chosen == [ASSISTANT] and pairs[0].rejected == [{"role": "assistant", "content": "a b"}]
    other = {**row, "chosen": [{"role": "user", "content": "something else"}, ASSISTANT]}
    with pytest.raises(DataError, match="one assistant message, optionally after the prompt's messages"):
        load_dataset_checked(str(write_jsonl(tmp_path / "bad.jsonl", [other])), "preferences")


def test_examples_whose_prompt_fills_max_length_are_left_out(smoke_stages, caplog):
    from post_train.data import SFTExample
    from post_train.modeling import load_tokenizer
    from tasks.sft import sft_examples

    tokenizer = load_tokenizer(smoke_stages[2].path)
    short = SFTExample([USER, ASSISTANT])
    long = SFTExample([{"role": "user", "content": "Copy: " + " ".join("abcdefgh" * 4)}, ASSISTANT])
    rows = sft_examples(tokenizer, [short, long, short], max_length=24, source="mine.jsonl")
    assert len(rows) == 2 and "left out 1 of 3 examples" in caplog.text
    with pytest.raises(DataError, match="mine.jsonl: every prompt is longer than max_length 24"):
        sft_examples(tokenizer, [long], max_length=24, source="mine.jsonl")
