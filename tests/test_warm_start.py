"""Commands forked from a warm server behave as the fresh `python -m` they replace."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from post_train.config import load_config
from post_train.executors import warm
from post_train.executors.local import LocalExecutor, run_command, run_forked
from post_train.stages import SFT, RunContext, run_stage
from tests.conftest import smoke_overrides
from tests.test_faults import assert_bit_identical

REPO = Path(__file__).resolve().parents[1]
COMMAND = """
import atexit, os, sys
atexit.register(lambda: open("atexit-ran", "w").write("yes"))
print("argv", sys.argv[1:])
print("cwd", os.getcwd())
print("env", os.environ.get("WARM_TEST"), "GONE" in os.environ)
print("to stderr", file=sys.stderr)
outcome = sys.argv[1]
if outcome == "raise":
    raise ValueError("broken")
if outcome == "sleep":
    import time
    print("sleeping", flush=True)
    time.sleep(60)
sys.exit(int(outcome) if outcome.isdigit() else outcome)
"""


@pytest.fixture
def command_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "warm_command.py").write_text(textwrap.dedent(COMMAND))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def forked(server: warm.WarmServer, arguments: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    lines: list[str] = []
    return run_forked(functools.partial(server.fork, "warm_command", arguments, env), lines.append), lines


def test_a_forked_command_gets_its_arguments_directory_environment_output_and_exit_status(command_dir: Path):
    env = {**os.environ, "WARM_TEST": "one", "GONE": "x"}
    server = warm.WarmServer(env, command_dir, preload=("json",))
    try:
        cold_lines: list[str] = []
        cold = run_command([sys.executable, "-m", "warm_command", "3"], env, cold_lines.append, cwd=command_dir)
        (command_dir / "atexit-ran").unlink()
        status, lines = forked(server, ["3"], env)
        assert (status, sorted(lines)) == (cold, sorted(cold_lines)) == (3, sorted(cold_lines))
        assert f"cwd {command_dir}" in lines and "to stderr" in lines and "env one True" in lines
        assert (command_dir / "atexit-ran").read_text() == "yes"  # the atexit handlers ran, as at a normal exit

        # Each command gets its own environment exactly, not the server's.
        changed = {key: value for key, value in env.items() if key != "GONE"} | {"WARM_TEST": "two"}
        status, lines = forked(server, ["0"], changed)
        expected = ["argv ['0']", f"cwd {command_dir}", "env two False", "to stderr"]
        assert (status, sorted(lines)) == (0, sorted(expected))

        status, lines = forked(server, ["raise"], env)
        assert status == 1 and "Traceback (most recent call last):" in lines and "ValueError: broken" in lines
        status, lines = forked(server, ["a message"], env)
        assert status == 1 and "a message" in lines
    finally:
        server.close()


def test_a_forked_command_can_be_killed_and_the_server_ends_after_its_last_command(command_dir: Path):
    server = warm.WarmServer(dict(os.environ), command_dir, preload=())
    devnull = os.open(os.devnull, os.O_WRONLY)
    process = server.fork("warm_command", ["sleep"], dict(os.environ), devnull, devnull)
    os.close(devnull)
    server.close()  # no more commands; the running one keeps its status channel
    time.sleep(1)
    assert not server.alive() and server.process.poll() is None and process.poll() is None
    process.kill()
    assert process.wait() == -9
    server.process.wait(timeout=10)


def test_one_server_per_environment_up_to_what_is_read_when_used(command_dir: Path, monkeypatch):
    monkeypatch.setattr(warm, "PRELOAD", ())
    env = dict(os.environ)
    first = warm.server(env, command_dir)
    used_later = {
        "MLFLOW_TRACKING_URI": "sqlite:///other.db",
        "PREFECT_API_URL": "x",
        "_MLFLOW_TELEMETRY_X": "y",
        "TORCHINDUCTOR_CACHE_DIR": "/tmp/z",  # torch in the flow's process sets it mid-run
    }
    assert warm.server({**env, **used_later}, command_dir) is first
    other = warm.server({**env, "OMP_NUM_THREADS": "1"}, command_dir)
    assert other is not first
    first.process.wait(timeout=10)  # the replaced server ends: nothing was running on it
    assert warm.server({**env, "OMP_NUM_THREADS": "1"}, command_dir) is other
    other.close()


def test_a_server_started_early_is_stopped_at_the_end_of_its_block_unless_asked_for(command_dir: Path, monkeypatch):
    env = dict(os.environ)
    with warm.started_early(env, command_dir) as unwanted:  # the inputs were refused
        assert unwanted.alive()
    assert unwanted.process.wait(timeout=5) == -signal.SIGTERM  # mid-preload: importing torch takes longer
    assert warm.server(env, command_dir) is not unwanted
    warm.server(env, command_dir).close()

    monkeypatch.setattr(warm, "PRELOAD", ())
    with warm.started_early(env, command_dir) as kept:
        assert warm.server(env, command_dir) is kept  # the configuration forks in this environment
    assert kept.alive()
    status, _ = forked(kept, ["0"], env)
    assert status == 0
    kept.close()  # it ran a command: it ends on its own, not terminated
    assert kept.process.wait(timeout=10) == 0

    with warm.started_early(env, command_dir) as replaced:
        other = warm.server({**env, "OMP_NUM_THREADS": "1"}, command_dir)  # another environment's server
    assert replaced.process.wait(timeout=5) == -signal.SIGTERM and other.alive()
    other.close()


def test_the_server_started_before_the_checks_serves_the_environment_of_the_stages_that_follow(tmp_path: Path):
    """`post-train run` starts its server before it imports anything heavy; what it imports until the stages fork
    may set only variables that are read when used, or the first stage would start (and wait for) a second server."""
    script = """
