"""Tests of `losses/` against the formulas in docs/objectives.md.

References are written out independently here, in float64, from the doc's tables: objective
values from the "objective L" column, gradients by autograd through that explicit objective,
weights from the "weight w_t" column.
"""

import collections
import dataclasses
import itertools
import math
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from losses import (
    PREFERENCE_LOSSES,
    SFT_OBJECTIVES,
    PairLogps,
    fused_target_logprobs_and_reference_kl,
    preference_loss,
    preference_metrics,
    sft_objective,
    token_entropy_and_kl,
    token_logprobs,
    token_reference_kl,
)
from losses.preference import PreferenceSpec
from losses.sft import SFTSpec

F64 = torch.float64
FDIV_NAMES = [name for name in SFT_OBJECTIVES if name.startswith("fdiv:")]

# f: (φ, φ'(0), w = φ'/φ'(0)) exactly as in the doc's f-divergence table.
DOC_GENERATORS = {
    "tv": (lambda u: u, 1.0, lambda u: torch.ones_like(u)),
    "pearson_chi2": (lambda u: 2 * (torch.sqrt(1 + u) - 1), 1.0, lambda u: (1 + u) ** -0.5),
    "squared_hellinger": (lambda u: u / (1 + u), 1.0, lambda u: (1 + u) ** -2),
    "reverse_kl": (lambda u: -torch.exp(-1 - u), math.exp(-1), lambda u: torch.exp(-u)),
    "js": (lambda u: torch.log(2 - torch.exp(-u)), 1.0, lambda u: torch.exp(-u) / (2 - torch.exp(-u))),
}


