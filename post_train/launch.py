"""Stages as commands: `python -m tasks.<stage> --inputs in.json --outputs out.json`.

The Prefect tasks run each heavy stage through `launch`, in a child process, so the process
that serves deployments never holds a model; the same command runs under `accelerate launch`
(`compute.num_processes` > 1, `compute.accelerate_config`) or, with `compute.backend: skypilot`,
as a SkyPilot managed job on cloud GPUs (`post_train.cloud`). Outputs are cached by content
under `cache_dir/stages/<stage>/<key>`, the key hashing the stage's config, its inputs' hashes
and its code, so an unchanged stage is never run twice; training stages checkpoint under
`cache_dir/checkpoints/<stage>/<key>`, so a retry of the same stage resumes.
"""

from __future__ import annotations

import dataclasses
import inspect
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


MAIN_PROCESS_PORT = 29500


def stage_command(
    module: str,
    inputs: Path | str,
    outputs: Path | str,
    num_processes: int = 1,
    accelerate_config: str | None = None,
    num_machines: int = 1,
    machine_rank: int = 0,
    main_process_ip: str | None = None,
    main_process_port: int = MAIN_PROCESS_PORT,
) -> list[str]:
    """The command that runs a stage: plain Python, or `accelerate launch` for several processes.

    `num_processes` counts processes on all machines. With no accelerate config, several
    processes are plain data parallel (`--multi_gpu`, which on a machine without GPUs runs
    them on the CPU with gloo). On one machine the processes meet on a free port, so stages
    can run side by side; several machines add accelerate's static rendezvous arguments
    (`main_process_port` fixed), every machine running the same command with its own `machine_rank`.
    """
    arguments = ["-m", module, "--inputs", str(inputs), "--outputs", str(outputs)]
    if num_processes <= 1:
        return [sys.executable, *arguments]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    command += ["--config_file", accelerate_config] if accelerate_config else ["--multi_gpu"]
    if num_machines > 1:
        if not main_process_ip:
            raise ValueError("several machines need the main process's IP address")
        command += ["--num_machines", str(num_machines), "--machine_rank", str(machine_rank),
                    "--main_process_ip", main_process_ip, "--main_process_port", str(main_process_port)]
    else:
        command += ["--main_process_port", "0"]  # accelerate picks a free one
    return [*command, *arguments]


Executor = Callable[[Path, Path], tuple[int, str]]
"""Runs a stage given its inputs and outputs files; returns an exit status and how to name the run in errors."""


def launch(
    module: str,
    run: Callable[..., Result],
    arguments: dict[str, Any],
    work_dir: Path,
    num_processes: int = 1,
    accelerate_config: str | None = None,
    execute: Executor | None = None,
) -> Result:
    """Run `module`'s stage command in a child process (or through `execute`) and return `run`'s result."""
    work_dir.mkdir(parents=True, exist_ok=True)
    inputs, outputs = work_dir / "inputs.json", work_dir / "outputs.json"
    inputs.write_text(json.dumps({name: _to_json(value) for name, value in arguments.items()}, indent=2))
    outputs.unlink(missing_ok=True)
    if execute is None:
        command = stage_command(module, inputs, outputs, num_processes, accelerate_config)
        returncode, description = subprocess.run(command).returncode, f"`{' '.join(command)}`"
    else:
        returncode, description = execute(inputs, outputs)
    reply = json.loads(outputs.read_text()) if outputs.is_file() else {}
    if "error" in reply:
        error = reply["error"]
        raise REFUSALS.get(error["type"], StageFailed)(error["message"])
    if returncode != 0 or "result" not in reply:
        raise StageFailed(f"{description} exited with status {returncode} and no result in {outputs}")
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


def run_stage(
    stage: str,
    run: Callable[..., Result],
    arguments: dict[str, Any],
    key_parts: dict[str, Any],
    config: PipelineConfig,
    run_dir: str,
    parent_run_id: str | None,
    force: bool = False,
    distributed: bool = False,
) -> Result:
    """A stage as Prefect runs it: from the cache when its key is known, else as a child process.

    The key hashes `key_parts` (the stage's config and its inputs' hashes) and the source of
    the stage's module and every project module it imports. A cache hit is recorded as a child MLflow run tagged `cache_hit` with the cached metrics.

    `distributed` stages (training) run on every process `compute` gives them; the others on one.
    A `run` that takes `checkpoint_dir` gets `cache_dir/checkpoints/<stage>/<key>`: the same
    place for every attempt at the same key, removed once the stage succeeds. With
    `compute.backend: skypilot` the command runs as a SkyPilot managed job (`post_train.cloud`).
    """
    from post_train.fingerprint import content_key, module_fingerprint
    from post_train.tracking import record_cache_hit

    compute = config.compute
    if compute.backend == "skypilot":
        from post_train.cloud import preflight

        preflight(config, arguments)
    key = content_key(stage=stage, **key_parts, code=module_fingerprint(run.__module__))
    result_type = typing.get_type_hints(run)["return"]
    checkpoints = Path(config.cache_dir).resolve() / "checkpoints" / stage / key
    takes_checkpoints = "checkpoint_dir" in inspect.signature(run).parameters

    def produce(directory: Path) -> Result:
        stage_arguments = {**arguments, "output_dir": str(directory)}
        if takes_checkpoints:
            stage_arguments["checkpoint_dir"] = str(checkpoints)
        execute = None
        if compute.backend == "skypilot":
            from post_train.cloud import managed_job_executor

            execute = managed_job_executor(config, stage, run.__module__, distributed)
        processes = compute.num_processes if distributed else 1
        return launch(run.__module__, run, stage_arguments, Path(run_dir) / stage, processes,
                      compute.accelerate_config_path() if distributed else None, execute)

    result, hit = cached(stage, key, config.cache_dir, produce, result_type, force)
    if not hit and takes_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    if hit:
        record_cache_hit(stage, parent_run_id, key, result.metrics)
    return dataclasses.replace(result, cache_hit=hit)
