"""`compute.backend: local`: the stage's command in a child process here, `accelerate launch` for several processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from post_train.config import PipelineConfig

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
        command += [
            "--num_machines",
            str(num_machines),
            "--machine_rank",
            str(machine_rank),
            "--main_process_ip",
            main_process_ip,
            "--main_process_port",
            str(main_process_port),
        ]
    else:
        command += ["--main_process_port", "0"]  # accelerate picks a free one
    return [*command, *arguments]


class LocalExecutor:
    def __init__(self, config: PipelineConfig):
        self.compute = config.compute

    def preflight(self, arguments: Mapping[str, Any]) -> None:
        """Nothing to check here: the machine running the flow runs the stage."""

    def run(self, stage: str, module: str, inputs: Path, outputs: Path, distributed: bool) -> tuple[int, str]:
        processes = self.compute.num_processes if distributed else 1
        accelerate_config = self.compute.accelerate_config_path() if distributed else None
        command = stage_command(module, inputs, outputs, processes, accelerate_config)
        return subprocess.run(command).returncode, f"`{' '.join(command)}`"
