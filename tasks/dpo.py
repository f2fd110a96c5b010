"""Stage 4, DPO: preference optimisation of the SFT model against itself as the frozen reference.

Chosen and rejected responses go through the model in one batch (chosen rows first). The
reference model's log-probs are computed once per (model, data), on the pairs the run will draw
only, and cached on disk, since they never change. Metrics carry TRL's names (`rewards/chosen`,
`rewards/accuracies`, ...).
"""

from __future__ import annotations

from pathlib import Path

import mlflow

from losses import preference_loss
from post_train.config import PipelineConfig
from post_train.data import Truncation, load_dataset_checked, pair_rows
from post_train.modeling import load_frozen, load_model, load_tokenizer
from post_train.reference import add_pair_references
from post_train.results import PreparedData, TrainedModel
from post_train.stage_io import stage_main
from post_train.steps import pair_collate, preference_step
from post_train.tracking import is_main_process, log_curves, log_dataset, stage_run, trained_model
from post_train.training import frozen_dtype, make_accelerator, rows_drawn, save_checkpoint, train

DPO_CURVES = ["loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "learning_rate"]


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
        reference_cache_hit = add_pair_references(
            lambda: load_frozen(sft_model_path, accelerator.device, frozen_dtype(accelerator)),
            sft_model_path,
            used,
            tokenizer.pad_token_id,
            settings.micro_batch_size,
            Path(config.cache_dir),
            accelerator,
        )
    model = load_model(sft_model_path)

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
            preference_step(loss, settings.fused_logprobs),
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
        return trained_model(path, metrics, run, examples.report.metrics())


if __name__ == "__main__":
    stage_main(run)
