"""The SkyPilot backend: task YAMLs SkyPilot accepts, the `sky` commands the launcher builds for
each stage and node count, the job life cycle (logs, status, cancel), a stage run end to end
through a stand-in `sky`, and the paper recipes.

The YAML check runs SkyPilot itself (`sky.Task.from_yaml`, offline) with the Python of the
SkyPilot virtual environment that `make sky-env` creates; it is skipped when that is absent.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from post_train.config import DEFAULT_CHAT_TEMPLATE, REPO_ROOT, ConfigError, load_config
from post_train.data import DataError
from post_train.executors import skypilot
from post_train.results import PreparedData, TrainedModel
from post_train.stage_io import StageFailed, read_result
from post_train.stages import RunContext, Stage, run_stage

SKY_PYTHON = REPO_ROOT / ".sky-venv" / "bin" / "python"
REMOTE_URI = "https://mlflow.example.com"


def sky_config(tmp_path: Path, **compute):
    """A smoke config on the skypilot backend, its bucket 'mounted' at tmp_path/bucket."""
    root = tmp_path / "bucket"
    root.mkdir(exist_ok=True)
    sky_bin = tmp_path / "sky"
    sky_bin.touch()
    overrides = {
        "compute.backend": "skypilot",
        "compute.bucket": "s3://my-bucket",
        "compute.remote_root": str(root),
        "compute.sky_bin": str(sky_bin),
        "runs_dir": str(root / "runs"),
        "cache_dir": str(root / "cache"),
    }
    for section in ("sft", "dpo", "base_model.train"):  # global batches that split over 4 nodes x 8 GPUs
        overrides.update({f"{section}.batch_size": 64, f"{section}.micro_batch_size": 1})
    overrides.update({f"compute.{key}": value for key, value in compute.items()})
    return load_config("lowlr", "smoke", overrides)


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def envs(command: list[str]) -> dict[str, str | None]:
    pairs = [command[i + 1] for i, part in enumerate(command) if part == "--env"]
    return {pair.partition("=")[0]: (pair.partition("=")[2] if "=" in pair else None) for pair in pairs}


# --- the task YAMLs -------------------------------------------------------------------------------

VALIDATE = textwrap.dedent("""
    import json, os, sys, yaml, sky
    from sky.client.cli.command import cli

    def parse(args):  # the real `sky` CLI's argument parsing, nothing run
        context = cli.make_context("sky", list(args))
        name, group, rest = cli.resolve_command(context, context.protected_args + context.args)
        group_context = group.make_context(name, rest, parent=context)
        name, command, rest = group.resolve_command(group_context, group_context.protected_args + group_context.args)
        return {"command": name, "params": command.make_context(name, rest, parent=group_context).params}

    payload = json.load(sys.stdin)
    os.environ.update(payload["environ"])
    out = {"yamls": {}, "commands": [parse(args) for args in payload["commands"]]}
    for path in payload["yamls"]:
        try:
            task = sky.Task.from_yaml(path)
        except Exception as error:
            out["yamls"][path] = {"error": type(error).__name__ + ": " + str(error)[:300]}
            continue
        moved = sky.Task.from_yaml_config(yaml.safe_load(open(path)), env_overrides=[
            ("POST_TRAIN_BUCKET", "gs://other"), ("POST_TRAIN_REMOTE_ROOT", "/mnt/other")])
        resources = list(task.resources)[0]
        out["yamls"][path] = {
            "num_nodes": task.num_nodes, "envs": dict(task.envs), "accelerators": resources.accelerators,
            "disk_size": resources.disk_size, "job_recovery": resources.job_recovery,
            "mounts": {k: [v.source, str(v.mode)] for k, v in task.storage_mounts.items()},
            "moved_mounts": {k: v.source for k, v in moved.storage_mounts.items()},
            "run": task.run, "setup": task.setup,
        }
    print(json.dumps(out, default=str))
