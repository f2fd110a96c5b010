"""Stage 5, evaluate: generate for every evaluation prompt, judge against the reference responses, diagnose.

The diagnostics (README "Diagnostics", docs/objectives.md) compare the evaluated model with the
SFT model (`reference_model_path`) and the base (`base_model_path`) when they are given.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import mlflow

from post_train.config import PipelineConfig
from post_train.data import (
    EvalExample,
    PromptTooLong,
    load_dataset_checked,
    prompt_and_completion_ids,
    response_completion,
)
from post_train.evaluation import (
    entropy_and_kl_of_responses,
    held_out_pairs,
    implicit_reward_diagnostics,
    import_vllm,
    is_world_prompt,
    split_means,
)
from post_train.judges import make_judge
from post_train.judges.base import Judge
from post_train.judging import generate_for, judged_metrics, log_samples, plot_win_rates, samples_table
from post_train.modeling import load_frozen, load_tokenizer
from post_train.results import ALL, Evaluation, PreparedData
from post_train.stage_io import stage_main
from post_train.tracking import stage_run


def plot_diagnostics(metrics: dict[str, float], title: str) -> None:
    """KL to the base model, entropy and implicit-reward accuracy of each final model (bars)."""
    panels = [
        ("KL to base (nats/token)", {"sft": "kl_to_base/sft", "dpo": "kl_to_base/dpo"}),
        ("entropy (nats/token)", {"base": "entropy/base", "sft": "entropy/sft", "dpo": "entropy/dpo"}),
        (
            "implicit-reward accuracy (all)",
            {
                "dpo vs sft": f"implicit_reward_accuracy/dpo_vs_sft/{ALL}",
                "sft vs base": f"implicit_reward_accuracy/sft_vs_base/{ALL}",
            },
        ),
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
        prompt_and_completion_ids(
            tokenizer, example.prompt, response_completion(example.prompt, example.reference), max_length
        )
    except PromptTooLong:
        return False
    return True


def diagnostics(
    config: PipelineConfig,
    model,
    tokenizer,
    examples: list[EvalExample],
    reference_model_path: str | None,
    base_model_path: str | None,
) -> dict[str, float]:
    """KL/entropy of each final model; implicit-reward accuracy and the Q-value rank check (demo world)."""
    length = config.evaluation.diagnostics_max_length
    chosen = [e for e in spread(examples, config.evaluation.diagnostics_max_examples) if fits(tokenizer, e, length)]
    if not chosen:
        return {}
    size = config.evaluation.diagnostics_batch_size
    prompts, responses = [e.prompt for e in chosen], [e.reference for e in chosen]
    sft = load_frozen(reference_model_path) if reference_model_path else None
    base = load_frozen(base_model_path) if base_model_path else None
    metrics: dict[str, float] = {}

    def measured(policy, reference) -> dict[str, float]:
        return entropy_and_kl_of_responses(policy, reference, tokenizer, prompts, responses, length, size)

    final = measured(model, base)
    metrics["entropy/dpo"] = final["entropy"]
    if base is not None:
        metrics["kl_to_base/dpo"] = final["kl"]
        metrics["entropy/base"] = measured(base, None)["entropy"]
    if sft is not None:
        metrics["kl_to_sft/dpo"] = measured(model, sft)["kl"]
        reference = measured(sft, base)
        metrics["entropy/sft"] = reference["entropy"]
        if base is not None:
            metrics["kl_to_base/sft"] = reference["kl"]
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
    config: PipelineConfig,
    model_path: str,
    data: PreparedData,
    output_dir: str,
    parent_run_id: str | None = None,
    reference_model_path: str | None = None,
    base_model_path: str | None = None,
) -> Evaluation:
    """Win rates of `model_path` against the references of `data.eval`, and diagnostics against
    `reference_model_path` (SFT) and `base_model_path` when given; samples go to `output_dir` too."""
    settings = config.evaluation
    examples = load_dataset_checked(data.eval, "eval")
    world = all(is_world_prompt(e.instruction) for e in examples)
    tokenizer = load_tokenizer(model_path)
    if settings.backend == "vllm":
        import_vllm()  # refuse before any work when it is missing
    judge: Judge = make_judge(settings, config.cache_dir)
    params = {
        "evaluation": settings.model_dump(mode="json"),
        "judge": judge.describe(),
        "model": model_path,
        "reference_model": reference_model_path or "none",
        "base_model": base_model_path or "none",
    }
    try:
        judge.check(judge.settings, examples)  # refuse before any work
        with stage_run("evaluate", parent_run_id, params) as run:
            model = load_frozen(model_path) if settings.backend == "transformers" else None
            outputs = generate_for(config, model_path, tokenizer, examples, model)
            references = [e.reference for e in examples]
            verdicts = judge.judge([e.messages for e in examples], outputs, references)
            metrics = judged_metrics(config, examples, verdicts, outputs, references)
            rows = samples_table(examples, outputs, references, verdicts)
            if world:  # the exact reward, whatever the judge: what the demo world is for
                from post_train.world.reward import gold_reward

                for example, output, row in zip(examples, outputs, rows):
                    instruction = example.instruction
                    row["gold_reward"] = gold_reward(instruction, output)
                    row["reference_gold_reward"] = gold_reward(instruction, example.reference)
                splits = [e.split for e in examples]
                for key in ("gold_reward", "reference_gold_reward"):
                    for split, mean in split_means(splits, [row[key] for row in rows]).items():
                        metrics[f"{key}/{split}"] = mean
            metrics.update(judge.extra_metrics(examples, verdicts))
            if settings.diagnostics and (reference_model_path or base_model_path):
                if model is None:
                    model = load_frozen(model_path)
                metrics.update(diagnostics(config, model, tokenizer, examples, reference_model_path, base_model_path))
            mlflow.log_metrics(metrics)
            log_samples(rows, "eval_samples.json", output_dir)
            plot_win_rates(metrics, f"{config.recipe}: final model vs reference ({settings.judge} judge)")
            plot_diagnostics(metrics, f"{config.recipe}: diagnostics on the evaluation prompts")
            return Evaluation(metrics=metrics, run_id=run.info.run_id)
    finally:
        judge.close()


if __name__ == "__main__":
    stage_main(run)
