"""Stage 5, evaluate: generate for every evaluation prompt, judge against the reference responses, diagnose.

The judge is `evaluation.judge` (`post_train.judges`: gold, reward_model or llm). Per split
(`in_distribution`, `held_out`, ... and `all`): raw, discrete and length-controlled win rates, the
standard error, a bootstrap confidence interval and the average lengths (`post_train.evaluation`).

With `reference_model_path` (the SFT model) and `base_model_path` (the base model) it also computes
the theory's diagnostics (docs/objectives.md, "Diagnostics") on the evaluation prompts:
- KL to the base model and entropy of each final model, on the reference responses;
- implicit-reward accuracy, r̂ = Σ(ℓ − ℓ_ref), of the evaluated (DPO) model against the SFT model and
  of the SFT model against the base, on held-out preference pairs built from the evaluation prompts
  (`post_train.evaluation.held_out_pairs`; demo world only);
- the "logits are Q-values" check: Spearman ρ between the cumulative log-ratio of response prefixes
  and their gold value (`post_train.evaluation.prefix_value`; demo world only).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import mlflow
import torch
from prefect import task

from post_train.config import ConfigError, PipelineConfig
from post_train.data import EvalExample, PromptTooLong, load_dataset_checked, prompt_and_completion_ids
from post_train.evaluation import (
    ALL,
    GenerationSettings,
    generate,
    held_out_pairs,
    implicit_reward_diagnostics,
    import_vllm,
    is_world_prompt,
    kl_and_entropy,
    last_user_message,
    split_metrics,
    splits_in,
)
from post_train.judges import Judge, Verdict, make_judge
from post_train.launch import run_stage, should_retry, stage_main
from post_train.modeling import load_tokenizer
from post_train.reference import model_fingerprint
from post_train.tracking import stage_run
from tasks.prepare import PreparedData


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    """`win_rate/<split>`, `win_rate_se/<split>`, `lc_win_rate/<split>`, ... with split `all` overall, and diagnostics."""
    run_id: str
    cache_hit: bool = False

    @property
    def win_rate(self) -> float:
        return self.metrics[f"win_rate/{ALL}"]


def generation_settings(config: PipelineConfig) -> GenerationSettings:
    settings = config.evaluation
    return GenerationSettings(settings.max_new_tokens, settings.temperature, settings.top_p, settings.batch_size, settings.seed)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_evaluation(path: str):
    """A causal LM for inference: float32 on CPU, bfloat16 on a GPU."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.requires_grad_(False)
    return model.to(device()).eval()


def generate_for(config: PipelineConfig, model_path: str, tokenizer, examples: list[EvalExample], model=None) -> list[str]:
    """The model's responses to every evaluation prompt, with the recipe's backend and sampling settings."""
    if config.evaluation.backend == "transformers" and model is None:
        model = load_for_evaluation(model_path)
    return generate(config.evaluation.backend, model_path, tokenizer, [e.prompt for e in examples], generation_settings(config), model)


def judged_metrics(config: PipelineConfig, examples: list[EvalExample], verdicts: list[Verdict], outputs: list[str], references: list[str]) -> dict[str, float]:
    settings = config.evaluation
    return split_metrics(
        [e.split for e in examples], [v.preference for v in verdicts], outputs, references,
        settings.bootstrap_samples, settings.confidence, settings.seed,
    )


def verdict_label(p: float) -> str:
    return "model" if p > 0.5 else "reference" if p < 0.5 else "draw"


def samples_table(examples: list[EvalExample], outputs: list[str], references: list[str], verdicts: list[Verdict],
                  names: tuple[str, str] = ("response", "reference")) -> list[dict[str, Any]]:
    """One row per prompt: the prompt, both outputs, the judge's preference and verdict, and how it decided."""
    first, second = names
    rows = []
    for example, output, reference, verdict in zip(examples, outputs, references, verdicts):
        rows.append({
            "split": example.split, "prompt": last_user_message(example), first: output, second: reference,
            "preference": verdict.preference,
            "verdict": verdict_label(verdict.preference).replace("model", first).replace("reference", second),
            "judge_source": verdict.source,
            f"{first}_score": verdict.model_score, f"{second}_score": verdict.reference_score,
            f"{first}_shown_first": verdict.model_shown_first,
            f"{first}_length": len(output), f"{second}_length": len(reference),
        })
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
    axis.bar([p - 0.2 for p in positions], rates, width=0.4, yerr=[lower, upper], capsize=6, color="tab:blue", label="win rate (bootstrap CI)")
    axis.bar([p + 0.2 for p in positions], [100 * metrics[f"{prefix}lc_win_rate/{s}"] for s in splits], width=0.4,
             color="tab:orange", label="length-controlled")
    axis.set_xticks(list(positions), splits)
    axis.axhline(50, color="gray", linestyle="--", linewidth=1)
    axis.set_ylim(0, 100)
    axis.set_ylabel("win rate (%)")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    figure.tight_layout()
    mlflow.log_figure(figure, name)
    plt.close(figure)


