"""The `compare` flow and `post_train/comparison.py`: statistics and tables on hand-made numbers,
grid validation, the CLI, and a smoke-scale grid under a real (test) Prefect server."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

# Imported here, not under capsys: the first `from prefect import flow` binds Prefect's log handler to stderr.
import flows.compare
from flows.compare import compare, compare_deployment
from post_train import comparison
from post_train.comparison import Cell
from post_train.config import ConfigError
from post_train.results import splits_in
from tests.conftest import smoke_overrides

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def metrics(rate_all: float, se_all: float, rate_held: float = 0.25, se_held: float = 0.1) -> dict[str, float]:
    """Stage metrics as evaluate returns them (two splits and `all`)."""
    return {
        "win_rate/all": rate_all,
        "win_rate_se/all": se_all,
        "gold_reward/all": 0.8,
        "num_prompts/all": 40,
        "win_rate/in_distribution": 0.75,
        "win_rate_se/in_distribution": 0.05,
        "gold_reward/in_distribution": 0.9,
        "win_rate/held_out": rate_held,
        "win_rate_se/held_out": se_held,
        "gold_reward/held_out": 0.7,
        "reference_gold_reward/all": 0.85,
    }


SFT = {"loss_first": 3.0, "loss_final": 1.0, "kl_to_base_final": 0.125, "entropy_final": 0.5}
DPO = {"loss_first": 0.69, "loss_final": 0.5, "rewards/accuracies_final": 0.75, "rewards/margins_final": 0.2}


# --------------------------------------------------------------------------- statistics


def test_wald_interval_is_rate_plus_minus_1_96_se_clipped_to_the_unit_interval():
    low, high = comparison.wald_interval(0.5, 0.1)
    assert low == pytest.approx(0.5 - 0.196, abs=1e-5) and high == pytest.approx(0.5 + 0.196, abs=1e-5)
    assert comparison.wald_interval(0.95, 0.05) == (pytest.approx(0.95 - 0.098, abs=1e-5), 1.0)
    assert comparison.wald_interval(0.02, 0.05)[0] == 0.0
    assert all(math.isnan(v) for v in comparison.wald_interval(1.0, float("nan")))  # one prompt: no se


def test_t_quantiles_match_students_t():
    assert comparison.t_quantile_975(1) == pytest.approx(12.7062)
    assert comparison.t_quantile_975(2) == pytest.approx(4.3027)
    assert comparison.t_quantile_975(30) == pytest.approx(2.0423, abs=1e-4)
    assert comparison.t_quantile_975(60) == pytest.approx(2.0003, abs=1e-3)  # the expansion beyond the table
    assert comparison.t_quantile_975(10_000) == pytest.approx(1.96, abs=1e-3)
    with pytest.raises(ValueError):
        comparison.t_quantile_975(0)


def test_t_interval_over_seeds():
    summary = comparison.t_interval([0.50, 0.52, 0.54])
    assert summary.n == 3 and summary.mean == pytest.approx(0.52)
    assert summary.sd == pytest.approx(0.02)
    assert summary.se == pytest.approx(0.02 / math.sqrt(3))
    half = 4.3027 * 0.02 / math.sqrt(3)
    assert (summary.low, summary.high) == (pytest.approx(0.52 - half), pytest.approx(0.52 + half))
    wide = comparison.t_interval([0.1, 0.9])  # t(0.975, 1) = 12.7: clipped to [0, 1]
    assert (wide.low, wide.high) == (0.0, 1.0)
    single = comparison.t_interval([0.4])
    assert single.mean == 0.4 and math.isnan(single.sd) and math.isnan(single.low)


# --------------------------------------------------------------------------- tables


def test_result_row_has_win_rates_with_ci_gold_rewards_and_stage_diagnostics():
    row = comparison.result_row(Cell("dft", 2e-3, 1), metrics(0.6, 0.05), SFT, DPO, run_id="abc")
    assert list(row)[:3] == ["objective", "sft_learning_rate", "seed"]
    assert (row["objective"], row["sft_learning_rate"], row["seed"]) == ("dft", 2e-3, 1)
    assert row["win_rate/all"] == 0.6 and row["win_rate_se/all"] == 0.05
    assert row["win_rate_ci95_low/all"] == pytest.approx(0.6 - 1.96 * 0.05, abs=1e-5)
    assert row["win_rate_ci95_high/all"] == pytest.approx(0.6 + 1.96 * 0.05, abs=1e-5)
    assert row["gold_reward/held_out"] == 0.7 and row["win_rate/in_distribution"] == 0.75
    assert (row["sft_kl_to_base"], row["sft_entropy"], row["dpo_reward_accuracy"]) == (0.125, 0.5, 0.75)
    assert row["mlflow_run_id"] == "abc"
    assert splits_in(row) == ["held_out", "in_distribution", "all"]
    assert not any(key.startswith(("num_prompts", "reference_gold")) for key in row)


def seed_rows() -> list[dict]:
    """nll and dft at one learning rate, three seeds each; nll at a second rate with two seeds."""
    rows = []
    for seed, rate in zip((0, 1, 2), (0.50, 0.52, 0.54)):
        rows.append(
            comparison.result_row(
                Cell("nll", 2e-3, seed), metrics(rate, 0.05), {**SFT, "kl_to_base_final": 0.1 * (seed + 1)}, DPO
            )
        )
    for seed, rate in zip((0, 1, 2), (0.60, 0.60, 0.60)):
        rows.append(comparison.result_row(Cell("dft", 2e-3, seed), metrics(rate, 0.05), SFT, DPO))
    for seed, rate in zip((0, 1), (0.40, 0.60)):
        rows.append(comparison.result_row(Cell("nll", 5e-4, seed), metrics(rate, 0.05), SFT, DPO))
    return rows


def test_aggregate_rows_means_over_seeds_with_a_t_interval_on_the_per_seed_win_rates():
    aggregated = comparison.aggregate_rows(seed_rows())
    assert [(r["objective"], r["sft_learning_rate"], r["n_seeds"], r["seeds"]) for r in aggregated] == [
        ("nll", 2e-3, 3, "0 1 2"),
        ("dft", 2e-3, 3, "0 1 2"),
        ("nll", 5e-4, 2, "0 1"),
    ]
    nll, dft, low_lr = aggregated
    half = 4.3027 * 0.02 / math.sqrt(3)
    assert nll["win_rate/all"] == pytest.approx(0.52) and nll["win_rate_sd/all"] == pytest.approx(0.02)
    assert nll["win_rate_ci95_low/all"] == pytest.approx(0.52 - half)
    assert nll["win_rate_ci95_high/all"] == pytest.approx(0.52 + half)
    assert nll["sft_kl_to_base"] == pytest.approx(0.2) and nll["gold_reward/all"] == pytest.approx(0.8)
    # identical win rates over seeds: no seed-to-seed spread, a zero-width interval
    assert dft["win_rate_sd/all"] == 0.0 and dft["win_rate_ci95_low/all"] == dft[
        "win_rate_ci95_high/all"
    ] == pytest.approx(0.6)
    assert low_lr["win_rate/all"] == pytest.approx(0.5)
    assert (low_lr["win_rate_ci95_low/all"], low_lr["win_rate_ci95_high/all"]) == (0.0, 1.0)  # 2 seeds, t = 12.7
    assert low_lr["win_rate/held_out"] == pytest.approx(0.25)


def test_markdown_and_csv_tables(tmp_path: Path):
    rows = [
        comparison.result_row(Cell("nll", 2e-3, 0), metrics(0.5, 0.025), SFT, DPO),
        comparison.result_row(Cell("fdiv:pearson_chi2", 5e-4, 0), metrics(1.0, float("nan")), SFT, DPO),
    ]
    table = comparison.markdown_table(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith(  # `all` last, as in every table (`splits_in`)
        "| objective | SFT lr | seed | win rate held_out % [95% CI] | win rate in_distribution % [95% CI]"
        " | win rate all % [95% CI] |"
    )
    assert lines[2].startswith(
        "| `nll` | 0.002 | 0 | 25.0 [5.4, 44.6] | 75.0 [65.2, 84.8] | 50.0 [45.1, 54.9] | 0.700 |"
    )
    assert "| 100.0 | 0.700 |" in lines[3]  # `all`: no se, no interval
    assert all(line.count("|") == lines[0].count("|") for line in lines)

    path = comparison.write_csv(rows, tmp_path / "results.csv")
    read = list(csv.DictReader(path.open()))
    assert len(read) == 2 and read[0]["objective"] == "nll"
    assert float(read[0]["win_rate_ci95_high/all"]) == pytest.approx(0.5 + 1.96 * 0.025, abs=1e-5)
    assert read[1]["win_rate_ci95_low/all"] == "nan"

    aggregated = comparison.markdown_table(comparison.aggregate_rows(seed_rows()))
    assert aggregated.splitlines()[0].startswith("| objective | SFT lr | seeds |")
    assert "| `nll` | 0.002 | 0 1 2 | 25.0 [25.0, 25.0] | 75.0 [75.0, 75.0] | 52.0 [47.0, 57.0] |" in aggregated
    assert comparison.markdown_table([]) == ""


def test_native_diagnostics_reach_the_table_and_the_means_over_seeds():
    native = {"native_kl_to_base/sft/all": 2.0, "retention/dpo/held_out": 0.5, "dpo_gain/gold_reward/all": 0.06}
    rows = [
        comparison.result_row(Cell("nll", 2e-3, seed), {**metrics(0.5, 0.025), **native}, SFT, DPO) for seed in (0, 1)
    ]
    rows[1]["native_kl_to_base/sft/all"] = 4.0
    assert rows[0]["retention/dpo/held_out"] == 0.5 and rows[0]["arm"] == "nll lr=0.002"
    lines = comparison.markdown_table(rows).splitlines()
    assert lines[0].endswith("| native KL to base (SFT, all) | retention held-out (DPO) | DPO − SFT gold (all) |")
    assert lines[2].endswith("| 2.000 | 0.500 | 0.060 |")
    (aggregated,) = comparison.aggregate_rows(rows)
    assert aggregated["native_kl_to_base/sft/all"] == pytest.approx(3.0)


@pytest.mark.parametrize("several_seeds", [False, True])
def test_plots_are_pngs(tmp_path: Path, several_seeds: bool):
    rows = seed_rows() if several_seeds else [r for r in seed_rows() if r["seed"] == 0]
    plots = comparison.write_plots(rows, tmp_path)
    assert set(plots) == {"win_rate.png", "kl_to_base.png", "entropy.png"}
    for path in plots.values():
        assert path.parent == tmp_path and path.read_bytes()[:8] == PNG_MAGIC


def test_a_run_takes_more_params_and_metrics_than_one_mlflow_request_holds(mlflow_store):
    from post_train.tracking import experiment_id, log_params_and_metrics

    client = MlflowClient(mlflow_store)
    run_id = client.create_run(experiment_id()).info.run_id
    params = {f"param{i}": "x" * 7000 for i in range(150)}  # a request holds 100 params of 6000 characters
    log_params_and_metrics(client, run_id, params=params, metrics={f"metric{i}": i / 2 for i in range(1500)})
    logged = client.get_run(run_id).data
    assert len(logged.params) == 150 and {len(value) for value in logged.params.values()} == {6000}
    assert len(logged.metrics) == 1500 and logged.metrics["metric1499"] == 749.5


# --------------------------------------------------------------------------- the grid


def test_grid_sets_objective_learning_rate_and_seeds_per_cell():
    grid = comparison.plan_grid(
        "baseline", "smoke", ["nll", "fdiv:pearson_chi2"], None, [0, 3], {"dpo.loss_params.beta": 0.2}
    )
    recipe_rate = grid.base.sft.learning_rate
    assert [(cell.objective, cell.learning_rate, cell.seed) for cell, _ in grid.cells] == [
        (objective, rate, seed)
        for objective in ("nll", "fdiv:pearson_chi2")
        for rate in (recipe_rate, recipe_rate / 4)
        for seed in (0, 3)
    ]
    for cell, config in grid.cells:
        assert (config.sft.objective, config.sft.learning_rate, config.sft.seed, config.dpo.seed) == (
            cell.objective,
            cell.learning_rate,
            cell.seed,
            cell.seed,
        )
        assert config.dpo.loss_params == {"beta": 0.2} and config.scale == "smoke"
    assert grid.cells[-1][0].slug == f"fdiv-pearson_chi2-lr{recipe_rate / 4:g}-seed3"


def test_objective_params_stay_with_the_recipes_objective():
    grid = comparison.plan_grid(
        "chi2", "smoke", ["fdiv:pearson_chi2", "nll"], [1e-3], [0], {"sft.objective_params.beta": 0.5}
    )
    assert [config.sft.objective_params for _, config in grid.cells] == [{"beta": 0.5}, {}]


@pytest.mark.parametrize(
    "objectives, learning_rates, seeds, parallelism, message",
    [
        (
            ["nll", "nope"],
            None,
            [0],
            1,
            r"grid cell nope lr=\S+ seed=0.*\n  sft\.objective: .*unknown SFT objective 'nope'",
        ),
        (["nll"], [1e-3, -1.0], [0], 1, r"sft\.learning_rate: Input should be greater than 0"),
        (["nll", "nll"], None, [0], 1, "objectives lists 'nll' twice"),
        (["nll"], None, [], 1, "seeds must list at least one value"),
        (["nll"], None, [0], 0, "parallelism must be at least 1"),
    ],
)
def test_a_bad_grid_is_refused(objectives, learning_rates, seeds, parallelism, message):
    with pytest.raises(ConfigError, match=message):
        comparison.plan_grid("baseline", "smoke", objectives, learning_rates, seeds, None, parallelism)


# --------------------------------------------------------------------------- CLI and deployment


def test_cli_refuses_a_bad_grid_before_prefect_starts(capsys):
    from post_train.cli import main

    assert main(["compare", "--scale", "smoke", "--objectives", "nll", "nope"]) == 2
    assert "unknown SFT objective 'nope'" in capsys.readouterr().err


def test_cli_passes_the_grid_to_the_flow_and_prints_the_table(mlflow_store, monkeypatch, capsys):
    from post_train.cli import main

    calls = []

    def fake_compare(**kwargs):
        calls.append(kwargs)
        return {
            "markdown": "| table |\n",
            "aggregated_markdown": "| means |\n",
            "output_dir": "/tmp/out",
            "mlflow_run_uri": "runs:/x",
        }

    monkeypatch.setattr(flows.compare, "compare", fake_compare)
    argv = [
        "compare",
        "--scale",
        "smoke",
        "--objectives",
        "nll",
        "dft",
        "--learning-rates",
        "2e-3",
        "5e-4",
        "--seeds",
        "0",
        "1",
        "--parallelism",
        "2",
        "-o",
        "dpo.loss_params.beta=0.2",
    ]
    assert main(argv) == 0
    assert calls == [
        {
            "recipe": "baseline",
            "scale": "smoke",
            "objectives": ["nll", "dft"],
            "learning_rates": [2e-3, 5e-4],
            "seeds": [0, 1],
            "overrides": {"dpo.loss_params.beta": 0.2},
            "parallelism": 2,
            "force": False,
        }
    ]
    out = capsys.readouterr().out
    assert "| table |" in out and "| means |" in out and "/tmp/out" in out


def test_compare_deployment():
    deployment = compare_deployment()
    assert (deployment.name, deployment.flow_name) == ("grid", "compare")


# --------------------------------------------------------------------------- the flow


def children(client: MlflowClient, parent_id: str) -> list:
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def test_compare_two_objectives_at_smoke_scale(prefect_server, workspace, mlflow_store):
    result = compare(
        recipe="baseline",
        scale="smoke",
        objectives=["nll", "dft"],
        learning_rates=[2e-3],
        seeds=[0],
        overrides=smoke_overrides(workspace),
        parallelism=2,
    )
    rows = result["rows"]
    assert [(r["objective"], r["sft_learning_rate"], r["seed"]) for r in rows] == [("nll", 2e-3, 0), ("dft", 2e-3, 0)]
    for row in rows:
        for split in ("all", "in_distribution", "held_out"):
            assert 0.0 <= row[f"win_rate/{split}"] <= 1.0
            assert (
                0.0
                <= row[f"win_rate_ci95_low/{split}"]
                <= row[f"win_rate/{split}"]
                <= row[f"win_rate_ci95_high/{split}"]
                <= 1.0
            )
        assert row["sft_kl_to_base"] >= 0 and row["sft_entropy"] > 0 and 0 <= row["dpo_reward_accuracy"] <= 1
    assert result["aggregated"] == [] and "aggregated_csv" not in result["paths"]  # one seed

    out = Path(result["output_dir"])
    assert out.parent == workspace / "runs" and out.name.startswith("compare-")
    assert len(list(csv.DictReader(Path(result["paths"]["csv"]).open()))) == 2
    assert Path(result["paths"]["markdown"]).read_text() == result["markdown"]
    assert len(result["markdown"].strip().splitlines()) == 4  # header, rule, 2 rows
    for path in result["paths"]["plots"].values():
        assert Path(path).read_bytes()[:8] == PNG_MAGIC

    client = MlflowClient(mlflow_store)
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("compare-")
    assert parent.data.params["grid.objectives"] == "nll dft" and "sft.objective" not in parent.data.params
    assert {
        "results.csv",
        "results.md",
        "win_rate.png",
        "kl_to_base.png",
        "entropy.png",
        "config.json",
        "grid.json",
    } <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    under_parent = children(client, parent.info.run_id)
    pretrain = [run for run in under_parent if run.data.tags.get("stage") == "pretrain"]
    cells = {run.data.tags["compare_cell"]: run for run in under_parent if "compare_cell" in run.data.tags}
    assert len(pretrain) == 1 and set(cells) == {"nll lr=0.002 seed=0", "dft lr=0.002 seed=0"}
    for row in rows:
        cell = cells[f"{row['objective']} lr=0.002 seed=0"]
        assert cell.info.run_id == row["mlflow_run_id"] and cell.info.status == "FINISHED"
        assert cell.data.metrics["win_rate/all"] == pytest.approx(row["win_rate/all"])
        stages = {run.data.tags["stage"]: run for run in children(client, cell.info.run_id)}
        assert set(stages) == {"sft", "dpo", "evaluate"}
        assert all(run.info.status == "FINISHED" for run in stages.values())
        assert stages["sft"].data.params["sft.objective"] == row["objective"]


def test_a_grid_with_an_unknown_objective_fails_before_any_stage(prefect_server, workspace, mlflow_store):
    with pytest.raises(ConfigError, match="unknown SFT objective 'nope'"):
        compare(
            recipe="baseline",
            scale="smoke",
            objectives=["nll", "nope"],
            seeds=[0],
            overrides=smoke_overrides(workspace),
            parallelism=2,
        )
    assert not (workspace / "runs").exists() and not (workspace / "cache").exists()
    assert not (workspace / "repo" / "data").exists()  # prepare never ran
    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("post-train")
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []
