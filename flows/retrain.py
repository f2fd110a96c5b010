"""The `retrain` flow: post-train again only when the data changed since the champion was trained, and only when
a new model could replace the champion.

Composition only: prepare the data (the `prepare` task: `dvc repro`, validation, data hash),
compare it with the registered model's champion (`retrain_decision`: its `data_hash` tag, and what it is comparable
on that is known before training, the evaluation set and the judge), and either record a skip or run the
`post-train` flow as a subflow. That subflow registers a new version and moves the champion alias only when the
new version wins head to head (tasks/register.py).
Served on a cron schedule as `retrain/scheduled` by `flows/serve.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlflow import MlflowClient
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows import stages
from flows.pipeline import post_train
from post_train.config import PipelineConfig
from post_train.registry import evaluation_identity, incomparabilities
from post_train.results import PreparedData
from post_train.stages import RunContext
from post_train.tracking import current_champion, experiment_id, tracking_uri
from post_train.validate import validated_config

SKIP_TAG = "retrain_skipped"
ARTIFACT_KEY = "retrain-decision"


def retrain_decision(
    config: PipelineConfig,
    data: PreparedData,
    champion_version: str | None,
    champion_tags: Mapping[str, str],
    force: bool = False,
) -> tuple[bool, str]:
    """(train?, why) for `data` against the champion (`champion_version`, None: there is none; `champion_tags`, its
    tags).

    Skip when the champion is not comparable with what this configuration would register (another evaluation set,
    judge or judge settings, `post_train.registry.incomparabilities`): the new version could never replace it;
    skip when the champion is comparable and was trained on this data (`data_hash`); train otherwise, and always
    with `force`. The tokenizer, the last comparability tag, is known only once trained: `register` checks it.
    """
    name, alias = config.registry.model_name, config.registry.champion_alias
    if champion_version is None:
        return True, f"no champion models:/{name}@{alias} yet"
    champion = f"the champion models:/{name}@{alias} (version {champion_version})"
    incomparable = incomparabilities(evaluation_identity(config, data.hashes["eval"]), champion_tags)
    if incomparable:
        why = f"{champion} is not comparable with this configuration ({'; '.join(incomparable)})"
        if force:
            return True, f"forced, although {why}: the new version will be registered, not promoted"
        return False, (
            f"{why}: a model trained now could not replace it; give this configuration a registry.model_name of its "
            "own, or force=true to train and register it anyway"
        )
    champion_hash = champion_tags.get("data_hash")
    if champion_hash != data.data_hash:
        return True, f"the data changed: champion version {champion_version} has data hash {champion_hash}"
    if force:
        return True, "forced"
    return False, f"{champion} was trained on this data"


@flow(name="retrain", log_prints=True)
def retrain(
    recipe: str = "lowlr", scale: str = "demo", overrides: dict[str, Any] | None = None, force: bool = False
) -> dict[str, Any]:
    """Run `post-train` with `recipe` at `scale` unless the champion was trained on the same data or is not
    comparable with this configuration (`retrain_decision`).

    `overrides` and `force` mean what they mean for `post-train`; `force` also retrains when
    the data is unchanged or the champion is not comparable.
    """
    logger = get_run_logger()
    config = validated_config(recipe, scale, overrides)  # every problem with the inputs, before any work
    data = stages.prepare(config, RunContext(config.runs_dir))  # prepare writes nothing there
    name, alias = config.registry.model_name, config.registry.champion_alias
    client = MlflowClient(tracking_uri())
    champion = current_champion(client, name, alias)
    champion_hash = champion.tags.get("data_hash") if champion is not None else None
    train, reason = retrain_decision(
        config,
        data,
        str(champion.version) if champion is not None else None,
        dict(champion.tags) if champion is not None else {},
        force,
    )
    decision = {
        "recipe": config.recipe,
        "scale": config.scale,
        "data_hash": data.data_hash,
        "champion": f"models:/{name}/{champion.version}" if champion is not None else None,
        "champion_data_hash": champion_hash,
    }

    if not train:
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
            markdown=f"## Retrain skipped\n\n{reason[0].upper()}{reason[1:]} (data hash `{data.data_hash}`).\n\n"
            f"Recipe `{config.recipe}` at scale `{config.scale}`; MLflow run `{run.info.run_id}` "
            f"is tagged `{SKIP_TAG}`. Run with `force=true` to retrain anyway.\n",
        )
        return {**decision, "skipped": True, "reason": reason, "mlflow_run_id": run.info.run_id}

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
