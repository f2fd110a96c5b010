"""The registry: challenger and champion aliases, promotion on a head-to-head win rate with a CI and a minimum
effect, only between comparable versions, a quality floor for the first champion, no version registered twice,
model cards, loading the champion back into transformers, and retrain's decision. Real tiny models; the judge is
the gold reward, or the real llm judge against a local HTTP endpoint where a soft preference is needed."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.retrain import retrain_decision
from post_train.config import load_config
from post_train.registry import (
    evaluation_identity,
    incomparabilities,
    judge_sha256,
    tokenizer_sha256,
    weights_sha256,
)
from post_train.results import HeadToHead, PreparedData
from tasks import fetch_champion, head_to_head, register
from tasks.register import first_version_decision, promotion_decision
from tests.conftest import smoke_overrides
from tests.test_evaluation import tuned_model  # noqa: F401 (a fixture: the base tuned on the eval answers)
from tests.test_judges import KEY_ENV, SECRET, JudgeServer


@pytest.fixture(scope="module")
def silent_model(smoke_stages, tmp_path_factory) -> str:
    """A real model that answers nothing: the base with its final norm zeroed (all logits 0 → pad → empty text)."""
    import torch

    from post_train.modeling import load_frozen, load_tokenizer

    _, _, base = smoke_stages
    model, tokenizer = load_frozen(base.path), load_tokenizer(base.path)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    directory = tmp_path_factory.mktemp("silent")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def rescaled(model_path: str, directory: Path, factor: float) -> str:
    """A copy of the model at `model_path` whose final norm's weight is `factor` (a power of two) times its own:
    other weights (another `weights_sha256`), the same tokenizer, and the same greedy answers, since every logit is
    scaled by `factor` exactly and so keeps its rank."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(model_path, directory)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
    with torch.no_grad():
        model.model.norm.weight.mul_(factor)
    model.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def twins(smoke_stages, tmp_path_factory) -> list[str]:
    """Four models that answer as the smoke base does, each with weights of its own."""
    _, _, base = smoke_stages
    root = tmp_path_factory.mktemp("twins")
    return [rescaled(base.path, root / f"x{factor}", factor) for factor in (2.0, 4.0, 8.0, 16.0)]


def with_settings(config, **settings):
    """`config` (smoke scale, its workspace) with dotted `settings` on top."""
    return load_config("lowlr", "smoke", {**smoke_overrides(Path(config.cache_dir).parent), **settings})


def register_model(config, model_path: str, win_rate: float, data, scratch: Path, **extra):
    """What the flow does, in this process: fetch the champion, meet it head to head when it can decide, register."""
    champion = fetch_champion.run(config, str(scratch), model_path, data)
    comparison = (
        head_to_head.run(config, model_path, champion.path, data, str(scratch))
        if champion is not None and champion.needs_head_to_head
        else None
    )
    return register.run(config, model_path, win_rate, data, champion=champion, comparison=comparison, **extra)


def aliases(client: MlflowClient, version: str) -> set[str]:
    return set(client.get_model_version("post-train", version).aliases)


def head_to_head_runs(client: MlflowClient) -> int:
    experiment = client.get_experiment_by_name("post-train").experiment_id
    return len(client.search_runs([experiment], filter_string="tags.stage = 'head-to-head'"))


