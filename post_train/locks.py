"""An exclusive lock between processes on one machine: `flock` on a lock file, which the kernel releases when its
holder exits, killed or not, so a crash never leaves a lock behind."""

from __future__ import annotations

import errno
import fcntl
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}
"""What `flock` fails with on a file system without locks (some bucket mounts): the lock is skipped there."""


@contextmanager
def file_lock(path: Path, waiting: str | None = None) -> Iterator[None]:
    """Hold the lock of the file `path` (created when missing; never deleted, since another process may be waiting
    on it). `waiting`, when given, is printed to stderr if another process holds the lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in NO_LOCKS:
                raise
            print(f"warning: {path.parent} has no file locks; runs sharing it are not kept apart", file=sys.stderr)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
