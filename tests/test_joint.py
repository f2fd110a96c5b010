"""Joint SFT+DPO (`pipeline: joint`, tasks/joint.py): a step's loss is the weighted sum of each part's global mean at
any accumulation, a zero DPO weight is exactly SFT, and the stage trains at smoke scale with every kind of SFT
objective (reference log-probs, old policy, reference distribution)."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow import MlflowClient

from losses import preference_loss, sft_objective
from post_train.config import ConfigError, load_config
from post_train.modeling import pack_collate
from post_train.steps import objective_step, pair_collate, preference_step
from post_train.training import make_accelerator, train
from tasks import joint, sft
from tests.conftest import smoke_overrides
from tests.test_training import tiny_model, uneven_dataset

NLL_STEP = objective_step(sft_objective("nll"), fused_logprobs=True)
DPO_STEP = preference_step(preference_loss("sigmoid", beta=0.5), fused_logprobs=True)


def demonstrations_and_pairs() -> tuple[list[dict], list[dict]]:
    rows = uneven_dataset(16)
    pairs = [  # reference log-probs as the DPO stage's cache gives them, made up
        {"chosen": rows[i], "rejected": rows[(i + 5) % 16], "ref_chosen": -30.0 - i, "ref_rejected": -40.0 + i}
        for i in range(0, 16, 2)
    ]
    return rows, pairs


def train_jointly(model, config, sft_weight: float, dpo_weight: float) -> list[dict]:
    """`model` trained on `demonstrations_and_pairs()` by the joint stage's rows, collate and step."""
    demonstrations, pairs = demonstrations_and_pairs()
    return train(
        model,
        joint.joint_rows(demonstrations, pairs),
        joint.joint_collate(True, 0),
        joint.joint_step(NLL_STEP, DPO_STEP),
        config,
        make_accelerator("no"),
        part_weights={"sft": sft_weight, "dpo": dpo_weight},
    )


def one_joint_step(micro_batch_size: int, sft_weight: float, dpo_weight: float):
    config = load_config("joint", "smoke").joint.model_copy(
        update={
            "batch_size": 16,  # the whole joint dataset: the step's means do not depend on the order
            "micro_batch_size": micro_batch_size,
            "max_steps": 1,
            "warmup_ratio": 0.0,
            "learning_rate": 1e-2,
            "max_grad_norm": 1e9,
            "log_every": 1,
        }
    )
    model = tiny_model()
    return model, train_jointly(model, config, sft_weight, dpo_weight)[0]


def direct_loss_and_gradient_norm(sft_weight: float, dpo_weight: float) -> tuple[float, float, float, float]:
    """The whole joint dataset scored without the loop: both part means, and their weighted sum's gradient norm."""
    demonstrations, pairs = demonstrations_and_pairs()
    model = tiny_model()
    batch = joint.joint_collate(True, 0)(joint.joint_rows(demonstrations, pairs))
    sft_out, dpo_out = NLL_STEP(model, batch["sft"]), DPO_STEP(model, batch["dpo"])
    sft_mean = sft_out.loss_sum / batch["num_units"]["sft"]
    dpo_mean = dpo_out.loss_sum / batch["num_units"]["dpo"]
    total = sft_weight * sft_mean + dpo_weight * dpo_mean
    total.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    return float(total.detach()), float(sft_mean.detach()), float(dpo_mean.detach()), float(norm)


