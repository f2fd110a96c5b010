"""Every stage declared once, and the one way a declared stage runs.

A declaration says which module computes the stage (its `run` function and its command
`python -m <module>`), what `run` returns, what its cache key depends on besides its code, whether it trains on
every process its placement gives it, and how often a transient failure is retried. Prepare runs in the calling
process; every other stage runs as a command, so the calling process never imports what the stages compute with
(torch's models, transformers: seconds before the first stage). Stages with a key run through the executor their
placement names, cached by content; those without (fetch-champion, register: bookkeeping beside the tracking store
and the registry) run on this machine, uncached.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from post_train.config import PipelineConfig
from post_train.executors import executor_class
from post_train.fingerprint import content_key, model_fingerprint, module_fingerprint
from post_train.judges import judge_fingerprint
from post_train.results import Champion, Evaluation, HeadToHead, PreparedData, Registration, TrainedModel
from post_train.run_summary import metrics_line, mlflow_run_url
from post_train.stage_cache import cached
from post_train.stage_io import accepted, read_result, write_inputs
from post_train.tracking import end_orphaned_runs, record_cache_hit, regression_tags, tracking_uri

KeyParts = Callable[[PipelineConfig, Mapping[str, Any]], dict[str, Any]]
Logger = logging.Logger | logging.LoggerAdapter
LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """What every stage of one flow run shares."""

    run_dir: str
    parent_run_id: str | None = None
    """The flow's MLflow run; each stage's run hangs under it."""
    force: bool = False
    """Rerun cached stages."""


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    result: Any
    """What the module's `run` returns (a record of `post_train.results`): read back from its command's outputs."""
    key: KeyParts | None = None
    """The cache key's parts besides the stage's code; None: not cached, and run on this machine."""
    in_process: bool = False
    """Run in the calling process rather than as a command."""
    distributed: bool = False
    retry_delays: tuple[int, ...] = (10, 60)
    """Seconds before each retry of a transient failure; bad input is never retried."""

    @property
    def function(self) -> Callable[..., Any]:
        return importlib.import_module(self.module).run


def _optional_model(path: str | None) -> str | None:
    return model_fingerprint(path) if path else None


PREPARE = Stage("prepare", "tasks.prepare", PreparedData, in_process=True, retry_delays=(5, 30))
PRETRAIN = Stage(
    "pretrain",
    "tasks.pretrain",
    TrainedModel,
    distributed=True,
    key=lambda config, a: {
        "base_model": config.base_model.model_dump(mode="json"),
        "world": a["data"].hashes.get("world"),
    },
)
SFT = Stage(
    "sft",
    "tasks.sft",
    TrainedModel,
    distributed=True,
    key=lambda config, a: {
        "sft": config.sft.model_dump(mode="json"),
        "mixed_precision": config.mixed_precision,
        "base_model": model_fingerprint(a["base_model_path"]),
        "chat_template": config.model.chat_template,
        "sft_data": a["data"].hashes["sft"],
        "eval_data": a["data"].hashes["eval"],  # the KL-to-base and entropy diagnostics run on its references
    },
)
DPO = Stage(
    "dpo",
    "tasks.dpo",
    TrainedModel,
    distributed=True,
    key=lambda config, a: {
        "dpo": config.dpo.model_dump(mode="json"),
        "mixed_precision": config.mixed_precision,
        "sft_model": model_fingerprint(a["sft_model_path"]),
        "preference_data": a["data"].hashes["preferences"],
    },
)
JOINT = Stage(
    "joint",
    "tasks.joint",
    TrainedModel,
    distributed=True,
    key=lambda config, a: {
        "joint": config.joint.model_dump(mode="json"),
        "sft_objective": config.sft.objective,
        "sft_objective_params": config.sft.objective_params,
        "rollout_steps": config.sft.rollout_steps,
        "dpo_loss": config.dpo.loss,
        "dpo_loss_params": config.dpo.loss_params,
        "mixed_precision": config.mixed_precision,
        "start_model": model_fingerprint(a["start_model_path"]),
        "sft_data": a["data"].hashes["sft"],
        "preference_data": a["data"].hashes["preferences"],
    },
)
EVALUATE = Stage(
    "evaluate",
    "tasks.evaluate",
    Evaluation,
    key=lambda config, a: {
        "evaluation": config.evaluation.model_dump(mode="json"),
        "judge": judge_fingerprint(config.evaluation),
        "model": model_fingerprint(a["model_path"]),
        "eval_data": a["data"].hashes["eval"],
        "reference_model": _optional_model(a.get("reference_model_path")),
        "base_model": _optional_model(a.get("base_model_path")),
    },
)
FETCH_CHAMPION = Stage("fetch-champion", "tasks.fetch_champion", Champion | None, retry_delays=(5, 30))
HEAD_TO_HEAD = Stage(
    "head-to-head",
    "tasks.head_to_head",
    HeadToHead,
    key=lambda config, a: {
        "evaluation": config.evaluation.model_dump(mode="json"),
        "judge": judge_fingerprint(config.evaluation),
        "candidate": model_fingerprint(a["candidate_path"]),
        "baseline": model_fingerprint(a["baseline_path"]),
        "eval_data": a["data"].hashes["eval"],
    },
)
REGISTER = Stage("register", "tasks.register", Registration, retry_delays=(5, 30))

STAGE_DECLARATIONS = (PREPARE, PRETRAIN, SFT, DPO, JOINT, EVALUATE, FETCH_CHAMPION, HEAD_TO_HEAD, REGISTER)


def _placed(stage: Stage, config: PipelineConfig) -> PipelineConfig:
    """`config` with the stage's placement as its `compute` section; a stage without a key, whose work is with this
    machine's tracking store and registry, is placed on this machine."""
    placement = config.compute.for_stage(stage.name)
    if stage.key is None:
        placement = placement.model_copy(update={"backend": "local"})
    return config.model_copy(update={"compute": placement})


