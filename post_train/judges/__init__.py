"""Judges: who decides whether a candidate's output beats a baseline's (the reference, or a champion's).

`evaluation.judge` names one entry of `JUDGES`; its settings are the recipe section of the same
name (`evaluation.llm`, `evaluation.reward_model`), validated by the judge's `settings_model`.
Every judge calls byte-identical outputs a draw without asking.

Entries are import paths, imported when asked for: the configuration imports this registry,
and every stage's code (its cache key) reaches the configuration, but no stage but evaluation
and head-to-head should depend on a judge's code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from post_train.plugins import imported

JUDGES: dict[str, str] = {
    "gold": "post_train.judges.gold:GoldJudge",
    "reward_model": "post_train.judges.reward_model:RewardModelJudge",
    "llm": "post_train.judges.llm:LLMJudge",
}


def judge_class(name: str) -> Any:
    """The `Judge` subclass registered as `name`."""
    return imported(JUDGES[name])


def make_judge(evaluation: Any, cache_dir: str | Path) -> Any:
    """The judge `evaluation.judge` (an `EvaluationConfig`) names, started with its settings.

    Raises ConfigError when it cannot start.
    """
    return judge_class(evaluation.judge)(evaluation.judge_settings(), cache_dir)


def judge_fingerprint(evaluation: Any) -> dict[str, Any]:
    """What the chosen judge's verdicts depend on besides the outputs (its settings, a reward model's weights)."""
    return judge_class(evaluation.judge).fingerprint(evaluation.judge_settings())
