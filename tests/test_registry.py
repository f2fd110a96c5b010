"""The registry: challenger and champion aliases, promotion on a head-to-head win rate with a CI, model cards,
and loading the champion back into transformers. Real tiny models; the judge is the gold reward, or the
real llm judge against a local HTTP endpoint where a soft preference is needed."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from post_train.config import load_config
from post_train.results import HeadToHead
from tasks import fetch_champion, head_to_head, register
from tasks.register import promotion_decision
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


def register_model(config, model_path: str, win_rate: float, data, scratch: Path, **extra):
    """What the flow does, in this process: fetch the champion, meet it head to head, register."""
    champion = fetch_champion.run(config, str(scratch))
    comparison = head_to_head.run(config, model_path, champion.path, data, str(scratch)) if champion else None
    return register.run(config, model_path, win_rate, data.data_hash, champion=champion, comparison=comparison, **extra)


def aliases(client: MlflowClient, version: str) -> set[str]:
    return set(client.get_model_version("post-train", version).aliases)


def test_the_first_version_becomes_champion_and_a_tie_does_not_take_over(smoke_stages, mlflow_store, tmp_path):
    config, data, base = smoke_stages
    client = MlflowClient(mlflow_store)
    first = register_model(config, base.path, 0.40, data, tmp_path, flow_run_id="run-0")
    assert first.is_champion and first.previous_champion is None and first.head_to_head is None
    assert aliases(client, "1") == {"champion", "challenger"}
    champion = client.get_model_version_by_alias("post-train", "champion")
    assert champion.tags["recipe"] == "lowlr" and champion.tags["data_hash"] == data.data_hash
    assert champion.tags["flow_run_id"] == "run-0" and len(champion.tags["git_commit"]) in (40, 7)
    assert float(champion.tags["win_rate"]) == 0.4 and champion.tags["promoted"] == "true"
    assert "| split | win rate |" in champion.description and "first version" in champion.description

    # The same model again: every output is identical, every verdict a draw, 50% is not above 50%.
    second = register_model(config, base.path, 0.90, data, tmp_path, flow_run_id="run-1")
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


def test_a_challenger_that_beats_the_champion_head_to_head_is_promoted(
    smoke_stages, silent_model, tuned_model, mlflow_store, tmp_path
):  # noqa: F811
    config, data, _ = smoke_stages
    tuned_path, _, _ = tuned_model
    client = MlflowClient(mlflow_store)
    register_model(config, silent_model, 0.0, data, tmp_path)
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


def test_the_confidence_bound_decides_with_a_soft_llm_judge(
    smoke_stages, silent_model, mlflow_store, tmp_path, monkeypatch
):
    """The judge prefers the longer output with probability 0.8: win rate 80%, CI 80-80%."""
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
        usual = load_config("lowlr", "smoke", judge)
        assert usual.registry.promotion_ci_lower_bound == 0.5
        register_model(usual, silent_model, 0.0, data, tmp_path)
        refused = register_model(strict, base.path, 0.5, data, tmp_path)
        asked = len(server.requests)
        promoted = register_model(usual, base.path, 0.5, data, tmp_path)
    finally:
        server.close()
    assert refused.head_to_head["head_to_head/win_rate/all"] == pytest.approx(0.8)
    assert not refused.is_champion and "lower bound is not above 85.0%" in refused.reason
    assert promoted.is_champion and promoted.previous_champion == "1"
    assert len(server.requests) == asked > 0  # the second head-to-head was answered from the judge's cache
    client = MlflowClient(mlflow_store)
    assert str(client.get_model_version_by_alias("post-train", "champion").version) == "3"


def test_promotion_rule():
    def outcome(rate, low, high, threshold=0.5):
        metrics = {
            "head_to_head/win_rate/all": rate,
            "head_to_head/win_rate_ci_low/all": low,
            "head_to_head/win_rate_ci_high/all": high,
        }
        return promotion_decision(HeadToHead(metrics, run_id=""), threshold)[0]

    assert promotion_decision(None, 0.5) == (True, "first version: no champion yet")
    assert outcome(0.60, 0.52, 0.68)
    assert not outcome(0.56, 0.48, 0.64)  # better on average, but not surely
    assert not outcome(0.50, 0.50, 0.50)
    assert outcome(0.52, 0.46, 0.58, threshold=0.45)  # a looser bound
    assert not outcome(0.49, 0.46, 0.52, threshold=0.45)  # never below 50%


def test_registering_against_a_champion_needs_the_head_to_head(smoke_stages, mlflow_store, tmp_path):
    config, data, base = smoke_stages
    assert fetch_champion.run(config, str(tmp_path)) is None
    register.run(config, base.path, 0.5, data.data_hash)
    champion = fetch_champion.run(config, str(tmp_path))
    assert champion.version == "1" and (Path(champion.path) / "config.json").is_file()
    with pytest.raises(ValueError, match="registering needs the head-to-head against it"):
        register.run(config, base.path, 0.5, data.data_hash, champion=champion)


def test_a_registered_model_loads_back_into_transformers(smoke_stages, mlflow_store, tmp_path):
    import mlflow
    from transformers import TextGenerationPipeline

    from post_train.modeling import load_tokenizer

    config, data, base = smoke_stages
    register.run(config, base.path, 0.5, data.data_hash)
    pipeline = mlflow.transformers.load_model("models:/post-train@champion")
    assert isinstance(pipeline, TextGenerationPipeline)
    components = mlflow.transformers.load_model("models:/post-train@champion", return_type="components")
    model, tokenizer = components["model"], components["tokenizer"]
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template == load_tokenizer(base.path).chat_template is not None
    # The champion fetched for a head-to-head is one checkpoint directory again: weights, config, tokenizer.
    champion = fetch_champion.run(config, str(tmp_path))
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        file.name for file in Path(champion.path).iterdir()
    }
