"""The benchmark harness (benchmarks/): its measurement, its plan, and a smoke run end to end so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from benchmarks.measure import StepMeter
from benchmarks.report import markdown, model_flops, summarise_group
from benchmarks.run import Variant, option_label, option_sets, schedule, sft_variants
from losses import SFT_OBJECTIVES
from post_train.provenance import git_commit

REPO_ROOT = Path(__file__).resolve().parents[1]
PAD, BOS = 0, 1


def test_meter_counts_non_pad_tokens_and_squared_lengths_of_trained_forwards_per_step():
    embedding = torch.nn.Embedding(10, 4)
    optimizer = torch.optim.SGD(embedding.parameters(), lr=0.1)
    meter = StepMeter(PAD, BOS, "cpu").install()
    try:
        packed = torch.tensor([[BOS, 5, 6, BOS, 7, PAD]])  # sequences of 3 and 2 tokens, then padding
        padded = torch.tensor([[BOS, 5, PAD, PAD], [BOS, 6, 7, 8]])  # 2 and 4 tokens
        for batch in (packed, padded):
            embedding(batch).sum().backward()
            with torch.no_grad():  # a frozen or old-policy pass: not training work
                embedding(batch)
            optimizer.step()
        state = meter.steady_state(warmup_steps=1)
    finally:
        meter.remove()
    assert meter.step_tokens == [5, 6]
    assert meter.step_squared_lengths == [3**2 + 2**2, 2**2 + 4**2]
    assert state["measured_steps"] == 1 and state["measured_tokens"] == 6
    assert state["tokens_per_second"] == pytest.approx(6 / state["measured_seconds"])


def test_schedule_alternates_the_order_across_repetitions():
    a, b, c = (Variant("sft", name, "trl", "trl-sft", {}, ("full",)) for name in "abc")
    order = [(repetition, variant.label) for repetition, variant in schedule([a, b, c], 3)]
    assert order == [(0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a"), (2, "a"), (2, "b"), (2, "c")]


class WithoutOptions(BaseModel):
    learning_rate: float = 1e-3


class WithOptions(BaseModel):
    learning_rate: float = 1e-3
    padding_free: bool = True
    fused_logprobs: bool = False


def test_post_train_options_are_benchmarked_only_where_the_config_has_them():
    assert option_sets(WithoutOptions) == [{}]
    assert option_label(WithoutOptions, {}) == ""
    sets = option_sets(WithOptions)
    assert sets == [
        {"padding_free": False, "fused_logprobs": False},
        {"padding_free": True, "fused_logprobs": False},
        {"padding_free": False, "fused_logprobs": True},
        {"padding_free": True, "fused_logprobs": True},
    ]
    assert option_label(WithOptions, sets[1]) == " [padding_free on, fused_logprobs off; defaults]"
    assert option_label(WithOptions, sets[3]) == " [padding_free on, fused_logprobs on]"


def test_the_full_tier_compares_every_registered_sft_objective_with_nll():
    full = [variant for variant in sft_variants(liger=False) if "full" in variant.tiers]
    compared = {variant.label.split(" [")[0].removeprefix("post-train ") for variant in full if variant.relative_to}
    assert compared == set(SFT_OBJECTIVES) - {"nll"}
    (reference,) = {variant.relative_to for variant in full if variant.relative_to}
    assert reference.startswith("post-train nll [") and reference.endswith("; defaults]")


def test_model_flops_are_6n_per_token_plus_the_attention_term():
    model = {"matmul_parameters": 10, "num_layers": 2, "hidden_size": 4}
    run = {"measured_tokens": 5, "measured_squared_lengths": 3**2 + 2**2}
    assert model_flops(run, model) == 6 * 10 * 5 + 12 * 2 * 4 * 13


def _variant(label: str, side: str, tokens_per_second: list[float], peak: list[float], relative_to=None) -> dict:
    runs = [{"tokens_per_second": t, "peak_memory_bytes": m, "mfu": 0.25} for t, m in zip(tokens_per_second, peak)]
    return {"label": label, "side": side, "relative_to": relative_to, "runs": runs, "failures": []}


def test_ratios_divide_medians_by_the_fastest_trl_variant_and_by_the_reference():
    group = summarise_group(
        "sft",
        {"name": "m"},
        [
            _variant("TRL slow", "trl", [100, 90, 110], [4, 4, 4]),
            _variant("TRL fast", "trl", [200, 150, 280], [2, 3, 1]),
            _variant("post-train nll", "post-train", [300, 400, 230], [1, 1, 1]),
            _variant("post-train dft", "post-train", [150, 150, 150], [1, 1, 1], relative_to="post-train nll"),
        ],
    )
    assert group["trl_best"] == "TRL fast"
    nll, dft = group["variants"][2], group["variants"][3]
    assert nll["stats"]["tokens_per_second"] == {"median": 300, "min": 230, "max": 400, "n": 3}
    assert nll["ratios"]["speed_vs_trl_best"] == pytest.approx(1.5)
    assert nll["ratios"]["memory_vs_trl_best"] == pytest.approx(0.5)
    assert dft["ratios"]["speed_vs_reference"] == pytest.approx(0.5)
    result = {
        "name": "n",
        "machine": {
            "date": "d",
            "gpu": "H200",
            "torch_threads": 1,
            "load_average": 0.0,
            "torch": "t",
            "transformers": "t",
            "trl": "t",
            "accelerate": "a",
            "post_train_commit": "c",
        },
        "settings": {
            "device": "cuda",
            "precision": "bf16",
            "repetitions": 3,
            "warmup_steps_note": "3 steps",
            "summary": "s",
        },
        "models": {"m": {"name": "m", "parameters": 1e9, "vocab_size": 128256}},
        "groups": [group],
        "failures": [],
    }
    text = markdown(result)
    assert "| MFU | runs |" in text
    assert "| post-train nll | 300 (230–400) | 1.50× |" in text and "| 25.0 (25.0–25.0)% |" in text
    assert "0.50× post-train nll" in text


def test_smoke_benchmark_writes_json_and_markdown(tmp_path: Path):
    """The smoke preset end to end: each runner once in its own process, both outputs well formed."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--preset",
            "smoke",
            "--name",
            "smoke",
            "--out-dir",
            str(tmp_path),
            "--threads",
            "1",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "smoke.json").read_text())

    for key in ("date", "cpu", "torch_threads", "torch", "transformers", "trl", "post_train_commit"):
        assert key in result["machine"]
    assert result["machine"]["torch_threads"] == 1
    assert result["failures"] == []
    groups = {group["task"]: group for group in result["groups"]}
    assert set(groups) == {"sft", "dpo", "generate"}
    for task in ("sft", "dpo"):
        group = groups[task]
        assert group["trl_best"] is not None
        sides = {variant["side"] for variant in group["variants"]}
        assert sides == {"trl", "post-train"}
        for variant in group["variants"]:
            assert len(variant["runs"]) == 1
            run = variant["runs"][0]
            assert run["torch_threads"] == 1
            assert run["measured_steps"] == 1 and run["measured_tokens"] > 0
            assert variant["stats"]["tokens_per_second"]["median"] > 0
            assert variant["stats"]["peak_memory_bytes"]["median"] > run["rss_after_imports_bytes"] > 0
            assert variant["ratios"]["speed_vs_trl_best"] > 0
            if variant["side"] == "trl":  # TRL tokenised the same conversations into the same number of tokens
                expected = result["data"]["sft_tokens" if task == "sft" else "preference_sequence_tokens"]
                assert run["dataset_tokens"] == expected
            if variant["warm_cache"]:  # the unmeasured run before filled post-train's reference cache
                assert run["reference_cache_hit"] is True
    objective = next(v for v in groups["sft"]["variants"] if v["relative_to"])
    assert objective["ratios"]["speed_vs_reference"] > 0
    assert groups["generate"]["variants"][0]["stats"]["prompts_per_second"]["median"] > 0

    text = (tmp_path / "smoke.md").read_text()
    assert text.startswith("# Benchmark `smoke`: post-train against TRL")
    for heading in ("## SFT, model `tiny`", "## DPO, model `tiny`", "## Evaluation generation (greedy), model `tiny`"):
        assert heading in text
    assert "| variant | tokens/s | vs TRL best | peak memory GiB | vs TRL best |" in text
    for group in result["groups"]:
        for variant in group["variants"]:
            assert f"| {variant['label']}" in text


