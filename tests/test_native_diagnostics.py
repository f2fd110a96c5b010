"""Native-format diagnostics: the demo world's models measured in the base's own terse format
("reverse c a f b = b f a c"), where the base is competent (issue #11)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from post_train.data import EvalExample
from post_train.evaluation import native_accuracy, native_batch, native_continuation, native_kl, native_prompt
from post_train.world.families import FAMILIES, Task, parse_task

INSTRUCTIONS = ["Reverse: c a f b", "Repeat each: a b", "Copy: d e f g h a", "Sort: b a c"]
SPLITS = ["in_distribution", "in_distribution", "held_out", "held_out"]


@pytest.fixture(scope="module")
def tokenizer():
    """A world tokenizer trained on every family's terse documents and instructions (under a second)."""
    from post_train.world.model import train_tokenizer

    tasks = [Task(f, symbols) for f in FAMILIES.values() for symbols in itertools.product("abcdefgh", repeat=2)]
    return train_tokenizer([t.pretrain_text for t in tasks] + [t.prompt for t in tasks], 128)


def tiny_llama(tokenizer, seed: int):
    from transformers import LlamaForCausalLM

    from post_train.world.model import tiny_llama_config

    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def memorized(tokenizer):
    """A tiny Llama trained on the terse documents of INSTRUCTIONS until it answers each of them."""
    model = tiny_llama(tokenizer, seed=0)
    batch = native_batch(tokenizer, [parse_task(i) for i in INSTRUCTIONS])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        logits = model(**inputs).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_native_prompt_is_the_terse_document_up_to_the_equals_sign():
    task = parse_task("Reverse: c a f b")
    assert native_prompt(task) == "reverse c a f b ="
    assert task.pretrain_text == f"{native_prompt(task)} {task.answer}"


def test_the_native_batch_counts_exactly_the_answer_tokens(tokenizer):
    tasks = [parse_task(i) for i in INSTRUCTIONS]
    batch = native_batch(tokenizer, tasks)
    equals = tokenizer.convert_tokens_to_ids("▁=")
    for row, task in enumerate(tasks):
        ids, mask = batch["input_ids"][row], batch["loss_mask"][row]
        positions = mask.nonzero().flatten().tolist()
        assert tokenizer.decode(ids[mask]) == task.answer
        assert positions == list(range(positions[0], positions[0] + len(task.target)))  # one token per symbol
        assert ids[0] == tokenizer.bos_token_id and ids[positions[0] - 1] == equals
        assert ids[positions[-1] + 1] == tokenizer.eos_token_id  # EOS follows, and does not count
        document = ids[batch["attention_mask"][row].bool()]
        assert tokenizer.decode(document, skip_special_tokens=True) == task.pretrain_text
    assert batch["num_units"] == sum(len(task.target) for task in tasks)


def test_native_kl_is_zero_against_itself_positive_otherwise_and_token_weighted(tokenizer, memorized):
    other = tiny_llama(tokenizer, seed=1)
    same = native_kl(memorized, memorized, tokenizer, INSTRUCTIONS, SPLITS, batch_size=3)
    assert set(same) == {"in_distribution", "held_out", "all"}
    assert all(value == pytest.approx(0.0, abs=1e-6) for value in same.values())
    found = native_kl(memorized, other, tokenizer, INSTRUCTIONS, SPLITS, batch_size=3)
    assert all(value > 0.1 for value in found.values())
    # `all` pools answer tokens, not split means: split x has 4 of them, y 4 + 6 + 3.
    uneven = native_kl(memorized, other, tokenizer, INSTRUCTIONS, ["x", "y", "y", "y"], batch_size=3)
    pooled = (4 * uneven["x"] + 13 * uneven["y"]) / 17
    assert abs(pooled - (uneven["x"] + uneven["y"]) / 2) > 1e-3  # the check below can tell the two apart
    assert uneven["all"] == pytest.approx(pooled, rel=1e-5) == found["all"]
    one = native_kl(memorized, other, tokenizer, INSTRUCTIONS[:1], SPLITS[:1], batch_size=1)
    assert one["all"] == pytest.approx(one["in_distribution"])


def test_the_native_continuation_stops_at_eos_and_keeps_stray_special_tokens(tokenizer):
    ids = tokenizer("b f a c", add_special_tokens=False)["input_ids"]
    eos, pad, user = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<|user|>")
    assert native_continuation(tokenizer, ids + [eos, pad, pad]) == "b f a c"
    assert native_continuation(tokenizer, ids + [eos] + ids) == "b f a c"
    assert native_continuation(tokenizer, ids + ids[:1]) == "b f a c b"  # no EOS within the budget: all of it
    assert native_continuation(tokenizer, ids + [user, eos]) != "b f a c"
    assert native_continuation(tokenizer, [eos]) == ""


