"""The `retrain` flow: post-train again only when the data changed since the champion was trained.

Composition only: prepare the data (the `prepare` task: `dvc repro`, validation, data hash),
compare its hash with the `data_hash` tag of the registered model's champion, and either
record a skip or run the `post-train` flow as a subflow. That subflow registers a new version
and moves the champion alias only when the new version wins head to head (tasks/register.py).
Served on a cron schedule as `retrain/scheduled` by `flows/serve.py`.
"""

from __future__ import annotations

from typing import Any

from mlflow import MlflowClient
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows import stages
from flows.pipeline import post_train
from post_train.stages import RunContext
from post_train.tracking import current_champion, experiment_id, tracking_uri
from post_train.validate import validated_config

SKIP_TAG = "retrain_skipped"
ARTIFACT_KEY = "retrain-decision"


@flow(name="retrain", log_prints=True)
def retrain(
    recipe: str = "lowlr", scale: str = "demo", overrides: dict[str, Any] | None = None, force: bool = False
) -> dict[str, Any]:
    """Run `post-train` with `recipe` at `scale` unless the champion was trained on the same data.

    `overrides` and `force` mean what they mean for `post-train`; `force` also retrains when
    the data is unchanged.
    """
    logger = get_run_logger()
    config = validated_config(recipe, scale, overrides)  # every problem with the inputs, before any work
    data = stages.prepare(config, RunContext(config.runs_dir))  # prepare writes nothing there
    name, alias = config.registry.model_name, config.registry.champion_alias
    client = MlflowClient(tracking_uri())
    champion = current_champion(client, name, alias)
    champion_hash = champion.tags.get("data_hash") if champion is not None else None
    decision = {
        "recipe": config.recipe,
        "scale": config.scale,
        "data_hash": data.data_hash,
        "champion": f"models:/{name}/{champion.version}" if champion is not None else None,
        "champion_data_hash": champion_hash,
    }

    if champion_hash == data.data_hash and not force:
        reason = f"the champion models:/{name}@{alias} (version {champion.version}) was trained on this data"
        logger.info("retrain skipped: %s (data hash %s)", reason, data.data_hash)
        run = client.create_run(
            experiment_id(),
            run_name=f"retrain-skipped-{flow_run.get_name() or 'local'}",
            tags={
                SKIP_TAG: "true",
                "recipe": config.recipe,
                "scale": config.scale,
                "data_hash": data.data_hash,
                "champion_version": str(champion.version),
                "prefect_flow_run_id": str(flow_run.get_id()),
            },
        )
        client.set_terminated(run.info.run_id, status="FINISHED")
        create_markdown_artifact(
            key=ARTIFACT_KEY,
            description="Why this retrain run did or did not train",
            markdown=f"## Retrain skipped\n\nData hash `{data.data_hash}` is unchanged: {reason}.\n\n"
            f"Recipe `{config.recipe}` at scale `{config.scale}`; MLflow run `{run.info.run_id}` "
            f"is tagged `{SKIP_TAG}`. Run with `force=true` to retrain anyway.\n",
        )
        return {**decision, "skipped": True, "reason": reason, "mlflow_run_id": run.info.run_id}

    if champion is None:
        reason = f"no champion models:/{name}@{alias} yet"
    elif force and champion_hash == data.data_hash:
        reason = "forced"
    else:
        reason = f"the data changed: champion version {champion.version} has data hash {champion_hash}"
    logger.info("retraining: %s (data hash %s)", reason, data.data_hash)
    create_markdown_artifact(
        key=ARTIFACT_KEY,
        description="Why this retrain run did or did not train",
        markdown=f"## Retraining\n\n{reason[0].upper()}{reason[1:]}; current data hash `{data.data_hash}`. "
        f"Running `post-train` (recipe `{config.recipe}`, scale `{config.scale}`) as a subflow; "
        "it promotes the new version only if it beats the champion head to head.\n",
    )
    summary = post_train(recipe=recipe, scale=scale, overrides=overrides, force=force)
    return {**decision, "skipped": False, "reason": reason, "summary": summary}
