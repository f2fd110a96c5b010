"""Shared fixtures: offline settings, a temporary DVC repository, MLflow store and smoke-scale stages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

for name, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(name, value)


def make_dvc_repo(directory: Path) -> Path:
    """A fresh DVC repository (no git) holding the project's data stages and the code they depend on."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO_ROOT / name, directory / name)
    shutil.copytree(
        REPO_ROOT / "post_train" / "world",
        directory / "post_train" / "world",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=directory, check=True)
    return directory


@pytest.fixture(scope="module")
def prefect_server():
    """A temporary Prefect API for the flow tests of one module (about 25 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def workspace(tmp_path: Path, mlflow_store: str) -> Path:
    """A temporary DVC repository (under `repo/`) beside a fresh MLflow store."""
    make_dvc_repo(tmp_path / "repo")
    return tmp_path


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh MLflow store, for tests that count runs or model versions."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def _shared_store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlflow-shared") / "mlflow.db"


@pytest.fixture
def shared_mlflow_store(_shared_store_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """One MLflow store for the session: creating a SQLite store costs seconds."""
    uri = f"sqlite:///{_shared_store_path}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def smoke_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DVC repository plus cache and runs folders shared by the smoke-scale stage tests."""
    root = tmp_path_factory.mktemp("workspace")
    make_dvc_repo(root / "repo")
    return root


def smoke_overrides(workspace: Path) -> dict[str, str]:
    return {
        "data.dvc_root": str(workspace / "repo"),
        "cache_dir": str(workspace / "cache"),
        "runs_dir": str(workspace / "runs"),
    }


@pytest.fixture(scope="session")
def smoke_stages(smoke_workspace: Path, _shared_store_path: Path):
    """Prepared data and a pretrained base model at smoke scale, made once with the plain stage functions."""
    from post_train.config import load_config
    from tasks import prepare, pretrain

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_shared_store_path}"
    try:
        config = load_config("lowlr", "smoke", smoke_overrides(smoke_workspace))
        data = prepare.run(config)
        base = pretrain.run(config, data, str(smoke_workspace / "base"))
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    return config, data, base