def plot_diagnostics(metrics: dict[str, float], title: str) -> None:
    """KL to the base model, entropy and implicit-reward accuracy of each final model (bars)."""
    panels = [
        ("KL to base (nats/token)", {"sft": "kl_to_base/sft", "dpo": "kl_to_base/dpo"}),
        ("entropy (nats/token)", {"base": "entropy/base", "sft": "entropy/sft", "dpo": "entropy/dpo"}),
        ("implicit-reward accuracy (all)", {"dpo vs sft": f"implicit_reward_accuracy/dpo_vs_sft/{ALL}",
                                            "sft vs base": f"implicit_reward_accuracy/sft_vs_base/{ALL}"}),
    ]
    panels = [(label, {k: metrics[v] for k, v in keys.items() if v in metrics}) for label, keys in panels]
    panels = [(label, values) for label, values in panels if values]
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for axis, (label, values) in zip(axes[0], panels):
        axis.bar(list(values), list(values.values()), color="tab:green")
        axis.set_title(label, fontsize=10)
        if "accuracy" in label:
            axis.set_ylim(0, 1)
            axis.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    mlflow.log_figure(figure, "diagnostics.png")
    plt.close(figure)


def spread(examples: list[EvalExample], count: int) -> list[EvalExample]:
    """At most `count` examples, evenly spaced, so every split is represented."""
    if len(examples) <= count:
        return list(examples)
    step = len(examples) / count
    return [examples[int(i * step)] for i in range(count)]


def fits(tokenizer, example: EvalExample, max_length: int) -> bool:
    """Whether the prompt leaves room for a response within `max_length` tokens."""
    try:
        prompt_and_completion_ids(tokenizer, example.prompt, [{"role": "assistant", "content": example.reference}], max_length)
    except PromptTooLong:
        return False
    return True


def diagnostics(config: PipelineConfig, model, tokenizer, examples: list[EvalExample],
                reference_model_path: str | None, base_model_path: str | None) -> dict[str, float]:
    """KL/entropy of each final model; implicit-reward accuracy and the Q-value rank check (demo world)."""
    length = max(config.sft.max_length, config.dpo.max_length)
    chosen = [e for e in spread(examples, config.evaluation.diagnostics_max_examples) if fits(tokenizer, e, length)]
    if not chosen:
        return {}
    size = config.sft.diagnostics_batch_size
    prompts, responses = [e.prompt for e in chosen], [e.reference for e in chosen]
    sft = load_for_evaluation(reference_model_path) if reference_model_path else None
    base = load_for_evaluation(base_model_path) if base_model_path else None
    metrics: dict[str, float] = {}
    final = kl_and_entropy(model, base, tokenizer, prompts, responses, length, size)
    metrics["entropy/dpo"] = final["entropy"]
    if base is not None:
        metrics["kl_to_base/dpo"] = final["kl_to_base"]
        metrics["entropy/base"] = kl_and_entropy(base, None, tokenizer, prompts, responses, length, size)["entropy"]
    if sft is not None:
        metrics["kl_to_sft/dpo"] = kl_and_entropy(model, sft, tokenizer, prompts, responses, length, size)["kl_to_base"]
        reference = kl_and_entropy(sft, base, tokenizer, prompts, responses, length, size)
        metrics["entropy/sft"] = reference["entropy"]
        if base is not None:
            metrics["kl_to_base/sft"] = reference["kl_to_base"]
    pairs = held_out_pairs(chosen, config.evaluation.seed)
    for name, policy, anchor in (("dpo_vs_sft", model, sft), ("sft_vs_base", sft, base)):
        if not pairs or policy is None or anchor is None:
            continue
        found = implicit_reward_diagnostics(policy, anchor, tokenizer, pairs, length, size)
        for key, value in found.items():
            if key.startswith(("accuracy/", "margin/")):
                kind, split = key.split("/", 1)
                metrics[f"implicit_reward_{kind}/{name}/{split}"] = value
        metrics[f"q_value_spearman/{name}"] = found["q_spearman"]
        metrics["implicit_reward_pairs"] = found["num_pairs"]
    return metrics


