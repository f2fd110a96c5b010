"""Loading causal LMs and turning token batches into per-token log-probs."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from losses import (
    fused_target_logprobs,
    fused_target_logprobs_and_reference_kl,
    token_entropy_and_kl,
    token_logprobs,
    token_reference_kl,
)


def load_tokenizer(name_or_path: str, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer, with a pad token, and `chat_template` when it has no template of its own.

    A base model's tokenizer (Llama-3-8B) has none: the SFT stage passes `model.chat_template`, and
    the SFT model it saves carries that template on to DPO and evaluation. Text-format data needs
    none; conversational data without one is refused (`post_train.data.chat_ids`).
    """
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None and chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def load_model(name_or_path: str) -> PreTrainedModel:
    """A causal LM to train, in float32 (mixed precision, where used, casts on the fly)."""
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_frozen(
    name_or_path: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    model_class: type = AutoModelForCausalLM,
) -> PreTrainedModel:
    """A model that is only run, never trained (evaluation, judges, SFT's base, DPO's reference):
    no gradients, in eval mode, on `device` (default `inference_device()`) in `dtype`.

    The default dtype is bfloat16 on a GPU, which halves the memory of a model that needs no
    gradient precision, and float32 on the CPU, where bfloat16 matmuls are slow.
    """
    device = torch.device(device) if device is not None else inference_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model_class.from_pretrained(name_or_path, dtype=dtype)
    model.requires_grad_(False)
    return model.to(device).eval()


