"""Faults while a stage runs: a training stage SIGKILLed after a step or in the middle of writing a checkpoint resumes
from its last complete save and ends bit-identical to an uninterrupted run (which, run from another cache directory,
also shows that two fresh runs agree bit for bit); the killed attempts' MLflow runs end KILLED, never RUNNING; resuming
unpickles nothing that can run code. Kill points are step counts (`tests/fault_injection.py`), not timings."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from post_train.config import load_config
from post_train.executors import EXECUTORS
from post_train.stage_io import StageFailed
from post_train.stages import DPO, SFT, RunContext, run_stage
from post_train.tracking import experiment_id
from post_train.training import TRAINER_STATE, latest_checkpoint
from tests.conftest import smoke_overrides
from tests.fault_injection import FAULT_ENV


def weights(model_dir: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def assert_bit_identical(model_dir: str, reference_dir: str) -> None:
    got, expected = weights(model_dir), weights(reference_dir)
    assert got.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert different == [], f"weights differ from the uninterrupted run: {different[:5]}"


def stage_runs(client: MlflowClient, parent: str, stage: str) -> list:
    experiment = client.get_run(parent).info.experiment_id
    runs = client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{parent}' and tags.stage = '{stage}'", order_by=["start_time ASC"]
    )
    return list(runs)


def attempts(stage, config, context, faults, checkpoints: Path, monkeypatch, **arguments) -> list[str]:
    """One killed attempt per fault, then one that runs to the end; the latest complete save after each kill."""
    monkeypatch.setitem(EXECUTORS, "local", "tests.fault_injection:FaultyExecutor")
    saves = []
    for fault in faults:
        monkeypatch.setenv(FAULT_ENV, fault)
        with pytest.raises(StageFailed, match="exited with status -9"):
            run_stage(stage, config, context, **arguments)
        (key_dir,) = checkpoints.iterdir()
        saves.append(latest_checkpoint(key_dir).name)
    monkeypatch.delenv(FAULT_ENV)
    return saves


def test_sft_killed_after_steps_and_in_a_save_resumes_bit_identical(smoke_stages, mlflow_store, tmp_path, monkeypatch):
    _, data, base = smoke_stages
    reference_config = load_config("lowlr", "smoke", smoke_overrides(tmp_path / "reference"))
    reference = run_stage(
        SFT, reference_config, RunContext(str(tmp_path / "reference-run")), base_model_path=base.path, data=data
    )
    client = MlflowClient(mlflow_store)
    steps = max(m.step for m in client.get_metric_history(reference.run_id, "loss"))
    assert steps == 8  # the kill points below are chosen for 8 steps, saved every 2
    assert client.get_run(reference.run_id).data.tags["regressed"] == "false"  # its loss fell

    config = load_config("lowlr", "smoke", {**smoke_overrides(tmp_path / "faulty"), "compute.checkpoint_every": 2})
    parent = client.create_run(experiment_id(), run_name="flow").info.run_id
    context = RunContext(str(tmp_path / "run"), parent)
    checkpoints = tmp_path / "faulty" / "cache" / "checkpoints" / "sft"
    saves = attempts(
        SFT,
        config,
        context,
        ["after-step:3", "in-save:4", "after-step:7"],
        checkpoints,
        monkeypatch,
        base_model_path=base.path,
        data=data,
    )
    assert saves == ["step-2", "step-2", "step-6"]  # the save killed half-way is not taken for complete
    resumed = run_stage(SFT, config, context, base_model_path=base.path, data=data)

    assert_bit_identical(resumed.path, reference.path)
    assert resumed.metrics == reference.metrics
    assert not checkpoints.exists() or not any(checkpoints.iterdir())  # removed once the stage succeeded
    runs = stage_runs(client, parent, "sft")
    assert [run.info.status for run in runs] == ["KILLED", "KILLED", "KILLED", "FINISHED"]
    logged = sorted((m.step, m.value) for m in client.get_metric_history(runs[-1].info.run_id, "loss"))
    expected = sorted((m.step, m.value) for m in client.get_metric_history(reference.run_id, "loss"))
    assert logged == expected  # the resumed run holds the whole curve


def test_dpo_killed_after_a_step_resumes_bit_identical(smoke_stages, mlflow_store, tmp_path, monkeypatch):
    _, data, base = smoke_stages
    reference_config = load_config("lowlr", "smoke", smoke_overrides(tmp_path / "reference"))
    reference = run_stage(
        DPO, reference_config, RunContext(str(tmp_path / "reference-run")), sft_model_path=base.path, data=data
    )
    config = load_config("lowlr", "smoke", {**smoke_overrides(tmp_path / "faulty"), "compute.checkpoint_every": 2})
    parent = MlflowClient(mlflow_store).create_run(experiment_id(), run_name="flow").info.run_id
    context = RunContext(str(tmp_path / "run"), parent)
    checkpoints = tmp_path / "faulty" / "cache" / "checkpoints" / "dpo"
    saves = attempts(
        DPO, config, context, ["after-step:3"], checkpoints, monkeypatch, sft_model_path=base.path, data=data
    )
    assert saves == ["step-2"]
    resumed = run_stage(DPO, config, context, sft_model_path=base.path, data=data)
    assert_bit_identical(resumed.path, reference.path)
    assert resumed.metrics == reference.metrics
    statuses = [run.info.status for run in stage_runs(MlflowClient(mlflow_store), parent, "dpo")]
    assert statuses == ["KILLED", "FINISHED"]


class RunsCode:
    """A pickle that runs code when unpickled: it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resuming_unpickles_nothing_that_can_run_code(tmp_path: Path):
    """The scheduler state is JSON in the trainer state; accelerate's optimizer and RNG files are read with torch's
    weights-only loader, so a checkpoint another party rewrote cannot run code here."""
    from tests.test_distributed import run_training

    run_training(tmp_path / "checkpoints")  # the loop keeps its saves (a stage removes them once it succeeded)
    saved = latest_checkpoint(tmp_path / "checkpoints")
    assert saved is not None and (saved / TRAINER_STATE).is_file()
    assert not list(saved.glob("custom_checkpoint_*")), "the scheduler must not be pickled by accelerate"
    assert "scheduler" in (saved / TRAINER_STATE).read_text()
    marker = tmp_path / "code-ran"
    optimizer = (saved / "optimizer.bin").read_bytes()
    for name in ("optimizer.bin", "random_states_0.pkl"):
        with open(saved / name, "wb") as file:
            pickle.dump(RunsCode(marker), file, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        run_training(tmp_path / "checkpoints")
    (saved / "optimizer.bin").write_bytes(optimizer)
    run_training(tmp_path / "checkpoints")  # a bad RNG file is skipped: the data order does not depend on it
    assert not marker.exists()
