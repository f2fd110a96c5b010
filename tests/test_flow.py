"""The `post-train` flow end to end at smoke scale, under a real (test) Prefect server,
a temporary MLflow SQLite store and a temporary DVC repository."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from mlflow import MlflowClient

from post_train.config import ConfigError
from post_train.data import DataError
from tests.conftest import smoke_overrides
from tests.test_mlflow_ui import dataset_inputs, system_metric_keys


def runs_by_stage(client: MlflowClient, parent_id: str) -> dict[str, object]:
    experiment = client.get_run(parent_id).info.experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {run.data.tags["stage"]: run for run in children}


def test_post_train_runs_end_to_end_and_registers_a_champion(prefect_server, workspace, mlflow_store, monkeypatch):
    from flows.pipeline import post_train

    # A smoke stage can end in under half a second on a fast machine, before a 0.5 s interval samples once.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    # The smoke model is too small to beat the references: no quality floor here (tests/test_registry.py tests it).
    overrides = {**smoke_overrides(workspace), "registry.min_win_rate": 0.0}
    summary = post_train(recipe="lowlr", scale="smoke", overrides=overrides)
    client = MlflowClient(mlflow_store)

    champion = client.get_model_version_by_alias("post-train", "champion")
    assert str(champion.version) == summary["model_version"] == "1"
    lock = yaml.safe_load((workspace / "repo" / "dvc.lock").read_text())
    assert champion.tags["data_hash"] == lock["stages"]["world@smoke"]["outs"][0]["md5"] == summary["data_hash"]
    assert champion.tags["recipe"] == "lowlr" and champion.tags["flow_run_id"] != "none"
    assert champion.tags["base_model"] == summary["base_model"]["path"]
    assert {"eval_hash", "judge_fingerprint", "tokenizer_sha256", "weights_sha256"} <= set(champion.tags)

    stages = runs_by_stage(client, summary["mlflow_run_id"])
    assert set(stages) == {"pretrain", "sft", "dpo", "evaluate", "register"}
    assert all(run.info.status == "FINISHED" for run in stages.values())
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    # What the runs table shows: recipe, scale and model in the names; system metrics and datasets per stage.
    assert parent.info.run_name.startswith("lowlr-smoke-tiny-llama-") and parent.data.tags["model"] == "tiny-llama"
    assert {stage: run.info.run_name for stage, run in stages.items()} == {
        stage: f"{stage} · lowlr · smoke" for stage in stages
    }
    assert {stage for stage, run in stages.items() if system_metric_keys(run)} == {"pretrain", "sft", "dpo"}
    digests = {stage: {name: found[0] for name, found in dataset_inputs(run).items()} for stage, run in stages.items()}
    world = lock["stages"]["world@smoke"]["outs"][0]["md5"]
    assert digests["pretrain"] == {"world": world} and digests["register"] == {}
    assert digests["sft"].keys() == {"sft", "eval"} and digests["dpo"].keys() == {"preferences"}
    assert digests["evaluate"] == {"eval": digests["sft"]["eval"]}

    evaluation = stages["evaluate"].data.metrics
    for split in ("in_distribution", "held_out", "all"):
        assert 0.0 <= evaluation[f"win_rate/{split}"] <= 1.0
        assert evaluation[f"win_rate_se/{split}"] >= 0.0

    sft_losses = client.get_metric_history(stages["sft"].info.run_id, "loss")
    by_step = sorted(sft_losses, key=lambda m: m.step)
    assert by_step[-1].value < by_step[0].value
    assert {"kl_to_base", "entropy", "mean_token_weight", "grad_norm", "tokens_per_second"} <= set(
        stages["sft"].data.metrics
    )
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(
        stages["dpo"].data.metrics
    )

    artifacts = {stage: {a.path for a in client.list_artifacts(run.info.run_id)} for stage, run in stages.items()}
    assert "sft_curves.png" in artifacts["sft"] and "dpo_curves.png" in artifacts["dpo"]
    assert {"win_rates.png", "eval_samples.json"} <= artifacts["evaluate"]
    assert "config.json" in {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}
    # Every row of the smoke world is used; the counts reach the summary and the model card.
    assert summary["data"]["data/sft/used"] == summary["data"]["data/sft/rows"] == 64
    assert summary["data"]["data/preferences/used"] == 32
    assert "data_report_sft.json" in artifacts["sft"] and "data_report_preferences.json" in artifacts["dpo"]
    assert "- sft data: 64 of 64 rows used" in champion.description

    # A new DPO beta reuses the cached base and SFT models and reruns only DPO onwards.
    again = post_train(recipe="lowlr", scale="smoke", overrides={**overrides, "dpo.loss_params.beta": 0.2})
    assert again["base_model"]["cache_hit"] and again["base_model"]["path"] == summary["base_model"]["path"]
    assert again["sft"]["cache_hit"] and not again["dpo"]["cache_hit"]
    assert again["model_version"] == "2" and again["registration"]["head_to_head"] is not None  # comparable with 1
    cached_sft = runs_by_stage(client, again["mlflow_run_id"])["sft"]
    assert cached_sft.data.tags["cache_hit"] == "true" and "loss_final" in cached_sft.data.metrics
    # No stage got worse (a flagged one would be named in the summary and not promoted), cached or not.
    assert summary["regressions"] == again["regressions"] == []
    assert cached_sft.data.tags["regressed"] == "false" == client.get_run(again["mlflow_run_id"]).data.tags["regressed"]

    # The first run again: every stage from the cache, no head-to-head, and no second version of the same weights.
    rerun = post_train(recipe="lowlr", scale="smoke", overrides=overrides)
    assert rerun["dpo"]["cache_hit"] and rerun["model_version"] == "1"
    assert rerun["registration"]["already_registered"] and rerun["registration"]["head_to_head"] is None
    assert rerun["registration"]["reason"].startswith("already registered as version 1 (the same weights")
    assert "head-to-head" not in runs_by_stage(client, rerun["mlflow_run_id"])
    assert len(client.search_model_versions("name = 'post-train'")) == 2


def test_the_joint_pipeline_from_the_base_is_one_stage_in_place_of_sft_and_dpo(prefect_server, workspace, mlflow_store):
    """From the base (`joint.start: base`; the study's smoke test runs the recipe's warm-up start)."""
    from flows.pipeline import post_train
    from post_train.cli import format_summary

    start = "base"
    overrides = {**smoke_overrides(workspace), "registry.min_win_rate": 0.0, "joint.start": start}
    summary = post_train(recipe="joint", scale="smoke", overrides=overrides)
    client = MlflowClient(mlflow_store)
    stages = runs_by_stage(client, summary["mlflow_run_id"])
    expected = {"pretrain", "joint", "evaluate", "register"} | ({"sft"} if start == "sft" else set())
    assert set(stages) == expected and all(run.info.status == "FINISHED" for run in stages.values())
    assert summary["pipeline"] == "joint" and "dpo" not in summary
    assert (summary["sft"] is None) == (start == "base")
    if start == "sft":  # the warm-up: sft.max_steps of the recipe
        assert max(m.step for m in client.get_metric_history(stages["sft"].info.run_id, "loss")) == 50
    assert {"sft/loss", "dpo/loss", "dpo/rewards/accuracies"} <= set(stages["joint"].data.metrics)
    assert summary["data"]["data/preferences/used"] == 32
    version = client.get_model_version("post-train", summary["model_version"])
    assert version.tags["recipe"] == "joint"
    text = format_summary(summary)
    assert "joint loss" in text and "DPO part" in text and ("SFT loss" in text) == (start == "sft")


def test_a_diverging_stage_stops_the_run_unretried_and_registers_nothing(prefect_server, workspace, mlflow_store):
    from flows.pipeline import post_train
    from post_train.errors import TrainingDiverged

    overrides = {**smoke_overrides(workspace), "sft.learning_rate": 1e30}
    with pytest.raises(TrainingDiverged, match=r"sft \(nll\) diverged: .* at step \d+"):
        post_train(recipe="lowlr", scale="smoke", overrides=overrides)
    client = MlflowClient(mlflow_store)
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("post-train").experiment_id], "tags.mlflow.parentRunId IS NULL"
    )
    assert parent.info.status == "FAILED"
    stages = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    sft_runs = [run for run in stages if run.data.tags["stage"] == "sft"]
    assert [run.info.status for run in sft_runs] == ["FAILED"]  # one attempt: a refusal is not retried
    assert "register" not in {run.data.tags["stage"] for run in stages}
    assert client.search_registered_models() == []


def test_bad_configuration_is_refused_before_any_work(prefect_server, workspace, mlflow_store):
    from flows.pipeline import post_train

    overrides = {**smoke_overrides(workspace), "sft.learning_rate": -1e-4}
    with pytest.raises(ConfigError, match="sft.learning_rate: Input should be greater than 0"):
        post_train(recipe="lowlr", scale="smoke", overrides=overrides)
    assert not (workspace / "runs").exists()
    assert not (workspace / "repo" / "data").exists()


def test_a_malformed_row_fails_the_run_before_any_work(prefect_server, workspace, mlflow_store):
    from flows.pipeline import post_train

    bad = workspace / "sft.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "Copy: a"}]}) + "\n")
    overrides = {**smoke_overrides(workspace), "data.sft": str(bad)}
    with pytest.raises(DataError, match=rf"{bad}, row 0: the last message must be the assistant's"):
        post_train(recipe="lowlr", scale="smoke", overrides=overrides)
    # The inputs are validated first: no MLflow run, no run directory, no data generated.
    experiment = MlflowClient(mlflow_store).get_experiment_by_name("post-train")
    assert experiment is None or MlflowClient(mlflow_store).search_runs([experiment.experiment_id]) == []
    assert not (workspace / "runs").exists() and not (workspace / "repo" / "data").exists()


def test_a_users_own_model_and_datasets_from_local_paths(prefect_server, workspace, mlflow_store, smoke_stages):
    from flows.pipeline import post_train

    _, data, base = smoke_stages
    model_dir = shutil.copytree(base.path, workspace / "my-model")
    datasets_dir = workspace / "my-data"
    datasets_dir.mkdir()
    for kind in ("sft", "preferences", "eval"):
        shutil.copy(getattr(data, kind), datasets_dir / f"{kind}.jsonl")
    overrides = {
        **smoke_overrides(workspace),
        "model.name_or_path": str(model_dir),
        "data.world": None,
        **{f"data.{kind}": str(datasets_dir / f"{kind}.jsonl") for kind in ("sft", "preferences", "eval")},
    }
    summary = post_train(recipe="lowlr", scale="smoke", overrides=overrides)
    assert summary["base_model"]["path"] == str(model_dir)
    assert not (workspace / "repo" / "data").exists()  # no world was generated
    assert len(summary["data_hash"]) == 32
    assert 0.0 <= summary["evaluation"]["win_rate/all"] <= 1.0