def random_sft_inputs(seed: int, shape: tuple[int, int] = (3, 7)) -> dict[str, torch.Tensor]:
    """Log-probs in [-3, -0.01]; ref within ±0.8 (u stays inside every domain, under the
    weight cap, for β ≤ 0.7); old within ±0.5 so ρ crosses both PSFT clip edges; the token KL
    to the reference's distribution in [0, 2]."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=gen, dtype=F64)

    logps = uniform(-3.0, -0.01)
    mask = torch.rand(shape, generator=gen) < 0.7
    mask[:, 0] = True
    return {
        "logps": logps,
        "mask": mask,
        "ref_logps": logps + uniform(-0.8, 0.8),
        "old_logps": logps + uniform(-0.5, 0.5),
        "ref_kl": uniform(0.0, 2.0),
    }


def doc_objective(name: str, logps, mask, ref_logps, old_logps, hparams, ref_kl=None) -> torch.Tensor:
    """The objective L of the doc's SFT table, differentiable in `logps` and `ref_kl` (sg only
    where the doc writes it)."""
    m = mask.to(F64)
    n = m.sum()
    if name == "nll":
        per_token = -logps
    elif name == "dft":
        per_token = -logps.detach().exp() * logps
    elif name == "asft":
        per_token = -logps.detach().exp() * logps + hparams["alpha"] * ref_kl
    elif name == "psft":
        ratio = torch.exp(logps - old_logps)
        clipped = torch.clamp(ratio, 1 - hparams["eps_low"], 1 + hparams["eps_high"])
        per_token = -torch.minimum(ratio, clipped)
    else:
        phi, phi_prime_0, _ = DOC_GENERATORS[name.removeprefix("fdiv:")]
        beta = hparams["beta"]
        per_token = -phi(beta * (logps - ref_logps)) / (beta * phi_prime_0)
    return (m * per_token).sum() / n


def doc_weights(name: str, logps, ref_logps, old_logps, hparams) -> torch.Tensor:
    if name == "nll":
        return torch.ones_like(logps)
    if name in ("dft", "asft"):
        return logps.exp()
    if name == "psft":
        ratio = torch.exp(logps - old_logps)
        return torch.where(ratio <= 1 + hparams["eps_high"], ratio, torch.zeros_like(ratio))
    _, _, weight = DOC_GENERATORS[name.removeprefix("fdiv:")]
    return weight(hparams["beta"] * (logps - ref_logps))


def run_objective(objective, inputs):
    logps = inputs["logps"].clone().requires_grad_(True)
    out = objective(
        logps, inputs["mask"], ref_logps=inputs["ref_logps"], old_logps=inputs["old_logps"], ref_kl=inputs.get("ref_kl")
    )
    out.loss.backward()
    return out, logps.grad


def weighted_sft_gradient(logps, mask, weights) -> torch.Tensor:
    """Gradient of -(1/N) Σ m_t sg(w_t) ℓ_t, by autograd."""
    logps = logps.clone().requires_grad_(True)
    m = mask.to(logps.dtype)
    (-(m * weights.detach() * logps).sum() / m.sum()).backward()
    return logps.grad


# ---------------------------------------------------------------- SFT objectives


def test_registry_has_the_documented_objectives():
    expected = {"nll", "dft", "psft", "fdiv:tv", "fdiv:pearson_chi2", "fdiv:squared_hellinger"}
    assert expected | {"fdiv:reverse_kl", "fdiv:js"} <= set(SFT_OBJECTIVES)
    assert sft_objective("psft").hparams == {"eps_low": 0.2, "eps_high": 0.28}
    for name in FDIV_NAMES:
        objective = sft_objective(name)
        assert objective.hparams["beta"] == 1.0
        assert (objective.needs_ref, objective.needs_old) == (True, False)
    assert (sft_objective("psft").needs_ref, sft_objective("psft").needs_old) == (False, True)
    for name in ("nll", "dft", "asft"):
        assert (sft_objective(name).needs_ref, sft_objective(name).needs_old) == (False, False)
    assert sft_objective("asft").hparams == {"alpha": 0.1}
    assert {name for name in SFT_OBJECTIVES if sft_objective(name).needs_ref_distribution} == {"asft"}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(SFT_OBJECTIVES))
def test_sft_value_gradient_and_weights_match_the_doc(name, seed):
    hparams = {"beta": 0.7} if name.startswith("fdiv:") else {}
    objective = sft_objective(name, **hparams)
    inputs = random_sft_inputs(seed)
    out, grad = run_objective(objective, inputs)

    all_hparams = dict(objective.hparams)
    logps = inputs["logps"].clone().requires_grad_(True)
    expected_value = doc_objective(
        name, logps, inputs["mask"], inputs["ref_logps"], inputs["old_logps"], all_hparams, ref_kl=inputs["ref_kl"]
    )
    expected_value.backward()
    expected_weights = inputs["mask"] * doc_weights(
        name, inputs["logps"], inputs["ref_logps"], inputs["old_logps"], all_hparams
    )

    assert out.loss.dtype == F64 and out.loss.shape == ()
    torch.testing.assert_close(out.loss.detach(), expected_value.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, logps.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.weights, expected_weights, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        grad, weighted_sft_gradient(inputs["logps"], inputs["mask"], expected_weights), rtol=1e-10, atol=1e-12
    )
    assert not out.weights.requires_grad
    assert (out.weights[~inputs["mask"]] == 0).all()


def test_psft_inputs_exercise_both_clip_edges():
    inputs = random_sft_inputs(0)
    ratio = torch.exp(inputs["logps"] - inputs["old_logps"])[inputs["mask"]]
    assert (ratio < 0.8).any() and (ratio > 1.28).any() and ((ratio > 0.8) & (ratio < 1.28)).any()


def test_psft_with_old_equal_to_policy_is_nll():
    inputs = random_sft_inputs(3)
    inputs["old_logps"] = inputs["logps"].clone()
    psft_out, psft_grad = run_objective(sft_objective("psft"), inputs)
    nll_out, nll_grad = run_objective(sft_objective("nll"), inputs)
    torch.testing.assert_close(psft_grad, nll_grad, rtol=0, atol=1e-15)
    torch.testing.assert_close(psft_out.weights, nll_out.weights)
    # The value is the PPO objective at ρ = 1, i.e. -1, not the NLL: only gradients coincide.
    assert psft_out.loss.item() == -1.0


@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
@pytest.mark.parametrize("name", FDIV_NAMES)
def test_fdiv_at_reference_has_the_nll_gradient(name, beta):
    inputs = random_sft_inputs(4)
    inputs["ref_logps"] = inputs["logps"].clone()
    out, grad = run_objective(sft_objective(name, beta=beta), inputs)
    _, nll_grad = run_objective(sft_objective("nll"), inputs)
    torch.testing.assert_close(grad, nll_grad, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(out.weights, inputs["mask"].to(F64))


def test_fdiv_tv_is_nll_plus_a_constant():
    inputs = random_sft_inputs(5)
    tv_out, tv_grad = run_objective(sft_objective("fdiv:tv", beta=0.3), inputs)
    nll_out, nll_grad = run_objective(sft_objective("nll"), inputs)
    m = inputs["mask"].to(F64)
    ref_term = (m * inputs["ref_logps"]).sum() / m.sum()
    torch.testing.assert_close(tv_out.loss.detach(), nll_out.loss.detach() + ref_term)
    torch.testing.assert_close(tv_grad, nll_grad)


def test_dft_weight_is_the_token_probability():
    inputs = random_sft_inputs(6)
    out, _ = run_objective(sft_objective("dft"), inputs)
    torch.testing.assert_close(out.weights, inputs["logps"].exp() * inputs["mask"])


def asft_leaves(objective, inputs):
    """The objective on leaf copies of ``logps`` and ``ref_kl``; returns the output and both gradients."""
    logps = inputs["logps"].clone().requires_grad_(True)
    ref_kl = inputs["ref_kl"].clone().requires_grad_(True)
    out = objective(logps, inputs["mask"], ref_kl=ref_kl)
    out.loss.backward()
    return out, logps.grad, ref_kl.grad


def test_asft_with_alpha_zero_is_exactly_dft():
    inputs = random_sft_inputs(13)
    asft_out, asft_grad, kl_grad = asft_leaves(sft_objective("asft", alpha=0.0), inputs)
    dft_out, dft_grad = run_objective(sft_objective("dft"), inputs)
    assert asft_out.loss.item() == dft_out.loss.item()
    assert torch.equal(asft_grad, dft_grad) and torch.equal(asft_out.weights, dft_out.weights)
    assert (kl_grad == 0).all()


@pytest.mark.parametrize("alpha", [0.05, 0.1, 2.0])
def test_asft_adds_alpha_times_the_token_mean_kl_with_its_gradient(alpha):
    inputs = random_sft_inputs(14)
    out, grad, kl_grad = asft_leaves(sft_objective("asft", alpha=alpha), inputs)
    dft_out, dft_grad = run_objective(sft_objective("dft"), inputs)
    m = inputs["mask"].to(F64)
    torch.testing.assert_close(out.loss.detach(), dft_out.loss + alpha * (m * inputs["ref_kl"]).sum() / m.sum())
    # The KL term moves the policy only through K_t: d loss / d K_t = α m_t / N, and ∂ℓ is DFT's.
    torch.testing.assert_close(kl_grad, alpha * m / m.sum(), rtol=1e-14, atol=0)
    torch.testing.assert_close(grad, dft_grad, rtol=0, atol=0)


@pytest.mark.parametrize("name", [name for name in FDIV_NAMES if name != "fdiv:tv"])
def test_fdiv_weight_cap_applies_to_the_gradient(name):
    # ℓ far below ℓ_ref: u is at or beyond the domain edge, where the raw weight explodes.
    logps = torch.tensor([[-8.0, -2.0, -0.5]], dtype=F64)
    ref_logps = torch.tensor([[-0.1, -2.0, -0.5]], dtype=F64)
    mask = torch.ones_like(logps, dtype=torch.bool)
    inputs = {"logps": logps, "mask": mask, "ref_logps": ref_logps, "old_logps": None}
    out, grad = run_objective(sft_objective(name, beta=1.0, max_weight=3.0), inputs)
    assert out.weights[0, 0].item() == 3.0
    torch.testing.assert_close(out.weights[0, 1:], torch.ones(2, dtype=F64))
    torch.testing.assert_close(grad, weighted_sft_gradient(logps, mask, out.weights))
    assert torch.isfinite(out.loss)


def test_fdiv_value_uses_u_clamped_into_the_domain():
    logps = torch.tensor([[-8.0]], dtype=F64)
    ref_logps = torch.tensor([[-0.1]], dtype=F64)
    mask = torch.ones_like(logps, dtype=torch.bool)
    chi2 = sft_objective("fdiv:pearson_chi2")(logps, mask, ref_logps=ref_logps)
    assert chi2.loss.item() == pytest.approx(-2 * (math.sqrt(1e-3) - 1))
    js = sft_objective("fdiv:js")(logps, mask, ref_logps=ref_logps)
    assert js.loss.item() == pytest.approx(-math.log(1e-3))


EXTREME_LOGPS = [-60.0, -20.0, -1e-6]


@pytest.mark.parametrize("beta", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("name", list(SFT_OBJECTIVES))
def test_sft_is_finite_on_extreme_inputs(name, beta):
    triples = list(itertools.product(EXTREME_LOGPS, repeat=3))
    logps = torch.tensor([[t[0] for t in triples]], dtype=torch.float32)
    ref_logps = torch.tensor([[t[1] for t in triples]], dtype=torch.float32)
    old_logps = torch.tensor([[t[2] for t in triples]], dtype=torch.float32)
    ref_kl = -ref_logps  # 1e-6 to 60 nats
    mask = torch.ones_like(logps, dtype=torch.bool)
    mask[0, ::4] = False
    # Off-mask positions may hold anything, including -inf and NaN.
    logps[0, 0], ref_logps[0, 4], old_logps[0, 8], ref_kl[0, 12] = (float("-inf"), float("nan"), float("-inf"), 1e30)
    hparams = {"beta": beta} if name.startswith("fdiv:") else {}
    logps.requires_grad_(True)
    out = sft_objective(name, **hparams)(logps, mask, ref_logps=ref_logps, old_logps=old_logps, ref_kl=ref_kl)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    assert torch.isfinite(logps.grad).all()
    assert torch.isfinite(out.weights).all() and (out.weights >= 0).all()
    assert (logps.grad[~mask] == 0).all()


@pytest.mark.parametrize("name", list(SFT_OBJECTIVES))
def test_sft_empty_mask_gives_zero_loss_and_gradient(name):
    inputs = random_sft_inputs(7)
    inputs["mask"] = torch.zeros_like(inputs["mask"])
    out, grad = run_objective(sft_objective(name), inputs)
    assert out.loss.item() == 0.0
    assert (grad == 0).all()


def test_sft_off_mask_values_do_not_matter():
    inputs = random_sft_inputs(8)
    changed = {key: value.clone() for key, value in inputs.items()}
    for key in ("logps", "ref_logps", "old_logps", "ref_kl"):
        changed[key][~inputs["mask"]] = -1e4
    for name in SFT_OBJECTIVES:
        out, grad = run_objective(sft_objective(name), inputs)
        changed_out, changed_grad = run_objective(sft_objective(name), changed)
        torch.testing.assert_close(out.loss, changed_out.loss)
        torch.testing.assert_close(grad, changed_grad)
        assert (grad[~inputs["mask"]] == 0).all()


@pytest.mark.parametrize("name", ["dft", "asft", "psft", "fdiv:js"])
def test_num_tokens_makes_micro_batches_add_up(name):
    inputs = random_sft_inputs(9, shape=(4, 6))
    objective = sft_objective(name)
    full, full_grad = run_objective(objective, inputs)
    total_tokens = int(inputs["mask"].sum())
    logps = inputs["logps"].clone().requires_grad_(True)
    summed = 0.0
    for rows in (slice(0, 1), slice(1, 4)):
        micro = objective(
            logps[rows],
            inputs["mask"][rows],
            ref_logps=inputs["ref_logps"][rows],
            old_logps=inputs["old_logps"][rows],
            ref_kl=inputs["ref_kl"][rows],
            num_tokens=total_tokens,
        )
        micro.loss.backward()
        summed += micro.loss.item()
    assert summed == pytest.approx(full.loss.item(), rel=1e-12)
    torch.testing.assert_close(logps.grad, full_grad)


def test_sft_computes_low_precision_inputs_in_fp32():
    inputs = random_sft_inputs(10)
    logps = inputs["logps"].to(torch.bfloat16).requires_grad_(True)
    out = sft_objective("dft")(logps, inputs["mask"])
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and out.weights.dtype == torch.float32
    assert logps.grad.dtype == torch.bfloat16
    expected = doc_objective("dft", logps.detach().to(F64), inputs["mask"], None, None, {})
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_adding_an_objective_is_one_function_and_one_entry(monkeypatch):
    def doubled_nll(logps):
        return -2 * logps, 2 * torch.ones_like(logps)

    monkeypatch.setitem(SFT_OBJECTIVES, "test:doubled_nll", SFTSpec(doubled_nll))
    inputs = random_sft_inputs(11)
    out, grad = run_objective(sft_objective("test:doubled_nll"), inputs)
    nll_out, nll_grad = run_objective(sft_objective("nll"), inputs)
    torch.testing.assert_close(out.loss, 2 * nll_out.loss)
    torch.testing.assert_close(grad, 2 * nll_grad)


# ---------------------------------------------------------------- errors


def test_unknown_sft_objective_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'fdiv:kl'.*nll.*fdiv:pearson_chi2"):
        sft_objective("fdiv:kl")


def test_unknown_hyperparameter_is_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"eps\b.*'psft'.*eps_low, eps_high"):
        sft_objective("psft", eps=0.1)
    with pytest.raises(ValueError, match=r"beta.*'nll'.*valid: none"):
        sft_objective("nll", beta=1.0)
    with pytest.raises(ValueError, match=r"gamma.*'sigmoid'.*beta, label_smoothing"):
        preference_loss("sigmoid", gamma=1.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: sft_objective("fdiv:js", beta=0.0),
        lambda: sft_objective("fdiv:js", beta=float("nan")),
        lambda: sft_objective("fdiv:js", beta=True),
        lambda: sft_objective("fdiv:js", max_weight=-1.0),
        lambda: sft_objective("psft", eps_low=1.0),
        lambda: preference_loss("robust", label_smoothing=0.5),
        lambda: preference_loss("sigmoid", beta="0.1"),
        lambda: preference_loss("rpo", alpha=-0.1),
    ],
)
def test_invalid_hyperparameter_values_are_rejected(make):
    with pytest.raises(ValueError, match="Hyperparameter"):
        make()


def test_missing_reference_or_old_log_probs_is_a_clear_error():
    inputs = random_sft_inputs(12)
    with pytest.raises(ValueError, match=r"'fdiv:js' needs ref_logps"):
        sft_objective("fdiv:js")(inputs["logps"], inputs["mask"], old_logps=inputs["old_logps"])
    with pytest.raises(ValueError, match=r"'psft' needs old_logps"):
        sft_objective("psft")(inputs["logps"], inputs["mask"], ref_logps=inputs["ref_logps"])
    with pytest.raises(ValueError, match=r"'asft' needs ref_kl \(KL\(reference \|\| policy\)"):
        sft_objective("asft")(inputs["logps"], inputs["mask"], ref_logps=inputs["ref_logps"])
    chosen = torch.tensor([-3.0])
    with pytest.raises(ValueError, match=r"'sigmoid' needs ref_chosen and ref_rejected"):
        preference_loss("sigmoid")(PairLogps(chosen, chosen))
    with pytest.raises(ValueError, match=r"'ipo' .*chosen_lengths and rejected_lengths"):
        preference_loss("ipo")(PairLogps(chosen, chosen, chosen, chosen))
    with pytest.raises(ValueError, match=r"Unknown preference loss 'dpo'.*sigmoid.*simpo"):
        preference_loss("dpo")


# ---------------------------------------------------------------- preference losses


def random_pairs(seed: int, batch: int = 6) -> PairLogps:
    gen = torch.Generator().manual_seed(seed)
    lengths = {key: torch.randint(1, 40, (batch,), generator=gen) for key in ("chosen", "rejected")}

    def summed(key: str) -> torch.Tensor:
        return -lengths[key] * (0.2 + 2 * torch.rand(batch, generator=gen, dtype=F64))

    chosen, rejected = summed("chosen"), summed("rejected")
    return PairLogps(
        chosen=chosen,
        rejected=rejected,
        ref_chosen=chosen + 3 * torch.randn(batch, generator=gen, dtype=F64),
        ref_rejected=rejected + 3 * torch.randn(batch, generator=gen, dtype=F64),
        chosen_lengths=lengths["chosen"],
        rejected_lengths=lengths["rejected"],
    )


def with_policy_leaves(pairs: PairLogps) -> PairLogps:
    """`pairs` with fresh copies of the policy log-probs that collect gradients."""
    return dataclasses.replace(
        pairs,
        chosen=pairs.chosen.detach().clone().requires_grad_(True),
        rejected=pairs.rejected.detach().clone().requires_grad_(True),
    )


def select(pairs: PairLogps, index: list[int]) -> PairLogps:
    return PairLogps(**{f.name: getattr(pairs, f.name)[index] for f in dataclasses.fields(pairs)})


def doc_preference(name: str, pairs: PairLogps, hparams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, reward_chosen, reward_rejected) from the doc's preference table."""
    beta = hparams["beta"]
    eps = hparams.get("label_smoothing", 0.0)
    chosen, rejected = pairs.chosen, pairs.rejected
    chosen_lengths, rejected_lengths = pairs.chosen_lengths.to(F64), pairs.rejected_lengths.to(F64)
    r_w, r_l = chosen - pairs.ref_chosen, rejected - pairs.ref_rejected
    h = beta * (r_w - r_l)
    log_sigmoid = lambda x: torch.log(torch.sigmoid(x))  # noqa: E731 - the textbook form, on moderate x
    losses = {
        "sigmoid": lambda: -(1 - eps) * log_sigmoid(h) - eps * log_sigmoid(-h),
        "robust": lambda: (-(1 - eps) * log_sigmoid(h) + eps * log_sigmoid(-h)) / (1 - 2 * eps),
        "hinge": lambda: torch.clamp(1 - h, min=0),
        "ipo": lambda: (r_w / chosen_lengths - r_l / rejected_lengths - 1 / (2 * beta)) ** 2,
        "simpo": lambda: (
            -log_sigmoid(beta * (chosen / chosen_lengths - rejected / rejected_lengths) - hparams["gamma"])
        ),
        "rpo": lambda: -log_sigmoid(h) - hparams["alpha"] * len(chosen) * chosen / chosen_lengths.sum(),
        "nca": lambda: -log_sigmoid(beta * r_w) - 0.5 * log_sigmoid(-beta * r_w) - 0.5 * log_sigmoid(-beta * r_l),
        "apo_zero": lambda: 1 - torch.sigmoid(beta * r_w) + torch.sigmoid(beta * r_l),
        "apo_down": lambda: torch.sigmoid(beta * r_w) + 1 - torch.sigmoid(h),
        "sppo_hard": lambda: (r_w - 1 / (2 * beta)) ** 2 + (r_l + 1 / (2 * beta)) ** 2,
    }[name]()
    # Rewards: β(L - L^ref) with summed L; without a reference (simpo), β times the average.
    if name == "simpo":
        return losses, beta * chosen / chosen_lengths, beta * rejected / rejected_lengths
    return losses, beta * r_w, beta * r_l