@pytest.mark.parametrize("micro_batch_size", [16, 4])
def test_a_joint_step_is_the_weighted_sum_of_each_parts_mean_over_the_whole_step(micro_batch_size):
    _, logged = one_joint_step(micro_batch_size, sft_weight=0.3, dpo_weight=2.0)
    total, sft_mean, dpo_mean, norm = direct_loss_and_gradient_norm(0.3, 2.0)
    assert logged["sft/loss"] == pytest.approx(sft_mean, rel=1e-5)
    assert logged["dpo/loss"] == pytest.approx(dpo_mean, rel=1e-5)
    assert logged["loss"] == pytest.approx(total, rel=1e-5)
    assert logged["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert 0.0 <= logged["dpo/rewards/accuracies"] <= 1.0 and logged["sft/mean_token_weight"] == pytest.approx(1.0)


def test_with_a_zero_dpo_weight_joint_training_is_sft_training_bit_for_bit():
    demonstrations, _ = demonstrations_and_pairs()  # 16 demonstrations, 8 pairs: the rows follow the former
    config = load_config("joint", "smoke").joint.model_copy(update={"batch_size": 8, "micro_batch_size": 4})
    jointly, alone = tiny_model(), tiny_model()
    train_jointly(jointly, config, sft_weight=1.0, dpo_weight=0.0)
    train(alone, demonstrations, pack_collate, NLL_STEP, config, make_accelerator("no"))
    for (name, got), want in zip(jointly.named_parameters(), alone.parameters()):
        assert torch.equal(got, want), name


def test_joint_collate_counts_tokens_and_pairs_as_separate_parts():
    demonstrations, pairs = demonstrations_and_pairs()
    rows = joint.joint_rows(demonstrations, pairs)
    assert len(rows) == 16 and rows[9]["dpo"] is pairs[1]  # the smaller set cycles
    batch = joint.joint_collate(True, 0)(rows[:4])
    assert batch["num_units"] == {
        "sft": sum(sum(row["loss_mask"][1:]) for row in demonstrations[:4]),
        "dpo": 4,
    }
    assert batch["num_tokens"] == batch["sft"]["num_tokens"] + batch["dpo"]["num_tokens"]
    assert torch.equal(batch["dpo"]["input_ids"], pair_collate(True, 0)(pairs[:4])["input_ids"])


@pytest.mark.parametrize("objective", ["nll", "fdiv:pearson_chi2", "psft", "asft"])
def test_the_joint_stage_trains_after_a_warm_up_at_smoke_scale(objective, smoke_stages, mlflow_store, tmp_path):
    # A store of its own: MLflow keeps one dataset per (name, digest) in a store, so logging the smoke preferences in
    # the shared one would give tests/test_data.py's DPO run this file's dataset source.
    _, data, base = smoke_stages
    config = load_config(
        "joint", "smoke", {**smoke_overrides(tmp_path), "sft.objective": objective, "sft.rollout_steps": 2}
    )
    warm = sft.run(
        config.model_copy(update={"sft": config.sft.model_copy(update={"max_steps": 4})}),
        base.path,
        data,
        str(tmp_path / "warm"),
    )
    result = joint.run(config, warm.path, data, str(tmp_path / "joint"))
    client = MlflowClient(mlflow_store)
    run = client.get_run(result.run_id)
    assert run.data.tags["stage"] == "joint" and run.data.params["sft_objective"] == objective
    assert {"loss", "sft/loss", "dpo/loss", "dpo/rewards/accuracies", "dpo/rewards/margins"} <= set(run.data.metrics)
    assert all(math.isfinite(value) for value in run.data.metrics.values())
    steps = max(m.step for m in client.get_metric_history(result.run_id, "loss"))
    assert steps == 64 // 8  # one epoch of max(64 demonstrations, 32 pairs) rows, 8 per step
    assert "joint_curves.png" in {artifact.path for artifact in client.list_artifacts(result.run_id)}
    assert result.metrics["data/sft/used"] == 64 and result.metrics["data/preferences/used"] == 32
    assert run.data.tags["reference_logps_cache_hit/dpo"] in ("true", "false")
    assert ("reference_logps_cache_hit/sft" in run.data.tags) == (objective == "fdiv:pearson_chi2")


def test_both_weights_zero_is_refused():
    with pytest.raises(ConfigError, match="joint.sft_weight and joint.dpo_weight are both 0"):
        load_config("joint", "smoke", {"joint.sft_weight": 0, "joint.dpo_weight": 0})


def test_the_joint_pipeline_runs_the_stages_it_needs():
    assert load_config("baseline", "smoke").stages_run() == ("sft", "dpo")
    assert load_config("joint", "smoke").stages_run() == ("sft", "joint")
    assert load_config("joint", "smoke", {"joint.start": "base"}).stages_run() == ("joint",)
