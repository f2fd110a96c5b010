"""Stages as child-process commands, and the content cache around them."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from post_train.data import DataError
from post_train.launch import StageFailed, cached, launch, stage_command
from tasks import prepare


@dataclass(frozen=True)
class Made:
    path: str
    metrics: dict


def test_stage_command_is_plain_python_or_accelerate_launch(tmp_path: Path):
    single = stage_command("tasks.sft", tmp_path / "in.json", tmp_path / "out.json")
    assert single[1:] == ["-m", "tasks.sft", "--inputs", str(tmp_path / "in.json"), "--outputs", str(tmp_path / "out.json")]
    several = stage_command("tasks.sft", tmp_path / "in.json", tmp_path / "out.json", num_processes=2)
    # --multi_gpu: data parallel processes, on the CPU (gloo) where there is no GPU; without it
    # accelerate runs a single process there.
    assert several[1:9] == ["-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
                            "--main_process_port", "0", "-m"]  # 0: a free port, so stages can run side by side
    configured = stage_command("tasks.sft", "in.json", "out.json", num_processes=16, accelerate_config="fsdp.yaml",
                               num_machines=2, machine_rank=1, main_process_ip="10.0.0.1")
    assert configured[3:] == ["--num_processes", "16", "--config_file", "fsdp.yaml", "--num_machines", "2",
                              "--machine_rank", "1", "--main_process_ip", "10.0.0.1", "--main_process_port", "29500",
                              "-m", "tasks.sft", "--inputs", "in.json", "--outputs", "out.json"]


def test_a_child_process_refusal_keeps_its_type_and_message(tmp_path: Path):
    from post_train.config import load_config

    config = load_config("lowlr", "smoke", {"data.world": None, "data.sft": str(tmp_path / "sft.jsonl"),
                                            "data.preferences": "x", "data.eval": "y"})
    (tmp_path / "sft.jsonl").write_text(json.dumps({"messages": []}) + "\n")
    with pytest.raises(DataError, match=r"sft\.jsonl, row 0: field 'messages' must be a non-empty list"):
        launch("tasks.prepare", prepare.run, {"config": config}, tmp_path / "work")
    assert json.loads((tmp_path / "work" / "outputs.json").read_text())["error"]["type"] == "DataError"


def test_a_crash_without_a_result_is_a_stage_failure(tmp_path: Path):
    with pytest.raises(StageFailed, match="exited with status"):
        launch("json.tool", prepare.run, {"config": None}, tmp_path / "work")


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
    assert list((tmp_path / "stages" / "sft").iterdir()) == []


def test_a_stage_key_follows_the_code_the_stage_imports():
    from post_train.fingerprint import module_fingerprint, project_modules

    assert module_fingerprint("tasks.sft") == module_fingerprint("tasks.sft") != module_fingerprint("tasks.dpo")
    reached = set(project_modules("tasks.sft"))
    assert {"losses.sft", "losses.logprobs", "post_train.training", "post_train.config", "tasks.sft"} <= reached
    # The demo world's generator is no input of SFT; the CLI and server are no input of any stage.
    assert not {"post_train.cli", "post_train.server", "post_train.world.generate"} & reached
    assert "post_train.world.generate" in project_modules("tasks.pretrain")
