import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from losses import sft_objective
from post_train.config import TrainConfig
from post_train.modeling import pack_collate, pad_collate, sequence_sums, target_logprobs
from post_train.training import StepOutput, make_accelerator, train

NLL = sft_objective("nll")


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def uneven_dataset(count: int = 16) -> list[dict]:
    """Sequences whose counted-token totals differ a lot, so a mean of micro-batch means is wrong."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for index in range(count):
        length = 4 + (index * 7) % 20
        prompt = 1 + index % 3
        ids = torch.randint(1, 40, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "loss_mask": [False] * prompt + [True] * (length - prompt)})
    return rows


def nll_step(model, batch) -> StepOutput:
    logps, mask = target_logprobs(model, batch)
    return StepOutput(NLL(logps, mask).loss * mask.sum())


def one_step(micro_batch_size: int, collate=None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    model = tiny_model()
    config = TrainConfig(
        learning_rate=1e-2,
        batch_size=8,
        micro_batch_size=micro_batch_size,
        max_steps=1,
        warmup_ratio=0.0,
        max_grad_norm=1e9,
        log_every=1,
    )
    history = train(model, uneven_dataset(), collate or pad_collate(0), nll_step, config, make_accelerator("no"))
    return {name: p.detach().clone() for name, p in model.named_parameters()}, history


def test_packed_sequences_are_scored_as_if_alone():
    """No token attends across a sequence boundary, and no boundary token is a target: the per-sequence
    log-probs and their gradients of one packed row equal those of each sequence run by itself."""
    model = tiny_model().double()
    rows = uneven_dataset(6)
    rows[2] = {**rows[2], "loss_mask": [True] * len(rows[2]["input_ids"])}  # pretraining-style: every token counts
    packed = pack_collate(rows)
    assert packed["input_ids"].shape == (1, sum(len(row["input_ids"]) for row in rows))
    logps, mask = target_logprobs(model, packed)
    sums = sequence_sums(logps * mask, packed)
    alone = []
    for row in rows:
        row_logps, row_mask = target_logprobs(model, pad_collate(0)([row]))
        alone.append((row_logps * row_mask).sum())
    alone = torch.stack(alone)
    torch.testing.assert_close(sums, alone, rtol=1e-10, atol=1e-10)
    assert packed["num_units"] == sum(sum(row["loss_mask"][1:]) for row in rows)
    gradient = torch.autograd.grad(sums.sum(), list(model.parameters()))
    expected = torch.autograd.grad(alone.sum(), list(model.parameters()))
    for got, want in zip(gradient, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("collate", [pad_collate(0), pack_collate], ids=["padded", "packed"])
def test_fused_log_probs_equal_the_output_layers_with_their_gradients(collate, monkeypatch):
    import post_train.modeling as modeling

    calls = []
    fused = modeling.fused_target_logprobs
    monkeypatch.setattr(modeling, "fused_target_logprobs", lambda *a, **k: calls.append(1) or fused(*a, **k))
    model = tiny_model().double()
    batch = collate(uneven_dataset(5))
    plain, mask = target_logprobs(model, batch, fused=False)
    assert not calls
    logps, same_mask = target_logprobs(model, batch)
    assert calls and torch.equal(mask, same_mask)
    torch.testing.assert_close(logps, plain, rtol=1e-12, atol=1e-12)
    assert bool((logps[mask] < 0).all()) and bool((logps[~mask] == 0).all())
    parameters = list(model.parameters())
    for got, want in zip(torch.autograd.grad(logps.sum(), parameters), torch.autograd.grad(plain.sum(), parameters)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_packed_and_padded_training_take_the_same_step():
    padded, padded_history = one_step(micro_batch_size=4)
    packed, packed_history = one_step(micro_batch_size=4, collate=pack_collate)
    assert packed_history[0]["loss"] == pytest.approx(padded_history[0]["loss"], rel=1e-5)
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_normalises_by_the_global_token_count():
    whole, whole_history = one_step(micro_batch_size=8)
    accumulated, accumulated_history = one_step(micro_batch_size=2)
    assert abs(whole_history[0]["loss"] - accumulated_history[0]["loss"]) < 1e-5
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-6)


def test_training_lowers_the_loss_and_logs_what_users_watch():
    model = tiny_model()
    config = TrainConfig(learning_rate=3e-2, batch_size=8, micro_batch_size=4, epochs=6, log_every=2, warmup_ratio=0.1)
    logged = []
    history = train(
        model,
        uneven_dataset(),
        pad_collate(0),
        nll_step,
        config,
        make_accelerator("no"),
        on_log=lambda metrics, step: logged.append((step, metrics)),
    )
    assert history[-1]["loss"] < history[0]["loss"] - 0.3
    assert [step for step, _ in logged] == [entry["step"] for entry in history]
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_second"} <= set(logged[-1][1])
    learning_rates = [entry["learning_rate"] for entry in history]
    assert learning_rates[0] < max(learning_rates) and learning_rates[-1] < max(learning_rates)  # warm-up, then decay


def test_diagnostics_run_on_their_own_schedule():
    calls = []
    config = TrainConfig(learning_rate=1e-3, batch_size=4, micro_batch_size=4, max_steps=6, log_every=4)

    def diagnostics(model):
        calls.append(True)
        return {"probe": 1.0}

    history = train(
        tiny_model(),
        uneven_dataset(),
        pad_collate(0),
        nll_step,
        config,
        make_accelerator("no"),
        diagnostics=diagnostics,
        diagnostics_every=3,
    )
    assert [entry["step"] for entry in history if "probe" in entry] == [1, 3, 6]
    assert [entry["step"] for entry in history] == [1, 3, 4, 6]
