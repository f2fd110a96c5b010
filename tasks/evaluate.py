"""Stage 5, evaluate: generate for every evaluation prompt, judge against the reference responses, diagnose.

The diagnostics (README "Diagnostics", docs/objectives.md) compare the evaluated model with the
SFT model (`reference_model_path`) and the base (`base_model_path`) when they are given. On the demo
world they also measure each model in the base's own terse format ("reverse c a f b =", where the base
is competent): exact-match accuracy, its retention relative to the base, and the token KL to the base on
the answer tokens, and they generate with the SFT model too, for the gold reward DPO adds to it.
"""

from __future__ import annotations

from pathlib import Path

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
    is_world_prompt,
    native_accuracy,
    native_kl,
    split_means,
    spread,
)
from post_train.generators import generator
from post_train.judges import make_judge
from post_train.judges.base import Judge
from post_train.judging import generate_for, judged_metrics, log_samples, plot_win_rates, samples_table
from post_train.modeling import load_frozen, load_tokenizer
from post_train.results import ALL, Evaluation, PreparedData, splits_in
from post_train.stage_io import stage_main
from post_train.tracking import log_dataset, stage_run


def plot_diagnostics(metrics: dict[str, float], title: str) -> None:
    """KL to the base model, entropy and implicit-reward accuracy of each final model, and (demo world) its
    native-format retention and KL to the base per split (bars)."""
    splits = splits_in(metrics)
    native = [(model, split) for model in ("sft", "dpo") for split in splits]
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
        ("native retention (accuracy / base's)", {f"{m}\n{s}": f"retention/{m}/{s}" for m, s in native}),
        ("native KL to base (nats/answer token)", {f"{m}\n{s}": f"native_kl_to_base/{m}/{s}" for m, s in native}),
    ]
    panels = [(label, {k: metrics[v] for k, v in keys.items() if v in metrics}) for label, keys in panels]
    panels = [(label, values) for label, values in panels if values]
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for axis, (label, values) in zip(axes[0], panels):
        axis.bar(list(values), list(values.values()), color="tab:green")
        axis.set_title(label, fontsize=10)
        axis.tick_params(axis="x", labelsize=7)
        if "accuracy" in label and "retention" not in label:
            axis.set_ylim(0, 1)
            axis.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        if "retention" in label:  # 1: the model answers as often as its base
            axis.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    mlflow.log_figure(figure, "diagnostics.png")
    plt.close(figure)


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
    sft,
    base,
) -> dict[str, float]:
    """KL/entropy of each final model; implicit-reward accuracy and the Q-value rank check (demo world).
    `sft` and `base` are the loaded SFT and base models, or None where not given."""
    length = config.evaluation.diagnostics_max_length
    chosen = [e for e in spread(examples, config.evaluation.diagnostics_max_examples) if fits(tokenizer, e, length)]
    if not chosen:
        return {}
    size = config.evaluation.diagnostics_batch_size
    prompts, responses = [e.prompt for e in chosen], [e.reference for e in chosen]
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


def native_diagnostics(
    config: PipelineConfig, model, tokenizer, examples: list[EvalExample], sft, base
) -> dict[str, float]:
    """The demo world's models in the base's terse format, on the diagnostics' prompts (`spread`), per split and `all`:

    - `native_accuracy/{base,sft,dpo}/<split>`: greedy exact match (`post_train.evaluation.native_accuracy`);
    - `retention/{sft,dpo}/<split>` = native accuracy / the base's (NaN where the base's is 0);
    - `native_kl_to_base/{sft,dpo}/<split>`: exact token KL(model ‖ base) on the answer tokens (`native_kl`).

    `sft` and `base` are the loaded models, or None where not given (their metrics are then left out).
    """
    settings = config.evaluation
    chosen = spread(examples, settings.diagnostics_max_examples)
    instructions, splits = [e.instruction for e in chosen], [e.split for e in chosen]
    models = {name: policy for name, policy in (("base", base), ("sft", sft), ("dpo", model)) if policy is not None}
    metrics: dict[str, float] = {}
    accuracy = {}
    for name, policy in models.items():
        accuracy[name] = native_accuracy(
            policy, tokenizer, instructions, splits, settings.max_new_tokens, settings.batch_size
        )
        metrics.update({f"native_accuracy/{name}/{split}": value for split, value in accuracy[name].items()})
    if base is None:
        return metrics
    for name in ("sft", "dpo"):
        if name not in models:
            continue
        for split, value in accuracy[name].items():
            reference = accuracy["base"][split]
            metrics[f"retention/{name}/{split}"] = value / reference if reference > 0 else float("nan")
        found = native_kl(models[name], base, tokenizer, instructions, splits, settings.diagnostics_batch_size)
        metrics.update({f"native_kl_to_base/{name}/{split}": value for split, value in found.items()})
    return metrics


def sft_gold_rewards(
    config: PipelineConfig, sft_path: str, tokenizer, examples: list[EvalExample], sft, rows: list[dict]
) -> dict[str, float]:
    """The SFT model's gold reward on the same prompts with the same generation settings (`generate_for`; `sft` is
    the loaded model for the transformers backend): `sft_gold_reward/<split>` and `dpo_gain/gold_reward/<split>` =
    gold_reward/<split> − sft_gold_reward/<split>. Each of `rows` gets its `sft_gold_reward`, for paired statistics
    of the gain."""
    from post_train.world.reward import gold_reward

    outputs = generate_for(config, sft_path, tokenizer, examples, sft)
    for example, output, row in zip(examples, outputs, rows):
        row["sft_gold_reward"] = gold_reward(example.instruction, output)
    splits = [e.split for e in examples]
    model_means = split_means(splits, [row["gold_reward"] for row in rows])
    metrics: dict[str, float] = {}
    for split, mean in split_means(splits, [row["sft_gold_reward"] for row in rows]).items():
        metrics[f"sft_gold_reward/{split}"] = mean
        metrics[f"dpo_gain/gold_reward/{split}"] = model_means[split] - mean
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
    generating = generator(settings.backend)
    generating.check()  # refuse before any work (vLLM missing)
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
            log_dataset(data.eval, "eval", data.hashes["eval"], "evaluation")
            model = generating.model(model_path)
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
            if settings.diagnostics and (world or reference_model_path or base_model_path):
                sft = generating.model(reference_model_path) if reference_model_path else None
                if world and reference_model_path:  # vLLM generates before the models below take the GPU
                    metrics.update(sft_gold_rewards(config, reference_model_path, tokenizer, examples, sft, rows))
                if model is None:
                    model = load_frozen(model_path)
                if sft is None and reference_model_path:
                    sft = load_frozen(reference_model_path)
                base = load_frozen(base_model_path) if base_model_path else None
                if reference_model_path or base_model_path:
                    metrics.update(diagnostics(config, model, tokenizer, examples, sft, base))
                if world:
                    metrics.update(native_diagnostics(config, model, tokenizer, examples, sft, base))
            mlflow.log_metrics(metrics)
            log_samples(rows, "eval_samples.json", output_dir)
            plot_win_rates(metrics, f"{config.recipe}: final model vs reference ({settings.judge} judge)")
            plot_diagnostics(metrics, f"{config.recipe}: diagnostics on the evaluation prompts")
            return Evaluation(
                metrics=metrics, run_id=run.info.run_id, samples_path=str(Path(output_dir) / "eval_samples.json")
            )
    finally:
        judge.close()


if __name__ == "__main__":
    stage_main(run)
