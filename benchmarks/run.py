"""The benchmark: `python -m benchmarks.run --preset quick` (also `full`, `smoke`, `gpu`; see README, Benchmarks).

For every model size and task (SFT, DPO, evaluation generation) it runs each variant once per
repetition in a fresh process (`benchmarks.worker`), the order reversed on every other
repetition, after one unmeasured run of each variant that reads reference log-probs (so the
measured runs find them in post-train's cache). Results go to `<out-dir>/<name>.json` and
`<name>.md`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.report import GIB, markdown, summarise_group, with_mfu
from benchmarks.workload import DataShape, ModelShape, write_data, write_model

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

POST_TRAIN_OPTIONS = ("padding_free", "fused_logprobs")
"""Training options of post-train's `sft`/`dpo` sections; each is benchmarked on and off where the config has it."""
FULL = ("full",)
QUICK = ("full", "quick")
EVERY = ("full", "quick", "smoke")
"""Tiers that run a variant: `full` all of them, `quick` the main ones, `smoke` one of each kind."""
SMOKE_OBJECTIVE = "fdiv:pearson_chi2"
"""The SFT objective besides `nll` that the smoke tier runs: an f-divergence, so the smoke test exercises the cache
run. The full tier runs every objective of the registry, each compared with `nll`."""
DPO_BETA = 0.1
H100_BF16_DENSE_TFLOPS = 989.0
"""NVIDIA's dense bf16 peak of an H100/H200 SXM (the 1,979 in the datasheet assumes 2:4 sparsity)."""


@dataclass(frozen=True)
class TrainSettings:
    batch_size: int
    """Sequences (SFT) or pairs (DPO) per optimizer step."""
    micro_batch_size: int
    warmup_steps: int
    """Optimizer steps left out of the measurement (at least 2 keeps SFT's first-step diagnostics out)."""
    measured_steps: int
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    log_every: int = 5
    seed: int = 0
    gradient_checkpointing: bool = False

    def for_spec(self, max_length: int) -> dict[str, Any]:
        return {**asdict(self), "max_steps": self.warmup_steps + self.measured_steps, "max_length": max_length}


@dataclass(frozen=True)
class Preset:
    name: str
    models: tuple[ModelShape, ...]
    data: DataShape
    sft: TrainSettings
    dpo: TrainSettings
    generation_batch_size: int
    max_new_tokens: int
    repetitions: int
    tier: str
    """Which variants run: those whose `tiers` name it."""
    device: str = "cpu"
    precision: str = "fp32"
    run_timeout_s: int = 3600
    peak_tflops: float | None = None


PRESETS = {
    preset.name: preset
    for preset in (
        Preset(
            name="full",
            models=(ModelShape("5m", 192, 3, 4, 768), ModelShape("30m", 512, 5, 8, 2048)),
            data=DataShape(
                vocab_size=16384, sft_examples=400, preference_pairs=200, eval_prompts=64, min_length=64, max_length=512
            ),
            sft=TrainSettings(batch_size=16, micro_batch_size=8, warmup_steps=2, measured_steps=8),
            dpo=TrainSettings(batch_size=8, micro_batch_size=4, warmup_steps=2, measured_steps=8),
            generation_batch_size=64,
            max_new_tokens=32,
            repetitions=3,
            tier="full",
        ),
        Preset(
            name="quick",
            models=(ModelShape("5m", 192, 3, 4, 768),),
            data=DataShape(
                vocab_size=16384, sft_examples=32, preference_pairs=16, eval_prompts=8, min_length=48, max_length=192
            ),
            sft=TrainSettings(batch_size=4, micro_batch_size=2, warmup_steps=2, measured_steps=2),
            dpo=TrainSettings(batch_size=2, micro_batch_size=1, warmup_steps=2, measured_steps=2),
            generation_batch_size=8,
            max_new_tokens=8,
            repetitions=3,
            tier="quick",
            run_timeout_s=900,
        ),
        Preset(
            name="smoke",
            models=(ModelShape("tiny", 32, 1, 2, 64),),
            data=DataShape(
                vocab_size=512, sft_examples=8, preference_pairs=4, eval_prompts=4, min_length=16, max_length=48
            ),
            sft=TrainSettings(batch_size=2, micro_batch_size=1, warmup_steps=1, measured_steps=1),
            dpo=TrainSettings(batch_size=2, micro_batch_size=1, warmup_steps=1, measured_steps=1),
            generation_batch_size=4,
            max_new_tokens=4,
            repetitions=1,
            tier="smoke",
            run_timeout_s=300,
        ),
        Preset(
            name="gpu",
            models=(ModelShape("1b", 2048, 10, 16, 8192),),
            data=DataShape(
                vocab_size=128256,
                sft_examples=400,
                preference_pairs=200,
                eval_prompts=64,
                min_length=64,
                max_length=2048,
            ),
            sft=TrainSettings(batch_size=32, micro_batch_size=4, warmup_steps=3, measured_steps=8),
            dpo=TrainSettings(batch_size=16, micro_batch_size=2, warmup_steps=3, measured_steps=8),
            generation_batch_size=64,
            max_new_tokens=128,
            repetitions=3,
            tier="full",
            device="cuda",
            precision="bf16",
            run_timeout_s=1800,
            peak_tflops=H100_BF16_DENSE_TFLOPS,
        ),
    )
}


