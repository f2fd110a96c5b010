"""Stage commands forked from a process that has already imported their libraries (`compute.warm_start`).

A fresh `python -m tasks.<stage>` spends ~9 s importing torch, transformers and MLflow and ~2 s in the
interpreter's teardown; at demo scale that is more than a stage's training. A warm server (this module run as
`python -m post_train.executors.warm <control fd>`) imports those libraries once, then forks a child for each
command it is sent. The child is what the fresh process would have been: it runs the module as `__main__` with
the command's arguments, working directory and output, and exits with the module's status after the `atexit`
handlers (MLflow's among them), skipping only the teardown of the interpreter's objects.

Some libraries read environment variables when imported (OpenMP its thread count, huggingface_hub its offline
mode), so a server serves the environment and working directory it was started with, up to the variables no
preloaded library reads at import (`READ_WHEN_USED`); each child gets its command's environment exactly.
Only third-party libraries are preloaded: the project's modules, whose source is the stages' cache keys, are
imported from disk by each child.

The server is stdlib only until it preloads, and single-threaded: it forks, and reaps its children, from one
loop. It stops taking commands when its client closes the control socket (the client process ended) and exits
once the children it started have exited.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import json
import os
import runpy
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Mapping

PRELOAD = (
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "accelerate",
    "mlflow",
    "mlflow.tracking",
    "mlflow.store.tracking.sqlalchemy_store",  # a local store's backend, ~1.3 s: imported on a run's first call
    "git",  # MLflow tags a run with the source's git commit
    "trl.data_utils",  # the chat-template rendering helpers; trl scans every installed package at import
    "pandas",
    "matplotlib.pyplot",
    "datasets",
)
"""What every stage imports and takes seconds to import: a server's default preload."""
REAP_INTERVAL_S = 0.05
"""How often the server looks for children that have exited: the latency a stage's exit status has."""
READ_WHEN_USED = ("PREFECT_", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "_MLFLOW_", "TORCHINDUCTOR_CACHE_DIR")
"""Variables (or prefixes) a command's environment may differ in from its server's: Prefect is not preloaded;
MLflow reads its tracking and registry URIs on each use, and sets its private ones (a telemetry session) itself;
torch sets and reads its compile cache directory when it first compiles (the flow's process sets it during a run)."""
MAX_REQUEST_BYTES = 1 << 20
_STATUS = struct.Struct("!q")


def _read_int(connection: socket.socket) -> int | None:
    """The next integer on `connection`; None at its end."""
    data = b""
    while len(data) < _STATUS.size:
        chunk = connection.recv(_STATUS.size - len(data))
        if not chunk:
            return None
        data += chunk
    return _STATUS.unpack(data)[0]


class ForkedProcess:
    """A command forked by a warm server, with what `run_command` uses of a `subprocess.Popen`."""

    UNKNOWN_STATUS = -1
    """The status when the server ended before the command did (it alone could learn the command's)."""

    def __init__(self, pid: int, status: socket.socket):
        self.pid = pid
        self.returncode: int | None = None
        self.stdout: IO[bytes] | None = None  # the read ends of its pipes, when the caller made pipes
        self.stderr: IO[bytes] | None = None
        self._status = status

    def _receive(self) -> int:
        code = _read_int(self._status)
        self._status.close()
        self.returncode = self.UNKNOWN_STATUS if code is None else code
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._status], [], [], 0)[0]:
            return self._receive()
        return self.returncode

    def wait(self) -> int:
        return self.returncode if self.returncode is not None else self._receive()

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:  # it has exited already
            pass


