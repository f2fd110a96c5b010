"""SFT objectives as token-weight functions (docs/objectives.md, "SFT objectives").

Every objective has a gradient of the form ``-(1/N) Σ_t m_t w_t ∇ℓ_t`` with ``w_t ≥ 0``
computed under stop-gradient, so an objective is a function of detached per-token log-probs
returning ``(token_values, weights)``: the objective's value per token (its token mean over
the mask is the logged loss) and the weight ``w_t``. ``SFTObjective`` turns the pair into

    loss = value + (surrogate - sg(surrogate)),   surrogate = -(1/N) Σ m_t w_t ℓ_t

whose value is exactly the objective and whose gradient is exactly the weighted SFT
gradient, also where clamps or weight caps make the two disagree.

An objective that also anchors the whole next-token distribution (``needs_ref_distribution``,
e.g. ``asft``) reads ``K_t = KL(π_ref(·|s_t) ‖ π_θ(·|s_t))`` over the vocabulary, which is not a
function of ``ℓ_t``: its gradient is ``-(1/N) Σ_t m_t w_t ∇ℓ_t + (1/N) Σ_t m_t a_t ∇K_t`` with a
detached coefficient ``a_t ≥ 0`` that the function returns as a third tensor, and the surrogate
gains ``+(1/N) Σ m_t a_t K_t``. ``K_t`` comes differentiable from
``losses.fused_target_logprobs_and_reference_kl`` (with ``ℓ_t``, from the same pass over the output layer) or
``token_reference_kl``, computed chunk by chunk without ``[N, V]`` logits.

Adding an objective is one function below plus one entry in ``SFT_OBJECTIVES``.
"""

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from losses._hparams import resolve_hparams

TokenValuesAndWeights = tuple[Tensor, Tensor]
TokenValuesWeightsAndKLWeights = tuple[Tensor, Tensor, Tensor]

# Keeps 1+u (χ², Hellinger) and 2-e^{-u} (JS) at least this far from 0, where φ or its
# derivative blows up.
DOMAIN_MARGIN = 1e-3
# e^{-u} ≤ e^{30} ≈ 1e13: reverse-KL values stay finite in fp32 even summed over 1e20 tokens.
REVERSE_KL_MIN_U = -30.0
PSFT_MAX_ABS_LOG_RATIO = 20.0


def nll(logps: Tensor) -> TokenValuesAndWeights:
    """Negative log-likelihood: ``L = -(1/N) Σ m_t ℓ_t``, ``w_t = 1`` (standard SFT)."""
    return -logps, torch.ones_like(logps)


def dft(logps: Tensor) -> TokenValuesAndWeights:
    """Dynamic Fine-Tuning, arXiv 2508.05629 eq. 9: ``L = -(1/N) Σ m_t sg(e^{ℓ_t}) ℓ_t``.

    ``w_t = π_θ(y_t|s_t) = e^{ℓ_t} ∈ (0, 1]``, token level (the paper finds sequence-level
    weighting unstable).
    """
    weights = logps.exp()
    return -weights * logps, weights


def asft(logps: Tensor, ref_kl: Tensor, alpha: float) -> TokenValuesWeightsAndKLWeights:
    """Anchored SFT, arXiv 2509.23753: DFT plus a KL anchor to the reference over the whole vocabulary,

        L = (1/N) Σ_t m_t [ -sg(e^{ℓ_t}) ℓ_t + α K_t ],   K_t = KL(π_ref(·|s_t) ‖ π_θ(·|s_t)),

    ``w_t = e^{ℓ_t}`` (DFT's), ``a_t = α``. The direction is the reference's distribution against the
    policy's (the authors' code, github.com/zhuchichi56/ASFT ``train_v2.py`` mode ``asft``:
    ``F.kl_div(log_softmax(policy), softmax(reference))`` summed over the vocabulary, token mean).
    Default ``α = 0.1``: ``kl_weight`` in that code and ``asft_alpha`` in LLaMA-Factory's port (the
    README's example command uses 0.05). With ``α = 0`` this is exactly ``dft``.
    """
    values, weights = dft(logps)
    return values + alpha * ref_kl, weights, torch.full_like(ref_kl, alpha)


def psft(logps: Tensor, old_logps: Tensor, eps_low: float, eps_high: float) -> TokenValuesAndWeights:
    """Proximal SFT, arXiv 2508.17784: PPO's clipped objective with advantage 1.

    ``L = -(1/N) Σ m_t min(ρ_t, clip(ρ_t, 1-ε_lo, 1+ε_hi))``, ``ρ_t = e^{ℓ_t - ℓ_t^old}``;
    ``w_t = ρ_t`` if ``ρ_t ≤ 1+ε_hi`` else 0. As in the paper's verl recipe the log-ratio is
    clamped to ``[-20, 20]`` before ``exp``. With ``π_old = π_θ`` this is exactly ``nll``.
    """
    ratio = (logps - old_logps).clamp(-PSFT_MAX_ABS_LOG_RATIO, PSFT_MAX_ABS_LOG_RATIO).exp()
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    weights = torch.where(ratio <= 1.0 + eps_high, ratio, torch.zeros_like(ratio))
    return -torch.minimum(ratio, clipped), weights


