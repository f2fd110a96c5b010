from pathlib import Path

import pytest

from post_train.config import ConfigError, available_recipes, load_config, parse_overrides


def test_every_recipe_validates_at_every_scale():
    for recipe in available_recipes():
        for scale in ("demo", "smoke"):
            config = load_config(recipe, scale)
            assert config.recipe == recipe and config.scale == scale


def test_lowlr_is_baseline_at_a_quarter_of_the_sft_learning_rate():
    baseline, lowlr = load_config("baseline", "demo"), load_config("lowlr", "demo")
    assert lowlr.sft.learning_rate == pytest.approx(baseline.sft.learning_rate / 4)
    assert lowlr.sft.model_dump(exclude={"learning_rate"}) == baseline.sft.model_dump(exclude={"learning_rate"})
    assert lowlr.dpo == baseline.dpo


def test_overrides_win_over_recipe_and_scale_and_parse_yaml_scalars():
    config = load_config("lowlr", "smoke", ["sft.learning_rate=1e-4", "dpo.loss_params.beta=0.5"])
    assert config.sft.learning_rate == 1e-4
    assert config.dpo.loss_params == {"beta": 0.5}
    assert load_config("lowlr", "smoke", {"sft.epochs": "3"}).sft.epochs == 3


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"sft.learnin_rate": 1e-4}, "sft.learnin_rate: Extra inputs are not permitted"),
        ({"sft.learning_rate": -1e-4}, "sft.learning_rate: Input should be greater than 0"),
        ({"sft.objective": "magic"}, "sft.objective: Value error, unknown SFT objective 'magic'; known: nll, dft"),
        ({"sft.objective_params": {"gamma": 1.0}}, "hyperparameter(s) gamma for SFT objective 'nll'"),
        ({"dpo.loss": "nope"}, "dpo.loss: Value error, unknown preference loss 'nope'"),
        ({"base_model.num_heads": 3}, "base_model: Value error, hidden_size"),
        ({"sft.micro_batch_size": 64}, "micro_batch_size (64) must not exceed batch_size"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config("lowlr", "smoke", overrides)
    assert expected in str(error.value)


def test_unknown_recipe_and_scale_list_the_choices():
    with pytest.raises(ConfigError, match="unknown recipe 'nope'; available: .*baseline.*lowlr"):
        load_config("nope")
    with pytest.raises(ConfigError, match="unknown scale 'huge'; available: demo, smoke"):
        load_config("lowlr", "huge")


def test_recipe_from_a_file_extends_a_named_recipe(tmp_path: Path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("extends: baseline\nsft:\n  learning_rate: 1.0e-3\n")
    config = load_config(str(recipe), "smoke")
    assert config.recipe == "mine" and config.sft.learning_rate == 1e-3 and config.sft.objective == "nll"


def test_a_cycle_of_extends_is_refused(tmp_path: Path):
    (tmp_path / "a.yaml").write_text(f"extends: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"extends: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"), "smoke")


def test_malformed_override_is_refused():
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_overrides(["sft.learning_rate"])


def test_override_values_keep_words_yaml_would_turn_into_booleans():
    assert parse_overrides(["mixed_precision=no", "data.world=null", "sft.seed=3", "compute.use_spot=true"]) == {
        "mixed_precision": "no",
        "data": {"world": None},
        "sft": {"seed": 3},
        "compute": {"use_spot": True},
    }
    assert load_config("lowlr", "smoke", ["mixed_precision=no"]).mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"override sft.objective_params=.*not a valid value"):
        parse_overrides(["sft.objective_params={beta: [1"])
