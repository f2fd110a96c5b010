"""Studies: the study file, its plan, the verdicts, and a real two-arm study at smoke scale under Prefect."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from flows.serve import build_deployments
from flows.study import run_study
from post_train import study
from post_train.study import Claim, SeedDifference, StudyError, load_study, plan_study, verdict
from tests.conftest import smoke_overrides

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_study(directory: Path, **changes) -> Path:
    document = {
        "description": "Two arms at smoke scale.",
        "scale": "smoke",
        "seeds": [0, 1],
        "parallelism": 2,
        "baseline": "baseline",
        "arms": {"baseline": {"recipe": "baseline"}, "lowlr": {"recipe": "lowlr", "label": "nll lowlr"}},
        "head_to_head": ["lowlr"],
        "claims": [
            {
                "paper": "arXiv 2507.00018",
                "statement": "Lower lr is better after DPO.",
                "arm": "lowlr",
                "metric": "gold_reward",
                "direction": "higher",
            },
            {
                "paper": "arXiv 2507.00018",
                "statement": "Lower lr stays closer to the base.",
                "arm": "lowlr",
                "metric": "native_kl_to_base/sft",
                "split": "held_out",
                "direction": "lower",
            },
        ],
        **changes,
    }
    path = directory / "two-arms.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_the_papers_study_plans_every_arm_and_seed():
    spec = load_study("papers")
    plan = plan_study(spec)
    assert len(plan.cells) == len(spec.arms) * len(spec.seeds) and len(spec.seeds) >= 5
    assert {cell.arm for cell, _ in plan.cells} == set(spec.arms)
    rates = {cell.arm: cell.learning_rate for cell, _ in plan.cells}
    assert rates["baseline"] > rates["nll-lr2.5e-4"] > rates["lowlr"]  # the dose-response
    for cell, config in plan.cells:
        assert config.sft.seed == config.dpo.seed == config.joint.seed == cell.seed
        assert config.compute.torch_threads == plan.threads
        assert config.dpo == plan_study(spec).cells[0][1].dpo.model_copy(update={"seed": cell.seed})  # the same DPO


def test_cells_split_the_cores():
    assert study.cell_threads(2, cores=2) == 1
    assert study.cell_threads(1, cores=16) == 16
    assert study.cell_threads(4, cores=2) == 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"baseline": "nope"}, "baseline 'nope' is not an arm"),
        ({"seeds": [1, 1]}, "seeds repeat"),
        ({"seeds": []}, "seeds"),
        (
            {"claims": [{"paper": "p", "statement": "s", "arm": "baseline", "metric": "m", "direction": "higher"}]},
            "other than the baseline",
        ),
        (
            {
                "claims": [
                    {"paper": "p", "statement": "s", "arm": "lowlr", "metric": "m", "split": "x", "direction": "up"}
                ]
            },
            "direction",
        ),
        ({"arms": {"baseline": {"recipe": "baseline"}}}, "at least 2"),
        ({"head_to_head": ["baseline"]}, "head_to_head arm 'baseline'"),
        ({"comparisons": [{"arm": "lowlr", "against": "nope"}]}, "comparisons\\[0\\]: 'lowlr' − 'nope' must name two"),
        ({"unknown": 1}, "Extra inputs"),
    ],
)
def test_a_bad_study_file_names_the_file_and_field(tmp_path, changes, message):
    path = write_study(tmp_path, **changes)
    with pytest.raises(StudyError, match=message) as raised:
        load_study(str(path))
    assert str(path) in str(raised.value)


def test_a_missing_study_lists_the_studies():
    with pytest.raises(StudyError, match="studies: .*papers"):
        load_study("nope")


def test_arms_that_would_need_another_base_model_are_refused(tmp_path):
    arms = {
        "baseline": {"recipe": "baseline"},
        "big": {"recipe": "baseline", "overrides": {"base_model.hidden_size": 64}},
    }
    with pytest.raises(StudyError, match="'big' changes `base_model`"):
        plan_study(load_study(str(write_study(tmp_path, arms=arms, claims=[], head_to_head=["big"]))))


@pytest.mark.parametrize(
    ("direction", "low", "high", "expected"),
    [
        ("higher", 1.0, 3.0, "reproduced"),
        ("higher", -3.0, -1.0, "contradicted"),
        ("higher", -1.0, 2.0, "not resolved"),
        ("lower", -3.0, -1.0, "reproduced"),
        ("lower", 1.0, 3.0, "contradicted"),
        ("lower", float("nan"), float("nan"), "not resolved"),
    ],
)
def test_verdicts_follow_the_interval_and_the_predicted_direction(direction, low, high, expected):
    claim = Claim(paper="p", statement="s", arm="a", metric="gold_reward", direction=direction)
    assert verdict(claim, SeedDifference((low + high) / 2, low, high, 5)) == expected


def test_seed_difference_is_a_paired_t_interval():
    found = study.seed_difference(np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.0, 0.0]))
    assert found.difference == pytest.approx(2.0)
    assert found.high - found.difference == pytest.approx(4.302653 / np.sqrt(3), rel=1e-4)  # t(0.975, 2) sd / sqrt(k)


def test_a_study_at_smoke_scale(prefect_server, workspace, mlflow_store, tmp_path):
    # Three arms, the third the joint pipeline (after the recipe's SFT warm-up), its cells run as the others'.
    arms = {
        "baseline": {"recipe": "baseline"},
        "lowlr": {"recipe": "lowlr", "label": "nll lowlr"},
        "joint": {"recipe": "joint"},
    }
    path = write_study(tmp_path, arms=arms, comparisons=[{"arm": "joint", "against": "lowlr"}])
    report_dir = tmp_path / "published"
    result = run_study(name=str(path), overrides=smoke_overrides(workspace), report_dir=str(report_dir))

    rows = result["rows"]
    assert sorted((row["arm"], row["seed"]) for row in rows) == [
        ("baseline", 0),
        ("baseline", 1),
        ("joint", 0),
        ("joint", 1),
        ("lowlr", 0),
        ("lowlr", 1),
    ]
    for row in rows:
        samples = json.loads(Path(row["samples_path"]).read_text())
        assert len(samples["gold_reward"]) == len(samples["split"]) == len(samples["preference"])
        assert row["native_kl_to_base/sft/held_out"] >= 0
    report = (report_dir / "results.md").read_text()
    assert report == Path(result["report"]).read_text()
    assert "nll lowlr" in report and "joint" in report and "## The claims" in report and "Power" in report
    assert "## Other comparisons" in report and "| joint − nll lowlr |" in report
    meetings = json.loads((Path(result["output_dir"]) / "head_to_head.json").read_text())
    assert sorted((m["arm"], m["seed"]) for m in meetings) == [("lowlr", 0), ("lowlr", 1)]
    assert all(0.0 <= m["head_to_head/win_rate/all"] <= 1.0 for m in meetings) and "## Head to head" in report
    assert "torch" in report and "CPU threads per" in report
    for name in (
        "win_rates.png",
        "gold_reward.png",
        "gold_differences.png",
        "win_rate_differences.png",
        "lr_dose_response.png",
    ):
        assert (report_dir / name).read_bytes()[:8] == PNG_MAGIC
    claims = json.loads((report_dir / "claims.json").read_text())
    assert [claim["verdict"] in ("reproduced", "contradicted", "not resolved") for claim in claims] == [True, True]
    assert all(claim["low"] <= claim["difference"] <= claim["high"] for claim in claims)

    client = MlflowClient(mlflow_store)
    parent = client.get_run(result["mlflow_run_id"])
    threads = str(study.cell_threads(2))
    assert parent.info.status == "FINISHED" and parent.data.params["torch_threads"] == threads
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/results.md", "report/claims.json", "report/rows.json"} <= artifacts
    stage_runs = client.search_runs([parent.info.experiment_id], filter_string="tags.stage = 'sft'")
    assert {run.data.tags["torch_threads"] for run in stage_runs} == {threads}
    assert all("version.torch" in run.data.tags for run in stage_runs)


def test_the_study_deployment():
    deployment = next(d for d in build_deployments() if d.name == "papers")
    assert deployment.parameters == {"name": "papers"} and "study" in deployment.tags
