import math

import pytest

from post_train.evaluation import preference, win_rate
from post_train.generators.base import GenerationSettings, Generator
from post_train.generators.in_process import generate_responses


def test_preference_is_one_half_zero():
    assert preference(0.9, 0.5) == 1.0
    assert preference(0.5, 0.5) == 0.5
    assert preference(0.2, 0.5) == 0.0


def test_win_rate_and_standard_error_follow_alpacaeval():
    preferences = [1.0, 0.0, 0.5, 1.0]
    rate, error = win_rate(preferences)
    assert rate == pytest.approx(0.625)
    sample_std = math.sqrt(sum((p - 0.625) ** 2 for p in preferences) / 3)
    assert error == pytest.approx(sample_std / 2)
    assert win_rate([0.5] * 10) == (0.5, 0.0)  # a model that always ties its reference
    swapped = [1 - p for p in preferences]
    assert win_rate(swapped)[0] == pytest.approx(1 - rate)
    with pytest.raises(ValueError):
        win_rate([])


def test_token_rows_pad_right_for_scoring_and_left_for_generation():
    from post_train.modeling import pad_token_rows

    right_ids, right_mask = pad_token_rows([[5, 6, 7], [8]], pad_token_id=0)
    assert right_ids.tolist() == [[5, 6, 7], [8, 0, 0]] and right_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    left_ids, left_mask = pad_token_rows([[5, 6, 7], [8]], pad_token_id=0, left=True)
    assert left_ids.tolist() == [[5, 6, 7], [0, 0, 8]] and left_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_frozen_models_have_no_gradients_and_sit_in_eval_mode(smoke_stages):
    import torch

    from post_train.modeling import load_frozen, load_model

    _, _, base = smoke_stages
    frozen = load_frozen(base.path, dtype=torch.bfloat16)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}
    assert all(p.requires_grad and p.dtype == torch.float32 for p in load_model(base.path).parameters())


def test_generation_is_batched_reproducible_and_stops_at_eos(smoke_stages):
    from post_train.modeling import load_frozen, load_tokenizer

    _, _, base = smoke_stages
    tokenizer, model = load_tokenizer(base.path), load_frozen(base.path)
    prompts = [[{"role": "user", "content": f"Copy: {'a b c d'[: 2 * n + 1]}"}] for n in range(5)]
    sampled = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=0.9, batch_size=2, seed=3)
    first = generate_responses(model, tokenizer, prompts, sampled)
    assert first == generate_responses(model, tokenizer, prompts, sampled)
    assert len(first) == 5 and all("<|" not in text for text in first)
    greedy = GenerationSettings(max_new_tokens=12, temperature=0.0, top_p=1.0, batch_size=5, seed=0)
    one_by_one = GenerationSettings(max_new_tokens=12, temperature=0.0, top_p=1.0, batch_size=1, seed=0)
    # Left padding must not change what a prompt generates.
    assert generate_responses(model, tokenizer, prompts, greedy) == generate_responses(
        model, tokenizer, prompts, one_by_one
    )


# --------------------------------------------------------------------------------------------- diagnostics

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from post_train.config import ConfigError, load_config  # noqa: E402
from post_train.evaluation import held_out_pairs, implicit_reward_diagnostics, prefix_value  # noqa: E402


def test_prefix_value_is_the_gold_reward_of_the_best_completion():
    from post_train.world.reward import gold_reward

    instruction = "Reverse: a b c d"  # target d c b a
    assert prefix_value(instruction, "") == 1.0
    assert prefix_value(instruction, "d c") == 1.0
    assert prefix_value(instruction, "d a") == pytest.approx(0.75)  # best: d a b a
    assert prefix_value(instruction, "d a") == gold_reward(instruction, "d a b a")
    assert prefix_value(instruction, "d c b a e") == pytest.approx(0.8) == gold_reward(instruction, "d c b a e")
    assert prefix_value(instruction, "a") == pytest.approx(0.75)


def test_held_out_pairs_come_from_the_eval_prompts_ordered_by_gold_reward(smoke_stages):
    from post_train.data import load_dataset_checked
    from post_train.world.reward import gold_reward

    _, data, _ = smoke_stages
    examples = load_dataset_checked(data.eval, "eval")
    pairs = held_out_pairs(examples, seed=0)
    assert len(pairs) >= len(examples) - 2 and pairs == held_out_pairs(examples, seed=0)
    assert {p.split for p in pairs} == {"in_distribution", "held_out"}
    for pair in pairs:
        assert gold_reward(pair.instruction, pair.chosen) > gold_reward(pair.instruction, pair.rejected)
        assert pair.instruction in {e.prompt[-1]["content"] for e in examples}


