"""Stages on cloud GPUs: the stage's command as a SkyPilot managed job (`compute.backend: skypilot`).

The launching machine (the one running the Prefect flow) calls the `sky` CLI of a separate
virtual environment (`make sky-env`: SkyPilot pins click<8.2, which the project's own
dependencies cannot live with) to run `sky/stage.yaml` as a managed job, so a preempted spot
machine is replaced and the stage rerun, resuming from its last checkpoint:

    sky jobs launch sky/stage.yaml --name post-train-<stage>-<id> --yes --detach-run \\
        --workdir <repository> --num-nodes N --gpus H100:8 --env STAGE_MODULE=tasks.sft ...

then streams the job's log (`sky jobs logs --name ... --follow`) until it ends (to the terminal, and line
by line to the flow's logger as the local backend does: `run_command`), reads its final
status (`sky jobs queue --output json`) and returns; a failed, cancelled or unrecoverable job
makes the stage fail, so Prefect retries it (a new job that resumes from the checkpoint). A
refused job (FAILED_PRECHECKS: an infeasible resource request) is a `ConfigError`, not retried.

Files: the stage reads inputs.json and writes outputs.json, its model and checkpoints under
`runs_dir` and `cache_dir`, which must lie inside `compute.remote_root`. The job mounts
`compute.bucket` there, and the launching machine must mount the same bucket at the same path
(rclone mount, gcsfuse, s3fs: a mount that supports renames), so every path in inputs.json
means the same file on both sides. Tracking goes to `MLFLOW_TRACKING_URI`, which must be a
server both sides reach.

On each node of the job, `python -m post_train.executors.skypilot node` turns SkyPilot's variables into the
stage command (`node_command`): `accelerate launch` over all GPUs of all nodes, the main
process on the first IP of SKYPILOT_NODE_IPS.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

from post_train.config import REPO_ROOT, ConfigError, PipelineConfig
from post_train.executors.local import MAIN_PROCESS_PORT, run_command, stage_command
from post_train.stage_io import StageFailed

TERMINAL = {
    "SUCCEEDED",
    "CANCELLED",
    "FAILED",
    "FAILED_SETUP",
    "FAILED_PRECHECKS",
    "FAILED_NO_RESOURCE",
    "FAILED_CONTROLLER",
}
"""SkyPilot's terminal managed-job statuses (sky.jobs.state.ManagedJobStatus)."""
SECRETS = ("HF_TOKEN", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
"""Passed to the job with `--secret` (redacted by SkyPilot) when set on the launching machine."""
LOCAL_TRACKING_SCHEMES = ("sqlite:", "file:")
POLL_SECONDS = 30
MAX_STATUS_FAILURES = 10


def sky_path(config: PipelineConfig) -> Path:
    path = Path(config.compute.sky_bin)
    return path if path.is_absolute() else REPO_ROOT / path


def remote_tracking_uri(environ: Mapping[str, str] = os.environ) -> str:
    """`MLFLOW_TRACKING_URI` when it names a server a cloud machine can reach; else a ConfigError."""
    uri = environ.get("MLFLOW_TRACKING_URI", "")
    remote = uri == "databricks" or ("://" in uri and not uri.startswith(LOCAL_TRACKING_SCHEMES))
    if not remote:
        raise ConfigError(
            f"compute.backend skypilot needs MLFLOW_TRACKING_URI set to a tracking server the cloud machines reach "
            f"(e.g. http://mlflow.example.com:5000); it is {uri or 'unset'}, a local store they cannot write to"
        )
    return uri


def _paths_in(value: Any) -> list[str]:
    """The strings of a stage argument (dataclass fields included) that name existing local paths."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [path for field in dataclasses.fields(value) for path in _paths_in(getattr(value, field.name))]
    if isinstance(value, str) and len(value) > 1:
        try:
            return [value] if Path(value).exists() else []
        except (OSError, ValueError):  # not a path at all
            return []
    return []


def preflight(
    config: PipelineConfig, arguments: Mapping[str, Any] = {}, environ: Mapping[str, str] = os.environ
) -> None:
    """Everything a cloud stage needs that can be checked here, before any work: a ConfigError names what is missing."""
    compute = config.compute
    if not sky_path(config).is_file():
        raise ConfigError(
            f"compute.backend skypilot: {sky_path(config)} not found; run `make sky-env` (or set compute.sky_bin)"
        )
    if compute.bucket is None:
        raise ConfigError(
            "compute.backend skypilot needs compute.bucket (s3://..., gs://..., r2://...), "
            "mounted at compute.remote_root"
        )
    if not Path(compute.remote_root).is_dir():
        raise ConfigError(
            f"compute.remote_root {compute.remote_root} is not a directory here: mount {compute.bucket} there on this "
            "machine too (rclone mount, gcsfuse, s3fs), so that the launcher and the cloud machines see the same files"
        )
    remote_tracking_uri(environ)
    compute.accelerate_config_path(in_repository=True)
    outside = [
        path for value in arguments.values() for path in _paths_in(value) if not _inside_root(path, compute.remote_root)
    ]
    if outside:
        raise ConfigError(
            f"compute.backend skypilot: {', '.join(outside)} cannot be seen from the cloud machines; "
            "put data and models "
            f"inside compute.remote_root ({compute.remote_root}) or use Hugging Face Hub names"
        )


def _inside_root(path: str, root: str) -> bool:
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def job_name(stage: str) -> str:
    """Unique per attempt, so the job's status is found by name; SkyPilot names are lowercase, digits and dashes."""
    return f"post-train-{stage}-{uuid.uuid4().hex[:8]}"


def submit_command(
    config: PipelineConfig,
    module: str,
    inputs: Path | str,
    outputs: Path | str,
    name: str,
    distributed: bool,
    environ: Mapping[str, str] = os.environ,
) -> list[str]:
    """`sky jobs launch` for one stage. Training stages get every node and GPU; the others one GPU on one node."""
    compute = config.compute
    gpu, _, _ = compute.accelerators.partition(":")
    nodes = compute.num_nodes if distributed else 1
    gpus = compute.accelerators if distributed else f"{gpu}:1"
    envs = {
        "STAGE_MODULE": module,
        "STAGE_INPUTS": str(inputs),
        "STAGE_OUTPUTS": str(outputs),
        "STAGE_DISTRIBUTED": "1" if distributed else "0",
        "ACCELERATE_CONFIG": (compute.accelerate_config_path(in_repository=True) or "") if distributed else "",
        "POST_TRAIN_BUCKET": compute.bucket or "",
        "POST_TRAIN_REMOTE_ROOT": compute.remote_root,
    }
    remote_tracking_uri(environ)
    command = [
        str(sky_path(config)),
        "jobs",
        "launch",
        str(REPO_ROOT / compute.task_yaml),
        "--name",
        name,
        "--yes",
        "--detach-run",
        "--workdir",
        str(REPO_ROOT),
        "--num-nodes",
        str(nodes),
        "--gpus",
        gpus,
        "--disk-size",
        str(compute.disk_size),
        "--use-spot" if compute.use_spot else "--no-use-spot",
    ]
    if compute.infra:
        command += ["--infra", compute.infra]
    for key, value in envs.items():
        command += ["--env", f"{key}={value}"]
    command += ["--env", "MLFLOW_TRACKING_URI"]  # its value from the environment: a URI may hold credentials
    for secret in SECRETS:
        if environ.get(secret):
            command += ["--secret", secret]  # the value is read from the environment, never put on the command line
    return command


def sky_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The `sky` CLI's environment: ours (cloud credentials, secrets to forward), without usage reporting."""
    return {**environ, "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}


def logs_command(config: PipelineConfig, name: str) -> list[str]:
    return [str(sky_path(config)), "jobs", "logs", "--name", name, "--follow"]


def queue_command(config: PipelineConfig) -> list[str]:
    return [str(sky_path(config)), "jobs", "queue", "--all", "--output", "json"]


def cancel_command(config: PipelineConfig, name: str) -> list[str]:
    return [str(sky_path(config)), "jobs", "cancel", "--name", name, "--yes"]


def job_record(queue_output: str, name: str) -> dict[str, Any] | None:
    """The newest record named `name` in `sky jobs queue --output json` (a JSON list, maybe after logs), or None."""
    lines = queue_output.splitlines()
    for start, line in enumerate(lines):
        if line.startswith("["):
            try:
                records = json.loads("\n".join(lines[start:]))
            except json.JSONDecodeError:
                continue
            named = [record for record in records if isinstance(record, dict) and record.get("job_name") == name]
            return max(named, key=lambda record: record.get("job_id") or 0, default=None)
    return None


Run = Callable[..., subprocess.CompletedProcess]


def run_managed_job(
    config: PipelineConfig,
    module: str,
    inputs: Path,
    outputs: Path,
    name: str,
    distributed: bool,
    run: Run = subprocess.run,
    sleep: Callable[[float], None] = time.sleep,
    on_line: Callable[[str], None] | None = None,
) -> tuple[int, str]:
    """Launch the stage as a managed job, stream its log until it ends; (0 when SUCCEEDED else 1, description).

    With `on_line`, the log is followed with `run_command` (echoed, and each line to `on_line`), else with `run`.
    Interrupted here (Ctrl-C, a cancelled flow run), the job is cancelled too, so no GPU is left running.
    """
    env = sky_environment()
    submitted = run(submit_command(config, module, inputs, outputs, name, distributed), env=env)
    if submitted.returncode != 0:
        return submitted.returncode, f"`sky jobs launch` of managed job {name}"
    record: dict[str, Any] | None = None
    failures = 0
    try:
        while True:
            # returns when the job ends, or when the stream drops
            if on_line is None:
                run(logs_command(config, name), env=env)
            else:
                run_command(logs_command(config, name), env, on_line)
            queue = run(queue_command(config), env=env, capture_output=True, text=True)
            record = job_record(queue.stdout, name) if queue.returncode == 0 else None
            status = (record or {}).get("status")
            if status in TERMINAL:
                break
            failures = failures + 1 if record is None else 0
            if failures >= MAX_STATUS_FAILURES:  # cancel it, so a retry does not run the stage twice
                run(cancel_command(config, name), env=env)
                return 1, (
                    f"managed job {name}: no status after {failures} tries of `sky jobs queue`; cancelled "
                    f"(check with `sky jobs queue`)"
                )
            sleep(POLL_SECONDS)
    except BaseException:
        run(cancel_command(config, name), env=env)
        raise
    details = f"id {record.get('job_id')}, {status}"
    if record.get("recovery_count"):
        details += f" after {record['recovery_count']} recoveries"
    if record.get("failure_reason"):
        details += f": {record['failure_reason']}"
    description = f"SkyPilot managed job {name} ({details})"
    if status == "FAILED_PRECHECKS":
        raise ConfigError(description)
    return (0 if status == "SUCCEEDED" else 1), description


class SkyPilotExecutor:
    def __init__(self, config: PipelineConfig):
        self.config = config

    def preflight(self, arguments: Mapping[str, Any]) -> None:
        preflight(self.config, arguments)

    def warm_up(self, distributed: bool) -> None:
        """Nothing to start ahead: each stage is a managed job of its own."""

    def run(
        self,
        stage: str,
        module: str,
        inputs: Path,
        outputs: Path,
        distributed: bool,
        on_line: Callable[[str], None] | None = None,
    ) -> tuple[int, str]:
        return run_managed_job(self.config, module, inputs, outputs, job_name(stage), distributed, on_line=on_line)


def node_command(environ: Mapping[str, str]) -> list[str]:
    """The stage command on one node of a SkyPilot job, from the task's and SkyPilot's variables."""
    module, inputs, outputs = environ["STAGE_MODULE"], environ["STAGE_INPUTS"], environ["STAGE_OUTPUTS"]
    if environ.get("STAGE_DISTRIBUTED", "1") != "1":
        return stage_command(module, inputs, outputs)
    nodes = int(environ.get("SKYPILOT_NUM_NODES", "1"))
    gpus = max(1, int(environ.get("SKYPILOT_NUM_GPUS_PER_NODE", "1") or 1))
    ips = [line.strip() for line in environ.get("SKYPILOT_NODE_IPS", "").splitlines() if line.strip()]
    if nodes > 1 and len(ips) != nodes:
        raise StageFailed(f"SKYPILOT_NUM_NODES is {nodes} but SKYPILOT_NODE_IPS lists {len(ips)} addresses")
    return stage_command(
        module,
        inputs,
        outputs,
        num_processes=nodes * gpus,
        accelerate_config=environ.get("ACCELERATE_CONFIG") or None,
        num_machines=nodes,
        machine_rank=int(environ.get("SKYPILOT_NODE_RANK", "0")),
        main_process_ip=ips[0] if ips else None,
        main_process_port=int(environ.get("MAIN_PROCESS_PORT", MAIN_PROCESS_PORT)),
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m post_train.executors.skypilot node`: run this node's share of the stage (sky/stage.yaml's `run`)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["node"]:
        raise SystemExit("usage: python -m post_train.executors.skypilot node   (run by sky/stage.yaml on every node)")
    command = node_command(os.environ)
    print("post-train node:", " ".join(command), flush=True)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
