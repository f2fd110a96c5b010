"""Comparing SFT objectives by what matters after DPO: the grid, its results table, statistics and plots.

The `compare` flow (`flows/compare.py`) runs SFT → DPO → evaluate for every cell of a grid
(objective × SFT learning rate × seed); this module holds everything that is not composition:

- `plan_grid` validates every cell's configuration before any work starts;
- `result_row` turns one cell's stage metrics into a table row, with a 95% confidence
  interval for each win rate (`wald_interval`: win rate ± 1.96·se, clipped to [0, 1]);
- `aggregate_rows` averages the rows of the seeds of each (objective, learning rate) and
  puts a Student-t interval on the mean of the per-seed win rates (`t_interval`);
- `write_csv`, `markdown_table` and `bar_plot` write what users read.

Win rates are fractions in rows and CSV files (as in MLflow), percentages in markdown and plots.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on training machines

from post_train.config import ConfigError, PipelineConfig, load_config, validate_config
from post_train.results import ALL, splits_in

Z95 = 1.959964  # two-sided 95% normal quantile
DEFAULT_OBJECTIVES = ("nll", "dft", "fdiv:pearson_chi2")
LOWLR_FACTOR = 4  # arXiv 2507.00018's "lowlr": the baseline SFT learning rate divided by 4
DIAGNOSTIC_PREFIXES = (
    "native_kl_to_base/",
    "native_accuracy/",
    "retention/",
    "sft_gold_reward/",
    "dpo_gain/",
    "entropy/",
    "kl_to_base/",
)
"""Evaluate-stage metrics a row carries unchanged: what a study reads besides win rates and gold rewards."""
GRID_KEYS = ("sft.objective", "sft.objective_params", "sft.learning_rate", "sft.seed", "dpo.seed")
"""Config keys the grid sets per cell, on top of the recipe, the scale and the user's overrides."""

# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30; beyond, a Cornish-Fisher expansion.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.306, 2.2622, 2.2281,
    2.201, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.093, 2.086,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip

NAN = float("nan")


# --------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Cell:
    """One point of the grid: an SFT objective at an SFT learning rate with a seed (SFT and DPO)."""

    objective: str
    learning_rate: float
    seed: int
    arm: str = ""
    """A study's name for the cell's configuration (`post_train.study`); empty in a grid, where objective and
    learning rate name it."""

    @property
    def label(self) -> str:
        return self.arm or f"{self.objective} lr={self.learning_rate:g}"

    @property
    def name(self) -> str:
        return f"{self.label} seed={self.seed}"

    @property
    def slug(self) -> str:
        """A file-system-safe name, e.g. `fdiv-pearson_chi2-lr0.002-seed0`."""
        stem = self.arm or f"{self.objective}-lr{self.learning_rate:g}"
        return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{stem}-seed{self.seed}")


@dataclass(frozen=True)
class Grid:
    base: PipelineConfig
    """The recipe at the scale with the user's overrides: the shared stages (prepare, base model) run with it."""
    cells: list[tuple[Cell, PipelineConfig]]


def default_learning_rates(base: PipelineConfig) -> list[float]:
    """The recipe's SFT learning rate and a quarter of it: arXiv 2507.00018's baseline vs lowlr."""
    return [base.sft.learning_rate, base.sft.learning_rate / LOWLR_FACTOR]


def cell_config(cell: Cell, base: PipelineConfig) -> PipelineConfig:
    """`base` (recipe, scale and the user's overrides) with the cell's objective, SFT learning rate
    and seeds set, validated again; an invalid cell raises `ConfigError` naming the cell and field.

    `sft.objective_params` are kept for the cells whose objective is the base's; every other
    objective runs with its own default hyperparameters, so `--recipe chi2` (β = 1 for
    `fdiv:pearson_chi2`) can still be compared with `nll`. (This is why the cell is built from
    `base` rather than by `load_config` with more overrides: overrides merge into
    `objective_params`, they cannot empty it.)
    """
    data = base.model_dump(mode="json")
    data["sft"].update(
        objective=cell.objective,
        objective_params=data["sft"]["objective_params"] if cell.objective == base.sft.objective else {},
        learning_rate=cell.learning_rate,
        seed=cell.seed,
    )
    data["dpo"]["seed"] = data["joint"]["seed"] = cell.seed
    return validate_config(data, f"compare: invalid grid cell {cell.name} (recipe {base.recipe} at scale {base.scale})")


