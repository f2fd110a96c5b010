"""One benchmark measurement's work, by runner name: what a user of each trainer would run.

post-train runs through its real stage code (`tasks.prepare.run`, then `tasks.sft.run` or
`tasks.dpo.run`; the evaluation's `generate_responses`) on a validated `PipelineConfig`; TRL
through `SFTTrainer` / `DPOTrainer` with the same batch, optimizer, schedule and steps. A runner
returns what it knows beyond the step meter (cache hits, the token count of TRL's prepared
dataset, generation throughput).
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

Spec = dict[str, Any]

DIAGNOSTICS_NEVER = 10**9
"""`sft.diagnostics_every`: KL-to-base only at the first and last step, which the measured window leaves out."""


@dataclass(frozen=True)
class Runner:
    run: Callable[[Spec], dict[str, Any]]
    imports: tuple[str, ...]
    """Modules a user's process imports before any work: loaded first, so the RSS they take is known."""
    trains: bool = True


# ----------------------------------------------------------------------------------------------- post-train


def _post_train_config(spec: Spec):
    from post_train.config import validate_config

    train = spec["train"]
    common = {
        key: train[key]
        for key in (
            "learning_rate",
            "batch_size",
            "micro_batch_size",
            "max_steps",
            "max_length",
            "warmup_ratio",
            "weight_decay",
            "max_grad_norm",
            "log_every",
            "seed",
        )
    }
    settings = spec["settings"]
    sections = {"sft": dict(common), "dpo": dict(common)}
    sections["sft"].update(diagnostics_every=DIAGNOSTICS_NEVER, diagnostics_batch_size=train["micro_batch_size"])
    sections[settings["section"]].update(settings["overrides"])
    data = spec["data"]
    return validate_config(
        {
            "recipe": "benchmark",
            "scale": spec["preset"],
            "model": {"name_or_path": spec["model"]["path"]},
            "data": {"world": None, "sft": data["sft"], "preferences": data["preferences"], "eval": data["eval"]},
            **sections,
            "compute": {"gradient_checkpointing": train["gradient_checkpointing"]},
            "mixed_precision": "bf16" if spec["precision"] == "bf16" else "no",
            "cache_dir": spec["cache_dir"],
            "runs_dir": f"{spec['scratch_dir']}/runs",
        },
        f"benchmark configuration for {spec['label']}",
    )


def post_train_stage(spec: Spec) -> dict[str, Any]:
    """`tasks.<section>.run` on the benchmark's model and data, after the prepare stage, as the flow calls them."""
    import mlflow

    config = _post_train_config(spec)
    prepared = importlib.import_module("tasks.prepare").run(config)  # validation and hashes: no DVC without a world
    stage = importlib.import_module(f"tasks.{spec['settings']['section']}")
    trained = stage.run(config, spec["model"]["path"], prepared, f"{spec['scratch_dir']}/output")
    tags = mlflow.MlflowClient().get_run(trained.run_id).data.tags
    hit = tags.get("reference_logps_cache_hit")
    return {
        "reference_cache_hit": None if hit is None else hit == "true",
        "loss_final": trained.metrics.get("loss_final"),
    }


# ----------------------------------------------------------------------------------------------- TRL


def _trl_arguments(spec: Spec) -> dict[str, Any]:
    """TrainingArguments equal to post-train's loop: AdamW (torch), cosine schedule with the same warm-up steps."""
    train = spec["train"]
    return {
        "output_dir": f"{spec['scratch_dir']}/output",
        "per_device_train_batch_size": train["micro_batch_size"],
        "gradient_accumulation_steps": train["batch_size"] // train["micro_batch_size"],
        "max_steps": train["max_steps"],
        "learning_rate": train["learning_rate"],
        "lr_scheduler_type": "cosine",
        "warmup_steps": math.ceil(train["warmup_ratio"] * train["max_steps"]),  # post-train's rounding
        "weight_decay": train["weight_decay"],
        "optim": "adamw_torch",
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "max_grad_norm": train["max_grad_norm"],
        "logging_steps": train["log_every"],
        "gradient_checkpointing": train["gradient_checkpointing"],  # TRL's default is True, post-train's False
        "bf16": spec["precision"] == "bf16",
        "use_cpu": spec["device"] == "cpu",
        "seed": train["seed"],
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "use_liger_kernel": spec["settings"].get("liger", False),
    }


