"""What every judge is: a class with its settings model, its fingerprint, its checks and its extra metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from post_train.data import EvalExample

Messages = list[dict[str, str]]


class JudgeSettings(BaseModel):
    """A judge's own section of the recipe, `evaluation.<judge name>`."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Verdict:
    preference: float
    """P(the candidate's output is better than the baseline's), in [0, 1]; 0.5 is a draw."""
    candidate_score: float | None = None
    baseline_score: float | None = None
    source: str = ""
    """How it was decided: identical, gold, reward_model, logprobs, answer, unparsed."""
    candidate_shown_first: bool | None = None
    """llm: whether the candidate's output was shown to the judge first."""


class Judge:
    """Decides, per prompt, how likely a candidate's output is to beat a baseline's.

    The candidate is the evaluated model and the baseline the dataset's reference (evaluate), or
    the challenger and the champion (head-to-head). A subclass sets `name` (its registry key and
    the recipe section of its settings) and `settings_model`, and implements `judge`.
    """

    name: ClassVar[str]
    settings_model: ClassVar[type[JudgeSettings]]

    def __init__(self, settings: JudgeSettings, cache_dir: str | Path):
        """Ready to judge: one that cannot start (a missing model, key or endpoint setting) raises ConfigError here."""
        self.settings = settings

    @classmethod
    def fingerprint(cls, settings: JudgeSettings) -> dict[str, Any]:
        """What the verdicts depend on besides the outputs, for cache keys; computed without starting the judge."""
        return {"judge": cls.name, cls.name: settings.model_dump(mode="json")}

    @classmethod
    def check(cls, settings: JudgeSettings, examples: Sequence[EvalExample]) -> None:
        """Raise ConfigError when this judge cannot judge these evaluation prompts; called without starting the judge
        (`post-train validate`) and before any generation."""

    def judge(self, prompts: Sequence[Messages], candidates: Sequence[str], baselines: Sequence[str]) -> list[Verdict]:
        """One verdict per prompt: `candidates[i]` against `baselines[i]`."""
        raise NotImplementedError

    def extra_metrics(self, examples: Sequence[EvalExample], verdicts: Sequence[Verdict]) -> dict[str, float]:
        """Metrics of this judge's own beyond the win rates, logged by the evaluate stage."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What identifies the judge, for MLflow params and model cards (never a secret)."""
        return {"judge": self.name}

    def close(self) -> None:
        pass