def _tuned_copy(base_path: str, directory: Path, prompts, responses, steps: int = 80):
    """The base model after `steps` of SFT on `responses`: a policy that the diagnostics should tell from its base."""
    import torch

    from post_train.evaluation import completion_batch
    from post_train.modeling import load_model, load_tokenizer, target_logprobs

    tokenizer, model = load_tokenizer(base_path), load_model(base_path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = completion_batch(tokenizer, prompts, responses, 96)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        logps, mask = target_logprobs(model, batch)
        loss = -(logps * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


@pytest.fixture(scope="module")
def tuned_model(smoke_stages, tmp_path_factory):
    """The smoke base model tuned on the *correct* answers of the evaluation prompts: a model that
    beats the references and its base. Made once per session (tests/test_registry.py uses it too)."""
    from post_train.data import load_dataset_checked
    from post_train.modeling import load_frozen, load_tokenizer
    from post_train.world.families import parse_task

    _, data, base = smoke_stages
    directory = tmp_path_factory.getbasetemp() / "tuned-on-answers"
    if (directory / "model.safetensors").is_file():
        return str(directory), load_frozen(str(directory)), load_tokenizer(str(directory))
    examples = load_dataset_checked(data.eval, "eval")
    answers = [parse_task(e.prompt[-1]["content"]).answer for e in examples]
    scratch = tmp_path_factory.mktemp("tuning")
    model, tokenizer = _tuned_copy(base.path, scratch, [e.prompt for e in examples], answers)
    scratch.rename(directory)
    return str(directory), model, tokenizer


def test_implicit_reward_and_q_value_checks_tell_a_better_policy_from_its_base(smoke_stages, tuned_model):
    from post_train.data import load_dataset_checked
    from post_train.modeling import load_frozen

    _, data, base = smoke_stages
    _, model, tokenizer = tuned_model
    reference = load_frozen(base.path)
    pairs = held_out_pairs(load_dataset_checked(data.eval, "eval"), seed=0)
    found = implicit_reward_diagnostics(model, reference, tokenizer, pairs, max_length=96)
    assert found["accuracy/all"] >= 0.8 and found["margin/all"] > 0
    assert found["q_spearman"] > 0.1  # log π/π_ref of prefixes ranks them by their gold value
    same = implicit_reward_diagnostics(reference, reference, tokenizer, pairs, max_length=96)
    assert same["accuracy/all"] == 0.0 and same["margin/all"] == 0.0  # r̂ ≡ 0: no pair is strictly ordered


def test_evaluate_reports_win_rates_diagnostics_and_artifacts(smoke_stages, tuned_model, mlflow_store, tmp_path):
    from mlflow import MlflowClient

    from tasks import evaluate
    from tests.test_mlflow_ui import dataset_inputs, system_metric_keys

    config, data, base = smoke_stages
    tuned_path, _, _ = tuned_model
    # The tuned model plays DPO, the base plays both SFT and base.
    result = evaluate.run(
        config, tuned_path, data, str(tmp_path), reference_model_path=base.path, base_model_path=base.path
    )
    metrics = result.metrics
    for split in ("in_distribution", "held_out", "all"):
        for key in (
            "win_rate",
            "win_rate_discrete",
            "win_rate_se",
            "win_rate_ci_low",
            "win_rate_ci_high",
            "lc_win_rate",
        ):
            assert 0.0 <= metrics[f"{key}/{split}"] <= 1.0, key
        assert (
            metrics[f"win_rate_ci_low/{split}"] <= metrics[f"win_rate/{split}"] <= metrics[f"win_rate_ci_high/{split}"]
        )
        assert metrics[f"avg_length/{split}"] > 0 and metrics[f"reference_avg_length/{split}"] > 0
    assert metrics["num_prompts/all"] == metrics["num_prompts/in_distribution"] + metrics["num_prompts/held_out"]
    assert metrics["kl_to_base/dpo"] > 0 and metrics["kl_to_sft/dpo"] == pytest.approx(metrics["kl_to_base/dpo"])
    assert metrics["kl_to_base/sft"] == pytest.approx(0.0, abs=1e-6) and metrics["entropy/sft"] == pytest.approx(
        metrics["entropy/base"]
    )
    assert metrics["implicit_reward_accuracy/dpo_vs_sft/all"] >= 0.8
    assert metrics["implicit_reward_accuracy/sft_vs_base/all"] == 0.0
    assert metrics["q_value_spearman/dpo_vs_sft"] > 0.1
    for split in ("in_distribution", "held_out", "all"):  # the base plays SFT: no drift in its own format
        for model in ("base", "sft", "dpo"):
            assert 0.0 <= metrics[f"native_accuracy/{model}/{split}"] <= 1.0
        assert metrics[f"native_accuracy/sft/{split}"] == metrics[f"native_accuracy/base/{split}"]
        assert math.isnan(metrics[f"retention/sft/{split}"]) or metrics[f"retention/sft/{split}"] == 1.0
        assert metrics[f"native_kl_to_base/sft/{split}"] == pytest.approx(0.0, abs=1e-6)
        assert metrics[f"native_kl_to_base/dpo/{split}"] > 0
        gain = metrics[f"gold_reward/{split}"] - metrics[f"sft_gold_reward/{split}"]
        assert metrics[f"dpo_gain/gold_reward/{split}"] == pytest.approx(gain)

    samples = json.loads((tmp_path / "eval_samples.json").read_text())
    assert {"prompt", "response", "reference", "preference", "verdict", "gold_reward", "sft_gold_reward"} <= set(
        samples
    )
    sft_rewards = samples["sft_gold_reward"]
    assert metrics["sft_gold_reward/all"] == pytest.approx(sum(sft_rewards) / len(sft_rewards))
    assert set(samples["verdict"]) <= {"response", "reference", "draw"}
    client = MlflowClient(mlflow_store)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"eval_samples.json", "win_rates.png", "diagnostics.png"} <= artifacts
    logged = client.get_run(result.run_id).data.metrics
    assert logged["lc_win_rate/all"] == pytest.approx(metrics["lc_win_rate/all"])
    run = client.get_run(result.run_id)
    assert dataset_inputs(run) == {"eval": (data.hashes["eval"], "evaluation", str(Path(data.eval).resolve()))}
    assert system_metric_keys(run) == set()  # only the training stages sample the machine


def test_the_vllm_backend_fails_clearly_when_vllm_is_missing(smoke_stages, mlflow_store, tmp_path, monkeypatch):
    import builtins

    from mlflow import MlflowClient

    from tasks import evaluate, head_to_head

    config, data, base = smoke_stages
    config = load_config(
        "lowlr",
        "smoke",
        {
            "data.dvc_root": config.data.dvc_root,
            "cache_dir": config.cache_dir,
            "runs_dir": config.runs_dir,
            "evaluation.backend": "vllm",
        },
    )
    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):  # vllm is not installable here; make sure of it everywhere
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    output = tmp_path / "outputs"
    output.mkdir()
    with pytest.raises(
        ConfigError, match="evaluation.backend is vllm, but vllm is not installed.*evaluation.backend: transformers"
    ):
        evaluate.run(config, base.path, data, str(output))
    with pytest.raises(ConfigError, match="evaluation.backend is vllm, but vllm is not installed"):
        head_to_head.run(config, base.path, base.path, data, str(output))
    # Before any work: neither stage wrote a file or started an MLflow run.
    client = MlflowClient(mlflow_store)
    assert not any(output.iterdir()) and not client.search_runs([e.experiment_id for e in client.search_experiments()])


