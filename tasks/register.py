"""Stage 6, register: the final model becomes a new version of the registered model.

The version gets the alias `challenger` (`registry.challenger_alias`), tags (recipe, data hash, git
commit, flow run id, judge, win rates) and a short model card as its description. It becomes the
`champion` (`registry.champion_alias`) when

- there is no champion yet (the first version), or
- its head-to-head win rate against the current champion is above 50% and the lower bound of the
  bootstrap confidence interval is above `registry.promotion_ci_lower_bound` (default 0.5). Head to
  head: both models generate for every evaluation prompt (the recipe's generation settings) and the
  recipe's judge compares the two outputs, the challenger's in the model's place and the champion's
  in the reference's (`head_to_head`, a cached stage command of its own in the flow).
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task

from post_train.config import PipelineConfig
from post_train.data import load_dataset_checked
from post_train.evaluation import ALL, splits_in
from post_train.fingerprint import REPO_ROOT
from post_train.judges import make_judge
from post_train.launch import run_stage, should_retry, stage_main
from post_train.modeling import load_tokenizer
from post_train.reference import model_fingerprint
from post_train.tracking import stage_run, tracking_uri
from tasks.prepare import PreparedData

WIN_RATE_TAG = "win_rate"
HEAD_TO_HEAD = "head_to_head/"
"""Prefix of the head-to-head metrics: `head_to_head/win_rate/<split>`, `head_to_head/win_rate_ci_low/<split>`, ..."""


@dataclass(frozen=True)
class HeadToHead:
    metrics: dict[str, float]
    run_id: str
    cache_hit: bool = False

    @property
    def win_rate(self) -> float:
        return self.metrics[f"{HEAD_TO_HEAD}win_rate/{ALL}"]

    @property
    def ci_low(self) -> float:
        return self.metrics[f"{HEAD_TO_HEAD}win_rate_ci_low/{ALL}"]

    @property
    def ci_high(self) -> float:
        return self.metrics[f"{HEAD_TO_HEAD}win_rate_ci_high/{ALL}"]


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    model_uri: str
    is_champion: bool
    previous_champion: str | None
    reason: str = ""
    """Why the version was or was not promoted."""
    head_to_head: dict[str, float] | None = None
    """The head-to-head metrics against `previous_champion`; None for the first version."""


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def current_champion(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def head_to_head(
    config: PipelineConfig, challenger_path: str, champion_path: str, data: PreparedData, output_dir: str,
    parent_run_id: str | None = None,
) -> HeadToHead:
    """Win rate of the challenger against the champion on the evaluation prompts, by the recipe's judge."""
    from tasks.evaluate import generate_for, judged_metrics, log_samples, plot_win_rates, samples_table

    examples = load_dataset_checked(data.eval, "eval")
    judge = make_judge(config.evaluation, config.cache_dir)
    params = {"challenger": challenger_path, "champion": champion_path, "judge": judge.describe(),
              "evaluation": config.evaluation.model_dump(mode="json")}
    try:
        with stage_run("head-to-head", parent_run_id, params) as run:
            challenger = generate_for(config, challenger_path, load_tokenizer(challenger_path), examples)
            champion = generate_for(config, champion_path, load_tokenizer(champion_path), examples)
            verdicts = judge.judge([e.prompt for e in examples], challenger, champion)
            metrics = {f"{HEAD_TO_HEAD}{key}": value for key, value in judged_metrics(config, examples, verdicts, challenger, champion).items()}
            mlflow.log_metrics(metrics)
            log_samples(samples_table(examples, challenger, champion, verdicts, ("challenger", "champion")),
                        "head_to_head_samples.json", output_dir)
            plot_win_rates(metrics, f"challenger vs champion ({config.evaluation.judge} judge)", "head_to_head.png", HEAD_TO_HEAD)
            return HeadToHead(metrics=metrics, run_id=run.info.run_id)
    finally:
        judge.close()