def test_the_first_version_becomes_champion_and_a_tie_does_not_take_over(smoke_stages, twins, mlflow_store, tmp_path):
    config, data, base = smoke_stages
    client = MlflowClient(mlflow_store)
    first = register_model(config, base.path, 0.40, data, tmp_path, flow_run_id="run-0", base_model_path=base.path)
    assert first.is_champion and first.previous_champion is None and first.head_to_head is None
    assert aliases(client, "1") == {"champion", "challenger"}
    champion = client.get_model_version_by_alias("post-train", "champion")
    assert champion.tags["recipe"] == "lowlr" and champion.tags["data_hash"] == data.data_hash
    assert champion.tags["flow_run_id"] == "run-0" and len(champion.tags["git_commit"]) in (40, 7)
    assert float(champion.tags["win_rate"]) == 0.4 and champion.tags["promoted"] == "true"
    assert "| split | win rate |" in champion.description and "first version" in champion.description
    # What it is comparable on, and what it is.
    assert champion.tags["eval_hash"] == data.hashes["eval"] != data.data_hash
    assert champion.tags["judge"] == "gold" and champion.tags["judge_fingerprint"] == judge_sha256(config.evaluation)
    assert champion.tags["tokenizer_sha256"] == tokenizer_sha256(base.path) == tokenizer_sha256(twins[0])
    assert champion.tags["base_model"] == base.path and len(champion.tags["base_model_fingerprint"]) == 64
    assert champion.tags["weights_sha256"] == weights_sha256(base.path) != weights_sha256(twins[0])
    assert f"- evaluation set hash: `{data.hashes['eval']}`" in champion.description

    # A model that answers as the champion does: every verdict a draw, 50% is not above 50%.
    second = register_model(config, twins[0], 0.90, data, tmp_path, flow_run_id="run-1")
    assert not second.is_champion and second.previous_champion == "1"
    assert second.head_to_head["head_to_head/win_rate/all"] == 0.5
    assert (
        second.head_to_head["head_to_head/win_rate_ci_low/all"]
        == second.head_to_head["head_to_head/win_rate_ci_high/all"]
        == 0.5
    )
    assert "not above 50%" in second.reason
    assert aliases(client, "1") == {"champion"} and aliases(client, "2") == {"challenger"}
    version = client.get_model_version("post-train", "2")
    assert version.tags["promoted"] == "false" and version.tags["head_to_head_vs"] == "1"
    assert float(version.tags["head_to_head_win_rate"]) == 0.5
    assert "Not promoted to `champion`" in version.description

    # The champion's own weights again (a rerun whose stages all came from the cache): no download, no head-to-head,
    # no new version; the registration is version 1 as it stands.
    meetings = head_to_head_runs(client)
    assert fetch_champion.run(config, str(tmp_path / "again"), base.path, data).challenger_registered_as == "1"
    assert not (tmp_path / "again").exists()
    again = register_model(config, base.path, 0.40, data, tmp_path, flow_run_id="run-2")
    assert again.already_registered and again.version == "1" and again.is_champion
    assert (
        again.reason.startswith("already registered as version 1 (the same weights")
        and "it is `champion`" in again.reason
    )
    assert again.aliases == ("champion",) and again.head_to_head is None
    assert head_to_head_runs(client) == meetings
    assert sorted(int(v.version) for v in client.search_model_versions("name = 'post-train'")) == [1, 2]
    # The not-promoted twin again: its own decision stands.
    twin = register.run(config, twins[0], 0.90, data)
    assert twin.already_registered and twin.version == "2" and not twin.is_champion
    assert "it is not `champion` (head-to-head win rate 50.0%" in twin.reason
    runs = client.search_runs(
        [client.get_experiment_by_name("post-train").experiment_id], filter_string="tags.stage = 'register'"
    )
    assert sorted(run.data.params.get("already_registered", "False") for run in runs) == [
        "False",
        "False",
        "True",
        "True",
    ]


def test_a_challenger_that_beats_the_champion_head_to_head_is_promoted(
    smoke_stages, silent_model, tuned_model, mlflow_store, tmp_path
):  # noqa: F811
    config, data, _ = smoke_stages
    tuned_path, _, _ = tuned_model
    client = MlflowClient(mlflow_store)
    register_model(with_settings(config, **{"registry.min_win_rate": 0.0}), silent_model, 0.0, data, tmp_path)
    metrics = {
        "win_rate/all": 0.8,
        "win_rate_se/all": 0.05,
        "win_rate_ci_low/all": 0.7,
        "win_rate_ci_high/all": 0.9,
        "lc_win_rate/all": 0.75,
        "num_prompts/all": 16.0,
    }
    result = register_model(config, tuned_path, 0.8, data, tmp_path, metrics=metrics)
    assert result.is_champion and result.previous_champion == "1"
    head_to_head = result.head_to_head
    assert head_to_head["head_to_head/win_rate/all"] > 0.9  # gold reward: right answers against empty ones
    assert head_to_head["head_to_head/win_rate_ci_low/all"] > 0.5
    assert {"head_to_head/win_rate/in_distribution", "head_to_head/lc_win_rate/held_out"} <= set(head_to_head)
    assert aliases(client, "2") == {"champion", "challenger"} and aliases(client, "1") == set()
    version = client.get_model_version("post-train", "2")
    assert version.tags["lc_win_rate"] == "0.7500" and version.tags["promoted"] == "true"
    assert float(version.tags["head_to_head_win_rate_discrete"]) > 0.9
    assert (
        "Promoted to `champion`" in version.description
        and "Head to head against champion version 1" in version.description
    )
    # The head-to-head left its samples and plot in MLflow.
    runs = client.search_runs(
        [client.get_experiment_by_name("post-train").experiment_id], filter_string="tags.stage = 'head-to-head'"
    )
    assert len(runs) == 1
    assert {"head_to_head_samples.json", "head_to_head.png"} <= {
        a.path for a in client.list_artifacts(runs[0].info.run_id)
    }