def _no_duplicates(name: str, values: Sequence[Any]) -> None:
    if not values:
        raise ConfigError(f"compare: {name} must list at least one value")
    seen = set()
    for value in values:
        if value in seen:
            raise ConfigError(f"compare: {name} lists {value!r} twice")
        seen.add(value)


def plan_grid(
    recipe: str,
    scale: str,
    objectives: Sequence[str],
    learning_rates: Sequence[float] | None,
    seeds: Sequence[int],
    overrides: dict[str, Any] | None = None,
    parallelism: int = 1,
) -> Grid:
    """Validate every cell's configuration, before any work; the first problem raises `ConfigError`.

    Cells come in the order objectives × learning rates × seeds. `learning_rates=None` means the
    base recipe's SFT learning rate and a quarter of it.
    """
    if parallelism < 1:
        raise ConfigError(f"compare: parallelism must be at least 1, got {parallelism}")
    base = load_config(recipe, scale, overrides)
    rates = default_learning_rates(base) if learning_rates is None else [float(rate) for rate in learning_rates]
    for name, values in (("objectives", list(objectives)), ("learning_rates", rates), ("seeds", list(seeds))):
        _no_duplicates(name, values)
    cells = []
    for objective in objectives:
        for rate in rates:
            for seed in seeds:
                cell = Cell(objective, rate, int(seed))
                cells.append((cell, cell_config(cell, base)))
    return Grid(base=base, cells=cells)


# --------------------------------------------------------------------------- statistics


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (two-sided 95%)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = Z95
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _clip(low: float, high: float) -> tuple[float, float]:
    if math.isnan(low) or math.isnan(high):
        return NAN, NAN
    return max(0.0, low), min(1.0, high)


def wald_interval(rate: float, se: float, z: float = Z95) -> tuple[float, float]:
    """95% interval `rate ± z·se` of a win rate, clipped to [0, 1]; NaN when `se` is (one prompt)."""
    return _clip(rate - z * se, rate + z * se)


@dataclass(frozen=True)
class SeedSummary:
    mean: float
    sd: float
    """Sample standard deviation over seeds (ddof=1); NaN for one seed."""
    se: float
    """Standard error of the mean over seeds, sd/√k."""
    low: float
    high: float
    n: int


def t_interval(values: Sequence[float]) -> SeedSummary:
    """Mean of per-seed win rates with a 95% Student-t interval, mean ± t(0.975, k-1)·sd/√k, clipped to [0, 1]."""
    k = len(values)
    if k == 0:
        raise ValueError("no values to summarise")
    mean = sum(values) / k
    if k == 1:
        return SeedSummary(mean, NAN, NAN, NAN, NAN, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1))
    se = sd / math.sqrt(k)
    half = t_quantile_975(k - 1) * se
    low, high = _clip(mean - half, mean + half)
    return SeedSummary(mean, sd, se, low, high, k)


# --------------------------------------------------------------------------- tables


