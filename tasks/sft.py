"""Stage 3, SFT: train the base model on demonstrations with the recipe's SFT objective.

The objective is looked up by name in `losses`; this stage only supplies what it asks for:
reference log-probs from the frozen base model (`needs_ref`, on the rows the run will draw only,
computed once and cached on disk), an old-policy snapshot every `rollout_steps` optimizer steps
(`needs_old`, PSFT) and the base's whole next-token distribution, the base run on each batch without
gradient (`needs_ref_distribution`, ASFT). Every few steps it measures the exact token KL to the base model and the
entropy on held-out responses, the drift arXiv 2507.00018 says plain SFT leaves unchecked; on the demo
world also the KL on the answer tokens of terse documents ("reverse c a f b = b f a c"), the base's own
format, where it is competent (`native_kl_to_base`). With `sft.kl_budget` those measurements also set the
learning rate (`post_train.kl_budget`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import torch

from losses import sft_objective
from post_train.config import PipelineConfig
from post_train.data import (
    DataError,
    EvalExample,
    PromptTooLong,
    Truncation,
    completion_example,
    load_dataset_checked,
    response_completion,
    sft_rows,
)
from post_train.evaluation import is_world_prompt, native_batch, spread
from post_train.kl_budget import KLBudget
from post_train.modeling import (
    batch_collate,
    entropy_and_kl_of_batch,
    load_frozen,
    load_model,
    load_tokenizer,
    pad_collate,
    to_device,
)
from post_train.reference import add_demonstration_references
from post_train.results import PreparedData, TrainedModel
from post_train.stage_io import stage_main
from post_train.steps import objective_step, old_policy_snapshot
from post_train.tracking import is_main_process, log_curves, log_dataset, stage_run, trained_model
from post_train.training import (
    frozen_dtype,
    make_accelerator,
    rows_drawn,
    save_checkpoint,
    train,
)

SFT_CURVES = [
    "loss",
    "mean_token_weight",
    "kl_to_base",
    "native_kl_to_base",
    "entropy",
    "learning_rate",
    "lr_multiplier",
    "grad_norm",
]


def held_out_batch(tokenizer, examples: list[EvalExample], size: int, max_length: int, device) -> dict[str, Any]:
    """Evaluation prompts with their reference responses: text the SFT data does not contain (prompts that leave no
    room for a response within `max_length` left out)."""
    rows = []
    for example in examples[:size]:
        try:
            rows.append(
                completion_example(
                    tokenizer, example.prompt, response_completion(example.prompt, example.reference), max_length
                )
            )
        except PromptTooLong:
            continue
    if not rows:
        raise DataError(f"every evaluation prompt among the first {size} fills max_length {max_length}")
    return to_device(pad_collate(tokenizer.pad_token_id)(rows), device)


def native_held_out_batch(tokenizer, examples: list[EvalExample], size: int, device) -> dict[str, Any] | None:
    """Terse documents of `size` evaluation tasks spread over the splits (`native_batch`, the KL counted on their
    answer tokens); None unless every evaluation prompt is of the demo world."""
    from post_train.world.families import parse_task

    if not all(is_world_prompt(example.instruction) for example in examples):
        return None
    tasks = [parse_task(example.instruction) for example in spread(examples, size)]
    return to_device(native_batch(tokenizer, tasks), device)


def run(
    config: PipelineConfig,
    base_model_path: str,
    data: PreparedData,
    output_dir: str,
    parent_run_id: str | None = None,
    checkpoint_dir: str | None = None,
) -> TrainedModel:
    """SFT of `base_model_path` on `data.sft`; the model goes to `output_dir`/model.

    Runs on one process or on all of them under `accelerate launch`; only rank 0 logs to MLflow.
    """
    settings = config.sft
    objective = sft_objective(settings.objective, **settings.objective_params)
    tokenizer = load_tokenizer(base_model_path, config.model.resolved_chat_template())
    examples = load_dataset_checked(data.sft, "sft")
    dataset = sft_rows(tokenizer, examples, Truncation.of(settings))
    examples.report.refuse_excess(settings.max_dropped_share, "sft.max_dropped_share")
    collate = batch_collate(settings.padding_free, tokenizer.pad_token_id)
    accelerator = make_accelerator(config.mixed_precision)
    base = load_frozen(base_model_path, accelerator.device, frozen_dtype(accelerator))
    if not objective.value_is_nll:  # only non-finite losses and gradients are refused (losses.SFTSpec.value_is_nll)
        settings = settings.model_copy(update={"divergence_factor": None})
    rollout_steps = settings.rollout_steps if objective.needs_old else 1
    reference_cache_hit, used = None, None
    if objective.needs_ref:
        used = rows_drawn(len(dataset), settings, accelerator, rollout_steps)
        reference_cache_hit = add_demonstration_references(
            lambda: base,
            base_model_path,
            [dataset[index] for index in used],
            tokenizer.pad_token_id,
            settings.micro_batch_size,
            Path(config.cache_dir),
            accelerator,
        )
    model = load_model(base_model_path)
    eval_examples = load_dataset_checked(data.eval, "eval")
    diagnostics_batch = held_out_batch(
        tokenizer, eval_examples, settings.diagnostics_batch_size, settings.max_length, accelerator.device
    )
    native = native_held_out_batch(tokenizer, eval_examples, settings.diagnostics_batch_size, accelerator.device)
    if settings.kl_budget_metric == "native_kl_to_base" and settings.kl_budget is not None and native is None:
        raise DataError(
            f"{data.eval}: sft.kl_budget_metric native_kl_to_base needs every evaluation prompt to be a demo-world "
            "task; use kl_to_base"
        )
    kl_budget = (
        KLBudget(settings.kl_budget, settings.kl_budget_metric, settings.kl_budget_gain)
        if settings.kl_budget is not None
        else None
    )

    def drift_from_base(trained: torch.nn.Module) -> dict[str, float]:
        measured = entropy_and_kl_of_batch(trained, base, diagnostics_batch)
        drift = {"kl_to_base": measured["kl"], "entropy": measured["entropy"]}
        if native is not None:
            drift["native_kl_to_base"] = entropy_and_kl_of_batch(trained, base, native)["kl"]
        return drift

    with stage_run(
        "sft",
        parent_run_id,
        {"sft": settings.model_dump(mode="json"), "base_model": base_model_path},
        system_metrics=True,
    ) as run:
        log_dataset(data.sft, "sft", data.hashes["sft"], "training")
        log_dataset(data.eval, "eval", data.hashes["eval"], "validation")  # the KL-to-base and entropy references
        main = is_main_process()
        if main:
            examples.report.log()
        if reference_cache_hit is not None and main:
            mlflow.set_tag("reference_logps_cache_hit", str(reference_cache_hit).lower())
            mlflow.log_metric("reference_rows", len(used))
        history = train(
            model,
            dataset,
            collate,
            objective_step(objective, settings.fused_logprobs, reference=base),
            settings,
            accelerator,
            on_log=lambda metrics, step: mlflow.log_metrics(metrics, step=step),
            diagnostics=drift_from_base,
            diagnostics_every=settings.diagnostics_every,
            before_rollout=old_policy_snapshot(settings.fused_logprobs) if objective.needs_old else None,
            rollout_steps=rollout_steps,
            lr_control=kl_budget,
            description=f"sft ({settings.objective})",
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=config.compute.checkpoint_every,
            gradient_checkpointing=config.compute.gradient_checkpointing,
        )
        path = save_checkpoint(accelerator, model, tokenizer, Path(output_dir) / "model")
        title = f"SFT with {settings.objective}, lr {settings.learning_rate:g}"
        if kl_budget is not None:
            title += f", KL budget {kl_budget.budget:g} on {kl_budget.metric}"
            log_curves(
                history,
                [kl_budget.metric, "lr_multiplier", "learning_rate"],
                "kl_budget.png",
                title,
                lines={kl_budget.metric: (kl_budget.budget, "budget")},
            )
        log_curves(history, SFT_CURVES, "sft_curves.png", title)
        final = history[-1]
        metrics = {
            "loss_first": history[0]["loss"],
            "loss_final": final["loss"],
            "kl_to_base_final": final["kl_to_base"],
            "entropy_final": final["entropy"],
        }
        if "native_kl_to_base" in final:
            metrics["native_kl_to_base_final"] = final["native_kl_to_base"]
        if kl_budget is not None:
            metrics["kl_budget"] = kl_budget.budget
            metrics["lr_multiplier_final"] = kl_budget.multiplier
        return trained_model(path, metrics, run, examples.report.metrics())


if __name__ == "__main__":
    stage_main(run)
