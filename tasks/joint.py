"""Stage 4 of `pipeline: joint`: the SFT objective on demonstrations and the preference loss on pairs, in one stage.

arXiv 2507.00018 asks for SFT and DPO optimised together rather than in sequence (its App. D reports that a naive
joint run did not help). Here every micro-batch holds demonstrations and pairs side by side (row i of the joint
dataset: demonstration i mod N and pair i mod M, so an epoch covers the larger set once), and an optimizer step's
loss is `joint.sft_weight` × the SFT objective's token mean plus `joint.dpo_weight` × the preference loss's pair
mean, each over its own units of the whole step (the loop's batches of parts), in one backward pass. The model
starts from `start_model_path` — the SFT stage's model (in a joint recipe a short warm-up) or the base — which
is also the frozen reference of both terms: DPO's reference log-probs and those of an SFT objective that reads a
reference (`fdiv:*`), computed once on the rows the run draws and cached; `asft` runs it on each batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import mlflow
import torch

from losses import preference_loss, sft_objective
from post_train.config import PipelineConfig
from post_train.data import Truncation, load_dataset_checked, pair_rows, sft_rows
from post_train.modeling import batch_collate, load_frozen, load_model, load_tokenizer
from post_train.reference import add_demonstration_references, add_pair_references
from post_train.results import PreparedData, TrainedModel
from post_train.stage_io import stage_main
from post_train.steps import objective_step, old_policy_snapshot, pair_collate, preference_step
from post_train.tracking import is_main_process, log_curves, log_dataset, stage_run, trained_model
from post_train.training import (
    RolloutFn,
    StepFn,
    StepOutput,
    frozen_dtype,
    make_accelerator,
    rows_drawn,
    save_checkpoint,
    train,
)

JOINT_CURVES = [
    "loss",
    "sft/loss",
    "dpo/loss",
    "dpo/rewards/accuracies",
    "dpo/rewards/margins",
    "sft/mean_token_weight",
    "learning_rate",
    "grad_norm",
]


def joint_rows(demonstrations: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Row i: demonstration i mod N beside pair i mod M, max(N, M) rows (the rows share the smaller set's dicts)."""
    count = max(len(demonstrations), len(pairs))
    return [{"sft": demonstrations[i % len(demonstrations)], "dpo": pairs[i % len(pairs)]} for i in range(count)]


def joint_collate(padding_free: bool, pad_token_id: int) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """A batch of two parts: the rows' demonstrations (`sft`, units: counted tokens) and pairs (`dpo`, units: pairs)."""
    demonstrations, pairs = batch_collate(padding_free, pad_token_id), pair_collate(padding_free, pad_token_id)

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        parts = {"sft": demonstrations([row["sft"] for row in rows]), "dpo": pairs([row["dpo"] for row in rows])}
        return {
            **parts,
            "num_units": {name: part["num_units"] for name, part in parts.items()},
            "num_tokens": sum(part["num_tokens"] for part in parts.values()),
        }

    return collate


def joint_step(sft_step: StepFn, dpo_step: StepFn) -> StepFn:
    """Both parts of a joint batch through their own steps; metrics named `sft/...` and `dpo/...`."""

    def step(model: torch.nn.Module, batch: dict[str, Any]) -> StepOutput:
        outputs = {"sft": sft_step(model, batch["sft"]), "dpo": dpo_step(model, batch["dpo"])}
        metrics = {f"{part}/{name}": value for part, out in outputs.items() for name, value in out.metric_sums.items()}
        return StepOutput({part: out.loss_sum for part, out in outputs.items()}, metrics)

    return step


def sft_part_snapshot(snapshot: RolloutFn) -> RolloutFn:
    """PSFT's old-policy pass over the demonstrations of a rollout of joint batches."""
    return lambda model, rollout: snapshot(model, [[batch["sft"] for batch in group] for group in rollout])


