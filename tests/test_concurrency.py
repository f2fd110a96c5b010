"""Runs at the same instant, as real processes released together by a barrier: both succeed on a fresh MLflow store,
a registry decision is taken by one at a time (one champion at most), and a stage cache entry is built once. A
forced rebuild never deletes the entry it replaces."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from post_train.stage_cache import cached
from tests.conftest import smoke_overrides


@dataclass(frozen=True)
class Made:
    path: str
    metrics: dict


def together(target, directory: Path, *arguments_per_process, timeout: float = 240) -> list[dict]:
    """`target(barrier, out_file, *arguments)` in one spawned process per argument tuple, released at the same
    instant; returns what each wrote to its `out_file` (JSON, in `directory`)."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(arguments_per_process))
    processes, outputs = [], []
    for index, arguments in enumerate(arguments_per_process):
        out_file = directory / f"process-{index}.json"
        outputs.append(out_file)
        processes.append(context.Process(target=target, args=(barrier, str(out_file), *arguments)))
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout)
    assert [process.exitcode for process in processes] == [0] * len(processes), [
        p.read_text() for p in outputs if p.exists()
    ]
    return [json.loads(path.read_text()) for path in outputs]


def _report(out_file: str, work) -> None:
    try:
        reply = {"result": work()}
    except Exception as error:  # reported, and the process fails
        Path(out_file).write_text(json.dumps({"error": f"{type(error).__name__}: {error}"}))
        raise
    Path(out_file).write_text(json.dumps(reply))


# ------------------------------------------------------------------------------------------- a fresh MLflow store


def _first_run_on_a_fresh_store(barrier, out_file: str, store_dir: str) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(store_dir) / 'mlflow.db'}"
    from post_train.tracking import stage_run

    barrier.wait()

    def work():
        with stage_run("sft", None) as run:
            import mlflow

            mlflow.log_metric("loss", 1.0)
        return run.info.run_id

    _report(out_file, work)


def test_two_runs_at_once_on_a_fresh_mlflow_store_both_succeed(tmp_path: Path):
    """Without the schema lock one of them dies in MLflow's migration: `duplicate column name: step`."""
    results = together(_first_run_on_a_fresh_store, tmp_path, (str(tmp_path),), (str(tmp_path),))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("post-train").experiment_id])
    assert {run.info.run_id for run in runs} == {result["result"] for result in results}
    assert all(run.info.status == "FINISHED" and run.data.metrics["loss"] == 1.0 for run in runs)


# ------------------------------------------------------------------------------------------- one champion at most


def _register_at_once(barrier, out_file: str, workspace: str, model_path: str, data) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(workspace) / 'mlflow.db'}"
    from post_train.config import load_config
    from tasks import register

    config = load_config("lowlr", "smoke", smoke_overrides(Path(workspace)))
    create_model_version = MlflowClient.create_model_version

    def slow_create_model_version(self, *args, **kwargs):  # a registry under load: the other run arrives meanwhile
        time.sleep(1.0)
        return create_model_version(self, *args, **kwargs)

    MlflowClient.create_model_version = slow_create_model_version
    barrier.wait()

    def work():
        registration = register.run(config, model_path, 0.5, data)
        return {
            "version": registration.version,
            "promoted": registration.is_champion,
            "reason": registration.reason,
            "already_registered": registration.already_registered,
        }

    _report(out_file, work)


def test_two_registrations_at_the_same_instant_make_one_champion(smoke_stages, mlflow_store, tmp_path: Path):
    """Both find no champion when they start; the one that decides second sees the first one's champion."""
    _, data, base = smoke_stages
    from post_train.tracking import experiment_id
    from tests.test_registry import rescaled

    experiment_id()  # the store exists: this test is about the registry, not the schema
    other = rescaled(base.path, tmp_path / "other-weights", 2.0)
    results = [
        reply["result"]
        for reply in together(
            _register_at_once,
            tmp_path,
            (str(tmp_path), base.path, data),
            (str(tmp_path), other, data),
        )
    ]
    assert sorted(result["promoted"] for result in results) == [False, True]
    winner = next(result for result in results if result["promoted"])
    loser = next(result for result in results if not result["promoted"])
    assert "another run changed the champion since (now version" in loser["reason"]
    client = MlflowClient(mlflow_store)
    versions = client.search_model_versions("name = 'post-train'")
    assert sorted(version.tags["promoted"] for version in versions) == ["false", "true"]
    assert str(client.get_model_version_by_alias("post-train", "champion").version) == winner["version"]


