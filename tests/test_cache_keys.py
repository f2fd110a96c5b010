"""Cache keys cover what changes a result and nothing more: the model fingerprint follows every file that changes
what a model computes (weights, config, tokenizer, chat template, generation config) but not where it lies or its
model card; each stage's key follows the datasets that stage reads, and no other."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from post_train.config import load_config
from post_train.fingerprint import content_key, model_fingerprint
from post_train.stages import STAGE_DECLARATIONS
from tasks import prepare

BEHAVIOUR_FILES = (
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
)
READS = {"pretrain": {"world"}, "sft": {"sft", "eval"}, "dpo": {"preferences"}, "evaluate": {"eval"}}
READS["head-to-head"] = {"eval"}
READS["joint"] = {"sft", "preferences"}
"""The datasets each cached stage reads (SFT's KL-to-base diagnostics run on the evaluation references)."""


def test_the_model_fingerprint_follows_every_behaviour_file_and_nothing_else(smoke_stages, tmp_path: Path):
    _, _, base = smoke_stages
    model = Path(shutil.copytree(base.path, tmp_path / "model"))
    assert set(BEHAVIOUR_FILES) <= {path.name for path in model.iterdir()}
    key = model_fingerprint(str(model))
    assert key == model_fingerprint(base.path)  # where the directory lies does not matter
    (model / "README.md").write_text("# A model card\n")
    (model / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    assert model_fingerprint(str(model)) == key
    for name in BEHAVIOUR_FILES:
        changed = Path(shutil.copytree(model, tmp_path / f"changed-{name}"))
        with (changed / name).open("ab") as file:
            file.write(b" ")
        assert model_fingerprint(str(changed)) != key, f"a change of {name} must change the fingerprint"
        removed = Path(shutil.copytree(model, tmp_path / f"removed-{name}"))
        (removed / name).unlink()
        assert model_fingerprint(str(removed)) != key, f"removing {name} must change the fingerprint"


def test_removing_the_chat_template_misses_the_sft_cache(smoke_stages, tmp_path: Path):
    config, data, base = smoke_stages
    sft = next(stage for stage in STAGE_DECLARATIONS if stage.name == "sft")
    without = Path(shutil.copytree(base.path, tmp_path / "without-template"))
    (without / "chat_template.jinja").unlink()

    def key(path: str) -> str:
        return content_key(**sft.key(config, {"base_model_path": path, "data": data}))

    assert key(str(without)) != key(base.path)


def stage_keys(config, data, model: str) -> dict[str, str]:
    """Every cached stage's key, with `model` as each of its models."""
    arguments = {
        "data": data,
        **{name: model for name in ("base_model_path", "sft_model_path", "start_model_path", "model_path")},
        **{name: model for name in ("candidate_path", "baseline_path")},
    }
    return {stage.name: content_key(**stage.key(config, arguments)) for stage in STAGE_DECLARATIONS if stage.key}


@pytest.mark.parametrize("dataset", ["sft", "preferences", "eval", "world"])
def test_a_stage_key_follows_the_data_the_stage_reads_and_no_other(smoke_stages, dataset: str):
    config, data, base = smoke_stages
    changed = dataclasses.replace(data, hashes={**data.hashes, dataset: "another-content"})
    before, after = stage_keys(config, data, base.path), stage_keys(config, changed, base.path)
    assert set(before) == set(READS)
    assert {stage for stage in before if before[stage] != after[stage]} == {
        stage for stage, reads in READS.items() if dataset in reads
    }


def test_prepare_hashes_each_dataset_by_its_content(smoke_stages, tmp_path: Path):
    """Your own files: a new preference file changes the preference hash only; the same files elsewhere change none."""
    _, data, _ = smoke_stages
    files = {kind: Path(getattr(data, kind)) for kind in ("sft", "preferences", "eval")}

    def prepared(directory: Path, edit_preferences: bool = False):
        directory.mkdir()
        for file in files.values():
            shutil.copy(file, directory / file.name)
        if edit_preferences:
            rows = (directory / files["preferences"].name).read_text().splitlines()
            (directory / files["preferences"].name).write_text("\n".join(rows[1:] + rows[:1]) + "\n")
        overrides = {"data.world": None, **{f"data.{kind}": str(directory / file.name) for kind, file in files.items()}}
        return prepare.run(load_config("lowlr", "smoke", overrides))

    first, moved, edited = prepared(tmp_path / "a"), prepared(tmp_path / "b"), prepared(tmp_path / "c", True)
    assert set(first.hashes) == {"sft", "preferences", "eval"}  # no world: nothing to pretrain on
    assert moved.hashes == first.hashes
    assert {kind for kind in first.hashes if first.hashes[kind] != edited.hashes[kind]} == {"preferences"}
    assert edited.data_hash != first.data_hash
    assert data.hashes["world"] == data.data_hash  # the world's own files: DVC's md5 of the world
    json.dumps(dataclasses.asdict(first))  # travels between processes as JSON
