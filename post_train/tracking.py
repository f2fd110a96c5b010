"""MLflow: where runs go, one child run per stage, and the plots users look at.

Under `accelerate launch` every process runs the stage's code, but only rank 0 talks to
MLflow: `stage_run` opens no run elsewhere, and stages guard their own logging calls with
`is_main_process()` (MLflow's fluent API would otherwise start a run of its own).

Several runs may share one store at once: a new SQLite store gets its tables under a lock (two
processes migrating one empty database collide), and registry decisions hold `registry_lock`.

What the MLflow UI shows: the experiment's description and kind (`EXPERIMENT_TAGS`), runs named by stage, recipe,
scale and model, system metrics on the training stages, the datasets each stage read (`log_dataset`), and one
grid of training curves per stage (`log_curves`).
"""

from __future__ import annotations

import functools
import math
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
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import HuggingFaceDatasetSource, LocalArtifactDatasetSource
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from post_train.locks import file_lock
from post_train.provenance import library_versions
from post_train.results import TrainedModel

EXPERIMENT = "post-train"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""The tag the MLflow UI (3.x) reads to open an experiment as "Machine learning" (`custom_model_development`: runs,
metrics, charts) or as "GenAI apps & agents" (`genai_development`: traces first); without it the UI guesses."""
EXPERIMENT_TAGS = {
    EXPERIMENT_KIND_TAG: "custom_model_development",
    MLFLOW_RUN_NOTE: (  # `mlflow.note.content`: the description on the experiment's page (Markdown)
        "Post-training of a language model: prepare → base model → SFT → DPO → evaluate → (head-to-head) → "
        "register.\n\n"
        "Each flow run is a parent run named `<recipe>-<scale>-<model>-<flow run>` (tags `recipe`, `scale`, "
        "`model`) with a child run per stage named `<stage> · <recipe> · <scale>` (tag `stage`). Training stages "
        "log TRL's metric names, system metrics (`system/...`), their datasets (Datasets column) and a PNG of "
        "their curves; `evaluate` logs win rates (`win_rate/all`, with CIs) per split. A cached stage's run is "
        "tagged `cache_hit`."
    ),
}
"""Set on the experiment when it is created, and on an existing one that lacks them (a kind chosen in the UI
stays)."""


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
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(), tags=EXPERIMENT_TAGS)
        except MlflowException:  # another run created it since
            experiment = client.get_experiment_by_name(name)
    for key, value in EXPERIMENT_TAGS.items():  # a store made before these tags existed
        if key not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


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
            # A SQL store answers a taken name by looking the holder's lease up, which fails if it was just released.
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                continue
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


def model_short_name(name_or_path: str | None) -> str:
    """The model as a run name shows it: the last part of a Hub name or local path (`Qwen/Qwen2.5-0.5B` →
    `Qwen2.5-0.5B`), `tiny-llama` for the demo base model (`model.name_or_path` unset)."""
    return Path(name_or_path.rstrip("/")).name if name_or_path else "tiny-llama"


def flow_run_name(recipe: str, scale: str, model: str, flow_run: str) -> str:
    """The parent run's name, `<recipe>-<scale>-<model>-<flow run>`: what a row of the runs table is at a glance."""
    return f"{recipe}-{scale}-{model}-{flow_run}"


def stage_run_name(stage: str, parent_tags: dict[str, str]) -> str:
    """`<stage> · <recipe> · <scale>` from the parent run's `recipe` and `scale` tags (those it has): the stage
    alone under a parent without them, or with no parent."""
    return " · ".join([stage] + [parent_tags[key] for key in ("recipe", "scale") if key in parent_tags])


@contextmanager
def stage_run(
    stage: str,
    parent_run_id: str | None,
    params: dict[str, Any] | None = None,
    system_metrics: bool | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """A child run of the flow's run for one stage, on rank 0 only; marked FAILED, with the error as its `error` tag,
    if the stage raises. Earlier attempts at the stage under the same parent that are still RUNNING are ended first.

    `system_metrics` (True for the training stages; None: as `MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING` says): MLflow
    samples CPU, memory, disk, network and, with nvidia-ml-py, each GPU of rank 0's machine every
    `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` seconds (default 10) into `system/...` metrics, from a thread that
    stops with the run (a run shorter than one interval gets none)."""
    if not is_main_process():
        yield NO_RUN
        return
    end_orphaned_runs(stage, parent_run_id)
    experiment = experiment_id()
    parent_tags = MlflowClient(tracking_uri()).get_run(parent_run_id).data.tags if parent_run_id else {}
    with mlflow.start_run(
        experiment_id=experiment,
        run_name=stage_run_name(stage, parent_tags),
        parent_run_id=parent_run_id,
        nested=parent_run_id is not None,
        tags={"stage": stage, **environment_tags()},
        log_system_metrics=system_metrics,
    ) as run:
        if params:
            mlflow.log_params(flatten(params))
        try:
            yield run
        except Exception as error:
            mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:MAX_TAG_VAL_LENGTH])
            raise