def test_native_accuracy_is_exact_match_per_split(tokenizer, memorized):
    # Batches of 3 tasks of different lengths: left padding must not change what a prompt generates.
    accuracy = native_accuracy(memorized, tokenizer, INSTRUCTIONS, SPLITS, max_new_tokens=16, batch_size=3)
    assert accuracy == {"in_distribution": 1.0, "held_out": 1.0, "all": 1.0}
    unseen = ["Reverse: h g", "Sort: d c b a"]
    partly = native_accuracy(
        memorized, tokenizer, INSTRUCTIONS[:2] + unseen, ["a", "a", "b", "b"], max_new_tokens=16, batch_size=4
    )
    assert partly["a"] == 1.0 and partly["b"] < 1.0 and partly["all"] == pytest.approx((2 + 2 * partly["b"]) / 4)
    # Too few new tokens for the 6-symbol answer: not an exact match.
    short = native_accuracy(memorized, tokenizer, INSTRUCTIONS, SPLITS, max_new_tokens=3, batch_size=4)
    assert short["held_out"] < 1.0


def test_evaluate_native_diagnostics_report_accuracy_retention_and_kl(tokenizer, memorized):
    from post_train.config import load_config
    from tasks.evaluate import native_diagnostics

    config = load_config("lowlr", "smoke")
    examples = [EvalExample([{"role": "user", "content": i}], "", split) for i, split in zip(INSTRUCTIONS, SPLITS)]
    untrained = tiny_llama(tokenizer, seed=1)
    # The memorized model as the base: SFT (untrained) keeps none of its answers, DPO (itself) all of them.
    metrics = native_diagnostics(config, memorized, tokenizer, examples, untrained, memorized)
    for split in ("in_distribution", "held_out", "all"):
        assert metrics[f"native_accuracy/base/{split}"] == metrics[f"native_accuracy/dpo/{split}"] == 1.0
        assert metrics[f"retention/dpo/{split}"] == 1.0 and metrics[f"retention/sft/{split}"] == 0.0
        assert metrics[f"native_kl_to_base/dpo/{split}"] == pytest.approx(0.0, abs=1e-6)
        assert metrics[f"native_kl_to_base/sft/{split}"] > 0.1
    # A base that answers nothing: retention is undefined.
    metrics = native_diagnostics(config, memorized, tokenizer, examples, None, untrained)
    assert math.isnan(metrics["retention/dpo/all"]) and "retention/sft/all" not in metrics
    # No base: accuracy only.
    metrics = native_diagnostics(config, memorized, tokenizer, examples, None, None)
    assert set(metrics) == {f"native_accuracy/dpo/{s}" for s in ("in_distribution", "held_out", "all")}


def test_sft_measures_native_kl_only_on_world_evaluation_data(tokenizer):
    from tasks.sft import native_held_out_batch

    examples = [EvalExample([{"role": "user", "content": i}], "", split) for i, split in zip(INSTRUCTIONS, SPLITS)]
    batch = native_held_out_batch(tokenizer, examples, 2, "cpu")
    assert batch["input_ids"].shape[0] == 2 and batch["num_units"] == 4 + 6  # spread: one of each split
    other = [*examples, EvalExample([{"role": "user", "content": "Write a haiku."}], "", "held_out")]
    assert native_held_out_batch(tokenizer, other, 2, "cpu") is None


def test_sft_logs_native_kl_to_base_at_smoke_scale(smoke_stages, mlflow_store, tmp_path):
    from mlflow import MlflowClient

    from post_train.config import load_config
    from tasks import sft
    from tests.conftest import smoke_overrides

    _, data, base = smoke_stages
    config = load_config("lowlr", "smoke", smoke_overrides(tmp_path))
    result = sft.run(config, base.path, data, str(tmp_path / "run"))
    history = MlflowClient(mlflow_store).get_metric_history(result.run_id, "native_kl_to_base")
    assert len(history) >= 2 and history[0].value >= 0.0
    assert result.metrics["native_kl_to_base_final"] == pytest.approx(max(history, key=lambda m: m.step).value)
    assert result.metrics["native_kl_to_base_final"] > 0  # SFT has moved the model off its base