@dataclass(frozen=True)
class Variant:
    task: str
    label: str
    side: str
    """`post-train` or `trl`: `vs TRL best` compares against the fastest `trl` variant."""
    runner: str
    settings: dict[str, Any]
    tiers: tuple[str, ...]
    warm_cache: bool = False
    """Reads reference log-probs: the same run once unmeasured first fills post-train's cache."""
    relative_to: str | None = None


# ----------------------------------------------------------------------------------------------- variants


def option_sets(section_model) -> list[dict[str, bool]]:
    """All options off, each one alone on, all on: for the options the config section has (none: one empty set)."""
    present = [
        name
        for name in POST_TRAIN_OPTIONS
        if section_model.model_fields.get(name) is not None and section_model.model_fields[name].annotation is bool
    ]
    off = {name: False for name in present}
    candidates = [off, *({**off, name: True} for name in present), {name: True for name in present}]
    unique: dict[tuple, dict[str, bool]] = {}
    for options in candidates:
        unique.setdefault(tuple(sorted(options.items())), options)
    return list(unique.values())


def option_label(section_model, options: dict[str, bool]) -> str:
    if not options:
        return ""
    defaults = {name: section_model.model_fields[name].default for name in options}
    text = ", ".join(f"{name} {'on' if value else 'off'}" for name, value in options.items())
    return f" [{text}{'; defaults' if options == defaults else ''}]"


def option_tiers(options: dict[str, bool], defaults: dict[str, bool]) -> tuple[str, ...]:
    """The defaults in every tier; all off and all on in `quick` too; one option alone only in `full`."""
    if options == defaults:
        return EVERY
    return QUICK if len(set(options.values())) == 1 else FULL


def sft_variants(liger: bool) -> list[Variant]:
    from losses import SFT_OBJECTIVES, sft_objective
    from post_train.config import SFTConfig

    variants = [
        Variant("sft", "TRL SFTTrainer padded", "trl", "trl-sft", {"padding_free": False, "packing": False}, QUICK),
        Variant(
            "sft", "TRL SFTTrainer padding_free", "trl", "trl-sft", {"padding_free": True, "packing": False}, EVERY
        ),
        Variant(
            "sft", "TRL SFTTrainer packing (bfd)", "trl", "trl-sft", {"padding_free": False, "packing": True}, QUICK
        ),
    ]
    if liger:
        variants += [
            Variant(
                "sft",
                "TRL SFTTrainer padding_free + Liger",
                "trl",
                "trl-sft",
                {"padding_free": True, "packing": False, "liger": True},
                QUICK,
            ),
            Variant(
                "sft",
                "TRL SFTTrainer packing (bfd) + Liger",
                "trl",
                "trl-sft",
                {"padding_free": False, "packing": True, "liger": True},
                QUICK,
            ),
        ]
    defaults = {name: SFTConfig.model_fields[name].default for name in option_sets(SFTConfig)[0]}
    nll_default = None
    for options in option_sets(SFTConfig):
        label = f"post-train nll{option_label(SFTConfig, options)}"
        nll_default = label if options == defaults else nll_default
        variants.append(
            Variant(
                "sft",
                label,
                "post-train",
                "post-train",
                {"section": "sft", "overrides": {"objective": "nll", **options}},
                option_tiers(options, defaults),
            )
        )
    for objective in (name for name in SFT_OBJECTIVES if name != "nll"):
        variants.append(
            Variant(
                "sft",
                f"post-train {objective}{option_label(SFTConfig, defaults)}",
                "post-train",
                "post-train",
                {"section": "sft", "overrides": {"objective": objective, **defaults}},
                ("full", "smoke") if objective == SMOKE_OBJECTIVE else FULL,
                warm_cache=sft_objective(objective).needs_ref,
                relative_to=nll_default,
            )
        )
    return variants


