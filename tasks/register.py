"""Stage 6, register: the final model becomes a new version of the registered model.

The version is tagged with recipe, data hash, git commit and flow run id. The first
version, and any later one whose win rate beats the current champion's, gets the
`champion` alias.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task

from post_train.config import PipelineConfig
from post_train.fingerprint import REPO_ROOT
from post_train.launch import should_retry
from post_train.tracking import stage_run, tracking_uri

WIN_RATE_TAG = "win_rate"


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    model_uri: str
    is_champion: bool
    previous_champion: str | None


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def current_champion(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def run(
    config: PipelineConfig,
    model_path: str,
    win_rate: float,
    data_hash: str,
    flow_run_id: str | None = None,
    parent_run_id: str | None = None,
) -> Registration:
    name, alias = config.registry.model_name, config.registry.champion_alias
    client = MlflowClient(tracking_uri())
    with stage_run("register", parent_run_id) as run:
        mlflow.log_artifacts(model_path, artifact_path="model")
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, description="Models post-trained by the post-train pipeline.")
        tags = {
            "recipe": config.recipe,
            "scale": config.scale,
            "data_hash": data_hash,
            "git_commit": git_commit(),
            "flow_run_id": flow_run_id or "none",
            WIN_RATE_TAG: f"{win_rate:.4f}",
        }
        version = client.create_model_version(
            name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags,
            description=f"recipe {config.recipe} at scale {config.scale}; win rate {100 * win_rate:.1f}% vs reference",
        )
        champion = current_champion(client, name, alias)
        promote = champion is None or win_rate > float(champion.tags.get(WIN_RATE_TAG, "-inf"))
        if promote:
            client.set_registered_model_alias(name, alias, version.version)
        mlflow.log_params({"registered_model": name, "version": version.version, "promoted": promote})
        return Registration(
            name=name,
            version=str(version.version),
            model_uri=f"models:/{name}/{version.version}",
            is_champion=promote,
            previous_champion=str(champion.version) if champion else None,
        )


register_task = task(run, name="register", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=should_retry)