def _executor(placed: PipelineConfig) -> Any:
    """The executor of a stage placed by `_placed`: its backend's."""
    return executor_class(placed.compute.backend)(placed)


def warm_up(config: PipelineConfig) -> None:
    """Let the executors of the command stages prepare ahead of them (the local one starts its warm server)."""
    for stage in STAGE_DECLARATIONS:
        if not stage.in_process:
            _executor(_placed(stage, config)).warm_up(stage.distributed)


def _offered(context: RunContext, output_dir: Path, checkpoint_dir: Path | None = None) -> dict[str, str | None]:
    """The run context as a stage's `run` takes it (`stage_io.CONTEXT_ARGUMENTS`), by name."""
    offered = {"parent_run_id": context.parent_run_id, "output_dir": str(output_dir)}
    if checkpoint_dir is not None:
        offered["checkpoint_dir"] = str(checkpoint_dir)
    return offered


def _run_link(run_id: str) -> str:
    """`MLflow run <its UI page>`; only the id for a run this store does not hold (a cache shared by several
    stores), "no MLflow run" for none."""
    if not run_id:
        return "no MLflow run"
    try:
        experiment = MlflowClient(tracking_uri()).get_run(run_id).info.experiment_id
    except MlflowException:
        return f"MLflow run {run_id} (not in this tracking store)"
    return f"MLflow run {mlflow_run_url(tracking_uri(), experiment, run_id)}"


