"""Stage 5, evaluate: generate for every evaluation prompt and judge against the reference responses.

The `gold` judge is the demo world's exact reward: a response wins when its gold reward is
higher than the reference response's. Win rate and standard error per split and overall.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
from prefect import task

from post_train.config import PipelineConfig
from post_train.data import load_dataset_checked
from post_train.evaluation import GenerationSettings, generate_responses, last_user_message, preference, win_rate
from post_train.launch import run_stage, should_retry, stage_main
from post_train.modeling import load_model, load_tokenizer
from post_train.reference import model_fingerprint
from post_train.tracking import stage_run
from post_train.world.reward import gold_reward
from tasks.prepare import PreparedData

ALL = "all"


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    """`win_rate/<split>`, `win_rate_se/<split>`, `gold_reward/<split>`, ... with split `all` overall."""
    run_id: str
    cache_hit: bool = False

    @property
    def win_rate(self) -> float:
        return self.metrics[f"win_rate/{ALL}"]


def _plot_win_rates(metrics: dict[str, float], splits: list[str], title: str) -> None:
    figure, axis = plt.subplots(figsize=(1.6 * len(splits) + 2, 3.4))
    rates = [100 * metrics[f"win_rate/{split}"] for split in splits]
    errors = [100 * 1.96 * metrics[f"win_rate_se/{split}"] for split in splits]
    axis.bar(splits, rates, yerr=errors, capsize=6, color="tab:blue")
    axis.axhline(50, color="gray", linestyle="--", linewidth=1)
    axis.set_ylim(0, 100)
    axis.set_ylabel("win rate vs reference (%)  ±95% CI")
    axis.set_title(title)
    figure.tight_layout()
    mlflow.log_figure(figure, "win_rates.png")
    plt.close(figure)


def run(config: PipelineConfig, model_path: str, data: PreparedData, output_dir: str, parent_run_id: str | None = None) -> Evaluation:
    """Win rates of `model_path` against the references of `data.eval`; samples go to `output_dir` too."""
    settings = config.evaluation
    examples = load_dataset_checked(data.eval, "eval")
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, trainable=False)
    with stage_run("evaluate", parent_run_id, {"evaluation": settings.model_dump(mode="json"), "model": model_path}) as run:
        generation = GenerationSettings(
            settings.max_new_tokens, settings.temperature, settings.top_p, settings.batch_size, settings.seed
        )
        responses = generate_responses(model, tokenizer, [e.prompt for e in examples], generation)
        by_split: dict[str, list[float]] = defaultdict(list)
        rewards: dict[str, list[tuple[float, float]]] = defaultdict(list)
        samples = []
        for example, response in zip(examples, responses):
            instruction = last_user_message(example)
            model_score = gold_reward(instruction, response)
            reference_score = gold_reward(instruction, example.reference)
            verdict = preference(model_score, reference_score)
            for split in (example.split, ALL):
                by_split[split].append(verdict)
                rewards[split].append((model_score, reference_score))
            samples.append(
                {"split": example.split, "prompt": instruction, "response": response, "reference": example.reference,
                 "gold_reward": model_score, "reference_gold_reward": reference_score, "preference": verdict}
            )
        metrics: dict[str, float] = {}
        for split, verdicts in by_split.items():
            rate, error = win_rate(verdicts)
            scores = rewards[split]
            metrics[f"win_rate/{split}"] = rate
            metrics[f"win_rate_se/{split}"] = error
            metrics[f"gold_reward/{split}"] = sum(s[0] for s in scores) / len(scores)
            metrics[f"reference_gold_reward/{split}"] = sum(s[1] for s in scores) / len(scores)
            metrics[f"num_prompts/{split}"] = len(verdicts)
        mlflow.log_metrics(metrics)
        table = {key: [sample[key] for sample in samples] for key in samples[0]}
        mlflow.log_table(table, artifact_file="eval_samples.json")
        Path(output_dir, "eval_samples.json").write_text(json.dumps(table, indent=1))
        splits = sorted(s for s in by_split if s != ALL) + [ALL]
        _plot_win_rates(metrics, splits, f"{config.recipe}: final model vs reference ({settings.judge} judge)")
        return Evaluation(metrics=metrics, run_id=run.info.run_id)


@task(name="evaluate", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=should_retry)
def evaluate_task(
    config: PipelineConfig, model_path: str, data: PreparedData, run_dir: str,
    parent_run_id: str | None = None, force: bool = False,
) -> Evaluation:
    return run_stage(
        "evaluate", run, {"config": config, "model_path": model_path, "data": data, "parent_run_id": parent_run_id},
        {"evaluation": config.evaluation.model_dump(mode="json"), "model": model_fingerprint(model_path),
         "data_hash": data.data_hash},
        config, run_dir, parent_run_id, force,
    )


if __name__ == "__main__":
    stage_main(run)
