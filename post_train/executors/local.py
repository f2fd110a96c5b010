"""`compute.backend: local`: the stage's command in a child process here, `accelerate launch` for several processes.

Given an `on_line` callback, the command's output is streamed (`run_command`): every chunk is echoed to this
process's stdout/stderr as it arrives, progress bars included, and each completed line goes to `on_line` (a
flow's logger), with a progress bar's redraws thinned to every `PROGRESS_EVERY`-th.
"""

from __future__ import annotations

import codecs
import functools
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Mapping

from post_train.config import PipelineConfig
from post_train.executors import warm

MAIN_PROCESS_PORT = 29500
PROGRESS_EVERY = 10
"""A progress bar's redraws per line that reaches `on_line`: tqdm redraws up to 10 times a second (`mininterval`)."""
PIPE_GRACE_S = 5.0
"""How long the output of a command that has exited is still read: a process it left behind may hold its pipes."""
_TERMINATORS = re.compile(r"(\r\n|\n|\r)")


class OutputLines:
    """The lines of a stream that arrives in chunks, as a log should see them.

    tqdm draws a bar as `\\r<state>` over and over and ends it with `\\n`; a log wants the final state and an
    occasional intermediate one, not every redraw. A text ended by `\\n` (or `\\r\\n`) is a line; one ended by
    a lone `\\r` is a redraw, kept when it is the `progress_every`-th since the last line or kept redraw. Blank
    lines and trailing spaces (tqdm pads a shorter redraw) are dropped.
    """

    def __init__(self, progress_every: int = PROGRESS_EVERY):
        self.progress_every = progress_every
        self.pending = ""
        self.redraws = 0

    def feed(self, text: str) -> list[str]:
        """The lines and kept redraws that `text` completes."""
        parts = _TERMINATORS.split(self.pending + text)
        self.pending = parts.pop()
        if parts and parts[-1] == "\r" and not self.pending:  # maybe the first half of a `\r\n`: wait for more
            parts.pop()
            self.pending = parts.pop() + "\r"
        lines = []
        for segment, terminator in zip(parts[::2], parts[1::2]):
            segment = segment.rstrip()
            if terminator != "\r":
                self.redraws = 0
                if segment:
                    lines.append(segment)
            elif segment:
                self.redraws += 1
                if self.redraws % self.progress_every == 0:
                    lines.append(segment)
        return lines

    def close(self) -> list[str]:
        """The unterminated rest, as a line."""
        rest, self.pending = self.pending.rstrip(), ""
        return [rest] if rest else []


def _pump(pipe: IO[bytes], echo: IO[str], lines: queue.Queue, progress_every: int) -> None:
    """Echo `pipe` to `echo` as it arrives and put its lines on `lines`, then None at its end."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    splitter = OutputLines(progress_every)
    with pipe:
        while chunk := pipe.read1(65536):
            text = decoder.decode(chunk)
            echo.write(text)
            echo.flush()
            for line in splitter.feed(text):
                lines.put(line)
    for line in splitter.feed(decoder.decode(b"", final=True)) + splitter.close():
        lines.put(line)
    lines.put(None)


def _stream(process: Any, on_line: Callable[[str], None], progress_every: int) -> int:
    """Echo and pass on the piped output of a started `process` (a `Popen`, or a `ForkedProcess`) until it ends."""
    lines: queue.Queue[str | None] = queue.Queue()
    try:
        for pipe, echo in ((process.stdout, sys.stdout), (process.stderr, sys.stderr)):
            threading.Thread(target=_pump, args=(pipe, echo, lines, progress_every), daemon=True).start()
        open_pipes, deadline = 2, None
        while open_pipes:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                if deadline is None and process.poll() is not None:
                    deadline = time.monotonic() + PIPE_GRACE_S
                if deadline is not None and time.monotonic() > deadline:
                    break
                continue
            if line is None:
                open_pipes -= 1
            else:
                on_line(line)
        return process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise


def run_command(
    command: list[str],
    env: Mapping[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
    cwd: Path | str | None = None,
    progress_every: int = PROGRESS_EVERY,
) -> int:
    """Run `command` and return its exit status; with `on_line`, stream its output (see `OutputLines`).

    Without `on_line` the command writes to this process's terminal directly, as `subprocess.run` does. With it,
    stdout and stderr are piped (Python children unbuffered, so lines arrive as they are printed), echoed to
    `sys.stdout`/`sys.stderr`, and `on_line` is called from the calling thread only, since a logger may depend on
    the caller's context (Prefect's run context is a context variable, which threads do not inherit). Interrupted
    (Ctrl-C, a cancelled task), the command is killed, as `subprocess.run` does.
    """
    if on_line is None:
        return subprocess.run(command, env=env, cwd=cwd).returncode
    environment = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=environment, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return _stream(process, on_line, progress_every)


def run_forked(
    start: Callable[[int, int], warm.ForkedProcess],
    on_line: Callable[[str], None] | None = None,
    progress_every: int = PROGRESS_EVERY,
) -> int:
    """`run_command` for a command a warm server forks: `start(stdout fd, stderr fd)` sends it (`warm.fork`)."""
    if on_line is None:
        process = start(sys.stdout.fileno(), sys.stderr.fileno())
        try:
            return process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
    (stdout_read, stdout_write), (stderr_read, stderr_write) = os.pipe(), os.pipe()
    try:
        process = start(stdout_write, stderr_write)
    except BaseException:
        os.close(stdout_read)
        os.close(stderr_read)
        raise
    finally:
        os.close(stdout_write)
        os.close(stderr_write)
    process.stdout, process.stderr = os.fdopen(stdout_read, "rb"), os.fdopen(stderr_read, "rb")
    return _stream(process, on_line, progress_every)


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

    def environment(self) -> dict[str, str]:
        """A stage command's environment: this process's, with `compute.torch_threads` applied."""
        if self.compute.torch_threads is None:
            return dict(os.environ)
        threads = str(self.compute.torch_threads)
        return os.environ | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}

    def _forks(self, distributed: bool) -> bool:
        """Whether a stage's command is forked from the warm server: one process, and `compute.warm_start`."""
        return self.compute.warm_start and (not distributed or self.compute.num_processes == 1)

    def warm_up(self, distributed: bool) -> None:
        """Start the warm server a stage's command will fork from, so that its imports overlap other work."""
        if self._forks(distributed):
            warm.server(self.environment(), Path.cwd())

    def run(
        self,
        stage: str,
        module: str,
        inputs: Path,
        outputs: Path,
        distributed: bool,
        on_line: Callable[[str], None] | None = None,
    ) -> tuple[int, str]:
        """Run the stage's command here; with `on_line`, its output lines go there too (`run_command`).

        One process with `compute.warm_start` is forked from the warm server (`warm`), else a fresh process.
        """
        if self._forks(distributed):
            arguments = ["--inputs", str(inputs), "--outputs", str(outputs)]
            start = functools.partial(warm.fork, self.environment(), Path.cwd(), module, arguments)
            return run_forked(start, on_line), f"`python -m {module} {' '.join(arguments)}` (forked from a warm server)"
        processes = self.compute.num_processes if distributed else 1
        accelerate_config = self.compute.accelerate_config_path() if distributed else None
        command = stage_command(module, inputs, outputs, processes, accelerate_config)
        return run_command(command, self.environment(), on_line), f"`{' '.join(command)}`"