def run_stage(
    stage: Stage,
    config: PipelineConfig,
    context: RunContext,
    *,
    logger: Logger | None = None,
    output: Callable[[str], None] | None = None,
    **arguments: Any,
) -> Any:
    """Run `stage` on `arguments`: in this process (`in_process`), from the cache when a finished run had its key,
    else as a command.

    A command stage's key hashes `stage.key`'s parts and the source of the stage's module and every
    project module it imports; a cache hit gets a child MLflow run tagged `cache_hit` with the cached
    metrics. A stage whose `run` takes `checkpoint_dir` gets `cache_dir/checkpoints/<stage>/<key>`:
    the same place for every attempt at the same key, removed once the stage succeeds.

    `logger` (default: this module's) gets what happens to a command stage: the command started, its exit status,
    its metrics and MLflow run, or the cache hit. `output` gets each line the command prints (default, with a
    `logger`: its `info`) from an executor whose `run` takes `on_line` (local, skypilot), which still echoes
    everything to the terminal; another executor, or no `output`, leaves the command writing to the terminal.
    """
    log = logger or LOGGER
    if output is None and logger is not None:
        output = functools.partial(logger.info, "%s")  # a line may hold `%`: never a format
    work_dir = Path(context.run_dir) / stage.name
    if stage.in_process:
        function = stage.function
        if "output_dir" in inspect.signature(function).parameters:
            work_dir.mkdir(parents=True, exist_ok=True)
        return function(**accepted(function, {"config": config, **arguments, **_offered(context, work_dir)}))

    placed = _placed(stage, config)
    executor = _executor(placed)
    executor.preflight(arguments)
    key = checkpoints = None
    if stage.key is not None:
        key = content_key(stage=stage.name, **stage.key(config, arguments), code=module_fingerprint(stage.module))
        checkpoints = Path(config.cache_dir).resolve() / "checkpoints" / stage.name / key

    def produce(directory: Path) -> Any:
        work_dir.mkdir(parents=True, exist_ok=True)
        inputs, outputs = work_dir / "inputs.json", work_dir / "outputs.json"
        # The context goes to the command whole: its `run` takes what it names (`stage_io.accepted`).
        write_inputs(inputs, {"config": config, **arguments, **_offered(context, directory, checkpoints)})
        outputs.unlink(missing_ok=True)
        log.info(
            "%s: %srunning %s (backend %s)",
            stage.name,
            f"no cached result for key {key}: " if key is not None else "",
            stage.module,
            placed.compute.backend,
        )
        started = time.monotonic()
        streams = output is not None and "on_line" in inspect.signature(executor.run).parameters
        try:
            returncode, description = executor.run(
                stage.name, stage.module, inputs, outputs, stage.distributed, **({"on_line": output} if streams else {})
            )
        except BaseException:  # interrupted (Ctrl-C, a termination): the executor stopped the command mid-run
            try:
                end_orphaned_runs(stage.name, context.parent_run_id)
            except Exception as error:  # an unreachable tracking server must not hide why the stage stopped
                log.warning("%s: could not mark its MLflow run KILLED: %s", stage.name, error)
            raise
        log.info(
            "%s: %s exited with status %d after %.0f s", stage.name, description, returncode, time.monotonic() - started
        )
        if returncode != 0:  # a command that was killed could not end its MLflow run
            end_orphaned_runs(stage.name, context.parent_run_id)
        return read_result(outputs, stage.result, returncode, description)

    if key is None:
        return produce(work_dir)
    result, hit = cached(stage.name, key, config.cache_dir, produce, stage.result, context.force)
    if not hit:  # the stage finished: a retry will not resume from its checkpoints
        shutil.rmtree(checkpoints, ignore_errors=True)
    metrics = getattr(result, "metrics", {})
    if hit:
        tags = regression_tags(result.regressions) if isinstance(result, TrainedModel) else {}
        record_cache_hit(stage.name, context.parent_run_id, key, metrics, tags)
        recorded = mlflow.last_active_run()  # the run `record_cache_hit` just ended, in this thread
        log.info(
            "%s: cache hit (key %s): made by %s; recorded under this flow run as %s",
            stage.name,
            key,
            _run_link(getattr(result, "run_id", "")),
            _run_link(recorded.info.run_id if recorded else ""),
        )
    else:
        log.info("%s: finished, %s", stage.name, _run_link(getattr(result, "run_id", "")))
    if metrics:
        log.info("%s metrics: %s", stage.name, metrics_line(metrics))
    if "cache_hit" in {field.name for field in dataclasses.fields(result)}:
        result = dataclasses.replace(result, cache_hit=hit)
    return result