# Every registered loss at its defaults, plus other hyperparameters where they change the formula.
PREFERENCE_CASES = [(name, {}) for name in PREFERENCE_LOSSES] + [
    ("sigmoid", {"label_smoothing": 0.1, "beta": 0.3}),
    ("robust", {"label_smoothing": 0.2}),
    ("hinge", {"beta": 0.5}),
    ("ipo", {"beta": 0.5}),
    ("simpo", {"beta": 2.5, "gamma": 1.0}),
    ("rpo", {"beta": 0.5, "alpha": 0.3}),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("name", "hparams"), PREFERENCE_CASES)
def test_preference_losses_match_the_doc(name, hparams, seed):
    loss = preference_loss(name, **hparams)
    pairs = with_policy_leaves(random_pairs(seed))
    out = loss(pairs)
    out.losses.sum().backward()

    expected_pairs = with_policy_leaves(pairs)
    expected, expected_chosen, expected_rejected = doc_preference(name, expected_pairs, loss.hparams)
    expected.sum().backward()

    assert out.losses.dtype == F64 and out.losses.shape == pairs.chosen.shape
    torch.testing.assert_close(out.losses, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.reward_chosen, expected_chosen.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.reward_rejected, expected_rejected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pairs.chosen.grad, expected_pairs.chosen.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pairs.rejected.grad, expected_pairs.rejected.grad, rtol=1e-10, atol=1e-12)
    assert not out.reward_chosen.requires_grad and not out.reward_rejected.requires_grad


