"""What Prefect shows of the work: each stage's output and what happened to it in the task run's logs (the stage run
as a child process), the flow run's artifacts (win rates, links to MLflow), and the UI of a server started here
calling that server's own port. Real Prefect: the test API of `prefect_server`, a `prefect server start` process."""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from post_train.executors import skypilot
from post_train.executors.local import OutputLines, run_command
from tests.conftest import smoke_overrides
from tests.test_cloud import REMOTE_URI, sky_config

TQDM_LIKE = """
import sys
print("starting", flush=True)
for step in range(1, 26):
    sys.stderr.write(f"\\rtrain: {4 * step:3d}%|{'#' * step}| {step}/25")
    sys.stderr.flush()
sys.stderr.write("\\n")
print("loss 50% lower")
sys.exit(3)
"""


def test_a_progress_bar_reaches_the_log_thinned_and_its_final_state_whole():
    lines = OutputLines(progress_every=3)
    got = lines.feed("one\r\ntw") + lines.feed("o\n\rbar 1\rbar 2\rbar 3\rbar 4\rbar 5   \n\n")
    got += lines.feed("tail without end")
    assert got == ["one", "two", "bar 3", "bar 5"]  # the 3rd redraw of the bar, its final state, no blank line
    assert lines.close() == ["tail without end"]
    split_crlf = OutputLines()
    assert split_crlf.feed("line\r") == [] and split_crlf.feed("\nnext\n") == ["line", "next"]  # `\r` + `\n` apart


def test_a_command_streams_its_lines_to_the_callback_and_still_echoes_them(capsys):
    lines: list[str] = []
    status = run_command([sys.executable, "-c", TQDM_LIKE], on_line=lines.append, progress_every=10)
    assert status == 3
    bar = [line for line in lines if line.startswith("train:")]
    assert [line for line in lines if line not in bar] == ["starting", "loss 50% lower"]  # stdout; stderr interleaves
    assert bar == [
        "train:  40%|##########| 10/25",
        "train:  80%|####################| 20/25",
        f"train: 100%|{'#' * 25}| 25/25",
    ]
    echoed = capsys.readouterr()
    assert "starting\n" in echoed.out and "loss 50% lower" in echoed.out
    assert echoed.err.count("\rtrain:") == 25  # the terminal still sees every redraw


def test_a_skypilot_job_log_is_forwarded_line_by_line(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", REMOTE_URI)
    config = sky_config(tmp_path)
    sky = Path(config.compute.sky_bin)
    sky.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "verb = sys.argv[2]\n"
        "if verb == 'logs':\n"
        "    print('(task, pid=7) sft: 100%|#####| 8/8', flush=True)\n"
        "    print('(task, pid=7) done')\n"
        "elif verb == 'queue':\n"
        "    print(json.dumps([{'job_id': 1, 'job_name': 'post-train-sft-0', 'status': 'SUCCEEDED'}]))\n"
    )
    sky.chmod(0o755)
    lines: list[str] = []
    status, description = skypilot.run_managed_job(
        config,
        "tasks.sft",
        tmp_path / "in.json",
        tmp_path / "out.json",
        "post-train-sft-0",
        False,
        on_line=lines.append,
    )
    assert (status, description) == (0, "SkyPilot managed job post-train-sft-0 (id 1, SUCCEEDED)")
    assert lines == ["(task, pid=7) sft: 100%|#####| 8/8", "(task, pid=7) done"]


def _logs(client, task_run_id) -> list:
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    return client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])), limit=200)


def _task_runs(client, flow_run_id) -> dict[str, object]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run for run in runs}  # task run names are `<task>-<suffix>`


def _artifacts(client, flow_run_id) -> dict[str, object]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    )
    return {artifact.key: artifact for artifact in found}