def result_row(
    cell: Cell,
    evaluation: dict[str, float],
    sft: dict[str, float],
    dpo: dict[str, float],
    run_id: str | None = None,
    samples_path: str = "",
) -> dict[str, Any]:
    """One table row from a cell's evaluate, SFT and DPO metrics (as the stages return them); the evaluate
    stage's diagnostics (`DIAGNOSTIC_PREFIXES`) are copied as they are, and `samples_path` locates its
    per-prompt table for paired statistics."""
    row: dict[str, Any] = {
        "objective": cell.objective,
        "sft_learning_rate": cell.learning_rate,
        "seed": cell.seed,
        "arm": cell.label,
    }
    for split in splits_in(evaluation):
        rate = float(evaluation[f"win_rate/{split}"])
        se = float(evaluation.get(f"win_rate_se/{split}", NAN))
        low, high = wald_interval(rate, se)
        row[f"win_rate/{split}"] = rate
        row[f"win_rate_se/{split}"] = se
        row[f"win_rate_ci95_low/{split}"] = low
        row[f"win_rate_ci95_high/{split}"] = high
        row[f"gold_reward/{split}"] = float(evaluation.get(f"gold_reward/{split}", NAN))
    row.update({key: float(value) for key, value in evaluation.items() if key.startswith(DIAGNOSTIC_PREFIXES)})
    row["sft_kl_to_base"] = float(sft.get("kl_to_base_final", NAN))
    row["sft_entropy"] = float(sft.get("entropy_final", NAN))
    row["dpo_reward_accuracy"] = float(dpo.get("rewards/accuracies_final", NAN))
    if run_id is not None:
        row["mlflow_run_id"] = run_id
    if samples_path:
        row["samples_path"] = samples_path
    return row


