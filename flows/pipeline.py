"""The `post-train` flow: prepare → base model → SFT → DPO → evaluate → fetch-champion → (head-to-head) → register.

With `pipeline: joint`, SFT → DPO is (an SFT warm-up →) the joint stage.

Composition only: each stage is a task of `flows/stages.py`. The flow validates its inputs
(`post_train.validate`: configuration, model, data, judge, outputs) before any work, opens the
parent MLflow run the stages' runs hang under, and returns (and prints) a summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run
from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows import stages
from post_train.config import PipelineConfig
from post_train.data import data_counts
from post_train.results import Champion, Evaluation, HeadToHead, PreparedData, Registration, TrainedModel
from post_train.run_summary import head_to_head_rows, mlflow_run_url, model_version_url, win_rate_rows
from post_train.stages import RunContext, warm_up
from post_train.tracking import (
    experiment_id,
    flatten,
    flow_run_name,
    log_params_and_metrics,
    model_short_name,
    regression_tags,
    tracking_uri,
)
from post_train.validate import validated_config

WIN_RATES_ARTIFACT = "post-train-win-rates"
MLFLOW_RUN_ARTIFACT = "post-train-mlflow-run"
MODEL_VERSION_ARTIFACT = "post-train-model-version"
"""Artifact keys: Prefect keeps every flow run's artifact under its key, the latest first."""


@dataclass(frozen=True)
class PostTrained:
    """What the training stages after pretraining made, and its evaluation."""

    sft: TrainedModel | None
    """The SFT stage's model; None when the joint stage starts from the base."""
    final: TrainedModel
    final_stage: str
    """`dpo`, or `joint`."""
    evaluation: Evaluation


def post_train_and_evaluate(
    config: PipelineConfig, context: RunContext, base_model_path: str, data: PreparedData
) -> PostTrained:
    """SFT then DPO, or (`pipeline: joint`) the SFT warm-up if `joint.start` is `sft`, then the joint stage; then
    the final model's evaluation, its diagnostics against the SFT model when there is one and the base."""
    run = config.stages_run()
    sft = stages.sft(config, context, base_model_path=base_model_path, data=data) if "sft" in run else None
    start = sft.path if sft is not None else base_model_path
    if "joint" in run:
        final, final_stage = stages.joint(config, context, start_model_path=start, data=data), "joint"
    else:
        final, final_stage = stages.dpo(config, context, sft_model_path=start, data=data), "dpo"
    evaluation = stages.evaluate(
        config,
        context,
        model_path=final.path,
        data=data,
        reference_model_path=sft.path if sft is not None else None,
        base_model_path=base_model_path,
    )
    return PostTrained(sft, final, final_stage, evaluation)


def _run_directory(runs_dir: str, recipe: str, run_name: str) -> Path:
    directory = Path(runs_dir).resolve() / f"{time.strftime('%Y%m%d-%H%M%S')}-{recipe}-{run_name}"
    directory.mkdir(parents=True, exist_ok=False)
    return directory


def publish_artifacts(
    config: PipelineConfig,
    parent: Run,
    evaluation: Evaluation,
    champion: Champion | None,
    comparison: HeadToHead | None,
    registration: Registration,
) -> None:
    """The flow run's Prefect artifacts: a table of the win rates per split (against the reference, and head to
    head against the champion when there was one), and links to the parent MLflow run and the registered version."""
    rows = win_rate_rows(evaluation.metrics)
    if champion is not None and comparison is not None:
        rows += head_to_head_rows(comparison.metrics, champion.version)
    create_table_artifact(
        rows,
        key=WIN_RATES_ARTIFACT,
        description=f"Win rates (%) of `{config.recipe}` at scale `{config.scale}`, judge `{config.evaluation.judge}`"
        ": raw, s.e., 95% bootstrap CI, discrete and length-controlled, per split",
    )
    uri = tracking_uri()
    create_link_artifact(
        mlflow_run_url(uri, parent.info.experiment_id, parent.info.run_id),
        link_text=f"MLflow run {parent.info.run_name}",
        key=MLFLOW_RUN_ARTIFACT,
        description="The flow's MLflow run, with a child run per stage",
    )
    standing = f"@{config.registry.champion_alias}" if registration.is_champion else "not promoted"
    if registration.already_registered:
        standing += ", registered before"
    create_link_artifact(
        model_version_url(uri, registration.name, registration.version),
        link_text=f"{registration.name} version {registration.version} ({standing})",
        key=MODEL_VERSION_ARTIFACT,
        description=f"The registered model version. {registration.reason}".strip(),
    )


