"""Every SFT objective inside the real trainer: PSFT's old policy, cached reference log-probs,
ASFT's reference distribution, and a smoke-scale SFT stage per objective."""

import math
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from losses import SFT_OBJECTIVES, sft_objective
from post_train.config import TrainConfig, load_config
from post_train.modeling import model_inputs, pack_collate, pad_collate, target_logprobs_and_reference_kl
from post_train.steps import objective_step, old_policy_snapshot
from post_train.training import make_accelerator, train
from tasks import sft
from tests.conftest import smoke_overrides
from tests.test_mlflow_ui import dataset_inputs, system_metric_keys
from tests.test_training import tiny_model, uneven_dataset


def train_with(
    objective_name: str, rollout_steps: int, steps: int = 4, fused: bool = False, **hparams: float
) -> dict[str, torch.Tensor]:
    objective = sft_objective(objective_name, **hparams)
    model = tiny_model()
    config = TrainConfig(learning_rate=5e-2, batch_size=4, micro_batch_size=2, max_steps=steps, warmup_ratio=0.0)
    train(
        model,
        uneven_dataset(),
        pad_collate(0),
        # The base is the model training starts from, as in the stage.
        objective_step(objective, fused_logprobs=fused, reference=tiny_model().requires_grad_(False)),
        config,
        make_accelerator("no"),
        before_rollout=old_policy_snapshot(fused_logprobs=False) if objective.needs_old else None,
        rollout_steps=rollout_steps,
    )
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_psft_with_one_step_per_old_policy_is_exactly_nll():
    nll, psft = train_with("nll", 1), train_with("psft", 1)
    for name in nll:
        torch.testing.assert_close(psft[name], nll[name], rtol=0, atol=1e-7)


def test_psft_old_policy_pass_skips_the_step_that_reuses_its_own_log_probs():
    snapshot = old_policy_snapshot(fused_logprobs=False)
    model = tiny_model()
    batches = [pad_collate(0)(uneven_dataset()[i : i + 2]) for i in (0, 2, 4)]
    snapshot(model, [[batches[0]], [batches[1], batches[2]]])
    assert "old_logps" not in batches[0]
    assert all("old_logps" in batch for batch in batches[1:])


def test_psft_with_a_stale_old_policy_departs_from_nll():
    nll, psft = train_with("nll", 1), train_with("psft", 4)
    assert any(not torch.allclose(psft[name], nll[name], atol=1e-5) for name in nll)


@pytest.mark.parametrize("fused", [False, True])
def test_asft_with_alpha_zero_trains_exactly_like_dft(fused):
    dft, asft = train_with("dft", 1, fused=fused), train_with("asft", 1, fused=fused, alpha=0.0)
    for name in dft:
        assert torch.equal(asft[name], dft[name]), name


def mean_kl_from_base(parameters: dict[str, torch.Tensor]) -> float:
    model = tiny_model()
    model.load_state_dict(parameters)
    batch = pad_collate(0)(uneven_dataset())
    with torch.no_grad():
        _, kl, mask = target_logprobs_and_reference_kl(model, tiny_model(), batch)
    return float(kl.sum() / mask.sum())


def test_asft_anchor_keeps_the_policy_nearer_the_base_than_dft():
    dft, asft = mean_kl_from_base(train_with("dft", 1)), mean_kl_from_base(train_with("asft", 1, alpha=1.0))
    assert 0.0 < asft < 0.5 * dft