def dataset_source(source: str) -> LocalArtifactDatasetSource | HuggingFaceDatasetSource:
    """Where a dataset was read, as `post_train.data.load_rows` reads it: a local file or directory (its absolute
    path), else a Hub dataset `name` or `name:split` (split `train` by default)."""
    path = Path(source)
    if path.exists():
        return LocalArtifactDatasetSource(str(path.resolve()))
    name, _, split = source.partition(":")
    return HuggingFaceDatasetSource(name, split=split or "train")


def log_dataset(source: str, name: str, digest: str, context: str) -> None:
    """`source` as an input of the active run (rank 0 only): MLflow's dataset tracking, shown in the runs table's
    Datasets column and on the run page as `name (digest)` with its `context` (`training`, `evaluation`, ...).

    The digest is the content hash the stage's cache key already takes (`PreparedData.hashes`: 32 hex digits, or
    DVC's `<md5>.dir`, within MLflow's 36 characters), so runs on the same data share one dataset entry. Only
    metadata is logged (`MetaDataset`), not the rows."""
    if not is_main_process():
        return
    dataset = MetaDataset(dataset_source(source), name=name, digest=digest)
    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException:
        # Two stages logging the same new dataset at once (the cells of a compare run): the store's get-or-create
        # is not atomic, so the later insert breaks its unique (experiment, name, digest) key and is rolled back;
        # the dataset exists by then, and a second call links it (seen in the suite).
        mlflow.log_input(dataset, context=context)


CURVE_PANEL_PX = (480, 360)
"""Width and height of one panel of `log_curves`, in pixels: legible in MLflow's artifact viewer at full size."""
CURVE_DPI = 100


def grid_shape(panels: int) -> tuple[int, int]:
    """(rows, columns) for `panels` plots: ⌈√n⌉ columns, as many rows as they need (6 → 2×3, 7 → 3×3, 3 → 2×2), so
    the image stays about as wide as it is tall however many metrics it shows."""
    columns = math.ceil(math.sqrt(panels))
    return math.ceil(panels / columns), columns


def log_curves(
    history: list[dict[str, float]],
    keys: list[str],
    name: str,
    title: str,
    lines: dict[str, tuple[float, str]] | None = None,
) -> None:
    """A PNG with one panel per metric against the optimizer step, in a `grid_shape` grid of `CURVE_PANEL_PX`
    panels (rank 0 only); `lines` draws a labelled horizontal line (a target) on a metric's panel."""
    if not is_main_process():
        return
    keys = [key for key in keys if any(key in entry for entry in history)]
    if not keys:
        return
    rows, columns = grid_shape(len(keys))
    width, height = CURVE_PANEL_PX
    figure, axes = plt.subplots(
        rows, columns, figsize=(columns * width / CURVE_DPI, rows * height / CURVE_DPI), dpi=CURVE_DPI, squeeze=False
    )
    for axis, key in zip(axes.flat, keys):
        points = [(entry["step"], entry[key]) for entry in history if key in entry]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        if lines and key in lines:
            level, label = lines[key]
            axis.axhline(level, color="tab:red", linestyle="--", label=f"{label} {level:g}")
            axis.legend(loc="best")
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(keys) :]:  # the last row's empty cells
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    mlflow.log_figure(figure, name, save_kwargs={"dpi": CURVE_DPI})
    plt.close(figure)


def record_cache_hit(
    stage: str, parent_run_id: str | None, key: str, metrics: dict[str, float], tags: dict[str, str] | None = None
) -> None:
    """A child run for a stage whose result came from the cache, so every flow run shows every stage."""
    with stage_run(stage, parent_run_id):
        mlflow.set_tags({"cache_hit": "true", "cache_key": key, **(tags or {})})
        mlflow.log_metrics(metrics)


def trained_model(
    path: Path | str, metrics: dict[str, float], run, counts: dict[str, float] | None = None
) -> TrainedModel:
    """A training stage's result: its final `metrics` (logged to the stage's MLflow `run` on rank 0, with the
    `regressed` tags) and the data `counts` (already logged by the data reports)."""
    result = TrainedModel(path=str(path), metrics={**metrics, **(counts or {})}, run_id=run.info.run_id)
    if is_main_process():
        mlflow.log_metrics(metrics)
        mlflow.set_tags(regression_tags(result.regressions))
    return result


def regression_tags(regressions: list[str]) -> dict[str, str]:
    """The tags that flag a training stage that ended worse than it started: `regressed`, and why (`regressions`)."""
    return {"regressed": "true", "regressions": "; ".join(regressions)} if regressions else {"regressed": "false"}


def current_champion(client: MlflowClient, name: str, alias: str):
    """The model version `name@alias`, or None when there is none yet."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
