"""MLflow: where runs go, one child run per stage, and the plots users look at.

Under `accelerate launch` every process runs the stage's code, but only rank 0 talks to
MLflow: `stage_run` opens no run elsewhere, and stages guard their own logging calls with
`is_main_process()` (MLflow's fluent API would otherwise start a run of its own).

Several runs may share one store at once: a new SQLite store gets its tables under a lock (two
processes migrating one empty database collide), and registry decisions hold `registry_lock`.
"""

from __future__ import annotations

import functools
import os
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator
from urllib.parse import urlparse

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt
import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from post_train.locks import file_lock
from post_train.provenance import library_versions

EXPERIMENT = "post-train"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else a SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _artifact_location() -> str | None:
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return (local_store(uri).parent / "mlartifacts").as_uri()
    return None  # a tracking server decides where artifacts go


def local_store(uri: str) -> Path | None:
    """The database file of a SQLite store or the directory of a file store; None for a server or another database."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("file:"):
        return Path(urlparse(uri).path)
    return Path(uri) if "://" not in uri and not uri.startswith("databricks") else None


@functools.cache
def _store_ready(uri: str) -> None:
    """A SQLite store's tables, created under a lock beside the database: MLflow migrates a database it finds
    empty, and two processes that both find it empty both migrate it (`duplicate column name: step`)."""
    store = local_store(uri)
    if store is None or not uri.startswith("sqlite:"):
        return
    with file_lock(store.with_name(f"{store.name}.schema.lock")):
        MlflowClient(uri).search_experiments(max_results=1)


def experiment_id(name: str = EXPERIMENT) -> str:
    uri = tracking_uri()
    _store_ready(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location())
    except MlflowException:  # another run created it since
        return client.get_experiment_by_name(name).experiment_id


LEASE_SUFFIX = ".registry-lock"
LEASE_STALE_S = 600.0
"""A registry lease older than this belongs to a run that died while holding it: it is broken."""


@contextmanager
def registry_lock(client: MlflowClient, model_name: str) -> Iterator[None]:
    """Hold the registry of `model_name` for one decision (read the champion, register, move the aliases): a file
    lock beside a SQLite or file store, else (a tracking server that several machines use) `registry_lease`."""
    store = local_store(tracking_uri())
    if store is None:
        with registry_lease(client, model_name):
            yield
        return
    with file_lock(store.with_name(f"{store.name}.registry.lock"), f"waiting for another run to register {model_name}"):
        yield


@contextmanager
def registry_lease(client: MlflowClient, model_name: str, poll_s: float = 0.5) -> Iterator[None]:
    """A lock held on the tracking server itself: the registered model `<model_name>.registry-lock`, which only one
    run can create (names are unique). Deleted on exit; broken after `LEASE_STALE_S` seconds if its holder died."""
    lease = f"{model_name}{LEASE_SUFFIX}"
    while True:
        try:
            client.create_registered_model(lease, description=f"Held while a post-train run registers {model_name}.")
            break
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held_since = client.get_registered_model(lease).creation_timestamp / 1000
            if time.time() - held_since > LEASE_STALE_S:
                client.delete_registered_model(lease)
                continue
        except MlflowException:  # released meanwhile
            continue
        time.sleep(poll_s)
    try:
        yield
    finally:
        client.delete_registered_model(lease)


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


def end_orphaned_runs(stage: str, parent_run_id: str | None, status: str = "KILLED") -> None:
    """Mark the runs of `stage` under `parent_run_id` that are still RUNNING as `status`.

    An attempt that was killed (SIGKILL, out of memory, a lost machine) could not end its run; the next attempt, or
    the launcher that saw it die, ends it instead.
    """
    if parent_run_id is None:
        return
    client = MlflowClient(tracking_uri())
    experiment = client.get_run(parent_run_id).info.experiment_id
    orphans = client.search_runs(
        [experiment],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.stage = '{stage}' "
        "and attributes.status = 'RUNNING'",
    )
    for orphan in orphans:
        client.set_terminated(orphan.info.run_id, status=status)


def environment_tags() -> dict[str, str]:
    """What changes a stage's numbers besides its inputs: torch's CPU thread count and the library versions."""
    import torch

    return {"torch_threads": str(torch.get_num_threads())} | {
        f"version.{package}": version for package, version in library_versions().items()
    }


@contextmanager
def stage_run(
    stage: str,
    parent_run_id: str | None,
    params: dict[str, Any] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """A child run of the flow's run for one stage, on rank 0 only; marked FAILED, with the error as its `error` tag,
    if the stage raises. Earlier attempts at the stage under the same parent that are still RUNNING are ended first."""
    if not is_main_process():
        yield NO_RUN
        return
    end_orphaned_runs(stage, parent_run_id)
    with mlflow.start_run(
        experiment_id=experiment_id(),
        run_name=stage,
        parent_run_id=parent_run_id,
        nested=parent_run_id is not None,
        tags={"stage": stage, **environment_tags()},
    ) as run:
        if params:
            mlflow.log_params(flatten(params))
        try:
            yield run
        except Exception as error:
            mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:MAX_TAG_VAL_LENGTH])
            raise


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


def record_cache_hit(
    stage: str, parent_run_id: str | None, key: str, metrics: dict[str, float], tags: dict[str, str] | None = None
) -> None:
    """A child run for a stage whose result came from the cache, so every flow run shows every stage."""
    with stage_run(stage, parent_run_id):
        mlflow.set_tags({"cache_hit": "true", "cache_key": key, **(tags or {})})
        mlflow.log_metrics(metrics)


def regression_tags(regressions: list[str]) -> dict[str, str]:
    """The tags that flag a training stage that ended worse than it started: `regressed`, and why (`regressions`)."""
    return {"regressed": "true", "regressions": "; ".join(regressions)} if regressions else {"regressed": "false"}


def current_champion(client: MlflowClient, name: str, alias: str):
    """The model version `name@alias`, or None when there is none yet."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