def run(
    config: PipelineConfig,
    start_model_path: str,
    data: PreparedData,
    output_dir: str,
    parent_run_id: str | None = None,
    checkpoint_dir: str | None = None,
) -> TrainedModel:
    """Joint SFT+DPO of `start_model_path` on `data.sft` and `data.preferences`; the model goes to
    `output_dir`/model. Runs on one process or on all of them under `accelerate launch`; only rank 0 logs."""
    settings = config.joint
    objective = sft_objective(config.sft.objective, **config.sft.objective_params)
    loss = preference_loss(config.dpo.loss, **config.dpo.loss_params)
    tokenizer = load_tokenizer(start_model_path)
    limits = Truncation.of(settings)
    demonstration_examples = load_dataset_checked(data.sft, "sft")
    demonstrations = sft_rows(tokenizer, demonstration_examples, limits)
    pair_examples = load_dataset_checked(data.preferences, "preferences")
    pairs = pair_rows(tokenizer, pair_examples, limits)
    for examples in (demonstration_examples, pair_examples):
        examples.report.refuse_excess(settings.max_dropped_share, "joint.max_dropped_share")
    rows = joint_rows(demonstrations, pairs)
    accelerator = make_accelerator(config.mixed_precision)
    if not objective.value_is_nll:  # only non-finite losses and gradients are refused (losses.SFTSpec.value_is_nll)
        settings = settings.model_copy(update={"divergence_factor": None})
    rollout_steps = config.sft.rollout_steps if objective.needs_old else 1
    reference: torch.nn.Module | None = None

    def frozen_reference() -> torch.nn.Module:
        nonlocal reference
        if reference is None:
            reference = load_frozen(start_model_path, accelerator.device, frozen_dtype(accelerator))
        return reference

    drawn = [rows[index] for index in rows_drawn(len(rows), settings, accelerator, rollout_steps)]
    cache_hits = {}
    if objective.needs_ref:
        used = list({id(row["sft"]): row["sft"] for row in drawn}.values())
        cache_hits["sft"] = add_demonstration_references(
            frozen_reference,
            start_model_path,
            used,
            tokenizer.pad_token_id,
            settings.micro_batch_size,
            Path(config.cache_dir),
            accelerator,
        )
    if loss.needs_ref:
        used = list({id(row["dpo"]): row["dpo"] for row in drawn}.values())
        cache_hits["dpo"] = add_pair_references(
            frozen_reference,
            start_model_path,
            used,
            tokenizer.pad_token_id,
            settings.micro_batch_size,
            Path(config.cache_dir),
            accelerator,
        )
    model = load_model(start_model_path)
    sft_step = objective_step(
        objective,
        settings.fused_logprobs,
        reference=frozen_reference() if objective.needs_ref_distribution else None,
    )

    with stage_run(
        "joint",
        parent_run_id,
        {
            "joint": settings.model_dump(mode="json"),
            "sft_objective": config.sft.objective,
            "sft_objective_params": config.sft.objective_params,
            "dpo_loss": config.dpo.loss,
            "dpo_loss_params": config.dpo.loss_params,
            "start_model": start_model_path,
        },
        system_metrics=True,
    ) as run:
        log_dataset(data.sft, "sft", data.hashes["sft"], "training")
        log_dataset(data.preferences, "preferences", data.hashes["preferences"], "training")
        main = is_main_process()
        if main:
            demonstration_examples.report.log()
            pair_examples.report.log()
            for part, hit in cache_hits.items():
                mlflow.set_tag(f"reference_logps_cache_hit/{part}", str(hit).lower())
        history = train(
            model,
            rows,
            joint_collate(settings.padding_free, tokenizer.pad_token_id),
            joint_step(sft_step, preference_step(loss, settings.fused_logprobs)),
            settings,
            accelerator,
            on_log=lambda metrics, step: mlflow.log_metrics(metrics, step=step),
            before_rollout=sft_part_snapshot(old_policy_snapshot(settings.fused_logprobs))
            if objective.needs_old
            else None,
            rollout_steps=rollout_steps,
            part_weights={"sft": settings.sft_weight, "dpo": settings.dpo_weight},
            description=f"joint ({config.sft.objective} x{settings.sft_weight:g} + {config.dpo.loss} "
            f"x{settings.dpo_weight:g})",
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=config.compute.checkpoint_every,
            gradient_checkpointing=config.compute.gradient_checkpointing,
        )
        path = save_checkpoint(accelerator, model, tokenizer, Path(output_dir) / "model")
        log_curves(
            history,
            JOINT_CURVES,
            "joint_curves.png",
            f"Joint {config.sft.objective} x{settings.sft_weight:g} + {config.dpo.loss} x{settings.dpo_weight:g}, "
            f"lr {settings.learning_rate:g}",
        )
        first, final = history[0], history[-1]
        metrics = {
            "loss_first": first["loss"],
            "loss_final": final["loss"],
            "sft_loss_first": first["sft/loss"],
            "sft_loss_final": final["sft/loss"],
            "dpo_loss_first": first["dpo/loss"],
            "dpo_loss_final": final["dpo/loss"],
            "rewards/accuracies_final": final["dpo/rewards/accuracies"],
            "rewards/margins_final": final["dpo/rewards/margins"],
        }
        counts = {**demonstration_examples.report.metrics(), **pair_examples.report.metrics()}
        return trained_model(path, metrics, run, counts)


if __name__ == "__main__":
    stage_main(run)