def test_the_confidence_bound_and_the_minimum_effect_decide_with_a_soft_llm_judge(
    smoke_stages, silent_model, twins, mlflow_store, tmp_path, monkeypatch
):
    """The judge prefers the longer output with probability 0.8: win rate 80%, CI 80-80%, discrete 100%."""
    config, data, base = smoke_stages
    monkeypatch.setenv(KEY_ENV, SECRET)
    server = JudgeServer(confidence=0.8)
    try:
        judge = {
            **smoke_overrides(Path(config.cache_dir).parent),
            "cache_dir": str(tmp_path / "cache"),
            "evaluation.judge": "llm",
            "evaluation.llm.base_url": server.base_url,
            "evaluation.llm.model": "judge-test",
            "evaluation.llm.api_key_env": KEY_ENV,
        }
        strict = load_config("lowlr", "smoke", {**judge, "registry.promotion_ci_lower_bound": 0.85})
        demanding = load_config("lowlr", "smoke", {**judge, "registry.min_effect": 0.35})
        usual = load_config("lowlr", "smoke", judge)
        assert usual.registry.promotion_ci_lower_bound == 0.5 and usual.registry.min_effect == 0.02
        register_model(
            load_config("lowlr", "smoke", {**judge, "registry.min_win_rate": 0.0}), silent_model, 0.0, data, tmp_path
        )
        refused = register_model(strict, base.path, 0.5, data, tmp_path)
        asked = len(server.requests)
        small = register_model(demanding, twins[0], 0.5, data, tmp_path)
        promoted = register_model(usual, twins[1], 0.5, data, tmp_path)
    finally:
        server.close()
    assert refused.head_to_head["head_to_head/win_rate/all"] == pytest.approx(0.8)
    assert refused.head_to_head["head_to_head/win_rate_discrete/all"] == 1.0
    assert not refused.is_champion and "lower bound is not above 85.0%" in refused.reason
    # The CI's lower bound (80%) passes; 30 points over 50% is not the 35 asked for.
    assert not small.is_champion
    assert "the soft effect over 50% is below registry.min_effect 35.0 points" in small.reason
    assert promoted.is_champion and promoted.previous_champion == "1"
    assert len(server.requests) == asked > 0  # the later head-to-heads were answered from the judge's cache
    client = MlflowClient(mlflow_store)
    assert str(client.get_model_version_by_alias("post-train", "champion").version) == "4"


def test_promotion_rule():
    def decision(rate, low, high, threshold=0.5, min_effect=0.0, discrete=None):
        metrics = {
            "head_to_head/win_rate/all": rate,
            "head_to_head/win_rate_ci_low/all": low,
            "head_to_head/win_rate_ci_high/all": high,
            "head_to_head/win_rate_discrete/all": rate if discrete is None else discrete,
        }
        return promotion_decision(HeadToHead(metrics, run_id=""), threshold, min_effect)

    def outcome(*args, **kwargs):
        return decision(*args, **kwargs)[0]

    assert outcome(0.60, 0.52, 0.68)
    assert not outcome(0.56, 0.48, 0.64)  # better on average, but not surely
    assert not outcome(0.50, 0.50, 0.50)
    assert outcome(0.52, 0.46, 0.58, threshold=0.45)  # a looser bound
    assert not outcome(0.49, 0.46, 0.52, threshold=0.45)  # never below 50%
    # A minimum effect, on the soft and the discrete win rate alike, besides the CI bound.
    assert outcome(0.57, 0.52, 0.62, min_effect=0.07)  # 0.57 - 0.5 is 0.0699... in floats: at least 0.07
    assert not outcome(0.511, 0.508, 0.515, min_effect=0.02)  # a weak judge's tight CI around a 1-point effect
    promote, why = decision(0.60, 0.55, 0.65, min_effect=0.02, discrete=0.51)
    assert not promote and "the discrete effect over 50% is below registry.min_effect 2.0 points" in why
    promote, why = decision(0.51, 0.505, 0.515, min_effect=0.02, discrete=0.505)
    assert not promote and "the soft and discrete effect" in why
    # The first version: a floor on the win rate against the references.
    assert first_version_decision(0.1, 0.1) == (True, "first version: no champion yet")
    promote, why = first_version_decision(0.0, 0.1)
    assert not promote and why == (
        "first version, but its win rate against the references 0.0% is below registry.min_win_rate 10.0%"
    )


