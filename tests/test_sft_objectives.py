"""Every SFT objective inside the real trainer: PSFT's old policy, cached reference log-probs,
and a smoke-scale SFT stage per objective."""

import math

import pytest
import torch
from mlflow import MlflowClient

from losses import SFT_OBJECTIVES, sft_objective
from post_train.config import TrainConfig, load_config
from post_train.modeling import pad_collate
from post_train.training import make_accelerator, train
from tasks import sft
from tests.conftest import smoke_overrides
from tests.test_training import tiny_model, uneven_dataset


def train_with(objective_name: str, rollout_steps: int, steps: int = 4) -> dict[str, torch.Tensor]:
    objective = sft_objective(objective_name)
    model = tiny_model()
    config = TrainConfig(learning_rate=5e-2, batch_size=4, micro_batch_size=2, max_steps=steps, warmup_ratio=0.0)
    train(
        model,
        uneven_dataset(),
        pad_collate(0),
        sft.objective_step(objective, fused_logprobs=False),
        config,
        make_accelerator("no"),
        before_rollout=sft.old_policy_snapshot(fused_logprobs=False) if objective.needs_old else None,
        rollout_steps=rollout_steps,
    )
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_psft_with_one_step_per_old_policy_is_exactly_nll():
    nll, psft = train_with("nll", 1), train_with("psft", 1)
    for name in nll:
        torch.testing.assert_close(psft[name], nll[name], rtol=0, atol=1e-7)


def test_psft_old_policy_pass_skips_the_step_that_reuses_its_own_log_probs():
    snapshot = sft.old_policy_snapshot(fused_logprobs=False)
    model = tiny_model()
    batches = [pad_collate(0)(uneven_dataset()[i : i + 2]) for i in (0, 2, 4)]
    snapshot(model, [[batches[0]], [batches[1], batches[2]]])
    assert "old_logps" not in batches[0]
    assert all("old_logps" in batch for batch in batches[1:])


def test_psft_with_a_stale_old_policy_departs_from_nll():
    nll, psft = train_with("nll", 1), train_with("psft", 4)
    assert any(not torch.allclose(psft[name], nll[name], atol=1e-5) for name in nll)


@pytest.mark.parametrize("objective", sorted(SFT_OBJECTIVES))
def test_each_objective_trains_at_smoke_scale_and_logs_its_metrics(
    objective, smoke_stages, shared_mlflow_store, tmp_path
):
    config, data, base = smoke_stages
    config = load_config(
        "lowlr", "smoke", {**smoke_overrides(tmp_path), "sft.objective": objective, "sft.rollout_steps": 2}
    )
    result = sft.run(config, base.path, data, str(tmp_path / "run"))
    run = MlflowClient(shared_mlflow_store).get_run(result.run_id)
    assert {"loss", "mean_token_weight", "kl_to_base", "entropy", "learning_rate", "grad_norm"} <= set(run.data.metrics)
    assert all(math.isfinite(value) for value in run.data.metrics.values())
    assert run.data.params["sft.objective"] == objective
    # The loss-level divergence test only for a value that is a token NLL; non-finite values stop every objective.
    assert run.data.params["sft.divergence_factor"] == ("10.0" if objective == "nll" else "None")
    if objective == "nll":
        assert run.data.metrics["mean_token_weight"] == pytest.approx(1.0)
    if objective == "dft":
        assert 0.0 < run.data.metrics["mean_token_weight"] < 1.0


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
