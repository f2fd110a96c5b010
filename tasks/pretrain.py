"""Stage 2, base model: a user's model as given, or the demo world's tiny Llama pretrained here.

The pretrained base is cached under `cache_dir/base-models/<key>`, the key hashing the
base-model config, the data hash and the code that builds it, so a second run reuses it
and any change of those retrains it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from prefect import task
from transformers import LlamaForCausalLM

from losses import sft_objective
from post_train.config import PipelineConfig
from post_train.fingerprint import content_key, source_fingerprint
from post_train.modeling import pad_collate, target_logprobs
from post_train.tracking import log_curves, stage_run
from post_train.training import StepOutput, make_accelerator, save_checkpoint, train
from post_train.world.generate import iter_world_texts
from post_train.world.model import tiny_llama_config, train_tokenizer
from tasks.prepare import PreparedData

BASE_MODEL_CODE = ("post_train/world", "post_train/training.py", "post_train/modeling.py", "losses", "tasks/pretrain.py")


@dataclass(frozen=True)
class BaseModel:
    path: str
    cache_hit: bool
    metrics: dict[str, float]


def base_model_key(config: PipelineConfig, data_hash: str) -> str:
    return content_key(
        base_model=config.base_model.model_dump(mode="json"),
        data_hash=data_hash,
        code=source_fingerprint(*BASE_MODEL_CODE),
    )


def _pretrain(config: PipelineConfig, corpus: Path, directory: Path) -> dict[str, float]:
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
    documents = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    limit = settings.train.max_length
    dataset = []
    for document in documents:
        ids = [tokenizer.bos_token_id, *tokenizer(document, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        dataset.append({"input_ids": ids[:limit], "loss_mask": [True] * min(len(ids), limit)})
    nll = sft_objective("nll")

    def step(model: torch.nn.Module, batch: dict) -> StepOutput:
        logps, mask = target_logprobs(model, batch)
        return StepOutput(nll(logps, mask).loss * mask.sum())

    accelerator = make_accelerator(config.mixed_precision)
    mlflow.log_params({"parameters": sum(p.numel() for p in model.parameters()), "documents": len(dataset)})
    history = train(
        model,
        dataset,
        pad_collate(tokenizer.pad_token_id),
        step,
        settings.train,
        accelerator,
        on_log=lambda metrics, step: mlflow.log_metrics(metrics, step=step),
        description="pretrain",
    )
    save_checkpoint(accelerator, model, tokenizer, directory)
    log_curves(history, ["loss", "learning_rate", "grad_norm"], "pretrain_curves.png", "Pretraining the demo base model")
    return {"loss_first": history[0]["loss"], "loss_final": history[-1]["loss"]}


def run(config: PipelineConfig, data: PreparedData, parent_run_id: str | None = None) -> BaseModel:
    if config.model.name_or_path is not None:
        return BaseModel(path=config.model.name_or_path, cache_hit=True, metrics={})
    if data.pretrain_corpus is None:
        raise ValueError("the demo base model needs a demo world (data.world) to pretrain on, or set model.name_or_path")
    directory = Path(config.cache_dir).resolve() / "base-models" / base_model_key(config, data.data_hash)
    with stage_run("pretrain", parent_run_id, {"base_model": config.base_model.model_dump(mode="json")}):
        cache_hit = (directory / "config.json").is_file()
        mlflow.set_tag("cache_hit", str(cache_hit).lower())
        mlflow.log_param("base_model_path", str(directory))
        metrics: dict[str, float] = {}
        if not cache_hit:
            directory.parent.mkdir(parents=True, exist_ok=True)
            # Train into a scratch directory and rename, so an interrupted run leaves no half-written cache.
            scratch = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".incomplete-"))
            try:
                metrics = _pretrain(config, Path(data.pretrain_corpus), scratch / "model")
                (scratch / "model").rename(directory)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return BaseModel(path=str(directory), cache_hit=cache_hit, metrics=metrics)


pretrain_task = task(run, name="pretrain-base-model")
