"""The entries of the plug-in registries (judges, generators, executors): import paths, imported when asked for."""

from __future__ import annotations

import importlib
from typing import Any


def imported(entry: str) -> Any:
    """The object a registry entry `"package.module:attribute"` names, its module imported now."""
    module, _, attribute = entry.partition(":")
    return getattr(importlib.import_module(module), attribute)