@pytest.mark.parametrize("collate", [pad_collate(0), pack_collate], ids=["padded", "packed"])
def test_logprobs_and_reference_kl_of_a_batch_are_the_full_vocabulary_ones_fused_or_not(collate):
    model, base = tiny_model().double(), tiny_model(seed=1).double().requires_grad_(False)
    batch = collate(uneven_dataset(5))
    parameters = list(model.parameters())
    mask = batch["loss_mask"][:, 1:]
    log_q = torch.log_softmax(model(**model_inputs(batch)).logits[:, :-1], -1)
    log_p = torch.log_softmax(base(**model_inputs(batch)).logits[:, :-1], -1)
    expected = (log_p.exp() * (log_p - log_q)).sum(-1) * mask
    expected_logps = log_q.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1) * mask
    # Both outputs carry gradient in one step (asft), so the check weighs them together.
    expected_grads = torch.autograd.grad((expected - 0.3 * expected_logps).sum(), parameters)
    for fused in (False, True):
        logps, kl, same_mask = target_logprobs_and_reference_kl(model, base, batch, fused=fused)
        assert torch.equal(same_mask, mask)
        torch.testing.assert_close(kl.detach(), expected.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(logps.detach(), expected_logps.detach(), rtol=1e-10, atol=1e-12)
        assert bool((kl[mask] > 0).all()) and bool((kl[~mask] == 0).all())
        for got, want in zip(torch.autograd.grad((kl - 0.3 * logps).sum(), parameters), expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_an_objective_that_needs_the_reference_distribution_refuses_a_step_without_the_reference():
    with pytest.raises(ValueError, match="'asft' needs the reference model"):
        objective_step(sft_objective("asft"), fused_logprobs=True)


@pytest.mark.parametrize("objective", sorted(SFT_OBJECTIVES))
def test_each_objective_trains_at_smoke_scale_and_logs_its_metrics(
    objective, smoke_stages, shared_mlflow_store, tmp_path, monkeypatch
):
    config, data, base = smoke_stages
    # A smoke stage can end in under half a second on a fast machine, before a 0.5 s interval samples once.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    config = load_config(
        "lowlr", "smoke", {**smoke_overrides(tmp_path), "sft.objective": objective, "sft.rollout_steps": 2}
    )
    result = sft.run(config, base.path, data, str(tmp_path / "run"))
    run = MlflowClient(shared_mlflow_store).get_run(result.run_id)
    assert {"loss", "mean_token_weight", "kl_to_base", "entropy", "learning_rate", "grad_norm"} <= set(run.data.metrics)
    assert all(math.isfinite(value) for value in run.data.metrics.values())
    assert run.data.params["sft.objective"] == objective
    assert "system/cpu_utilization_percentage" in system_metric_keys(run)
    assert dataset_inputs(run) == {  # what it trained on, and the references of its KL and entropy diagnostics
        "sft": (data.hashes["sft"], "training", str(Path(data.sft).resolve())),
        "eval": (data.hashes["eval"], "validation", str(Path(data.eval).resolve())),
    }
    # The loss-level divergence test only for a value that is a token NLL; non-finite values stop every objective.
    assert run.data.params["sft.divergence_factor"] == ("10.0" if objective == "nll" else "None")
    if objective == "nll":
        assert run.data.metrics["mean_token_weight"] == pytest.approx(1.0)
    if objective in ("dft", "asft"):
        assert 0.0 < run.data.metrics["mean_token_weight"] < 1.0
    assert ("anchor_kl" in run.data.metrics) == (objective == "asft")


def test_reference_logprobs_are_computed_once_and_reused(smoke_stages, shared_mlflow_store, tmp_path):
    _, data, base = smoke_stages
    config = load_config("chi2", "smoke", smoke_overrides(tmp_path))
    client = MlflowClient(shared_mlflow_store)
    first = sft.run(config, base.path, data, str(tmp_path / "first"))
    second = sft.run(config, base.path, data, str(tmp_path / "second"))
    assert client.get_run(first.run_id).data.tags["reference_logps_cache_hit"] == "false"
    assert client.get_run(second.run_id).data.tags["reference_logps_cache_hit"] == "true"
    # Same data, same reference, same seed: the cached values give the same training.
    assert first.metrics["loss_final"] == pytest.approx(second.metrics["loss_final"], rel=1e-5)