# f-divergence generators: u ↦ (φ(u)/φ'(0), φ'(u)/φ'(0)) with u clamped into φ's domain.
# φ = (f*)^{-1}; the table and derivation are in objectives.md, "f-divergence SFT".
Generator = Callable[[Tensor], TokenValuesAndWeights]


def total_variation(u: Tensor) -> TokenValuesAndWeights:
    """``φ(u) = u``: the weight is constantly 1, i.e. plain SFT (``nll`` up to a constant)."""
    return u, torch.ones_like(u)


def pearson_chi2(u: Tensor) -> TokenValuesAndWeights:
    """``φ(u) = 2(√(1+u) - 1)``, ``w = (1+u)^{-1/2}``, domain ``u > -1``."""
    one_plus_u = (1.0 + u).clamp_min(DOMAIN_MARGIN)
    return 2.0 * (one_plus_u.sqrt() - 1.0), one_plus_u.rsqrt()


def squared_hellinger(u: Tensor) -> TokenValuesAndWeights:
    """``φ(u) = u/(1+u)``, ``w = (1+u)^{-2}``, domain ``u > -1``."""
    one_plus_u = (1.0 + u).clamp_min(DOMAIN_MARGIN)
    return 1.0 - one_plus_u.reciprocal(), one_plus_u.pow(-2)


def reverse_kl(u: Tensor) -> TokenValuesAndWeights:
    """``φ(u) = -e^{-1-u}``, ``φ'(0) = e^{-1}``, so ``φ/φ'(0) = -e^{-u}`` and ``w = e^{-u}``.

    The domain is all of R; ``u`` is clamped at -30 so that ``e^{-u}`` stays finite.
    """
    exp_neg_u = torch.exp(-u.clamp_min(REVERSE_KL_MIN_U))
    return -exp_neg_u, exp_neg_u


def jensen_shannon(u: Tensor) -> TokenValuesAndWeights:
    """``φ(u) = log(2 - e^{-u})``, ``w = e^{-u}/(2 - e^{-u})``, domain ``u > -log 2``."""
    exp_neg_u = torch.exp(-u.clamp_min(-math.log(2.0 - DOMAIN_MARGIN)))
    two_minus = 2.0 - exp_neg_u
    return two_minus.log(), exp_neg_u / two_minus


def f_divergence(
    logps: Tensor, ref_logps: Tensor, generator: Generator, beta: float, max_weight: float
) -> TokenValuesAndWeights:
    """f-divergence SFT, derived in objectives.md from arXiv 2507.00018's framework.

    ``L = -(1/(β φ'(0))) (1/N) Σ m_t φ(u_t)``, ``u_t = β(ℓ_t - ℓ_t^ref)``,
    ``w_t = min(φ'(u_t)/φ'(0), max_weight)``. At ``π_θ = π_ref`` every ``w_t = 1`` (the SFT
    gradient); ``β → 0`` recovers ``nll``. ``u`` is clamped into φ's domain (see the
    generators) and the weight is capped at ``max_weight`` (default 10) because near the
    domain boundary it grows without bound (χ²: ``(1+u)^{-1/2}``, Hellinger:
    ``(1+u)^{-2}``, reverse KL: ``e^{-u}``), and one such token would dominate the step.
    """
    normalised_phi, weights = generator(beta * (logps - ref_logps))
    return -normalised_phi / beta, weights.clamp_max(max_weight)


@dataclass(frozen=True)
class SFTSpec:
    """Registry entry: the objective function, its hyperparameters' defaults, its inputs."""

    fn: Callable[..., TokenValuesAndWeights | TokenValuesWeightsAndKLWeights]
    defaults: Mapping[str, float] = field(default_factory=dict)
    needs_ref: bool = False
    needs_old: bool = False
    value_is_nll: bool = False
    """The value is a token NLL, whose jumps mean divergence. The others' values (a probability-weighted NLL, a
    clipped ratio, an f-divergence term that is near 0 at the reference and large where the policy falls below it)
    move by large factors in healthy training, so a trainer should not read a jump in them as divergence."""
    needs_ref_distribution: bool = False
    """The objective reads the reference model's whole next-token distribution at the counted positions, through
    ``K_t = KL(π_ref ‖ π_θ)``: ``fn`` gets it detached as ``ref_kl`` and returns ``(values, weights, kl_weights)``,
    ``kl_weights`` being the detached ``a_t`` of ``∇K_t`` (module docstring). The trainer runs the reference on
    each batch (no cache: it is a distribution per position, not one number)."""


_FDIV_DEFAULTS = {"beta": 1.0, "max_weight": 10.0}


def _fdiv_spec(generator: Generator) -> SFTSpec:
    return SFTSpec(partial(f_divergence, generator=generator), _FDIV_DEFAULTS, needs_ref=True)


