"""The operator path through a real Prefect server, with real processes.

A `prefect server start` on a free port (temporary PREFECT_HOME), `python -m flows.serve`
serving the deployments to it, and `prefect deployment run ... --watch` from the CLI, as an
operator would type it. Runs, cache and DVC data go to a temporary workspace through
`-p overrides=...`; MLflow to a temporary SQLite store. Every process is stopped at the end.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
from mlflow import MlflowClient

from flows.retrain import ARTIFACT_KEY, SKIP_TAG
from post_train.config import available_recipes
from post_train.server import start_server, stop_process_group, wait_until_healthy
from tests.conftest import REPO_ROOT, make_dvc_repo, smoke_overrides

RETRAIN_CRON = "17 4 * * 1"
RUN_TIMEOUT_S = 600
PREFECT = [sys.executable, "-m", "prefect"]


@dataclass
class Stack:
    api_url: str
    env: dict[str, str]
    workspace: Path
    mlflow_uri: str
    server_log: Path
    serve_log: Path

    def overrides(self, **extra: Any) -> dict[str, Any]:
        # A smoke model does not beat the references: no quality floor, so that the first run makes a champion.
        return {**smoke_overrides(self.workspace), "registry.min_win_rate": 0.0, **extra}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def prefect_api(api_url: str) -> Iterator[Any]:
    """A synchronous Prefect client for `api_url`, for this test process only."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            yield client


def stop_tree(process: subprocess.Popen) -> None:
    """Stop `process`'s group and any descendant that left it (flow runs start their own sessions)."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    stop_process_group(process)
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(descendants, timeout=10)


def wait_for_deployments(stack: Stack, names: list[str], serve: subprocess.Popen, timeout: float = 180) -> None:
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with prefect_api(stack.api_url) as client:
        while time.monotonic() < deadline:
            if serve.poll() is not None:
                raise AssertionError(f"flows.serve exited with {serve.returncode}:\n{stack.serve_log.read_text()}")
            try:
                for name in names:
                    client.read_deployment_by_name(name)
            except ObjectNotFound:
                time.sleep(1)
                continue
            if "being served" in stack.serve_log.read_text():
                return
            time.sleep(1)
    raise AssertionError(f"deployments not served within {timeout} s:\n{stack.serve_log.read_text()}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A Prefect server and `python -m flows.serve`, both real processes, stopped at the end."""
    root = tmp_path_factory.mktemp("serving")
    workspace = root / "workspace"
    make_dvc_repo(workspace / "repo")
    port = free_port()
    prefect_home = root / "prefect"
    stack = Stack(
        api_url=f"http://127.0.0.1:{port}/api",
        env={},
        workspace=workspace,
        mlflow_uri=f"sqlite:///{root / 'mlflow.db'}",
        server_log=root / "server.log",
        serve_log=root / "serve.log",
    )
    stack.env = {
        **os.environ,
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_API_URL": stack.api_url,
        "MLFLOW_TRACKING_URI": stack.mlflow_uri,
    }
    stack.env.pop("POST_TRAIN_RETRAIN_CRON", None)
    with open(stack.server_log, "wb") as server_log, open(stack.serve_log, "wb") as serve_log:
        server = start_server(port=port, prefect_home=prefect_home, log=server_log)
        serve = None
        try:
            wait_until_healthy(stack.api_url, server)
            serve = subprocess.Popen(
                [sys.executable, "-m", "flows.serve", "--retrain-cron", RETRAIN_CRON],
                cwd=REPO_ROOT,
                env=stack.env,
                stdout=serve_log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            names = [f"post-train/{recipe}" for recipe in available_recipes()] + ["retrain/scheduled", "compare/grid"]
            wait_for_deployments(stack, names, serve)
            yield stack
        finally:
            if serve is not None:
                stop_tree(serve)
            stop_tree(server)


@dataclass
class CliRun:
    returncode: int
    output: str
    flow_run_id: uuid.UUID


def deployment_run(stack: Stack, name: str, **parameters: Any) -> CliRun:
    """`prefect deployment run NAME -p key=<json> ... --watch`, as typed in a shell."""
    args = [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in parameters.items()]
    command = [
        *PREFECT,
        "deployment",
        "run",
        name,
        *[part for arg in args for part in ("-p", arg)],
        "--watch",
        "--watch-timeout",
        str(RUN_TIMEOUT_S),
    ]
    completed = subprocess.run(
        command, cwd=REPO_ROOT, env=stack.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 60
    )
    output = completed.stdout + completed.stderr
    found = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert found, f"no flow run created by {' '.join(command)}:\n{output}"
    return CliRun(completed.returncode, output, uuid.UUID(found.group(1)))


def flow_run_state(stack: Stack, flow_run_id: uuid.UUID):
    with prefect_api(stack.api_url) as client:
        return client.read_flow_run(flow_run_id).state


def flow_run_logs(stack: Stack, flow_run_id: uuid.UUID) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with prefect_api(stack.api_url) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def model_versions(stack: Stack) -> list[Any]:
    return MlflowClient(stack.mlflow_uri).search_model_versions("name = 'post-train'")


@pytest.fixture(scope="module")
def lowlr_run(stack: Stack) -> CliRun:
    """One smoke-scale run of `post-train/lowlr` through the served deployment."""
    return deployment_run(stack, "post-train/lowlr", scale="smoke", overrides=stack.overrides())


def test_a_served_deployment_runs_from_the_cli_and_registers_a_model(stack, lowlr_run):
    assert lowlr_run.returncode == 0, lowlr_run.output + stack.serve_log.read_text()[-5000:]
    assert "Flow run finished successfully in 'Completed'" in lowlr_run.output
    state = flow_run_state(stack, lowlr_run.flow_run_id)
    assert state.type.value == "COMPLETED", state

    client = MlflowClient(stack.mlflow_uri)
    champion = client.get_model_version_by_alias("post-train", "champion")
    assert champion.tags["recipe"] == "lowlr" and champion.tags["scale"] == "smoke"
    assert champion.tags["flow_run_id"] == str(lowlr_run.flow_run_id)
    assert list((stack.workspace / "runs").iterdir()), "the run directory went to the overridden runs_dir"


def test_retrain_is_deployed_on_its_cron_schedule(stack):
    with prefect_api(stack.api_url) as client:
        deployment = client.read_deployment_by_name("retrain/scheduled")
        lowlr = client.read_deployment_by_name("post-train/lowlr")
    assert not deployment.paused
    assert [(s.schedule.cron, s.active) for s in deployment.schedules] == [(RETRAIN_CRON, True)]
    assert lowlr.parameters == {"recipe": "lowlr"} and not lowlr.schedules


def test_the_server_schedules_runs_of_retrain(stack, lowlr_run):
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )

    deadline = time.monotonic() + 60
    scheduled = []
    while time.monotonic() < deadline and not scheduled:
        assert "Can't evaluate bulk DML statement" not in stack.server_log.read_text(), "the scheduler failed"
        with prefect_api(stack.api_url) as client:
            scheduled = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["scheduled"])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["SCHEDULED"]))
                ),
            )
        time.sleep(2)
    assert scheduled, "no scheduled runs of retrain/scheduled"
    assert all(run.expected_start_time.minute == 17 and run.expected_start_time.hour == 4 for run in scheduled)


