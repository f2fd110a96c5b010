"""KL-budgeted SFT (`sft.kl_budget`, post_train.kl_budget): the controller on its own, then on the smoke world, where
the held-out KL to the base ends at the budget for two budgets, and a budget above what the fixed-lr run reaches
leaves the run exactly as it was."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow import MlflowClient

from post_train.config import ConfigError, load_config
from post_train.kl_budget import KLBudget
from post_train.modeling import pad_collate
from post_train.training import make_accelerator, train
from tasks import sft
from tests.conftest import smoke_overrides
from tests.test_training import nll_step, tiny_model, uneven_dataset

TOLERANCE = 0.10
"""How far (relative) the final KL may end from the budget: the controller closes half the headroom per interval."""


def test_the_controller_leaves_the_lr_alone_far_below_the_budget_and_cuts_it_on_approach():
    control = KLBudget(budget=1.0)
    for measured in (0.0, 0.05, 0.1):  # headroom ≫ drift: the multiplier stays at its cap
        control.observe({"kl_to_base": measured})
        assert control.multiplier == 1.0
    control.observe({"kl_to_base": 0.6})  # drift 0.5, headroom 0.4: allow 0.2 of drift, so 0.4x
    assert control.multiplier == pytest.approx(0.4)
    control.observe({"kl_to_base": 1.1})  # over the budget: one gain's worth down
    assert control.multiplier == pytest.approx(0.4 * math.exp(-1.0))
    control.observe({"kl_to_base": 1.1})
    control.observe({"kl_to_base": 0.9})  # below again and not growing: back up by the gain, never past 1
    assert control.multiplier == pytest.approx(0.4 * math.exp(-1.0))
    for _ in range(5):
        control.observe({"kl_to_base": 0.9})
    assert control.multiplier == 1.0


def test_the_controller_refuses_a_budget_that_is_not_positive_and_a_metric_not_measured():
    with pytest.raises(ValueError, match="kl_budget must be positive"):
        KLBudget(budget=0.0)
    with pytest.raises(KeyError, match="'native_kl_to_base', which the diagnostics did not measure"):
        KLBudget(budget=0.1, metric="native_kl_to_base").observe({"kl_to_base": 0.0})


def test_the_loop_applies_the_multiplier_to_the_schedule_and_keeps_it_across_a_resume(tmp_path):
    config = load_config("baseline", "smoke").sft.model_copy(
        update={"learning_rate": 1e-2, "batch_size": 4, "micro_batch_size": 4, "max_steps": 6, "log_every": 1}
    )

    class Halving(KLBudget):
        def observe(self, diagnostics):
            self.multiplier /= 2

    def run(checkpoints=None, step_fn=nll_step):
        control = Halving(budget=1.0)
        history = train(
            tiny_model(),
            uneven_dataset(),
            pad_collate(0),
            step_fn,
            config,
            make_accelerator("no"),
            diagnostics=lambda model: {"kl_to_base": 0.0},
            diagnostics_every=2,
            lr_control=control,
            checkpoint_dir=checkpoints,
            checkpoint_every=2 if checkpoints else 0,
        )
        return history, control

    history, control = run()
    multipliers = {int(entry["step"]): entry["lr_multiplier"] for entry in history}
    assert multipliers == {1: 0.5, 2: 0.25, 3: 0.25, 4: 0.125, 5: 0.125, 6: 0.0625}  # diagnostics at 1, 2, 4, 6
    fixed = train(tiny_model(), uneven_dataset(), pad_collate(0), nll_step, config, make_accelerator("no"))
    scheduled = {int(entry["step"]): entry["learning_rate"] for entry in fixed}
    for entry in history[1:]:  # a step's lr: the schedule's times the multiplier set after the step before it
        step = int(entry["step"])
        assert entry["learning_rate"] == pytest.approx(scheduled[step] * multipliers[step - 1])
    calls = []

    def crash_in_step_4(model, batch):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("preempted")
        return nll_step(model, batch)

    with pytest.raises(RuntimeError, match="preempted"):
        run(tmp_path, crash_in_step_4)
    resumed, control_after = run(tmp_path)
    assert [entry["lr_multiplier"] for entry in resumed] == [entry["lr_multiplier"] for entry in history]
    assert [entry["learning_rate"] for entry in resumed] == pytest.approx([entry["learning_rate"] for entry in history])


def smoke_sft(smoke_stages, tmp_path, name: str, **overrides):
    config, data, base = smoke_stages
    settings = {**smoke_overrides(tmp_path), "sft.max_steps": 40, "sft.diagnostics_every": 2, **overrides}
    return sft.run(load_config("baseline", "smoke", settings), base.path, data, str(tmp_path / name))


def weights(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{result.path}/model.safetensors")


def test_on_the_smoke_world_the_kl_ends_at_the_budget_and_a_budget_above_the_drift_changes_nothing(
    smoke_stages, shared_mlflow_store, tmp_path
):
    client = MlflowClient(shared_mlflow_store)
    fixed = smoke_sft(smoke_stages, tmp_path, "fixed")
    reached = fixed.metrics["kl_to_base_final"]
    assert reached > 0.01  # enough drift to budget
    for share in (0.25, 0.5):
        budget = share * reached
        held = smoke_sft(smoke_stages, tmp_path, f"budget-{share}", **{"sft.kl_budget": budget})
        assert held.metrics["kl_to_base_final"] == pytest.approx(budget, rel=TOLERANCE)
        assert held.metrics["kl_budget"] == budget and held.metrics["lr_multiplier_final"] < 0.5
        run = client.get_run(held.run_id)
        multipliers = [m.value for m in client.get_metric_history(held.run_id, "lr_multiplier")]
        assert max(multipliers) == 1.0 and min(multipliers) < 0.5  # full lr at first, then held back
        artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
        assert {"kl_budget.png", "sft_curves.png"} <= artifacts
    generous = smoke_sft(smoke_stages, tmp_path, "generous", **{"sft.kl_budget": 2 * reached})
    assert generous.metrics["lr_multiplier_final"] == 1.0
    assert (
        generous.metrics["kl_to_base_final"] == reached
        and generous.metrics["loss_final"] == fixed.metrics["loss_final"]
    )
    expected = weights(fixed)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in weights(generous).items())


def test_a_budget_on_the_native_format_holds_for_another_objective(smoke_stages, shared_mlflow_store, tmp_path):
    fixed = smoke_sft(smoke_stages, tmp_path, "fixed", **{"sft.objective": "dft"})
    budget = 0.5 * fixed.metrics["native_kl_to_base_final"]
    held = smoke_sft(
        smoke_stages,
        tmp_path,
        "held",
        **{"sft.objective": "dft", "sft.kl_budget": budget, "sft.kl_budget_metric": "native_kl_to_base"},
    )
    assert held.metrics["native_kl_to_base_final"] == pytest.approx(budget, rel=TOLERANCE)


def test_a_native_budget_without_the_demo_world_is_refused_before_any_work(tmp_path):
    files = {f"data.{name}": str(tmp_path / f"{name}.jsonl") for name in ("sft", "preferences", "eval")}
    with pytest.raises(ConfigError, match="native_kl_to_base is measured on the demo world's terse format only"):
        load_config("klbudget", "smoke", {"data.world": None, **files})
