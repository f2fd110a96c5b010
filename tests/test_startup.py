"""Starting a run from the shell without `PREFECT_API_URL`: Prefect's temporary API server gets minutes, not Prefect's
20 s, to answer on a loaded machine; one that does not answer in time is a one-line error that says what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from post_train.server import DEFAULT_API_URL, EPHEMERAL_TIMEOUT_ENV, ephemeral_startup_timeout, is_healthy


def test_the_temporary_server_gets_minutes_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(EPHEMERAL_TIMEOUT_ENV, raising=False)
    assert ephemeral_startup_timeout() == 180
    monkeypatch.setenv(EPHEMERAL_TIMEOUT_ENV, "600")
    assert ephemeral_startup_timeout() == 600


def test_a_temporary_server_that_does_not_answer_in_time_is_one_line_saying_what_to_do(tmp_path: Path):
    if is_healthy(DEFAULT_API_URL):
        pytest.skip(f"a Prefect server answers at {DEFAULT_API_URL}: the run would use it")
    env = {name: value for name, value in os.environ.items() if name != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect"), EPHEMERAL_TIMEOUT_ENV: "1"})
    command = [sys.executable, "-m", "post_train.cli", "run", "--scale", "smoke", "-o", f"runs_dir={tmp_path / 'runs'}"]
    command += ["-o", f"data.dvc_root={Path(__file__).resolve().parents[1]}"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("post-train: Prefect's temporary API server did not answer within 1 s; give it longer")
    assert f"{EPHEMERAL_TIMEOUT_ENV}=600" in last and "prefect server start" in last
    assert f"PREFECT_API_URL={DEFAULT_API_URL}" in last
    assert not (tmp_path / "runs").exists()  # no work started
