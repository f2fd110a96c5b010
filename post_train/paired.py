"""Comparing two study arms on the same evaluation prompts and seeds: paired intervals and power.

Arm A (say `nll` at SFT lr 1e-3) and arm B are each trained with seeds s = 0..k-1, and every
trained model is evaluated on the same n prompts, so each seed and prompt gives a paired
difference d_si = a_si - b_si of preferences (or gold rewards). Two kinds of noise move the mean
difference: which prompts were drawn (sampling noise) and how training went for each seed
(seed noise). The variance of the study's mean difference D̄, in the two-way random-effects
model d_si = Δ + α_s + β_i + ε_si, is

    Var(D̄) = σ_seed²/k + σ_shared²/n + σ_prompt²/(n·k)

with σ_seed the seed-to-seed sd of the difference due to training (α), σ_shared the sd of a
prompt's own advantage for one arm, which every seed sees (β), and σ_prompt the sd of the
per-prompt noise that is new for every seed and prompt (ε: the judge's and the sampler's
randomness). Prompt difficulty common to both arms cancels in d_si, which is why pairing helps.

- `paired_difference` estimates Δ with an interval that covers all three terms;
- `minimum_detectable_difference`, `detection_power` and `seeds_needed` plan a study with them;
- `simulate_arms` draws studies with a known difference, the model the intervals were checked on;
- `t_quantile` is Student's t quantile, for any level and any (fractional) degrees of freedom.

Pure numpy and the standard library: no I/O, no tracking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

_NORMAL = NormalDist()


# --------------------------------------------------------------------------- Student's t


def _beta_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of the incomplete beta function, by the modified Lentz method
    (Numerical Recipes, 3rd ed., §6.4 `betacf`); converges fast for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 100_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            c = 1.0 + numerator / c
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = c if abs(c) > tiny else tiny
            fraction *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return fraction


def _incomplete_beta(x: float, complement: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b); `complement` is 1 - x, passed exactly."""
    if x <= 0:
        return 0.0
    if complement <= 0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(complement))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(x, a, b) / a
    return 1.0 - front * _beta_fraction(complement, b, a) / b


def _t_sf(t: float, df: float) -> float:
    """P(T > t) for t ≥ 0, Student's t with real `df`: I_x(df/2, 1/2)/2 with x = df/(df + t²) (A&S 26.5.27)."""
    return _incomplete_beta(df / (df + t * t), t * t / (df + t * t), df / 2, 0.5) / 2


