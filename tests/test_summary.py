"""The summary `post-train run` prints: every line from the flow's result, the native-format diagnostics included."""

from post_train.cli import format_summary


def summary(evaluation: dict[str, float]) -> dict:
    return {
        "recipe": "lowlr",
        "scale": "demo",
        "data_hash": "abc.dir",
        "data": {},
        "base_model": {"path": "cache/base", "cache_hit": True},
        "sft": {"loss_first": 0.5, "loss_final": 0.3, "kl_to_base_final": 0.09, "entropy_final": 0.24},
        "dpo": {"loss_first": 0.69, "loss_final": 0.04, "rewards/accuracies_final": 1.0, "rewards/margins_final": 5.2},
        "evaluation": evaluation,
        "registration": {"aliases": ["champion"], "promoted": True, "reason": "first version: no champion yet"},
        "champion": True,
        "model_uri": "models:/post-train/1",
        "mlflow_run_uri": "runs:/x",
        "run_dir": "runs/x",
    }


def test_the_summary_shows_native_diagnostics_when_the_evaluation_has_them():
    evaluation = {
        "win_rate/all": 0.461,
        "num_prompts/all": 400,
        "native_kl_to_base/sft/all": 0.0709,
        "native_kl_to_base/dpo/all": 0.1428,
        "retention/sft/held_out": 0.856,
        "retention/dpo/held_out": 0.794,
        "sft_gold_reward/all": 0.904,
        "gold_reward/all": 0.939,
        "reference_gold_reward/all": 0.933,
    }
    lines = format_summary(summary(evaluation)).splitlines()
    assert "  native KL to base    sft 0.0709   dpo 0.1428" in lines
    assert "  retention held out   sft 0.86   dpo 0.79" in lines
    assert "  gold reward all      sft 0.904   dpo 0.939" in lines
    assert any(line.startswith("    all               46.1") for line in lines)


def test_without_a_world_the_native_lines_are_left_out():
    text = format_summary(summary({"win_rate/all": 0.5, "num_prompts/all": 10}))
    assert "native KL" not in text and "retention" not in text and "gold reward all" not in text


def test_a_rerun_that_found_its_weights_registered_says_so_instead_of_a_promotion():
    run = summary({"win_rate/all": 0.5, "num_prompts/all": 10})
    run["registration"] = {"already_registered": True, "promoted": True, "reason": "already registered as version 1"}
    lines = format_summary(run).splitlines()
    assert "  registration         already registered as version 1" in lines
    assert not any(line.startswith("  promotion") for line in lines)
