"""How much of `make demo`'s wall time is not training or generation: `python -m benchmarks.demo_overhead`.

Runs `post-train run --recipe lowlr --scale demo` once (or alternately in two variants: two values of a config
key, `--ab`, or two commits, `--commits`, each from a git worktree of its own), with a fresh stage cache and runs
directory (the DVC data of the working tree is reused when it is up to date, as `make demo` does), then reads
the stage runs back from MLflow. `--services fresh` (the default, a first `make demo`): each run gets a new MLflow
store and starts Prefect's temporary server; `--services running` (a user's later runs): one MLflow store made
before the first run and one `prefect server start` serve them all, each run registering a model of its own name.

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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from benchmarks.report import spread
from post_train.provenance import cpu_model, git_commit
from post_train.server import free_port, local_server

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAINING_STAGES = ("pretrain", "sft", "dpo", "joint")
GENERATION_STAGES = ("evaluate", "head-to-head")
LAUNCH = "from post_train.launch import main; main()"
"""The `post-train` console script's body: run as `python -c` in a source tree, it runs that tree's code."""


def loop_seconds(steps: list[int], timestamps_ms: list[int]) -> float | None:
    """Training-loop time from (step, timestamp) of the logged steps; None with fewer than two."""
    if len(steps) < 2:
        return None
    per_step = (timestamps_ms[-1] - timestamps_ms[0]) / (steps[-1] - steps[0])
    return (timestamps_ms[-1] - timestamps_ms[0] + per_step * steps[0]) / 1000


def stage_times(tracking_uri: str, since_ms: int = 0) -> list[dict[str, Any]]:
    """Each stage run started at or after `since_ms` (epoch milliseconds: one flow run's): its duration and the part
    of it spent computing."""
    from mlflow import MlflowClient

    from post_train.tracking import EXPERIMENT

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    stages = []
    runs = client.search_runs(
        [experiment.experiment_id], f"attributes.start_time >= {since_ms}", order_by=["attributes.start_time ASC"]
    )
    for run in runs:
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


def measure(
    recipe: str,
    scale: str,
    work: Path,
    dvc_root: Path,
    overrides: list[str],
    tree: Path,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """One run of the command from the source tree `tree` (its stages and warm server import that tree's code),
    tracked in `tracking_uri`, else in a new store under `work`."""
    uri = tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    command = [
        sys.executable,
        "-c",
        LAUNCH,
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
    for override in overrides:
        command += ["-o", override]
    if tracking_uri is not None:  # a shared store: a registered model of its own, so no run meets a champion
        command += ["-o", f"registry.model_name={work.name}"]
    load = os.getloadavg()[0]
    since_ms = time.time_ns() // 1_000_000
    started = time.perf_counter()
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    stages = stage_times(uri, since_ms)
    compute = sum(stage["compute_seconds"] or 0.0 for stage in stages)
    in_runs = sum(stage["run_seconds"] for stage in stages)
    return {
        "overrides": overrides,
        "load_average_at_start": load,
        "wall_seconds": wall,
        "stage_run_seconds": in_runs,
        "compute_seconds": compute,
        "outside_stage_runs_seconds": wall - in_runs,
        "outside_compute_seconds": wall - compute,
        "outside_compute_share": (wall - compute) / wall,
        "stages": stages,
    }


SUMMARISED = ("wall_seconds", "compute_seconds", "outside_compute_seconds", "outside_compute_share")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max of each of `SUMMARISED` and of each stage's run and compute seconds."""
    summary = {metric: spread([run[metric] for run in runs]) for metric in SUMMARISED}
    summary["stages"] = {}
    for stage in [stage["stage"] for stage in runs[0]["stages"]]:
        rows = [next(row for row in run["stages"] if row["stage"] == stage) for run in runs]
        summary["stages"][stage] = {
            "run_seconds": spread([row["run_seconds"] for row in rows]),
            "compute_seconds": spread([row["compute_seconds"] for row in rows if row["compute_seconds"] is not None]),
        }
    return summary


def _cell(stats: dict[str, float] | None, form: str = "{:.1f}") -> str:
    if stats is None:
        return "–"
    if stats["n"] == 1:
        return form.format(stats["median"])
    return f"{form.format(stats['median'])} ({form.format(stats['min'])}–{form.format(stats['max'])})"


SERVICES = {
    "fresh": " and MLflow store, starting Prefect's temporary server",
    "running": ", sharing one MLflow store (made before the first) and one Prefect server (`prefect server start`)",
}
"""`--services`: what the runs find, as the result's header says it after "each with a fresh stage cache"."""


def markdown(result: dict[str, Any]) -> str:
    variants = result["variants"]
    runs = sum(len(variant["runs"]) for variant in variants)
    lines = [
        f"# `post-train run --recipe {result['recipe']} --scale {result['scale']}`: "
        "time outside training and generation",
        "",
        f"{result['date']} on {result['cpu']} ({result['cpu_count']} cores), post-train {result['post_train_commit']}; "
        f"{runs} run{'s' if runs != 1 else ''}, each with a fresh stage cache"
        + SERVICES[result.get("services", "fresh")]
        + (", the variants alternating (the order reversed on every other repetition)" if len(variants) > 1 else "")
        + f"; load average {min(result['load_averages']):.2f}–{max(result['load_averages']):.2f} at their starts. "
        "Medians (min–max), seconds.",
        "",
        "| variant | wall | training + generation | outside them | share outside |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant in variants:
        summary = variant["summary"]
        lines.append(
            f"| {variant['label']} | {_cell(summary['wall_seconds'])} | {_cell(summary['compute_seconds'])} | "
            f"**{_cell(summary['outside_compute_seconds'])}** | {_cell(summary['outside_compute_share'], '{:.0%}')} |"
        )
    lines += ["", "Per stage, its MLflow run / the training or generation inside it:", ""]
    lines += ["| stage | " + " | ".join(variant["label"] for variant in variants) + " |"]
    lines += ["|---|" + "---:|" * len(variants)]
    for stage in variants[0]["summary"]["stages"]:
        cells = []
        for variant in variants:
            times = variant["summary"]["stages"][stage]
            cells.append(f"{_cell(times['run_seconds'])} / {_cell(times['compute_seconds'])}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Outside training and generation: process start-ups and imports, Prefect's server (the temporary one when "
        "none runs), DVC, data and model loading, reference log-probs, saving, plots and MLflow calls.",
        "",
    ]
    return "\n".join(lines)


@contextmanager
def running_services(work: Path) -> Iterator[str]:
    """A new MLflow store under `work`, its tables and experiment made, and a Prefect server on a free port that
    the commands started inside the block report to (`PREFECT_API_URL`); the store's URI."""
    uri = f"sqlite:///{work / 'mlflow.db'}"
    made = "from post_train.tracking import experiment_id; experiment_id()"
    subprocess.run([sys.executable, "-c", made], env={**os.environ, "MLFLOW_TRACKING_URI": uri}, check=True)
    with local_server(f"http://127.0.0.1:{free_port()}/api"):
        yield uri


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: list[str]
    tree: Path
    """The source tree the command runs from."""


@contextmanager
def worktree(commit: str) -> Iterator[Path]:
    """A detached git worktree of `commit`, its modules compiled (as a checkout's are after its first run: else the
    first run of each variant compiles them in every process that imports them), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="post-train-demo-bench-tree-") as parent:
        tree = Path(parent) / commit
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), commit], cwd=REPO_ROOT, check=True)
        try:
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree)], check=True)
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO_ROOT, check=True)


def _variants(ab: str | None, commits: str | None, stack: ExitStack) -> list[Variant]:
    """`--ab KEY=A,B` as the two values of KEY, `--commits A,B` as two worktrees (`stack` removes them); neither: the
    recipe as it is, in this tree."""
    if ab is not None and commits is not None:
        raise SystemExit("--ab and --commits: one comparison at a time")
    if commits is not None:
        names = commits.split(",")
        if len(names) != 2:
            raise SystemExit(f"--commits {commits!r}: expected A,B, e.g. HEAD~1,HEAD")
        shas = [git_commit(REPO_ROOT, short=True, revision=name) for name in names]
        if "unknown" in shas:
            raise SystemExit(f"--commits {commits!r}: {names[shas.index('unknown')]!r} names no commit here")
        return [Variant(sha, [], stack.enter_context(worktree(sha))) for sha in shas]
    if ab is None:
        return [Variant("as configured", [], REPO_ROOT)]
    key, separator, values = ab.partition("=")
    if not separator or "," not in values:
        raise SystemExit(f"--ab {ab!r}: expected KEY=A,B, e.g. compute.warm_start=true,false")
    return [Variant(f"{key}={value}", [f"{key}={value}"], REPO_ROOT) for value in values.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="lowlr")
    parser.add_argument("--scale", default="demo")
    parser.add_argument(
        "--dvc-root", type=Path, default=REPO_ROOT, help="the DVC repository of the data (as make demo)"
    )
    parser.add_argument(
        "--ab", help="KEY=A,B: two variants of one config key, alternated (e.g. compute.warm_start=true,false)"
    )
    parser.add_argument(
        "--commits", help="A,B: two commits, alternated, each run from a worktree of its own (e.g. HEAD~1,HEAD)"
    )
    parser.add_argument("--repetitions", type=int, default=1, help="runs of each variant")
    parser.add_argument(
        "--services",
        choices=sorted(SERVICES),
        default="fresh",
        help="fresh: a new MLflow store and Prefect's temporary server per run (a first `make demo`); running: one "
        "store and one Prefect server for all runs (later runs)",
    )
    parser.add_argument("--name", help="result file name (default: demo-<scale>)")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        variants = _variants(args.ab, args.commits, stack)
        shared_uri = None
        if args.services == "running":
            services_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="post-train-demo-bench-")))
            shared_uri = stack.enter_context(running_services(services_dir))
        runs: dict[str, list[dict[str, Any]]] = {variant.label: [] for variant in variants}
        for repetition in range(args.repetitions):
            for variant in variants if repetition % 2 == 0 else variants[::-1]:
                with tempfile.TemporaryDirectory(prefix="post-train-demo-bench-") as work:
                    run = measure(
                        args.recipe,
                        args.scale,
                        Path(work),
                        args.dvc_root.resolve(),
                        variant.overrides,
                        variant.tree,
                        shared_uri,
                    )
                runs[variant.label].append(run)
                print(
                    f"{variant.label}, repetition {repetition + 1}: {run['wall_seconds']:.1f} s wall, "
                    f"{run['outside_compute_seconds']:.1f} s outside training and generation",
                    flush=True,
                )
    result = {
        "recipe": args.recipe,
        "scale": args.scale,
        "services": args.services,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "post_train_commit": git_commit(REPO_ROOT, short=True, mark_dirty=True),
        "load_averages": [run["load_average_at_start"] for label in runs for run in runs[label]],
        "variants": [
            {"label": variant.label, "summary": summarise(runs[variant.label]), "runs": runs[variant.label]}
            for variant in variants
        ],
    }
    name = args.name or f"demo-{args.scale}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out_dir / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