def t_quantile(q: float, df: float) -> float:
    """The `q` quantile of Student's t with `df` > 0 degrees of freedom, not necessarily whole;
    `df=math.inf` gives the normal's. Bisection on the exact tail probability (`_t_sf`)."""
    if not 0 < q < 1:
        raise ValueError(f"quantile level must lie in (0, 1), got {q}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if q < 0.5:
        return -t_quantile(1 - q, df)
    if math.isinf(df):
        return _NORMAL.inv_cdf(q)
    tail = 1 - q
    low, high = 0.0, max(1.0, 2 * _NORMAL.inv_cdf(q))
    while _t_sf(high, df) > tail:
        low, high = high, 2 * high
    for _ in range(200):
        middle = (low + high) / 2
        if _t_sf(middle, df) > tail:
            low = middle
        else:
            high = middle
        if high - low <= 1e-13 * high:
            break
    return (low + high) / 2


def _satterthwaite_df(between: float, n_seeds: int, shared: float, n_prompts: int) -> float:
    """Welch-Satterthwaite degrees of freedom of `between + shared`, variances with k-1 and n-1 df:
    (between + shared)² / (between²/(k-1) + shared²/(n-1)), from k-1 (all from seeds) to k-1 + n-1."""
    total = between + shared
    if total == 0:
        return float(n_seeds - 1)
    return total**2 / (between**2 / (n_seeds - 1) + shared**2 / (n_prompts - 1))


# --------------------------------------------------------------------------- the paired estimate


@dataclass(frozen=True)
class PairedEstimate:
    """Mean difference of arm A minus arm B over seeds and prompts, with its interval."""

    difference: float
    """Mean over seeds of each seed's mean paired difference over prompts."""
    low: float
    high: float
    confidence: float
    se: float
    """Standard error of `difference` that the interval is built from."""
    df: float
    """Degrees of freedom of the t quantile (Welch-Satterthwaite); `math.inf` for one seed."""
    n_seeds: int
    n_prompts: int
    per_seed: tuple[float, ...]
    """Each seed's mean paired difference over the prompts."""
    seed_sd: float
    """Sample sd (ddof=1) of `per_seed`: training noise plus that seed's sampling noise; NaN for one seed."""
    sampling_se: float
    """Sampling noise alone: the paired bootstrap's sd of `difference` over prompts, seeds held fixed."""
    shared_se: float
    """The part of the sampling noise every seed shares (same prompts), which `seed_sd` cannot see."""
    covers_seed_noise: bool
    """False for one seed: the interval is then the within-seed bootstrap's and ignores training noise."""


def _matrix(values: object, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(
            f"{name} must have shape [seeds, prompts], got {array.ndim} dimension(s) {array.shape}"
            " (one seed: pass [values])"
        )
    if array.shape[0] == 0 or array.shape[1] < 2:
        raise ValueError(f"{name} needs at least one seed and two prompts, got shape {array.shape}")
    bad = np.argwhere(~np.isfinite(array))
    if bad.size:
        seed, prompt = bad[0]
        raise ValueError(f"{name} has {len(bad)} non-finite value(s), the first at seed {seed}, prompt {prompt}")
    return array


def _bootstrap_seed_means(differences: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """[samples, seeds]: per-seed means of `differences` [seeds, prompts] over resampled prompts.

    A resample draws prompt indices once and uses them for every seed: seeds were evaluated on the
    same prompts, so a prompt that favours one arm does so in every seed's mean.
    """
    n_seeds, n_prompts = differences.shape
    rng = np.random.default_rng(seed)
    means = np.empty((samples, n_seeds))
    chunk = max(1, 2_000_000 // n_prompts)  # bound the count matrix's memory
    for start in range(0, samples, chunk):
        count = min(chunk, samples - start)
        draws = rng.integers(0, n_prompts, size=(count, n_prompts))
        # How often each prompt is drawn per resample; the resampled means are then one product.
        rows = np.arange(count)[:, None] * n_prompts
        counts = np.bincount((draws + rows).ravel(), minlength=count * n_prompts).reshape(count, n_prompts)
        means[start : start + count] = counts.astype(np.float64) @ differences.T / n_prompts  # float: BLAS
    return means


def paired_difference(
    a: object,
    b: object,
    *,
    samples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedEstimate:
    """Mean of arm A minus arm B, `a` and `b` of shape [seeds, prompts] paired by seed and prompt.

    The estimate is D̄ = mean_s D_s, with D_s = mean_i (a_si - b_si). Its interval, for k ≥ 2 seeds:

        D̄ ± t(confidence, ν) · √(S²/k + C),

    - S² is the sample variance (ddof=1) of the per-seed means D_s. It holds the seed noise and
      each seed's own sampling noise (σ_seed² + σ_prompt²/n), so S²/k estimates those two terms of Var(D̄).
    - C is the mean covariance, between two different seeds, of the per-seed means under a paired
      bootstrap of the prompts (the same resampled prompts for every seed). It estimates
      σ_shared²/n, the sampling noise that all seeds share because they answer the same prompts
      and that S² therefore cannot see. A negative estimate is taken as 0.
    - ν is the Welch-Satterthwaite df of S²/k (k-1 df) plus C (n-1 df), with S² in it no smaller
      than the per-seed bootstrap variance less C, the part of S² that the prompts measure well.

    Why this design: on `simulate_arms` studies (2000 per setting, n = 200 prompts, k = 3, 4, 5
    and 6 seeds; seed sd per arm 0-0.05, shared prompt advantage sd 0-0.45, difficulty sd 0-0.15;
    20 settings) its 95% interval covered 94.3-96.6% in every setting. The alternatives tried:
    - a t interval on the D_s alone (C left out) fell with a strong shared advantage (sd 0.45)
      to 88, 81, 77 and 71% for k = 3, 4, 5, 6: more seeds do not average that noise away;
    - adding the whole bootstrap variance of D̄ instead of C counts each seed's own sampling
      noise twice: 98.6-100%, intervals up to 2.2 times as wide;
    - k-1 df throughout: up to 100% once C is a large part of the variance;
    - the plain Satterthwaite ν (S² not bounded below): 93.1-95.9%, low at k = 3-4, where a
      small S² by chance raises ν and so shortens the intervals that are already too short;
    - a two-level bootstrap (resample seeds, then prompts), percentile interval: 94.1-99.9%;
      with a small-cluster correction (sd ×√(k/(k-1)), t(k-1) quantile): 99.6-100%.

    With one seed the seed noise cannot be estimated: the interval is the paired bootstrap's
    percentile interval over prompts and `covers_seed_noise` is False.

    Raises ValueError when the arrays are not 2-D, differ in shape, have fewer than two prompts
    or hold non-finite values, or when `samples`/`confidence` are out of range.
    """
    if samples < 2:
        raise ValueError(f"samples must be at least 2, got {samples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    a, b = _matrix(a, "a"), _matrix(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must be paired, with the same [seeds, prompts] shape; got {a.shape} and {b.shape}")
    differences = a - b
    n_seeds, n_prompts = differences.shape
    per_seed = differences.mean(axis=1)
    difference = float(per_seed.mean())
    resampled = _bootstrap_seed_means(differences, samples, seed)
    sampling_se = float(resampled.mean(axis=1).std(ddof=1))
    common = dict(
        difference=difference,
        confidence=confidence,
        n_seeds=n_seeds,
        n_prompts=n_prompts,
        per_seed=tuple(float(value) for value in per_seed),
        sampling_se=sampling_se,
    )
    if n_seeds == 1:
        alpha = (1 - confidence) / 2
        low, high = np.quantile(resampled[:, 0], [alpha, 1 - alpha])
        return PairedEstimate(
            low=float(low),
            high=float(high),
            se=sampling_se,
            df=math.inf,
            seed_sd=math.nan,
            shared_se=sampling_se,
            covers_seed_noise=False,
            **common,
        )
    covariance = np.cov(resampled, rowvar=False)
    shared = max(0.0, float((covariance.sum() - np.trace(covariance)) / (n_seeds * (n_seeds - 1))))
    own = max(0.0, float(np.trace(covariance)) / n_seeds - shared)  # a seed's own sampling variance, σ_prompt²/n
    seed_variance = float(per_seed.var(ddof=1))
    between = seed_variance / n_seeds
    se = math.sqrt(between + shared)
    # S² cannot fall below `own` but for chance; where it does, a plain Satterthwaite ν grows, and
    # shortens exactly the intervals already too short. `own` is known from all the prompts: use it.
    df = _satterthwaite_df(max(seed_variance, own) / n_seeds, n_seeds, shared, n_prompts)
    half = t_quantile((1 + confidence) / 2, df) * se
    return PairedEstimate(
        low=difference - half,
        high=difference + half,
        se=se,
        df=df,
        seed_sd=math.sqrt(seed_variance),
        shared_se=math.sqrt(shared),
        covers_seed_noise=True,
        **common,
    )


# --------------------------------------------------------------------------- power


def _check_design(seed_sd: float, sampling_sd_per_prompt: float, shared_sd: float, n_prompts: int) -> None:
    for name, value in (
        ("seed_sd", seed_sd),
        ("sampling_sd_per_prompt", sampling_sd_per_prompt),
        ("shared_sd", shared_sd),
    ):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and non-negative, got {value}")
    if seed_sd == sampling_sd_per_prompt == shared_sd == 0:
        raise ValueError("at least one of seed_sd, sampling_sd_per_prompt and shared_sd must be positive")
    if n_prompts < 2:
        raise ValueError(f"n_prompts must be at least 2, got {n_prompts}")


def _design_se_df(
    seed_sd: float, sampling_sd_per_prompt: float, shared_sd: float, n_prompts: int, n_seeds: int
) -> tuple[float, float]:
    """Standard error of D̄ and the df `paired_difference` would use, from the population sds."""
    if n_seeds < 1:
        raise ValueError(f"n_seeds must be at least 1, got {n_seeds}")
    between = (seed_sd**2 + sampling_sd_per_prompt**2 / n_prompts) / n_seeds
    shared = shared_sd**2 / n_prompts
    df = math.inf if n_seeds == 1 else _satterthwaite_df(between, n_seeds, shared, n_prompts)
    return math.sqrt(between + shared), df


def _rejection_probability(noncentrality: float, df: float, critical: float) -> float:
    """P(|T'| > critical) for T' noncentral t with `df` and `noncentrality` (normal for df = inf).

    T' = (Z + λ)/W with W = √(V/df), V ~ χ²(df), so the probability is
    E_V[Φ(λ - c·W) + Φ(-λ - c·W)]: integrated over y = ln V, whose density
    exp(df·y/2 - e^y/2) / (2^(df/2) Γ(df/2)) is smooth and decays fast at both ends, so the
    trapezoid rule on an even grid converges fast.
    """
    if math.isinf(df):
        return _NORMAL.cdf(noncentrality - critical) + _NORMAL.cdf(-noncentrality - critical)
    spread = math.sqrt(2 / df)  # sd of ln V for large df
    centre = math.log(df)
    y = np.linspace(centre - max(80 / df, 14 * spread), centre + max(5.0, 14 * spread), 1201)
    log_density = df / 2 * y - np.exp(y) / 2 - df / 2 * math.log(2) - math.lgamma(df / 2)
    weights = np.exp(log_density)
    weights /= weights.sum()  # the grid's own normalisation, so the discretisation error cancels in part
    w = np.sqrt(np.exp(y) / df)
    phi = np.frompyfunc(_NORMAL.cdf, 1, 1)
    inside = phi(noncentrality - critical * w).astype(float) + phi(-noncentrality - critical * w).astype(float)
    return float(weights @ inside)


def detection_power(
    difference: float,
    seed_sd: float,
    sampling_sd_per_prompt: float,
    n_prompts: int,
    n_seeds: int,
    *,
    shared_sd: float = 0.0,
    confidence: float = 0.95,
) -> float:
    """Probability that the two-sided `confidence` interval of `paired_difference` excludes 0
    when the true difference is `difference`; the sds are the population's (see
    `minimum_detectable_difference`). Exact for the noncentral t with the interval's df."""
    _check_design(seed_sd, sampling_sd_per_prompt, shared_sd, n_prompts)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    se, df = _design_se_df(seed_sd, sampling_sd_per_prompt, shared_sd, n_prompts, n_seeds)
    return _rejection_probability(abs(difference) / se, df, t_quantile((1 + confidence) / 2, df))


def minimum_detectable_difference(
    seed_sd: float,
    sampling_sd_per_prompt: float,
    n_prompts: int,
    n_seeds: int,
    power: float = 0.8,
    confidence: float = 0.95,
    *,
    shared_sd: float = 0.0,
) -> float:
    """The smallest true difference that a paired study of `n_seeds` seeds and `n_prompts` prompts
    resolves (its two-sided `confidence` interval excludes 0) with probability `power`.

    With the sds of `paired_difference`'s model (all of the difference d_si = a_si - b_si, in its units):
    - `seed_sd`: sd over seeds of the difference due to training alone (as with infinitely many
      prompts); with independent arms each of seed sd σ, it is σ·√2;
    - `sampling_sd_per_prompt`: sd of one prompt's paired difference within one seed, new for
      every seed (about 0.5-0.7 for win/tie/loss verdicts);
    - `shared_sd`: sd of the prompts' own advantage for one arm, the same in every seed (default 0).

    se² = (seed_sd² + sampling_sd_per_prompt²/n)/k + shared_sd²/n, and the difference δ solves
    P(|T'| > t(1-α/2, ν)) = power for T' noncentral t with noncentrality δ/se and ν = k-1
    (Welch-Satterthwaite when `shared_sd` > 0; the normal for one seed, whose interval cannot see
    seed noise, so the one-seed answer assumes it is known). The familiar approximation
    δ ≈ (t(1-α/2, ν) + t(power, ν))·se is a lower bound; it gives only 77% power at k=3.
    """
    _check_design(seed_sd, sampling_sd_per_prompt, shared_sd, n_prompts)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if not 1 - confidence < power < 1:
        raise ValueError(f"power must lie in (1 - confidence, 1) = ({1 - confidence:g}, 1), got {power}")
    se, df = _design_se_df(seed_sd, sampling_sd_per_prompt, shared_sd, n_prompts, n_seeds)
    critical = t_quantile((1 + confidence) / 2, df)
    # The power rises with the noncentrality λ: bracket it, from the approximation above, and bisect.
    low, high = 0.0, critical + t_quantile(power, df)
    while _rejection_probability(high, df, critical) < power:
        low, high = high, 2 * high
    for _ in range(60):
        middle = (low + high) / 2
        if _rejection_probability(middle, df, critical) < power:
            low = middle
        else:
            high = middle
        if high - low <= 1e-10 * high:
            break
    return (low + high) / 2 * se


def seeds_needed(
    target: float,
    seed_sd: float,
    sampling_sd_per_prompt: float,
    n_prompts: int,
    power: float = 0.8,
    confidence: float = 0.95,
    *,
    shared_sd: float = 0.0,
) -> int:
    """The fewest seeds (at least 2, so that the interval covers seed noise) whose
    `minimum_detectable_difference` is at most `target`.

    Raises ValueError when no number of seeds reaches it: seeds do not average away the shared
    prompt noise, so the difference resolvable with n prompts never falls below
    (z(1-α/2) + z(power))·shared_sd/√n.
    """
    _check_design(seed_sd, sampling_sd_per_prompt, shared_sd, n_prompts)
    if not target > 0:
        raise ValueError(f"target must be positive, got {target}")
    if not 1 - confidence < power < 1:
        raise ValueError(f"power must lie in (1 - confidence, 1) = ({1 - confidence:g}, 1), got {power}")
    z = _NORMAL.inv_cdf((1 + confidence) / 2) + _NORMAL.inv_cdf(power)
    floor = z * shared_sd / math.sqrt(n_prompts)
    if target <= floor:
        raise ValueError(
            f"no number of seeds resolves {target:g}: with {n_prompts} prompts the shared prompt noise alone"
            f" limits the study to {floor:.4g}; add prompts"
        )
    # With normal quantiles k seeds resolve about z·√(per_seed/k + shared); t quantiles only need more
    # (one seed fewer allows for the tiny chance, left out of z, of an interval wholly on the wrong side).
    per_seed = seed_sd**2 + sampling_sd_per_prompt**2 / n_prompts
    seeds = max(2, math.ceil(per_seed / ((target / z) ** 2 - shared_sd**2 / n_prompts)) - 1)
    while (
        minimum_detectable_difference(
            seed_sd, sampling_sd_per_prompt, n_prompts, seeds, power, confidence, shared_sd=shared_sd
        )
        > target
    ):
        seeds += 1
    return seeds


# --------------------------------------------------------------------------- simulation


def simulate_arms(
    difference: float,
    n_seeds: int,
    n_prompts: int,
    *,
    seed_sd: float = 0.03,
    prompt_sd: float = 0.15,
    shared_sd: float = 0.05,
    tie_rate: float = 0.1,
    rng: np.random.Generator | int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Verdicts (1 win, 0.5 tie, 0 loss against a reference) of arms A and B, each [seeds, prompts],
    whose true mean difference over seeds and prompts is exactly `difference`.

    Arm A wins prompt i with seed s with probability
    q = 0.5 + difference/2 + μ_i + γ_i/2 + u_s (arm B: 0.5 - difference/2 + μ_i - γ_i/2 + u'_s):
    - μ_i, the prompt's difficulty, is shared by both arms (pairing removes it): uniform, sd `prompt_sd`;
    - γ_i, the prompt's own advantage for A, is shared by all seeds: uniform, sd `shared_sd`;
    - u_s, u'_s, each arm's seed effect, independent: normal with sd `seed_sd`, clipped at ±3 sd;
    - the verdict is a tie with probability `tie_rate`, else a win or loss, with mean q.
    All effects are symmetric about 0, so no clipping biases the truth. Raises ValueError when
    q could leave [tie_rate/2, 1 - tie_rate/2].
    """
    reach = 0.5 + abs(difference) / 2 + math.sqrt(3) * (prompt_sd + shared_sd / 2) + 3 * seed_sd
    if reach > 1 - tie_rate / 2:
        raise ValueError(
            f"win probabilities would reach {reach:.3f}, above 1 - tie_rate/2 = {1 - tie_rate / 2:.3f}:"
            " reduce the difference, the sds or the tie rate"
        )
    generator = np.random.default_rng(rng)
    half_width = math.sqrt(3)  # a uniform on [-√3, √3] has sd 1
    difficulty = generator.uniform(-half_width, half_width, n_prompts) * prompt_sd
    advantage = generator.uniform(-half_width, half_width, n_prompts) * shared_sd
    seed_effects = np.clip(generator.normal(0.0, 1.0, (2, n_seeds, 1)), -3, 3) * seed_sd
    win_a = 0.5 + difference / 2 + difficulty + advantage / 2 + seed_effects[0]
    win_b = 0.5 - difference / 2 + difficulty - advantage / 2 + seed_effects[1]

    def verdicts(q: np.ndarray) -> np.ndarray:
        u = generator.uniform(size=q.shape)
        return np.where(u < q - tie_rate / 2, 1.0, np.where(u < q + tie_rate / 2, 0.5, 0.0))

    return verdicts(win_a), verdicts(win_b)