def test_retrain_skips_when_the_champion_was_trained_on_the_same_data(stack, lowlr_run):
    assert lowlr_run.returncode == 0
    client = MlflowClient(stack.mlflow_uri)
    champion = client.get_model_version_by_alias("post-train", "champion")
    versions_before = len(model_versions(stack))
    runs_before = sorted((stack.workspace / "runs").iterdir())

    run = deployment_run(stack, "retrain/scheduled", scale="smoke", overrides=stack.overrides())

    assert run.returncode == 0, run.output + stack.serve_log.read_text()[-5000:]
    assert flow_run_state(stack, run.flow_run_id).type.value == "COMPLETED"
    assert len(model_versions(stack)) == versions_before  # nothing trained, nothing registered
    assert sorted((stack.workspace / "runs").iterdir()) == runs_before
    assert "retrain skipped" in flow_run_logs(stack, run.flow_run_id)
    experiment = client.get_experiment_by_name("post-train").experiment_id
    skips = client.search_runs([experiment], filter_string=f"tags.{SKIP_TAG} = 'true'")
    assert [skip.data.tags["prefect_flow_run_id"] for skip in skips] == [str(run.flow_run_id)]
    assert skips[0].data.tags["data_hash"] == champion.tags["data_hash"]

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with prefect_api(stack.api_url) as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.flow_run_id]))
        )
    assert [(a.key, a.type) for a in artifacts] == [(ARTIFACT_KEY, "markdown")]
    assert "Retrain skipped" in artifacts[0].data


def test_retrain_runs_post_train_when_the_data_changed(stack, lowlr_run):
    assert lowlr_run.returncode == 0
    client = MlflowClient(stack.mlflow_uri)
    champion = client.get_model_version_by_alias("post-train", "champion")
    real_hash = champion.tags["data_hash"]
    versions_before = len(model_versions(stack))
    client.set_model_version_tag("post-train", champion.version, "data_hash", "older-data")
    try:
        # Same config, data and code: every stage comes from the cache, so this costs seconds.
        run = deployment_run(stack, "retrain/scheduled", scale="smoke", overrides=stack.overrides())
    finally:
        client.set_model_version_tag("post-train", champion.version, "data_hash", real_hash)

    assert run.returncode == 0, run.output + stack.serve_log.read_text()[-5000:]
    assert "retraining: the data changed" in flow_run_logs(stack, run.flow_run_id)
    # The retrained model is the champion's own weights (every stage cached): it is not registered a second time.
    assert len(model_versions(stack)) == versions_before
    experiment = client.get_experiment_by_name("post-train").experiment_id
    (latest,) = client.search_runs(
        [experiment], filter_string="tags.stage = 'register'", order_by=["attributes.start_time DESC"], max_results=1
    )
    assert latest.data.params["already_registered"] == "True" and latest.data.params["version"] == str(champion.version)
    assert latest.data.tags["promotion_reason"].startswith(f"already registered as version {champion.version}")


def test_bad_parameters_fail_the_run_fast_with_the_config_error(stack):
    runs_dir = stack.workspace / "refused-runs"
    overrides = stack.overrides(runs_dir=str(runs_dir), **{"sft.learning_rate": -1e-4, "sft.lerning_rate": 1e-4})

    started = time.monotonic()
    run = deployment_run(stack, "post-train/lowlr", scale="smoke", overrides=overrides)

    assert run.returncode == 1 and "Flow run finished in state 'Failed'" in run.output, run.output
    assert time.monotonic() - started < 120
    state = flow_run_state(stack, run.flow_run_id)
    assert state.type.value == "FAILED"
    for message in (state.message, flow_run_logs(stack, run.flow_run_id)):
        assert "ConfigError" in message
        assert "sft.learning_rate: Input should be greater than 0" in message
        assert "sft.lerning_rate: Extra inputs are not permitted" in message
    assert not runs_dir.exists()
