"""The demo world: gold reward, data generation, tokenizer, tiny model config and CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from post_train.world.__main__ import main
from post_train.world.demonstrator import corrupt
from post_train.world.families import FAMILIES, Task, parse_task
from post_train.world.generate import (
    EVAL_FILE,
    HELD_OUT,
    IN_DISTRIBUTION,
    PREFERENCES_FILE,
    PRETRAIN_FILE,
    SFT_FILE,
    WORLD_FILES,
    build_world,
    iter_world_texts,
    write_world,
)
from post_train.world.model import tiny_llama_config, train_tokenizer
from post_train.world.params import WorldParams, WorldParamsError, load_world_params
from post_train.world.reward import gold_reward

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "seed": 7,
    "families": sorted(FAMILIES),
    "held_out_families": ["sort", "repeat_each"],
    "lengths": [3, 6],
    "alphabet_size": 8,
    "n_pretrain_docs": 600,
    "chat_pretrain_fraction": 0.15,
    "chat_pretrain_error_rate": 0.6,
    "n_sft": 64,
    "n_preference_pairs": 32,
    "n_eval_per_split": 8,
    "demonstrator_error_rate": 0.2,
}
TOKENIZER_VOCAB_SIZE = 96


def small_params(**overrides: object) -> WorldParams:
    return WorldParams(**{**SMALL, **overrides})


def prompt_of(row: dict) -> str:
    messages = row["messages"] if "messages" in row else row["prompt"]
    return messages[0]["content"]


def response_of(row: dict) -> str:
    return row["messages"][1]["content"]


# --- gold reward -------------------------------------------------------------------

PERFECT_ANSWERS = {
    "copy": ("Copy: a b c", "a b c"),
    "reverse": ("Reverse: c a f b", "b f a c"),
    "sort": ("Sort: d b a c d", "a b c d d"),
    "next_letters": ("Next letters: a c y", "b d z"),
    "repeat_each": ("Repeat each: a b", "a a b b"),
}


def test_every_family_has_a_perfect_answer_case() -> None:
    assert set(PERFECT_ANSWERS) == set(FAMILIES)


@pytest.mark.parametrize(("prompt", "answer"), PERFECT_ANSWERS.values(), ids=PERFECT_ANSWERS.keys())
def test_perfect_answer_scores_one(prompt: str, answer: str) -> None:
    assert parse_task(prompt).answer == answer
    assert gold_reward(prompt, answer) == 1.0
    assert gold_reward(prompt, f"  {answer.replace(' ', '  ')} \n") == 1.0


@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        ("Reverse: c a f b", "b f c a", 2 / 4),  # two positions right
        ("Sort: d b a c", "a b c", 3 / 4),  # one symbol missing
        ("Copy: a b c", "a b c c", 3 / 4),  # one symbol too many
        ("Copy: a b c", "a c", 1 / 3),  # a dropped symbol shifts the rest
        ("Next letters: a c", "b c", 1 / 2),
        ("Repeat each: a b", "a b b", 2 / 4),
        ("Reverse: a b", "c d", 0.0),
        ("Reverse: a b", "ba", 0.0),  # not space-separated, so one wrong symbol
    ],
)
def test_partial_credit_is_positionwise_over_the_longer_length(prompt: str, response: str, expected: float) -> None:
    assert gold_reward(prompt, response) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("response", ["", "   ", "\n"])
def test_empty_response_scores_zero(response: str) -> None:
    assert gold_reward("Sort: b a", response) == 0.0


@pytest.mark.parametrize(
    "prompt",
    [
        "Translate: a b",
        "Reverse a b",
        "Reverse:",
        "Reverse: ab c",
        "Reverse: A B",
        "Reverse: a  b",
        "Reverse: a 1",
        "Next letters: a z",  # z has no next letter
        "reverse c a = a c",  # the pretraining form is not an instruction
    ],
)
def test_foreign_prompt_is_rejected(prompt: str) -> None:
    with pytest.raises(ValueError, match="not a demo-world prompt"):
        gold_reward(prompt, "a b")


# --- demonstrator ------------------------------------------------------------------


def test_corruption_always_changes_the_answer() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        symbols = tuple(rng.choice("ab") for _ in range(rng.randint(1, 4)))
        corrupted = corrupt(symbols, "ab", rng)
        assert corrupted != symbols and len(corrupted) >= 1


@pytest.mark.parametrize("error_rate", [0.0, 0.2, 1.0])
def test_demonstrator_error_rate_is_as_configured(error_rate: float) -> None:
    rows = build_world(small_params(n_sft=2000, demonstrator_error_rate=error_rate))[SFT_FILE]
    wrong = sum(gold_reward(prompt_of(row), response_of(row)) < 1.0 for row in rows) / len(rows)
    assert wrong == pytest.approx(error_rate, abs=0.03)


# --- generated data ----------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_params() -> WorldParams:
    return load_world_params(REPO_ROOT / "params.yaml", "demo")


@pytest.fixture(scope="module")
def demo_world(demo_params: WorldParams) -> dict[str, list[dict]]:
    return build_world(demo_params)


def test_params_yaml_has_valid_demo_and_smoke_scales() -> None:
    for scale in ("demo", "smoke"):
        load_world_params(REPO_ROOT / "params.yaml", scale)


def test_demo_generation_is_fast_and_sized_as_configured(demo_params: WorldParams) -> None:
    start = time.perf_counter()
    world = build_world(demo_params)
    assert time.perf_counter() - start < 2.0
    assert len(world[PRETRAIN_FILE]) == demo_params.n_pretrain_docs
    assert len(world[SFT_FILE]) == demo_params.n_sft
    assert len(world[PREFERENCES_FILE]) == demo_params.n_preference_pairs
    assert len(world[EVAL_FILE]) == 2 * demo_params.n_eval_per_split


def test_same_params_give_byte_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    write_world(small_params(), tmp_path / "first")
    write_world(small_params(), tmp_path / "second")
    write_world(small_params(seed=8), tmp_path / "other_seed")
    for name in WORLD_FILES:
        first = (tmp_path / "first" / name).read_bytes()
        assert first == (tmp_path / "second" / name).read_bytes()
        assert first != (tmp_path / "other_seed" / name).read_bytes()


def test_rows_have_trl_formats(demo_world: dict[str, list[dict]]) -> None:
    assert {frozenset(row) for row in demo_world[PRETRAIN_FILE]} == {frozenset({"text"}), frozenset({"messages"})}
    assert [message["role"] for message in demo_world[SFT_FILE][0]["messages"]] == ["user", "assistant"]
    preference = demo_world[PREFERENCES_FILE][0]
    roles = [preference[key][0]["role"] for key in ("prompt", "chosen", "rejected")]
    assert roles == ["user", "assistant", "assistant"]
    assert set(demo_world[EVAL_FILE][0]) == {"prompt", "reference", "split"}


def test_held_out_families_appear_in_pretraining_only(
    demo_world: dict[str, list[dict]], demo_params: WorldParams
) -> None:
    lengths = range(demo_params.lengths[0], demo_params.lengths[1] + 1)
    trained, held_out = set(demo_params.trained_families), set(demo_params.held_out_families)
    for row in demo_world[SFT_FILE] + demo_world[PREFERENCES_FILE]:
        task = parse_task(prompt_of(row))
        assert task.family.name in trained and len(task.symbols) in lengths
    splits = {IN_DISTRIBUTION: trained, HELD_OUT: held_out}
    for row in demo_world[EVAL_FILE]:
        task = parse_task(prompt_of(row))
        assert task.family.name in splits[row["split"]] and len(task.symbols) in lengths
    assert [row["split"] for row in demo_world[EVAL_FILE]].count(HELD_OUT) == demo_params.n_eval_per_split
    # Pretraining covers every family, terse and in the chat format, so SFT can keep or erode held-out skills.
    terse = {row["text"].split()[0] for row in demo_world[PRETRAIN_FILE] if " = " in row.get("text", "")}
    assert terse == {FAMILIES[name].pretrain_verb for name in demo_params.families}
    chats = [row for row in demo_world[PRETRAIN_FILE] if "messages" in row]
    assert {parse_task(prompt_of(row)).family.name for row in chats} == set(demo_params.families)
    share = len(chats) / len(demo_world[PRETRAIN_FILE])
    assert abs(share - demo_params.chat_pretrain_fraction) < 0.02


def test_pretraining_docs_are_correct(demo_world: dict[str, list[dict]]) -> None:
    by_verb = {family.pretrain_verb: family for family in FAMILIES.values()}
    for row in demo_world[PRETRAIN_FILE]:
        if "messages" in row:
            continue
        words = row["text"].split()
        if words[0] == "letters":
            continue
        equals = words.index("=")
        task = Task(by_verb[words[0]], tuple(words[1:equals]))
        assert task.pretrain_text == row["text"]


def test_eval_prompts_are_distinct_and_unseen_in_training(demo_world: dict[str, list[dict]]) -> None:
    eval_prompts = [prompt_of(row) for row in demo_world[EVAL_FILE]]
    assert len(set(eval_prompts)) == len(eval_prompts)
    train_prompts = {prompt_of(row) for row in demo_world[SFT_FILE] + demo_world[PREFERENCES_FILE]}
    assert train_prompts.isdisjoint(eval_prompts)
    eval_pretrain_texts = {parse_task(prompt).pretrain_text.split(" = ")[0] for prompt in eval_prompts}
    pretrain_inputs = {row["text"].split(" = ")[0] for row in demo_world[PRETRAIN_FILE] if "text" in row}
    assert pretrain_inputs.isdisjoint(eval_pretrain_texts)
    pretrain_chats = {prompt_of(row) for row in demo_world[PRETRAIN_FILE] if "messages" in row}
    assert pretrain_chats.isdisjoint(eval_prompts)


def test_preferences_are_ordered_by_gold_reward(demo_world: dict[str, list[dict]]) -> None:
    for row in demo_world[PREFERENCES_FILE]:
        prompt = prompt_of(row)
        assert gold_reward(prompt, row["chosen"][0]["content"]) > gold_reward(prompt, row["rejected"][0]["content"])


def test_eval_reference_is_an_imperfect_demonstration(demo_world: dict[str, list[dict]]) -> None:
    rewards = [gold_reward(prompt_of(row), row["reference"]) for row in demo_world[EVAL_FILE]]
    assert 0.0 < sum(reward < 1.0 for reward in rewards) < len(rewards)


# --- params ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"families": ["reverse", "divide"]}, "valid families are"),
        ({"families": ["sort", "sort"]}, "must not repeat"),
        ({"held_out_families": ["divide"]}, "valid families are"),
        ({"held_out_families": ["sort", "copy"], "families": ["sort", "copy"]}, "no task to train on"),
        ({"held_out_families": ["sort"], "families": ["copy", "reverse"]}, "not among families"),
        ({"lengths": [5, 3]}, "min <= max"),
        ({"chat_pretrain_fraction": 1.0}, "less than 1"),
        ({"alphabet_size": 27}, "less than or equal to 26"),
        ({"demonstrator_error_rate": -0.1}, "greater than or equal to 0"),
        ({"lengths": [1, 1], "alphabet_size": 2, "n_eval_per_split": 6}, "too large"),
        ({"unknown_knob": 1}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_params_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small_params(**overrides)


# --- tokenizer and model -----------------------------------------------------------


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world") / "small"
    write_world(small_params(), out)
    return out


@pytest.fixture(scope="module")
def tokenizer(world_dir: Path) -> PreTrainedTokenizerFast:
    return train_tokenizer(iter_world_texts(world_dir), vocab_size=TOKENIZER_VOCAB_SIZE)


def chat_ids(tokenizer: PreTrainedTokenizerFast, messages: list[dict], **kwargs: object) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True).
    return tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)["input_ids"]


def test_tokenizer_round_trips_world_strings(tokenizer: PreTrainedTokenizerFast, world_dir: Path) -> None:
    for text in iter_world_texts(world_dir):
        ids = tokenizer.encode(text)
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text


def test_each_symbol_is_one_token_wherever_it_stands(tokenizer: PreTrainedTokenizerFast) -> None:
    for symbol in "abcdefgh":
        (symbol_id,) = tokenizer.encode(symbol)
        assert tokenizer.encode(f"Sort: {symbol} {symbol}")[-2:] == [symbol_id, symbol_id]
    assert len(tokenizer.encode("c a f b")) == 4


def test_special_tokens_are_set(tokenizer: PreTrainedTokenizerFast) -> None:
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<|pad|>", "<|bos|>", "<|end|>")
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3


def test_chat_prompt_is_a_token_prefix_followed_by_response_and_end(
    tokenizer: PreTrainedTokenizerFast, world_dir: Path
) -> None:
    rows = [json.loads(line) for line in (world_dir / SFT_FILE).read_text().splitlines()]
    for row in rows:
        messages = row["messages"]
        prompt_ids = chat_ids(tokenizer, messages[:1], add_generation_prompt=True)
        full_ids = chat_ids(tokenizer, messages)
        assert len(prompt_ids) < len(full_ids) and full_ids[: len(prompt_ids)] == prompt_ids
        assert full_ids[len(prompt_ids) :] == tokenizer.encode(messages[1]["content"]) + [tokenizer.eos_token_id]
        assert tokenizer.decode(full_ids[len(prompt_ids) :], skip_special_tokens=True) == messages[1]["content"]


def test_chat_template_renders_roles_and_masks_the_assistant(tokenizer: PreTrainedTokenizerFast) -> None:
    messages = [
        {"role": "system", "content": "Copy: a"},
        {"role": "user", "content": "Reverse: c a"},
        {"role": "assistant", "content": "a c"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|bos|><|system|>Copy: a<|end|><|user|>Reverse: c a<|end|><|assistant|>a c<|end|>"
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [token for token, mask in zip(encoded["input_ids"], encoded["assistant_masks"]) if mask]
    assert masked == tokenizer.encode("a c") + [tokenizer.eos_token_id]
    with pytest.raises(Exception, match="unknown role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "a"}], tokenize=False)


def test_the_pretraining_corpus_tokenised_in_one_batch_is_each_document_tokenised_alone(
    tokenizer: PreTrainedTokenizerFast, world_dir: Path
) -> None:
    from tasks.pretrain import corpus_ids

    documents = [json.loads(line) for line in (world_dir / "pretrain.jsonl").read_text().splitlines()]
    assert {"messages" in document for document in documents} == {True, False}  # both kinds of document
    alone = [
        chat_ids(tokenizer, document["messages"])
        if "messages" in document
        else [
            tokenizer.bos_token_id,
            *tokenizer(document["text"], add_special_tokens=False)["input_ids"],
            tokenizer.eos_token_id,
        ]
        for document in documents
    ]
    assert corpus_ids(tokenizer, documents) == alone


def test_tokenizer_save_and_load_round_trip(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "Next letters: a b"}, {"role": "assistant", "content": "b c"}]
    assert chat_ids(loaded, messages) == chat_ids(tokenizer, messages)
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    assert len(loaded) == len(tokenizer)


def test_too_small_vocab_is_refused(world_dir: Path) -> None:
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(iter_world_texts(world_dir), vocab_size=42)


def test_tiny_llama_runs_a_forward_pass_on_a_chat(tokenizer: PreTrainedTokenizerFast) -> None:
    config = tiny_llama_config(tokenizer)
    assert config.tie_word_embeddings and config.vocab_size == len(tokenizer)
    assert (config.pad_token_id, config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert 0.5e6 < sum(parameter.numel() for parameter in model.parameters()) < 2e6
    messages = [{"role": "user", "content": "Reverse: c a f b"}, {"role": "assistant", "content": "b f a c"}]
    input_ids = torch.tensor([chat_ids(tokenizer, messages)])
    output = model(input_ids=input_ids, labels=input_ids)
    assert output.logits.shape == (1, input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(output.loss)


def test_tiny_llama_refuses_heads_that_do_not_divide_the_width(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="divisible"):
        tiny_llama_config(tokenizer, hidden_size=130, num_heads=4)


# --- CLI ---------------------------------------------------------------------------


def write_params_file(path: Path, smoke: dict) -> Path:
    path.write_text(yaml.safe_dump({"world": {"smoke": smoke}}))
    return path


def test_cli_writes_the_four_files_and_replaces_a_previous_run(tmp_path: Path) -> None:
    params_path = write_params_file(tmp_path / "params.yaml", SMALL)
    out = tmp_path / "data" / "smoke"
    arguments = ["--params", str(params_path), "--scale", "smoke", "--out", str(out)]
    command = [sys.executable, "-m", "post_train.world", *arguments]
    subprocess.run(command, check=True, cwd=REPO_ROOT, capture_output=True)
    (out / "stale.txt").write_text("from an older run")
    main(arguments)
    assert sorted(path.name for path in out.iterdir()) == sorted(WORLD_FILES)
    assert sorted(path.name for path in out.parent.iterdir()) == ["smoke"]  # no staging left behind
    assert len((out / EVAL_FILE).read_text().splitlines()) == 2 * SMALL["n_eval_per_split"]


def test_cli_rejects_an_unknown_field_naming_file_and_field(tmp_path: Path) -> None:
    params_path = write_params_file(tmp_path / "params.yaml", {**SMALL, "n_sft_rows": 5})
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["--params", str(params_path), "--scale", "smoke", "--out", str(out)])
    assert str(params_path) in str(exit_info.value.code)
    assert "world.smoke.n_sft_rows" in str(exit_info.value.code)
    assert not out.exists()


def test_missing_scale_is_reported_with_the_scales_found(tmp_path: Path) -> None:
    params_path = write_params_file(tmp_path / "params.yaml", SMALL)
    with pytest.raises(WorldParamsError, match=r"world\.demo.*\['smoke'\]"):
        load_world_params(params_path, "demo")
