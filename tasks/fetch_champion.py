"""Stage: the registered champion, downloaded so that the challenger can meet it head to head."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow import MlflowClient

from post_train.config import PipelineConfig
from post_train.results import Champion
from post_train.tracking import current_champion, tracking_uri


def run(config: PipelineConfig, output_dir: str) -> Champion | None:
    """The champion of `registry.model_name` in `output_dir`/champion-v<version>, or None when there is none yet."""
    name = config.registry.model_name
    champion = current_champion(MlflowClient(tracking_uri()), name, config.registry.champion_alias)
    if champion is None:
        return None
    destination = Path(output_dir) / f"champion-v{champion.version}"
    destination.mkdir(parents=True, exist_ok=True)
    path = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{champion.version}",
        dst_path=str(destination),
        tracking_uri=tracking_uri(),
        registry_uri=tracking_uri(),
    )
    return Champion(version=str(champion.version), path=path)