class WarmServer:
    """The client's side of one server: starts it, and forks commands from it."""

    def __init__(self, env: Mapping[str, str], cwd: Path, preload: tuple[str, ...] | None = None):
        """A server in `env` and `cwd` that imports `preload` (default `PRELOAD`) before its first fork."""
        self.cwd = cwd
        preload = PRELOAD if preload is None else preload
        self._control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno()), *preload],
                env={**env, "PYTHONUNBUFFERED": "1"},  # the children's output streams, as `run_command` makes them
                cwd=cwd,
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        self._lock = threading.Lock()
        self.claimed = False
        """Whether a caller of `server` or `fork` has asked for it (`started_early` starts one nobody has yet)."""
        self._sent = False

    def alive(self) -> bool:
        """Whether it takes commands: running, and not closed."""
        return self._control.fileno() != -1 and self.process.poll() is None

    def send(
        self, module: str, arguments: list[str], env: Mapping[str, str], stdout: int, stderr: int
    ) -> socket.socket:
        """Send the server `python -m <module> <arguments>` to fork in `env`, writing to the file descriptors
        `stdout` and `stderr`; the socket its pid and then its exit status will come on."""
        request = {"module": module, "arguments": arguments, "cwd": str(self.cwd), "env": dict(env)}
        request["env"]["PYTHONUNBUFFERED"] = "1"
        message = json.dumps(request).encode()
        mine, theirs = socket.socketpair()
        with theirs, self._lock:
            socket.send_fds(self._control, [message], [stdout, stderr, theirs.fileno()])
            self._sent = True
        return mine

    def started(self, status: socket.socket, module: str) -> ForkedProcess:
        """The command sent with `status` once forked (the server's first command waits for its preload)."""
        pid = _read_int(status)
        if pid is None:
            status.close()
            raise RuntimeError(f"the warm server (pid {self.process.pid}) ended before it forked {module}")
        return ForkedProcess(pid, status)

    def fork(
        self, module: str, arguments: list[str], env: Mapping[str, str], stdout: int, stderr: int
    ) -> ForkedProcess:
        """Start `python -m <module> <arguments>` (see `send`). The pipes' read ends, when the caller made pipes,
        are the caller's to attach to the result."""
        return self.started(self.send(module, arguments, env, stdout, stderr), module)

    def close(self) -> None:
        """Take no more commands; the server exits once its running commands have, at once if it was sent none
        (its imports, if still running, would be for nothing)."""
        with self._lock:
            self._control.close()
            if not self._sent:
                self.process.terminate()
                self.process.wait()


_servers: dict[tuple[tuple[tuple[str, str], ...], str], WarmServer] = {}
_servers_lock = threading.Lock()


def _server_key(env: Mapping[str, str], cwd: Path) -> tuple[tuple[tuple[str, str], ...], str]:
    return tuple(sorted(item for item in env.items() if not item[0].startswith(READ_WHEN_USED))), str(cwd)


def _running_server(env: Mapping[str, str], cwd: Path, claim: bool = True) -> WarmServer:
    """Under `_servers_lock`: the server for `env` and `cwd`, started if there is none, which closes the one that
    serves another environment (a flow uses one; a closed server still runs the commands it was sent)."""
    key = _server_key(env, cwd)
    found = _servers.get(key)
    if found is None or not found.alive():
        for old in _servers.values():
            old.close()
        _servers.clear()
        found = _servers[key] = WarmServer(env, cwd)
    found.claimed = found.claimed or claim
    return found


def server(env: Mapping[str, str], cwd: Path) -> WarmServer:
    """A running server for commands in `env` and `cwd` (see `_running_server`)."""
    with _servers_lock:
        return _running_server(env, cwd)


@contextmanager
def started_early(env: Mapping[str, str], cwd: Path) -> Iterator[WarmServer]:
    """A server for `env` and `cwd` started before it is known whether anything will fork from it: while a command
    checks its inputs on one core, the server imports on the other. It is closed (stopped, having been sent
    nothing) when the block ends unless a `server` or `fork` call inside the block asked for it: the inputs were
    bad, or their configuration forks from no server or from one in another environment."""
    with _servers_lock:
        early = _running_server(env, cwd, claim=False)
    try:
        yield early
    finally:
        with _servers_lock:
            if not early.claimed:
                early.close()
                if _servers.get(_server_key(env, cwd)) is early:
                    del _servers[_server_key(env, cwd)]


