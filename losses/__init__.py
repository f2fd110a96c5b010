"""Pure tensor functions for post-training objectives (the math: docs/objectives.md).

- ``sft_objective(name, **hparams)``: SFT objectives as token-weight functions.
- ``preference_loss(name, **hparams)``: DPO-family losses of a batch of pairs (``PairLogps``).
- ``token_logprobs`` / ``token_entropy_and_kl``: chunked fp32 log-prob helpers.
- ``fused_target_logprobs_and_reference_kl`` / ``token_reference_kl``: ``KL(π_ref ‖ π_θ)`` per position, chunked,
  with its gradient (the fused one with the target log-probs, from the same pass).
"""

from losses.logprobs import (
    fused_target_logprobs,
    fused_target_logprobs_and_reference_kl,
    token_entropy_and_kl,
    token_logprobs,
    token_reference_kl,
)
from losses.preference import (
    PREFERENCE_LOSSES,
    PairLogps,
    PreferenceLoss,
    PreferenceOutput,
    preference_loss,
    preference_metrics,
)
from losses.sft import SFT_OBJECTIVES, SFTObjective, SFTOutput, sft_objective

__all__ = [
    "PREFERENCE_LOSSES",
    "SFT_OBJECTIVES",
    "PairLogps",
    "PreferenceLoss",
    "PreferenceOutput",
    "SFTObjective",
    "SFTOutput",
    "preference_loss",
    "preference_metrics",
    "fused_target_logprobs",
    "fused_target_logprobs_and_reference_kl",
    "sft_objective",
    "token_entropy_and_kl",
    "token_logprobs",
    "token_reference_kl",
]
