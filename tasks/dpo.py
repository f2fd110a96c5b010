"""Stage 4, DPO: preference optimisation of the SFT model against itself as the frozen reference.

Chosen and rejected responses go through the model in one batch (chosen rows first). The
reference model's log-probs are computed once per (model, data), on the pairs the run will draw
only, and cached on disk, since they never change. Metrics carry TRL's names (`rewards/chosen`,
`rewards/accuracies`, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import torch

from losses import PairLogps, preference_loss, preference_metrics
from post_train.config import PipelineConfig
from post_train.data import Truncation, load_dataset_checked, pair_rows
from post_train.modeling import (
    batch_collate,
    load_frozen,
    load_model,
    load_tokenizer,
    pad_collate,
    sequence_sums,
    target_logprobs,
)
from post_train.reference import reference_logps
from post_train.results import PreparedData, TrainedModel
from post_train.stage_io import stage_main
from post_train.tracking import is_main_process, log_curves, log_dataset, regression_tags, stage_run
from post_train.training import StepOutput, frozen_dtype, make_accelerator, rows_drawn, save_checkpoint, train

DPO_CURVES = ["loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "learning_rate"]


def pair_collate(padding_free: bool, pad_token_id: int):
    """2B sequences (chosen, then rejected), packed or padded, plus the pairs' reference log-probs when known."""
    sequences = batch_collate(padding_free, pad_token_id)

    def collate(pairs: list[dict[str, Any]]) -> dict[str, Any]:
        batch = sequences([pair["chosen"] for pair in pairs] + [pair["rejected"] for pair in pairs])
        if "ref_chosen" in pairs[0]:
            batch["ref_chosen"] = torch.tensor([pair["ref_chosen"] for pair in pairs])
            batch["ref_rejected"] = torch.tensor([pair["ref_rejected"] for pair in pairs])
        batch["num_units"] = len(pairs)
        return batch

    return collate


def sequence_logps(
    model: torch.nn.Module, batch: dict[str, Any], fused: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response lengths of the chosen and rejected halves."""
    logps, mask = target_logprobs(model, batch, fused)
    sums = sequence_sums(logps * mask, batch)
    lengths = sequence_sums(mask.to(logps.dtype), batch)
    half = sums.shape[0] // 2
    return sums[:half], sums[half:], lengths[:half], lengths[half:]


def add_reference_logps(pairs: list[dict[str, Any]], rows: list[list[float]]) -> None:
    """Summed reference log-probs of each pair's responses, from per-token rows (chosen rows first)."""
    for pair, chosen, rejected in zip(pairs, rows[: len(pairs)], rows[len(pairs) :]):
        for side, row in (("chosen", chosen), ("rejected", rejected)):
            counted = pair[side]["loss_mask"][1:]
            pair[f"ref_{side}"] = sum(value for value, keep in zip(row, counted) if keep)


def run(
    config: PipelineConfig,
    sft_model_path: str,
    data: PreparedData,
    output_dir: str,
    parent_run_id: str | None = None,
    checkpoint_dir: str | None = None,
) -> TrainedModel:
    """DPO of `sft_model_path` on `data.preferences`; the model goes to `output_dir`/model.

    Runs on one process or on all of them under `accelerate launch`; only rank 0 logs to MLflow.
    """
    settings = config.dpo
    loss = preference_loss(settings.loss, **settings.loss_params)
    tokenizer = load_tokenizer(sft_model_path)
    examples = load_dataset_checked(data.preferences, "preferences")
    pairs = pair_rows(tokenizer, examples, Truncation.of(settings))
    examples.report.refuse_excess(settings.max_dropped_share, "dpo.max_dropped_share")
    collate = pair_collate(settings.padding_free, tokenizer.pad_token_id)
    accelerator = make_accelerator(config.mixed_precision)
    reference_cache_hit, used = None, []
    if loss.needs_ref:
        used = [pairs[index] for index in rows_drawn(len(pairs), settings, accelerator)]
        sequences = [pair["chosen"] for pair in used] + [pair["rejected"] for pair in used]
        rows, reference_cache_hit = reference_logps(
            lambda: load_frozen(sft_model_path, accelerator.device, frozen_dtype(accelerator)),
            sft_model_path,
            sequences,
            pad_collate(tokenizer.pad_token_id),
            2 * settings.micro_batch_size,
            Path(config.cache_dir),
            accelerator.device,
            accelerator,
        )
        add_reference_logps(used, rows)
    model = load_model(sft_model_path)

    def step(model: torch.nn.Module, batch: dict[str, Any]) -> StepOutput:
        chosen, rejected, chosen_lengths, rejected_lengths = sequence_logps(model, batch, settings.fused_logprobs)
        out = loss(
            PairLogps(
                chosen,
                rejected,
                batch.get("ref_chosen"),
                batch.get("ref_rejected"),
                chosen_lengths=chosen_lengths,
                rejected_lengths=rejected_lengths,
            )
        )
        pairs_in_batch = chosen.shape[0]
        sums = {name: value * pairs_in_batch for name, value in preference_metrics(out).items()}
        sums["logps/chosen"] = float(chosen.detach().sum())
        sums["logps/rejected"] = float(rejected.detach().sum())
        return StepOutput(out.losses.sum(), sums)

    with stage_run(
        "dpo",
        parent_run_id,
        {"dpo": settings.model_dump(mode="json"), "sft_model": sft_model_path},
        system_metrics=True,
    ) as run:
        log_dataset(data.preferences, "preferences", data.hashes["preferences"], "training")
        main = is_main_process()
        if main:
            examples.report.log()
        if reference_cache_hit is not None and main:
            mlflow.set_tag("reference_logps_cache_hit", str(reference_cache_hit).lower())
            mlflow.log_metric("reference_rows", len(used))
        history = train(
            model,
            pairs,
            collate,
            step,
            settings,
            accelerator,
            on_log=lambda metrics, step: mlflow.log_metrics(metrics, step=step),
            description=f"dpo ({settings.loss})",
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=config.compute.checkpoint_every,
            gradient_checkpointing=config.compute.gradient_checkpointing,
        )
        path = save_checkpoint(accelerator, model, tokenizer, Path(output_dir) / "model")
        log_curves(history, DPO_CURVES, "dpo_curves.png", f"DPO ({settings.loss}), lr {settings.learning_rate:g}")
        final = history[-1]
        metrics = {
            "loss_first": history[0]["loss"],
            "loss_final": final["loss"],
            "rewards/accuracies_final": final["rewards/accuracies"],
            "rewards/margins_final": final["rewards/margins"],
        }
        if main:
            mlflow.log_metrics(metrics)
        result = TrainedModel(path=str(path), metrics={**metrics, **examples.report.metrics()}, run_id=run.info.run_id)
        if main:
            mlflow.set_tags(regression_tags(result.regressions))
        return result


if __name__ == "__main__":
    stage_main(run)