@pytest.mark.parametrize("name", list(PREFERENCE_LOSSES))
def test_preference_gradients_match_finite_differences(name):
    loss = preference_loss(name, beta=0.5)
    pairs = random_pairs(4)

    def losses(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        return loss(dataclasses.replace(pairs, chosen=chosen, rejected=rejected)).losses

    policy = (pairs.chosen.clone().requires_grad_(True), pairs.rejected.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(losses, policy)


INPUT_FLAGS = {"needs_ref": ("ref_chosen", "ref_rejected"), "needs_lengths": ("chosen_lengths", "rejected_lengths")}


@pytest.mark.parametrize("flag", list(INPUT_FLAGS))
@pytest.mark.parametrize("name", list(PREFERENCE_LOSSES))
def test_preference_losses_read_exactly_the_inputs_their_flags_declare(name, flag):
    loss = preference_loss(name)
    pairs = random_pairs(5)
    out = loss(pairs)
    chosen_field, rejected_field = INPUT_FLAGS[flag]
    if getattr(loss, flag):
        shifted = {chosen_field: getattr(pairs, chosen_field) + 2, rejected_field: getattr(pairs, rejected_field) + 1}
        assert not torch.allclose(loss(dataclasses.replace(pairs, **shifted)).losses, out.losses)
        with pytest.raises(ValueError, match=f"'{name}' needs {chosen_field} and {rejected_field}"):
            loss(dataclasses.replace(pairs, **{rejected_field: None}))
    else:
        nan = torch.full_like(pairs.chosen, float("nan"))
        for hidden in (None, nan):
            same = loss(dataclasses.replace(pairs, **{chosen_field: hidden, rejected_field: hidden}))
            assert torch.equal(same.losses, out.losses)
            assert torch.equal(same.reward_chosen, out.reward_chosen)
            assert torch.equal(same.reward_rejected, out.reward_rejected)


def test_preference_defaults_and_reference_needs():
    assert preference_loss("sigmoid").hparams == {"beta": 0.1, "label_smoothing": 0.0}
    assert preference_loss("simpo").hparams == {"beta": 2.0, "gamma": 0.5}
    assert preference_loss("rpo").hparams == {"beta": 0.1, "alpha": 1.0}
    assert {name for name, spec in PREFERENCE_LOSSES.items() if not spec.needs_ref} == {"simpo"}
    assert {name for name, spec in PREFERENCE_LOSSES.items() if spec.needs_lengths} == {"ipo", "simpo", "rpo"}
    pairs = random_pairs(2)
    out = preference_loss("simpo")(dataclasses.replace(pairs, ref_chosen=None, ref_rejected=None))
    torch.testing.assert_close(out.reward_chosen, 2.0 * pairs.chosen / pairs.chosen_lengths)


def test_a_reference_free_loss_must_read_lengths_for_its_rewards():
    with pytest.raises(ValueError, match="without a reference.*needs lengths"):
        PreferenceSpec(lambda pair: -pair.chosen, needs_ref=False)


def test_adding_a_preference_loss_is_one_function_and_one_entry(monkeypatch):
    def chosen_only(pair: PairLogps, beta: float) -> torch.Tensor:
        return -F.logsigmoid(beta * pair.logratios()[0])

    monkeypatch.setitem(PREFERENCE_LOSSES, "test:chosen_only", PreferenceSpec(chosen_only, {"beta": 0.1}))
    pairs = with_policy_leaves(random_pairs(6))
    out = preference_loss("test:chosen_only", beta=0.5)(pairs)
    out.losses.sum().backward()
    torch.testing.assert_close(out.losses, -F.logsigmoid(0.5 * (pairs.chosen - pairs.ref_chosen)).detach())
    assert pairs.rejected.grad is None and (pairs.chosen.grad != 0).all()


@pytest.mark.parametrize(("name", "hparams"), PREFERENCE_CASES)
def test_preference_losses_are_finite_on_extreme_inputs(name, hparams):
    values = [-6000.0, -60.0, -1e-6]
    quads = list(itertools.product(values, repeat=4))
    lengths = torch.full((len(quads),), 100)
    lengths[0] = 0
    pairs = PairLogps(
        chosen=torch.tensor([q[0] for q in quads], requires_grad=True),
        rejected=torch.tensor([q[1] for q in quads], requires_grad=True),
        ref_chosen=torch.tensor([q[2] for q in quads]),
        ref_rejected=torch.tensor([q[3] for q in quads]),
        chosen_lengths=lengths,
        rejected_lengths=lengths,
    )
    out = preference_loss(name, **hparams)(pairs)
    out.losses.sum().backward()
    outputs = (out.losses, out.reward_chosen, out.reward_rejected, pairs.chosen.grad, pairs.rejected.grad)
    assert out.losses.dtype == torch.float32
    assert all(torch.isfinite(tensor).all() for tensor in outputs)


def test_preference_losses_compute_low_precision_inputs_in_fp32():
    pairs = random_pairs(7)
    low = PairLogps(**{f.name: getattr(pairs, f.name).to(torch.bfloat16) for f in dataclasses.fields(pairs)})
    low = with_policy_leaves(low)
    out = preference_loss("rpo")(low)
    out.losses.sum().backward()
    assert out.losses.dtype == torch.float32 and out.reward_chosen.dtype == torch.float32
    assert low.chosen.grad.dtype == torch.bfloat16
    as_f64 = PairLogps(**{f.name: getattr(low, f.name).detach().to(F64) for f in dataclasses.fields(low)})
    torch.testing.assert_close(out.losses.to(F64), preference_loss("rpo")(as_f64).losses, rtol=1e-6, atol=1e-6)


def test_preference_metrics_use_trl_names_and_strict_accuracy():
    out = preference_loss("sigmoid", beta=0.5)(
        PairLogps(
            chosen=torch.tensor([-1.0, -2.0, -3.0, -4.0]),
            rejected=torch.tensor([-2.0, -2.0, -1.0, -4.0]),
            ref_chosen=torch.tensor([-1.0, -1.0, -1.0, -3.0]),
            ref_rejected=torch.tensor([-1.0, -1.0, -1.0, -3.0]),
        )
    )
    # rewards chosen: 0, -0.5, -1, -0.5; rejected: -0.5, -0.5, 0, -0.5 (two ties)
    metrics = preference_metrics(out)
    assert metrics == pytest.approx(
        {
            "rewards/chosen": -0.5,
            "rewards/rejected": -0.375,
            "rewards/accuracies": 0.25,
            "rewards/margins": -0.125,
        }
    )
    assert all(type(value) is float for value in metrics.values())


# ---------------------------------------------------------------- TRL as an oracle
#
# TRL 1.x (checked against 1.16.0) has no `DPOTrainer.dpo_loss` any more: the DPO loss family is
# computed inline in `DPOTrainer._compute_loss(model, inputs, return_outputs)`, which runs the model,
# sums per-token log-probs over the completion, applies the loss and logs the rewards. The tests
# below run that real method on a trainer made with `object.__new__(DPOTrainer)` plus exactly the
# attributes it reads, with a stand-in model whose per-token log-probs sum to our random summed
# log-probs. Any attribute TRL starts to read, or any signature change, fails the test loudly
# (AttributeError/TypeError): it never skips once trl is importable.
#
# Convention differences found in trl 1.16.0 (see each case below):
# - DPOTrainer "sigmoid" ignores `label_smoothing` (cDPO was removed from it; the option is read
#   only by "robust", "exo_pair", "aot*"). The cDPO formula still lives in the experimental
#   `CPOTrainer.cpo_loss` ("sigmoid" with label smoothing), which is reference-free: fed the
#   log-ratios L - L^ref as its "policy log-probs" it is exactly cDPO, so that is the oracle for
#   our `sigmoid` with ε > 0.
# - DPOTrainer "ipo" takes *summed* log-probs and averages the log-ratios over the completion
#   tokens itself (`completion_mask.sum(dim=1).clamp(min=1)`), so we feed it sums and the lengths
#   as the completion mask. Its logged rewards are β·(summed log-ratio), as ours are.
# - SimPO is not in DPOTrainer; `CPOTrainer.cpo_loss` with loss_type "simpo" takes per-token
#   average policy log-probs (CPO calls `get_batch_logps(average_log_prob=True)` for simpo) and its
#   `simpo_gamma` is the margin γ itself (it subtracts γ/β inside β(...)), like ours.
# - RPO has no loss type of its own (`rpo_alpha` is gone): it is `loss_type=["sigmoid", "sft"]`
#   with `loss_weights=[1, α]`, and "sft" is the mean NLL over all chosen tokens of the batch, not
#   a per-pair mean. So a pair's loss depends on the batch's chosen lengths, and the per-pair check
#   below compares each pair as a batch of one.
# - Our `nca` is TRL's "nca_pair".

TRL_BETAS = (0.05, 0.5, 2.0)


def trl_dpo_loss_types(name: str, hparams) -> tuple[list[str], list[float]]:
    """TRL 1.16 `DPOConfig.loss_type` and `loss_weights` for our loss `name`."""
    if name == "rpo":
        return ["sigmoid", "sft"], [1.0, hparams["alpha"]]
    return [{"nca": "nca_pair"}.get(name, name)], [1.0]


def import_trl():
    trl = pytest.importorskip("trl")
    # Deliberately no skip from here on: an import or API change in trl must fail these tests.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRLExperimentalWarning on importing trl.experimental
        from trl.experimental.cpo import CPOTrainer
    return trl, trl.DPOTrainer, CPOTrainer


class _Accelerator:
    """What `_compute_loss` reads from `self.accelerator` on one CPU process."""

    device = torch.device("cpu")

    @staticmethod
    def gather(tensor):
        return tensor

    gather_for_metrics = gather


def trl_dpo_compute_loss(dpo_trainer_cls, loss_types, loss_weights, beta, label_smoothing, pairs, index):
    """TRL's loss for `pairs` at `index`, via `DPOTrainer._compute_loss`, and its logged rewards.

    `index` is a list of pair indices: the batch TRL sees is those pairs, laid out as TRL's collator
    does ([chosen rows; rejected rows], prompt then completion), and the returned loss is TRL's batch
    mean. The reference log-probs come precomputed (`precompute_ref_logps`), as TRL takes them from
    the dataset columns `ref_chosen_logps`/`ref_rejected_logps`.
    """
    trainer = object.__new__(dpo_trainer_cls)
    trainer.model = types.SimpleNamespace(training=False)  # -> metrics mode "eval"
    trainer.accelerator = _Accelerator()
    trainer.aux_loss_enabled = False
    trainer.ld_alpha = None
    trainer.precompute_ref_logps = True
    trainer.f_divergence_type = "reverse_kl"  # standard DPO
    trainer.loss_types = loss_types
    trainer.loss_weights = loss_weights
    trainer.beta = beta
    trainer.label_smoothing = label_smoothing
    trainer.use_weighting = False
    trainer._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    trainer._total_train_tokens = 0

    prompt = 3
    summed = torch.cat([pairs.chosen[index], pairs.rejected[index]])
    lengths = torch.cat([pairs.chosen_lengths[index], pairs.rejected_lengths[index]])
    width = prompt + int(lengths.max())
    positions = torch.arange(width)
    completion_mask = ((positions >= prompt) & (positions < prompt + lengths[:, None])).long()
    shift_mask = completion_mask[:, 1:].to(F64)
    # Per-token log-probs: the summed log-prob spread evenly over the completion tokens, 0 elsewhere
    # (the fused LM head returns 0 where labels are -100), so TRL's `.sum(dim=1)` gives `summed`.
    per_token = shift_mask * (summed / lengths.to(F64))[:, None]

    def model(input_ids, attention_mask, use_cache, labels, fused_lm_head):
        assert fused_lm_head and not use_cache
        assert torch.equal(labels != -100, completion_mask.bool())
        zeros = torch.zeros_like(per_token)
        return types.SimpleNamespace(
            log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None
        )

    inputs = {
        "input_ids": torch.ones_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": pairs.ref_chosen[index],
        "ref_rejected_logps": pairs.ref_rejected[index],
    }
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    metrics = trainer._metrics["eval"]
    return loss, metrics["rewards/chosen"][0], metrics["rewards/rejected"][0]


def trl_cpo_loss(cpo_trainer_cls, loss_type, beta, label_smoothing, gamma, chosen, rejected):
    """`CPOTrainer.cpo_loss` (reference-free) on the given per-pair "policy log-probs"."""
    trainer = object.__new__(cpo_trainer_cls)
    trainer.accelerator = _Accelerator()
    trainer.alpha = 0.0  # no AlphaPO reward transform
    trainer.beta = beta
    trainer.label_smoothing = label_smoothing
    trainer.loss_type = loss_type
    if gamma is not None:
        trainer.simpo_gamma = gamma
    return trainer.cpo_loss(chosen, rejected)


@pytest.mark.parametrize("beta", TRL_BETAS)
@pytest.mark.parametrize(("name", "hparams"), PREFERENCE_CASES)
def test_preference_losses_match_trl(name, hparams, beta):
    _, dpo_trainer_cls, cpo_trainer_cls = import_trl()
    loss = preference_loss(name, **{**hparams, "beta": beta})
    eps = loss.hparams.get("label_smoothing", 0.0)
    pairs = random_pairs(3)
    out = loss(pairs)
    batch = len(out.losses)
    # Each pair as a batch of one, as the per-pair oracles see it.
    alone = torch.cat([loss(select(pairs, [i])).losses for i in range(batch)])
    tight = {"rtol": 1e-10, "atol": 1e-12}  # float64 throughout; only summation order differs

    if name == "simpo":
        average_chosen = pairs.chosen / pairs.chosen_lengths.to(F64)
        average_rejected = pairs.rejected / pairs.rejected_lengths.to(F64)
        trl_losses, trl_chosen, trl_rejected = trl_cpo_loss(
            cpo_trainer_cls, "simpo", beta, 0.0, loss.hparams["gamma"], average_chosen, average_rejected
        )
    elif name == "sigmoid" and eps > 0:
        # cDPO: DPOTrainer's "sigmoid" has no label smoothing in trl 1.x; CPO's has (see above).
        chosen_logratios, rejected_logratios = pairs.logratios()
        trl_losses, trl_chosen, trl_rejected = trl_cpo_loss(
            cpo_trainer_cls, "sigmoid", beta, eps, None, chosen_logratios, rejected_logratios
        )
    else:
        loss_types, loss_weights = trl_dpo_loss_types(name, loss.hparams)

        def trl_loss(index):
            return trl_dpo_compute_loss(dpo_trainer_cls, loss_types, loss_weights, beta, eps, pairs, index)

        # One pair per call: `_compute_loss` returns only the batch mean, and logs rewards as means.
        per_pair = [trl_loss([i]) for i in range(batch)]
        trl_losses = torch.stack([result[0] for result in per_pair])
        trl_chosen = torch.tensor([result[1] for result in per_pair], dtype=F64)
        trl_rejected = torch.tensor([result[2] for result in per_pair], dtype=F64)
        # The whole batch at once (TRL's [chosen; rejected] layout, ragged lengths) gives the mean.
        batch_loss, _, _ = trl_loss(list(range(batch)))
        torch.testing.assert_close(out.losses.mean(), batch_loss.to(F64), **tight)

    torch.testing.assert_close(alone, trl_losses.to(F64), **tight)
    torch.testing.assert_close(out.reward_chosen, trl_chosen.to(F64), **tight)
    torch.testing.assert_close(out.reward_rejected, trl_rejected.to(F64), **tight)


# ---------------------------------------------------------------- log-prob helpers


def random_logits(seed: int, shape=(2, 5, 11), dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(shape, generator=gen, dtype=F64)).to(dtype)
    targets = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    return logits, targets


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 10, 1024])
def test_token_logprobs_match_log_softmax_gather(chunk_size):
    logits, targets = random_logits(0)
    upstream = torch.randn(targets.shape, dtype=F64, generator=torch.Generator().manual_seed(1))

    ours_logits = logits.clone().requires_grad_(True)
    ours = token_logprobs(ours_logits, targets, chunk_size=chunk_size)
    (ours * upstream).sum().backward()

    direct_logits = logits.clone().requires_grad_(True)
    direct = torch.log_softmax(direct_logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    (direct * upstream).sum().backward()

    assert ours.shape == targets.shape and ours.dtype == F64
    torch.testing.assert_close(ours, direct, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_logits.grad, direct_logits.grad, rtol=1e-12, atol=1e-12)


def test_token_logprobs_of_bf16_logits_are_fp32_and_never_save_fp32_logits():
    logits, targets = random_logits(2, shape=(2, 6, 50), dtype=torch.bfloat16)
    logits.requires_grad_(True)
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        ours = token_logprobs(logits, targets, chunk_size=5)
    assert ours.dtype == torch.float32
    # Saving each chunk's fp32 log-softmax would add up to an fp32 copy of the logits.
    assert sum(t.numel() for t in saved if t.dtype == torch.float32) < logits.numel() // 10

    direct = torch.log_softmax(logits.detach().float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(ours.detach(), direct, rtol=1e-6, atol=1e-6)

    ours.sum().backward()
    reference_logits = logits.detach().float().requires_grad_(True)
    torch.log_softmax(reference_logits, dim=-1).gather(-1, targets[..., None]).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.float(), reference_logits.grad, rtol=1e-2, atol=1e-2)


def test_token_logprobs_ignore_negative_targets():
    logits, targets = random_logits(3)
    targets[0, :2] = -100
    logits.requires_grad_(True)
    ours = token_logprobs(logits, targets, chunk_size=3)
    ours.sum().backward()
    assert (ours[0, :2] == 0).all() and (logits.grad[0, :2] == 0).all()
    assert (ours[targets >= 0] < 0).all() and (logits.grad[0, 2:] != 0).any()


def test_chunk_size_must_be_positive():
    logits, targets = random_logits(4)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(logits, targets, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_entropy_and_kl(logits, None, chunk_size=-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_entropy_and_kl_match_direct_computation(chunk_size):
    logits, _ = random_logits(5)
    ref_logits, _ = random_logits(6)
    entropy, kl = token_entropy_and_kl(logits, ref_logits, chunk_size=chunk_size)
    p, q = torch.softmax(logits, -1), torch.softmax(ref_logits, -1)
    torch.testing.assert_close(entropy, -(p * p.log()).sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl, (p * (p.log() - q.log())).sum(-1), rtol=1e-12, atol=1e-12)
    assert (kl > 0).all()

    same_entropy, kl_to_self = token_entropy_and_kl(logits, logits.clone(), chunk_size=chunk_size)
    torch.testing.assert_close(same_entropy, entropy)
    torch.testing.assert_close(kl_to_self, torch.zeros_like(kl_to_self), rtol=0, atol=1e-12)


def test_entropy_without_reference_and_in_low_precision():
    logits, _ = random_logits(7, dtype=torch.bfloat16)
    entropy, kl = token_entropy_and_kl(logits.requires_grad_(True), None, chunk_size=4)
    assert kl is None
    assert entropy.dtype == torch.float32 and entropy.shape == logits.shape[:-1]
    assert not entropy.requires_grad
    logp = F.log_softmax(logits.detach().float(), -1)
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- KL(π_ref ‖ π_θ) over the vocabulary, chunked


def kl_problem(seed: int, shape=(3, 5), hidden_size=7, ref_hidden_size=6, vocab=11, dtype=F64, masked=4):
    """Policy ``hidden``/``weight``/``bias``, a reference with its own hidden size, ``counted`` with ``masked``
    positions that do not count, and ``targets``: a token id at each counted position, -100 elsewhere."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=gen, dtype=F64).to(dtype)

    counted = torch.ones(shape, dtype=torch.bool)
    counted.view(-1)[torch.randperm(counted.numel(), generator=gen)[:masked]] = False
    return {
        "hidden": randn(*shape, hidden_size),
        "weight": randn(vocab, hidden_size),
        "bias": randn(vocab),
        "ref_hidden": randn(*shape, ref_hidden_size),
        "ref_weight": randn(vocab, ref_hidden_size),
        "ref_bias": randn(vocab),
        "counted": counted,
        "targets": torch.randint(0, vocab, shape, generator=gen).masked_fill(~counted, -100),
    }


def full_vocabulary_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """The definition, ``Σ_v π_ref(v) (log π_ref(v) - log π_θ(v))``, with the whole ``[..., V]`` tensors."""
    log_p, log_q = torch.log_softmax(ref_logits, dim=-1), torch.log_softmax(logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kl_leaves(problem: dict, with_bias: bool = True) -> dict:
    leaves = {key: value.clone().requires_grad_(value.is_floating_point()) for key, value in problem.items()}
    if not with_bias:
        leaves["bias"] = leaves["ref_bias"] = None
    return leaves


def fused_of(leaves: dict, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_target_logprobs_and_reference_kl(
        leaves["hidden"],
        leaves["weight"],
        leaves["targets"],
        leaves["ref_hidden"],
        leaves["ref_weight"],
        bias=leaves["bias"],
        ref_bias=leaves["ref_bias"],
        chunk_size=chunk_size,
    )


def fused_kl_of(leaves: dict, chunk_size: int) -> torch.Tensor:
    return fused_of(leaves, chunk_size)[1]


def plain_of(leaves: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Target log-probs and the KL from the whole ``[..., V]`` logits of both models."""

    def logits(hidden, weight, bias):
        return hidden @ weight.T + (0 if bias is None else bias)

    policy_logits = logits(leaves["hidden"], leaves["weight"], leaves["bias"])
    kl = full_vocabulary_kl(policy_logits, logits(leaves["ref_hidden"], leaves["ref_weight"], leaves["ref_bias"]))
    counted = leaves["counted"]
    logps = torch.log_softmax(policy_logits, -1).gather(-1, leaves["targets"].clamp_min(0)[..., None]).squeeze(-1)
    return logps * counted, kl * counted


def plain_kl_of(leaves: dict) -> torch.Tensor:
    return plain_of(leaves)[1]


POLICY_INPUTS = ("hidden", "weight", "bias")


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 10, 1024])
def test_fused_logprobs_and_reference_kl_values_and_gradient_match_the_full_vocabulary_path_in_float64(
    chunk_size, with_bias
):
    problem = kl_problem(0)
    gen = torch.Generator().manual_seed(1)
    upstream_logps, upstream_kl = (torch.randn(problem["counted"].shape, dtype=F64, generator=gen) for _ in "lk")
    ours_leaves, plain_leaves = kl_leaves(problem, with_bias), kl_leaves(problem, with_bias)
    ours_logps, ours = fused_of(ours_leaves, chunk_size)
    (ours_logps * upstream_logps + ours * upstream_kl).sum().backward()
    plain_logps, plain = plain_of(plain_leaves)
    (plain_logps * upstream_logps + plain * upstream_kl).sum().backward()

    counted = problem["counted"]
    assert ours.shape == ours_logps.shape == counted.shape and ours.dtype == ours_logps.dtype == F64
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_logps, plain_logps, rtol=1e-12, atol=1e-12)
    assert (ours[counted] > 0).all() and (ours[~counted] == 0).all()
    assert (ours_logps[counted] < 0).all() and (ours_logps[~counted] == 0).all()
    for name in POLICY_INPUTS if with_bias else POLICY_INPUTS[:2]:
        torch.testing.assert_close(ours_leaves[name].grad, plain_leaves[name].grad, rtol=1e-12, atol=1e-12)
    assert (ours_leaves["hidden"].grad[~counted] == 0).all() and (ours_leaves["hidden"].grad[counted] != 0).any()
    # The reference is frozen: nothing flows to it, even from leaves that would accept a gradient.
    assert all(ours_leaves[name] is None or ours_leaves[name].grad is None for name in ("ref_hidden", "ref_weight"))