def test_the_flows_show_stage_output_cache_hits_and_artifacts_in_prefect(prefect_server, workspace, mlflow_store):
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker

    from flows.compare import RESULTS_ARTIFACT, compare
    from flows.pipeline import MLFLOW_RUN_ARTIFACT, MODEL_VERSION_ARTIFACT, WIN_RATES_ARTIFACT, post_train
    from flows.stages import STAGE_OUTPUT_LOGGER
    from post_train.config import load_config

    overrides = smoke_overrides(workspace)
    state = post_train(recipe="lowlr", scale="smoke", overrides=overrides, return_state=True)
    summary = state.result()
    mlflow = MlflowClient(mlflow_store)
    experiment = mlflow.get_run(summary["mlflow_run_id"]).info.experiment_id
    stage_runs = {
        run.data.tags["stage"]: run.info.run_id
        for run in mlflow.search_runs([experiment], f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")
    }
    # The one cell of the flow's own recipe: every stage of it comes from the cache.
    config = load_config("lowlr", "smoke", overrides)
    grid = {"objectives": [config.sft.objective], "learning_rates": [config.sft.learning_rate], "seeds": [0]}
    compared = compare(recipe="lowlr", scale="smoke", overrides=overrides, **grid, return_state=True)
    result = compared.result()
    APILogWorker.drain_all()

    ui = "http://127.0.0.1:5000/#"
    with get_client(sync_client=True) as client:
        # SFT ran as `python -m tasks.sft`: its progress bar (stderr) reached the task run's logs from the child.
        sft_logs = _logs(client, _task_runs(client, state.state_details.flow_run_id)["sft"].id)
        output = [log.message for log in sft_logs if log.name == STAGE_OUTPUT_LOGGER]
        assert any(re.search(r"100%\|.*\| 8/8", line) for line in output), output
        logged_steps = [line for line in output if re.match(r"sft \(nll\) step \d+/8: .*loss=", line)]
        assert len(logged_steps) >= 4 and any("learning_rate=" in line for line in logged_steps), output
        said = [log.message for log in sft_logs if log.name != STAGE_OUTPUT_LOGGER]
        assert any(line.startswith("sft: no cached result for key") for line in said), said
        assert any(re.match(r"sft: `.*-m tasks\.sft .*`.* exited with status 0 after \d+ s", line) for line in said)
        link = f"MLflow run {ui}/experiments/{experiment}/runs/{stage_runs['sft']}"
        assert f"sft: finished, {link}" in said
        assert any(line.startswith("sft metrics: ") and "loss_final=" in line for line in said)
        assert not set(output) & set(said)  # each output line once, from the stage output logger

        # compare's SFT came from the cache: the hit and both MLflow runs are in its task run's logs.
        cached = [
            log.message for log in _logs(client, _task_runs(client, compared.state_details.flow_run_id)["sft"].id)
        ]
        (hit,) = [line for line in cached if line.startswith("sft: cache hit (key ")]
        assert f"made by {link}; recorded under this flow run as MLflow run {ui}/experiments/{experiment}/runs/" in hit

        artifacts = _artifacts(client, state.state_details.flow_run_id)
        compare_artifacts = _artifacts(client, compared.state_details.flow_run_id)
    assert set(artifacts) == {WIN_RATES_ARTIFACT, MLFLOW_RUN_ARTIFACT, MODEL_VERSION_ARTIFACT}
    assert artifacts[WIN_RATES_ARTIFACT].type == "table"
    table = json.loads(artifacts[WIN_RATES_ARTIFACT].data)
    assert [(row["against"], row["split"]) for row in table] == [
        ("reference", "held_out"),
        ("reference", "in_distribution"),
        ("reference", "all"),
    ]
    for row in table:
        assert row["win rate %"] == round(100 * summary["evaluation"][f"win_rate/{row['split']}"], 1)
        assert row["95% CI low %"] <= row["win rate %"] <= row["95% CI high %"]
    run_url = f"{ui}/experiments/{experiment}/runs/{summary['mlflow_run_id']}"
    assert run_url in artifacts[MLFLOW_RUN_ARTIFACT].data
    assert f"{ui}/models/post-train/versions/{summary['model_version']}" in artifacts[MODEL_VERSION_ARTIFACT].data

    assert set(compare_artifacts) == {RESULTS_ARTIFACT}
    report = compare_artifacts[RESULTS_ARTIFACT].data
    assert result["markdown"] in report and f"{ui}/experiments/{experiment}/runs/{result['mlflow_run_id']})" in report


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_server_started_here_serves_a_ui_that_calls_its_own_port(tmp_path: Path, monkeypatch):
    from post_train.server import start_server, stop_server, wait_until_healthy

    monkeypatch.setenv("PREFECT_UI_API_URL", "http://127.0.0.1:4200/api")  # an export made for another server
    port = free_port()
    with open(tmp_path / "server.log", "wb") as log:
        server = start_server(port=port, prefect_home=tmp_path / "prefect", log=log)
        try:
            wait_until_healthy(f"http://127.0.0.1:{port}/api", server)
            settings = httpx.get(f"http://127.0.0.1:{port}/ui-settings", timeout=10).json()
        finally:
            stop_server(server)
    assert settings["api_url"] == f"http://127.0.0.1:{port}/api"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "http://127.0.0.1:8123/api"),
        ("0.0.0.0", "http://127.0.0.1:8123/api"),
        ("::1", "http://[::1]:8123/api"),
    ],
)
def test_the_ui_api_url_names_the_servers_own_port(host: str, expected: str):
    from post_train.server import server_environment

    env = server_environment(host, 8123, environ={"PREFECT_API_URL": "http://elsewhere/api", "PREFECT_UI_API_URL": "x"})
    assert env["PREFECT_SERVER_UI_API_URL"] == expected
    assert "PREFECT_API_URL" not in env and "PREFECT_UI_API_URL" not in env
