"""A Prefect API to report to: for the operator path (`local_server`) and for one run from the shell (`run_api`).

`flows/serve.py` serves the deployments; `local_server` only makes sure there is a server to
serve them to. A server it starts runs `prefect server start` in its own process group, keeps
its SQLite database under `PREFECT_HOME` (default `~/.prefect/prefect.db`, the same database
in-process runs use), serves a UI that calls the API on the server's own port (`ui_api_url`), and is
stopped when the `local_server()` block exits, Ctrl-C included.

Why `prefect server start` in a process group of our own rather than the rest of Prefect's server management
(Prefect 3.8): `prefect server start --background` / `prefect server stop` keep one server per `PREFECT_HOME`
(a pid file), lose its output (pipes whose reading end closes when the command returns) and stop it with
one SIGTERM to one pid; `SubprocessASGIServer` (the temporary server) serves no UI, listens on
127.0.0.1 only and is stopped with a 5 s grace. Neither sets the UI's API URL from the port: with `--port N`
the UI still calls `PREFECT_SERVER_API_PORT` (4200) unless `PREFECT_UI_API_URL` says otherwise.

`run_api` is what `post-train run`, `compare` and `study` use: the configured API, a server already answering
at the default address, or a temporary server. That one is Prefect 3.8's own temporary server (the command and
environment of `SubprocessASGIServer._run_uvicorn_command`: the API without its UI, the services an ephemeral
server runs), started by us when the command begins rather than by Prefect when the flow's first call needs it:
its ~6 s start then overlaps the imports after the checks, the client never imports Prefect's server
package (~3 s), and it gets more time than Prefect's own 20 s, which a loaded machine exceeds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Mapping
from urllib.parse import urlsplit

import httpx

DEFAULT_API_URL = "http://127.0.0.1:4200/api"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "0.0.0.0", "::1"}
# The first start of a server runs its database migrations: 20 s or more on 2 cores.
STARTUP_TIMEOUT_S = 180.0
EPHEMERAL_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


class ServerError(RuntimeError):
    """No Prefect server could be reached or started."""


def configured_api_url() -> str | None:
    """`PREFECT_API_URL` from the environment or the active Prefect profile, if any."""
    from prefect.settings import PREFECT_API_URL

    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value() or None


def is_healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether `<api_url>/health` answers 200."""
    try:
        return httpx.get(f"{api_url.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def server_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]


def ui_api_url(host: str, port: int) -> str:
    """The API URL the UI of a server on `host:port` calls from the browser: that server's own `/api`.

    A server listening on every address (0.0.0.0, ::) is called at 127.0.0.1, the browser on this machine.
    """
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/api"


def server_environment(
    host: str, port: int, prefect_home: Path | str | None = None, environ: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """The environment of `prefect server start` on `host:port`: `environ` without usage reporting, without a
    client's `PREFECT_API_URL`, with `PREFECT_SERVER_UI_API_URL` (Prefect 3's name of `PREFECT_UI_API_URL`,
    `settings.server.ui.api_url`) set to `ui_api_url(host, port)`.

    Prefect defaults the UI's API URL to `PREFECT_API_URL`, else to `PREFECT_SERVER_API_HOST:PREFECT_SERVER_API_PORT`,
    never to `--port`: a server started with `--port N` would serve a UI that calls port 4200. An inherited
    `PREFECT_UI_API_URL` (an export made for another server) is dropped for the same reason.
    """
    env = {**environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)  # the server itself is no client of another one
    env.pop("PREFECT_UI_API_URL", None)
    env["PREFECT_SERVER_UI_API_URL"] = ui_api_url(host, port)
    if prefect_home is not None:
        env["PREFECT_HOME"] = str(prefect_home)
    return env


def start_server(
    host: str = "127.0.0.1",
    port: int = 4200,
    prefect_home: Path | str | None = None,
    log: IO[bytes] | int | None = None,
) -> subprocess.Popen:
    """`prefect server start` as a child process in its own process group (stop it with `stop_server`).

    `prefect_home` (default: the current `PREFECT_HOME`) holds its SQLite database; its UI calls the API on
    `port` (`server_environment`). Output goes to `log` (default: this process's stdout/stderr).
    """
    return subprocess.Popen(
        server_command(host, port),
        env=server_environment(host, port, prefect_home),
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # the terminal's Ctrl-C reaches us, not it: we stop it
    )


def wait_until_healthy(
    api_url: str, process: subprocess.Popen | None = None, timeout: float = STARTUP_TIMEOUT_S
) -> None:
    """Poll `/api/health` until it answers; fail early if `process` (the server) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_healthy(api_url):
            return
        if process is not None and process.poll() is not None:
            raise ServerError(
                f"`{' '.join(process.args)}` exited with status {process.returncode} before {api_url} was healthy"
            )
        time.sleep(0.1)
    raise ServerError(f"{api_url}/health did not answer within {timeout:.0f} s")


def stop_process_group(process: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process group `process` leads, then SIGKILL what is left after `grace` seconds."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:  # children of the leader too, even when the leader has exited
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def stop_server(process: subprocess.Popen) -> None:
    stop_process_group(process)


@contextmanager
def reporting_to(url: str) -> Iterator[str]:
    """`PREFECT_API_URL` set to `url` in `os.environ` and in Prefect's settings inside the block, so this process
    and the processes it starts talk to that server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


def ephemeral_startup_timeout() -> int:
    """Seconds the temporary server gets to answer: `PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`, else 180."""
    return int(os.environ.get(EPHEMERAL_TIMEOUT_ENV) or STARTUP_TIMEOUT_S)


TEMPORARY_SERVER_ENV = {
    "PREFECT_SERVER_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}
"""What Prefect 3.8 sets for its temporary server: no UI, and the services of an ephemeral server."""


def temporary_server_command(port: int) -> list[str]:
    """Prefect 3.8's temporary server on 127.0.0.1:`port` (`SubprocessASGIServer._run_uvicorn_command`)."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RunApi:
    """The API a run reports to; `ready()` before the flow starts."""

    url: str
    server: subprocess.Popen | None = None
    """The temporary server `run_api` started, still coming up."""
    timeout: float = STARTUP_TIMEOUT_S

    def ready(self) -> str:
        """The URL, once a temporary server answers there; a one-line `ServerError` saying what to do if it does
        not answer within `timeout` seconds or exits first."""
        if self.server is not None:
            try:
                wait_until_healthy(self.url, self.server, self.timeout)
            except ServerError:
                exited = self.server.poll()
                problem = f"exited ({exited})" if exited is not None else f"did not answer within {self.timeout:.0f} s"
                raise ServerError(
                    f"Prefect's temporary API server {problem}; give it longer ({EPHEMERAL_TIMEOUT_ENV}=600) or "
                    f"start a server (`prefect server start` in another shell, then export "
                    f"PREFECT_API_URL={DEFAULT_API_URL})"
                ) from None
        return self.url


@contextmanager
def run_api() -> Iterator[RunApi]:
    """The Prefect API one run reports to, inside the block.

    `PREFECT_API_URL` (environment or profile) when set; else a server already answering at
    http://127.0.0.1:4200/api (`prefect server start`, `make serve`: the run shows up there live, and no second
    server opens the same database); else a temporary server started now on a free port with the default database
    (under `PREFECT_HOME`), given `ephemeral_startup_timeout()` seconds by `ready()`, and stopped when the block
    exits. Inside the block `PREFECT_API_URL` names the server chosen.
    """
    configured = configured_api_url()
    if configured:
        yield RunApi(configured)
        return
    if is_healthy(DEFAULT_API_URL):
        print(f"Using the Prefect server at {DEFAULT_API_URL}", flush=True)
        with reporting_to(DEFAULT_API_URL) as url:
            yield RunApi(url)
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    print(f"Starting a temporary Prefect server on {url} (`prefect server start` keeps one running)", flush=True)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **TEMPORARY_SERVER_ENV}
    server = subprocess.Popen(temporary_server_command(port), env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        with reporting_to(url):
            yield RunApi(url, server, ephemeral_startup_timeout())
    finally:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        # Their own drain runs at interpreter exit, when this server is gone: they would retry for a minute.
        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
        stop_process_group(server, grace=5.0)


@contextmanager
def local_server(api_url: str | None = None, timeout: float = STARTUP_TIMEOUT_S) -> Iterator[str]:
    """Yield the URL of a healthy Prefect API, starting a local server if none answers there.

    `api_url` defaults to `PREFECT_API_URL` (from the environment or the Prefect profile), else
    http://127.0.0.1:4200/api. A server already answering is reused and left running; one this
    block starts (only for a local address) is stopped when the block exits. Inside the block,
    `PREFECT_API_URL` is set in `os.environ` and in Prefect's settings, so this process and the
    flow-run processes it starts talk to that server.
    """
    url = (api_url or configured_api_url() or DEFAULT_API_URL).rstrip("/")
    process = None
    if is_healthy(url):
        print(f"Using the Prefect server at {url}", flush=True)
    else:
        parts = urlsplit(url)
        if parts.hostname not in LOCAL_HOSTS:
            raise ServerError(f"no Prefect server answers at {url}, and it is not a local address to start one on")
        host, port = parts.hostname, parts.port or 4200
        print(f"Starting a Prefect server on {host}:{port} (database under PREFECT_HOME)...", flush=True)
        process = start_server(host if host != "localhost" else "127.0.0.1", port)
        try:
            wait_until_healthy(url, process, timeout)
        except BaseException:
            stop_server(process)
            raise
        print(f"Prefect server ready: UI at {url.removesuffix('/api')}", flush=True)
    try:
        with reporting_to(url):
            yield url
    finally:
        if process is not None:
            print("Stopping the Prefect server this process started...", flush=True)
            stop_server(process)