def dpo_variants(liger: bool) -> list[Variant]:
    from losses import preference_loss
    from post_train.config import DPOConfig

    defaults = {name: DPOConfig.model_fields[name].default for name in option_sets(DPOConfig)[0]}
    variants = [
        Variant(
            "dpo",
            f"post-train sigmoid{option_label(DPOConfig, options)}",
            "post-train",
            "post-train",
            {"section": "dpo", "overrides": {"loss": "sigmoid", "loss_params": {"beta": DPO_BETA}, **options}},
            option_tiers(options, defaults),
            warm_cache=preference_loss("sigmoid").needs_ref,
        )
        for options in option_sets(DPOConfig)
    ]
    variants += [
        Variant(
            "dpo", "TRL DPOTrainer", "trl", "trl-dpo", {"precompute_ref_log_probs": False, "beta": DPO_BETA}, EVERY
        ),
        Variant(
            "dpo",
            "TRL DPOTrainer precompute_ref_log_probs",
            "trl",
            "trl-dpo",
            {"precompute_ref_log_probs": True, "beta": DPO_BETA},
            QUICK,
        ),
    ]
    if liger:
        variants.append(
            Variant(
                "dpo",
                "TRL DPOTrainer precompute_ref_log_probs + Liger",
                "trl",
                "trl-dpo",
                {"precompute_ref_log_probs": True, "beta": DPO_BETA, "liger": True},
                QUICK,
            )
        )
    return variants


def generation_variants(batch_size: int, max_new_tokens: int) -> list[Variant]:
    sequential = "post-train generation, one prompt at a time"
    return [
        Variant(
            "generate",
            f"post-train generation, batches of {batch_size}",
            "post-train",
            "generate",
            {"batch_size": batch_size, "max_new_tokens": max_new_tokens},
            EVERY,
            relative_to=sequential,
        ),
        Variant(
            "generate", sequential, "post-train", "generate", {"batch_size": 1, "max_new_tokens": max_new_tokens}, QUICK
        ),
    ]


def plan(preset: Preset, tasks: tuple[str, ...]) -> dict[str, list[Variant]]:
    """The variants of each task that `preset` runs."""
    liger = preset.device == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    builders = {
        "sft": lambda: sft_variants(liger),
        "dpo": lambda: dpo_variants(liger),
        "generate": lambda: generation_variants(preset.generation_batch_size, preset.max_new_tokens),
    }
    return {task: [v for v in builders[task]() if preset.tier in v.tiers] for task in tasks}


def schedule(variants: list[Variant], repetitions: int) -> list[tuple[int, Variant]]:
    """(repetition, variant) in run order: forward on even repetitions, reversed on odd ones (A B, B A, ...)."""
    order = []
    for repetition in range(repetitions):
        order += [(repetition, v) for v in (variants if repetition % 2 == 0 else variants[::-1])]
    return order


# ----------------------------------------------------------------------------------------------- running


@dataclass
class Workspace:
    root: Path
    threads: int
    preset: Preset
    data: dict[str, Any] = field(default_factory=dict)
    token_ids: dict[str, int] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "OMP_NUM_THREADS": str(self.threads),
                "MKL_NUM_THREADS": str(self.threads),
                "MLFLOW_TRACKING_URI": f"sqlite:///{self.root / 'mlflow.db'}",
                "HF_DATASETS_CACHE": str(self.root / "hf-datasets"),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "MLFLOW_DISABLE_TELEMETRY": "true",
                "DO_NOT_TRACK": "1",
            }
        )
        return env