def demo_run(wall: float, sft_run: float, sft_loop: float) -> dict:
    stages = [
        {"stage": "sft", "run_seconds": sft_run, "compute_seconds": sft_loop, "cache_hit": False},
        {"stage": "register", "run_seconds": 1.0, "compute_seconds": None, "cache_hit": False},
    ]
    return {
        "load_average_at_start": 0.5,
        "wall_seconds": wall,
        "compute_seconds": sft_loop,
        "outside_compute_seconds": wall - sft_loop,
        "outside_compute_share": (wall - sft_loop) / wall,
        "stages": stages,
    }


def test_demo_overhead_runs_two_commits_each_from_a_worktree_of_its_own():
    from benchmarks import demo_overhead

    head = git_commit(demo_overhead.REPO_ROOT, short=True, revision="HEAD")
    with ExitStack() as stack:
        variants = demo_overhead._variants(None, "HEAD,HEAD", stack)
        assert [variant.label for variant in variants] == [head, head] and variants[0].tree != variants[1].tree
        tree = variants[0].tree
        assert git_commit(tree, short=True, revision="HEAD") == head and (tree / "post_train" / "launch.py").is_file()
        done = subprocess.run(
            [sys.executable, "-c", "import post_train; print(post_train.__file__)"],
            cwd=tree,
            capture_output=True,
            text=True,
            check=True,
        )
        assert done.stdout.strip() == str(tree / "post_train" / "__init__.py")  # that tree's code runs
    assert not tree.exists()
    with ExitStack() as stack, pytest.raises(SystemExit, match="'no-such-commit' names no commit here"):
        demo_overhead._variants(None, "HEAD,no-such-commit", stack)