""")


def test_every_sky_yaml_validates_and_every_sky_command_parses_with_skypilot(tmp_path: Path):
    if not SKY_PYTHON.is_file():
        pytest.skip(
            f"no SkyPilot virtual environment at {SKY_PYTHON.parent.parent}: run `make sky-env` (or `make test-sky`)"
        )
    broken = tmp_path / "broken.yaml"
    broken.write_text("resources:\n  accelerators: H100:8\n  disk: 100\nrun: echo\n")  # `disk` is not SkyPilot's key
    yamls = sorted(str(path) for path in (REPO_ROOT / "sky").glob("*.yaml"))
    assert yamls, "sky/ holds no task YAML"
    config = sky_config(
        tmp_path, num_nodes=2, infra="gcp/us-central1", use_spot=True, accelerate_config="deepspeed_zero3"
    )
    environ = {"MLFLOW_TRACKING_URI": REMOTE_URI, "HF_TOKEN": "hf_x"}
    commands = [
        skypilot.submit_command(config, "tasks.dpo", "/b/in.json", "/b/out.json", "post-train-dpo-1", True, environ),
        skypilot.logs_command(config, "post-train-dpo-1"),
        skypilot.queue_command(config),
        skypilot.cancel_command(config, "post-train-dpo-1"),
    ]
    payload = {"yamls": [*yamls, str(broken)], "commands": [command[1:] for command in commands], "environ": environ}
    env = {**os.environ, "SKYPILOT_DISABLE_USAGE_COLLECTION": "1", "SKYPILOT_DISABLE_LOCAL_API_SERVER": "1"}
    completed = subprocess.run(
        [str(SKY_PYTHON), "-c", VALIDATE],
        input=json.dumps(payload),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])

    assert "error" in result["yamls"].pop(str(broken))  # validation is real: a wrong key is refused
    for path, task in result["yamls"].items():
        assert "error" not in task, f"{path}: {task.get('error')}"
    stage = result["yamls"][str(REPO_ROOT / "sky" / "stage.yaml")]
    assert stage["accelerators"] == {"H100": 8} and stage["disk_size"] == 512 and stage["num_nodes"] == 1
    assert stage["job_recovery"]["strategy"] == "EAGER_NEXT_REGION"
    assert stage["mounts"] == {"/post-train": ["s3://post-train-example", "StorageMode.MOUNT"]}
    assert stage["moved_mounts"] == {"/mnt/other": "gs://other"}  # the launcher's --env values move the mount
    assert "python -m post_train.executors.skypilot node" in stage["run"] and "requirements.lock" in stage["setup"]

    launch_, logs, queue, cancel = result["commands"]
    assert launch_["command"] == "launch" and launch_["params"]["entrypoint"] == [str(REPO_ROOT / "sky" / "stage.yaml")]
    params = launch_["params"]
    assert (
        params["name"],
        params["yes"],
        params["detach_run"],
        params["num_nodes"],
        params["gpus"],
        params["use_spot"],
        params["infra"],
        params["disk_size"],
    ) == ("post-train-dpo-1", True, True, 2, "H100:8", True, "gcp/us-central1", 512)
    assert dict(params["env"])["MLFLOW_TRACKING_URI"] == REMOTE_URI  # read from the environment by SkyPilot
    assert dict(params["env"])["ACCELERATE_CONFIG"] == "configs/accelerate/deepspeed_zero3.yaml"
    assert dict(params["secret"]) == {"HF_TOKEN": "hf_x"}
    assert (logs["command"], logs["params"]["name"], logs["params"]["follow"]) == ("logs", "post-train-dpo-1", True)
    assert (queue["command"], queue["params"]["all"], queue["params"]["output_format"]) == ("queue", True, "json")
    assert (cancel["command"], cancel["params"]["name"], cancel["params"]["yes"]) == (
        "cancel",
        "post-train-dpo-1",
        True,
    )


def test_the_task_declares_every_variable_the_launcher_sets(tmp_path: Path):
    declared = yaml.safe_load((REPO_ROOT / "sky" / "stage.yaml").read_text())["envs"]
    command = skypilot.submit_command(
        sky_config(tmp_path), "tasks.sft", "in.json", "out.json", "job", True, {"MLFLOW_TRACKING_URI": REMOTE_URI}
    )
    assert set(envs(command)) <= set(declared)


# --- the sky commands ----------------------------------------------------------------------------


@pytest.mark.parametrize("nodes", [1, 2, 4])
@pytest.mark.parametrize(
    ("stage", "module", "distributed"),
    [
        ("pretrain", "tasks.pretrain", True),
        ("sft", "tasks.sft", True),
        ("dpo", "tasks.dpo", True),
        ("evaluate", "tasks.evaluate", False),
    ],
)
def test_the_launch_command_for_each_stage_and_node_count(tmp_path: Path, stage, module, distributed, nodes):
    config = sky_config(tmp_path, num_nodes=nodes, accelerate_config="multi_gpu_fsdp", use_spot=True, infra="aws")
    inputs, outputs = (
        tmp_path / "bucket" / "runs" / stage / "inputs.json",
        tmp_path / "bucket" / "runs" / stage / "outputs.json",
    )
    environ = {"MLFLOW_TRACKING_URI": REMOTE_URI, "HF_TOKEN": "hf_secret", "PATH": "/usr/bin"}
    name = skypilot.job_name(stage)
    command = skypilot.submit_command(config, module, inputs, outputs, name, distributed, environ)

    assert name.startswith(f"post-train-{stage}-") and name == name.lower()
    assert command[:4] == [str(tmp_path / "sky"), "jobs", "launch", str(REPO_ROOT / "sky" / "stage.yaml")]
    assert {"--yes", "--detach-run", "--use-spot"} <= set(command)
    assert option(command, "--name") == name and option(command, "--workdir") == str(REPO_ROOT)
    assert option(command, "--infra") == "aws" and option(command, "--disk-size") == "512"
    assert option(command, "--num-nodes") == (str(nodes) if distributed else "1")
    assert option(command, "--gpus") == ("H100:8" if distributed else "H100:1")
    assert envs(command) == {
        "STAGE_MODULE": module,
        "STAGE_INPUTS": str(inputs),
        "STAGE_OUTPUTS": str(outputs),
        "STAGE_DISTRIBUTED": "1" if distributed else "0",
        "ACCELERATE_CONFIG": "configs/accelerate/multi_gpu_fsdp.yaml" if distributed else "",
        "POST_TRAIN_BUCKET": "s3://my-bucket",
        "POST_TRAIN_REMOTE_ROOT": str(tmp_path / "bucket"),
        "MLFLOW_TRACKING_URI": None,  # passed by name: SkyPilot reads the value from the environment
    }
    assert option(command, "--secret") == "HF_TOKEN" and "hf_secret" not in " ".join(command)
    assert REMOTE_URI not in " ".join(command)
    sky_env = skypilot.sky_environment(environ)
    assert sky_env["SKYPILOT_DISABLE_USAGE_COLLECTION"] == "1" and sky_env["MLFLOW_TRACKING_URI"] == REMOTE_URI


@pytest.mark.parametrize(
    ("nodes", "gpus", "rank", "distributed"),
    [(1, 1, 0, True), (1, 8, 0, True), (2, 8, 1, True), (4, 8, 3, True), (1, 8, 0, False)],
)
def test_each_node_runs_accelerate_launch_wired_to_skypilot(nodes, gpus, rank, distributed):
    ips = [f"10.0.0.{i + 1}" for i in range(nodes)]
    environ = {
        "STAGE_MODULE": "tasks.sft",
        "STAGE_INPUTS": "/post-train/in.json",
        "STAGE_OUTPUTS": "/post-train/out.json",
        "STAGE_DISTRIBUTED": "1" if distributed else "0",
        "ACCELERATE_CONFIG": "configs/accelerate/deepspeed_zero3.yaml",
        "SKYPILOT_NODE_IPS": "\n".join(ips) + "\n",
        "SKYPILOT_NODE_RANK": str(rank),
        "SKYPILOT_NUM_NODES": str(nodes),
        "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus),
    }
    command = skypilot.node_command(environ)
    stage = ["-m", "tasks.sft", "--inputs", "/post-train/in.json", "--outputs", "/post-train/out.json"]
    assert command[-6:] == stage
    if not distributed or nodes * gpus == 1:
        assert command == [sys.executable, *stage]
        return
    launcher = command[:-6]
    assert launcher[1:3] == ["-m", "accelerate.commands.launch"]
    assert option(launcher, "--num_processes") == str(nodes * gpus)
    assert option(launcher, "--config_file") == "configs/accelerate/deepspeed_zero3.yaml"
    if nodes == 1:
        assert "--num_machines" not in launcher
    else:
        assert option(launcher, "--num_machines") == str(nodes) and option(launcher, "--machine_rank") == str(rank)
        assert (
            option(launcher, "--main_process_ip") == "10.0.0.1" and option(launcher, "--main_process_port") == "29500"
        )


# --- checks before any work ----------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["", "sqlite:///mlflow.db", "file:///tmp/mlruns", "mlruns"])
def test_a_local_tracking_store_is_refused(uri):
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
        skypilot.remote_tracking_uri({"MLFLOW_TRACKING_URI": uri} if uri else {})
    assert skypilot.remote_tracking_uri({"MLFLOW_TRACKING_URI": "http://10.0.0.9:5000"}) == "http://10.0.0.9:5000"


def test_preflight_names_what_is_missing(tmp_path: Path):
    environ = {"MLFLOW_TRACKING_URI": REMOTE_URI}
    config = sky_config(tmp_path)
    skypilot.preflight(config, {"base_model_path": "meta-llama/Meta-Llama-3-8B"}, environ)
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
        skypilot.preflight(config, {}, {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})
    with pytest.raises(ConfigError, match="cannot be seen from the cloud machines"):
        skypilot.preflight(config, {"base_model_path": str(tmp_path)}, environ)
    with pytest.raises(ConfigError, match="make sky-env"):
        skypilot.preflight(sky_config(tmp_path, sky_bin=str(tmp_path / "absent")), {}, environ)
    with pytest.raises(ConfigError, match="compute.bucket"):
        skypilot.preflight(sky_config(tmp_path, bucket=None), {}, environ)
    (tmp_path / "bucket").rmdir()
    with pytest.raises(ConfigError, match="mount s3://my-bucket there"):
        skypilot.preflight(config, {}, environ)
    with pytest.raises(ConfigError, match="runs_dir .* must be an absolute path inside compute.remote_root"):
        load_config("lowlr", "smoke", {"compute.backend": "skypilot", "compute.accelerators": "H100:1"})


# --- the job's life cycle ------------------------------------------------------------------------


class FakeSky:
    """Answers the launcher's `sky` calls: the job's statuses, in order, one per `sky jobs queue`."""

    def __init__(self, statuses: list[str], launch_status: int = 0, **record):
        self.statuses, self.launch_status, self.record, self.calls = list(statuses), launch_status, record, []

    def __call__(self, command, env=None, **kwargs):
        verb = command[2]
        self.calls.append(verb)
        assert env["SKYPILOT_DISABLE_USAGE_COLLECTION"] == "1"
        stdout = ""
        if verb == "queue":
            status = self.statuses.pop(0)
            if status != "unknown":
                stdout = "[12:00:01] Fetching managed jobs\n" + json.dumps(
                    [
                        {"job_id": 5, "job_name": self.name, "status": "FAILED"},  # an older job of the same name
                        {"job_id": 7, "job_name": self.name, "status": status, **self.record},
                        {"job_id": 6, "job_name": "other", "status": "RUNNING"},
                    ],
                    indent=2,
                )
        if verb == "launch":
            self.name = option(command, "--name")
            return subprocess.CompletedProcess(command, self.launch_status)
        return subprocess.CompletedProcess(command, 0, stdout=stdout)


def run_job(tmp_path: Path, fake: FakeSky, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", REMOTE_URI)
    return skypilot.run_managed_job(
        sky_config(tmp_path),
        "tasks.sft",
        tmp_path / "in.json",
        tmp_path / "out.json",
        "post-train-sft-0",
        True,
        run=fake,
        sleep=lambda seconds: None,
    )


def test_a_job_is_followed_until_it_succeeds(tmp_path: Path, monkeypatch):
    fake = FakeSky(["RUNNING", "unknown", "RECOVERING", "SUCCEEDED"])
    status, description = run_job(tmp_path, fake, monkeypatch)
    assert status == 0 and "id 7, SUCCEEDED" in description
    assert fake.calls == ["launch"] + ["logs", "queue"] * 4


@pytest.mark.parametrize("final", ["FAILED", "FAILED_SETUP", "FAILED_NO_RESOURCE", "FAILED_CONTROLLER", "CANCELLED"])
def test_a_failed_preempted_or_cancelled_job_fails_the_stage(tmp_path: Path, monkeypatch, final):
    status, description = run_job(
        tmp_path, FakeSky([final], recovery_count=2, failure_reason="no H100 left"), monkeypatch
    )
    assert status == 1 and f"{final} after 2 recoveries: no H100 left" in description


def test_a_refused_job_is_a_config_error_and_a_failed_submission_a_failure(tmp_path: Path, monkeypatch):
    with pytest.raises(ConfigError, match="FAILED_PRECHECKS"):
        run_job(tmp_path, FakeSky(["FAILED_PRECHECKS"]), monkeypatch)
    fake = FakeSky([], launch_status=1)
    assert run_job(tmp_path, fake, monkeypatch)[0] == 1 and fake.calls == ["launch"]


def test_a_job_that_ends_without_a_result_is_a_stage_failure(tmp_path: Path):
    description = "SkyPilot managed job post-train-sft-0 (id 7, FAILED_NO_RESOURCE after 3 recoveries)"
    with pytest.raises(StageFailed, match=r"post-train-sft-0 \(id 7, FAILED_NO_RESOURCE after 3 recoveries\) exited"):
        read_result(tmp_path / "outputs.json", TrainedModel, 1, description)


def test_a_job_without_status_is_cancelled_before_the_stage_fails(tmp_path: Path, monkeypatch):
    fake = FakeSky(["unknown"] * skypilot.MAX_STATUS_FAILURES)
    status, description = run_job(tmp_path, fake, monkeypatch)
    assert status == 1 and "no status" in description and fake.calls[-1] == "cancel"


def test_an_interrupted_launcher_cancels_its_job(tmp_path: Path, monkeypatch):
    fake = FakeSky(["RUNNING"])

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setenv("MLFLOW_TRACKING_URI", REMOTE_URI)
    with pytest.raises(KeyboardInterrupt):
        skypilot.run_managed_job(
            sky_config(tmp_path), "tasks.sft", tmp_path / "i", tmp_path / "o", "job", True, run=fake, sleep=interrupt
        )
    assert fake.calls[-1] == "cancel"


# --- end to end through a stand-in `sky` ---------------------------------------------------------

FAKE_SKY = """#!{python}
# Plays SkyPilot for one node: `jobs launch` runs the task's `run` step (python -m post_train.executors.skypilot node)
# with the --env values and SkyPilot's variables; `jobs logs` / `jobs queue` report how it went.
import json, os, subprocess, sys
from pathlib import Path
state = Path({state!r})
args = sys.argv[1:]
if args[:2] == ["jobs", "launch"]:
    (state / "launch.json").write_text(json.dumps(args))
    env = dict(os.environ)
    for i, part in enumerate(args):
        if part == "--env":
            key, _, value = args[i + 1].partition("=")
            env[key] = value if "=" in args[i + 1] else os.environ[key]
    env.update(SKYPILOT_NODE_IPS="127.0.0.1\\n", SKYPILOT_NODE_RANK="0", SKYPILOT_NUM_NODES="1",
               SKYPILOT_NUM_GPUS_PER_NODE="1")
    workdir = args[args.index("--workdir") + 1]
    node = [sys.executable, "-m", "post_train.executors.skypilot", "node"]
    code = subprocess.run(node, env=env, cwd=workdir).returncode
    name = args[args.index("--name") + 1]
    (state / "job.json").write_text(json.dumps({{"job_id": 1, "job_name": name,
                                                "status": "SUCCEEDED" if code == 0 else "FAILED"}}))
