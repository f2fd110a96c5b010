"""The benchmark's own world: a word-level tokenizer, random-init Llamas and synthetic data, written to disk.

Both trainers read the same files. One synthetic word is one token, so the length of every
sequence is exactly what is drawn here (prompt and completion apart), whatever the trainer's
tokenisation code: the chat template adds 5 special tokens to a conversation (4 to the prompt
with its generation prompt, 1 to the completion).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

TEMPLATE_PROMPT_TOKENS = 4
"""<|bos|> <|user|> ... <|end|> <|assistant|>: what the chat template adds to a prompt."""
TEMPLATE_COMPLETION_TOKENS = 1
"""The <|end|> after the assistant's content."""
EVAL_REFERENCE_WORDS = 32
ZIPF_EXPONENT = 1.1
"""Word frequencies fall off like natural text's, so some output rows are hot and most are cold."""


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class DataShape:
    vocab_size: int
    """Tokenizer size, special tokens included; the model's vocabulary."""
    sft_examples: int
    preference_pairs: int
    eval_prompts: int
    min_length: int
    max_length: int
    """Longest conversation in tokens, template tokens included; also the trainers' `max_length`, so nothing is cut."""
    seed: int = 0


@dataclass(frozen=True)
class DataFiles:
    tokenizer_dir: str
    sft: str
    """post-train's format: `messages`."""
    trl_sft: str
    """The same conversations as TRL's prompt-completion format."""
    preferences: str
    """One format for both: `prompt`, `chosen`, `rejected` as messages."""
    eval: str
    stats: dict[str, float]


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer over `w0 w1 ...` plus the demo world's special tokens and chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from post_train.world.model import (
        BOS_TOKEN,
        CHAT_TEMPLATE,
        EOS_TOKEN,
        PAD_TOKEN,
        ROLE_TOKENS,
        SPECIAL_TOKENS,
        UNK_TOKEN,
    )

    words = vocab_size - len(SPECIAL_TOKENS)
    if words < 1:
        raise ValueError(
            f"vocab_size {vocab_size} leaves no room for words beside {len(SPECIAL_TOKENS)} special tokens"
        )
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{index}": len(SPECIAL_TOKENS) + index for index in range(words)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=list(ROLE_TOKENS),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


class _Text:
    def __init__(self, words: int, rng: np.random.Generator):
        weights = 1.0 / np.arange(1, words + 1) ** ZIPF_EXPONENT
        self._probabilities = weights / weights.sum()
        self._rng = rng

    def __call__(self, count: int) -> str:
        ids = self._rng.choice(len(self._probabilities), size=count, p=self._probabilities)
        return " ".join(f"w{index}" for index in ids)


def _log_uniform(rng: np.random.Generator, low: int, high: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def _split(rng: np.random.Generator, total: int) -> tuple[int, int]:
    """Content words of a prompt and its completion for a conversation of `total` tokens: the prompt takes 10-60%."""
    content = total - TEMPLATE_PROMPT_TOKENS - TEMPLATE_COMPLETION_TOKENS
    prompt = min(content - 1, max(1, round(rng.uniform(0.1, 0.6) * content)))
    return prompt, content - prompt


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_data(directory: Path, shape: DataShape) -> DataFiles:
    """Tokenizer and data files under `directory`; conversation lengths are log-uniform in [min_length, max_length]."""
    from post_train.world.model import SPECIAL_TOKENS

    if shape.min_length < TEMPLATE_PROMPT_TOKENS + TEMPLATE_COMPLETION_TOKENS + 2:
        raise ValueError(f"min_length {shape.min_length} leaves no room for a prompt and a completion")
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(shape.seed)
    text = _Text(shape.vocab_size - len(SPECIAL_TOKENS), rng)
    tokenizer = build_tokenizer(shape.vocab_size)
    tokenizer.save_pretrained(directory / "tokenizer")

    sft, trl_sft, lengths, completion_lengths = [], [], [], []
    for _ in range(shape.sft_examples):
        total = _log_uniform(rng, shape.min_length, shape.max_length)
        prompt_words, completion_words = _split(rng, total)
        prompt, completion = _user(text(prompt_words)), _assistant(text(completion_words))
        sft.append({"messages": prompt + completion})
        trl_sft.append({"prompt": prompt, "completion": completion})
        lengths.append(total)
        completion_lengths.append(completion_words + TEMPLATE_COMPLETION_TOKENS)

    pairs, pair_lengths = [], []
    for _ in range(shape.preference_pairs):
        prompt_words, chosen_words = _split(rng, _log_uniform(rng, shape.min_length, shape.max_length))
        room = shape.max_length - prompt_words - TEMPLATE_PROMPT_TOKENS - TEMPLATE_COMPLETION_TOKENS
        rejected_words = max(1, min(room, _log_uniform(rng, shape.min_length, shape.max_length) - prompt_words))
        pairs.append(
            {
                "prompt": _user(text(prompt_words)),
                "chosen": _assistant(text(chosen_words)),
                "rejected": _assistant(text(rejected_words)),
            }
        )
        fixed = prompt_words + TEMPLATE_PROMPT_TOKENS + TEMPLATE_COMPLETION_TOKENS
        pair_lengths += [fixed + chosen_words, fixed + rejected_words]

    longest_prompt = max(2, shape.max_length // 4)
    evaluation = [
        {
            "prompt": _user(text(_log_uniform(rng, 8, longest_prompt))),
            "reference": text(EVAL_REFERENCE_WORDS),
            "split": "benchmark",
        }
        for _ in range(shape.eval_prompts)
    ]
    stats = {
        "sft_tokens": float(sum(lengths)),
        "sft_completion_tokens": float(sum(completion_lengths)),
        "sft_mean_length": float(np.mean(lengths)),
        "sft_min_length": float(min(lengths)),
        "sft_max_length": float(max(lengths)),
        "preference_sequence_tokens": float(sum(pair_lengths)),
        "preference_mean_length": float(np.mean(pair_lengths)) if pair_lengths else 0.0,
    }
    return DataFiles(
        tokenizer_dir=str(directory / "tokenizer"),
        sft=_write_jsonl(directory / "sft.jsonl", sft),
        trl_sft=_write_jsonl(directory / "trl_sft.jsonl", trl_sft),
        preferences=_write_jsonl(directory / "preferences.jsonl", pairs),
        eval=_write_jsonl(directory / "eval.jsonl", evaluation),
        stats=stats,
    )


def matmul_parameters(model) -> int:
    """Weights of the linear layers, the output layer included even when tied to the embedding: what costs FLOPs."""
    import torch

    return sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))


def write_model(
    directory: Path, shape: ModelShape, tokenizer_dir: str, max_length: int, seed: int = 0
) -> dict[str, Any]:
    """A random-init Llama (`post_train.world.model.tiny_llama_config`, tied embeddings) with the tokenizer, saved
    where both trainers load it from; returns its description, parameter counts included."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from post_train.world.model import tiny_llama_config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_llama_config(
        tokenizer,
        hidden_size=shape.hidden_size,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=max_length,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return {
        **asdict(shape),
        "path": str(directory),
        "vocab_size": config.vocab_size,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "matmul_parameters": matmul_parameters(model),
    }
