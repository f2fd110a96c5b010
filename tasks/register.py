"""Stage 6, register: the final model becomes a new version of the registered model.

The version gets the alias `challenger` (`registry.challenger_alias`), tags (recipe, data hash, git
commit, flow run id, judge, win rates, what it is comparable on: `post_train.registry`) and a short model card as
its description. It becomes the `champion` (`registry.champion_alias`) when

- there is no champion yet (the first version) and its win rate against the references (`win_rate/all`) is at
  least `registry.min_win_rate` (default 0.1), or
- the champion is comparable with it (the same evaluation set, judge and judge settings, tokenizer and chat
  template; `post_train.registry.COMPARABLE_ON`; the base model may differ) and its head-to-head win rate against
  the champion is above 50%, at least `registry.min_effect` (default 0.02) above 50% for the soft and the discrete
  win rate alike, and the lower bound of its bootstrap confidence interval is above
  `registry.promotion_ci_lower_bound` (default 0.5). Head to head: both models generate for every evaluation
  prompt (the recipe's generation settings) and the recipe's judge compares the two outputs, the challenger's as
  the candidate and the champion's as the baseline (`tasks/head_to_head.py`, a stage of its own that the flow runs
  before this one, only against a comparable champion).

A model whose weights (`post_train.registry.weights_sha256`) an existing version holds already is not registered
again: the stage returns that version, as it stands (`Registration.already_registered`), so a rerun whose stages
all came from the cache makes no duplicate.

A model that a training stage made worse than it started (`TrainedModel.regressions`) is flagged (tag
`regressed`, a line in the card) and not promoted unless `registry.promote_regressed`. The decision is
taken and applied under `registry_lock`, against the champion as it is then: a run whose head-to-head
met a champion that has since been replaced (or that found none, where there now is one) is not promoted.

The version is an MLflow model of the `transformers` flavor (`log_model`): `mlflow.pyfunc.load_model`,
`mlflow.transformers.load_model` and `mlflow models serve` take `models:/<name>@champion`, and it answers
OpenAI-style chat requests (MLflow's `llm/v1/chat` task, the tokenizer's chat template) with the evaluation's
decoding settings.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.models.model import ModelInfo
from packaging.version import Version

from post_train.config import EvaluationSettings, PipelineConfig, RegistryConfig
from post_train.data import describe_counts
from post_train.modeling import load_tokenizer
from post_train.provenance import git_commit
from post_train.registry import (
    BASE_MODEL_FINGERPRINT_TAG,
    BASE_MODEL_TAG,
    EVAL_TAG,
    JUDGE_FINGERPRINT_TAG,
    TOKENIZER_TAG,
    WEIGHTS_TAG,
    comparability_tags,
    version_with_weights,
    weights_sha256,
)
from post_train.results import ALL, HEAD_TO_HEAD, Champion, HeadToHead, PreparedData, Registration, splits_in
from post_train.stage_io import stage_main
from post_train.tracking import current_champion, registry_lock, regression_tags, stage_run, tracking_uri

LOGGER = logging.getLogger(__name__)

WIN_RATE_TAG = "win_rate"
EXAMPLE_PROMPT = "Reverse: c a f b"  # a demo-world instruction: the input example shows the request's shape
SERVING_PACKAGES = ("torch", "transformers", "tokenizers", "jinja2")  # jinja2 renders the chat template


def pinned_requirements(packages: tuple[str, ...] = SERVING_PACKAGES) -> list[str]:
    """`package==<installed version>` for each package the logged model needs to load and answer (MLflow adds its own
    pin), without local version labels (`torch 2.13.0+cpu` → `torch==2.13.0`) so that pip can install them from PyPI."""
    return [f"{package}=={Version(importlib.metadata.version(package)).public}" for package in packages]


def decoding(evaluation: EvaluationSettings) -> dict[str, Any]:
    """The evaluation's decoding settings as `generate` arguments, the served model's defaults (a request's
    `max_tokens`, `temperature`, `top_p` override them): greedy when `temperature` is 0."""
    if evaluation.temperature == 0:
        return {"max_new_tokens": evaluation.max_new_tokens, "do_sample": False}
    return {
        "max_new_tokens": evaluation.max_new_tokens,
        "do_sample": True,
        "temperature": evaluation.temperature,
        "top_p": evaluation.top_p,
    }


def log_transformers_model(model_path: str, evaluation: EvaluationSettings) -> ModelInfo:
    """Log the checkpoint at `model_path` to the active run as an MLflow model (`transformers` flavor, name `model`).

    With a chat template the model takes MLflow's `llm/v1/chat` task (OpenAI chat signature: `messages` in, `choices`
    out); without one (a model trained on text-format data) `llm/v1/completions` (`prompt` in). The weights are
    loaded once, in the checkpoint's dtype: MLflow's way of logging a checkpoint directory without loading it
    (`transformers_model=<path>`) fails with transformers 5 (`pipelines.check_task` names the pipeline class by a
    string), and its check of the input example (`validate_serving_input`) would load the saved copy again, so it is
    off; the pip requirements are given, so MLflow does not load the model to infer them either.
    """
    from transformers import AutoModelForCausalLM

    path = str(Path(model_path).resolve())  # the model's name_or_path: never taken for a Hub repository id
    tokenizer = load_tokenizer(path)
    chat = tokenizer.chat_template is not None
    example = {"messages": [{"role": "user", "content": EXAMPLE_PROMPT}]} if chat else {"prompt": EXAMPLE_PROMPT}
    return Model.log(
        artifact_path=None,
        name="model",
        flavor=mlflow.transformers,
        transformers_model={"model": AutoModelForCausalLM.from_pretrained(path, dtype="auto"), "tokenizer": tokenizer},
        task="llm/v1/chat" if chat else "llm/v1/completions",
        input_example=example,
        model_config=decoding(evaluation),
        pip_requirements=pinned_requirements(),
        validate_serving_input=False,
    )


def first_version_decision(win_rate: float, min_win_rate: float) -> tuple[bool, str]:
    """(promote?, why) with no champion yet: when the win rate against the references is at least `min_win_rate`."""
    if win_rate < min_win_rate:
        return False, (
            f"first version, but its win rate against the references {100 * win_rate:.1f}% is below "
            f"registry.min_win_rate {100 * min_win_rate:.1f}%"
        )
    return True, "first version: no champion yet"


def _at_least(value: float, bound: float) -> bool:
    """value >= bound, a difference of float rounding (0.57 - 0.5 = 0.0699...) counting as equal."""
    return value >= bound or math.isclose(value, bound)


def promotion_decision(comparison: HeadToHead, ci_lower_bound: float, min_effect: float = 0.0) -> tuple[bool, str]:
    """(promote?, why) against a comparable champion: a head-to-head win rate above 50% whose confidence interval's
    lower bound is above `ci_lower_bound`, and an effect (win rate - 0.5) of at least `min_effect` for the soft win
    rate and the discrete one (each preference rounded to a win, draw or loss) alike."""
    rate, low, high, discrete = comparison.win_rate, comparison.ci_low, comparison.ci_high, comparison.win_rate_discrete
    interval = (
        f"head-to-head win rate {100 * rate:.1f}% (CI {100 * low:.1f}-{100 * high:.1f}%, "
        f"discrete {100 * discrete:.1f}%)"
    )
    if rate <= 0.5:
        return False, f"{interval} is not above 50%"
    if low <= ci_lower_bound:
        return False, f"{interval}: the CI's lower bound is not above {100 * ci_lower_bound:.1f}%"
    small = [name for name, value in (("soft", rate), ("discrete", discrete)) if not _at_least(value - 0.5, min_effect)]
    if small:
        return False, (
            f"{interval}: the {' and '.join(small)} effect over 50% is below registry.min_effect "
            f"{100 * min_effect:.1f} points"
        )
    return True, (
        f"{interval} is above 50% with the CI's lower bound above {100 * ci_lower_bound:.1f}% "
        f"and an effect of at least {100 * min_effect:.1f} points"
    )


def decide(
    registry: RegistryConfig,
    win_rate: float,
    comparison: HeadToHead | None,
    champion: Champion | None,
    champion_now: str | None,
    regressions: list[str],
) -> tuple[bool, str]:
    """(promote?, why), taken under the registry lock: `first_version_decision` when no champion was met, else
    `promotion_decision` against a comparable `champion`; never when a training stage made the model worse (and
    `registry.promote_regressed` is off) or the champion is no longer the one the run met."""
    if regressions and not registry.promote_regressed:
        return False, (
            f"a training stage ended worse than it started ({'; '.join(regressions)}); "
            "registry.promote_regressed: true would promote it anyway"
        )
    compared_with = champion.version if champion is not None else None
    if champion_now != compared_with:
        then = f"version {compared_with}" if compared_with else "no champion"
        now = f"version {champion_now}" if champion_now else "none"
        return False, f"this run met {then}, but another run changed the champion since (now {now}); rerun to meet it"
    if champion is None:
        return first_version_decision(win_rate, registry.min_win_rate)
    if champion.incomparable:
        return False, (
            f"not comparable with champion version {champion.version}: {'; '.join(champion.incomparable)}; no "
            "head-to-head was run (give this dataset or model a registry.model_name of its own, or move the "
            "champion alias by hand)"
        )
    if comparison is None:
        return False, f"no head-to-head against champion version {champion.version} was run"
    return promotion_decision(comparison, registry.promotion_ci_lower_bound, registry.min_effect)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def model_card(
    config: PipelineConfig,
    data_hash: str,
    commit: str,
    win_rate: float,
    metrics: dict[str, float] | None,
    comparison: HeadToHead | None,
    champion_version: str | None,
    promote: bool,
    reason: str,
    regressions: list[str],
    data_counts: dict[str, float] | None = None,
    comparable_on: dict[str, str] | None = None,
) -> str:
    """A short markdown model card: what was trained on what (and which rows were dropped or truncated, by reason),
    what it is comparable on (`comparable_on`: its `post_train.registry` tags), how it scored, and any stage that
    got worse."""
    identity = comparable_on or {}
    lines = [
        f"**{config.registry.model_name}** — recipe `{config.recipe}` at scale `{config.scale}` "
        f"(SFT `{config.sft.objective}` lr {config.sft.learning_rate:g}, "
        f"DPO `{config.dpo.loss}` {config.dpo.loss_params}).",
        "",
        f"- data hash: `{data_hash}`",
        f"- git commit: `{commit}`",
        f"- judge: `{config.evaluation.judge}`"
        + (f" (settings sha256 `{identity[JUDGE_FINGERPRINT_TAG]}`)" if JUDGE_FINGERPRINT_TAG in identity else ""),
        *(f"- {dataset} data: {counts}" for dataset, counts in describe_counts(data_counts or {})),
        *(
            f"- {what}: `{identity[key]}`"
            for key, what in (
                (EVAL_TAG, "evaluation set hash"),
                (TOKENIZER_TAG, "tokenizer and chat template sha256"),
                (BASE_MODEL_TAG, "base model"),
                (BASE_MODEL_FINGERPRINT_TAG, "base model fingerprint"),
                (WEIGHTS_TAG, "weights sha256"),
            )
            if key in identity
        ),
        "",
        "Win rate against the reference responses (%):",
        "",
        "| split | win rate | ± s.e. | 95% CI | discrete | LC | avg length (ref) | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if metrics:
        for split in splits_in(metrics):

            def get(key: str, split: str = split) -> float | None:
                return metrics.get(f"{key}/{split}")

            lines.append(
                f"| {split} | {_percent(get('win_rate'))} | {_percent(get('win_rate_se'))} | "
                f"{_percent(get('win_rate_ci_low'))}–{_percent(get('win_rate_ci_high'))} | "
                f"{_percent(get('win_rate_discrete'))} | {_percent(get('lc_win_rate'))} | "
                f"{get('avg_length') or 0:.0f} ({get('reference_avg_length') or 0:.0f}) | "
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
    for regression in regressions:
        lines.append(f"**Flagged**: {regression}.")
    lines.append(f"**{'Promoted to' if promote else 'Not promoted to'} `{config.registry.champion_alias}`**: {reason}.")
    return "\n".join(lines)


def already_registered(
    client: MlflowClient, registry: RegistryConfig, existing: ModelVersion, weights: str, champion: Champion | None
) -> Registration:
    """The registration of weights that version `existing` holds already: that version, as it stands (its aliases
    and its own promotion decision), recorded in the active register run."""
    version = client.get_model_version(registry.model_name, existing.version)  # a search's versions lack aliases
    is_champion = registry.champion_alias in version.aliases
    standing = (
        f"it is `{registry.champion_alias}`"
        if is_champion
        else f"it is not `{registry.champion_alias}` ({version.tags.get('promotion_reason', 'no decision recorded')})"
    )
    reason = (
        f"already registered as version {version.version} (the same weights, {WEIGHTS_TAG} {weights[:12]}…): "
        f"not registered again; {standing}"
    )
    LOGGER.info("register: %s", reason)
    mlflow.log_params({"registered_model": registry.model_name, "version": version.version, "already_registered": True})
    mlflow.set_tags({"promotion_reason": reason, WEIGHTS_TAG: weights})
    return Registration(
        name=registry.model_name,
        version=str(version.version),
        model_uri=f"models:/{registry.model_name}/{version.version}",
        is_champion=is_champion,
        previous_champion=champion.version if champion is not None else None,
        reason=reason,
        already_registered=True,
        aliases=tuple(version.aliases),
    )


def run(
    config: PipelineConfig,
    model_path: str,
    win_rate: float,
    data: PreparedData,
    flow_run_id: str | None = None,
    parent_run_id: str | None = None,
    metrics: dict[str, float] | None = None,
    champion: Champion | None = None,
    comparison: HeadToHead | None = None,
    regressions: list[str] | None = None,
    data_counts: dict[str, float] | None = None,
    base_model_path: str | None = None,
) -> Registration:
    """Register `model_path` as a new version (alias challenger) and promote it to champion when it beats `champion`;
    return the existing version instead when one holds the same weights.

    `win_rate` and `metrics` are the evaluate stage's (against the references); `data` is the prepared data (its
    hash and the evaluation set's are tags); `champion` is the champion the flow fetched (None: there is none yet),
    `comparison` the head-to-head against it (None where `champion.needs_head_to_head` is false);
    `regressions` says how the training stages that made the model ended worse than they started;
    `data_counts` are their `data/...` counts (rows used, dropped and truncated by reason); `base_model_path` is
    the model training started from.
    """
    registry = config.registry
    name, alias = registry.model_name, registry.champion_alias
    client = MlflowClient(tracking_uri())
    if champion is not None and champion.needs_head_to_head and comparison is None:
        raise ValueError(
            f"a champion ({name} version {champion.version}) exists: registering needs the head-to-head against it"
        )
    regressions = list(regressions or [])
    weights = weights_sha256(model_path)
    identity = {**comparability_tags(config, data.hashes["eval"], model_path, base_model_path), WEIGHTS_TAG: weights}
    commit = git_commit()
    with stage_run("register", parent_run_id) as run:
        existing = version_with_weights(client, name, weights)  # before logging: a cached rerun logs no model
        if existing is not None:
            return already_registered(client, registry, existing, weights, champion)
        logged = log_transformers_model(model_path, config.evaluation)
        with registry_lock(client, name):  # from reading the champion to moving the aliases
            try:
                client.get_registered_model(name)
            except MlflowException:
                client.create_registered_model(name, description="Models post-trained by the post-train pipeline.")
            existing = version_with_weights(client, name, weights)  # a run at the same instant registered them
            if existing is not None:
                return already_registered(client, registry, existing, weights, champion)
            current = current_champion(client, name, alias)
            promote, reason = decide(
                registry, win_rate, comparison, champion, str(current.version) if current else None, regressions
            )
            tags: dict[str, Any] = {
                "recipe": config.recipe,
                "scale": config.scale,
                "data_hash": data.data_hash,
                "git_commit": commit,
                "flow_run_id": flow_run_id or "none",
                **identity,
                WIN_RATE_TAG: f"{win_rate:.4f}",
                "promoted": str(promote).lower(),
                "promotion_reason": reason,
                **regression_tags(regressions),
            }
            for key in ("lc_win_rate", "win_rate_ci_low", "win_rate_ci_high"):
                if metrics and f"{key}/{ALL}" in metrics:
                    tags[key] = f"{metrics[f'{key}/{ALL}']:.4f}"
            if comparison is not None:
                tags.update(
                    {
                        "head_to_head_vs": str(champion.version),
                        "head_to_head_win_rate": f"{comparison.win_rate:.4f}",
                        "head_to_head_win_rate_discrete": f"{comparison.win_rate_discrete:.4f}",
                        "head_to_head_ci_low": f"{comparison.ci_low:.4f}",
                        "head_to_head_ci_high": f"{comparison.ci_high:.4f}",
                    }
                )
            card = model_card(
                config,
                data.data_hash,
                commit,
                win_rate,
                metrics,
                comparison,
                str(champion.version) if champion else None,
                promote,
                reason,
                regressions,
                data_counts,
                identity,
            )
            version = client.create_model_version(
                name,
                source=logged.model_uri,
                run_id=run.info.run_id,
                model_id=logged.model_id,
                tags=tags,
                description=card,
            )
            client.set_registered_model_alias(name, registry.challenger_alias, version.version)
            if promote:
                client.set_registered_model_alias(name, alias, version.version)
        LOGGER.info("register: %s version %s, promoted %s: %s", name, version.version, promote, reason)
        mlflow.log_params({"registered_model": name, "version": version.version, "promoted": promote})
        mlflow.set_tags({"promotion_reason": reason, WEIGHTS_TAG: weights, **regression_tags(regressions)})
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
            aliases=(registry.challenger_alias, alias) if promote else (registry.challenger_alias,),
        )


if __name__ == "__main__":
    stage_main(run)
