"""Paired comparison of two study arms (post_train.paired): interval coverage on simulated studies,
the gain from pairing, Student's t and the power calculation."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from post_train.comparison import t_quantile_975
from post_train.evaluation import bootstrap_ci
from post_train.paired import (
    detection_power,
    minimum_detectable_difference,
    paired_difference,
    seeds_needed,
    simulate_arms,
    t_quantile,
)

STUDIES = 300
# 95% intervals over 300 studies: a correct method's share lies in this band except by bad luck
# (about ±3 standard errors of a share of 0.95); the band's edges are what the alternatives miss.
COVERAGE_BAND = (0.91, 0.985)


def coverage(truth: float, n_seeds: int, n_prompts: int, **simulation) -> float:
    covered = 0
    for study in range(STUDIES):
        a, b = simulate_arms(truth, n_seeds, n_prompts, rng=1000 * n_seeds + study, **simulation)
        estimate = paired_difference(a, b, samples=1000, seed=study)
        covered += estimate.low <= truth <= estimate.high
    return covered / STUDIES


# --------------------------------------------------------------------------- Student's t


def test_t_quantile_matches_closed_forms_the_comparison_table_and_the_normal_limit():
    for q in (0.6, 0.8, 0.975, 0.999):
        assert t_quantile(q, 1) == pytest.approx(math.tan(math.pi * (q - 0.5)), rel=1e-10)  # Cauchy
        assert t_quantile(q, 2) == pytest.approx((2 * q - 1) / math.sqrt(2 * q * (1 - q)), rel=1e-10)
        assert t_quantile(1 - q, 7) == -t_quantile(q, 7)
        assert t_quantile(q, math.inf) == pytest.approx(NormalDist().inv_cdf(q), rel=1e-12)
        assert t_quantile(q, 1e7) == pytest.approx(NormalDist().inv_cdf(q), rel=1e-6)
        # Welch-Satterthwaite df are fractional: the quantile falls steadily between whole df.
        assert t_quantile(q, 3) > t_quantile(q, 3.5) > t_quantile(q, 4)
    for df in range(1, 31):
        assert t_quantile(0.975, df) == pytest.approx(t_quantile_975(df), abs=1e-4)  # a 4-decimal table


def test_t_quantile_and_power_agree_with_scipy_where_it_is_installed():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 1.5, 2, 2.7, 3, 4, 7, 12.3, 30, 150, 500, 1e5):
        for q in (0.55, 0.8, 0.975, 0.9995):
            assert t_quantile(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-8)
    for k in (3, 5, 8):
        se = math.sqrt((0.038**2 + 0.5**2 / 200) / k)
        critical = stats.t.ppf(0.975, k - 1)
        noncentrality = minimum_detectable_difference(0.038, 0.5, 200, k) / se
        power = stats.nct.sf(critical, k - 1, noncentrality) + stats.nct.cdf(-critical, k - 1, noncentrality)
        assert power == pytest.approx(0.8, abs=1e-6)


# --------------------------------------------------------------------------- the paired interval


def test_the_interval_covers_a_known_difference_at_about_the_nominal_rate_with_five_seeds():
    share = coverage(0.04, n_seeds=5, n_prompts=200, seed_sd=0.03, prompt_sd=0.15, shared_sd=0.05)
    assert COVERAGE_BAND[0] <= share <= COVERAGE_BAND[1], share


def test_the_interval_covers_prompt_noise_that_all_seeds_share():
    # Prompts with a strong advantage for one arm, the same in every seed: the seed-to-seed spread
    # cannot see this noise: a t interval on the per-seed means alone covers 0.80 of these studies.
    share = coverage(0.04, n_seeds=5, n_prompts=200, seed_sd=0.01, prompt_sd=0.0, shared_sd=0.45)
    assert COVERAGE_BAND[0] <= share <= COVERAGE_BAND[1], share


def test_a_zero_difference_gives_intervals_holding_zero_at_about_the_nominal_rate_with_three_seeds():
    share = coverage(0.0, n_seeds=3, n_prompts=200, seed_sd=0.03, prompt_sd=0.15, shared_sd=0.05)
    assert COVERAGE_BAND[0] <= share <= COVERAGE_BAND[1], share


def paired_to_unpaired_se(prompt_sd: float) -> float:
    """Mean ratio of the paired standard error to that of an analysis of the arms as independent samples.

    The unpaired se is √(se_A² + se_B²), each arm's se by the same method against 0: it keeps
    the sampling noise of the prompts' difficulty in each arm, which pairing cancels.
    """
    ratios = []
    for study in range(30):
        a, b = simulate_arms(0.04, 5, 200, seed_sd=0.01, prompt_sd=prompt_sd, shared_sd=0.0, tie_rate=0.0, rng=study)
        alone = [paired_difference(arm, np.zeros_like(arm), samples=500, seed=study).se for arm in (a, b)]
        ratios.append(paired_difference(a, b, samples=500, seed=study).se / math.hypot(*alone))
    return float(np.mean(ratios))


def test_pairing_narrows_the_interval_when_prompt_difficulty_is_shared_and_only_then():
    # Difficulty sd 0.25 adds 0.25²/n to each arm's variance; an arm's win/loss noise is 0.25 - 0.25²
    # per prompt, seed noise is small: the paired se is about √(0.375 / (0.375 + 5·0.125)) ≈ 0.6 of the unpaired.
    assert paired_to_unpaired_se(prompt_sd=0.25) < 0.75
    assert paired_to_unpaired_se(prompt_sd=0.0) == pytest.approx(1.0, abs=0.1)


def test_one_seed_gives_the_within_seed_bootstrap_interval_and_says_it_misses_seed_noise():
    a, b = simulate_arms(0.05, 1, 300, rng=3)
    estimate = paired_difference(a, b, samples=1500, seed=4)
    assert not estimate.covers_seed_noise and math.isnan(estimate.seed_sd) and estimate.n_seeds == 1
    # The project's bootstrap of the per-prompt differences draws the same resamples.
    low, high = bootstrap_ci(a[0] - b[0], samples=1500, seed=4)
    assert (estimate.low, estimate.high) == pytest.approx((low, high), abs=1e-12)
    assert estimate.difference == pytest.approx(float(np.mean(a - b)))


def test_the_estimate_reports_its_parts():
    a, b = simulate_arms(0.04, 4, 250, rng=5)
    estimate = paired_difference(a, b)
    per_seed = (a - b).mean(axis=1)
    assert estimate.per_seed == pytest.approx(tuple(per_seed))
    assert estimate.difference == pytest.approx(per_seed.mean())
    assert estimate.seed_sd == pytest.approx(per_seed.std(ddof=1))
    assert (estimate.n_seeds, estimate.n_prompts, estimate.covers_seed_noise) == (4, 250, True)
    assert estimate.df >= 3 and estimate.low < estimate.difference < estimate.high
    # The bootstrap se of a mean over prompts is close to its closed form sd(ddof=0)/√n.
    closed_form = (a - b).mean(axis=0).std() / math.sqrt(250)
    assert estimate.sampling_se == pytest.approx(closed_form, rel=0.1)
    assert estimate.se == pytest.approx(math.sqrt(estimate.seed_sd**2 / 4 + estimate.shared_se**2))
    assert paired_difference(a, b) == estimate  # seeded: the same resamples every time
    swapped = paired_difference(b, a)
    assert swapped.difference == pytest.approx(-estimate.difference)
    assert (swapped.low, swapped.high) == pytest.approx((-estimate.high, -estimate.low))


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "message"),
    [
        ([0.5, 1.0], [0.0, 1.0], {}, "shape \\[seeds, prompts\\]"),
        ([[0.5, 1.0, 0.0]], [[0.0, 1.0]], {}, "same \\[seeds, prompts\\] shape"),
        ([[0.5, math.nan, 0.0]], [[0.0, 1.0, 1.0]], {}, "a has 1 non-finite value.*seed 0, prompt 1"),
        ([[0.5, 1.0]], [[0.0, math.inf]], {}, "b has 1 non-finite"),
        ([[0.5], [1.0]], [[0.0], [1.0]], {}, "at least one seed and two prompts"),
        ([[0.5, 1.0]], [[0.0, 1.0]], {"samples": 1}, "samples"),
        ([[0.5, 1.0]], [[0.0, 1.0]], {"confidence": 1.0}, "confidence"),
    ],
)
def test_bad_inputs_raise_naming_the_problem(a, b, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_difference(a, b, **kwargs)


def test_simulations_refuse_win_probabilities_outside_the_verdicts_range():
    with pytest.raises(ValueError, match="win probabilities would reach"):
        simulate_arms(0.1, 3, 10, prompt_sd=0.3)
    a, b = simulate_arms(0.0, 2, 50, rng=0)
    assert a.shape == b.shape == (2, 50) and set(np.unique(np.concatenate([a, b]))) <= {0.0, 0.5, 1.0}


# --------------------------------------------------------------------------- power


def test_one_seed_power_has_the_normal_closed_form():
    se = math.sqrt(0.038**2 + 0.5**2 / 200)
    z = NormalDist().inv_cdf
    mdd = minimum_detectable_difference(0.038, 0.5, 200, 1)
    # δ = (z(0.975) + z(0.8))·se up to the chance of an interval wholly on the wrong side (tiny).
    assert mdd == pytest.approx((z(0.975) + z(0.8)) * se, rel=1e-4)
    assert detection_power(mdd, 0.038, 0.5, 200, 1) == pytest.approx(0.8, abs=1e-9)


def test_the_minimum_detectable_difference_is_detected_with_the_stated_power_in_simulation():
    # Gaussian studies whose sds are exactly the planning inputs: training noise per seed,
    # per-prompt noise new for every seed, and a prompt advantage shared by all seeds.
    seed_sd, sampling_sd, shared_sd, n_prompts = 0.038, 0.5, 0.2, 200
    for n_seeds in (3, 6):
        mdd = minimum_detectable_difference(seed_sd, sampling_sd, n_prompts, n_seeds, shared_sd=shared_sd)
        assert detection_power(mdd, seed_sd, sampling_sd, n_prompts, n_seeds, shared_sd=shared_sd) == pytest.approx(
            0.8, abs=1e-9
        )
        rng = np.random.default_rng(n_seeds)
        detected = 0
        for study in range(400):
            shared = rng.normal(0, shared_sd, n_prompts)
            training = rng.normal(0, seed_sd, (n_seeds, 1))
            differences = mdd + training + shared + rng.normal(0, sampling_sd, (n_seeds, n_prompts))
            estimate = paired_difference(differences, np.zeros_like(differences), samples=500, seed=study)
            detected += estimate.low > 0 or estimate.high < 0
        assert detected / 400 == pytest.approx(0.8, abs=0.06), (n_seeds, detected / 400)


def test_more_seeds_resolve_smaller_differences_and_seeds_needed_is_the_fewest_that_reach_the_target():
    differences = [minimum_detectable_difference(0.038, 0.5, 200, k) for k in range(2, 12)]
    assert differences == sorted(differences, reverse=True)
    for target in (0.15, 0.08, 0.05):
        seeds = seeds_needed(target, 0.038, 0.5, 200)
        assert minimum_detectable_difference(0.038, 0.5, 200, seeds) <= target
        assert seeds == 2 or minimum_detectable_difference(0.038, 0.5, 200, seeds - 1) > target
    # Seeds cannot average away the noise every seed shares: only prompts can.
    with pytest.raises(ValueError, match="add prompts"):
        seeds_needed(0.02, 0.038, 0.5, 200, shared_sd=0.3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed_sd": -0.1}, "seed_sd must be finite and non-negative"),
        ({"sampling_sd_per_prompt": math.nan}, "sampling_sd_per_prompt"),
        ({"seed_sd": 0.0, "sampling_sd_per_prompt": 0.0}, "at least one of"),
        ({"n_prompts": 1}, "n_prompts"),
        ({"n_seeds": 0}, "n_seeds"),
        ({"power": 0.04}, "power must lie in"),
    ],
)
def test_bad_designs_raise_naming_the_problem(kwargs, message):
    design = {"seed_sd": 0.038, "sampling_sd_per_prompt": 0.5, "n_prompts": 200, "n_seeds": 3} | kwargs
    with pytest.raises(ValueError, match=message):
        minimum_detectable_difference(**design)
