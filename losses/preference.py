"""Preference losses of the DPO family (docs/objectives.md, "Preference losses").

Every loss here is a function of one number per pair,

    Δ = s_w - s_l,   s = L - L^ref (or L without a reference), divided by |y| if length-normalised,

where ``L`` is the summed log-prob of a response. The DPO logit is ``h = βΔ``. A loss is one
function of ``Δ`` and its hyperparameters plus one entry in ``PREFERENCE_LOSSES``, which says
whether it uses the reference and the length normalisation.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from losses._hparams import resolve_hparams


def sigmoid(delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """DPO, arXiv 2305.18290: ``-log σ(h)``; with label smoothing ε (cDPO)
    ``-(1-ε) log σ(h) - ε log σ(-h)``."""
    h = beta * delta
    return -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def robust(delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Robust DPO, arXiv 2403.00409: ``[-(1-ε) log σ(h) + ε log σ(-h)] / (1-2ε)``."""
    h = beta * delta
    return (-(1.0 - label_smoothing) * F.logsigmoid(h) + label_smoothing * F.logsigmoid(-h)) / (
        1.0 - 2.0 * label_smoothing
    )


def hinge(delta: Tensor, beta: float) -> Tensor:
    """SLiC hinge, arXiv 2305.10425: ``max(0, 1 - h)``."""
    return torch.relu(1.0 - beta * delta)


def ipo(delta: Tensor, beta: float) -> Tensor:
    """IPO, arXiv 2310.12036: ``(h/β - 1/(2β))² = (Δ - 1/(2β))²`` on per-token average
    log-probs."""
    return (delta - 1.0 / (2.0 * beta)) ** 2


def simpo(delta: Tensor, beta: float, gamma: float) -> Tensor:
    """SimPO, arXiv 2405.14734: ``-log σ(β(L_w/|y_w| - L_l/|y_l|) - γ)``, no reference.

    ``γ`` is the margin itself; the SimPO repo's ``gamma_beta_ratio`` is ``γ/β``.
    """
    return -F.logsigmoid(beta * delta - gamma)


@dataclass(frozen=True)
class PreferenceSpec:
    """Registry entry: the loss of ``Δ``, its hyperparameters' defaults, how ``Δ`` is built."""

    fn: Callable[..., Tensor]
    defaults: Mapping[str, float] = field(default_factory=dict)
    needs_ref: bool = True
    length_normalised: bool = False


PREFERENCE_LOSSES: dict[str, PreferenceSpec] = {
    "sigmoid": PreferenceSpec(sigmoid, {"beta": 0.1, "label_smoothing": 0.0}),
    "robust": PreferenceSpec(robust, {"beta": 0.1, "label_smoothing": 0.0}),
    "hinge": PreferenceSpec(hinge, {"beta": 0.1}),
    "ipo": PreferenceSpec(ipo, {"beta": 0.1}, length_normalised=True),
    "simpo": PreferenceSpec(simpo, {"beta": 2.0, "gamma": 0.5}, needs_ref=False, length_normalised=True),
}


@dataclass(frozen=True)
class PreferenceOutput:
    losses: Tensor
    """``[B]`` per-pair losses (the trainer takes the mean)."""
    reward_chosen: Tensor
    """``[B]`` detached implicit rewards ``β s_w`` (``β(L_w - L_w^ref)`` for DPO)."""
    reward_rejected: Tensor
    """``[B]`` detached implicit rewards ``β s_l``."""


@dataclass(frozen=True)
class PreferenceLoss:
    """A configured preference loss; build it with ``preference_loss(name, **hparams)``."""

    name: str
    hparams: Mapping[str, float]
    needs_ref: bool
    length_normalised: bool
    fn: Callable[..., Tensor] = field(repr=False)

    def __call__(
        self,
        policy_chosen: Tensor,
        policy_rejected: Tensor,
        ref_chosen: Tensor | None = None,
        ref_rejected: Tensor | None = None,
        chosen_lengths: Tensor | None = None,
        rejected_lengths: Tensor | None = None,
    ) -> PreferenceOutput:
        """Losses for ``[B]`` summed response log-probs; lengths are response token counts.

        Reference log-probs are ignored by losses without a reference (``needs_ref`` False).
        """
        dtype = torch.promote_types(policy_chosen.dtype, torch.float32)
        chosen, rejected = policy_chosen.to(dtype), policy_rejected.to(dtype)
        if self.needs_ref:
            if ref_chosen is None or ref_rejected is None:
                raise ValueError(
                    f"Preference loss {self.name!r} needs ref_chosen and ref_rejected "
                    f"(the reference model's summed log-probs); they were not given"
                )
            chosen = chosen - ref_chosen.to(dtype)
            rejected = rejected - ref_rejected.to(dtype)
        # Rewards are β times the summed log-ratios (objectives.md; TRL logs the same, also for
        # ipo); without a reference (simpo) they are β times the per-token average, as in SimPO.
        reward_chosen, reward_rejected = chosen, rejected
        if self.length_normalised:
            if chosen_lengths is None or rejected_lengths is None:
                raise ValueError(
                    f"Preference loss {self.name!r} uses per-token average log-probs and needs "
                    f"chosen_lengths and rejected_lengths (response lengths in tokens)"
                )
            # A zero length means an empty response whose summed log-prob is 0 anyway.
            chosen = chosen / chosen_lengths.to(dtype).clamp_min(1.0)
            rejected = rejected / rejected_lengths.to(dtype).clamp_min(1.0)
        if not self.needs_ref:
            reward_chosen, reward_rejected = chosen, rejected
        beta = self.hparams["beta"]
        return PreferenceOutput(
            losses=self.fn(chosen - rejected, **self.hparams),
            reward_chosen=(beta * reward_chosen).detach(),
            reward_rejected=(beta * reward_rejected).detach(),
        )


def preference_loss(name: str, **hparams: float) -> PreferenceLoss:
    """The preference loss registered as ``name`` (see ``PREFERENCE_LOSSES``) with ``hparams``.

    Unknown names or hyperparameters raise ``ValueError`` listing the valid ones.
    """
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"Unknown preference loss {name!r}; valid: {', '.join(PREFERENCE_LOSSES)}")
    spec = PREFERENCE_LOSSES[name]
    return PreferenceLoss(
        name=name,
        hparams=resolve_hparams(f"preference loss {name!r}", spec.defaults, hparams),
        needs_ref=spec.needs_ref,
        length_normalised=spec.length_normalised,
        fn=spec.fn,
    )


def preference_metrics(out: PreferenceOutput) -> dict[str, float]:
    """Batch means under TRL's metric names, so DPO users recognise the curves."""
    chosen, rejected = out.reward_chosen.detach().float(), out.reward_rejected.detach().float()
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
    }
