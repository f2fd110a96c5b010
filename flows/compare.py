"""The `compare` flow: SFT objectives × SFT learning rates × seeds, compared by post-DPO win rate.

Composition only: the grid, the tables, the statistics and the plots are in
`post_train/comparison.py`; the stages are the tasks of `flows/stages.py`. The flow validates every
cell's configuration before any work, runs the shared stages once (prepare, base model),
then SFT → DPO → evaluate for each cell, `parallelism` cells at a time (the heavy stages run
as child processes, so threads are enough), and writes the results table and plots to a local
folder and to the parent MLflow run.

MLflow: a parent run `compare-<flow run name>` holds the tables and plots; the base model's
run hangs under it, and one run per cell (params `sft.objective`, `sft.learning_rate`, `seed`;
metrics: the cell's row) holds that cell's `sft`, `dpo` and `evaluate` runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows import stages
from flows.pipeline import post_train_and_evaluate
from post_train import comparison
from post_train.comparison import Cell
from post_train.config import PipelineConfig
from post_train.results import PreparedData
from post_train.run_summary import mlflow_run_url
from post_train.stages import RunContext
from post_train.tracking import experiment_id, flatten, log_params_and_metrics, tracking_uri
from post_train.validate import validated_config

RESULTS_ARTIFACT = "compare-results"
"""Key of the flow run's markdown artifact with the results table (Prefect keeps every run's, the latest first)."""


@task(name="compare-cell", task_run_name="cell {cell.slug}")
def compare_cell(
    cell: Cell,
    config: PipelineConfig,
    base_model_path: str,
    data: PreparedData,
    run_dir: str,
    parent_run_id: str,
    force: bool = False,
) -> dict[str, Any]:
    """SFT → DPO (or the joint pipeline) → evaluate for one cell under its own MLflow run; returns its table row."""
    client = MlflowClient(tracking_uri())
    run_id = client.create_run(
        experiment_id(),
        run_name=cell.slug,
        tags={MLFLOW_PARENT_RUN_ID: parent_run_id, "compare_cell": cell.name, "objective": cell.objective},
    ).info.run_id
    log_params_and_metrics(
        client,
        run_id,
        params={
            "sft.objective": cell.objective,
            "sft.learning_rate": cell.learning_rate,
            "seed": cell.seed,
        },
    )
    try:
        context = RunContext(run_dir, run_id, force)
        trained = post_train_and_evaluate(config, context, base_model_path, data)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    evaluation = trained.evaluation
    sft_metrics = trained.sft.metrics if trained.sft is not None else {}
    row = comparison.result_row(
        cell, evaluation.metrics, sft_metrics, trained.final.metrics, run_id, samples_path=evaluation.samples_path
    )
    row["model_path"] = trained.final.path
    log_params_and_metrics(
        client,
        run_id,
        metrics={key: value for key, value in row.items() if isinstance(value, float) and key != "sft_learning_rate"},
    )
    client.set_terminated(run_id, status="FINISHED")
    return row


def run_cells(
    cells: list[tuple[Cell, PipelineConfig]],
    base_model_path: str,
    data: PreparedData,
    out: Path,
    parent_run_id: str,
    force: bool,
    parallelism: int,
) -> list[dict[str, Any]]:
    """`compare_cell` for every cell, `parallelism` at a time, rows in the cells' order; when some fail, the others
    still finish (their stages stay cached) and the first failure is raised."""
    logger = get_run_logger()
    rows, failures = [], []
    with ThreadPoolTaskRunner(max_workers=parallelism) as runner:
        futures = [
            runner.submit(
                compare_cell,
                {
                    "cell": cell,
                    "config": config,
                    "base_model_path": base_model_path,
                    "data": data,
                    "run_dir": str(out / "cells" / cell.slug),
                    "parent_run_id": parent_run_id,
                    "force": force,
                },
            )
            for cell, config in cells
        ]
        for (cell, _), future in zip(cells, futures):
            try:
                rows.append(future.result())
            except Exception as error:
                logger.error("cell %s failed: %s", cell.name, error)
                failures.append(error)
    if failures:
        raise failures[0]
    return rows


@flow(name="compare", log_prints=True)
def compare(
    recipe: str = "baseline",
    scale: str = "demo",
    objectives: list[str] = list(comparison.DEFAULT_OBJECTIVES),  # noqa: B006 (never mutated)
    learning_rates: list[float] | None = None,
    seeds: list[int] = [0],  # noqa: B006 (never mutated)
    overrides: dict[str, Any] | None = None,
    parallelism: int = 1,
    force: bool = False,
) -> dict[str, Any]:
    """Compare SFT `objectives` × SFT `learning_rates` × `seeds` by post-DPO win rate.

    `recipe`/`scale`/`overrides` set everything else, for every cell. `learning_rates=None`
    means the recipe's SFT learning rate and a quarter of it (baseline vs lowlr). `parallelism`
    cells run at once; `force` reruns every stage even when its cached result matches.
    Returns the table rows (`rows`, and `aggregated` over seeds when there are several),
    the markdown tables, the output folder and the files written there, and the parent MLflow run.
    """
    validated_config(recipe, scale, overrides)  # every problem with the shared inputs, before any work
    grid = comparison.plan_grid(recipe, scale, objectives, learning_rates, seeds, overrides, parallelism)
    base = grid.base
    logger = get_run_logger()
    run_name = flow_run.get_name() or "local"
    out = Path(base.runs_dir).resolve() / f"compare-{time.strftime('%Y%m%d-%H%M%S')}-{run_name}"
    out.mkdir(parents=True, exist_ok=False)
    (out / "config.json").write_text(base.model_dump_json(indent=2))
    spec = {
        "recipe": base.recipe,
        "scale": base.scale,
        "objectives": list(objectives),
        "learning_rates": list(dict.fromkeys(cell.learning_rate for cell, _ in grid.cells)),
        "seeds": list(seeds),
        "overrides": overrides or {},
        "parallelism": parallelism,
        "cells": [
            {
                "name": cell.name,
                "slug": cell.slug,
                "objective": cell.objective,
                "sft_learning_rate": cell.learning_rate,
                "seed": cell.seed,
            }
            for cell, _ in grid.cells
        ],
    }
    (out / "grid.json").write_text(json.dumps(spec, indent=2, default=str))

    client = MlflowClient(tracking_uri())
    parent_id = client.create_run(
        experiment_id(),
        run_name=f"compare-{run_name}",
        tags={
            "flow": "compare",
            "recipe": base.recipe,
            "scale": base.scale,
            "prefect_flow_run_id": str(flow_run.get_id()),
        },
    ).info.run_id
    shared = {k: v for k, v in flatten(base.model_dump(mode="json")).items() if not k.startswith(comparison.GRID_KEYS)}
    grid_params = {f"grid.{k}": " ".join(map(str, spec[k])) for k in ("objectives", "learning_rates", "seeds")}
    log_params_and_metrics(client, parent_id, params={**shared, **grid_params, "grid.parallelism": parallelism})
    try:
        data = stages.prepare(base, RunContext(str(out), parent_id, force))
        client.set_tag(parent_id, "data_hash", data.data_hash)
        base_model = stages.base_model(base, RunContext(str(out), parent_id, force), data=data)
        rows = run_cells(grid.cells, base_model.path, data, out, parent_id, force, parallelism)

        files = {"csv": comparison.write_csv(rows, out / "results.csv")}
        markdown = comparison.markdown_table(rows)
        files["markdown"] = out / "results.md"
        files["markdown"].write_text(markdown)
        aggregated, aggregated_markdown = [], ""
        if len(seeds) > 1:
            aggregated = comparison.aggregate_rows(rows)
            aggregated_markdown = comparison.markdown_table(aggregated)
            files["aggregated_csv"] = comparison.write_csv(aggregated, out / "aggregated.csv")
            files["aggregated_markdown"] = out / "aggregated.md"
            files["aggregated_markdown"].write_text(aggregated_markdown)
        plots = comparison.write_plots(rows, out)
        for path in [out / "config.json", out / "grid.json", *files.values(), *plots.values()]:
            client.log_artifact(parent_id, str(path))
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    client.set_terminated(parent_id, status="FINISHED")
    run_url = mlflow_run_url(tracking_uri(), experiment_id(), parent_id)
    create_markdown_artifact(
        f"## compare: {len(rows)} cells\n\n{markdown}\n"
        + (f"\n### Mean over seeds\n\n{aggregated_markdown}\n" if aggregated_markdown else "")
        + f"\nMLflow run: [compare-{run_name}]({run_url}); files in `{out}`\n",
        key=RESULTS_ARTIFACT,
        description=f"Post-DPO win rates of SFT objectives x learning rates x seeds, `{base.recipe}` at `{base.scale}`",
    )

    logger.info(
        "compare: %d cells, results in %s\n%s%s",
        len(rows),
        out,
        markdown,
        f"\nmean over seeds:\n{aggregated_markdown}" if aggregated_markdown else "",
    )
    return {
        "recipe": base.recipe,
        "scale": base.scale,
        "data_hash": data.data_hash,
        "base_model": base_model.path,
        "rows": rows,
        "aggregated": aggregated,
        "markdown": markdown,
        "aggregated_markdown": aggregated_markdown,
        "output_dir": str(out),
        "paths": {name: str(path) for name, path in files.items()}
        | {"plots": {name: str(p) for name, p in plots.items()}},
        "mlflow_run_id": parent_id,
        "mlflow_run_uri": f"runs:/{parent_id}",
    }


def compare_deployment():
    """The `compare` flow as a deployment named `grid`, for `flows/serve.py` to serve."""
    from prefect.types.entrypoint import EntrypointType

    return compare.to_deployment(
        name="grid",
        tags=["post-train", "compare"],
        entrypoint_type=EntrypointType.MODULE_PATH,
        description="Compare SFT objectives x learning rates x seeds by post-DPO win rate.",
    )