def promotion_decision(comparison: HeadToHead | None, ci_lower_bound: float) -> tuple[bool, str]:
    """(promote?, why): the first version always; later ones on a head-to-head win rate above 50% whose
    confidence interval's lower bound is above `ci_lower_bound`."""
    if comparison is None:
        return True, "first version: no champion yet"
    rate, low, high = comparison.win_rate, comparison.ci_low, comparison.ci_high
    interval = f"head-to-head win rate {100 * rate:.1f}% (CI {100 * low:.1f}-{100 * high:.1f}%)"
    if rate <= 0.5:
        return False, f"{interval} is not above 50%"
    if low <= ci_lower_bound:
        return False, f"{interval}: the CI's lower bound is not above {100 * ci_lower_bound:.1f}%"
    return True, f"{interval} is above 50% with the CI's lower bound above {100 * ci_lower_bound:.1f}%"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def model_card(
    config: PipelineConfig, data_hash: str, commit: str, win_rate: float, metrics: dict[str, float] | None,
    comparison: HeadToHead | None, champion_version: str | None, promote: bool, reason: str,
) -> str:
    """A short markdown model card: what was trained on what, and how it scored."""
    lines = [
        f"**{config.registry.model_name}** — recipe `{config.recipe}` at scale `{config.scale}` "
        f"(SFT `{config.sft.objective}` lr {config.sft.learning_rate:g}, DPO `{config.dpo.loss}` {config.dpo.loss_params}).",
        "",
        f"- data hash: `{data_hash}`",
        f"- git commit: `{commit}`",
        f"- judge: `{config.evaluation.judge}`",
        "",
        "Win rate against the reference responses (%):",
        "",
        "| split | win rate | ± s.e. | 95% CI | discrete | LC | avg length (ref) | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if metrics:
        for split in splits_in(metrics):
            get = lambda key: metrics.get(f"{key}/{split}")  # noqa: E731
            lines.append(
                f"| {split} | {_percent(get('win_rate'))} | {_percent(get('win_rate_se'))} | "
                f"{_percent(get('win_rate_ci_low'))}–{_percent(get('win_rate_ci_high'))} | {_percent(get('win_rate_discrete'))} | "
                f"{_percent(get('lc_win_rate'))} | {get('avg_length') or 0:.0f} ({get('reference_avg_length') or 0:.0f}) | "
                f"{int(get('num_prompts') or 0)} |"
            )
    else:
        lines.append(f"| {ALL} | {_percent(win_rate)} | – | – | – | – | – | – |")
    lines.append("")
    if comparison is not None:
        lines.append(
            f"Head to head against champion version {champion_version}: {_percent(comparison.win_rate)}% "
            f"(CI {_percent(comparison.ci_low)}–{_percent(comparison.ci_high)}%, LC "
            f"{_percent(comparison.metrics.get(f'{HEAD_TO_HEAD}lc_win_rate/{ALL}'))}%)."
        )
    lines.append(f"**{'Promoted to' if promote else 'Not promoted to'} `{config.registry.champion_alias}`**: {reason}.")
    return "\n".join(lines)


def _compare_with_champion(
    config: PipelineConfig, client: MlflowClient, champion, model_path: str, data: PreparedData,
    parent_run_id: str | None, run_dir: str | None, force: bool,
) -> HeadToHead:
    name = config.registry.model_name
    with tempfile.TemporaryDirectory(prefix="champion-") as scratch:
        destination = Path(run_dir, "register", f"champion-v{champion.version}") if run_dir else Path(scratch)
        destination.mkdir(parents=True, exist_ok=True)
        champion_path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{champion.version}", dst_path=str(destination),
            tracking_uri=tracking_uri(), registry_uri=tracking_uri(),
        )
        if run_dir is None:  # in this process (tests, notebooks)
            return head_to_head(config, model_path, champion_path, data, scratch, parent_run_id)
        # In the flow: a child process, cached by both models' weights, the judge and the data.
        return run_stage(
            "head-to-head", head_to_head,
            {"config": config, "challenger_path": model_path, "champion_path": champion_path, "data": data,
             "parent_run_id": parent_run_id},
            {"evaluation": config.evaluation.model_dump(mode="json"), "challenger": model_fingerprint(model_path),
             "champion": model_fingerprint(champion_path), "data_hash": data.data_hash},
            config, run_dir, parent_run_id, force,
        )


