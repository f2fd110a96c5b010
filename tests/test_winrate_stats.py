"""Statistical properties of the win-rate metrics (post_train.evaluation), on simulated preferences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from post_train.evaluation import (
    bootstrap_ci,
    discrete,
    length_controlled_win_rate,
    rank_correlation,
    soft_preference,
    split_metrics,
    summarize,
    win_rate,
)
from post_train.judges.gold import GoldJudge, GoldJudgeSettings


def test_a_model_against_itself_wins_half_the_time_on_every_statistic(tmp_path):
    outputs = ["a b c", "d e", "f", "g h i j"]
    prompts = [[{"role": "user", "content": p}] for p in ("Copy: a b c", "Copy: d e", "Reverse: f", "Sort: g h i j")]
    verdicts = GoldJudge(GoldJudgeSettings(), tmp_path).judge(prompts, outputs, outputs)
    assert [v.source for v in verdicts] == ["identical"] * 4
    metrics = split_metrics(["x"] * 4, [v.preference for v in verdicts], outputs, outputs)
    for key in ("win_rate", "win_rate_discrete", "win_rate_ci_low", "win_rate_ci_high", "lc_win_rate"):
        assert metrics[f"{key}/all"] == 0.5 and metrics[f"{key}/x"] == 0.5
    assert metrics["win_rate_se/all"] == 0.0


def test_swapping_model_and_reference_gives_one_minus_the_win_rate():
    rng = np.random.default_rng(0)
    n = 200
    preferences = rng.beta(2, 1.5, size=n)  # soft preferences, as from log-probs
    model_lengths = rng.integers(10, 400, size=n)
    reference_lengths = rng.integers(10, 400, size=n)
    forward = summarize(preferences, model_lengths, reference_lengths)
    backward = summarize(1 - preferences, reference_lengths, model_lengths)
    assert backward["win_rate"] == pytest.approx(1 - forward["win_rate"])
    assert backward["win_rate_discrete"] == pytest.approx(1 - forward["win_rate_discrete"])
    assert backward["lc_win_rate"] == pytest.approx(1 - forward["lc_win_rate"], abs=1e-6)
    assert backward["win_rate_se"] == pytest.approx(forward["win_rate_se"])
    assert backward["avg_length"] == forward["reference_avg_length"]
    # The bootstrap draws the same resamples (same seed): the interval mirrors.
    assert backward["win_rate_ci_low"] == pytest.approx(1 - forward["win_rate_ci_high"])
    assert backward["win_rate_ci_high"] == pytest.approx(1 - forward["win_rate_ci_low"])
    # Reward-model style soft preferences and hard verdicts mirror too.
    assert soft_preference(1.3, -0.2) == pytest.approx(1 - soft_preference(-0.2, 1.3))
    assert discrete(0.7) == 1 - discrete(0.3) and discrete(0.5) == 0.5


def test_the_bootstrap_interval_covers_the_true_win_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    simulations, n, truth = 300, 100, 0.6
    covered = 0
    for simulation in range(simulations):
        # A judge whose soft preference is Beta-distributed around the truth, with some draws.
        preferences = rng.beta(6 * truth, 6 * (1 - truth), size=n)
        preferences[rng.random(n) < 0.1] = 0.5
        expected = 0.9 * truth + 0.1 * 0.5
        low, high = bootstrap_ci(preferences, samples=1000, confidence=0.95, seed=simulation)
        covered += low <= expected <= high
    assert 0.90 <= covered / simulations <= 0.99


def test_bootstrap_is_seeded_and_narrows_with_more_prompts():
    rng = np.random.default_rng(2)
    small, large = rng.random(50), rng.random(2000)
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    assert bootstrap_ci(small, seed=3) != bootstrap_ci(small, seed=4)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(bootstrap_ci(large)) < width(bootstrap_ci(small))


def test_length_controlled_equals_raw_when_lengths_are_equal():
    rng = np.random.default_rng(3)
    preferences = rng.random(80)
    lengths = [120] * 80
    assert length_controlled_win_rate(preferences, lengths, lengths) == pytest.approx(np.mean(preferences), abs=1e-9)
    hard = [1.0, 0.0, 1.0, 1.0, 0.5]
    assert length_controlled_win_rate(hard, [5] * 5, [5] * 5) == pytest.approx(0.7, abs=1e-9)
    assert length_controlled_win_rate([1.0] * 4, [1, 2, 3, 4], [9, 9, 9, 9]) == 1.0


@pytest.mark.parametrize("quality", [0.0, 0.8])
def test_length_controlled_removes_a_judges_preference_for_longer_outputs(quality):
    """Preferences drawn from the GLM itself: quality θ plus a length term. LC recovers σ(θ); raw does not."""
    rng = np.random.default_rng(4)
    n = 400
    reference_lengths = rng.integers(100, 300, size=n).astype(float)
    model_lengths = reference_lengths + 120 + rng.normal(0, 100, size=n)  # the model writes longer outputs
    delta = reference_lengths - model_lengths
    preferences = 1 / (1 + np.exp(-(quality - 2.5 * np.tanh(delta / np.std(delta, ddof=1)))))
    raw = float(np.mean(preferences))
    lc = length_controlled_win_rate(preferences, model_lengths, reference_lengths)
    truth = 1 / (1 + math.exp(-quality))
    assert raw > truth + 0.1  # length inflates the raw win rate
    assert lc == pytest.approx(truth, abs=0.01)


def test_standard_error_and_discrete_win_rate_follow_alpacaeval():
    preferences = [0.9, 0.2, 0.5, 0.6]
    summary = summarize(preferences, [1, 2, 3, 4], [1, 2, 3, 4])
    mean = sum(preferences) / 4
    assert summary["win_rate"] == pytest.approx(mean)
    assert summary["win_rate_se"] == pytest.approx(np.std(preferences, ddof=1) / 2)
    assert summary["win_rate_discrete"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert summary["avg_length"] == 2.5 and summary["num_prompts"] == 4
    assert all(0.0 <= summary[key] <= 1.0 for key in ("win_rate_ci_low", "win_rate_ci_high", "lc_win_rate"))
    assert win_rate([1.0])[1] != win_rate([1.0])[1]  # NaN: one prompt has no standard error


def test_rank_correlation_is_spearman():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 2, 2, 3], [1, 3, 3, 2]) == pytest.approx(
        1 / 3
    )  # scipy.stats.spearmanr's value, with ties
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))
