"""The stage command protocol: `python -m tasks.<stage> --inputs inputs.json --outputs outputs.json`.

`inputs.json` holds `run`'s keyword arguments, and the run context's (`CONTEXT_ARGUMENTS`) whether or not
`run` takes them, so that the launcher needs no more of the stage's module than its name; `outputs.json` holds
`{"result": ...}` or, when `run` raised, `{"error": {"type", "message"}}`, so whoever launched the command can
raise the same refusal (a bad dataset stays a `DataError`, not a bare exit status) wherever the command ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import typing
from pathlib import Path
from typing import Any, Callable

from post_train.config import ConfigError, PipelineConfig
from post_train.data import DataError
from post_train.errors import TrainingDiverged
from post_train.tracking import is_main_process

REFUSALS: dict[str, type[Exception]] = {
    "ConfigError": ConfigError,
    "DataError": DataError,
    "TrainingDiverged": TrainingDiverged,
}
"""Errors a retry cannot fix (bad input, a configuration that diverges): re-raised as themselves, never retried."""
CONTEXT_ARGUMENTS = frozenset({"parent_run_id", "output_dir", "checkpoint_dir"})
"""What a run of the flow offers every stage; a stage's `run` asks for those it needs by name."""


class StageFailed(RuntimeError):
    """A stage's command exited without a result."""


def to_json(value: Any) -> Any:
    if isinstance(value, PipelineConfig):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def from_json(annotation: Any, value: Any) -> Any:
    if annotation is PipelineConfig:
        return PipelineConfig.model_validate(value)
    for candidate in typing.get_args(annotation) or (annotation,):  # `Result | None` too
        if dataclasses.is_dataclass(candidate) and isinstance(value, dict):
            fields = typing.get_type_hints(candidate)
            return candidate(**{name: from_json(fields[name], item) for name, item in value.items()})
    if typing.get_origin(annotation) is tuple and isinstance(value, list):  # JSON has arrays only
        return tuple(value)
    return value


def accepted(run: Callable[..., Any], arguments: dict[str, Any]) -> dict[str, Any]:
    """`arguments` without the context arguments that `run` does not take."""
    parameters = inspect.signature(run).parameters
    return {name: value for name, value in arguments.items() if name in parameters or name not in CONTEXT_ARGUMENTS}


def write_inputs(path: Path, arguments: dict[str, Any]) -> None:
    path.write_text(json.dumps({name: to_json(value) for name, value in arguments.items()}, indent=2))


def read_result(outputs: Path, result_type: Any, returncode: int, description: str) -> Any:
    """The `result_type` result from a finished command's outputs file; its refusal or a `StageFailed` otherwise."""
    reply = json.loads(outputs.read_text()) if outputs.is_file() else {}
    if "error" in reply:
        error = reply["error"]
        raise REFUSALS.get(error["type"], StageFailed)(error["message"])
    if returncode != 0 or "result" not in reply:
        raise StageFailed(f"{description} exited with status {returncode} and no result in {outputs}")
    return from_json(result_type, reply["result"])


def stage_main(run: Callable[..., Any]) -> None:
    """The command line of a stage: read keyword arguments, call `run`, write its result or its error."""
    parser = argparse.ArgumentParser(description=run.__module__)
    parser.add_argument("--inputs", required=True, type=Path)
    parser.add_argument("--outputs", required=True, type=Path)
    args = parser.parse_args()
    hints = typing.get_type_hints(run)
    inputs = accepted(run, json.loads(args.inputs.read_text()))
    arguments = {name: from_json(hints.get(name), value) for name, value in inputs.items()}
    try:
        reply: dict[str, Any] = {"result": to_json(run(**arguments))}
    except Exception as error:
        reply = {"error": {"type": type(error).__name__, "message": str(error)}}
        raise
    finally:
        if is_main_process():  # under `accelerate launch` every process runs this
            args.outputs.write_text(json.dumps(reply, indent=2))
