"""The `study` flow: a study file's arms × seeds, each SFT → DPO → evaluate, and the report that reads them.

Composition only: planning, statistics, the report and its plots are in `post_train/study.py`; a cell is the
`compare` flow's cell task. MLflow: a parent run `study-<name>` holds the report, `claims.json`, the rows and
the PNGs; one run per cell (under it) holds that cell's stage runs.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows import stages
from flows.compare import run_cells
from post_train import study
from post_train.config import PipelineConfig
from post_train.results import PreparedData
from post_train.stages import RunContext
from post_train.tracking import experiment_id, log_params_and_metrics, tracking_uri


@task(name="study-head-to-head", task_run_name="head to head {arm} seed {seed}")
def meet(
    arm: str,
    seed: int,
    config: PipelineConfig,
    context: RunContext,
    candidate_path: str,
    baseline_path: str,
    data: PreparedData,
) -> dict[str, Any]:
    """The head-to-head stage between an arm's final model and the baseline's at one seed; its metrics."""
    meeting = stages.head_to_head(
        config, context, candidate_path=candidate_path, baseline_path=baseline_path, data=data
    )
    return {"arm": arm, "seed": seed, **meeting.metrics}


@flow(name="study", log_prints=True)
def run_study(
    name: str = "papers",
    seeds: list[int] | None = None,
    parallelism: int | None = None,
    overrides: dict[str, Any] | None = None,
    report_dir: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run study `name` (`studies/<name>.yaml`); `seeds`/`parallelism` replace the file's, `overrides` apply to
    every arm. The report goes to the run's folder and, with `report_dir`, is copied there (e.g. `docs/results`)."""
    started = time.perf_counter()
    spec = study.load_study(name)
    name = study.study_name(name)
    spec = spec.model_copy(
        update={k: v for k, v in {"seeds": seeds, "parallelism": parallelism}.items() if v is not None}
    )
    plan = study.plan_study(spec, overrides)
    logger = get_run_logger()
    run_name = flow_run.get_name() or "local"
    out = Path(plan.base.runs_dir).resolve() / f"study-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{run_name}"
    out.mkdir(parents=True, exist_ok=False)
    client = MlflowClient(tracking_uri())
    parent_id = client.create_run(
        experiment_id(),
        run_name=f"study-{name}-{spec.scale}",
        tags={"flow": "study", "study": name, "scale": spec.scale, "prefect_flow_run_id": str(flow_run.get_id())},
    ).info.run_id
    log_params_and_metrics(
        client,
        parent_id,
        params={
            "study": name,
            "arms": " ".join(spec.arms),
            "seeds": " ".join(map(str, spec.seeds)),
            "parallelism": spec.parallelism,
            "torch_threads": plan.threads,
        },
    )
    logger.info(
        "study %s: %d cells, %d at once, %d threads each", name, len(plan.cells), spec.parallelism, plan.threads
    )
    try:
        context = RunContext(str(out), parent_id, force)
        data = stages.prepare(plan.base, context)
        base_model = stages.base_model(plan.base, context, data=data)
        rows = run_cells(plan.cells, base_model.path, data, out, parent_id, force, spec.parallelism)
        configs = {(cell.arm, cell.seed): config for cell, config in plan.cells}
        pairs = study.head_to_head_pairs(spec, rows)
        with ThreadPoolTaskRunner(max_workers=spec.parallelism) as runner:
            futures = [
                runner.submit(
                    meet,
                    {
                        "arm": arm,
                        "seed": seed,
                        "config": configs[(arm, seed)],
                        "context": RunContext(str(out / "head-to-head" / f"{arm}-seed{seed}"), parent_id, force),
                        "candidate_path": candidate,
                        "baseline_path": baseline,
                        "data": data,
                    },
                )
                for arm, seed, candidate, baseline in pairs
            ]
            meetings = [future.result() for future in futures]
        (out / "rows.json").write_text(json.dumps(rows, indent=2))
        (out / "head_to_head.json").write_text(json.dumps(meetings, indent=2))
        command = f"post-train study {name}" + (f" --seeds {' '.join(map(str, seeds))}" if seeds else "")
        files = study.write_report(
            spec,
            name,
            rows,
            meetings,
            out / "report",
            study.environment_record(plan.threads),
            command,
            time.perf_counter() - started,
        )
        for path in [out / "rows.json", out / "head_to_head.json", *files.values()]:
            client.log_artifact(parent_id, str(path), artifact_path="report")
        if report_dir is not None:
            target = Path(report_dir)
            target.mkdir(parents=True, exist_ok=True)
            for path in files.values():
                shutil.copy2(path, target / path.name)
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    client.set_terminated(parent_id, status="FINISHED")
    report = files["markdown"].read_text()
    logger.info("study %s: report in %s\n%s", name, files["markdown"], report)
    return {
        "name": name,
        "rows": rows,
        "report": str(files["markdown"]),
        "claims": json.loads(files["claims"].read_text()),
        "output_dir": str(out),
        "mlflow_run_id": parent_id,
    }


def study_deployment():
    """The `study` flow as the deployment `study/papers`, for `flows/serve.py` to serve."""
    from prefect.types.entrypoint import EntrypointType

    return run_study.to_deployment(
        name="papers",
        tags=["post-train", "study"],
        parameters={"name": "papers"},
        entrypoint_type=EntrypointType.MODULE_PATH,
        description="The papers' claims (lr dose-response, dft, psft, chi2, hellinger, each then DPO) with paired "
        "statistics over seeds; writes results.md and its plots.",
    )