def test_demo_overhead_alternates_two_values_of_a_key_and_reports_medians():
    from benchmarks import demo_overhead

    assert demo_overhead.loop_seconds([1, 3, 5], [1000, 3000, 5000]) == pytest.approx(5.0)  # 1 s a step, from step 0
    with ExitStack() as stack:
        assert demo_overhead._variants("compute.warm_start=true,false", None, stack) == [
            demo_overhead.Variant("compute.warm_start=true", ["compute.warm_start=true"], demo_overhead.REPO_ROOT),
            demo_overhead.Variant("compute.warm_start=false", ["compute.warm_start=false"], demo_overhead.REPO_ROOT),
        ]
        with pytest.raises(SystemExit, match="expected KEY=A,B"):
            demo_overhead._variants("compute.warm_start", None, stack)
        with pytest.raises(SystemExit, match="one comparison at a time"):
            demo_overhead._variants("compute.warm_start=true,false", "HEAD~1,HEAD", stack)
    runs = {"warm": [demo_run(40, 12, 10), demo_run(50, 13, 10), demo_run(44, 12, 9)], "cold": [demo_run(90, 14, 10)]}
    variants = [
        {"label": label, "summary": demo_overhead.summarise(runs[label]), "runs": runs[label]} for label in runs
    ]
    warm = variants[0]["summary"]
    assert warm["wall_seconds"] == {"median": 44, "min": 40, "max": 50, "n": 3}
    assert warm["outside_compute_seconds"]["median"] == 35
    assert (
        warm["stages"]["sft"]["run_seconds"]["median"] == 12 and warm["stages"]["register"]["compute_seconds"] is None
    )
    result = {
        "recipe": "lowlr",
        "scale": "demo",
        "date": "2026-12-01",
        "cpu": "cpu",
        "cpu_count": 2,
        "post_train_commit": "abc",
        "load_averages": [0.5, 1.5],
        "variants": variants,
    }
    text = demo_overhead.markdown(result)
    assert "4 runs, each with a fresh stage cache and MLflow store, starting Prefect's temporary server, the" in text
    assert "| warm | 44.0 (40.0–50.0) | 10.0 (9.0–10.0) | **35.0 (30.0–40.0)** | 80% (75%–80%) |" in text
    assert "| cold | 90.0 | 10.0 | **80.0** | 89% |" in text
    assert "| sft | 12.0 (12.0–13.0) / 10.0 (9.0–10.0) | 14.0 / 10.0 |" in text
    assert "| register | 1.0 (1.0–1.0) / – | 1.0 / – |" in text


def test_demo_overhead_with_running_services_reads_each_run_from_the_one_store(tmp_path: Path):
    from tests.conftest import make_dvc_repo

    env = {name: value for name, value in os.environ.items() if not name.startswith(("PREFECT_API", "MLFLOW_"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    command = [sys.executable, "-m", "benchmarks.demo_overhead", "--scale", "smoke", "--services", "running"]
    command += ["--repetitions", "2", "--dvc-root", str(make_dvc_repo(tmp_path / "repo"))]
    command += ["--out-dir", str(tmp_path / "out"), "--name", "running"]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Starting a Prefect server on 127.0.0.1:" in done.stdout  # one server, started once for both runs
    assert done.stdout.count("Starting a Prefect server") == 1

    result = json.loads((tmp_path / "out" / "running.json").read_text())
    assert result["services"] == "running"
    runs = result["variants"][0]["runs"]
    assert len(runs) == 2
    for run in runs:  # each run's own stages only, though both are in one store
        assert [stage["stage"] for stage in run["stages"]] == ["pretrain", "sft", "dpo", "evaluate", "register"]
        assert 0 < run["compute_seconds"] < run["stage_run_seconds"] < run["wall_seconds"]
    text = (tmp_path / "out" / "running.md").read_text()
    assert "2 runs, each with a fresh stage cache, sharing one MLflow store (made before the first) and one" in text
