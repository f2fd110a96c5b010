"""The `post-train` command's process (`[project.scripts]`): `post_train.cli.main`, then an exit without the
interpreter's teardown."""

from __future__ import annotations

import atexit
import os
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
    from post_train.cli import main as cli
    from post_train.executors.warm import exit_status

    try:
        status = cli()
    except SystemExit as exit:
        status = exit_status(exit)
    except KeyboardInterrupt:
        status = 130  # the shell's code for an interrupt
        raise
