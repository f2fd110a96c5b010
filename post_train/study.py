"""Studies: named arms (a recipe with overrides) × seeds, each SFT → the same DPO → evaluate, against a baseline.

A study file (`studies/<name>.yaml`) lists the arms, the seeds and the papers' claims, each claim a
comparison of one arm with the baseline on one metric and split with the direction the paper
predicts. This module plans the cells (validated before any work) and turns the finished cells into
the report: per-arm tables, paired differences against the baseline (`post_train.paired`), a verdict
per claim and the plots. `flows/study.py` composes the stages.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt
import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from post_train.comparison import Cell, t_quantile_975
from post_train.config import REPO_ROOT, ConfigError, PipelineConfig, load_config, validate_config
from post_train.paired import PairedEstimate, minimum_detectable_difference, paired_difference
from post_train.provenance import cpu_model, git_commit, library_versions
from post_train.results import ALL, HEAD_TO_HEAD

STUDIES_DIR = REPO_ROOT / "studies"
PER_PROMPT = {"gold_reward": "gold_reward", "win_rate": "preference"}
"""Metrics known per evaluation prompt (sample-table column): compared by the paired bootstrap over prompts."""
SPLITS = ("in_distribution", "held_out", ALL)
WIN_RATE_BAND = (0.10, 0.90)
"""Issue #11's resolvability check: a post-DPO win rate outside this band leaves no room to show a difference."""
POINTS = 100.0


class StudyError(ConfigError):
    """A study file that is missing or invalid, or whose arms cannot share a base model."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Arm(_Strict):
    recipe: str
    overrides: dict[str, Any] = {}
    label: str = Field(default="", description="How tables name the arm; default: its key.")


class Claim(_Strict):
    paper: str = Field(description="Where the claim comes from, e.g. 'arXiv 2507.00018'.")
    statement: str
    arm: str
    metric: str = Field(
        description="gold_reward or win_rate (per prompt, after DPO), or a per-cell metric of the evaluate stage "
        "without its split, e.g. native_kl_to_base/sft or entropy/sft."
    )
    split: str = ALL
    direction: Literal["higher", "lower"]


class Comparison(_Strict):
    arm: str
    against: str = Field(description="Another arm: the report gives arm − against, paired as arm − baseline is.")


class StudySpec(_Strict):
    description: str
    scale: str = "demo"
    seeds: list[int] = Field(min_length=1)
    parallelism: int = Field(default=1, ge=1)
    baseline: str
    arms: dict[str, Arm] = Field(min_length=2)
    claims: list[Claim] = []
    head_to_head: list[str] = Field(
        default=[], description="Arms whose final models meet the baseline's head to head, seed by seed."
    )
    comparisons: list[Comparison] = Field(
        default=[], description="Pairs of arms compared besides each arm with the baseline (e.g. klbudget − lowlr)."
    )

    @model_validator(mode="after")
    def _names_exist(self) -> StudySpec:
        if self.baseline not in self.arms:
            raise ValueError(f"baseline {self.baseline!r} is not an arm; arms: {', '.join(self.arms)}")
        for arm in self.head_to_head:
            if arm not in self.arms or arm == self.baseline:
                raise ValueError(f"head_to_head arm {arm!r} must be an arm other than the baseline")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}")
        for index, claim in enumerate(self.claims):
            if claim.arm not in self.arms or claim.arm == self.baseline:
                raise ValueError(f"claims[{index}].arm {claim.arm!r} must be an arm other than the baseline")
            if claim.split not in SPLITS:
                raise ValueError(f"claims[{index}].split {claim.split!r}: expected one of {', '.join(SPLITS)}")
        for index, comparison in enumerate(self.comparisons):
            if {comparison.arm, comparison.against} - set(self.arms) or comparison.arm == comparison.against:
                raise ValueError(
                    f"comparisons[{index}]: {comparison.arm!r} − {comparison.against!r} must name two different arms"
                )
        return self

    def label(self, arm: str) -> str:
        return self.arms[arm].label or arm


def study_name(name: str) -> str:
    """A study's name for folders and runs: `papers` for `papers` and for `path/to/papers.yaml`."""
    return Path(name).stem