import json, os, sys
before = dict(os.environ)
from post_train.validate import validate
assert not validate("lowlr", "smoke", []).problems
import flows.pipeline
import tasks.prepare  # the stage that runs in the flow's process
from post_train.executors.warm import _server_key
print(json.dumps([_server_key(before, "."), _server_key(dict(os.environ), ".")]))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    early, later = json.loads(done.stdout.splitlines()[-1])
    assert early == later, {tuple(item) for item in later} ^ {tuple(item) for item in early}


def test_the_thread_count_of_a_forked_torch_is_its_environments(command_dir: Path):
    (command_dir / "threads.py").write_text("import torch\nprint(torch.get_num_threads())\n")
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        server = warm.WarmServer(env, command_dir, preload=("torch",))
        lines: list[str] = []
        assert run_forked(functools.partial(server.fork, "threads", [], env), lines.append) == 0
        server.close()
        assert lines == [threads]


def test_a_forked_command_leaves_what_it_inherits_out_of_its_garbage_collections(command_dir: Path):
    """Its collections then neither traverse nor copy the server's objects (see `warm.serve`)."""
    (command_dir / "frozen_count.py").write_text("import gc\nprint(gc.get_freeze_count())\n")
    env = dict(os.environ)
    server = warm.WarmServer(env, command_dir, preload=("json",))
    try:
        lines: list[str] = []
        status = run_forked(functools.partial(server.fork, "frozen_count", [], env), lines.append)
    finally:
        server.close()
    fresh = subprocess.run([sys.executable, "-m", "frozen_count"], cwd=command_dir, capture_output=True, text=True)
    assert (status, fresh.stdout) == (0, "0\n")
    assert int(lines[0]) > 10_000  # the interpreter's objects and the preloaded modules'


def test_priming_builds_the_model_loading_rules_silently_and_leaves_the_random_state_as_it_was():
    """What a server with transformers does once before its first fork; the children inherit the rules built."""
    script = textwrap.dedent(
        """
        import torch
        from transformers import conversion_mapping
        from post_train.executors.warm import prime_model_loading
        state = torch.get_rng_state()
        assert conversion_mapping._checkpoint_conversion_mapping_cache is None
        prime_model_loading()
        assert conversion_mapping._checkpoint_conversion_mapping_cache is not None
        assert torch.equal(torch.get_rng_state(), state)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == result.stderr == ""


def test_a_warm_started_stage_trains_bit_identical_to_a_fresh_process(smoke_stages, mlflow_store, tmp_path: Path):
    _, data, base = smoke_stages
    trained = {}
    for warm_start in (True, False):
        overrides = {**smoke_overrides(tmp_path / str(warm_start)), "compute.warm_start": warm_start}
        config = load_config("lowlr", "smoke", overrides)
        context = RunContext(str(tmp_path / f"run-{warm_start}"))
        trained[warm_start] = run_stage(SFT, config, context, base_model_path=base.path, data=data)
    assert_bit_identical(trained[True].path, trained[False].path)
    assert trained[True].metrics == trained[False].metrics


def test_warm_start_chooses_between_a_fork_and_a_fresh_process(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(warm, "PRELOAD", ())
    outcomes = {}
    for warm_start in (False, True):
        config = load_config("lowlr", "smoke", {"compute.warm_start": warm_start})
        outcomes[warm_start] = LocalExecutor(config).run("sft", "json.tool", tmp_path / "in", tmp_path / "out", False)
    arguments = f"-m json.tool --inputs {tmp_path}/in --outputs {tmp_path}/out"
    assert outcomes[False] == (2, f"`{sys.executable} {arguments}`")
    status, description = outcomes[True]  # json.tool knows no --inputs: exit status 2 either way
    assert status == 2 and description.startswith(f"`python {arguments}`")
    assert description.endswith("(forked from a warm server)")


def test_commands_in_two_environments_from_two_threads_all_run(command_dir: Path, monkeypatch):
    """Each environment's command replaces the other's server; one already chosen still gets its command."""
    monkeypatch.setattr(warm, "PRELOAD", ())

    def run(threads: str) -> list[int]:
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        start = functools.partial(warm.fork, env, command_dir, "warm_command", ["0"])
        return [run_forked(start, lambda line: None) for _ in range(4)]

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(run, ["1", "2"])) == [[0] * 4, [0] * 4]


def test_a_server_is_started_ahead_only_for_stages_that_will_fork(monkeypatch):
    started = []
    monkeypatch.setattr(warm, "server", lambda env, cwd: started.append(cwd))
    several = LocalExecutor(load_config("lowlr", "smoke", {"compute.num_processes": 2}))
    several.warm_up(distributed=True)  # accelerate launch: nothing to fork
    assert started == []
    several.warm_up(distributed=False)  # evaluation runs in one process
    LocalExecutor(load_config("lowlr", "smoke", {"compute.warm_start": False})).warm_up(distributed=False)
    assert started == [Path.cwd()]
