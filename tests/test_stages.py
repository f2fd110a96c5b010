"""Stages: declared once, run as child-process commands through an executor chosen by placement, cached by
content; the code a stage runs (its cache key) reaches no orchestration, no backend and no other stage."""

import ast
import json
import shutil
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from post_train.config import REPO_ROOT, STAGES, ConfigError, load_config
from post_train.data import DataError
from post_train.executors import EXECUTORS
from post_train.executors.local import LocalExecutor, stage_command
from post_train.fingerprint import PROJECT_PACKAGES, module_fingerprint, project_imports, project_modules
from post_train.results import PreparedData
from post_train.stage_cache import cached
from post_train.stage_io import StageFailed, read_result, write_inputs
from post_train.stages import STAGE_DECLARATIONS, RunContext, Stage, run_stage


@dataclass(frozen=True)
class Made:
    path: str
    metrics: dict


PREPARE_COMMAND = Stage("prepare", "tasks.prepare", PreparedData, key=lambda config, arguments: {})
"""The prepare stage as a cached command (in the flow it runs in-process): the cheapest real stage command."""


def entries(stage_dir: Path) -> list[str]:
    """The cache entries of a stage: what is there but the keys' lock files."""
    return sorted(path.name for path in stage_dir.iterdir() if path.suffix != ".lock")


def bad_sft_config(tmp_path: Path):
    (tmp_path / "sft.jsonl").write_text(json.dumps({"messages": []}) + "\n")
    return load_config(
        "lowlr",
        "smoke",
        {
            "data.world": None,
            "data.sft": str(tmp_path / "sft.jsonl"),
            "data.preferences": "x",
            "data.eval": "y",
            "cache_dir": str(tmp_path / "cache"),
        },
    )


def test_stage_command_is_plain_python_or_accelerate_launch(tmp_path: Path):
    single = stage_command("tasks.sft", tmp_path / "in.json", tmp_path / "out.json")
    assert single[1:] == [
        "-m",
        "tasks.sft",
        "--inputs",
        str(tmp_path / "in.json"),
        "--outputs",
        str(tmp_path / "out.json"),
    ]
    several = stage_command("tasks.sft", tmp_path / "in.json", tmp_path / "out.json", num_processes=2)
    # --multi_gpu: data parallel processes, on the CPU (gloo) where there is no GPU; without it
    # accelerate runs a single process there.
    assert several[1:9] == [
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--multi_gpu",
        "--main_process_port",
        "0",
        "-m",
    ]  # 0: a free port, so stages can run side by side
    configured = stage_command(
        "tasks.sft",
        "in.json",
        "out.json",
        num_processes=16,
        accelerate_config="fsdp.yaml",
        num_machines=2,
        machine_rank=1,
        main_process_ip="10.0.0.1",
    )
    assert configured[3:] == [
        "--num_processes",
        "16",
        "--config_file",
        "fsdp.yaml",
        "--num_machines",
        "2",
        "--machine_rank",
        "1",
        "--main_process_ip",
        "10.0.0.1",
        "--main_process_port",
        "29500",
        "-m",
        "tasks.sft",
        "--inputs",
        "in.json",
        "--outputs",
        "out.json",
    ]


def test_a_child_process_refusal_keeps_its_type_and_message(tmp_path: Path):
    config = bad_sft_config(tmp_path)
    with pytest.raises(DataError, match=r"sft\.jsonl, row 0: field 'messages' must be a non-empty list"):
        run_stage(PREPARE_COMMAND, config, RunContext(str(tmp_path / "run")))
    assert json.loads((tmp_path / "run" / "prepare" / "outputs.json").read_text())["error"]["type"] == "DataError"
    assert entries(tmp_path / "cache" / "stages" / "prepare") == []  # nothing cached


def test_a_crash_without_a_result_is_a_stage_failure(tmp_path: Path):
    config = load_config("lowlr", "smoke")
    inputs, outputs = tmp_path / "inputs.json", tmp_path / "outputs.json"
    write_inputs(inputs, {"config": config})
    returncode, description = LocalExecutor(config).run("prepare", "json.tool", inputs, outputs, distributed=False)
    with pytest.raises(StageFailed, match="exited with status"):
        read_result(outputs, PreparedData, returncode, description)


