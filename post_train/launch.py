"""The `post-train` command's process (`[project.scripts]`): `post_train.cli.main`, then an exit without the
interpreter's teardown."""

from __future__ import annotations

import atexit
import os
import signal
import sys


def main() -> None:
    status = 1  # an uncaught exception's, as the interpreter's

    def end() -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(status)

    # Registered before any library is imported, so it runs after every handler they register (atexit runs the
    # last registered first) and after the interpreter has joined its threads and run Prefect's thread-exit
    # drains. What it skips is only the freeing of every module's objects: ~3.6 s after a run (torch,
    # transformers, MLflow, Prefect), for memory the operating system takes back at once.
    atexit.register(end)
    # A termination (`kill`, `timeout`, a scheduler, the terminal closing) ends the command as an exit does, so
    # what it started is stopped on the way out: the temporary Prefect server and the warm stage server run in
    # sessions of their own and would outlive it. Prefect's flow engine reports the flow run crashed first, then
    # re-raises the signal with the handler it found, this one.
    for ending in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(ending, _exit_with_signal)
    from post_train.cli import main as cli
    from post_train.executors.warm import exit_status

    try:
        status = cli()
    except SystemExit as exit:
        status = exit_status(exit)
    except KeyboardInterrupt:
        status = 130  # the shell's code for an interrupt
        raise


def _exit_with_signal(signal_number: int, frame: object) -> None:
    raise SystemExit(128 + signal_number)  # the status a shell shows for a process the signal killed
