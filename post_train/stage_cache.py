"""Stage results cached by content under `cache_dir/stages/<stage>/<key>`.

An entry is built once: a run takes the key's lock (`.<key>.lock` beside it, an advisory file lock the
kernel releases when its holder dies) before it looks, so a second run with the same key waits and then
finds the first run's entry instead of building its own. An entry is written into a scratch directory
and renamed into place only when the stage succeeded, so an interrupted stage never leaves a
half-written entry. A forced rebuild never deletes the entry it replaces, which another run may be
reading: the old entry is renamed aside to `.<key>-<random>.replaced` (delete those when no run uses them).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

from post_train.locks import file_lock
from post_train.stage_io import from_json, to_json

Result = TypeVar("Result")
RESULT_FILE = "result.json"


def cached(
    stage: str,
    key: str,
    cache_dir: str,
    produce: Callable[[Path], Result],
    result_type: type[Result],
    force: bool = False,
) -> tuple[Result, bool]:
    """`produce(directory)`'s result, reused when a stage with the same key already finished.

    Paths in the result are rewritten from the scratch directory to the final place.
    Returns (result, cache hit).
    """
    directory = Path(cache_dir).resolve() / "stages" / stage / key
    result_file = directory / RESULT_FILE
    lock = directory.with_name(f".{key}.lock")
    with file_lock(lock, f"waiting for another run that is building {directory} ..."):
        if result_file.is_file() and not force:
            return from_json(result_type, json.loads(result_file.read_text())), True
        scratch = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{key}-"))
        try:
            result = json.dumps(to_json(produce(scratch)), indent=2).replace(str(scratch), str(directory))
            (scratch / RESULT_FILE).write_text(result)
            if directory.exists():  # forced: the new result replaces the old one, which stays readable aside
                directory.rename(directory.with_name(f"{scratch.name}.replaced"))
            scratch.rename(directory)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return from_json(result_type, json.loads(result_file.read_text())), False