def _spec(space: Workspace, variant: Variant, model: dict[str, Any], repetition: int, scratch: Path) -> dict:
    preset = space.preset
    train = preset.dpo if variant.task == "dpo" else preset.sft
    return {
        "runner": variant.runner,
        "label": variant.label,
        "task": variant.task,
        "repetition": repetition,
        "preset": preset.name,
        "device": preset.device,
        "precision": preset.precision,
        "threads": space.threads,
        **space.token_ids,
        "model": model,
        "data": space.data,
        "cache_dir": str(space.root / "cache"),
        "scratch_dir": str(scratch),
        "train": train.for_spec(preset.data.max_length),
        "settings": variant.settings,
    }


def run_one(space: Workspace, variant: Variant, model: dict[str, Any], repetition: int) -> dict:
    """One fresh process; its result, or `error` with the end of its output."""
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=space.root))
    spec = _spec(space, variant, model, repetition, scratch)
    (scratch / "spec.json").write_text(json.dumps(spec, indent=1))
    command = [sys.executable, "-m", "benchmarks.worker", str(scratch / "spec.json"), str(scratch / "result.json")]
    try:
        done = subprocess.run(
            command, cwd=scratch, env=space.env, capture_output=True, text=True, timeout=space.preset.run_timeout_s
        )
        if done.returncode == 0:
            return json.loads((scratch / "result.json").read_text())
        return {"error": f"exit {done.returncode}: " + (done.stderr or done.stdout).strip()[-2000:]}
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {space.preset.run_timeout_s} s"}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _describe(result: dict[str, Any]) -> str:
    if "error" in result:
        return "FAILED: " + result["error"].splitlines()[-1]
    return (
        f"{result.get('tokens_per_second', float('nan')):,.0f} tok/s, {result['peak_memory_bytes'] / GIB:.2f} GiB, "
        f"{result['wall_seconds']:.0f} s"
    )


def prepare(space: Workspace) -> dict[str, dict[str, Any]]:
    """Data, tokenizer and one saved model per size under the workspace; an MLflow store made once."""
    from transformers import AutoTokenizer

    from post_train.tracking import experiment_id

    preset = space.preset
    files = write_data(space.root / "data", preset.data)
    space.data = asdict(files)
    tokenizer = AutoTokenizer.from_pretrained(files.tokenizer_dir)
    space.token_ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
    models = {
        shape.name: write_model(space.root / "models" / shape.name, shape, files.tokenizer_dir, preset.data.max_length)
        for shape in preset.models
    }
    os.environ["MLFLOW_TRACKING_URI"] = space.env["MLFLOW_TRACKING_URI"]
    experiment_id()  # creating a SQLite store takes seconds: not inside a measured process
    return models


