"""Stage: the registered champion, downloaded so that the challenger can meet it head to head.

Only when a head-to-head can decide something: a champion that is not comparable with the challenger (another
evaluation set, judge or tokenizer: `post_train.registry.incomparabilities`) cannot be replaced by it, and a
challenger whose weights are registered already is not registered again (`tasks/register.py`); neither is
downloaded, and the flow runs no head-to-head (`Champion.needs_head_to_head`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.models import Model

from post_train.config import PipelineConfig
from post_train.registry import comparability_tags, incomparabilities, version_with_weights, weights_sha256
from post_train.results import Champion, PreparedData
from post_train.stage_io import stage_main
from post_train.tracking import current_champion, tracking_uri


def checkpoint_directory(model_dir: str) -> str:
    """A transformers checkpoint directory (weights, config and tokenizer together) from a downloaded model version.

    A version that is an MLflow model of the `transformers` flavor keeps the weights in its `model_binary` folder
    and each component (the tokenizer) in `components/<name>` (MLflow's layout, `mlflow.transformers.save_model`):
    the components' files are copied beside the weights. A version registered before versions were MLflow models
    (no `MLmodel` file) is the checkpoint directory itself.
    """
    root = Path(model_dir)
    if not (root / "MLmodel").is_file():
        return model_dir
    flavor = Model.load(str(root)).flavors["transformers"]
    checkpoint = root / flavor["model_binary"]
    for component in flavor.get("components", []):
        shutil.copytree(root / "components" / component, checkpoint, dirs_exist_ok=True)
    return str(checkpoint)


def run(config: PipelineConfig, output_dir: str, model_path: str, data: PreparedData) -> Champion | None:
    """The champion of `registry.model_name` as the challenger at `model_path` (evaluated on `data.eval`) meets it,
    or None when there is none yet.

    Downloaded to `output_dir`/champion-v<version> (`path`: its checkpoint directory, `checkpoint_directory`) when
    it needs a head-to-head; else `path` is "" and `incomparable` or `challenger_registered_as` says why not.
    """
    name = config.registry.model_name
    client = MlflowClient(tracking_uri())
    champion = current_champion(client, name, config.registry.champion_alias)
    if champion is None:
        return None
    incomparable = tuple(
        incomparabilities(comparability_tags(config, data.hashes["eval"], model_path), dict(champion.tags))
    )
    registered = version_with_weights(client, name, weights_sha256(model_path))
    if incomparable or registered is not None:
        return Champion(
            version=str(champion.version),
            path="",
            incomparable=incomparable,
            challenger_registered_as=str(registered.version) if registered is not None else None,
        )
    destination = Path(output_dir) / f"champion-v{champion.version}"
    destination.mkdir(parents=True, exist_ok=True)
    path = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{champion.version}",
        dst_path=str(destination),
        tracking_uri=tracking_uri(),
        registry_uri=tracking_uri(),
    )
    return Champion(version=str(champion.version), path=checkpoint_directory(path))


if __name__ == "__main__":
    stage_main(run)