def run(
    config: PipelineConfig,
    model_path: str,
    win_rate: float,
    data_hash: str,
    flow_run_id: str | None = None,
    parent_run_id: str | None = None,
    data: PreparedData | None = None,
    metrics: dict[str, float] | None = None,
    run_dir: str | None = None,
    force: bool = False,
) -> Registration:
    """Register `model_path` as a new version (alias challenger) and promote it to champion when it beats the champion.

    `win_rate` and `metrics` are the evaluate stage's (against the references); `data` holds the
    evaluation prompts of the head-to-head, needed once a champion exists. With `run_dir` the
    head-to-head runs as a cached child-process stage, else in this process.
    """
    registry = config.registry
    name, alias = registry.model_name, registry.champion_alias
    client = MlflowClient(tracking_uri())
    champion = current_champion(client, name, alias)
    comparison = None
    if champion is not None:
        if data is None:
            raise ValueError(f"a champion ({name} version {champion.version}) exists: the head-to-head needs the evaluation data")
        comparison = _compare_with_champion(config, client, champion, model_path, data, parent_run_id, run_dir, force)
    promote, reason = promotion_decision(comparison, registry.promotion_ci_lower_bound)
    commit = git_commit()
    with stage_run("register", parent_run_id) as run:
        mlflow.log_artifacts(model_path, artifact_path="model")
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, description="Models post-trained by the post-train pipeline.")
        tags: dict[str, Any] = {
            "recipe": config.recipe,
            "scale": config.scale,
            "data_hash": data_hash,
            "git_commit": commit,
            "flow_run_id": flow_run_id or "none",
            "judge": config.evaluation.judge,
            WIN_RATE_TAG: f"{win_rate:.4f}",
            "promoted": str(promote).lower(),
            "promotion_reason": reason,
        }
        for key in ("lc_win_rate", "win_rate_ci_low", "win_rate_ci_high"):
            if metrics and f"{key}/{ALL}" in metrics:
                tags[key] = f"{metrics[f'{key}/{ALL}']:.4f}"
        if comparison is not None:
            tags.update({"head_to_head_vs": str(champion.version), "head_to_head_win_rate": f"{comparison.win_rate:.4f}",
                         "head_to_head_ci_low": f"{comparison.ci_low:.4f}", "head_to_head_ci_high": f"{comparison.ci_high:.4f}"})
        card = model_card(config, data_hash, commit, win_rate, metrics, comparison,
                          str(champion.version) if champion else None, promote, reason)
        version = client.create_model_version(
            name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags, description=card,
        )
        client.set_registered_model_alias(name, registry.challenger_alias, version.version)
        if promote:
            client.set_registered_model_alias(name, alias, version.version)
        mlflow.log_params({"registered_model": name, "version": version.version, "promoted": promote})
        mlflow.set_tag("promotion_reason", reason)
        if comparison is not None:
            mlflow.log_metrics(comparison.metrics)
        mlflow.log_text(card, "model_card.md")
        return Registration(
            name=name,
            version=str(version.version),
            model_uri=f"models:/{name}/{version.version}",
            is_champion=promote,
            previous_champion=str(champion.version) if champion else None,
            reason=reason,
            head_to_head=dict(comparison.metrics) if comparison is not None else None,
        )


register_task = task(run, name="register", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=should_retry)


if __name__ == "__main__":  # the head-to-head stage's command (`python -m tasks.register`)
    stage_main(head_to_head)
