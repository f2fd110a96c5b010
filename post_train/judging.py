"""Candidates judged against baselines: what the evaluate and head-to-head stages share.

Generation with the recipe's settings, the per-split win-rate metrics of a judge's verdicts, the
samples table users read in MLflow, and the win-rate plot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import mlflow

from post_train.config import PipelineConfig
from post_train.data import EvalExample, prompt_text
from post_train.evaluation import split_metrics
from post_train.generators import generator
from post_train.generators.base import GenerationSettings
from post_train.judges.base import Verdict
from post_train.results import splits_in


def generation_settings(config: PipelineConfig) -> GenerationSettings:
    settings = config.evaluation
    return GenerationSettings(
        settings.max_new_tokens, settings.temperature, settings.top_p, settings.batch_size, settings.seed
    )


def generate_for(
    config: PipelineConfig, model_path: str, tokenizer, examples: list[EvalExample], model=None
) -> list[str]:
    """The model's responses to every evaluation prompt, with the recipe's generator and sampling settings (`model`:
    what the generator's `model(model_path)` gave, when the caller holds it)."""
    return generator(config.evaluation.backend).generate(
        model_path, tokenizer, [e.prompt for e in examples], generation_settings(config), model
    )


def judged_metrics(
    config: PipelineConfig,
    examples: list[EvalExample],
    verdicts: list[Verdict],
    candidates: list[str],
    baselines: list[str],
) -> dict[str, float]:
    settings = config.evaluation
    return split_metrics(
        [e.split for e in examples],
        [v.preference for v in verdicts],
        candidates,
        baselines,
        settings.bootstrap_samples,
        settings.confidence,
        settings.seed,
    )


def verdict_label(p: float, labels: tuple[str, str]) -> str:
    """The label of the output the judge prefers (candidate's first), or `draw`."""
    return labels[0] if p > 0.5 else labels[1] if p < 0.5 else "draw"


def samples_table(
    examples: list[EvalExample],
    candidates: list[str],
    baselines: list[str],
    verdicts: list[Verdict],
    labels: tuple[str, str] = ("response", "reference"),
) -> list[dict[str, Any]]:
    """One row per prompt: the whole prompt (every message of a conversation, as `role: content`), both outputs,
    the judge's preference and verdict, and how it decided.

    `labels` name the candidate's and the baseline's columns (the head-to-head: challenger, champion).
    """
    candidate, baseline = labels
    rows = []
    for example, candidate_output, baseline_output, verdict in zip(examples, candidates, baselines, verdicts):
        rows.append(
            {
                "split": example.split,
                "prompt": prompt_text(example.prompt),
                candidate: candidate_output,
                baseline: baseline_output,
                "preference": verdict.preference,
                "verdict": verdict_label(verdict.preference, labels),
                "judge_source": verdict.source,
                f"{candidate}_score": verdict.candidate_score,
                f"{baseline}_score": verdict.baseline_score,
                f"{candidate}_shown_first": verdict.candidate_shown_first,
                f"{candidate}_length": len(candidate_output),
                f"{baseline}_length": len(baseline_output),
            }
        )
    return rows


def log_samples(rows: list[dict[str, Any]], name: str, output_dir: str | None) -> None:
    table = {key: [row[key] for row in rows] for key in rows[0]}
    mlflow.log_table(table, artifact_file=name)
    if output_dir is not None:
        Path(output_dir, name).write_text(json.dumps(table, indent=1))


def plot_win_rates(metrics: dict[str, float], title: str, name: str = "win_rates.png", prefix: str = "") -> None:
    """Raw win rate with its bootstrap CI and the LC win rate, per split, as percentages."""
    splits = splits_in({key.removeprefix(prefix): value for key, value in metrics.items() if key.startswith(prefix)})
    figure, axis = plt.subplots(figsize=(2.0 * len(splits) + 2.5, 4.0))
    positions = range(len(splits))
    rates = [100 * metrics[f"{prefix}win_rate/{s}"] for s in splits]
    lower = [max(0.0, rate - 100 * metrics[f"{prefix}win_rate_ci_low/{s}"]) for rate, s in zip(rates, splits)]
    upper = [max(0.0, 100 * metrics[f"{prefix}win_rate_ci_high/{s}"] - rate) for rate, s in zip(rates, splits)]
    axis.bar(
        [p - 0.2 for p in positions],
        rates,
        width=0.4,
        yerr=[lower, upper],
        capsize=6,
        color="tab:blue",
        label="win rate (bootstrap CI)",
    )
    axis.bar(
        [p + 0.2 for p in positions],
        [100 * metrics[f"{prefix}lc_win_rate/{s}"] for s in splits],
        width=0.4,
        color="tab:orange",
        label="length-controlled",
    )
    axis.set_xticks(list(positions), splits)
    axis.axhline(50, color="gray", linestyle="--", linewidth=1)
    axis.set_ylim(0, 100)
    axis.set_ylabel("win rate (%)")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    figure.tight_layout()
    mlflow.log_figure(figure, name)
    plt.close(figure)
