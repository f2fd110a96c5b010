"""How much of `make demo`'s wall time is not training or generation: `python -m benchmarks.demo_overhead`.

Runs `post-train run --recipe lowlr --scale demo` once, with a fresh stage cache, runs directory
and MLflow store (the DVC data of the working tree is reused when it is up to date, as `make
demo` does), then reads the stage runs back from MLflow:
- a training stage's loop time (pretrain, sft, dpo) comes from the timestamps of its logged
  `loss`: last minus first logged step, plus one average step for the steps before the first log;
- the evaluate and head-to-head stages count whole (generation, judging, diagnostics);
- everything else is overhead: process start-ups and imports, Prefect's temporary server, DVC,
  data and model loading, reference log-probs, saving, plots and MLflow calls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from post_train.provenance import cpu_model, git_commit

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAINING_STAGES = ("pretrain", "sft", "dpo", "joint")
GENERATION_STAGES = ("evaluate", "head-to-head")


def loop_seconds(steps: list[int], timestamps_ms: list[int]) -> float | None:
    """Training-loop time from (step, timestamp) of the logged steps; None with fewer than two."""
    if len(steps) < 2:
        return None
    per_step = (timestamps_ms[-1] - timestamps_ms[0]) / (steps[-1] - steps[0])
    return (timestamps_ms[-1] - timestamps_ms[0] + per_step * steps[0]) / 1000


def stage_times(tracking_uri: str) -> list[dict[str, Any]]:
    """Each stage run of the store's only flow run: its duration and the part of it spent computing."""
    from mlflow import MlflowClient

    from post_train.tracking import EXPERIMENT

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    stages = []
    for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]):
        stage = run.data.tags.get("stage")
        if stage is None:
            continue
        duration = (run.info.end_time - run.info.start_time) / 1000
        compute = None
        if stage in TRAINING_STAGES:
            history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda metric: metric.step)
            compute = loop_seconds([m.step for m in history], [m.timestamp for m in history])
        if stage in GENERATION_STAGES:
            compute = duration
        stages.append(
            {
                "stage": stage,
                "run_seconds": duration,
                "compute_seconds": compute,
                "cache_hit": run.data.tags.get("cache_hit") == "true",
            }
        )
    return stages


def measure(recipe: str, scale: str, work: Path, dvc_root: Path) -> dict[str, Any]:
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    command = [
        str(Path(sys.executable).parent / "post-train"),
        "run",
        "--recipe",
        recipe,
        "--scale",
        scale,
        "-o",
        f"cache_dir={work / 'cache'}",
        "-o",
        f"runs_dir={work / 'runs'}",
        "-o",
        f"data.dvc_root={dvc_root}",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    stages = stage_times(uri)
    compute = sum(stage["compute_seconds"] or 0.0 for stage in stages)
    in_runs = sum(stage["run_seconds"] for stage in stages)
    return {
        "recipe": recipe,
        "scale": scale,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "post_train_commit": git_commit(REPO_ROOT, short=True, mark_dirty=True),
        "wall_seconds": wall,
        "stage_run_seconds": in_runs,
        "compute_seconds": compute,
        "outside_stage_runs_seconds": wall - in_runs,
        "outside_compute_seconds": wall - compute,
        "outside_compute_share": (wall - compute) / wall,
        "stages": stages,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# `post-train run --recipe {result['recipe']} --scale {result['scale']}`: "
        "time outside training and generation",
        "",
        f"{result['date']} on {result['cpu']} ({result['cpu_count']} cores, load average {result['load_average']:.2f} "
        f"at the end), post-train {result['post_train_commit']}, fresh stage cache and MLflow store.",
        "",
        "| stage | stage run s | training / generation s |",
        "|---|---:|---:|",
    ]
    for stage in result["stages"]:
        compute = "–" if stage["compute_seconds"] is None else f"{stage['compute_seconds']:.1f}"
        lines.append(
            f"| {stage['stage']}{' (cached)' if stage['cache_hit'] else ''} | {stage['run_seconds']:.1f} | {compute} |"
        )
    lines += [
        f"| **all stages** | {result['stage_run_seconds']:.1f} | {result['compute_seconds']:.1f} |",
        "",
        f"Wall time {result['wall_seconds']:.1f} s: {result['compute_seconds']:.1f} s training and generation, "
        f"**{result['outside_compute_seconds']:.1f} s ({result['outside_compute_share']:.0%}) outside them**, of which "
        f"{result['outside_stage_runs_seconds']:.1f} s outside any stage's MLflow run (process start-ups, imports, "
        "Prefect, DVC, data and model loading, reference log-probs).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="lowlr")
    parser.add_argument("--scale", default="demo")
    parser.add_argument(
        "--dvc-root", type=Path, default=REPO_ROOT, help="the DVC repository of the data (as make demo)"
    )
    parser.add_argument("--name", help="result file name (default: demo-<scale>)")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="post-train-demo-bench-") as work:
        result = measure(args.recipe, args.scale, Path(work), args.dvc_root.resolve())
    name = args.name or f"demo-{args.scale}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out_dir / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
