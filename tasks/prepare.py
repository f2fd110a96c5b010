"""Stage 1, prepare: produce (via DVC) or fetch the datasets, validate every row, record the data hash."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import yaml

from post_train.config import DATASET_SECTIONS, PipelineConfig
from post_train.data import DataError, load_dataset_checked
from post_train.results import PreparedData
from post_train.stage_io import stage_main

WORLD_FILES = {"sft": "sft.jsonl", "preferences": "preferences.jsonl", "eval": "eval.jsonl"}
PRETRAIN_FILE = "pretrain.jsonl"


def world_stage(world: str) -> str:
    return f"world@{world}"


def reproduce_world(dvc_root: Path, world: str) -> tuple[Path, str]:
    """`dvc repro` the world's stage; returns its output directory and the md5 DVC recorded for it."""
    if not (dvc_root / "dvc.yaml").is_file():
        raise DataError(f"{dvc_root}: no dvc.yaml here; set data.dvc_root to the directory that holds it")
    stage = world_stage(world)
    # The stage's `python` must be this interpreter, whatever PATH says.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("DVC_NO_ANALYTICS", "1")
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", stage], cwd=dvc_root, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise DataError(f"`dvc repro {stage}` in {dvc_root} failed:\n{result.stdout}{result.stderr}")
    lock = yaml.safe_load((dvc_root / "dvc.lock").read_text())
    outs = lock["stages"][stage]["outs"]
    if len(outs) != 1:
        raise DataError(f"{dvc_root / 'dvc.lock'}: stage {stage} should have one output directory, found {len(outs)}")
    return dvc_root / outs[0]["path"], outs[0]["md5"]


def source_hash(source: str) -> str:
    """sha256 of a dataset's content: a file's bytes, or a directory's files with their relative names (they set
    the order rows load in); a Hub dataset's name stands for its content."""
    digest = hashlib.sha256()
    path = Path(source)
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(path)).encode() + b"\0")
            digest.update(file.read_bytes())
    elif path.exists():
        digest.update(path.read_bytes())
    else:
        digest.update(source.encode())
    return digest.hexdigest()[:32]


def _combined_hash(hashes: dict[str, str]) -> str:
    pairs = "".join(f"{kind}:{value};" for kind, value in sorted(hashes.items()))
    return hashlib.sha256(pairs.encode()).hexdigest()[:32]


def run(config: PipelineConfig) -> PreparedData:
    """Validate every dataset before any training starts; errors name the file and row."""
    sources = {kind: getattr(config.data, kind) for kind in WORLD_FILES}
    pretrain_corpus = None
    world_hash = None
    if config.data.world is not None:
        world_dir, world_hash = reproduce_world(Path(config.data.dvc_root).resolve(), config.data.world)
        for kind, file in WORLD_FILES.items():
            sources[kind] = sources[kind] or str(world_dir / file)
        pretrain_corpus = str(world_dir / PRETRAIN_FILE)
    checked = {kind: load_dataset_checked(source, kind) for kind, source in sources.items()}
    for kind, section in DATASET_SECTIONS.items():
        share = getattr(config, section).max_dropped_share
        checked[kind].report.refuse_excess(share, f"{section}.max_dropped_share")
    sizes = {kind: len(examples) for kind, examples in checked.items()}
    hashes = {kind: source_hash(source) for kind, source in sources.items()}
    all_from_world = world_hash is not None and not any(getattr(config.data, kind) for kind in WORLD_FILES)
    data_hash = world_hash if all_from_world else _combined_hash(hashes)
    if world_hash is not None:
        hashes["world"] = world_hash  # pretraining reads every file of the world (its tokenizer too)
    return PreparedData(**sources, data_hash=data_hash, pretrain_corpus=pretrain_corpus, sizes=sizes, hashes=hashes)


if __name__ == "__main__":
    stage_main(run)
