"""Batched generation and win rates against reference responses.

Follows AlpacaEval 2's conventions (see shared docs/evaluation.md): a preference per
instruction in {0, 0.5, 1} (reference wins, draw, model wins); win rate = mean;
standard error = sample std (ddof=1) / sqrt(n). Both are fractions in [0, 1]; AlpacaEval
prints them multiplied by 100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from post_train.data import EvalExample, chat_ids


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    temperature: float
    top_p: float
    batch_size: int
    seed: int


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[list[dict[str, str]]], settings: GenerationSettings) -> list[str]:
    """Responses to chat prompts, left-padded batches, KV cache on; same seed, same text."""
    model.eval()
    device = next(model.parameters()).device
    responses: list[str] = []
    for start in tqdm(range(0, len(prompts), settings.batch_size), desc="generate"):
        encoded = [chat_ids(tokenizer, prompt, add_generation_prompt=True) for prompt in prompts[start : start + settings.batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        torch.manual_seed(settings.seed + start)
        sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p} if settings.temperature > 0 else {"do_sample": False}
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
            **sampling,
        )
        for row in output[:, width:]:
            responses.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return responses


def preference(model_score: float, reference_score: float) -> float:
    """1 when the model's response scores higher, 0.5 on a tie, 0 when the reference's does."""
    if model_score > reference_score:
        return 1.0
    return 0.5 if model_score == reference_score else 0.0


def win_rate(preferences: list[float]) -> tuple[float, float]:
    """(win rate, standard error), both fractions."""
    n = len(preferences)
    if n == 0:
        raise ValueError("no preferences to compute a win rate from")
    mean = sum(preferences) / n
    if n == 1:
        return mean, float("nan")
    variance = sum((p - mean) ** 2 for p in preferences) / (n - 1)
    return mean, math.sqrt(variance / n)


def last_user_message(example: EvalExample) -> str:
    return next(m["content"] for m in reversed(example.prompt) if m["role"] == "user")