class OwnWeightsGenerator(Generator):
    """Loads the model itself, one prompt at a time, and lends the caller none: the case of vLLM, which cannot run
    here, through the evaluate stage."""

    generated_for: list[str] = []

    def generate(self, model_path, tokenizer, prompts, settings, model=None):
        from post_train.modeling import load_frozen

        assert model is None  # it offered none to share
        self.generated_for.append(model_path)
        loaded = load_frozen(model_path)
        return [generate_responses(loaded, tokenizer, [prompt], settings)[0] for prompt in prompts]


def test_a_generator_is_one_class_and_one_registry_entry_and_the_stage_treats_all_alike(
    smoke_stages, tuned_model, mlflow_store, tmp_path, monkeypatch
):
    from post_train.generators import GENERATORS
    from tasks import evaluate

    config, data, base = smoke_stages
    tuned_path, _, _ = tuned_model
    monkeypatch.setitem(GENERATORS, "own_weights", "tests.test_evaluation:OwnWeightsGenerator")
    OwnWeightsGenerator.generated_for.clear()
    found = {}
    for backend in ("transformers", "own_weights"):
        overrides = {"data.dvc_root": config.data.dvc_root, "cache_dir": config.cache_dir, "runs_dir": config.runs_dir}
        configured = load_config("lowlr", "smoke", {**overrides, "evaluation.backend": backend})
        (tmp_path / backend).mkdir()
        found[backend] = evaluate.run(
            configured,
            tuned_path,
            data,
            str(tmp_path / backend),
            reference_model_path=base.path,
            base_model_path=base.path,
        ).metrics
    assert OwnWeightsGenerator.generated_for == [tuned_path, base.path]  # the evaluated model's, then the SFT one's
    # Greedy text does not depend on the batch, and the diagnostics load what the generator does not lend.
    assert found["own_weights"] == pytest.approx(found["transformers"], nan_ok=True)
    assert "sft_gold_reward/all" in found["own_weights"] and "native_accuracy/dpo/all" in found["own_weights"]


def test_every_registered_generator_loads_and_an_unknown_one_is_refused_with_the_known_ones():
    from post_train.generators import GENERATORS, generator

    assert set(GENERATORS) == {"transformers", "vllm"}
    assert all(isinstance(generator(name), Generator) for name in GENERATORS)  # vllm's module imports no vllm

    with pytest.raises(ConfigError) as error:
        load_config("lowlr", "smoke", {"evaluation.backend": "tgi"})
    assert "evaluation.backend: Value error, unknown generation backend 'tgi'; known: transformers, vllm" in str(
        error.value
    )


def test_the_gold_judge_refuses_prompts_outside_the_demo_world_before_any_work(smoke_stages, tmp_path):
    import dataclasses

    from tasks import evaluate

    config, data, base = smoke_stages
    own = tmp_path / "eval.jsonl"
    own.write_text(json.dumps({"prompt": "Write a haiku about DVC.", "reference": "..."}) + "\n")
    with pytest.raises(ConfigError, match="gold scores demo-world prompts only.*reward_model or llm"):
        evaluate.run(config, base.path, dataclasses.replace(data, eval=str(own)), str(tmp_path))
