"""Many processes and restarts: a 2-process CPU run (gloo) equals a 1-process run with the same
global batch; a run interrupted after a checkpoint resumes where it left off, also at another
number of processes; only rank 0 talks to MLflow.

`python -m tests.test_distributed <out_dir>` is the worker `accelerate launch` starts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from post_train.config import TrainConfig
from post_train.executors.local import stage_command
from post_train.modeling import pack_collate, pad_collate
from post_train.reference import reference_logps
from post_train.training import latest_checkpoint, make_accelerator, train
from tests.test_training import nll_step, tiny_model, uneven_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
# 32 rows in micro-batches of 2: 16 batches, 4 optimizer steps of 8 sequences, 1 epoch.
CONFIG = TrainConfig(
    learning_rate=1e-2, batch_size=8, micro_batch_size=2, max_steps=4, warmup_ratio=0.25, max_grad_norm=1.0, log_every=1
)
ROWS = 32
CHECKPOINT_EVERY = 2


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def curve(history: list[dict]) -> list[float]:
    """Step, loss and learning rate of every logged step, flattened for pytest.approx."""
    return [value for entry in history for value in (entry["step"], entry["loss"], entry["learning_rate"])]


def run_training(checkpoint_dir: Path | None = None, step_fn=nll_step, on_log=None):
    model = tiny_model()
    history = train(
        model,
        uneven_dataset(ROWS),
        pack_collate,
        step_fn,
        CONFIG,
        make_accelerator("no"),
        on_log=on_log,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=CHECKPOINT_EVERY if checkpoint_dir else 0,
    )
    return weights(model), history


def reference_rows(cache_dir: Path, accelerator=None) -> tuple[list[list[float]], bool]:
    """Reference log-probs of the training rows, in batches of 3 (11 batches: an uneven share per process)."""
    return reference_logps(
        lambda: tiny_model(seed=1),
        "reference-model",
        uneven_dataset(ROWS),
        pad_collate(0),
        3,
        cache_dir,
        torch.device("cpu"),
        accelerator,
    )


def worker(out_dir: Path) -> None:
    """One process of the distributed run: reference log-probs, training; rank 0 writes what it got."""
    accelerator = make_accelerator("no")
    rows, first_hit = reference_rows(out_dir / "cache", accelerator)
    _, second_hit = reference_rows(out_dir / "cache", accelerator)
    model = tiny_model()
    history = train(
        model,
        uneven_dataset(ROWS),
        pack_collate,
        nll_step,
        CONFIG,
        accelerator,
        checkpoint_dir=out_dir / "checkpoints",
        checkpoint_every=CHECKPOINT_EVERY,
    )
    if accelerator.is_main_process:
        torch.save(weights(accelerator.unwrap_model(model)), out_dir / "weights.pt")
        (out_dir / "run.json").write_text(
            json.dumps(
                {
                    "processes": accelerator.num_processes,
                    "curve": curve(history),
                    "reference": rows,
                    "reference_hits": [first_hit, second_hit],
                }
            )
        )


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """The worker on 2 CPU processes, through the same `accelerate launch` command the local backend uses."""
    out = tmp_path_factory.mktemp("two-processes")
    command = stage_command("tests.test_distributed", "unused", "unused", num_processes=2)
    command = command[: command.index("-m", 3)] + ["-m", "tests.test_distributed", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # gloo on the CPU, also on a machine with one GPU
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out


def test_two_cpu_processes_match_one_process_with_the_same_global_batch(two_processes: Path):
    run = json.loads((two_processes / "run.json").read_text())
    assert run["processes"] == 2  # really distributed: gloo on the CPU, not two independent runs
    single, single_history = run_training()
    assert run["curve"] == pytest.approx(curve(single_history), abs=1e-5)
    distributed = torch.load(two_processes / "weights.pt")
    for name, value in single.items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-4, atol=1e-5)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_wired_as_skypilot_wires_them_train_as_one(two_processes: Path, tmp_path: Path):
    """`python -m post_train.executors.skypilot node` on two 'nodes' of one CPU each, with SkyPilot's variables."""
    port = str(free_port())
    nodes = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "CUDA_VISIBLE_DEVICES": "",
            "STAGE_MODULE": "tests.test_distributed",
            "STAGE_INPUTS": str(tmp_path / "inputs.json"),
            "STAGE_OUTPUTS": str(tmp_path / "outputs.json"),
            "STAGE_DISTRIBUTED": "1",
            "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.1\n",
            "SKYPILOT_NODE_RANK": str(rank),
            "SKYPILOT_NUM_NODES": "2",
            "SKYPILOT_NUM_GPUS_PER_NODE": "1",
            "MAIN_PROCESS_PORT": port,
        }
        nodes.append(
            subprocess.Popen(
                [sys.executable, "-m", "post_train.executors.skypilot", "node"],
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert f"--num_machines 2 --machine_rank 1 --main_process_ip 127.0.0.1 --main_process_port {port}" in logs[1]
    run, local = (json.loads((path / "run.json").read_text()) for path in (tmp_path, two_processes))
    assert run["processes"] == 2 and run["curve"] == pytest.approx(local["curve"], abs=1e-6)


def test_reference_logprobs_are_shared_out_and_written_once(two_processes: Path, tmp_path: Path):
    run = json.loads((two_processes / "run.json").read_text())
    assert run["reference_hits"] == [False, True]
    assert len(list((two_processes / "cache" / "reference-logps").iterdir())) == 1  # one file, no leftovers
    single, hit = reference_rows(tmp_path)
    assert not hit and len(run["reference"]) == len(single) == ROWS
    for distributed, expected in zip(run["reference"], single):
        assert distributed == pytest.approx(expected, abs=1e-5)


def test_a_checkpoint_from_two_processes_resumes_on_one(two_processes: Path, tmp_path: Path):
    saved = latest_checkpoint(two_processes / "checkpoints")
    assert saved is not None and saved.name == f"step-{CHECKPOINT_EVERY}"
    shutil.copytree(two_processes / "checkpoints", tmp_path / "checkpoints")
    single, single_history = run_training()
    resumed, resumed_history = run_training(tmp_path / "checkpoints")
    assert curve(resumed_history) == pytest.approx(curve(single_history), abs=1e-5)
    for name, value in single.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-4, atol=1e-5)


def test_an_interrupted_run_resumes_from_the_saved_step(tmp_path: Path):
    uninterrupted, history = run_training()
    calls = []
    micro_batches_per_step = CONFIG.batch_size // CONFIG.micro_batch_size

    def crash_in_step_3(model, batch):
        calls.append(1)
        if len(calls) > 2 * micro_batches_per_step:
            raise RuntimeError("preempted")
        return nll_step(model, batch)

    with pytest.raises(RuntimeError, match="preempted"):
        run_training(tmp_path, crash_in_step_3)
    assert latest_checkpoint(tmp_path).name == "step-2"
    logged = []
    resumed, resumed_history = run_training(tmp_path, on_log=lambda metrics, step: logged.append(step))
    assert logged == [1, 2, 3, 4]  # the saved curve is logged again, then the new steps
    assert curve(resumed_history) == pytest.approx(curve(history), abs=1e-6)
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6)


def test_only_rank_zero_opens_an_mlflow_run(monkeypatch: pytest.MonkeyPatch, mlflow_store: str):
    import mlflow

    from post_train.tracking import stage_run

    monkeypatch.setenv("RANK", "1")
    with stage_run("sft", None, {"sft": {"learning_rate": 1.0}}) as run:
        assert run.info.run_id == "" and mlflow.active_run() is None
    monkeypatch.setenv("RANK", "0")
    with stage_run("sft", None) as run:
        assert mlflow.active_run().info.run_id == run.info.run_id
    assert len(mlflow.search_runs(search_all_experiments=True)) == 1


if (
    __name__ == "__main__"
):  # `python -m tests.test_distributed OUT_DIR`, or as a stage: `--inputs IN --outputs OUT_DIR/x`
    worker(Path(sys.argv[sys.argv.index("--outputs") + 1]).parent if "--outputs" in sys.argv else Path(sys.argv[1]))
