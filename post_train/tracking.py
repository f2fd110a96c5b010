"""MLflow: where runs go, one child run per stage, and the plots users look at.

Under `accelerate launch` every process runs the stage's code, but only rank 0 talks to
MLflow: `stage_run` opens no run elsewhere, and stages guard their own logging calls with
`is_main_process()` (MLflow's fluent API would otherwise start a run of its own).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt
import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

EXPERIMENT = "post-train"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else a SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _artifact_location() -> str | None:
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None  # a tracking server decides where artifacts go


def experiment_id(name: str = EXPERIMENT) -> str:
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_location())


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_params_and_metrics(
    client: MlflowClient,
    run_id: str,
    params: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
) -> None:
    """Params (values cut to MLflow's limit, 6000 characters) and metrics (step 0, timestamped now) on a run.

    One call, however many: `MlflowClient.log_batch` itself splits them into requests within
    MLflow's per-request limits (100 params, 1000 metrics).
    """
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(key, float(value), now, 0) for key, value in (metrics or {}).items()],
        params=[Param(key, str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in (params or {}).items()],
    )


def is_main_process() -> bool:
    """Rank 0 of a distributed run (`RANK`, set by `accelerate launch` and torchrun), or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


NO_RUN = SimpleNamespace(info=SimpleNamespace(run_id=""))
"""What `stage_run` gives processes other than rank 0."""


@contextmanager
def stage_run(
    stage: str,
    parent_run_id: str | None,
    params: dict[str, Any] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """A child run of the flow's run for one stage, on rank 0 only; marked FAILED if the stage raises."""
    if not is_main_process():
        yield NO_RUN
        return
    with mlflow.start_run(
        experiment_id=experiment_id(),
        run_name=stage,
        parent_run_id=parent_run_id,
        nested=parent_run_id is not None,
        tags={"stage": stage},
    ) as run:
        if params:
            mlflow.log_params(flatten(params))
        yield run


def log_curves(history: list[dict[str, float]], keys: list[str], name: str, title: str) -> None:
    """A PNG with one panel per metric against the optimizer step (rank 0 only)."""
    if not is_main_process():
        return
    keys = [key for key in keys if any(key in entry for entry in history)]
    if not keys:
        return
    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for axis, key in zip(axes[0], keys):
        points = [(entry["step"], entry[key]) for entry in history if key in entry]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    mlflow.log_figure(figure, name)
    plt.close(figure)


def record_cache_hit(stage: str, parent_run_id: str | None, key: str, metrics: dict[str, float]) -> None:
    """A child run for a stage whose result came from the cache, so every flow run shows every stage."""
    with stage_run(stage, parent_run_id):
        mlflow.set_tags({"cache_hit": "true", "cache_key": key})
        mlflow.log_metrics(metrics)


def current_champion(client: MlflowClient, name: str, alias: str):
    """The model version `name@alias`, or None when there is none yet."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