def test_registering_against_a_champion_needs_the_head_to_head(smoke_stages, twins, mlflow_store, tmp_path):
    config, data, base = smoke_stages
    assert fetch_champion.run(config, str(tmp_path), twins[0], data) is None
    register.run(config, base.path, 0.5, data)
    champion = fetch_champion.run(config, str(tmp_path), twins[0], data)
    assert champion.version == "1" and champion.needs_head_to_head and (Path(champion.path) / "config.json").is_file()
    with pytest.raises(ValueError, match="registering needs the head-to-head against it"):
        register.run(config, twins[0], 0.5, data, champion=champion)


def test_a_first_version_below_the_quality_floor_is_registered_and_not_promoted(
    smoke_stages, silent_model, mlflow_store, tmp_path
):
    config, data, base = smoke_stages
    assert config.registry.min_win_rate == 0.1
    client = MlflowClient(mlflow_store)
    empty = register_model(config, silent_model, 0.05, data, tmp_path)
    assert not empty.is_champion and empty.version == "1" and empty.aliases == ("challenger",)
    assert (
        empty.reason
        == "first version, but its win rate against the references 5.0% is below registry.min_win_rate 10.0%"
    )
    version = client.get_model_version("post-train", "1")
    assert version.tags["promoted"] == "false" and version.tags["promotion_reason"] == empty.reason
    assert "Not promoted to `champion`**: first version, but" in version.description
    # Still no champion: the next version is a first version again, and this one clears the floor.
    good = register_model(config, base.path, 0.4, data, tmp_path)
    assert good.is_champion and good.version == "2" and good.reason == "first version: no champion yet"