def run(
    config: PipelineConfig, model_path: str, data: PreparedData, output_dir: str, parent_run_id: str | None = None,
    reference_model_path: str | None = None, base_model_path: str | None = None,
) -> Evaluation:
    """Win rates of `model_path` against the references of `data.eval`, and diagnostics against
    `reference_model_path` (SFT) and `base_model_path` when given; samples go to `output_dir` too."""
    settings = config.evaluation
    examples = load_dataset_checked(data.eval, "eval")
    world = all(is_world_prompt(last_user_message(e)) for e in examples)
    if settings.judge == "gold" and not world:  # refuse before any work
        raise ConfigError(
            f"evaluation.judge gold scores demo-world prompts only, and {data.eval} holds others; "
            "use evaluation.judge: reward_model or llm"
        )
    tokenizer = load_tokenizer(model_path)
    if settings.backend == "vllm":
        import_vllm()  # refuse before any work when it is missing
    judge: Judge = make_judge(settings, config.cache_dir)
    params = {"evaluation": settings.model_dump(mode="json"), "judge": judge.describe(), "model": model_path,
              "reference_model": reference_model_path or "none", "base_model": base_model_path or "none"}
    try:
        with stage_run("evaluate", parent_run_id, params) as run:
            model = load_for_evaluation(model_path) if settings.backend == "transformers" else None
            outputs = generate_for(config, model_path, tokenizer, examples, model)
            references = [e.reference for e in examples]
            verdicts = judge.judge([e.prompt for e in examples], outputs, references)
            metrics = judged_metrics(config, examples, verdicts, outputs, references)
            rows = samples_table(examples, outputs, references, verdicts)
            if world:  # the exact reward, whatever the judge: what the demo world is for
                from post_train.world.reward import gold_reward

                gold: dict[str, list[tuple[float, float]]] = defaultdict(list)
                for example, output, row in zip(examples, outputs, rows):
                    instruction = last_user_message(example)
                    row["gold_reward"] = gold_reward(instruction, output)
                    row["reference_gold_reward"] = gold_reward(instruction, example.reference)
                    for split in (example.split, ALL):
                        gold[split].append((row["gold_reward"], row["reference_gold_reward"]))
                for split, scores in gold.items():
                    metrics[f"gold_reward/{split}"] = sum(s[0] for s in scores) / len(scores)
                    metrics[f"reference_gold_reward/{split}"] = sum(s[1] for s in scores) / len(scores)
            if settings.judge == "reward_model":
                by_split: dict[str, list[tuple[float, float]]] = defaultdict(list)
                for example, verdict in zip(examples, verdicts):
                    for split in (example.split, ALL):
                        by_split[split].append((verdict.model_score, verdict.reference_score))
                for split, scores in by_split.items():
                    metrics[f"reward/{split}"] = sum(s[0] for s in scores) / len(scores)
                    metrics[f"reference_reward/{split}"] = sum(s[1] for s in scores) / len(scores)
            if settings.judge == "llm":
                metrics["judge_requests"] = float(judge.requests)
                metrics["judge_cache_hits"] = float(judge.cache_hits)
                metrics["judge_unparsed"] = float(sum(v.source == "unparsed" for v in verdicts))
            if settings.diagnostics and (reference_model_path or base_model_path):
                if model is None:
                    model = load_for_evaluation(model_path)
                metrics.update(diagnostics(config, model, tokenizer, examples, reference_model_path, base_model_path))
            mlflow.log_metrics(metrics)
            log_samples(rows, "eval_samples.json", output_dir)
            plot_win_rates(metrics, f"{config.recipe}: final model vs reference ({settings.judge} judge)")
            plot_diagnostics(metrics, f"{config.recipe}: diagnostics on the evaluation prompts")
            return Evaluation(metrics=metrics, run_id=run.info.run_id)
    finally:
        judge.close()


def judge_fingerprint(config: PipelineConfig) -> dict[str, Any]:
    """What the verdicts depend on besides the outputs: the judge's settings and, for a local reward model, its weights."""
    settings = config.evaluation.judge_settings()
    if config.evaluation.judge == "reward_model":
        settings["weights"] = model_fingerprint(config.evaluation.reward_model.name_or_path)
    return settings


@task(name="evaluate", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=should_retry)
def evaluate_task(
    config: PipelineConfig, model_path: str, data: PreparedData, run_dir: str,
    parent_run_id: str | None = None, force: bool = False,
    reference_model_path: str | None = None, base_model_path: str | None = None,
) -> Evaluation:
    return run_stage(
        "evaluate", run,
        {"config": config, "model_path": model_path, "data": data, "parent_run_id": parent_run_id,
         "reference_model_path": reference_model_path, "base_model_path": base_model_path},
        {"evaluation": config.evaluation.model_dump(mode="json"), "judge": judge_fingerprint(config),
         "model": model_fingerprint(model_path), "data_hash": data.data_hash,
         "reference_model": model_fingerprint(reference_model_path) if reference_model_path else None,
         "base_model": model_fingerprint(base_model_path) if base_model_path else None,
         "diagnostics_lengths": [config.sft.max_length, config.dpo.max_length, config.sft.diagnostics_batch_size]},
        config, run_dir, parent_run_id, force,
    )


if __name__ == "__main__":
    stage_main(run)
