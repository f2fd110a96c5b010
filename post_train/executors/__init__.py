"""Where a stage's command runs: one module per backend, found here by the name `compute.backend` gives.

An executor is a class built from the config with the stage's placement as its `compute` section
(`ComputeConfig.for_stage`: the global section with `compute.stages.<stage>` over it), with

- `preflight(arguments)`: raise `ConfigError` for anything it can check before any work;
- `warm_up(distributed)`: start, ahead of the stage, what its command will need (the local executor's warm
  server);
- `run(stage, module, inputs, outputs, distributed) -> (exit status, description)`: run
  `python -m <module> --inputs <inputs> --outputs <outputs>` and wait for it.

Entries are import paths, not imports: the stages' code (and so their cache keys) never reaches a backend.
"""

from __future__ import annotations

from typing import Any

from post_train.plugins import imported

EXECUTORS: dict[str, str] = {
    "local": "post_train.executors.local:LocalExecutor",
    "skypilot": "post_train.executors.skypilot:SkyPilotExecutor",
}


def executor_class(name: str) -> Any:
    return imported(EXECUTORS[name])