def _groups(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """Rows by (objective, SFT learning rate), in order of first appearance."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["objective"], row["sft_learning_rate"]), []).append(row)
    return groups


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else NAN


def aggregate_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (objective, SFT learning rate): means over seeds, and for each split's win rate
    the sd over seeds, the standard error of the mean and a 95% Student-t interval (`t_interval`)."""
    splits = splits_in(key for row in rows for key in row)
    aggregated = []
    for (objective, rate), group in _groups(rows).items():
        row: dict[str, Any] = {
            "objective": objective,
            "sft_learning_rate": rate,
            "n_seeds": len(group),
            "seeds": " ".join(str(r["seed"]) for r in group),
        }
        for split in splits:
            summary = t_interval([r[f"win_rate/{split}"] for r in group])
            row[f"win_rate/{split}"] = summary.mean
            row[f"win_rate_sd/{split}"] = summary.sd
            row[f"win_rate_se/{split}"] = summary.se
            row[f"win_rate_ci95_low/{split}"] = summary.low
            row[f"win_rate_ci95_high/{split}"] = summary.high
            row[f"gold_reward/{split}"] = _mean([r[f"gold_reward/{split}"] for r in group])
        for key in ("sft_kl_to_base", "sft_entropy", "dpo_reward_accuracy"):
            row[key] = _mean([r[key] for r in group])
        for key in dict.fromkeys(k for r in group for k in r if k.startswith(DIAGNOSTIC_PREFIXES)):
            row[key] = _mean([r[key] for r in group if key in r])
        aggregated.append(row)
    return aggregated


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Rows as CSV, columns in first-seen order; win rates as fractions, full precision."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    with Path(path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def _number(value: float, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _percent_with_ci(row: dict[str, Any], split: str) -> str:
    rate = row[f"win_rate/{split}"]
    low, high = row[f"win_rate_ci95_low/{split}"], row[f"win_rate_ci95_high/{split}"]
    text = _number(100 * rate, 1)
    if not (math.isnan(low) or math.isnan(high)):
        text += f" [{100 * low:.1f}, {100 * high:.1f}]"
    return text


NATIVE_COLUMNS = (
    # header, row key: the demo world's diagnostics in the base's own format (tasks/evaluate.py)
    ("native KL to base (SFT, all)", "native_kl_to_base/sft/all"),
    ("retention held-out (DPO)", "retention/dpo/held_out"),
    ("DPO − SFT gold (all)", "dpo_gain/gold_reward/all"),
)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of per-cell rows (`result_row`) or of aggregated rows (`aggregate_rows`).

    Win rates in %, with the 95% interval in brackets.
    """
    if not rows:
        return ""
    splits = splits_in(key for row in rows for key in row)
    aggregated = "n_seeds" in rows[0]
    header = ["objective", "SFT lr", "seeds" if aggregated else "seed"]
    header += [f"win rate {split} % [95% CI]" for split in splits]
    header += [f"gold reward {split}" for split in splits]
    header += ["KL to base (SFT)", "entropy (SFT)", "DPO reward acc."]
    native = [column for column in NATIVE_COLUMNS if any(column[1] in row for row in rows)]
    header += [name for name, _ in native]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for row in rows:
        seeds = row["seeds"] if aggregated else row["seed"]
        cells = [f"`{row['objective']}`", f"{row['sft_learning_rate']:g}", str(seeds)]
        cells += [_percent_with_ci(row, split) for split in splits]
        cells += [_number(row[f"gold_reward/{split}"], 3) for split in splits]
        cells += [
            _number(row["sft_kl_to_base"], 4),
            _number(row["sft_entropy"], 3),
            _number(row["dpo_reward_accuracy"], 2),
        ]
        cells += [_number(row.get(key, NAN), 3) for _, key in native]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def bar_plot(
    rows: Sequence[dict[str, Any]],
    key: str,
    path: Path,
    title: str,
    ylabel: str,
    *,
    win_rate: bool = False,
) -> Path:
    """Bars per objective (x) and SFT learning rate (colour) of `key`, saved as a PNG.

    With one seed a bar is that cell's value; with several it is the mean over seeds and each
    seed is a dot. `win_rate=True` plots percentages with 95% error bars (the cell's
    `wald_interval` for one seed, the `t_interval` over seeds for several) and a 50% line.
    """
    import matplotlib.pyplot as plt  # ~0.4 s, which the command line's start does without

    groups = _groups(rows)
    objectives = list(dict.fromkeys(objective for objective, _ in groups))
    rates = list(dict.fromkeys(rate for _, rate in groups))
    scale = 100.0 if win_rate else 1.0
    width = 0.8 / len(rates)
    colors = plt.get_cmap("tab10").colors
    figure, axis = plt.subplots(figsize=(max(4.5, 1.5 + len(objectives) * (0.6 + 0.5 * len(rates))), 3.8))
    for index, rate in enumerate(rates):
        xs, heights, lower, upper = [], [], [], []
        for position, objective in enumerate(objectives):
            group = groups.get((objective, rate))
            if not group:
                continue
            values = [float(r[key]) for r in group]
            x = position - 0.4 + width * (index + 0.5)
            if len(group) == 1:
                mean = values[0]
                low, high = (
                    group[0].get(key.replace("win_rate/", "win_rate_ci95_low/"), NAN),
                    group[0].get(key.replace("win_rate/", "win_rate_ci95_high/"), NAN),
                )
            else:
                summary = t_interval(values)
                mean, low, high = summary.mean, summary.low, summary.high
                axis.scatter([x] * len(values), [scale * v for v in values], color="black", s=12, zorder=3)
            xs.append(x)
            heights.append(scale * mean)
            lower.append(0.0 if math.isnan(low) else scale * (mean - low))
            upper.append(0.0 if math.isnan(high) else scale * (high - mean))
        bars = {"yerr": [lower, upper], "capsize": 5} if win_rate else {}
        axis.bar(xs, heights, width=width * 0.95, color=colors[index % len(colors)], label=f"SFT lr {rate:g}", **bars)
    if win_rate:
        axis.axhline(50, color="gray", linestyle="--", linewidth=1)
        axis.set_ylim(0, 100)
    axis.set_xticks(range(len(objectives)), objectives)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


PLOTS = {
    # file name: (row key, title, y label, is a win rate)
    "win_rate.png": (f"win_rate/{ALL}", "Post-DPO win rate vs reference (all prompts)", "win rate (%)  ±95% CI", True),
    "kl_to_base.png": ("sft_kl_to_base", "KL to the base model after SFT", "token KL to base (nats)", False),
    "entropy.png": ("sft_entropy", "Entropy after SFT", "token entropy (nats)", False),
}


def write_plots(rows: Sequence[dict[str, Any]], directory: Path) -> dict[str, Path]:
    """The three comparison plots (`PLOTS`) of per-cell rows, into `directory`."""
    seeds = len({row["seed"] for row in rows})
    suffix = f" (mean of {seeds} seeds)" if seeds > 1 else ""
    return {
        name: bar_plot(rows, key, Path(directory) / name, title + suffix, ylabel, win_rate=is_win_rate)
        for name, (key, title, ylabel, is_win_rate) in PLOTS.items()
    }
