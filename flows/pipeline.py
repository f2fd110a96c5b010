"""The `post-train` flow: prepare → base model → SFT → DPO → evaluate → register.

Composition only: each stage is a task from `tasks/`. The flow validates the whole
configuration before any work, opens the parent MLflow run the stages' runs hang under,
and returns (and prints) a summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from post_train.cloud import preflight
from post_train.config import load_config
from post_train.tracking import experiment_id, flatten, tracking_uri
from tasks.dpo import dpo_task
from tasks.evaluate import evaluate_task
from tasks.prepare import prepare_task
from tasks.pretrain import pretrain_task
from tasks.register import register_task
from tasks.sft import sft_task


def _run_directory(runs_dir: str, recipe: str, run_name: str) -> Path:
    directory = Path(runs_dir).resolve() / f"{time.strftime('%Y%m%d-%H%M%S')}-{recipe}-{run_name}"
    directory.mkdir(parents=True, exist_ok=False)
    return directory


@flow(name="post-train", log_prints=True)
def post_train(
    recipe: str = "lowlr", scale: str = "demo", overrides: dict[str, Any] | None = None, force: bool = False
) -> dict[str, Any]:
    """Post-train a model with `recipe` at `scale`.

    `overrides` maps dotted config keys to values, e.g. {"sft.learning_rate": 1e-4}; `force`
    reruns every stage even when its cached result matches.
    """
    config = load_config(recipe, scale, overrides)
    if config.compute.backend == "skypilot":
        preflight(config)  # cloud setup problems surface before any data work
    run_name = flow_run.get_name() or "local"
    run_dir = _run_directory(config.runs_dir, config.recipe, run_name)
    (run_dir / "config.json").write_text(config.model_dump_json(indent=2))

    client = MlflowClient(tracking_uri())
    parent = client.create_run(
        experiment_id(), run_name=f"{config.recipe}-{run_name}",
        tags={"recipe": config.recipe, "scale": config.scale, "prefect_flow_run_id": str(flow_run.get_id())},
    )
    parent_id = parent.info.run_id
    client.log_batch(parent_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in flatten(config.model_dump(mode="json")).items()])
    client.log_artifact(parent_id, str(run_dir / "config.json"))
    try:
        data = prepare_task(config)
        client.set_tag(parent_id, "data_hash", data.data_hash)
        base = pretrain_task(config, data, str(run_dir), parent_id, force)
        sft = sft_task(config, base.path, data, str(run_dir), parent_id, force)
        dpo = dpo_task(config, sft.path, data, str(run_dir), parent_id, force)
        evaluation = evaluate_task(
            config, dpo.path, data, str(run_dir), parent_id, force, reference_model_path=sft.path, base_model_path=base.path,
        )
        registration = register_task(
            config, dpo.path, evaluation.win_rate, data.data_hash, str(flow_run.get_id()), parent_id,
            data=data, metrics=evaluation.metrics, run_dir=str(run_dir), force=force,
        )
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    now = int(time.time() * 1000)
    metrics = [mlflow.entities.Metric(name, float(value), now, 0) for name, value in evaluation.metrics.items()]
    for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
        client.log_batch(parent_id, metrics=metrics[start : start + 1000])
    client.set_terminated(parent_id, status="FINISHED")

    summary = {
        "recipe": config.recipe,
        "scale": config.scale,
        "data_hash": data.data_hash,
        "base_model": {"path": base.path, "cache_hit": base.cache_hit, **base.metrics},
        "sft": {**sft.metrics, "cache_hit": sft.cache_hit},
        "dpo": {**dpo.metrics, "cache_hit": dpo.cache_hit},
        "evaluation": evaluation.metrics,
        "mlflow_run_uri": f"runs:/{parent_id}",
        "mlflow_run_id": parent_id,
        "model_uri": registration.model_uri,
        "model_version": registration.version,
        "champion": registration.is_champion,
        "registration": {
            "version": registration.version,
            "aliases": [config.registry.challenger_alias] + ([config.registry.champion_alias] if registration.is_champion else []),
            "promoted": registration.is_champion,
            "reason": registration.reason,
            "previous_champion": registration.previous_champion,
            "head_to_head": registration.head_to_head,
        },
        "judge": config.evaluation.judge,
        "run_dir": str(run_dir),
    }
    get_run_logger().info("summary:\n%s", json.dumps(summary, indent=2))
    return summary
