"""The stages as Prefect tasks: one task per declaration in `post_train.stages`, with its retry policy."""

from __future__ import annotations

import logging
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.logging.handlers import APILogHandler

from post_train.config import PipelineConfig
from post_train.results import TrainedModel
from post_train.stage_io import REFUSALS
from post_train.stages import (
    DPO,
    EVALUATE,
    FETCH_CHAMPION,
    HEAD_TO_HEAD,
    JOINT,
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


STAGE_OUTPUT_LOGGER = "prefect.task_runs.stage_output"
"""The logger of the lines a stage's command prints, as the Prefect UI names it."""


def _api_only_logger() -> logging.Logger:
    """`STAGE_OUTPUT_LOGGER`, sending to the Prefect API only: the executor has already echoed each line to the
    terminal, where Prefect's console handler would print it a second time."""
    logger = logging.getLogger(STAGE_OUTPUT_LOGGER)
    if not any(isinstance(handler, APILogHandler) for handler in logger.handlers):
        logger.addHandler(APILogHandler())
    logger.propagate = False
    return logger


def stage_output(run_logger: logging.LoggerAdapter) -> Callable[[str], None]:
    """Log one line of a stage's output to the task run of `run_logger` (`get_run_logger()` in the task)."""
    logger = logging.LoggerAdapter(_api_only_logger(), run_logger.extra)
    return lambda line: logger.info("%s", line)


def stage_task(stage: Stage, name: str | None = None):
    """`stage` as a Prefect task called as `task(config, context, **arguments)`.

    What `run_stage` says about the stage (command, exit status, metrics, MLflow run link, cache hit) goes to the
    task run's logger; the lines the stage's command prints go to the task run's logs in the Prefect API.
    """

    def call(config: PipelineConfig, context: RunContext, **arguments: Any) -> Any:
        logger = get_run_logger()
        return run_stage(stage, config, context, logger=logger, output=stage_output(logger), **arguments)

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
joint = stage_task(JOINT)
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
    logger = get_run_logger()
    return run_stage(PRETRAIN, config, context, logger=logger, output=stage_output(logger), **arguments)
