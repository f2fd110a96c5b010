"""Starting a run from the shell without `PREFECT_API_URL`: the temporary API server gets minutes, not Prefect's 20 s,
to answer on a loaded machine; one that does not answer in time is a one-line error that says what to do; one that
does answer holds the whole run, its last log lines included, and is stopped with the command."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from post_train import cli, server
from post_train.executors import warm
from post_train.server import DEFAULT_API_URL, EPHEMERAL_TIMEOUT_ENV, ephemeral_startup_timeout, is_healthy
from tests.conftest import make_dvc_repo

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "post-train")


def test_the_temporary_server_gets_minutes_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(EPHEMERAL_TIMEOUT_ENV, raising=False)
    assert ephemeral_startup_timeout() == 180
    monkeypatch.setenv(EPHEMERAL_TIMEOUT_ENV, "600")
    assert ephemeral_startup_timeout() == 600


def test_a_temporary_server_that_does_not_answer_in_time_is_one_line_saying_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    if is_healthy(DEFAULT_API_URL):
        pytest.skip(f"a Prefect server answers at {DEFAULT_API_URL}: the run would use it")
    # A server that never answers: the real one may well answer before the command asks (it imports meanwhile).
    never_answers = [sys.executable, "-c", "import time; time.sleep(600)"]
    monkeypatch.setattr(server, "temporary_server_command", lambda port: never_answers)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv(EPHEMERAL_TIMEOUT_ENV, "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    arguments = ["run", "--scale", "smoke", "-o", f"runs_dir={tmp_path / 'runs'}", "-o", f"data.dvc_root={REPO}"]
    try:
        assert cli.main(arguments) == 1
    finally:
        warm.server(dict(os.environ), Path.cwd()).close()  # the stage server the run started, sent nothing
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("post-train: Prefect's temporary API server did not answer within 1 s; give it longer")
    assert f"{EPHEMERAL_TIMEOUT_ENV}=600" in last and "prefect server start" in last
    assert f"PREFECT_API_URL={DEFAULT_API_URL}" in last
    assert not (tmp_path / "runs").exists()  # no work started


def smoke_run_from_the_shell(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """`post-train run --scale smoke` and its environment: no configured Prefect API, so a temporary server, and a
    Prefect home, MLflow store, DVC repository, cache and runs directory of its own under `tmp_path`."""
    if is_healthy(DEFAULT_API_URL):
        pytest.skip(f"a Prefect server answers at {DEFAULT_API_URL}: the run would use it")
    env = {name: value for name, value in os.environ.items() if not name.startswith(("PREFECT_API", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    command = [CLI, "run", "--scale", "smoke"]
    repo = make_dvc_repo(tmp_path / "repo")
    for override in (f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}", f"data.dvc_root={repo}"):
        command += ["-o", override]
    return command, env


def test_a_run_from_the_shell_reports_everything_to_its_temporary_server_then_stops_it(tmp_path: Path):
    """The server starts with the command, gets every log line before it stops (Prefect's log worker would
    otherwise retry against a stopped server for a minute at exit), and is gone when the command returns."""
    command, env = smoke_run_from_the_shell(tmp_path)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Error logging to API" not in output and "Failed to send telemetry" not in output
    url = re.search(r"Starting a temporary Prefect server on (http://127\.0\.0\.1:\d+/api)", output).group(1)
    assert not is_healthy(url)
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as database:
        assert database.execute("select state_type from flow_run").fetchall() == [("COMPLETED",)]
        messages = [message for (message,) in database.execute("select message from log")]
    assert any(message.startswith("sft: finished, MLflow run") for message in messages)  # a task run's log
    assert any(message.startswith("summary:") for message in messages)  # the flow's last lines
    assert messages.count("Finished in state Completed()") >= 2  # the task runs' and the flow run's


def running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_terminated_run_ends_its_runs_and_stops_the_servers_it_started(tmp_path: Path):
    """`kill`, `timeout` or a scheduler end the command as an exit does: the flow run is marked crashed, the
    interrupted stage's MLflow run killed, and neither the temporary Prefect server nor the warm stage server
    (each in a session of its own) outlives the command."""
    command, env = smoke_run_from_the_shell(tmp_path)
    log = tmp_path / "output.txt"  # a file, not a pipe: a server left running would hold a pipe open
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "pretrain step 1/" not in log.read_text():  # the first stage trains: its MLflow run is open
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        started = {child: " ".join(child.cmdline()) for child in psutil.Process(process.pid).children(recursive=True)}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    finally:
        process.kill()
    text = log.read_text()
    url = re.search(r"Starting a temporary Prefect server on (http://127\.0\.0\.1:\d+/api)", text).group(1)
    assert not is_healthy(url)
    for server_module in ("prefect.server.api.server", "post_train.executors.warm"):
        assert any(server_module in line for line in started.values()), started
    # The warm server exits once the command it forked has: moments after the command that started it.
    _, outliving = psutil.wait_procs(list(started), timeout=10)
    assert [started[child] for child in outliving if running(child)] == []
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as database:
        assert database.execute("select state_type from flow_run").fetchall() == [("CRASHED",)]
    with sqlite3.connect(tmp_path / "mlflow.db") as database:
        statuses = dict(database.execute("select name, status from runs").fetchall())
    assert statuses == {
        next(name for name in statuses if "pretrain" not in name): "FAILED",
        "pretrain · lowlr · smoke": "KILLED",
    }


@pytest.mark.parametrize(
    ("arguments", "status", "expected"),
    [
        (["recipes"], 0, "scales:  demo, smoke"),  # printed into a pipe: flushed before the exit
        (["nonsense"], 2, "invalid choice: 'nonsense'"),  # argparse's SystemExit
        (["validate", "--scale", "smoke", "--debug", "-o", "sft.learning_rate=abc"], 1, "Traceback"),  # uncaught
    ],
)
def test_the_command_keeps_its_exit_status_and_output_when_it_skips_the_teardown(arguments, status, expected):
    result = subprocess.run([CLI, *arguments], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == status, result.stderr[-2000:]
    assert expected in result.stdout + result.stderr
