"""The stages as Prefect tasks: one task per declaration in `post_train.stages`, with its retry policy."""

from __future__ import annotations

from typing import Any

from prefect import task

from post_train.config import PipelineConfig
from post_train.results import TrainedModel
from post_train.stage_io import REFUSALS
from post_train.stages import (
    DPO,
    EVALUATE,
    FETCH_CHAMPION,
    HEAD_TO_HEAD,
    PREPARE,
    PRETRAIN,
    REGISTER,
    SFT,
    RunContext,
    Stage,
    run_stage,
)


def should_retry(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry transient failures, never bad input."""
    try:
        state.result()
    except tuple(REFUSALS.values()):
        return False
    except Exception:
        return True
    return False


def stage_task(stage: Stage, name: str | None = None):
    """`stage` as a Prefect task called as `task(config, context, **arguments)`."""

    def call(config: PipelineConfig, context: RunContext, **arguments: Any) -> Any:
        return run_stage(stage, config, context, **arguments)

    return task(
        call,
        name=name or stage.name,
        retries=len(stage.retry_delays),
        retry_delay_seconds=list(stage.retry_delays),
        retry_condition_fn=should_retry,
    )


prepare = stage_task(PREPARE)
sft = stage_task(SFT)
dpo = stage_task(DPO)
evaluate = stage_task(EVALUATE)
fetch_champion = stage_task(FETCH_CHAMPION)
head_to_head = stage_task(HEAD_TO_HEAD)
register = stage_task(REGISTER)


@task(
    name="pretrain-base-model",
    retries=len(PRETRAIN.retry_delays),
    retry_delay_seconds=list(PRETRAIN.retry_delays),
    retry_condition_fn=should_retry,
)
def base_model(config: PipelineConfig, context: RunContext, **arguments: Any) -> TrainedModel:
    """The user's model as given (`model.name_or_path`), or the demo base model (pretrained once per key)."""
    if config.model.name_or_path is not None:
        return TrainedModel(path=config.model.name_or_path, metrics={})
    return run_stage(PRETRAIN, config, context, **arguments)