def test_masked_positions_do_not_change_the_counted_ones():
    problem = kl_problem(2)
    changed = {**problem, "hidden": problem["hidden"].clone(), "ref_hidden": problem["ref_hidden"].clone()}
    changed["hidden"][~problem["counted"]] = 1e4
    changed["ref_hidden"][~problem["counted"]] = float("nan")
    ours, theirs = kl_leaves(problem), kl_leaves(changed)
    fused_kl_of(ours, 3).sum().backward()
    fused_kl_of(theirs, 3).sum().backward()
    torch.testing.assert_close(fused_kl_of(theirs, 3), fused_kl_of(ours, 3), rtol=0, atol=0)
    for name in POLICY_INPUTS:
        torch.testing.assert_close(theirs[name].grad, ours[name].grad, rtol=0, atol=0)


def test_reference_kl_of_the_policy_itself_is_zero_with_zero_gradient():
    problem = kl_problem(3, ref_hidden_size=7)
    same = {**problem, "ref_hidden": problem["hidden"], "ref_weight": problem["weight"], "ref_bias": problem["bias"]}
    leaves = kl_leaves(same)
    kl = fused_kl_of(leaves, 4)
    kl.sum().backward()
    torch.testing.assert_close(kl, torch.zeros_like(kl), rtol=0, atol=1e-13)
    for name in POLICY_INPUTS:
        torch.testing.assert_close(leaves[name].grad, torch.zeros_like(leaves[name].grad), rtol=0, atol=1e-13)