def test_cache_reuses_results_rewrites_paths_and_forces(tmp_path: Path):
    calls = []

    def produce(directory: Path) -> Made:
        calls.append(directory)
        (directory / "model").mkdir()
        return Made(path=str(directory / "model"), metrics={"loss": float(len(calls))})

    first, hit = cached("sft", "k1", str(tmp_path), produce, Made)
    assert not hit and first.path == str(tmp_path / "stages" / "sft" / "k1" / "model") and Path(first.path).is_dir()
    second, hit = cached("sft", "k1", str(tmp_path), produce, Made)
    assert hit and second == first and len(calls) == 1
    forced, hit = cached("sft", "k1", str(tmp_path), produce, Made, force=True)
    assert not hit and forced.metrics == {"loss": 2.0}


def test_an_interrupted_stage_leaves_nothing_in_the_cache(tmp_path: Path):
    def fail(directory: Path) -> Made:
        (directory / "half-written").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached("sft", "k2", str(tmp_path), fail, Made)
    assert entries(tmp_path / "stages" / "sft") == []


# --- what a stage's key reaches -------------------------------------------------------------------

TRAINING_STAGES = ("tasks.pretrain", "tasks.sft", "tasks.dpo", "tasks.joint")


def imports_of(file: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", TRAINING_STAGES + ("tasks.evaluate", "tasks.head_to_head", "tasks.prepare"))
def test_a_stage_reaches_no_orchestration_no_backend_and_no_other_stage(module: str):
    reached = project_modules(module)
    others = {name for name in reached if name.startswith("tasks.") and name != module}
    assert not others, f"{module} imports other stages: {others}"
    assert not {name for name in reached if name.startswith(("flows", "post_train.executors."))}
    assert not {"post_train.stages", "post_train.cli", "post_train.server", "post_train.stage_cache"} & set(reached)
    prefect = {name for file in reached.values() for name in imports_of(file) if name.split(".")[0] == "prefect"}
    assert not prefect, f"{module}'s code imports Prefect: {prefect}"


def test_a_stage_key_follows_the_code_the_stage_runs_and_nothing_else(tmp_path: Path):
    for package in PROJECT_PACKAGES:
        shutil.copytree(REPO_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    keys = {module: module_fingerprint(module, tmp_path) for module in TRAINING_STAGES}
    assert keys == {module: module_fingerprint(module) for module in TRAINING_STAGES} and len(
        set(keys.values())
    ) == len(TRAINING_STAGES)
    for edited in (
        "post_train/executors/skypilot.py",
        "post_train/executors/local.py",
        "post_train/stages.py",
        "post_train/stage_cache.py",
        "flows/stages.py",
        "flows/pipeline.py",
        "tasks/evaluate.py",
    ):
        with (tmp_path / edited).open("a") as file:
            file.write("\n# an edit to orchestration, a backend or another stage\n")
    assert {module: module_fingerprint(module, tmp_path) for module in TRAINING_STAGES} == keys
    with (tmp_path / "post_train" / "training.py").open("a") as file:
        file.write("\n# an edit to the training loop\n")
    assert all(module_fingerprint(module, tmp_path) != keys[module] for module in TRAINING_STAGES)
    # The demo world's generator is no input of SFT; it is one of pretraining's.
    assert "post_train.world.generate" not in project_modules("tasks.sft")
    assert "post_train.world.generate" in project_modules("tasks.pretrain")


def test_no_import_cycles_between_project_modules():
    modules = {}
    for package in PROJECT_PACKAGES:
        for file in sorted((REPO_ROOT / package).rglob("*.py")):
            relative = file.relative_to(REPO_ROOT).with_suffix("")
            parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
            modules[".".join(parts)] = file
    graph = {}
    for name, file in modules.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {target for target in project_imports(file, package) if target in modules} - ancestors - {name}

    cycles, done, path = [], set(), []

    def visit(node: str) -> None:
        if node in path:
            cycles.append(path[path.index(node) :] + [node])
            return
        if node in done:
            return
        path.append(node)
        for target in sorted(graph[node]):
            visit(target)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert not cycles, f"import cycles: {cycles}"


# --- declarations and placement -------------------------------------------------------------------


def test_every_stage_is_declared_once_with_a_command_and_a_prefect_task():
    from flows import stages as prefect_stages

    names = [stage.name for stage in STAGE_DECLARATIONS]
    assert len(names) == len(set(names))
    commands = {stage.name for stage in STAGE_DECLARATIONS if stage.key is not None}
    assert commands == set(STAGES)  # every stage that runs somewhere can be placed by compute.stages.<name>
    assert [stage.name for stage in STAGE_DECLARATIONS if stage.in_process] == ["prepare"]
    for stage in STAGE_DECLARATIONS:
        assert typing.get_type_hints(stage.function)["return"] == stage.result, stage.name
        if not stage.in_process:
            source = (REPO_ROOT / f"{stage.module.replace('.', '/')}.py").read_text()
            assert 'if __name__ == "__main__":\n    stage_main(run)' in source
    tasks = [
        prefect_stages.prepare,
        prefect_stages.base_model,
        prefect_stages.sft,
        prefect_stages.dpo,
        prefect_stages.joint,
        prefect_stages.evaluate,
        prefect_stages.fetch_champion,
        prefect_stages.head_to_head,
        prefect_stages.register,
    ]
    assert [task.name for task in tasks] == ["prepare", "pretrain-base-model", *names[2:]]
    for task, stage in zip(tasks, STAGE_DECLARATIONS):
        assert task.retries == len(stage.retry_delays) and task.retry_delay_seconds == list(stage.retry_delays)


def test_per_stage_placement_overrides_the_global_compute_section():
    config = load_config(
        "lowlr",
        "smoke",
        {
            "compute.num_processes": 2,
            "compute.stages.evaluate.num_processes": 1,
            "compute.stages.sft.accelerate_config": "single_gpu",
        },
    )
    assert config.compute.for_stage("evaluate").num_processes == 1
    assert config.compute.for_stage("dpo").num_processes == 2
    assert config.compute.for_stage("sft").accelerate_config == "single_gpu"
    assert config.compute.for_stage("dpo").accelerate_config is None
    with pytest.raises(ConfigError) as refused:
        load_config(
            "lowlr",
            "smoke",
            {
                "compute.stages.evaluat.backend": "local",
                "compute.stages.sft.backend": "slurm",
                "compute.stages.dpo.num_nodes": 0,
            },
        )
    message = str(refused.value)
    assert "compute.stages.evaluat" in message and "'evaluate'" in message
    assert "compute.stages.sft.backend: Value error, unknown backend 'slurm'; known: local, skypilot" in message
    assert "compute.stages.dpo.num_nodes" in message


class RecordingExecutor(LocalExecutor):
    """A backend of the test's own: records the stage, then runs its command in a child process that knows this
    backend too (the stage validates the config it is given, backend names included)."""

    ran: list[str] = []

    def run(self, stage, module, inputs, outputs, distributed):
        RecordingExecutor.ran.append(stage)
        bootstrap = (
            "import runpy, sys; from post_train.executors import EXECUTORS; "
            "EXECUTORS['recording'] = 'tests.test_stages:RecordingExecutor'; "
            f"sys.argv = [{module!r}, '--inputs', {str(inputs)!r}, '--outputs', {str(outputs)!r}]; "
            f"runpy.run_module({module!r}, run_name='__main__')"
        )
        return subprocess.run([sys.executable, "-c", bootstrap], cwd=REPO_ROOT).returncode, f"recorded {module}"


def test_a_new_backend_is_one_class_and_one_registry_entry_and_placement_chooses_it(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(EXECUTORS, "recording", "tests.test_stages:RecordingExecutor")
    monkeypatch.setattr(RecordingExecutor, "ran", [])
    (tmp_path / "sft.jsonl").write_text(json.dumps({"messages": []}) + "\n")
    overrides = {
        "data.world": None,
        "data.sft": str(tmp_path / "sft.jsonl"),
        "data.preferences": "x",
        "data.eval": "y",
        "cache_dir": str(tmp_path / "cache"),
    }
    config = load_config(
        "lowlr", "smoke", {**overrides, "compute.backend": "recording", "compute.stages.sft.backend": "local"}
    )
    assert config.compute.for_stage("sft").backend == "local" and config.compute.for_stage("dpo").backend == "recording"
    with pytest.raises(DataError):
        run_stage(PREPARE_COMMAND, config, RunContext(str(tmp_path / "run")))
    assert RecordingExecutor.ran == ["prepare"]
    with pytest.raises(DataError):
        run_stage(PREPARE_COMMAND, bad_sft_config(tmp_path), RunContext(str(tmp_path / "run")))  # local: not recorded
    assert RecordingExecutor.ran == ["prepare"]
