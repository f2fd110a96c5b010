"""From the runs of one benchmark invocation to its JSON and markdown: medians, ranges and ratios.

Ratios are taken between medians of the same invocation (same machine, same load), never
across files: `vs TRL best` divides by the TRL variant of the same task and model with the
highest median tokens/s (memory: that same variant's median peak), `vs reference` by the
variant named in `relative_to` (each SFT objective against `nll`, batched generation against
one prompt at a time).
"""

from __future__ import annotations

import statistics
from typing import Any

GIB = 2**30

METRICS = (
    "tokens_per_second",
    "peak_memory_bytes",
    "wall_seconds",
    "rss_after_imports_bytes",
    "prompts_per_second",
    "mfu",
)


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def model_flops(run: dict[str, Any], model: dict[str, Any]) -> float:
    """Training FLOPs of the measured window (PaLM, arXiv 2204.02311 app. B): 6·N per token for the matmuls
    (forward and backward) plus 12·L·d·s per token of a sequence of length s for attention."""
    dense = 6 * model["matmul_parameters"] * run["measured_tokens"]
    attention = 12 * model["num_layers"] * model["hidden_size"] * run["measured_squared_lengths"]
    return float(dense + attention)


def with_mfu(run: dict[str, Any], model: dict[str, Any], peak_tflops: float | None) -> dict[str, Any]:
    if peak_tflops is None or "measured_squared_lengths" not in run:
        return run
    achieved = model_flops(run, model) / run["measured_seconds"]
    return {**run, "model_tflops_per_second": achieved / 1e12, "mfu": achieved / (peak_tflops * 1e12)}


def _median(variant: dict[str, Any], metric: str) -> float | None:
    stats = variant["stats"].get(metric)
    return None if stats is None else stats["median"]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def summarise_group(task: str, model: dict[str, Any], variants: list[dict[str, Any]]) -> dict[str, Any]:
    """`variants`: each with `label`, `side`, `relative_to`, `runs` (successful results) and `failures`."""
    for variant in variants:
        variant["stats"] = {
            metric: spread([run[metric] for run in variant["runs"] if metric in run]) for metric in METRICS
        }
        variant["stats"] = {metric: stats for metric, stats in variant["stats"].items() if stats is not None}
    measured = [v for v in variants if v["side"] == "trl" and _median(v, "tokens_per_second") is not None]
    best = max(measured, key=lambda v: _median(v, "tokens_per_second"), default=None)
    by_label = {variant["label"]: variant for variant in variants}
    for variant in variants:
        reference = by_label.get(variant["relative_to"]) if variant["relative_to"] else None
        variant["ratios"] = {
            "speed_vs_trl_best": None
            if best is None
            else _ratio(_median(variant, "tokens_per_second"), _median(best, "tokens_per_second")),
            "memory_vs_trl_best": None
            if best is None
            else _ratio(_median(variant, "peak_memory_bytes"), _median(best, "peak_memory_bytes")),
            "speed_vs_reference": None
            if reference is None
            else _ratio(_median(variant, "tokens_per_second"), _median(reference, "tokens_per_second")),
        }
    return {
        "task": task,
        "model": model["name"],
        "trl_best": None if best is None else best["label"],
        "variants": variants,
    }


# ----------------------------------------------------------------------------------------------- markdown

TASK_TITLES = {"sft": "SFT", "dpo": "DPO", "generate": "Evaluation generation (greedy)"}


def _range(stats: dict[str, float] | None, scale: float = 1.0, digits: int = 0) -> str:
    if stats is None:
        return "–"
    median, low, high = (stats[key] / scale for key in ("median", "min", "max"))
    if stats["n"] == 1:
        return f"{median:,.{digits}f}"
    return f"{median:,.{digits}f} ({low:,.{digits}f}–{high:,.{digits}f})"


def _times(value: float | None, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.2f}×{suffix}"


def _group_table(group: dict[str, Any], with_mfu_column: bool) -> list[str]:
    generation = group["task"] == "generate"
    headers = (
        ["variant", "tokens/s"] + (["prompts/s"] if generation else []) + (["vs TRL best"] if not generation else [])
    )
    headers += ["peak memory GiB"] + ([] if generation else ["vs TRL best"]) + ["RSS after imports GiB", "vs reference"]
    headers += ["MFU"] if with_mfu_column else []
    headers += ["runs"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    for variant in group["variants"]:
        stats, ratios = variant["stats"], variant["ratios"]
        best_marker = " (TRL best)" if variant["label"] == group["trl_best"] else ""
        reference = (
            _times(ratios["speed_vs_reference"], f" {variant['relative_to']}") if variant["relative_to"] else "–"
        )
        cells = [variant["label"] + best_marker, _range(stats.get("tokens_per_second"))]
        if generation:
            cells.append(_range(stats.get("prompts_per_second"), digits=2))
        else:
            cells.append(_times(ratios["speed_vs_trl_best"]))
        cells.append(_range(stats.get("peak_memory_bytes"), GIB, 2))
        if not generation:
            cells.append(_times(ratios["memory_vs_trl_best"]))
        cells += [_range(stats.get("rss_after_imports_bytes"), GIB, 2), reference]
        if with_mfu_column:
            cells.append(_range(stats.get("mfu"), 0.01, 1) + ("%" if stats.get("mfu") else ""))
        failed = len(variant["failures"])
        cells.append(f"{len(variant['runs'])}" + (f" ({failed} failed)" if failed else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    machine, settings = result["machine"], result["settings"]
    device = machine.get("gpu") or f"{machine['cpu']} ({machine['cpu_count']} cores, {machine['memory_gib']} GiB)"
    lines = [
        f"# Benchmark `{result['name']}`: post-train against TRL",
        "",
        f"{machine['date']} on {device}, {settings['device']} {settings['precision']}, torch threads "
        f"{machine['torch_threads']}, load average {machine['load_average']:.2f} at the start and "
        f"{machine.get('load_average_end', float('nan')):.2f} at the end; torch {machine['torch']}, "
        f"transformers {machine['transformers']}, trl {machine['trl']}, accelerate {machine['accelerate']}, post-train "
        f"{machine['post_train_commit']}.",
        "",
        f"Every number is the median (min–max) of {settings['repetitions']} runs, each in a fresh process, the order "
        "of the variants reversed on every other repetition. Tokens/s: non-pad tokens of the trained model's forward "
        f"passes per second after {settings['warmup_steps_note']}. Peak memory: "
        + (
            "`torch.cuda.max_memory_allocated`."
            if settings["device"] == "cuda"
            else "the process's RSS high-water mark."
        )
        + " RSS after imports: the process's resident memory once its trainer's modules are imported, before any work."
        " Ratios divide medians of this run.",
        "",
        settings["summary"],
        "",
    ]
    for group in result["groups"]:
        model = result["models"][group["model"]]
        lines += [
            f"## {TASK_TITLES[group['task']]}, model `{model['name']}` ({model['parameters'] / 1e6:.1f}M parameters, "
            f"vocabulary {model['vocab_size']:,})",
            "",
            *_group_table(group, settings["device"] == "cuda" and group["task"] != "generate"),
            "",
        ]
    if result["failures"]:
        lines += ["## Failed runs", ""]
        lines += [
            f"- {f['task']} {f['model']} `{f['label']}` repetition {f['repetition']}: {f['error']}"
            for f in result["failures"]
        ]
        lines.append("")
    return "\n".join(lines)