def test_the_same_weights_registered_at_the_same_instant_make_one_version(smoke_stages, mlflow_store, tmp_path: Path):
    """Both find no version of these weights when they start; the one that registers second finds the first's."""
    _, data, base = smoke_stages
    from post_train.tracking import experiment_id

    experiment_id()
    results = [
        reply["result"]
        for reply in together(
            _register_at_once, tmp_path, (str(tmp_path), base.path, data), (str(tmp_path), base.path, data)
        )
    ]
    assert [result["version"] for result in results] == ["1", "1"]
    assert sorted(result["already_registered"] for result in results) == [False, True]
    assert all(result["promoted"] for result in results)  # the one version is the champion, whoever made it
    assert len(MlflowClient(mlflow_store).search_model_versions("name = 'post-train'")) == 1


def _hold_the_lease(barrier, out_file: str, store: str) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = store
    from post_train.tracking import registry_lease

    client = MlflowClient(store)
    barrier.wait()

    def work():
        with registry_lease(client, "post-train", poll_s=0.05):
            entered = time.time()
            time.sleep(1.0)
            return [entered, time.time()]

    _report(out_file, work)


def test_the_registry_lease_of_a_tracking_server_admits_one_run_at_a_time(mlflow_store, tmp_path: Path):
    """The lease a remote store gets (here exercised on a SQLite store through the same client API)."""
    from post_train.tracking import LEASE_SUFFIX, experiment_id, registry_lease

    experiment_id()
    (first, second) = sorted(
        reply["result"] for reply in together(_hold_the_lease, tmp_path, (mlflow_store,), (mlflow_store,))
    )
    assert first[1] <= second[0], "two runs held the lease at once"
    client = MlflowClient(mlflow_store)
    assert client.search_registered_models(f"name = 'post-train{LEASE_SUFFIX}'") == []  # released

    client.create_registered_model(f"post-train{LEASE_SUFFIX}")  # left by a run that died holding it
    import post_train.tracking as tracking

    stale, tracking.LEASE_STALE_S = tracking.LEASE_STALE_S, 0.0
    try:
        with registry_lease(client, "post-train", poll_s=0.05):
            pass
    finally:
        tracking.LEASE_STALE_S = stale


# ------------------------------------------------------------------------------------------- a cache entry built once


def _build_at_once(barrier, out_file: str, cache_dir: str, log: str) -> None:
    barrier.wait()

    def produce(directory: Path) -> Made:
        with open(log, "a") as calls:
            calls.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # a stage takes a while: the other run arrives meanwhile
        (directory / "model").mkdir()
        (directory / "model" / "weights").write_text(str(os.getpid()))
        return Made(path=str(directory / "model"), metrics={"builder": float(os.getpid())})

    def work():
        result, hit = cached("pretrain", "k1", cache_dir, produce, Made)
        return {"path": result.path, "metrics": result.metrics, "hit": hit}

    _report(out_file, work)


def test_two_runs_with_one_key_build_the_entry_once(tmp_path: Path):
    log = tmp_path / "produced.log"
    results = [
        reply["result"]
        for reply in together(
            _build_at_once, tmp_path, (str(tmp_path / "cache"), str(log)), (str(tmp_path / "cache"), str(log))
        )
    ]
    assert len(log.read_text().splitlines()) == 1  # one build
    assert sorted(result["hit"] for result in results) == [False, True]
    assert results[0]["path"] == results[1]["path"] and results[0]["metrics"] == results[1]["metrics"]
    assert (Path(results[0]["path"]) / "weights").read_text() == str(int(results[0]["metrics"]["builder"]))


def test_a_forced_rebuild_never_deletes_the_entry_another_run_reads(tmp_path: Path):
    builds = []

    def produce(directory: Path) -> Made:
        builds.append(directory)
        (directory / "model").mkdir()
        (directory / "model" / "weights").write_text(f"build {len(builds)}")
        return Made(path=str(directory / "model"), metrics={"build": float(len(builds))})

    first, _ = cached("pretrain", "k1", str(tmp_path), produce, Made)
    with open(Path(first.path) / "weights") as reader:  # another run is reading the entry
        forced, hit = cached("pretrain", "k1", str(tmp_path), produce, Made, force=True)
        assert not hit and forced.path == first.path and forced.metrics == {"build": 2.0}
        assert reader.read() == "build 1"
    assert (Path(forced.path) / "weights").read_text() == "build 2"
    aside = [path for path in (tmp_path / "stages" / "pretrain").iterdir() if path.name.endswith(".replaced")]
    assert [(path / "model" / "weights").read_text() for path in aside] == ["build 1"]


@pytest.mark.parametrize("kind", ["sqlite", "file"])
def test_the_lock_files_lie_beside_a_local_store(kind: str, tmp_path: Path):
    from post_train.tracking import local_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if kind == "sqlite" else (tmp_path / "mlruns").as_uri()
    assert local_store(uri) == tmp_path / ("mlflow.db" if kind == "sqlite" else "mlruns")
    assert local_store("http://mlflow.example.com:5000") is None and local_store("databricks") is None
