"""What users see: the MLflow UI shows the registered champion, its alias and its win rate.

Starts `mlflow server` on a free port over a temporary SQLite store holding a registered model
version (alias `champion`, a `win_rate` tag and the model card `tasks.register` writes), then
opens the version's page in headless Chromium (Debian's `chromium`, installed here with apt-get
when missing). The MLflow UI is a React app, so the test reads the DOM after its JavaScript ran
(`--dump-dom`) and keeps a screenshot in test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
    "--virtual-time-budget=15000",
]


def chromium() -> str:
    """The Chromium binary, installed with apt-get (Debian's `chromium`) when it is missing."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("chromium is not installed, and installing it needs apt-get as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    policy = subprocess.run(["apt-cache", "policy", "chromium"], capture_output=True, text=True, env=env)
    attempts = [install] if re.search(r"Candidate: (?!\(none\))", policy.stdout) else []
    attempts += [["apt-get", "update"], install]  # no candidate yet, or a stale package list
    output = ""
    for command in attempts:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        output = result.stdout[-1500:] + result.stderr[-1500:]
        if command is install and result.returncode == 0 and shutil.which("chromium"):
            return shutil.which("chromium")
    pytest.skip(f"chromium is not installed and `apt-get install chromium` failed (no network?):\n{output}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def page_text(dom: str) -> str:
    """The visible text of a DOM dump, cells separated by ` | `."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", " | ", dom)).replace("\xa0", " ")
    return re.sub(r"(\s*\|\s*)+", " | ", text)


@pytest.fixture
def store_with_a_champion(tmp_path: Path) -> str:
    """A SQLite store with `post-train` version 1: alias champion, a win-rate tag and a model card."""
    from mlflow import MlflowClient

    from post_train.config import load_config
    from tasks.register import model_card

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    client = MlflowClient(uri)
    client.create_registered_model("post-train", description="Models post-trained by the post-train pipeline.")
    config = load_config("lowlr", "smoke")
    metrics = {
        "win_rate/all": 0.625,
        "win_rate_se/all": 0.06,
        "win_rate_ci_low/all": 0.51,
        "win_rate_ci_high/all": 0.74,
        "win_rate_discrete/all": 0.625,
        "lc_win_rate/all": 0.6,
        "avg_length/all": 40.0,
        "reference_avg_length/all": 38.0,
        "num_prompts/all": 64.0,
    }
    card = model_card(
        config,
        "52f8effb7be13df9d171b11f6aa6c3a9.dir",
        "0" * 40,
        0.625,
        metrics,
        None,
        None,
        True,
        "first version: no champion yet",
        [],
    )
    version = client.create_model_version(
        "post-train",
        source=str(model),
        description=card,
        tags={"win_rate": "0.6250", "lc_win_rate": "0.6000", "recipe": "lowlr", "promoted": "true"},
    )
    client.set_registered_model_alias("post-train", "champion", version.version)
    return uri


@pytest.fixture
def mlflow_server(store_with_a_champion: str, tmp_path: Path):
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            store_with_a_champion,
            "--default-artifact-root",
            str(tmp_path / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker: the group this test started
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def test_the_registered_champion_is_shown_with_its_alias_and_win_rate(mlflow_server: str, tmp_path: Path):
    browser = chromium()
    page = f"{mlflow_server}/#/models/post-train/versions/1"

    def chrome(*arguments: str, profile: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / profile}", *arguments, page],
            capture_output=True,
            text=True,
            timeout=180,
        )

    dom = chrome("--dump-dom", profile="profile-dom")
    assert dom.returncode == 0, dom.stderr[-3000:]
    text = page_text(dom.stdout)
    assert "Version 1" in text, text[:3000]
    assert re.search(r"Aliases \| : \| @ ?champion", text), text[:3000]
    assert "| win_rate | 0.6250 |" in text, text[:3000]
    assert "Promoted to" in text and "first version" in text  # the model card, rendered from markdown

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "mlflow-ui-champion.png"
    screenshot.unlink(missing_ok=True)
    shot = chrome(f"--screenshot={screenshot}", profile="profile-shot")
    assert shot.returncode == 0, shot.stderr[-3000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