SFT_OBJECTIVES: dict[str, SFTSpec] = {
    "nll": SFTSpec(nll, value_is_nll=True),
    "dft": SFTSpec(dft),
    "asft": SFTSpec(asft, {"alpha": 0.1}, needs_ref_distribution=True),
    "psft": SFTSpec(psft, {"eps_low": 0.2, "eps_high": 0.28}, needs_old=True),
    "fdiv:tv": _fdiv_spec(total_variation),
    "fdiv:pearson_chi2": _fdiv_spec(pearson_chi2),
    "fdiv:squared_hellinger": _fdiv_spec(squared_hellinger),
    "fdiv:reverse_kl": _fdiv_spec(reverse_kl),
    "fdiv:js": _fdiv_spec(jensen_shannon),
}


@dataclass(frozen=True)
class SFTOutput:
    loss: Tensor
    """Scalar: the objective's value; its gradient is ``-(1/N) Σ m_t w_t ∇ℓ_t``."""
    weights: Tensor
    """``[B, T]`` detached token weights ``w_t`` (the implicit reward), 0 off the mask."""


@dataclass(frozen=True)
class SFTObjective:
    """A configured SFT objective; build it with ``sft_objective(name, **hparams)``."""

    name: str
    hparams: Mapping[str, float]
    needs_ref: bool
    needs_old: bool
    fn: Callable[..., TokenValuesAndWeights | TokenValuesWeightsAndKLWeights] = field(repr=False)
    value_is_nll: bool = False
    needs_ref_distribution: bool = False

    def __call__(
        self,
        logps: Tensor,
        mask: Tensor,
        ref_logps: Tensor | None = None,
        old_logps: Tensor | None = None,
        *,
        ref_kl: Tensor | None = None,
        num_tokens: int | Tensor | None = None,
    ) -> SFTOutput:
        """Apply the objective to ``[B, T]`` target log-probs on the ``[B, T]`` bool ``mask``.

        ``ref_kl`` (objectives with ``needs_ref_distribution``) is ``[B, T]`` ``KL(π_ref ‖ π_θ)`` per
        position, differentiable w.r.t. the policy (``losses.fused_target_logprobs_and_reference_kl``); its
        gradient enters the loss's. ``num_tokens`` is ``N`` in the token mean, ``mask.sum()`` by default. With gradient
        accumulation pass the token count of the whole accumulated batch, so that the
        micro-batch losses sum to the batch's loss. An empty mask gives loss 0.
        Off-mask positions may hold anything (even ``-inf``): they are never read.
        """
        extra_inputs: dict[str, Tensor] = {}
        if self.needs_ref:
            extra_inputs["ref_logps"] = self._require(
                ref_logps, "ref_logps", "the reference model's per-token log-probs of the targets"
            )
        if self.needs_old:
            extra_inputs["old_logps"] = self._require(
                old_logps, "old_logps", "the old policy's per-token log-probs of the targets"
            )
        if self.needs_ref_distribution:
            extra_inputs["ref_kl"] = self._require(
                ref_kl, "ref_kl", "KL(reference || policy) over the vocabulary at each position"
            )

        dtype = torch.promote_types(logps.dtype, torch.float32)
        mask = mask.bool()
        zero = torch.zeros((), dtype=dtype, device=logps.device)
        logps = torch.where(mask, logps.to(dtype), zero)
        with torch.no_grad():
            inputs = {key: torch.where(mask, value.to(dtype), zero) for key, value in extra_inputs.items()}
            terms = self.fn(logps.detach(), **inputs, **self.hparams)
            token_values, weights = terms[0], torch.where(mask, terms[1], zero)
            kl_weights = torch.where(mask, terms[2], zero) if self.needs_ref_distribution else None
            count = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, device=logps.device)
            count = count.to(dtype).clamp_min(1.0)
            value = torch.where(mask, token_values, zero).sum() / count
        surrogate = -(weights * logps).sum() / count
        if kl_weights is not None:
            ref_kl = torch.where(mask, extra_inputs["ref_kl"].to(dtype), zero)  # differentiable, unlike inputs'
            surrogate = surrogate + (kl_weights * ref_kl).sum() / count
        return SFTOutput(loss=value + (surrogate - surrogate.detach()), weights=weights)

    def _require(self, tensor: Tensor | None, argument: str, description: str) -> Tensor:
        if tensor is None:
            raise ValueError(f"SFT objective {self.name!r} needs {argument} ({description}); it was not given")
        return tensor


def sft_objective(name: str, **hparams: float) -> SFTObjective:
    """The SFT objective registered as ``name`` (see ``SFT_OBJECTIVES``) with ``hparams``.

    Unknown names or hyperparameters raise ``ValueError`` listing the valid ones.
    """
    if name not in SFT_OBJECTIVES:
        raise ValueError(f"Unknown SFT objective {name!r}; valid: {', '.join(SFT_OBJECTIVES)}")
    spec = SFT_OBJECTIVES[name]
    return SFTObjective(
        name=name,
        hparams=resolve_hparams(f"SFT objective {name!r}", spec.defaults, hparams),
        needs_ref=spec.needs_ref,
        needs_old=spec.needs_old,
        fn=spec.fn,
        value_is_nll=spec.value_is_nll,
        needs_ref_distribution=spec.needs_ref_distribution,
    )
