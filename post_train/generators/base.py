"""What every generator is: sampling settings shared by all, and the three calls a stage makes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from post_train.data import Prompt


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    temperature: float
    """0 means greedy decoding."""
    top_p: float
    batch_size: int
    seed: int


class Generator:
    """Writes one response per prompt with a model's weights (prompts in the TRL formats: conversations through the
    tokenizer's chat template, text as it is), the same text for the same settings and seed."""

    def check(self) -> None:
        """Raise `ConfigError` when it cannot run here; called before any work."""

    def model(self, model_path: str) -> Any | None:
        """The model loaded in this process that `generate` would use, for the caller to reuse (the evaluate stage's
        diagnostics run on it); None for a generator that holds its weights elsewhere, which the caller then loads
        itself after generating."""
        return None

    def generate(
        self, model_path: str, tokenizer, prompts: list[Prompt], settings: GenerationSettings, model: Any | None = None
    ) -> list[str]:
        """The stripped responses to `prompts` of the model at `model_path` (`model`: what `self.model` gave)."""
        raise NotImplementedError