def fork(
    env: Mapping[str, str], cwd: Path, module: str, arguments: list[str], stdout: int, stderr: int
) -> ForkedProcess:
    """`WarmServer.fork` on the server for `env` and `cwd`, sent under the lock that replaces servers: another
    thread's command in another environment cannot close the chosen server before it has the command."""
    with _servers_lock:
        chosen = _running_server(env, cwd)
        status = chosen.send(module, arguments, env, stdout, stderr)
    return chosen.started(status, module)


def exit_status(exit: SystemExit) -> int:
    """What the interpreter makes of `sys.exit(code)`: None is 0, an int itself, anything else printed and 1."""
    if exit.code is None:
        return 0
    if isinstance(exit.code, int):
        return exit.code
    print(exit.code, file=sys.stderr)
    return 1


def _run_child(request: dict, stdout: int, stderr: int) -> None:
    """In the forked child: become `python -m <module> <arguments>` and exit with its status."""
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    os.close(stdout)
    os.close(stderr)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.path[0] = request["cwd"]  # as `python -m` puts it, in place of the server's own entry
    sys.argv = [request["module"], *request["arguments"]]
    code = 0
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        code = exit_status(exit)
    except BaseException:
        traceback.print_exc()
        code = 1
    _end(code)


def _end(code: int) -> None:
    """Exit after the atexit handlers (MLflow's) but without the interpreter's teardown of every module's objects
    (~2.4 s with torch and MLflow loaded), whose memory the operating system takes back at once."""
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)


def _reap(status_of: dict[int, socket.socket]) -> None:
    """Send each exited child's status to its client."""
    while status_of:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        connection = status_of.pop(pid, None)
        if connection is not None:
            try:
                connection.sendall(_STATUS.pack(os.waitstatus_to_exitcode(status)))
            except OSError:  # the client is gone
                pass
            connection.close()


def prime_model_loading() -> None:
    """Save and load a one-layer Llama, so that what transformers sets up at a process's first `from_pretrained`
    is done once in the server and inherited by every child: its checkpoint-conversion rules for every
    architecture (~1,000 weight renamings, each compiling regular expressions) and the compiled patterns of the
    model's own. Measured in forked children on 2 cores: a demo model's first load 0.55-0.8 s unprimed,
    0.03 s primed, for ~0.2 s once here. Silent, and the random state the children inherit is left as it was."""
    import contextlib
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tiny = LlamaConfig(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
    )
    with (
        open(os.devnull, "w") as quiet,
        contextlib.redirect_stdout(quiet),
        contextlib.redirect_stderr(quiet),  # transformers' progress bars
        torch.random.fork_rng(devices=[]),  # the initialisation draws from torch's generator
        tempfile.TemporaryDirectory() as directory,
    ):
        AutoModelForCausalLM.from_config(tiny).save_pretrained(directory)
        AutoModelForCausalLM.from_pretrained(directory)


def serve(control: socket.socket, preload: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the children; the server ends with its client
    for name in preload:
        importlib.import_module(name)
    if "transformers" in preload:
        prime_model_loading()
    # Out of every collection from here on, in the server and in its children: a child's full collection would
    # otherwise traverse the ~660k objects it inherits, writing to each one's header and so copying the pages
    # it shares with the server (a forked stage's first MLflow store took 0.56 s instead of 0.16 s).
    gc.freeze()
    status_of: dict[int, socket.socket] = {}
    accepting = True
    while accepting or status_of:
        readable = select.select([control] if accepting else [], [], [], REAP_INTERVAL_S)[0]
        if readable:
            message, fds, _, _ = socket.recv_fds(control, MAX_REQUEST_BYTES, 3)
            if not message:
                accepting = False
                control.close()
            else:
                stdout, stderr, status = fds
                pid = os.fork()
                if pid == 0:
                    control.close()
                    os.close(status)
                    for connection in status_of.values():
                        connection.close()
                    _run_child(json.loads(message), stdout, stderr)
                os.close(stdout)
                os.close(stderr)
                connection = socket.socket(fileno=status)
                connection.sendall(_STATUS.pack(pid))
                status_of[pid] = connection
        _reap(status_of)


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])), sys.argv[2:])
    _end(0)  # a client that waits for the output pipes it shares with the server waits for this exit