def pad_token_rows(
    rows: Sequence[Sequence[int]],
    pad_token_id: int,
    left: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `attention_mask` [B, T]: token id rows padded with `pad_token_id` to the longest.

    Right padding for training and scoring; left padding (`left=True`) for generation, so that
    every row's new tokens start at the same position.
    """
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for index, row in enumerate(rows):
        columns = slice(width - len(row), width) if left else slice(0, len(row))
        input_ids[index, columns] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, columns] = 1
    return input_ids, attention_mask


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The batch with its tensors on `device`; other values (e.g. `num_units`) as they are."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def _aligned_values(examples: list[dict[str, Any]]) -> list[str]:
    """Keys of the extra per-example values (reference log-probs, old-policy log-probs, ...)."""
    return sorted(examples[0].keys() - {"input_ids", "loss_mask"})


def pad_collate(pad_token_id: int) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Right-pads `input_ids` and `loss_mask` to [B, T]; `num_units` counts the predicted tokens that count.

    Extra per-token values (lists aligned with the predicted tokens) become [B, T-1], scalars [B].
    """

    def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids, attention_mask = pad_token_rows([example["input_ids"] for example in examples], pad_token_id)
        width = input_ids.shape[1]
        loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for row, example in enumerate(examples):
            loss_mask[row, : len(example["loss_mask"])] = torch.tensor(example["loss_mask"], dtype=torch.bool)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
        batch["num_units"] = int(loss_mask[:, 1:].sum())
        batch["num_tokens"] = int(attention_mask.sum())
        for key in _aligned_values(examples):
            values = [example[key] for example in examples]
            if isinstance(values[0], list):
                padded = torch.zeros((len(examples), width - 1), dtype=torch.float32)
                for row, value in enumerate(values):
                    padded[row, : len(value)] = torch.tensor(value)
                batch[key] = padded
            else:
                batch[key] = torch.tensor(values)
        return batch

    return collate


def pack_collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """The examples concatenated into one row [1, N] with no padding (`padding_free`).

    `position_ids` restart at 0 with every sequence: with no attention mask, transformers builds
    an attention in which no token sees another sequence (packed-sequence masks), and each
    sequence is scored as it would be alone. The first token of each sequence is never a target
    (it would be predicted from the previous sequence). `sequence_ids` [1, N-1] says which
    sequence each predicted token belongs to, for per-sequence sums (`sequence_sums`).
    Extra per-token values become [1, N-1] in the same layout, scalars [S].
    """
    lengths = [len(example["input_ids"]) for example in examples]
    input_ids = torch.tensor([token for example in examples for token in example["input_ids"]], dtype=torch.long)
    loss_mask = torch.tensor([keep for example in examples for keep in example["loss_mask"]], dtype=torch.bool)
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    loss_mask[starts] = False
    position_ids = torch.cat([torch.arange(length) for length in lengths])
    sequence_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    batch = {
        "input_ids": input_ids[None],
        "position_ids": position_ids[None],
        "loss_mask": loss_mask[None],
        "sequence_ids": sequence_ids[None, :-1],
        "num_sequences": len(lengths),
        "num_units": int(loss_mask.sum()),
        "num_tokens": len(input_ids),
    }
    for key in _aligned_values(examples):
        values = [example[key] for example in examples]
        if isinstance(values[0], list):
            packed = torch.zeros(len(input_ids), dtype=torch.float32)
            for start, value in zip(starts.tolist(), values):
                packed[start : start + len(value)] = torch.tensor(value, dtype=torch.float32)
            batch[key] = packed[None, :-1]
        else:
            batch[key] = torch.tensor(values)
    return batch


def batch_collate(padding_free: bool, pad_token_id: int) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """How a training stage turns examples into micro-batches: packed rows, or padded ones."""
    return pack_collate if padding_free else pad_collate(pad_token_id)


def sequence_sums(values: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """Per-sequence sums [S] of per-token values [R, T-1] (zero where nothing counts), in either layout."""
    if "sequence_ids" not in batch:
        return values.sum(-1)
    sums = torch.zeros(batch["num_sequences"], dtype=values.dtype, device=values.device)
    return sums.index_add(0, batch["sequence_ids"].reshape(-1), values.reshape(-1))


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """What the model is called with: packed rows by their position ids, padded rows by their attention mask."""
    if "position_ids" in batch:  # transformers detects packing only without a KV cache
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""Config fields of models whose logits are not the output layer's as they are (Gemma-2, Cohere, Granite)."""


def fusable_output_layer(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The output layer, when log-probs may be computed from the last hidden state through it directly.

    Not under FSDP or DeepSpeed (outside the model's forward the layer holds only a shard of its
    weight), nor for models that transform their logits.
    """
    unwrapped = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    sharded = isinstance(unwrapped, getattr(torch.distributed.fsdp, "FSDPModule", ()))
    if not isinstance(unwrapped, PreTrainedModel) or sharded:
        return None
    if any(getattr(unwrapped.config, name, None) for name in LOGIT_TRANSFORMS):
        return None
    head = unwrapped.get_output_embeddings()
    return head if isinstance(head, torch.nn.Linear) else None


def target_logprobs(
    model: torch.nn.Module, batch: dict[str, Any], fused: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of each next token that counts and the mask of those that count, both [R, T-1].

    Only the positions whose next token counts reach the output layer, so prompt tokens and
    padding cost nothing there; positions that do not count get 0. `fused` (where
    `fusable_output_layer` allows it) computes them from the last hidden states chunk by chunk
    (`losses.fused_target_logprobs`) and never holds their logits; otherwise the model's own
    output layer runs at those positions (`logits_to_keep` as a mask). Works on padded
    (`pad_collate`) and packed (`pack_collate`) batches.
    """
    logps, _, mask = _scored(model, None, batch, fused)
    return logps, mask


def target_logprobs_and_reference_kl(
    model: torch.nn.Module, reference: torch.nn.Module, batch: dict[str, Any], fused: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`target_logprobs` and, from the same forward pass, `KL(π_ref(·|s_t) ‖ π_θ(·|s_t))` over the whole
    vocabulary at each counted position, `[R, T-1]` (0 elsewhere), differentiable w.r.t. `model`.

    `reference` (a frozen model with the same vocabulary) runs on the batch without gradient. Fused (where
    `fusable_output_layer` allows it for both models) the KL comes from both last hidden states chunk by
    chunk, with the log-probs in the same pass (`losses.fused_target_logprobs_and_reference_kl`), neither model's
    logits ever held; otherwise from both output
    layers' logits at the counted positions (`losses.token_reference_kl`). Returns (log-probs, KL, mask).
    """
    return _scored(model, reference, batch, fused)


def _last_hidden(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    # One position's logits is the least the model computes; the last hidden state is after the final norm.
    return model(**model_inputs(batch), output_hidden_states=True, logits_to_keep=1).hidden_states[-1][:, :-1]


def _scored(
    model: torch.nn.Module, reference: torch.nn.Module | None, batch: dict[str, Any], fused: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Target log-probs, the KL from `reference` (None without one) and the mask; see the two callers."""
    mask = batch["loss_mask"][:, 1:]
    targets = batch["input_ids"][:, 1:][mask]
    head = fusable_output_layer(model) if fused else None
    ref_head = fusable_output_layer(reference) if head is not None and reference is not None else None
    counted_kl = None
    if head is not None and reference is None:
        counted = fused_target_logprobs(_last_hidden(model, batch)[mask], head.weight, targets, bias=head.bias)
    elif head is not None and ref_head is not None:
        hidden = _last_hidden(model, batch)
        with torch.no_grad():
            ref_hidden = _last_hidden(reference, batch)
        counted, counted_kl = fused_target_logprobs_and_reference_kl(
            hidden[mask], head.weight, targets, ref_hidden[mask], ref_head.weight, head.bias, ref_head.bias
        )
    else:
        keep = torch.nn.functional.pad(mask, (0, 1))  # position t predicts token t + 1
        logits = model(**model_inputs(batch), logits_to_keep=keep).logits
        logits = logits.reshape(-1, logits.shape[-1])
        counted = token_logprobs(logits, targets)
        if reference is not None:
            with torch.no_grad():
                ref_logits = reference(**model_inputs(batch), logits_to_keep=keep).logits
            counted_kl = token_reference_kl(logits, ref_logits.reshape(-1, ref_logits.shape[-1]))
    logps = torch.zeros(mask.shape, dtype=counted.dtype, device=counted.device)
    logps[mask] = counted
    if counted_kl is None:
        return logps, None, mask
    kl = torch.zeros_like(logps)
    kl[mask] = counted_kl
    return logps, kl, mask


@torch.no_grad()
def entropy_and_kl_of_batch(
    model: torch.nn.Module,
    reference: torch.nn.Module | None,
    batch: dict[str, Any],
) -> dict[str, float]:
    """`entropy`: mean token entropy of `model`, and `kl`: exact token KL(model || reference) (when a
    reference is given), over the counted positions (`loss_mask`) of a padded batch (`pad_collate`)."""
    model.eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = model(**inputs).logits[:, :-1]
    ref_logits = reference(**inputs).logits[:, :-1] if reference is not None else None
    entropy, kl = token_entropy_and_kl(logits, ref_logits)
    mask = batch["loss_mask"][:, 1:]
    count = mask.sum().clamp(min=1)
    metrics = {"entropy": float((entropy * mask).sum() / count)}
    if kl is not None:
        metrics["kl"] = float((kl * mask).sum() / count)
    return metrics
