"""What users see: the MLflow UI shows the registered champion, its alias and its win rate.

Starts `mlflow server` on a free port over a temporary SQLite store holding a registered model
version (alias `champion`, a `win_rate` tag and the model card `tasks.register` writes), then
opens the version's page in headless Chromium (Debian's `chromium`, installed here with apt-get
when missing). The MLflow UI is a React app, so the test reads the DOM after its JavaScript ran
(`--dump-dom`) and keeps a screenshot in test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import contextlib
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
from typing import Iterator

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


@contextlib.contextmanager
def serving_mlflow_ui(store_uri: str, directory: Path) -> Iterator[str]:
    """`mlflow server` over `store_uri` on a free port (its log in `directory`); yields its URL."""
    port = free_port()
    log_path = directory / "server.log"
    log = log_path.open("w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            store_uri,
            "--default-artifact-root",
            str(directory / "artifacts"),
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
                pytest.fail(f"mlflow server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker: the group this test started
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.fixture
def mlflow_server(store_with_a_champion: str, tmp_path: Path):
    with serving_mlflow_ui(store_with_a_champion, tmp_path) as url:
        yield url


def render(page: str, directory: Path, screenshot: str, height: int = 1000) -> str:
    """The DOM of `page` after its JavaScript ran, in headless Chromium, and its screenshot (1400 pixels wide,
    `height` high) kept as test-artifacts/`screenshot` (a PNG, checked)."""
    browser = chromium()

    def chrome(*arguments: str, profile: str) -> subprocess.CompletedProcess:
        window = f"--window-size=1400,{height}"
        return subprocess.run(
            [browser, *CHROMIUM_FLAGS, window, f"--user-data-dir={directory / profile}", *arguments, page],
            capture_output=True,
            text=True,
            timeout=180,
        )

    dom = chrome("--dump-dom", profile="profile-dom")
    assert dom.returncode == 0, dom.stderr[-3000:]
    ARTIFACTS.mkdir(exist_ok=True)
    shot_path = ARTIFACTS / screenshot
    shot_path.unlink(missing_ok=True)
    shot = chrome(f"--screenshot={shot_path}", profile="profile-shot")
    assert shot.returncode == 0, shot.stderr[-3000:]
    assert shot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return page_text(dom.stdout)


def test_the_registered_champion_is_shown_with_its_alias_and_win_rate(mlflow_server: str, tmp_path: Path):
    text = render(f"{mlflow_server}/#/models/post-train/versions/1", tmp_path, "mlflow-ui-champion.png")
    assert "Version 1" in text, text[:3000]
    assert re.search(r"Aliases \| : \| @ ?champion", text), text[:3000]
    assert "| win_rate | 0.6250 |" in text, text[:3000]
    assert "Promoted to" in text and "first version" in text  # the model card, rendered from markdown


# ------------------------------------------------------------------------- what the tracking store gives the UI


def dataset_inputs(run) -> dict[str, tuple[str, str, str]]:
    """A run's logged datasets: name → (digest, context, where it was read)."""
    import json

    found = {}
    for logged in run.inputs.dataset_inputs:
        source = json.loads(logged.dataset.source)
        context = {tag.key: tag.value for tag in logged.tags}["mlflow.data.context"]
        found[logged.dataset.name] = (logged.dataset.digest, context, source.get("uri") or source.get("path"))
    return found


def system_metric_keys(run) -> set[str]:
    return {key for key in run.data.metrics if key.startswith("system/")}


def test_the_experiment_opens_as_machine_learning_with_a_description(mlflow_store: str):
    from mlflow import MlflowClient

    from post_train.tracking import EXPERIMENT_KIND_TAG, experiment_id

    client = MlflowClient(mlflow_store)
    tags = client.get_experiment(experiment_id()).tags
    assert tags[EXPERIMENT_KIND_TAG] == "custom_model_development"  # not the UI's GenAI (traces) view
    assert "parent run" in tags["mlflow.note.content"] and "`stage`" in tags["mlflow.note.content"]
    # A store made before the tags existed gets them; a kind chosen in the UI stays.
    older = client.create_experiment("older")
    client.set_experiment_tag(older, EXPERIMENT_KIND_TAG, "finetuning")
    assert experiment_id("older") == older
    tags = client.get_experiment(older).tags
    assert tags[EXPERIMENT_KIND_TAG] == "finetuning" and "mlflow.note.content" in tags


def test_runs_are_named_by_recipe_scale_and_model_and_training_stages_log_system_metrics(
    mlflow_store: str, monkeypatch: pytest.MonkeyPatch
):
    from mlflow import MlflowClient

    from post_train.tracking import experiment_id, flow_run_name, model_short_name, stage_run

    assert model_short_name("Qwen/Qwen2.5-0.5B") == "Qwen2.5-0.5B" and model_short_name("/models/mine/") == "mine"
    assert flow_run_name("lowlr", "demo", model_short_name(None), "crimson-fox") == "lowlr-demo-tiny-llama-crimson-fox"
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # MLflow's default, 10 s, outlasts the test
    client = MlflowClient(mlflow_store)
    parent = client.create_run(experiment_id(), tags={"recipe": "lowlr", "scale": "smoke"}).info.run_id
    with stage_run("sft", parent, system_metrics=True) as trained:
        time.sleep(2)
    with stage_run("evaluate", parent) as evaluated:
        time.sleep(1)
    with stage_run("sft", None) as alone:
        pass
    trained, evaluated = client.get_run(trained.info.run_id), client.get_run(evaluated.info.run_id)
    assert trained.info.run_name == "sft · lowlr · smoke" and trained.data.tags["stage"] == "sft"
    assert evaluated.info.run_name == "evaluate · lowlr · smoke"
    assert client.get_run(alone.info.run_id).info.run_name == "sft"
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system_metric_keys(trained)
    assert len(client.get_metric_history(trained.info.run_id, "system/cpu_utilization_percentage")) >= 2
    assert system_metric_keys(evaluated) == set()


@pytest.mark.parametrize("panels, rows, columns", [(6, 2, 3), (7, 3, 3), (3, 2, 2)])
def test_training_curves_are_one_grid_readable_in_the_artifact_viewer(panels, rows, columns, mlflow_store: str):
    import mlflow
    from PIL import Image

    from post_train.tracking import CURVE_PANEL_PX, log_curves, stage_run

    keys = [f"metric_{index}" for index in range(panels)]
    history = [{"step": step, **{key: step * (index + 1) for index, key in enumerate(keys)}} for step in range(1, 11)]
    with stage_run("dpo", None) as run:
        log_curves(history, keys, "dpo_curves.png", "DPO")
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="dpo_curves.png")
    width, height = Image.open(path).size
    assert (width, height) == (columns * CURVE_PANEL_PX[0], rows * CURVE_PANEL_PX[1])
    assert CURVE_PANEL_PX[0] >= 400 and CURVE_PANEL_PX[1] >= 300
    assert 1 / 1.5 <= width / height <= 2  # not a strip: 6 panels used to be 2400×320
