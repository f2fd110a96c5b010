"""The README's recipe quotes are the files in recipes/, and its recipe table's claims hold for them."""

from __future__ import annotations

import re

import pytest
import yaml

from post_train.comparison import LOWLR_FACTOR
from tests.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
RECIPE_QUOTE = re.compile(r"^```yaml\n# (recipes/[\w./-]+\.yaml)\n(.*?)^```", re.MULTILINE | re.DOTALL)
QUOTES = RECIPE_QUOTE.findall(README)


def recipe(name: str) -> dict:
    return yaml.safe_load((REPO_ROOT / "recipes" / f"{name}.yaml").read_text())


def test_the_readme_quotes_at_least_one_recipe():
    assert QUOTES, "no ```yaml block starting with `# recipes/<name>.yaml` in the README"


@pytest.mark.parametrize(("path", "quoted"), QUOTES, ids=[path for path, _ in QUOTES])
def test_a_quoted_recipe_is_the_file(path: str, quoted: str):
    on_disk = yaml.safe_load((REPO_ROOT / path).read_text())
    assert yaml.safe_load(quoted) == on_disk, f"README's quote of {path} is stale"


def test_the_recipe_table_divides_by_the_comparison_grids_factor():
    row = re.search(r"^\| `lowlr` \| `baseline` with the SFT learning rate divided by (\d+)", README, re.MULTILINE)
    assert row is not None and int(row.group(1)) == LOWLR_FACTOR


@pytest.mark.parametrize(("lowlr", "baseline"), [("lowlr", "baseline"), ("paper_lowlr", "paper_baseline")])
def test_lowlr_is_its_baseline_with_the_sft_learning_rate_divided_by_the_factor(lowlr: str, baseline: str):
    low = recipe(lowlr)
    assert low["extends"] == baseline
    assert low["sft"]["learning_rate"] * LOWLR_FACTOR == pytest.approx(recipe(baseline)["sft"]["learning_rate"])
