"""A stage command killed at a chosen step: `python -m tests.fault_injection <module> --inputs IN --outputs OUT`.

`POST_TRAIN_TEST_FAULT` names where the process SIGKILLs itself, by step count (never by timing):

- `after-step:N`: once optimizer step N is done (its save, if any, included), as step N+1 is about to be applied;
- `in-save:N`: while saving the checkpoint of step N, after accelerate wrote its files and before the trainer state
  that marks the save complete.

`FaultyExecutor` is the local executor with its commands run through this module (register it as `local`).
"""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

from post_train.executors.local import LocalExecutor

FAULT_ENV = "POST_TRAIN_TEST_FAULT"
REPO_ROOT = Path(__file__).resolve().parents[1]


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: str) -> None:
    kind, _, step = fault.partition(":")
    at = int(step)
    if kind == "after-step":
        from post_train import training

        check = training.DivergenceGuard.check

        def check_then_die(self, step: int, loss: float, grad_norm: float | None) -> None:
            if step == at + 1:
                die()
            check(self, step, loss, grad_norm)

        training.DivergenceGuard.check = check_then_die
    elif kind == "in-save":
        from accelerate import Accelerator

        save_state = Accelerator.save_state

        def save_then_die(self, output_dir=None, **kwargs):
            saved = save_state(self, output_dir, **kwargs)
            if Path(output_dir).name == f"step-{at}":
                die()
            return saved

        Accelerator.save_state = save_then_die
    else:
        raise ValueError(f"unknown fault {fault!r}")


class FaultyExecutor(LocalExecutor):
    def run(self, stage, module, inputs, outputs, distributed):
        command = [
            sys.executable,
            "-m",
            "tests.fault_injection",
            module,
            "--inputs",
            str(inputs),
            "--outputs",
            str(outputs),
        ]
        return subprocess.run(command, cwd=REPO_ROOT).returncode, f"`{' '.join(command)}`"


if __name__ == "__main__":
    module = sys.argv[1]
    if os.environ.get(FAULT_ENV):
        install(os.environ[FAULT_ENV])
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