def test_promotion_is_refused_across_incomparable_versions_and_no_head_to_head_is_run(
    smoke_stages, twins, mlflow_store, tmp_path
):
    config, data, base = smoke_stages
    client = MlflowClient(mlflow_store)
    llm = {"evaluation.judge": "llm", "evaluation.llm.base_url": "http://127.0.0.1:9/v1"}
    judge_a = with_settings(config, **llm, **{"evaluation.llm.model": "judge-a"})
    judge_b = with_settings(config, **llm, **{"evaluation.llm.model": "judge-b"})
    assert register_model(judge_a, base.path, 0.4, data, tmp_path).is_champion
    other_template = Path(shutil.copytree(twins[2], tmp_path / "other-template"))
    (other_template / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    challengers = [
        # another evaluation set
        (
            judge_a,
            twins[0],
            dataclasses.replace(data, hashes={**data.hashes, "eval": "another-eval-set"}),
            "different evaluation set (`eval_hash`",
        ),
        # the same judge with other settings
        (judge_b, twins[1], data, "different judge settings (`judge_fingerprint`"),
        # another judge
        (config, twins[3], data, "different judge (`judge` gold vs the champion's llm)"),
        # another chat template
        (judge_a, str(other_template), data, "different tokenizer and chat template (`tokenizer_sha256`"),
    ]
    for settings, model_path, challenger_data, why in challengers:
        champion = fetch_champion.run(settings, str(tmp_path / "fetched"), model_path, challenger_data)
        assert champion.version == "1" and champion.path == "" and not champion.needs_head_to_head
        assert any(why in phrase for phrase in champion.incomparable), champion.incomparable
        registration = register.run(settings, model_path, 0.9, challenger_data, champion=champion)
        assert not registration.is_champion and registration.head_to_head is None
        assert registration.reason.startswith("not comparable with champion version 1: ") and why in registration.reason
        version = client.get_model_version("post-train", registration.version)
        assert version.tags["promoted"] == "false" and version.tags["promotion_reason"] == registration.reason
    assert not (tmp_path / "fetched").exists()  # nothing was downloaded
    assert head_to_head_runs(client) == 0
    assert str(client.get_model_version_by_alias("post-train", "champion").version) == "1"


PLAIN_DATA = PreparedData(
    sft="sft.jsonl",
    preferences="preferences.jsonl",
    eval="eval.jsonl",
    data_hash="d" * 32,
    pretrain_corpus=None,
    sizes={},
    hashes={"eval": "e" * 64},
)
"""Prepared data as the decision functions see it: hashes only."""


def test_comparability_is_the_evaluation_set_the_judge_and_the_tokenizer_not_the_base_model():
    config, data = load_config("lowlr", "smoke"), PLAIN_DATA
    mine = {
        **evaluation_identity(config, data.hashes["eval"]),
        "tokenizer_sha256": "t" * 64,
        "base_model": "/models/a",
        "base_model_fingerprint": "a" * 64,
    }
    assert incomparabilities(mine, {**mine, "base_model": "/models/b", "base_model_fingerprint": "b" * 64}) == []
    assert incomparabilities(mine, {**mine, "tokenizer_sha256": "u" * 64}) == [
        f"different tokenizer and chat template (`tokenizer_sha256` {'t' * 12}… vs the champion's {'u' * 12}…)"
    ]
    # A version registered before versions recorded what they are comparable on is comparable on nothing.
    assert incomparabilities(mine, {"data_hash": data.data_hash}) == [
        "the champion records no evaluation set (tag `eval_hash`)",
        "the champion records no judge (tag `judge`)",
        "the champion records no judge settings (tag `judge_fingerprint`)",
        "the champion records no tokenizer and chat template (tag `tokenizer_sha256`)",
    ]


def test_retrain_trains_only_for_changed_data_and_a_champion_it_could_replace():
    config, data = load_config("lowlr", "smoke"), PLAIN_DATA
    same = {
        **evaluation_identity(config, data.hashes["eval"]),
        "tokenizer_sha256": "t" * 64,
        "data_hash": data.data_hash,
    }
    assert retrain_decision(config, data, None, {}) == (True, "no champion models:/post-train@champion yet")
    train, why = retrain_decision(config, data, "3", same)
    assert not train and why == "the champion models:/post-train@champion (version 3) was trained on this data"
    assert retrain_decision(config, data, "3", same, force=True) == (True, "forced")
    train, why = retrain_decision(config, data, "3", {**same, "data_hash": "older-data"})
    assert train and why == "the data changed: champion version 3 has data hash older-data"
    # Changed data, but a champion no model of this configuration could replace: nothing to train for.
    for tags, differs in (
        ({**same, "data_hash": "older-data", "eval_hash": "another-eval-set"}, "different evaluation set"),
        ({**same, "judge_fingerprint": "f" * 64}, "different judge settings"),
        ({"data_hash": "older-data"}, "the champion records no evaluation set"),
    ):
        train, why = retrain_decision(config, data, "3", tags)
        assert not train and differs in why and "is not comparable with this configuration" in why
        assert "registry.model_name of its own, or force=true" in why
        train, why = retrain_decision(config, data, "3", tags, force=True)
        assert train and why.startswith("forced, although the champion") and "registered, not promoted" in why


def test_a_registered_model_loads_back_into_transformers(smoke_stages, twins, mlflow_store, tmp_path):
    import mlflow
    from transformers import TextGenerationPipeline

    from post_train.modeling import load_tokenizer

    config, data, base = smoke_stages
    register.run(config, base.path, 0.5, data)
    pipeline = mlflow.transformers.load_model("models:/post-train@champion")
    assert isinstance(pipeline, TextGenerationPipeline)
    components = mlflow.transformers.load_model("models:/post-train@champion", return_type="components")
    model, tokenizer = components["model"], components["tokenizer"]
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template == load_tokenizer(base.path).chat_template is not None
    # The champion fetched for a head-to-head is one checkpoint directory again: weights, config, tokenizer.
    champion = fetch_champion.run(config, str(tmp_path), twins[0], data)
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        file.name for file in Path(champion.path).iterdir()
    }
    assert tokenizer_sha256(champion.path) == tokenizer_sha256(base.path)  # MLflow's copy tokenizes alike
