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

`run_api` is what `post-train run` and `post-train compare` use: the configured API, a server
already answering at the default address, or Prefect's temporary server given more time than
Prefect's own 20 s, which a loaded machine exceeds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Mapping
from urllib.parse import urlsplit

import httpx

DEFAULT_API_URL = "http://127.0.0.1:4200/api"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "0.0.0.0", "::1"}
# The first start of a server runs its database migrations: 20 s or more on 2 cores.
STARTUP_TIMEOUT_S = 180.0
EPHEMERAL_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
EPHEMERAL_TIMED_OUT = "Timed out while attempting to connect to ephemeral Prefect API server"
"""How Prefect 3.8's temporary server says it did not answer in time (`SubprocessASGIServer.start`)."""


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
        time.sleep(0.5)
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


@contextmanager
def run_api() -> Iterator[str | None]:
    """The Prefect API one run reports to, inside the block.

    `PREFECT_API_URL` (environment or profile) when set; else a server already answering at
    http://127.0.0.1:4200/api (`prefect server start`, `make serve`: the run shows up there live, and no second
    server opens the same database); else (None) Prefect's temporary server, which Prefect starts when the flow
    begins, given `ephemeral_startup_timeout()` seconds; if it does not answer in time, a one-line `ServerError`.
    """
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    configured = configured_api_url()
    if configured:
        yield configured
        return
    if is_healthy(DEFAULT_API_URL):
        print(f"Using the Prefect server at {DEFAULT_API_URL}", flush=True)
        with reporting_to(DEFAULT_API_URL) as url:
            yield url
        return
    timeout = ephemeral_startup_timeout()
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: timeout}):
        try:
            yield None
        except RuntimeError as error:
            if EPHEMERAL_TIMED_OUT not in str(error):
                raise
            from prefect.server.api.server import SubprocessASGIServer

            SubprocessASGIServer().stop()  # the server that was too slow: still starting, and nobody's now
            raise ServerError(
                f"Prefect's temporary API server did not answer within {timeout} s; give it longer "
                f"({EPHEMERAL_TIMEOUT_ENV}=600) or start a server (`prefect server start` in another shell, then "
                f"export PREFECT_API_URL={DEFAULT_API_URL})"
            ) from None


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
