"""Content hashes that key caches: same inputs and same code, same hash."""

from __future__ import annotations

import ast
import hashlib
import json
import threading
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def content_key(**parts: Any) -> str:
    """A short hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


PROJECT_PACKAGES = ("post_train", "losses", "tasks", "flows")

_PARSING = threading.Lock()
"""One `ast.parse` at a time: CPython 3.11's AST conversion keeps its recursion depth in state shared by the
threads, so two parses at once (the cells of a compare or study run in threads) can fail with `SystemError: AST
constructor recursion depth mismatch` (seen in a study run)."""


def _module_file(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def project_imports(file: Path, package: str) -> set[str]:
    """Project modules that `file` imports (absolute or relative), package parents included."""
    names: set[str] = set()
    with _PARSING:
        tree = ast.parse(file.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parent = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (parent, node.module or "") if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    found = set()
    for name in names:
        parts = name.split(".")
        if parts[0] in PROJECT_PACKAGES:
            found.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return found


def project_modules(module: str, root: Path = REPO_ROOT) -> dict[str, Path]:
    """`module` and every project module it imports, transitively, with their source files (under `root`)."""
    seen: dict[str, Path] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        file = None if name in seen else _module_file(name, root)
        if file is None:
            continue
        seen[name] = file
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        pending.extend(project_imports(file, package) - seen.keys())
    return seen


def module_fingerprint(module: str, root: Path = REPO_ROOT) -> str:
    """sha256 of the source of `module` and of every project module it imports.

    Code a stage never imports (the CLI, the server launcher) does not change its cache key.
    """
    digest = hashlib.sha256()
    for name, file in sorted(project_modules(module, root).items()):
        digest.update(name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


DESCRIPTIVE_SUFFIXES = (".md",)
"""Files of a model directory that do not change what it computes (model cards); hidden files are skipped too."""


def behaviour_files(directory: Path) -> list[Path]:
    """The files `from_pretrained` may read from a model directory: every top-level file (weights, config, tokenizer
    files, `chat_template.jinja`, `generation_config.json`, ...) but hidden ones and model cards."""
    return sorted(
        file
        for file in directory.iterdir()
        if file.is_file() and not file.name.startswith(".") and file.suffix not in DESCRIPTIVE_SUFFIXES
    )


def model_fingerprint(name_or_path: str) -> str:
    """sha256 of a local model's behaviour files (names and content); a Hub model is identified by its name.

    Whatever changes what the model computes or how text becomes tokens changes it; where the directory lies,
    a model card or a hidden file does not.
    """
    path = Path(name_or_path)
    if not path.is_dir():
        return hashlib.sha256(name_or_path.encode()).hexdigest()
    return files_sha256(behaviour_files(path))


def files_sha256(files: list[Path]) -> str:
    """sha256 of `files`' names and contents, in the order given."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()
