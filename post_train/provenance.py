"""Where and with what a number was produced: the CPU, the code's commit and the library versions."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

from post_train.fingerprint import REPO_ROOT

RECORDED_PACKAGES = ("torch", "transformers", "accelerate", "trl", "mlflow", "prefect")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def git_commit(
    repository: Path = REPO_ROOT, short: bool = False, mark_dirty: bool = False, revision: str = "HEAD"
) -> str:
    """The commit `revision` names in `repository` ("unknown" outside git or for no such revision); `mark_dirty`
    appends `+dirty` when tracked files have changes, since the numbers then belong to code no commit holds."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=repository, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = (
        git("rev-parse", "--verify", "--quiet", *(["--short"] if short else []), f"{revision}^{{commit}}") or "unknown"
    )
    dirty = mark_dirty and bool(git("status", "--porcelain", "--untracked-files=no"))
    return commit + ("+dirty" if dirty else "")


def library_versions() -> dict[str, str]:
    """The installed versions of `RECORDED_PACKAGES` (those that are installed)."""
    versions = {}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