def benchmark(
    preset: Preset,
    name: str,
    threads: int,
    work_dir: Path,
    tasks: tuple[str, ...],
    log=print,
    variants: tuple[str, ...] = (),
) -> dict[str, Any]:
    from benchmarks.measure import machine

    space = Workspace(work_dir, threads, preset)
    info = machine(preset.device, threads, REPO_ROOT)
    models = prepare(space)
    planned = plan(preset, tasks)
    if variants:  # labels that contain one of the given strings
        planned = {task: [v for v in planned[task] if any(part in v.label for part in variants)] for task in planned}
    groups, failures, executed = [], [], []
    total = sum(len(variants) * preset.repetitions for variants in planned.values()) * len(models)
    count = 0
    for model in models.values():
        for task, variants in planned.items():
            for variant in (v for v in variants if v.warm_cache):
                # The very run measured later: post-train keys its cache by the rows a run draws.
                filled = run_one(space, variant, model, -1)
                log(f"cache run {task} {model['name']}: {variant.label}: {_describe(filled)}")
            runs: dict[str, list[dict]] = {v.label: [] for v in variants}
            for repetition, variant in schedule(variants, preset.repetitions):
                count += 1
                result = with_mfu(run_one(space, variant, model, repetition), model, preset.peak_tflops)
                result["repetition"] = repetition
                where = f"[{count}/{total}] {task} {model['name']} rep {repetition + 1}"
                log(f"{where}: {variant.label}: {_describe(result)}")
                executed.append(
                    {"task": task, "model": model["name"], "label": variant.label, "repetition": repetition}
                )
                if "error" in result:
                    failures.append(
                        {
                            "task": task,
                            "model": model["name"],
                            "label": variant.label,
                            "repetition": repetition,
                            "error": result["error"].splitlines()[-1],
                        }
                    )
                runs[variant.label].append(result)
            summarised = [
                {
                    **asdict(v),
                    "runs": [r for r in runs[v.label] if "error" not in r],
                    "failures": [r for r in runs[v.label] if "error" in r],
                }
                for v in variants
            ]
            groups.append(summarise_group(task, model, summarised))
    steps = (
        f"{preset.sft.warmup_steps} warm-up optimizer steps ({preset.sft.measured_steps} measured; DPO "
        f"{preset.dpo.warmup_steps} and {preset.dpo.measured_steps})"
    )
    stats = space.data["stats"]
    sft, dpo, data = preset.sft, preset.dpo, preset.data
    summary = (
        f"Work: SFT global batch {sft.batch_size} sequences (micro-batch {sft.micro_batch_size}), DPO "
        f"{dpo.batch_size} pairs (micro-batch {dpo.micro_batch_size}); AdamW lr {sft.learning_rate:g}, betas "
        f"(0.9, 0.999), weight decay {sft.weight_decay:g}, cosine schedule, gradient clipping {sft.max_grad_norm:g}, "
        f"gradient checkpointing {'on' if sft.gradient_checkpointing else 'off'} on both sides. Data: "
        f"{data.sft_examples} SFT conversations of {stats['sft_min_length']:.0f}–{stats['sft_max_length']:.0f} "
        f"tokens (mean {stats['sft_mean_length']:.0f}, {stats['sft_completion_tokens'] / stats['sft_tokens']:.0%} "
        f"of them completion), {data.preference_pairs} preference pairs (mean sequence "
        f"{stats['preference_mean_length']:.0f} tokens), {data.eval_prompts} evaluation prompts with "
        f"{preset.max_new_tokens} new tokens each; max_length {data.max_length}."
    )
    return {
        "name": name,
        "preset": preset.name,
        "machine": info,
        "settings": {
            **asdict(preset),
            "threads": threads,
            "tasks": list(tasks),
            "summary": summary,
            "warmup_steps_note": steps,
        },
        "models": models,
        "data": stats,
        "groups": groups,
        "failures": failures,
        "order": executed,
    }


def write_results(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{result['name']}.json", out_dir / f"{result['name']}.md"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--name", help="result file name (default: the preset's)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="torch threads per process (default: all cores; 1 on a busy machine, see README)",
    )
    parser.add_argument(
        "--repetitions", type=int, help="override the preset's repetitions (at least 3 for real numbers)"
    )
    parser.add_argument("--sizes", help="comma-separated model names of the preset to run (e.g. 5m)")
    parser.add_argument("--tasks", default="sft,dpo,generate", help="comma-separated subset of sft,dpo,generate")
    parser.add_argument(
        "--tier",
        choices=("smoke", "quick", "full"),
        help="override which variants run (e.g. quick on a short GPU slot)",
    )
    parser.add_argument(
        "--peak-tflops", type=float, help="the GPU's dense bf16 peak for MFU (gpu preset: 989, H100/H200)"
    )
    parser.add_argument(
        "--work-dir", type=Path, help="where models, data and caches go (default: a temporary directory)"
    )
    parser.add_argument(
        "--variants",
        help="run only the variants whose label contains one of these ';'-separated strings "
        "(e.g. 'TRL SFTTrainer padding_free;defaults')",
    )
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    if args.repetitions:
        preset = replace(preset, repetitions=args.repetitions)
    if args.sizes:
        wanted = args.sizes.split(",")
        preset = replace(preset, models=tuple(shape for shape in preset.models if shape.name in wanted))
    if args.tier:
        preset = replace(preset, tier=args.tier)
    if args.peak_tflops:
        preset = replace(preset, peak_tflops=args.peak_tflops)
    tasks = tuple(args.tasks.split(","))
    if preset.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error(f"preset {preset.name} needs a CUDA GPU; torch {torch.__version__} sees none")
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="post-train-bench-"))
    started = time.perf_counter()
    try:
        chosen = tuple(part for part in (args.variants or "").split(";") if part)
        result = benchmark(preset, args.name or preset.name, args.threads, work_dir, tasks, variants=chosen)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    result["wall_seconds"] = time.perf_counter() - started
    result["machine"]["load_average_end"] = os.getloadavg()[0]
    json_path, md_path = write_results(result, args.out_dir)
    print(f"wrote {json_path} and {md_path} ({result['wall_seconds']:.0f} s)")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