elif args[:2] == ["jobs", "queue"]:
    print(json.dumps([json.loads((state / "job.json").read_text())]))
elif args[:2] == ["jobs", "logs"]:
    print("(logs)")
"""


@pytest.fixture
def fake_sky(tmp_path: Path, monkeypatch) -> Path:
    state = tmp_path / "sky-state"
    state.mkdir()
    sky = tmp_path / "sky"
    sky.write_text(FAKE_SKY.format(python=sys.executable, state=str(state)))
    sky.chmod(sky.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", REMOTE_URI)
    return state


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_stage_runs_as_a_managed_job_and_its_result_comes_back_through_the_bucket(tmp_path: Path, fake_sky: Path):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    message = [{"role": "user", "content": "Copy: a b"}]
    files = {
        "data.sft": write_jsonl(
            bucket / "sft.jsonl", [{"messages": message + [{"role": "assistant", "content": "a b"}]}]
        ),
        "data.preferences": write_jsonl(
            bucket / "prefs.jsonl",
            [
                {
                    "prompt": message,
                    "chosen": [{"role": "assistant", "content": "a b"}],
                    "rejected": [{"role": "assistant", "content": "b"}],
                }
            ],
        ),
        "data.eval": write_jsonl(bucket / "eval.jsonl", [{"prompt": message, "reference": "a b"}]),
    }
    config = load_config(
        "lowlr",
        "smoke",
        {
            **files,
            "data.world": None,
            "compute.backend": "skypilot",
            "compute.bucket": "s3://my-bucket",
            "compute.remote_root": str(bucket),
            "compute.accelerators": "A10G:1",
            "compute.sky_bin": str(tmp_path / "sky"),
            "runs_dir": str(bucket / "runs"),
            "cache_dir": str(bucket / "cache"),
        },
    )
    run_dir = bucket / "runs" / "r1"
    # cached, so a command
    prepare_command = Stage("prepare", "tasks.prepare", PreparedData, key=lambda config, arguments: {})
    prepared = run_stage(prepare_command, config, RunContext(str(run_dir)))
    assert prepared.sizes == {"sft": 1, "preferences": 1, "eval": 1}
    submitted = json.loads((fake_sky / "launch.json").read_text())
    assert (
        envs(submitted)["STAGE_INPUTS"] == str(run_dir / "prepare" / "inputs.json")
        and option(submitted, "--gpus") == "A10G:1"
    )

    (bucket / "eval.jsonl").write_text('{"prompt": "x"}\n')  # the remote stage refuses it: a DataError, not retried
    with pytest.raises(DataError, match="eval.jsonl, row 0: missing field"):
        run_stage(prepare_command, config, RunContext(str(run_dir), force=True))


# --- the paper recipes ---------------------------------------------------------------------------


def test_the_paper_recipes_are_the_papers_setting():
    baseline, lowlr = load_config("paper_baseline"), load_config("paper_lowlr")
    assert baseline.model.name_or_path == "meta-llama/Meta-Llama-3-8B"
    assert baseline.model.resolved_chat_template() == DEFAULT_CHAT_TEMPLATE
    assert baseline.data.world is None
    assert baseline.data.sft == "HuggingFaceH4/ultrachat_200k:train_sft"
    assert baseline.data.preferences == "HuggingFaceH4/ultrafeedback_binarized:train_prefs"
    assert (baseline.sft.learning_rate, lowlr.sft.learning_rate) == (2e-5, 5e-6)
    assert baseline.sft.batch_size == 128 and baseline.sft.epochs == 1 and baseline.sft.objective == "nll"
    dpo = baseline.dpo
    assert (dpo.loss, dpo.loss_params, dpo.learning_rate, dpo.batch_size, dpo.epochs) == (
        "sigmoid",
        {"beta": 0.01},
        5e-7,
        128,
        1,
    )
    assert baseline.mixed_precision == "bf16"
    compute = baseline.compute
    assert (compute.backend, compute.accelerators, compute.training_processes) == ("skypilot", "H100:8", 8)
    assert lowlr.model_dump(exclude={"recipe", "description", "sft"}) == baseline.model_dump(
        exclude={"recipe", "description", "sft"}
    )
    assert lowlr.sft.model_dump(exclude={"learning_rate"}) == baseline.sft.model_dump(exclude={"learning_rate"})
    assert baseline.evaluation.judge == "gold"  # the only judge today; the paper's evaluation needs issue #5's


def test_the_paper_recipe_launches_sft_on_eight_h100s(tmp_path: Path):
    (tmp_path / "sky").touch()
    config = load_config(
        "paper_baseline", "demo", {"compute.bucket": "s3://my-bucket", "compute.sky_bin": str(tmp_path / "sky")}
    )
    command = skypilot.submit_command(
        config,
        "tasks.sft",
        "/post-train/runs/r/sft/inputs.json",
        "/post-train/runs/r/sft/outputs.json",
        "post-train-sft-1",
        True,
        {"MLFLOW_TRACKING_URI": REMOTE_URI},
    )
    assert option(command, "--gpus") == "H100:8" and option(command, "--num-nodes") == "1"
    assert envs(command)["ACCELERATE_CONFIG"] == "configs/accelerate/multi_gpu_fsdp.yaml"
    assert (
        envs(command)["POST_TRAIN_BUCKET"] == "s3://my-bucket"
        and envs(command)["POST_TRAIN_REMOTE_ROOT"] == "/post-train"
    )


def test_the_paper_recipe_runs_at_smoke_size_on_a_local_tiny_model(tmp_path: Path, shared_mlflow_store: str):
    """paper_baseline's code path with a local tiny model whose tokenizer has no chat template, local
    files in the Hub datasets' formats, the local backend, and a checkpoint every step."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from post_train.stages import SFT
    from post_train.world.model import tiny_llama_config, train_tokenizer
    from tasks import dpo, prepare

    pairs = [(f"Copy: {a} {b}", f"{a} {b}") for a in "abcd" for b in "efgh"]
    tokenizer = train_tokenizer([text for pair in pairs for text in pair], vocab_size=64)
    tokenizer.chat_template = None  # like meta-llama/Meta-Llama-3-8B's
    base = tmp_path / "base"
    tokenizer.save_pretrained(base)
    LlamaForCausalLM(
        tiny_llama_config(tokenizer, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=64)
    ).save_pretrained(base)
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    files = {
        "data.sft": write_jsonl(
            tmp_path / "sft.jsonl", [{"messages": user(q) + [{"role": "assistant", "content": a}]} for q, a in pairs]
        ),
        "data.preferences": write_jsonl(
            tmp_path / "prefs.jsonl",
            [
                {
                    "prompt": user(q),
                    "chosen": [{"role": "assistant", "content": a}],
                    "rejected": [{"role": "assistant", "content": a[:1]}],
                }
                for q, a in pairs
            ],
        ),
        "data.eval": write_jsonl(tmp_path / "eval.jsonl", [{"prompt": user(q), "reference": a} for q, a in pairs[:4]]),
    }
    smoke = {"batch_size": 4, "micro_batch_size": 2, "max_length": 48, "max_steps": 2, "log_every": 1}
    config = load_config(
        "paper_baseline",
        "smoke",
        {
            "model.name_or_path": str(base),
            **files,
            "compute.backend": "local",
            "compute.checkpoint_every": 1,
            "runs_dir": str(tmp_path / "runs"),
            "cache_dir": str(tmp_path / "cache"),
            "mixed_precision": "'no'",
            **{f"sft.{key}": value for key, value in smoke.items()},
            "sft.diagnostics_batch_size": 2,
            **{f"dpo.{key}": value for key, value in smoke.items()},
        },
    )
    assert (config.sft.learning_rate, config.dpo.loss_params, config.compute.gradient_checkpointing) == (
        2e-5,
        {"beta": 0.01},
        True,
    )
    data = prepare.run(config)
    trained = run_stage(
        SFT, config, RunContext(str(tmp_path / "runs" / "r")), base_model_path=str(base), data=data
    )  # a child process
    assert AutoTokenizer.from_pretrained(trained.path).chat_template == DEFAULT_CHAT_TEMPLATE
    assert not any((tmp_path / "cache" / "checkpoints" / "sft").glob("*/step-*"))  # removed once the stage succeeded
    tuned = dpo.run(config, trained.path, data, str(tmp_path / "dpo"))
    assert tuned.metrics["loss_first"] == pytest.approx(0.6931, abs=1e-3)  # log 2: the policy starts as its reference