def test_fused_logprobs_and_reference_kl_gradcheck():
    problem = kl_problem(4, shape=(5,), hidden_size=3, ref_hidden_size=2, vocab=4, masked=1)
    leaves = kl_leaves(problem)

    def both_of(hidden, weight, bias):
        return fused_of({**leaves, "hidden": hidden, "weight": weight, "bias": bias}, chunk_size=2)

    assert torch.autograd.gradcheck(both_of, tuple(leaves[name] for name in POLICY_INPUTS))


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_token_reference_kl_value_and_gradient_match_the_full_vocabulary_kl_in_float64(chunk_size):
    logits, _ = random_logits(8, shape=(9, 11))
    ref_logits, _ = random_logits(9, shape=(9, 11))
    upstream = torch.randn(9, dtype=F64, generator=torch.Generator().manual_seed(10))
    ours_logits, plain_logits = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ref_leaf = ref_logits.clone().requires_grad_(True)
    ours = token_reference_kl(ours_logits, ref_leaf, chunk_size=chunk_size)
    (ours * upstream).sum().backward()
    plain = full_vocabulary_kl(plain_logits, ref_logits)
    (plain * upstream).sum().backward()
    assert ours.dtype == F64
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_logits.grad, plain_logits.grad, rtol=1e-12, atol=1e-12)
    assert ref_leaf.grad is None
    # The logits are read, never overwritten (each chunk is upcast into a copy).
    assert torch.equal(ours_logits.detach(), logits)


