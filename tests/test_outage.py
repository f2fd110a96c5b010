"""A tracking-server outage in the middle of a stage loses no run, metric or artifact: MLflow's client retries each
request (7 times, backoff factor 2 by default: about 4 minutes of outage; factor 1 here to keep the test short) and
the stage's calls wait for the server instead of failing. A real `mlflow server`, stopped and started again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from tests.test_distributed import free_port

OUTAGE_S = 5.0


def start_server(store: Path, artifacts: Path, port: int, log: Path) -> subprocess.Popen:
    """`mlflow server` proxying artifacts (clients upload them over HTTP too), healthy on return."""
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store}"]
        + ["--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.3)
    stop_server(server)
    raise AssertionError(f"mlflow server did not start:\n{log.read_text()[-3000:]}")


def stop_server(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers: the group this test started
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    except ProcessLookupError:
        pass


def test_a_tracking_server_outage_mid_stage_loses_nothing(tmp_path: Path, monkeypatch):
    from post_train.tracking import stage_run

    port, log = free_port(), tmp_path / "server.log"
    store, artifacts = tmp_path / "mlflow.db", tmp_path / "artifacts"
    servers = [start_server(store, artifacts, port, log)]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

    def come_back() -> None:
        time.sleep(OUTAGE_S)
        servers.append(start_server(store, artifacts, port, log))

    try:
        with stage_run("sft", None, {"sft": {"learning_rate": 1e-3}}) as run:
            mlflow.log_metric("loss", 1.0, step=1)
            stop_server(servers[0])  # nothing answers on the port now
            returning = threading.Thread(target=come_back)
            returning.start()
            down = time.monotonic()
            for step in range(2, 6):
                mlflow.log_metric("loss", 1.0 / step, step=step)
            mlflow.log_text("written during the outage", "notes.txt")
            waited = time.monotonic() - down
        returning.join()
        assert waited >= OUTAGE_S  # the calls waited for the server rather than being dropped
        client = MlflowClient(f"http://127.0.0.1:{port}")
        finished = client.get_run(run.info.run_id)
        assert finished.info.status == "FINISHED" and finished.data.params["sft.learning_rate"] == "0.001"
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
        assert history == [(step, 1.0 / step) for step in range(1, 6)]
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="notes.txt")
        assert Path(local).read_text() == "written during the outage"
    finally:
        for server in servers:
            stop_server(server)
