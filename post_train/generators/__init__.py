"""Generators: what writes the evaluated models' responses (`evaluation.backend` names one entry of `GENERATORS`).

Entries are import paths, imported when asked for, as for the judges: the configuration imports this registry, and
every stage's code (its cache key) reaches the configuration, but only the stages that generate should depend on a
generator's code.
"""

from __future__ import annotations

from typing import Any

from post_train.plugins import imported

GENERATORS: dict[str, str] = {
    "transformers": "post_train.generators.in_process:InProcessGenerator",
    "vllm": "post_train.generators.vllm_engine:VLLMGenerator",
}


def generator(name: str) -> Any:
    """The `Generator` registered as `name`, ready to use."""
    return imported(GENERATORS[name])()
