"""Generation with `transformers` on a model loaded in this process: left-padded batches with the KV cache."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from post_train.data import Prompt, prompt_ids
from post_train.generators.base import GenerationSettings, Generator


@torch.no_grad()
def generate_token_ids(
    model,
    tokenizer,
    rows: Sequence[Sequence[int]],
    settings: GenerationSettings,
) -> list[list[int]]:
    """The new token ids after each prompt row: left-padded batches, KV cache on, seeded per batch (same seed, same
    tokens). A row that stops early keeps its EOS, followed by padding up to the batch's longest."""
    from post_train.modeling import pad_token_rows

    model.eval()
    device = next(model.parameters()).device
    generated: list[list[int]] = []
    for start in tqdm(range(0, len(rows), settings.batch_size), desc="generate"):
        input_ids, attention_mask = pad_token_rows(
            rows[start : start + settings.batch_size], tokenizer.pad_token_id, left=True
        )
        width = input_ids.shape[1]
        torch.manual_seed(settings.seed + start)
        sampling = (
            {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
            if settings.temperature > 0
            else {"do_sample": False}
        )
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
            **sampling,
        )
        generated.extend(output[:, width:].tolist())
    return generated


def generate_responses(
    model,
    tokenizer,
    prompts: list[Prompt],
    settings: GenerationSettings,
) -> list[str]:
    """Responses to prompts (conversations through the chat template, text as it is), `generate_token_ids` decoded
    without special tokens and stripped."""
    rows = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    generated = generate_token_ids(model, tokenizer, rows, settings)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated]


class InProcessGenerator(Generator):
    """`evaluation.backend: transformers`: `generate_responses` on the model, which the caller may reuse."""

    def model(self, model_path: str) -> Any:
        from post_train.modeling import load_frozen

        return load_frozen(model_path)

    def generate(
        self, model_path: str, tokenizer, prompts: list[Prompt], settings: GenerationSettings, model: Any | None = None
    ) -> list[str]:
        return generate_responses(self.model(model_path) if model is None else model, tokenizer, prompts, settings)