def test_reference_kl_of_bf16_inputs_is_fp32_with_gradients_in_the_inputs_dtypes():
    problem = kl_problem(11, shape=(4, 8), hidden_size=16, ref_hidden_size=16, vocab=200, dtype=torch.bfloat16)
    ours = kl_leaves(problem)
    reference = kl_leaves(
        {key: value.float() if value.is_floating_point() else value for key, value in problem.items()}
    )
    kl = fused_kl_of(ours, 5)
    kl.sum().backward()
    expected = plain_kl_of(reference)
    expected.sum().backward()
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    for name in POLICY_INPUTS:
        assert ours[name].grad.dtype == torch.bfloat16
        scale = reference[name].grad.abs().max().item()
        torch.testing.assert_close(ours[name].grad.float(), reference[name].grad, rtol=2e-2, atol=2e-2 * scale)


def test_reference_kl_chunk_size_must_be_positive():
    problem = kl_problem(12)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_kl_of(problem, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_reference_kl(problem["hidden"], problem["hidden"], chunk_size=0)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.5])
@pytest.mark.parametrize("chunk_size", [2, 1024])
def test_asft_on_the_fused_path_has_the_gradient_of_the_full_vocabulary_loss(alpha, chunk_size):
    """The whole contract end to end, in float64: ``asft`` fed by ``fused_target_logprobs_and_reference_kl``
    against the authors' formulation with full ``[N, V]`` logits,
    ``mean_m(sg(p_y) · CE + α · kl_div(log_softmax(z), softmax(z_ref)).sum(-1))``."""
    problem = kl_problem(13)
    targets, mask = problem["targets"], problem["counted"]
    objective = sft_objective("asft", alpha=alpha)

    ours = kl_leaves(problem)
    logps, ref_kl = fused_of(ours, chunk_size)
    loss = objective(logps, mask, ref_kl=ref_kl).loss
    loss.backward()

    plain = kl_leaves(problem)
    logits = plain["hidden"][mask] @ plain["weight"].T + plain["bias"]
    ref_logits = (plain["ref_hidden"][mask] @ plain["ref_weight"].T + plain["ref_bias"]).detach()
    cross_entropy = F.cross_entropy(logits, targets[mask], reduction="none")
    kl = F.kl_div(F.log_softmax(logits, -1), F.softmax(ref_logits, -1), reduction="none").sum(-1)
    expected = (torch.exp(-cross_entropy).detach() * cross_entropy + alpha * kl).mean()
    expected.backward()

    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-12, atol=1e-12)
    for name in POLICY_INPUTS:
        torch.testing.assert_close(ours[name].grad, plain[name].grad, rtol=1e-10, atol=1e-12)


