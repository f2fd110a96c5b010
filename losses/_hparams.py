"""Hyperparameter validation shared by the SFT and preference registries."""

import math
from collections.abc import Callable, Mapping

# Ranges of hyperparameters whose meaning is shared across objectives. A name not listed
# here only has to be a finite number.
_VALID_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "beta": (lambda v: v > 0, "> 0"),
    # The weight of an added likelihood term (rpo); negative would push the chosen response down.
    "alpha": (lambda v: v >= 0, ">= 0"),
    "max_weight": (lambda v: v > 0, "> 0"),
    "eps_low": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "eps_high": (lambda v: v >= 0, ">= 0"),
    # At 0.5 the smoothed losses no longer prefer the chosen response (robust divides by 1-2ε).
    "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
}


def resolve_hparams(owner: str, defaults: Mapping[str, float], given: Mapping[str, float]) -> dict[str, float]:
    """``defaults`` updated with ``given``; raises ``ValueError`` on unknown names or bad values."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) or "none"
        raise ValueError(f"Unknown hyperparameter(s) {', '.join(unknown)} for {owner}; valid: {valid}")
    resolved = {**defaults}
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"Hyperparameter {name} of {owner} must be a finite number, got {value!r}")
        is_valid, description = _VALID_RANGES.get(name, (lambda v: True, ""))
        if not is_valid(value):
            raise ValueError(f"Hyperparameter {name} of {owner} must be {description}, got {value!r}")
        resolved[name] = float(value)
    return resolved
