"""Loading causal LMs and turning token batches into per-token log-probs."""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from losses import token_entropy_and_kl, token_logprobs
from post_train.config import ConfigError


def load_tokenizer(name_or_path: str, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer, with a pad token, and `chat_template` when it has no template of its own.

    A base model's tokenizer (Llama-3-8B) has none: the SFT stage passes `model.chat_template`, and
    the SFT model it saves carries that template on to DPO and evaluation.
    """
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None and chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.chat_template is None:
        raise ConfigError(  # a ValueError that the launcher does not retry
            f"{name_or_path}: the tokenizer has no chat template; post-train needs one to format prompts "
            "(set model.chat_template, e.g. `default`)"
        )
    return tokenizer


def load_model(name_or_path: str, trainable: bool = True) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
    model.requires_grad_(trainable)
    if not trainable:
        model.eval()
    return model


def pad_collate(pad_token_id: int) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Right-pads `input_ids` and `loss_mask`; `num_units` counts the predicted tokens that count."""

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        loss_mask = torch.zeros((len(examples), width), dtype=torch.bool)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            input_ids[row, :length] = torch.tensor(example["input_ids"])
            attention_mask[row, :length] = 1
            loss_mask[row, :length] = torch.tensor(example["loss_mask"], dtype=torch.bool)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
        batch["num_units"] = int(loss_mask[:, 1:].sum())
        for key in examples[0].keys() - {"input_ids", "loss_mask"}:
            values = [example[key] for example in examples]
            if isinstance(values[0], list):  # per-token values, aligned with the predicted tokens
                padded = torch.zeros((len(examples), width - 1), dtype=torch.float32)
                for row, value in enumerate(values):
                    padded[row, : len(value)] = torch.tensor(value)
                batch[key] = padded
            else:
                batch[key] = torch.tensor(values)
        return batch

    return collate


def target_logprobs(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of each next token and the mask of those that count, both [B, T-1]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = token_logprobs(logits[:, :-1], batch["input_ids"][:, 1:])
    return logps, batch["loss_mask"][:, 1:]


@torch.no_grad()
def entropy_and_kl(model: torch.nn.Module, reference: torch.nn.Module | None, batch: dict[str, Any]) -> dict[str, float]:
    """Mean token entropy of `model` and exact token KL(model || reference) over the counted positions."""
    model.eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = model(**inputs).logits[:, :-1]
    ref_logits = reference(**inputs).logits[:, :-1] if reference is not None else None
    entropy, kl = token_entropy_and_kl(logits, ref_logits)
    mask = batch["loss_mask"][:, 1:]
    count = mask.sum().clamp(min=1)
    metrics = {"entropy": float((entropy * mask).sum() / count)}
    if kl is not None:
        metrics["kl_to_base"] = float((kl * mask).sum() / count)
    return metrics
