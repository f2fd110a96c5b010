"""The divergence guard and stages that got worse: a non-finite loss or gradient norm, or a loss far above its running
level, stops training with the step and the value named, before the step is applied, keeping the last good
checkpoint; a refusal Prefect does not retry. A model whose training got worse is flagged and not promoted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from prefect.states import Failed

from flows.stages import should_retry
from post_train.config import TrainConfig, load_config
from post_train.errors import TrainingDiverged
from post_train.modeling import pack_collate
from post_train.results import TrainedModel
from post_train.stages import SFT, RunContext, run_stage
from post_train.training import latest_checkpoint, make_accelerator, train
from tasks import register
from tests.conftest import smoke_overrides
from tests.test_training import nll_step, tiny_model, uneven_dataset

SETTINGS = dict(batch_size=8, micro_batch_size=4, max_steps=8, warmup_ratio=0.0, log_every=1)


def train_tiny(config: TrainConfig, step_fn=nll_step, checkpoint_dir: Path | None = None):
    model = tiny_model()
    history = train(
        model,
        uneven_dataset(32),
        pack_collate,
        step_fn,
        config,
        make_accelerator("no"),
        description="sft (nll)",
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=1 if checkpoint_dir else 0,
    )
    return model, history


def test_a_non_finite_loss_stops_training_at_its_step_and_keeps_the_last_good_save(tmp_path: Path):
    with pytest.raises(TrainingDiverged) as stopped:
        train_tiny(TrainConfig(learning_rate=1e30, **SETTINGS), checkpoint_dir=tmp_path)
    message = str(stopped.value)
    assert message.startswith("sft (nll) diverged: ") and "The step was not applied" in message
    step = int(message.split(" at step ")[1].split()[0].rstrip(".("))
    assert step >= 2  # the first step's loss is the initial model's: finite
    assert "nan" in message or "inf" in message or "times its running level" in message
    saved = latest_checkpoint(tmp_path)
    assert saved is not None and saved.name == f"step-{step - 1}"  # the step that diverged was never saved
    weights = [p for p in saved.glob("*.safetensors")]
    from safetensors.torch import load_file

    assert all(torch.isfinite(tensor).all() for file in weights for tensor in load_file(file).values())


def test_a_loss_far_above_its_running_level_stops_training_unless_the_check_is_off():
    calls = []

    def spike_at_step_5(model, batch):
        calls.append(1)
        out = nll_step(model, batch)
        micro_batches = SETTINGS["batch_size"] // SETTINGS["micro_batch_size"]
        if len(calls) > 4 * micro_batches and len(calls) <= 5 * micro_batches:
            out.loss_sum = out.loss_sum * 50  # a real loss, 50 times its size: what a bad batch or a blow-up gives
        return out

    with pytest.raises(TrainingDiverged, match=r"the loss [0-9.]+ at step 5 is more than 10 times its running level"):
        train_tiny(TrainConfig(learning_rate=1e-3, **SETTINGS), spike_at_step_5)
    calls.clear()
    _, history = train_tiny(TrainConfig(learning_rate=1e-3, divergence_factor=None, **SETTINGS), spike_at_step_5)
    assert [entry["step"] for entry in history] == list(range(1, 9))
    assert history[4]["loss"] > 10 * history[3]["loss"]
    calls.clear()
    _, steady = train_tiny(TrainConfig(learning_rate=1e-3, **SETTINGS))  # ordinary noise never trips it
    assert all(math.isfinite(entry["loss"]) for entry in steady) and len(steady) == 8


def test_divergence_is_a_refusal_prefect_does_not_retry():
    assert (
        should_retry(None, None, Failed(data=TrainingDiverged("sft (nll) diverged: the loss is nan at step 4")))
        is False
    )
    assert should_retry(None, None, Failed(data=RuntimeError("preempted"))) is True


def test_a_diverging_stage_fails_its_run_keeps_its_checkpoint_and_caches_nothing(smoke_stages, mlflow_store, tmp_path):
    """The SFT command in a child process: the error keeps its type across the process boundary."""
    _, data, base = smoke_stages
    overrides = {
        **smoke_overrides(tmp_path),
        "sft.learning_rate": 1e30,
        "compute.checkpoint_every": 1,
    }
    config = load_config("lowlr", "smoke", overrides)
    client = MlflowClient(mlflow_store)
    from post_train.tracking import experiment_id

    parent = client.create_run(experiment_id(), run_name="flow").info.run_id
    with pytest.raises(TrainingDiverged, match=r"sft \(nll\) diverged: .* at step \d+") as stopped:
        run_stage(SFT, config, RunContext(str(tmp_path / "run"), parent), base_model_path=base.path, data=data)
    runs = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert [(run.data.tags["stage"], run.info.status) for run in runs] == [("sft", "FAILED")]
    assert runs[0].data.tags["error"].startswith("TrainingDiverged: sft (nll) diverged")
    step = int(str(stopped.value).split(" at step ")[1].split()[0].rstrip(".("))
    checkpoints = list((tmp_path / "cache" / "checkpoints" / "sft").iterdir())
    assert len(checkpoints) == 1 and latest_checkpoint(checkpoints[0]).name == f"step-{step - 1}"
    assert not [path for path in (tmp_path / "cache" / "stages" / "sft").iterdir() if path.suffix != ".lock"]


def test_a_stage_that_got_worse_says_how():
    assert TrainedModel("m", {"loss_first": 0.6931, "loss_final": 0.2}).regressions == []
    assert TrainedModel("m", {}).regressions == []  # a model taken as given
    worse = TrainedModel("m", {"loss_first": 0.6931, "loss_final": 0.944, "rewards/accuracies_final": 0.38})
    assert worse.regressions == [
        "final loss 0.9440 is above the first 0.6931",
        "final reward accuracy 0.38 is below chance (0.50)",
    ]


def test_a_model_that_got_worse_is_flagged_and_not_promoted_unless_allowed(smoke_stages, mlflow_store, tmp_path):
    from tests.test_registry import rescaled

    config, data, base = smoke_stages
    regressions = ["dpo: final loss 0.9440 is above the first 0.6931"]
    refused = register.run(config, base.path, 0.4, data, regressions=regressions)
    client = MlflowClient(mlflow_store)
    version = client.get_model_version("post-train", refused.version)
    assert not refused.is_champion and "a training stage ended worse than it started" in refused.reason
    assert version.tags["regressed"] == "true" and version.tags["regressions"] == regressions[0]
    assert version.tags["promoted"] == "false" and set(version.aliases) == {"challenger"}
    assert f"**Flagged**: {regressions[0]}." in version.description
    run = client.get_run(version.run_id)
    assert run.data.tags["regressed"] == "true"

    allowed = load_config(
        "lowlr", "smoke", {**smoke_overrides(Path(config.cache_dir).parent), "registry.promote_regressed": True}
    )
    # The refused weights again: registered already, their decision stands (`promote_regressed` decides a new version).
    again = register.run(allowed, base.path, 0.4, data, regressions=regressions)
    assert again.already_registered and again.version == refused.version and not again.is_champion
    assert "a training stage ended worse than it started" in again.reason
    promoted = register.run(allowed, rescaled(base.path, tmp_path / "other", 2.0), 0.4, data, regressions=regressions)
    assert promoted.is_champion and promoted.reason == "first version: no champion yet"
    assert client.get_model_version("post-train", promoted.version).tags["regressed"] == "true"
