"""Stage 2, base model: the demo world's tiny Llama and its tokenizer, pretrained on the world's corpus."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import torch
from transformers import LlamaForCausalLM

from losses import sft_objective
from post_train.config import PipelineConfig
from post_train.modeling import batch_collate, target_logprobs
from post_train.results import PreparedData, TrainedModel
from post_train.stage_io import stage_main
from post_train.tracking import is_main_process, log_curves, log_dataset, stage_run, trained_model
from post_train.training import StepOutput, make_accelerator, save_checkpoint, train
from post_train.world.generate import iter_world_texts
from post_train.world.model import tiny_llama_config, train_tokenizer


def corpus_ids(tokenizer, documents: list[dict]) -> list[list[int]]:
    """Each pretraining document's token ids: a `text` between BOS and EOS, or a `messages` conversation rendered
    with the chat template (role tokens included, which is how the base model learns the chat format). The texts
    are tokenised in one batch (~2× faster than one call per document on the demo corpus)."""
    texts = [
        tokenizer.apply_chat_template(document["messages"], tokenize=False)
        if "messages" in document
        else document["text"]
        for document in documents
    ]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [
        list(ids) if "messages" in document else [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        for document, ids in zip(documents, encoded)
    ]


def _pretrain(
    config: PipelineConfig, corpus: Path, directory: Path, checkpoint_dir: str | None = None
) -> dict[str, float]:
    settings = config.base_model
    tokenizer = train_tokenizer(iter_world_texts(corpus.parent), settings.vocab_size)
    model_config = tiny_llama_config(
        tokenizer,
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        num_heads=settings.num_heads,
        max_position_embeddings=settings.train.max_length,
    )
    torch.manual_seed(settings.train.seed)
    model = LlamaForCausalLM(model_config)
    limit = settings.train.max_length
    documents = [json.loads(line) for line in corpus.read_text().splitlines()]
    dataset = [
        {"input_ids": ids[:limit], "loss_mask": [True] * min(len(ids), limit)}
        for ids in corpus_ids(tokenizer, documents)
    ]
    nll = sft_objective("nll")

    def step(model: torch.nn.Module, batch: dict) -> StepOutput:
        logps, mask = target_logprobs(model, batch, settings.train.fused_logprobs)
        return StepOutput(nll(logps, mask).loss * mask.sum())

    accelerator = make_accelerator(config.mixed_precision)
    if is_main_process():
        mlflow.log_params({"parameters": sum(p.numel() for p in model.parameters()), "documents": len(dataset)})
    history = train(
        model,
        dataset,
        batch_collate(settings.train.padding_free, tokenizer.pad_token_id),
        step,
        settings.train,
        accelerator,
        on_log=lambda metrics, step: mlflow.log_metrics(metrics, step=step),
        description="pretrain",
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=config.compute.checkpoint_every,
        gradient_checkpointing=config.compute.gradient_checkpointing,
    )
    save_checkpoint(accelerator, model, tokenizer, directory)
    log_curves(
        history, ["loss", "learning_rate", "grad_norm"], "pretrain_curves.png", "Pretraining the demo base model"
    )
    return {"loss_first": history[0]["loss"], "loss_final": history[-1]["loss"]}


def run(
    config: PipelineConfig,
    data: PreparedData,
    output_dir: str,
    parent_run_id: str | None = None,
    checkpoint_dir: str | None = None,
) -> TrainedModel:
    """Pretrain the demo base model (tokenizer and tiny Llama) into `output_dir`/model (rank 0 logs to MLflow)."""
    if data.pretrain_corpus is None:
        raise ValueError(
            "the demo base model needs a demo world (data.world) to pretrain on, or set model.name_or_path"
        )
    with stage_run(
        "pretrain", parent_run_id, {"base_model": config.base_model.model_dump(mode="json")}, system_metrics=True
    ) as run:
        # The world's directory: the corpus and the texts the tokenizer is trained on (DVC's md5 of it).
        log_dataset(str(Path(data.pretrain_corpus).parent), "world", data.hashes["world"], "training")
        metrics = _pretrain(config, Path(data.pretrain_corpus), Path(output_dir) / "model", checkpoint_dir)
        return trained_model(Path(output_dir) / "model", metrics, run)


if __name__ == "__main__":
    stage_main(run)