def _trl_model_and_tokenizer(spec: Spec):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = spec["model"]["path"]
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def trl_sft(spec: Spec) -> dict[str, Any]:
    import datasets
    from trl import SFTConfig, SFTTrainer

    settings = spec["settings"]
    model, tokenizer = _trl_model_and_tokenizer(spec)
    # Padding-free without packing refuses a max_length: the data is never longer than it anyway.
    unbounded = settings["padding_free"] and not settings["packing"]
    args = SFTConfig(
        **_trl_arguments(spec),
        max_length=None if unbounded else spec["train"]["max_length"],
        packing=settings["packing"],
        packing_strategy="bfd",
        padding_free=settings["padding_free"],
        completion_only_loss=True,
    )
    dataset = datasets.load_dataset("json", data_files=spec["data"]["trl_sft"], split="train")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    prepared = trainer.train_dataset
    return {"dataset_tokens": sum(len(ids) for ids in prepared["input_ids"]), "dataset_rows": len(prepared)}


def trl_dpo(spec: Spec) -> dict[str, Any]:
    import datasets
    from trl import DPOConfig, DPOTrainer

    settings = spec["settings"]
    model, tokenizer = _trl_model_and_tokenizer(spec)
    args = DPOConfig(
        **_trl_arguments(spec),
        max_length=spec["train"]["max_length"],
        beta=settings["beta"],
        loss_type=["sigmoid"],
        precompute_ref_log_probs=settings["precompute_ref_log_probs"],
    )
    dataset = datasets.load_dataset("json", data_files=spec["data"]["preferences"], split="train")
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    prepared = trainer.train_dataset
    tokens = sum(
        len(p) + len(c) + len(r)
        for p, c, r in zip(prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"])
    )
    # Each pair's prompt is in both of its sequences.
    return {"dataset_tokens": tokens + sum(len(p) for p in prepared["prompt_ids"]), "dataset_rows": len(prepared)}


# ----------------------------------------------------------------------------------------------- generation


def generate(spec: Spec) -> dict[str, Any]:
    """The evaluate stage's generation (`generate_responses`, greedy) over the evaluation prompts."""
    import torch

    from post_train.data import load_dataset_checked
    from post_train.generators.base import GenerationSettings
    from post_train.generators.in_process import generate_responses
    from post_train.modeling import load_frozen, load_tokenizer

    settings = spec["settings"]
    device = spec["device"]
    tokenizer = load_tokenizer(spec["model"]["path"])
    model = load_frozen(spec["model"]["path"], device, torch.bfloat16 if spec["precision"] == "bf16" else torch.float32)
    prompts = [example.prompt for example in load_dataset_checked(spec["data"]["eval"], "eval")]
    generation = GenerationSettings(
        max_new_tokens=settings["max_new_tokens"],
        temperature=0.0,
        top_p=1.0,
        batch_size=settings["batch_size"],
        seed=0,
    )
    generate_responses(model, tokenizer, prompts[:2], generation)  # warm-up, not timed
    slots = [0]

    def count_new_tokens(module, inputs):  # every forward call gives each of its rows one new token
        slots[0] += inputs[0].shape[0]

    hook = model.get_input_embeddings().register_forward_pre_hook(count_new_tokens)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    generate_responses(model, tokenizer, prompts, generation)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    hook.remove()
    return {
        "measured_seconds": seconds,
        "prompts": len(prompts),
        "prompts_per_second": len(prompts) / seconds,
        "generated_tokens": slots[0],
        "tokens_per_second": slots[0] / seconds,
    }


RUNNERS: dict[str, Runner] = {
    "post-train": Runner(post_train_stage, imports=("tasks.prepare", "tasks.sft", "tasks.dpo", "mlflow")),
    "trl-sft": Runner(trl_sft, imports=("trl", "datasets")),
    "trl-dpo": Runner(trl_dpo, imports=("trl", "datasets")),
    "generate": Runner(generate, imports=("post_train.evaluation", "post_train.modeling"), trains=False),
}