def available_studies() -> list[str]:
    return sorted(path.stem for path in STUDIES_DIR.glob("*.yaml"))


def load_study(name: str) -> StudySpec:
    """`studies/<name>.yaml` (or a path to a YAML file), validated; StudyError names the file and field."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else STUDIES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise StudyError(f"no study {name!r}: expected {path} (studies: {', '.join(available_studies())})")
    try:
        return StudySpec.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, p['loc'])) or '(top level)'}: {p['msg']}" for p in error.errors())
        raise StudyError(f"{path}: {problems}") from None
    except yaml.YAMLError as error:
        raise StudyError(f"{path}: not YAML: {error}") from None


@dataclass(frozen=True)
class StudyPlan:
    spec: StudySpec
    base: PipelineConfig
    """The baseline arm's configuration without the cells' thread count: the shared stages (prepare, base model)
    run with it."""
    cells: list[tuple[Cell, PipelineConfig]]
    threads: int
    """CPU threads of each stage process: the machine's cores divided by the cells run at once."""


def cell_threads(parallelism: int, cores: int | None = None) -> int:
    """Cores ÷ parallelism (at least 1), so cells running side by side do not oversubscribe the CPU."""
    return max(1, (cores or os.cpu_count() or 1) // parallelism)


def plan_study(spec: StudySpec, overrides: dict[str, Any] | None = None) -> StudyPlan:
    """Every cell's configuration, validated before any work; StudyError when arms would need different base
    models or data (they must share the pretrained base for the comparison to be paired)."""
    threads = cell_threads(spec.parallelism)
    configs: dict[str, PipelineConfig] = {}
    for name, arm in spec.arms.items():
        merged = {**arm.overrides, **(overrides or {})}
        merged.setdefault("compute.torch_threads", threads)
        configs[name] = load_config(arm.recipe, spec.scale, merged)
    baseline = spec.arms[spec.baseline]
    # The shared stages run alone, on every core the user allows.
    base = load_config(baseline.recipe, spec.scale, {**baseline.overrides, **(overrides or {})})
    for name, config in configs.items():
        for section in ("data", "base_model"):
            if getattr(config, section) != getattr(base, section):
                raise StudyError(
                    f"study arm {name!r} changes `{section}` from the baseline's: every arm must share the data and "
                    "the pretrained base model, so the arms are compared on the same prompts from the same start"
                )
    cells = []
    for name, config in configs.items():
        for seed in spec.seeds:
            cell = Cell(config.sft.objective, config.sft.learning_rate, seed, arm=name)
            data = config.model_dump(mode="json")
            data["sft"]["seed"] = data["dpo"]["seed"] = data["joint"]["seed"] = seed
            cells.append((cell, validate_config(data, f"study: invalid cell {cell.name}")))
    return StudyPlan(spec, base, cells, threads)


def head_to_head_pairs(spec: StudySpec, rows: Sequence[dict[str, Any]]) -> list[tuple[str, int, str, str]]:
    """(arm, seed, the arm's final model, the baseline's final model at that seed) for every `head_to_head` arm."""
    models = {(row["arm"], row["seed"]): row["model_path"] for row in rows}
    return [
        (arm, seed, models[(arm, seed)], models[(spec.baseline, seed)])
        for arm in spec.head_to_head
        for seed in spec.seeds
    ]


# --------------------------------------------------------------------------- reading the cells


def load_samples(path: str | Path) -> dict[str, list[Any]]:
    """An evaluate stage's `eval_samples.json`: one list per column, one entry per prompt."""
    return json.loads(Path(path).read_text())


def per_prompt(rows: Sequence[dict[str, Any]], arm: str, seeds: Sequence[int], column: str, split: str) -> np.ndarray:
    """[seeds, prompts] of `column` for `arm`'s cells (in `seeds` order), the prompts of `split` only."""
    by_seed = {row["seed"]: row for row in rows if row["arm"] == arm}
    matrix = []
    for seed in seeds:
        samples = load_samples(by_seed[seed]["samples_path"])
        keep = [split == ALL or s == split for s in samples["split"]]
        matrix.append([float(v) for v, k in zip(samples[column], keep) if k])
    return np.asarray(matrix, dtype=np.float64)


def per_seed(rows: Sequence[dict[str, Any]], arm: str, seeds: Sequence[int], key: str) -> np.ndarray:
    by_seed = {row["seed"]: row for row in rows if row["arm"] == arm}
    return np.asarray([float(by_seed[seed].get(key, math.nan)) for seed in seeds], dtype=np.float64)


@dataclass(frozen=True)
class SeedDifference:
    """A per-cell metric's difference with the baseline, paired by seed: mean ± t(0.975, k-1)·sd/√k."""

    difference: float
    low: float
    high: float
    n_seeds: int


def seed_difference(arm: np.ndarray, baseline: np.ndarray) -> SeedDifference:
    differences = arm - baseline
    differences = differences[~np.isnan(differences)]
    k = differences.size
    if k == 0:
        return SeedDifference(math.nan, math.nan, math.nan, 0)
    mean = float(differences.mean())
    if k == 1:
        return SeedDifference(mean, math.nan, math.nan, 1)
    half = t_quantile_975(k - 1) * float(differences.std(ddof=1)) / math.sqrt(k)
    return SeedDifference(mean, mean - half, mean + half, k)


Estimate = PairedEstimate | SeedDifference


def compare_with_baseline(
    spec: StudySpec, rows: Sequence[dict[str, Any]], metric: str, split: str, arm: str, against: str | None = None
) -> Estimate:
    """`arm` − `against` (default: the baseline) on `metric` in `split`: paired over prompts and seeds for per-prompt
    metrics (in points), paired by seed for per-cell metrics (in the metric's unit)."""
    against = against or spec.baseline
    if metric in PER_PROMPT:
        column = PER_PROMPT[metric]
        a = per_prompt(rows, arm, spec.seeds, column, split) * POINTS
        b = per_prompt(rows, against, spec.seeds, column, split) * POINTS
        return paired_difference(a, b)
    key = f"{metric}/{split}"
    if not any(key in row for row in rows):  # a metric measured once per model, not per split (entropy/sft)
        key = metric
    return seed_difference(per_seed(rows, arm, spec.seeds, key), per_seed(rows, against, spec.seeds, key))


def verdict(claim: Claim, estimate: Estimate) -> str:
    """`reproduced` when the 95% interval excludes 0 on the paper's side, `contradicted` on the other side,
    `not resolved` when it contains 0 (or cannot be computed)."""
    if any(math.isnan(v) for v in (estimate.low, estimate.high)):
        return "not resolved"
    sign = 1 if claim.direction == "higher" else -1
    if sign * estimate.low > 0 and sign * estimate.high > 0:
        return "reproduced"
    if sign * estimate.low < 0 and sign * estimate.high < 0:
        return "contradicted"
    return "not resolved"


# --------------------------------------------------------------------------- the report


def _arm_mean(rows: Sequence[dict[str, Any]], arm: str, key: str) -> float:
    values = [float(row[key]) for row in rows if row["arm"] == arm and key in row]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _cell(value: float, digits: int = 1, scale: float = 1.0) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{scale * value:.{digits}f}"


def _interval(estimate: Estimate, digits: int = 1) -> str:
    text = f"{estimate.difference:+.{digits}f}"
    if not (math.isnan(estimate.low) or math.isnan(estimate.high)):
        text += f" [{estimate.low:+.{digits}f}, {estimate.high:+.{digits}f}]"
    return text


ARM_COLUMNS = (
    # header, row key, digits, scale
    ("win rate in-dist. %", "win_rate/in_distribution", 1, POINTS),
    ("win rate held-out %", "win_rate/held_out", 1, POINTS),
    ("gold in-dist. %", "gold_reward/in_distribution", 1, POINTS),
    ("gold held-out %", "gold_reward/held_out", 1, POINTS),
    ("SFT gold all %", "sft_gold_reward/all", 1, POINTS),
    ("DPO − SFT gold, points", "dpo_gain/gold_reward/all", 1, POINTS),
    ("native KL SFT in-dist.", "native_kl_to_base/sft/in_distribution", 3, 1.0),
    ("native KL SFT held-out", "native_kl_to_base/sft/held_out", 3, 1.0),
    ("retention held-out (DPO)", "retention/dpo/held_out", 2, 1.0),
    ("entropy SFT", "entropy/sft", 3, 1.0),
)


def arms_table(spec: StudySpec, rows: Sequence[dict[str, Any]]) -> str:
    header = ["arm", "objective", "SFT lr", *(column[0] for column in ARM_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---:|" + "---:|" * len(ARM_COLUMNS)]
    for arm in spec.arms:
        first = next(row for row in rows if row["arm"] == arm)
        cells = [spec.label(arm), f"`{first['objective']}`", f"{first['sft_learning_rate']:g}"]
        cells += [_cell(_arm_mean(rows, arm, key), digits, scale) for _, key, digits, scale in ARM_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def differences_table(spec: StudySpec, rows: Sequence[dict[str, Any]], metric: str) -> str:
    header = ["arm − baseline", *(f"{split}" for split in SPLITS)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(SPLITS)]
    for arm in spec.arms:
        if arm == spec.baseline:
            continue
        cells = [spec.label(arm)]
        cells += [_interval(compare_with_baseline(spec, rows, metric, split, arm)) for split in SPLITS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparisons_table(spec: StudySpec, rows: Sequence[dict[str, Any]]) -> str:
    """The study's `comparisons`, arm − against, on gold reward and win rate per split, and the native KL of the SFT
    models (all splits)."""
    columns = [("gold_reward", split) for split in SPLITS] + [("win_rate", split) for split in SPLITS]
    header = ["arm − against", *(f"{metric} {split}" for metric, split in columns), "native KL SFT"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(columns) + 1)]
    for comparison in spec.comparisons:
        arm, against = comparison.arm, comparison.against
        cells = [f"{spec.label(arm)} − {spec.label(against)}"]
        for metric, split in columns:
            cells.append(_interval(compare_with_baseline(spec, rows, metric, split, arm, against)))
        kl = compare_with_baseline(spec, rows, "native_kl_to_base/sft", ALL, arm, against)
        cells.append(_interval(kl, digits=3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def head_to_head_table(spec: StudySpec, meetings: Sequence[dict[str, Any]]) -> str:
    """Per `head_to_head` arm and split: its final models' win rate against the baseline's, seed by seed, as the
    mean over seeds with a t-interval (points above 50%: positive means the arm's models win)."""
    if not meetings:
        return ""
    header = ["arm vs baseline, win rate − 50 (points)", *SPLITS]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(SPLITS)]
    for arm in spec.head_to_head:
        cells = [spec.label(arm)]
        for split in SPLITS:
            rates = np.asarray([m[f"{HEAD_TO_HEAD}win_rate/{split}"] for m in meetings if m["arm"] == arm])
            cells.append(_interval(seed_difference(POINTS * rates, np.full(rates.shape, POINTS / 2))))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def resolvable(spec: StudySpec, rows: Sequence[dict[str, Any]]) -> list[str]:
    """The cells whose post-DPO win rate on some split is outside `WIN_RATE_BAND`."""
    low, high = WIN_RATE_BAND
    outside = []
    for row in rows:
        for split in SPLITS:
            rate = row.get(f"win_rate/{split}", math.nan)
            if not low < rate < high:
                outside.append(f"{spec.label(row['arm'])} seed {row['seed']} {split}: {POINTS * rate:.1f}%")
    return outside


def power_line(spec: StudySpec, rows: Sequence[dict[str, Any]]) -> str:
    """The smallest gold-reward difference (points, all prompts) this study resolves with 80% power, from its
    own baseline arm: the seed-to-seed sd of the per-seed means and the per-prompt sd of paired differences."""
    gold = per_prompt(rows, spec.baseline, spec.seeds, PER_PROMPT["gold_reward"], ALL) * POINTS
    others = [arm for arm in spec.arms if arm != spec.baseline]
    paired = per_prompt(rows, others[0], spec.seeds, PER_PROMPT["gold_reward"], ALL) * POINTS - gold
    seed_sd = float(gold.mean(axis=1).std(ddof=1)) if len(spec.seeds) > 1 else math.nan
    prompt_sd = float(paired.std(axis=1, ddof=1).mean())
    if not (math.isfinite(seed_sd) and math.isfinite(prompt_sd)) or seed_sd == prompt_sd == 0:
        return (
            f"Not computable from this run: the baseline's gold reward has seed sd {seed_sd:.1f} and paired "
            f"per-prompt sd {prompt_sd:.1f} points over {len(spec.seeds)} seeds (two seeds and some variation needed)."
        )
    detectable = minimum_detectable_difference(seed_sd, prompt_sd, gold.shape[1], len(spec.seeds))
    return (
        f"Baseline seed-to-seed sd of the gold reward {seed_sd:.1f} points; per-prompt sd of a paired difference "
        f"{prompt_sd:.1f} points ({spec.label(others[0])} − baseline); with {len(spec.seeds)} seeds and "
        f"{gold.shape[1]} prompts the smallest difference resolved with 80% power at 95% is "
        f"**{detectable:.1f} points**."
    )


def claims_section(spec: StudySpec, rows: Sequence[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    lines, found = [], []
    for claim in spec.claims:
        estimate = compare_with_baseline(spec, rows, claim.metric, claim.split, claim.arm)
        result = verdict(claim, estimate)
        unit = "points" if claim.metric in PER_PROMPT else "(metric units)"
        digits = 1 if claim.metric in PER_PROMPT else 3
        lines.append(
            f"- **{claim.paper}** — {claim.statement} Measured: `{claim.metric}` on `{claim.split}`, "
            f"{spec.label(claim.arm)} − {spec.label(spec.baseline)} = {_interval(estimate, digits)} {unit} "
            f"(95% CI; predicted {claim.direction}): **{result}**."
        )
        found.append(
            {
                "paper": claim.paper,
                "statement": claim.statement,
                "arm": claim.arm,
                "metric": claim.metric,
                "split": claim.split,
                "direction": claim.direction,
                "difference": estimate.difference,
                "low": estimate.low,
                "high": estimate.high,
                "verdict": result,
            }
        )
    return "\n".join(lines) + "\n", found


def plot_arms(spec: StudySpec, rows: Sequence[dict[str, Any]], key: str, path: Path, title: str, ylabel: str) -> Path:
    """One panel per split: a bar per arm (mean over seeds), a dot per seed."""
    figure, axes = plt.subplots(1, len(SPLITS), figsize=(4.2 * len(SPLITS), 3.8), sharey=True, squeeze=False)
    arms = list(spec.arms)
    for axis, split in zip(axes[0], SPLITS):
        means = [POINTS * _arm_mean(rows, arm, f"{key}/{split}") for arm in arms]
        axis.bar(range(len(arms)), means, color="tab:blue", alpha=0.7)
        for index, arm in enumerate(arms):
            values = [POINTS * float(r[f"{key}/{split}"]) for r in rows if r["arm"] == arm]
            axis.scatter([index] * len(values), values, color="black", s=10, zorder=3)
        axis.set_xticks(range(len(arms)), [spec.label(arm) for arm in arms], rotation=35, ha="right", fontsize=8)
        axis.set_title(split, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_differences(spec: StudySpec, rows: Sequence[dict[str, Any]], metric: str, path: Path, title: str) -> Path:
    """A forest plot per split: each arm's paired difference with the baseline and its 95% interval."""
    arms = [arm for arm in spec.arms if arm != spec.baseline]
    figure, axes = plt.subplots(1, len(SPLITS), figsize=(4.2 * len(SPLITS), 0.5 * len(arms) + 1.8), squeeze=False)
    for axis, split in zip(axes[0], SPLITS):
        for index, arm in enumerate(arms):
            estimate = compare_with_baseline(spec, rows, metric, split, arm)
            low, high = estimate.low, estimate.high
            if not (math.isnan(low) or math.isnan(high)):
                axis.plot([low, high], [index, index], color="tab:blue", linewidth=2)
            axis.plot([estimate.difference], [index], "o", color="tab:blue")
        axis.axvline(0, color="gray", linestyle="--", linewidth=1)
        axis.set_yticks(range(len(arms)), [spec.label(arm) for arm in arms], fontsize=8)
        axis.invert_yaxis()
        axis.set_title(split, fontsize=10)
        axis.set_xlabel("points vs baseline")
        axis.grid(axis="x", alpha=0.3)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_dose_response(spec: StudySpec, rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """The `nll` arms against their SFT learning rate: post-DPO gold reward per split and native KL after SFT."""
    arms = [arm for arm in spec.arms if next(r for r in rows if r["arm"] == arm)["objective"] == "nll"]
    if len(arms) < 2:
        return None
    rates = [next(r for r in rows if r["arm"] == arm)["sft_learning_rate"] for arm in arms]
    order = np.argsort(rates)
    figure, (gold_axis, kl_axis) = plt.subplots(1, 2, figsize=(9, 3.8))
    for split in SPLITS:
        values = [POINTS * _arm_mean(rows, arms[i], f"gold_reward/{split}") for i in order]
        gold_axis.plot([rates[i] for i in order], values, marker="o", label=split)
    for split in ("in_distribution", "held_out"):
        values = [_arm_mean(rows, arms[i], f"native_kl_to_base/sft/{split}") for i in order]
        kl_axis.plot([rates[i] for i in order], values, marker="o", label=split)
    for axis, label in ((gold_axis, "post-DPO gold reward (%)"), (kl_axis, "native-format KL to base after SFT")):
        axis.set_xscale("log")
        axis.set_xlabel("SFT learning rate")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle("nll: SFT learning-rate dose-response (mean over seeds)", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_report(
    spec: StudySpec,
    name: str,
    rows: Sequence[dict[str, Any]],
    meetings: Sequence[dict[str, Any]],
    out_dir: Path,
    environment: dict[str, Any],
    command: str,
    wall_seconds: float,
) -> dict[str, Path]:
    """`results.md`, `claims.json` and the PNGs into `out_dir`; returns the files written. `meetings` are the
    head-to-head metrics of the `head_to_head` arms, one dict per (arm, seed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "win_rates": plot_arms(
            spec, rows, "win_rate", out_dir / "win_rates.png", "Post-DPO win rate vs reference", "win rate (%)"
        ),
        "gold_reward": plot_arms(
            spec, rows, "gold_reward", out_dir / "gold_reward.png", "Post-DPO gold reward", "gold reward (%)"
        ),
        "gold_differences": plot_differences(
            spec, rows, "gold_reward", out_dir / "gold_differences.png", "Gold reward: arm − baseline, 95% CI"
        ),
        "win_rate_differences": plot_differences(
            spec, rows, "win_rate", out_dir / "win_rate_differences.png", "Win rate: arm − baseline, 95% CI"
        ),
    }
    dose = plot_dose_response(spec, rows, out_dir / "lr_dose_response.png")
    if dose is not None:
        figures["lr_dose_response"] = dose
    claims_text, claims = claims_section(spec, rows)
    outside = resolvable(spec, rows)
    band = f"{POINTS * WIN_RATE_BAND[0]:.0f}–{POINTS * WIN_RATE_BAND[1]:.0f}%"
    resolvability = (
        f"Every cell's post-DPO win rate is inside {band} on every split."
        if not outside
        else f"{len(outside)} cell/split win rates fall outside {band}: " + "; ".join(outside[:12])
    )
    versions = ", ".join(f"{k} {v}" for k, v in environment["versions"].items())
    dose_text = "" if dose is None else "\n![lr dose-response](lr_dose_response.png)\n"
    comparisons_text = ""
    if spec.comparisons:
        comparisons_text = "## Other comparisons (gold and win rate in points, native KL in nats; 95% CI)\n\n"
        comparisons_text += comparisons_table(spec, rows) + "\n"
    meetings_text = ""
    if meetings:
        meetings_text = "## Head to head: the final models against the baseline's, seed by seed\n\n"
        meetings_text += head_to_head_table(spec, meetings) + "\n"
    text = f"""# Study `{name}`: the papers' claims on the demo world

{spec.description.strip()}

Written by `{command}` on {environment["date"]}: {environment["machine"]}, {environment["threads"]} CPU threads per
stage process ({spec.parallelism} cells at once), {versions}, commit {environment["commit"]}; wall time
{wall_seconds / 60:.0f} min. Scale `{spec.scale}`, seeds {" ".join(map(str, spec.seeds))} (SFT and DPO), the same
pretrained base and the same DPO for every arm. The same command on the same machine and thread count gives the
same numbers.

## How to read it

Win rate: the post-DPO model against the demonstrator's reference response, judged by the gold reward
(`evaluation.md`); gold reward: the exact task reward of the model's sampled response (the primary outcome).
Differences are paired: the same prompts and seeds in both arms, the per-seed mean difference over prompts,
combined over seeds with an interval that covers both prompt sampling and seed-to-seed training noise
(`post_train/paired.py`). Native KL: the token KL to the base model on the base's own terse format, on the answer
positions of the evaluation tasks (where the base is competent); retention: the model's exact-match accuracy in
that format over the base's. `in_distribution`: the families SFT and DPO train on; `held_out`: families seen in
pretraining only.

{resolvability}

## Arms (means over seeds)

{arms_table(spec, rows)}
![win rates](win_rates.png)

![gold reward](gold_reward.png)

## Gold reward after DPO, arm − baseline (points, 95% CI)

{differences_table(spec, rows, "gold_reward")}
![gold differences](gold_differences.png)

## Win rate after DPO, arm − baseline (points, 95% CI)

{differences_table(spec, rows, "win_rate")}
![win-rate differences](win_rate_differences.png)
{dose_text}
{comparisons_text}{meetings_text}
## The claims

{claims_text}
`reproduced`: the interval excludes 0 on the paper's side; `contradicted`: on the other side; `not resolved`:
it contains 0, so this study cannot tell (see the power line below).

## Power

{power_line(spec, rows)}
"""
    files = {name: path for name, path in figures.items()}
    files["markdown"] = out_dir / "results.md"
    files["markdown"].write_text(text)
    files["claims"] = out_dir / "claims.json"
    files["claims"].write_text(json.dumps(claims, indent=2))
    return files


def environment_record(threads: int) -> dict[str, Any]:
    """Date, machine, threads per stage process, library versions and commit, as the report states them."""
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "threads": threads,
        "versions": library_versions(),
        "commit": git_commit(short=True, mark_dirty=True),
    }
