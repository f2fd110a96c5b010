"""Content hashes that key caches: same inputs and same code, same hash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def source_fingerprint(*relative_paths: str) -> str:
    """sha256 of the Python sources under the given repository paths (files or folders)."""
    digest = hashlib.sha256()
    for relative in relative_paths:
        path = REPO_ROOT / relative
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(file.relative_to(REPO_ROOT)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def content_key(**parts: Any) -> str:
    """A short hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