# Memory: what a fused KL pass keeps for backward and allocates per op, against the plain [N, V] path.
KL_POSITIONS, KL_HIDDEN, KL_VOCAB, KL_CHUNK = 512, 8, 1024, 32


def kl_memory_problem() -> dict:
    problem = kl_problem(
        15,
        shape=(KL_POSITIONS,),
        hidden_size=KL_HIDDEN,
        ref_hidden_size=KL_HIDDEN,
        vocab=KL_VOCAB,
        dtype=torch.float32,
        masked=0,
    )
    return kl_leaves(problem)


def saved_numels_of(kl_of) -> list[int]:
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        kl_of(kl_memory_problem())
    return saved


def largest_allocation_of(kl_of) -> int:
    """Bytes of the largest allocation any op (forward or backward) holds when it returns."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kl_of(kl_memory_problem()).sum().backward()
    return max(event.cpu_memory_usage for event in prof.events())


def test_fused_logprobs_and_reference_kl_save_and_allocate_no_position_by_vocabulary_tensor():
    def fused(leaves):
        return fused_kl_of(leaves, KL_CHUNK)

    logits_numel = KL_POSITIONS * KL_VOCAB
    assert max(saved_numels_of(plain_kl_of)) >= logits_numel  # the probe sees [N, V] tensors when they are saved
    assert max(saved_numels_of(fused)) <= max(KL_VOCAB, KL_POSITIONS) * KL_HIDDEN
    assert largest_allocation_of(plain_kl_of) >= logits_numel * 4
    # Per op at most: one chunk of fp32 logits, the fp32 ∂W accumulator, and [N, H] rows of both models.
    bound = KL_CHUNK * KL_VOCAB * 4 + KL_VOCAB * KL_HIDDEN * 4 + 2 * KL_POSITIONS * KL_HIDDEN * 4
    assert largest_allocation_of(fused) <= bound < logits_numel * 4
