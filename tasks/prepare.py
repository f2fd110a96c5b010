"""Stage 1, prepare: produce (via DVC) or fetch the datasets, validate every row, record the data hash."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import yaml

from post_train.config import PipelineConfig
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


def _sources_hash(sources: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for kind, source in sorted(sources.items()):
        digest.update(kind.encode())
        path = Path(source)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        if path.exists():
            for file in files:
                digest.update(file.read_bytes())
        else:  # a Hub dataset: its name stands for its content
            digest.update(source.encode())
    return digest.hexdigest()[:32]


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
    sizes = {kind: len(load_dataset_checked(source, kind)) for kind, source in sources.items()}
    all_from_world = world_hash is not None and not any(getattr(config.data, kind) for kind in WORLD_FILES)
    data_hash = world_hash if all_from_world else _sources_hash(sources)
    return PreparedData(**sources, data_hash=data_hash, pretrain_corpus=pretrain_corpus, sizes=sizes)


if __name__ == "__main__":
    stage_main(run)
