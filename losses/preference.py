"""Preference losses of the DPO family (docs/objectives.md, "Preference losses").

A loss sees one batch of pairs as a ``PairLogps`` record: the policy's summed response
log-probs ``L_w``, ``L_l``, the reference's ``L^ref`` (only for losses that use one) and the
response lengths ``|y|``. Most losses are functions of the log-ratios ``r = L - L^ref``, the DPO
logit being ``h = β(r_w - r_l)``; others treat the two sides apart or add a likelihood term. A
loss is one function of the record and its hyperparameters plus one entry in
``PREFERENCE_LOSSES``, which says whether it uses the reference and the lengths.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from losses._hparams import resolve_hparams


@dataclass(frozen=True)
class PairLogps:
    """A batch of ``B`` preference pairs as the losses see it; every tensor is ``[B]``."""

    chosen: Tensor
    """Summed log-probs of the chosen responses under the policy, ``L_w``."""
    rejected: Tensor
    """Summed log-probs of the rejected responses under the policy, ``L_l``."""
    ref_chosen: Tensor | None = None
    """``L_w^ref`` under the reference model; None for losses without a reference."""
    ref_rejected: Tensor | None = None
    """``L_l^ref``; None for losses without a reference."""
    chosen_lengths: Tensor | None = None
    """``|y_w|``, the chosen responses' token counts; needed only by losses that use lengths."""
    rejected_lengths: Tensor | None = None
    """``|y_l|``, the rejected responses' token counts."""

    def logratios(self) -> tuple[Tensor, Tensor]:
        """``(r_w, r_l) = (L_w - L_w^ref, L_l - L_l^ref)``, the summed log-ratios."""
        return self.chosen - self.ref_chosen, self.rejected - self.ref_rejected

    def per_token(self, chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
        """``(chosen/|y_w|, rejected/|y_l|)``: per-token averages of per-response sums."""
        # A zero length means an empty response whose summed log-prob is 0 anyway.
        return chosen / self.chosen_lengths.clamp_min(1.0), rejected / self.rejected_lengths.clamp_min(1.0)


def sigmoid(pair: PairLogps, beta: float, label_smoothing: float) -> Tensor:
    """DPO, arXiv 2305.18290: ``-log σ(h)``; with label smoothing ε (cDPO)
    ``-(1-ε) log σ(h) - ε log σ(-h)``."""
    r_w, r_l = pair.logratios()
    h = beta * (r_w - r_l)
    return -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def robust(pair: PairLogps, beta: float, label_smoothing: float) -> Tensor:
    """Robust DPO, arXiv 2403.00409: ``[-(1-ε) log σ(h) + ε log σ(-h)] / (1-2ε)``."""
    r_w, r_l = pair.logratios()
    h = beta * (r_w - r_l)
    return (-(1.0 - label_smoothing) * F.logsigmoid(h) + label_smoothing * F.logsigmoid(-h)) / (
        1.0 - 2.0 * label_smoothing
    )


def hinge(pair: PairLogps, beta: float) -> Tensor:
    """SLiC hinge, arXiv 2305.10425: ``max(0, 1 - h)``."""
    r_w, r_l = pair.logratios()
    return torch.relu(1.0 - beta * (r_w - r_l))


def ipo(pair: PairLogps, beta: float) -> Tensor:
    """IPO, arXiv 2310.12036: ``(r_w/|y_w| - r_l/|y_l| - 1/(2β))²``, i.e. ``(h/β - 1/(2β))²`` on
    per-token average log-probs."""
    average_chosen, average_rejected = pair.per_token(*pair.logratios())
    return (average_chosen - average_rejected - 1.0 / (2.0 * beta)) ** 2


def simpo(pair: PairLogps, beta: float, gamma: float) -> Tensor:
    """SimPO, arXiv 2405.14734: ``-log σ(β(L_w/|y_w| - L_l/|y_l|) - γ)``, no reference.

    ``γ`` is the margin itself; the SimPO repo's ``gamma_beta_ratio`` is ``γ/β``.
    """
    average_chosen, average_rejected = pair.per_token(pair.chosen, pair.rejected)
    return -F.logsigmoid(beta * (average_chosen - average_rejected) - gamma)


def rpo(pair: PairLogps, beta: float, alpha: float) -> Tensor:
    """RPO, arXiv 2404.19733: DPO plus α times the NLL of the chosen responses,
    ``-log σ(h) - α B L_w / Σ_B |y_w|``.

    The NLL term is TRL's (``loss_type=["sigmoid", "sft"]``, weights ``[1, α]``): the mean of
    ``-ℓ_t`` over all chosen tokens of the batch, ``-Σ_B L_w / Σ_B |y_w|``, shared out so that
    the pairs' mean is that value. The paper divides each pair by its own length instead; the
    two agree when the chosen responses are equally long. The batch is the one the loss is
    given: under gradient accumulation each micro-batch has its own token mean, as in TRL.
    """
    r_w, r_l = pair.logratios()
    nll = -pair.chosen * (pair.chosen.shape[0] / pair.chosen_lengths.sum().clamp_min(1.0))
    return -F.logsigmoid(beta * (r_w - r_l)) + alpha * nll


def nca(pair: PairLogps, beta: float) -> Tensor:
    """NCA on pairs, arXiv 2402.05369: ``-log σ(βr_w) - ½ log σ(-βr_w) - ½ log σ(-βr_l)``.

    Each response is scored on its own against the reference, so unlike DPO the chosen
    likelihood cannot fall just because the rejected one falls faster.
    """
    r_w, r_l = pair.logratios()
    return -F.logsigmoid(beta * r_w) - 0.5 * F.logsigmoid(-beta * r_w) - 0.5 * F.logsigmoid(-beta * r_l)


def apo_zero(pair: PairLogps, beta: float) -> Tensor:
    """APO-zero, arXiv 2408.06266 eq. 7: ``1 - σ(βr_w) + σ(βr_l)``; raises the chosen and lowers
    the rejected likelihood, for chosen responses better than the model's own. The constant 1
    (TRL's) keeps the loss non-negative."""
    r_w, r_l = pair.logratios()
    return 1.0 - torch.sigmoid(beta * r_w) + torch.sigmoid(beta * r_l)


def apo_down(pair: PairLogps, beta: float) -> Tensor:
    """APO-down, arXiv 2408.06266 eq. 8: ``σ(βr_w) + 1 - σ(β(r_w - r_l))``; lowers both
    likelihoods, the rejected one more, for chosen responses worse than the model's own."""
    r_w, r_l = pair.logratios()
    return torch.sigmoid(beta * r_w) + 1.0 - torch.sigmoid(beta * (r_w - r_l))


def sppo_hard(pair: PairLogps, beta: float) -> Tensor:
    """SPPO with hard win probabilities, arXiv 2405.00675 eq. 4.7 with ``P(y_w ≻ y_l) = 1``:
    ``(r_w - 1/(2β))² + (r_l + 1/(2β))²``."""
    r_w, r_l = pair.logratios()
    return (r_w - 0.5 / beta) ** 2 + (r_l + 0.5 / beta) ** 2


@dataclass(frozen=True)
class PreferenceSpec:
    """Registry entry: the loss of a ``PairLogps``, its hyperparameters' defaults, what it reads."""

    fn: Callable[..., Tensor]
    defaults: Mapping[str, float] = field(default_factory=dict)
    needs_ref: bool = True
    needs_lengths: bool = False

    def __post_init__(self) -> None:
        if not (self.needs_ref or self.needs_lengths):
            raise ValueError("A preference loss without a reference logs per-token average rewards: it needs lengths")


PREFERENCE_LOSSES: dict[str, PreferenceSpec] = {
    "sigmoid": PreferenceSpec(sigmoid, {"beta": 0.1, "label_smoothing": 0.0}),
    "robust": PreferenceSpec(robust, {"beta": 0.1, "label_smoothing": 0.0}),
    "hinge": PreferenceSpec(hinge, {"beta": 0.1}),
    "ipo": PreferenceSpec(ipo, {"beta": 0.1}, needs_lengths=True),
    "simpo": PreferenceSpec(simpo, {"beta": 2.0, "gamma": 0.5}, needs_ref=False, needs_lengths=True),
    "rpo": PreferenceSpec(rpo, {"beta": 0.1, "alpha": 1.0}, needs_lengths=True),
    "nca": PreferenceSpec(nca, {"beta": 0.1}),
    "apo_zero": PreferenceSpec(apo_zero, {"beta": 0.1}),
    "apo_down": PreferenceSpec(apo_down, {"beta": 0.1}),
    "sppo_hard": PreferenceSpec(sppo_hard, {"beta": 0.1}),
}


@dataclass(frozen=True)
class PreferenceOutput:
    losses: Tensor
    """``[B]`` per-pair losses (the trainer takes the mean)."""
    reward_chosen: Tensor
    """``[B]`` detached implicit rewards ``β r_w = β(L_w - L_w^ref)``; ``β L_w/|y_w|`` without a reference."""
    reward_rejected: Tensor
    """``[B]`` detached implicit rewards of the rejected responses, likewise."""


@dataclass(frozen=True)
class PreferenceLoss:
    """A configured preference loss; build it with ``preference_loss(name, **hparams)``."""

    name: str
    hparams: Mapping[str, float]
    needs_ref: bool
    needs_lengths: bool
    fn: Callable[..., Tensor] = field(repr=False)

    def __call__(self, pair: PairLogps) -> PreferenceOutput:
        """Per-pair losses and implicit rewards of a batch of pairs, in at least fp32.

        The loss sees the reference log-probs only if it uses a reference (``needs_ref``) and the
        lengths only if it uses them (``needs_lengths``), so it cannot depend on anything else.
        """
        if self.needs_ref and (pair.ref_chosen is None or pair.ref_rejected is None):
            raise ValueError(
                f"Preference loss {self.name!r} needs ref_chosen and ref_rejected "
                f"(the reference model's summed log-probs); they were not given"
            )
        if self.needs_lengths and (pair.chosen_lengths is None or pair.rejected_lengths is None):
            raise ValueError(
                f"Preference loss {self.name!r} needs chosen_lengths and rejected_lengths "
                f"(response lengths in tokens); they were not given"
            )
        seen = {"chosen": pair.chosen, "rejected": pair.rejected}
        if self.needs_ref:
            seen |= {"ref_chosen": pair.ref_chosen, "ref_rejected": pair.ref_rejected}
        if self.needs_lengths:
            seen |= {"chosen_lengths": pair.chosen_lengths, "rejected_lengths": pair.rejected_lengths}
        dtype = torch.promote_types(pair.chosen.dtype, torch.float32)
        pair = PairLogps(**{name: value.to(dtype) for name, value in seen.items()})
        # Rewards are β times the summed log-ratios (objectives.md; TRL logs the same, also for
        # ipo and rpo); without a reference (simpo) β times the per-token average, as in SimPO.
        scores = pair.logratios() if self.needs_ref else pair.per_token(pair.chosen, pair.rejected)
        beta = self.hparams["beta"]
        return PreferenceOutput(
            losses=self.fn(pair, **self.hparams),
            reward_chosen=(beta * scores[0]).detach(),
            reward_rejected=(beta * scores[1]).detach(),
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
        needs_lengths=spec.needs_lengths,
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
