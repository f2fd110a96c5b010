"""Stage: the challenger against the registered champion, both generating for every evaluation prompt.

The recipe's judge compares the two outputs per prompt, the challenger's as the candidate and the
champion's as the baseline; the metrics are the evaluate stage's, prefixed `head_to_head/`.
"""

from __future__ import annotations

import mlflow

from post_train.config import PipelineConfig
from post_train.data import load_dataset_checked
from post_train.generators import generator
from post_train.judges import make_judge
from post_train.judging import generate_for, judged_metrics, log_samples, plot_win_rates, samples_table
from post_train.modeling import load_tokenizer
from post_train.results import HEAD_TO_HEAD, HeadToHead, PreparedData
from post_train.stage_io import stage_main
from post_train.tracking import stage_run


def run(
    config: PipelineConfig,
    candidate_path: str,
    baseline_path: str,
    data: PreparedData,
    output_dir: str,
    parent_run_id: str | None = None,
) -> HeadToHead:
    """Win rate of the model at `candidate_path` against the one at `baseline_path` on the evaluation prompts."""
    examples = load_dataset_checked(data.eval, "eval")
    generator(config.evaluation.backend).check()  # refuse before any work (vLLM missing)
    judge = make_judge(config.evaluation, config.cache_dir)
    judge.check(judge.settings, examples)
    params = {
        "challenger": candidate_path,
        "champion": baseline_path,
        "judge": judge.describe(),
        "evaluation": config.evaluation.model_dump(mode="json"),
    }
    try:
        with stage_run("head-to-head", parent_run_id, params) as run:
            candidates = generate_for(config, candidate_path, load_tokenizer(candidate_path), examples)
            baselines = generate_for(config, baseline_path, load_tokenizer(baseline_path), examples)
            verdicts = judge.judge([e.messages for e in examples], candidates, baselines)
            metrics = {
                f"{HEAD_TO_HEAD}{key}": value
                for key, value in judged_metrics(config, examples, verdicts, candidates, baselines).items()
            }
            mlflow.log_metrics(metrics)
            log_samples(
                samples_table(examples, candidates, baselines, verdicts, labels=("challenger", "champion")),
                "head_to_head_samples.json",
                output_dir,
            )
            plot_win_rates(
                metrics, f"challenger vs champion ({config.evaluation.judge} judge)", "head_to_head.png", HEAD_TO_HEAD
            )
            return HeadToHead(metrics=metrics, run_id=run.info.run_id)
    finally:
        judge.close()


if __name__ == "__main__":
    stage_main(run)