@flow(name="post-train", log_prints=True)
def post_train(
    recipe: str = "lowlr", scale: str = "demo", overrides: dict[str, Any] | None = None, force: bool = False
) -> dict[str, Any]:
    """Post-train a model with `recipe` at `scale`.

    `overrides` maps dotted config keys to values, e.g. {"sft.learning_rate": 1e-4}; `force`
    reruns every stage even when its cached result matches.
    """
    config = validated_config(recipe, scale, overrides)  # every problem with the inputs, before any work
    warm_up(config)  # the stages' warm server imports while the flow prepares the data
    run_name = flow_run.get_name() or "local"
    run_dir = _run_directory(config.runs_dir, config.recipe, run_name)
    (run_dir / "config.json").write_text(config.model_dump_json(indent=2))

    client = MlflowClient(tracking_uri())
    model = model_short_name(config.model.name_or_path)
    parent = client.create_run(
        experiment_id(),
        run_name=flow_run_name(config.recipe, config.scale, model, run_name),
        tags={
            "recipe": config.recipe,
            "scale": config.scale,
            "model": model,
            "prefect_flow_run_id": str(flow_run.get_id()),
        },
    )
    parent_id = parent.info.run_id
    log_params_and_metrics(client, parent_id, params=flatten(config.model_dump(mode="json")))
    client.log_artifact(parent_id, str(run_dir / "config.json"))
    try:
        context = RunContext(str(run_dir), parent_id, force)
        data = stages.prepare(config, context)
        client.set_tag(parent_id, "data_hash", data.data_hash)
        base = stages.base_model(config, context, data=data)
        trained = post_train_and_evaluate(config, context, base.path, data)
        sft, final, evaluation = trained.sft, trained.final, trained.evaluation
        champion = stages.fetch_champion(config, context, model_path=final.path, data=data)
        # No head-to-head against a champion the model cannot replace (not comparable) or when it is registered already.
        comparison = (
            stages.head_to_head(config, context, candidate_path=final.path, baseline_path=champion.path, data=data)
            if champion is not None and champion.needs_head_to_head
            else None
        )
        # The stages that made the model, each flagged when it ended worse than it started.
        made_by = [(name, model) for name, model in (("pretrain", base), ("sft", sft)) if model is not None]
        made_by.append((trained.final_stage, final))
        regressions = [f"{stage}: {regression}" for stage, model in made_by for regression in model.regressions]
        for tag, value in regression_tags(regressions).items():
            client.set_tag(parent_id, tag, value)
        counts = {**(data_counts(sft.metrics) if sft is not None else {}), **data_counts(final.metrics)}
        registration = stages.register(
            config,
            context,
            model_path=final.path,
            win_rate=evaluation.win_rate,
            data=data,
            flow_run_id=str(flow_run.get_id()),
            metrics=evaluation.metrics,
            champion=champion,
            comparison=comparison,
            regressions=regressions,
            data_counts=counts,
            base_model_path=base.path,
        )
        get_run_logger().info(
            "register: %s version %s: %s", registration.name, registration.version, registration.reason
        )
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    log_params_and_metrics(client, parent_id, metrics=evaluation.metrics)
    client.set_terminated(parent_id, status="FINISHED")
    publish_artifacts(config, parent, evaluation, champion, comparison, registration)

    summary = {
        "recipe": config.recipe,
        "scale": config.scale,
        "data_hash": data.data_hash,
        "base_model": {"path": base.path, "cache_hit": base.cache_hit, **base.metrics},
        "pipeline": config.pipeline,
        "sft": {**sft.metrics, "cache_hit": sft.cache_hit} if sft is not None else None,
        trained.final_stage: {**final.metrics, "cache_hit": final.cache_hit},
        "evaluation": evaluation.metrics,
        "mlflow_run_uri": f"runs:/{parent_id}",
        "mlflow_run_id": parent_id,
        "model_uri": registration.model_uri,
        "model_version": registration.version,
        "champion": registration.is_champion,
        "regressions": regressions,
        "data": counts,
        "registration": {
            "version": registration.version,
            "aliases": list(registration.aliases),
            "promoted": registration.is_champion,
            "already_registered": registration.already_registered,
            "reason": registration.reason,
            "previous_champion": registration.previous_champion,
            "head_to_head": registration.head_to_head,
        },
        "judge": config.evaluation.judge,
        "run_dir": str(run_dir),
    }
    get_run_logger().info("summary:\n%s", json.dumps(summary, indent=2))
    return summary
