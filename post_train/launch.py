"""Stages as commands: `python -m tasks.<stage> --inputs in.json --outputs out.json`.

The Prefect tasks run each heavy stage through `launch`, in a child process, so the process
that serves deployments never holds a model; the same command runs under `accelerate launch`
or on a cloud machine. Outputs are cached by content under `cache_dir/stages/<stage>/<key>`,
the key hashing the stage's config, its inputs' hashes and its code, so an unchanged stage is
never run twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

from post_train.config import ConfigError, PipelineConfig
from post_train.data import DataError

Result = TypeVar("Result")
REFUSALS = {"ConfigError": ConfigError, "DataError": DataError}
RESULT_FILE = "result.json"


class StageFailed(RuntimeError):
    """A stage's command exited without a result."""


def _to_json(value: Any) -> Any:
    if isinstance(value, PipelineConfig):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


def _from_json(annotation: Any, value: Any) -> Any:
    if annotation is PipelineConfig:
        return PipelineConfig.model_validate(value)
    if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
        return annotation(**value)
    return value


def stage_main(run: Callable[..., Any]) -> None:
    """The command line of a stage: read keyword arguments, call `run`, write its result.

    A failure is written to the outputs file too, so the launcher can raise the same error
    (a bad dataset stays a `DataError`) rather than a bare exit status.
    """
    import argparse

    parser = argparse.ArgumentParser(description=run.__module__)
    parser.add_argument("--inputs", required=True, type=Path)
    parser.add_argument("--outputs", required=True, type=Path)
    args = parser.parse_args()
    hints = typing.get_type_hints(run)
    arguments = {name: _from_json(hints.get(name), value) for name, value in json.loads(args.inputs.read_text()).items()}
    try:
        result: dict[str, Any] = {"result": _to_json(run(**arguments))}
    except Exception as error:
        result = {"error": {"type": type(error).__name__, "message": str(error)}}
        raise
    finally:
        if int(os.environ.get("RANK", "0")) == 0:
            args.outputs.write_text(json.dumps(result, indent=2))


def stage_command(module: str, inputs: Path, outputs: Path, num_processes: int = 1) -> list[str]:
    """The command that runs a stage: plain Python, or `accelerate launch` for several processes."""
    arguments = ["-m", module, "--inputs", str(inputs), "--outputs", str(outputs)]
    if num_processes > 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes), *arguments]
    return [sys.executable, *arguments]


def launch(module: str, run: Callable[..., Result], arguments: dict[str, Any], work_dir: Path, num_processes: int = 1) -> Result:
    """Run `module`'s stage command in a child process and return `run`'s result."""
    work_dir.mkdir(parents=True, exist_ok=True)
    inputs, outputs = work_dir / "inputs.json", work_dir / "outputs.json"
    inputs.write_text(json.dumps({name: _to_json(value) for name, value in arguments.items()}, indent=2))
    outputs.unlink(missing_ok=True)
    completed = subprocess.run(stage_command(module, inputs, outputs, num_processes))
    reply = json.loads(outputs.read_text()) if outputs.is_file() else {}
    if "error" in reply:
        error = reply["error"]
        raise REFUSALS.get(error["type"], StageFailed)(error["message"])
    if completed.returncode != 0 or "result" not in reply:
        raise StageFailed(f"`{' '.join(completed.args)}` exited with status {completed.returncode} and no result")
    return _from_json(typing.get_type_hints(run)["return"], reply["result"])


def cached(
    stage: str,
    key: str,
    cache_dir: str,
    produce: Callable[[Path], Result],
    result_type: type[Result],
    force: bool = False,
) -> tuple[Result, bool]:
    """`produce(directory)`'s result, reused when a stage with the same key already finished.

    `produce` writes into a scratch directory that is renamed into place only on success,
    so an interrupted stage never leaves a half-written entry; paths in its result are
    rewritten to the final place. Returns (result, cache hit).
    """
    directory = Path(cache_dir).resolve() / "stages" / stage / key
    result_file = directory / RESULT_FILE
    if result_file.is_file() and not force:
        return result_type(**json.loads(result_file.read_text())), True
    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{key}-"))
    try:
        result = json.dumps(_to_json(produce(scratch)), indent=2).replace(str(scratch), str(directory))
        (scratch / RESULT_FILE).write_text(result)
        if directory.exists():  # forced: the new result replaces the old one
            shutil.rmtree(directory)
        scratch.rename(directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result_type(**json.loads(result_file.read_text())), False


def should_retry(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry transient failures, never bad input."""
    try:
        state.result()
    except (ConfigError, DataError):
        return False
    except Exception:
        return True
    return False


STAGE_CODE = ("post_train", "losses", "tasks")


def run_stage(
    stage: str,
    run: Callable[..., Result],
    arguments: dict[str, Any],
    key_parts: dict[str, Any],
    config: PipelineConfig,
    run_dir: str,
    parent_run_id: str | None,
    force: bool = False,
) -> Result:
    """A stage as Prefect runs it: from the cache when its key is known, else as a child process.

    The key hashes `key_parts` (the stage's config and its inputs' hashes) and the project's
    code. A cache hit is recorded as a child MLflow run tagged `cache_hit` with the cached metrics.
    """
    from post_train.fingerprint import content_key, source_fingerprint
    from post_train.tracking import record_cache_hit

    key = content_key(stage=stage, **key_parts, code=source_fingerprint(*STAGE_CODE))
    result_type = typing.get_type_hints(run)["return"]

    def produce(directory: Path) -> Result:
        return launch(run.__module__, run, {**arguments, "output_dir": str(directory)}, Path(run_dir) / stage,
                      config.compute.num_processes)

    result, hit = cached(stage, key, config.cache_dir, produce, result_type, force)
    if hit:
        record_cache_hit(stage, parent_run_id, key, result.metrics)
    return dataclasses.replace(result, cache_hit=hit)
