"""One measurement in a fresh process: `python -m benchmarks.worker SPEC.json RESULT.json`.

The orchestrator (`benchmarks.run`) starts one of these per variant and repetition, so that no
measurement inherits another's allocator state, caches or peak memory.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks.measure import StepMeter, peak_memory_bytes, resident_bytes
from benchmarks.runners import RUNNERS


def measure(spec: dict) -> dict:
    load = os.getloadavg()[0]  # other work on the machine: the first suspect when a run is an outlier
    torch.set_num_threads(spec["threads"])
    runner = RUNNERS[spec["runner"]]
    for module in runner.imports:
        importlib.import_module(module)
    imported = resident_bytes()
    meter = StepMeter(spec["pad_token_id"], spec["bos_token_id"], spec["device"]).install()
    started = time.perf_counter()
    found = runner.run(spec)
    result = {
        "wall_seconds": time.perf_counter() - started,
        "peak_memory_bytes": peak_memory_bytes(spec["device"]),
        "rss_after_imports_bytes": imported,
        "torch_threads": torch.get_num_threads(),
        "load_average": load,
        **found,
    }
    if runner.trains:
        result.update(meter.steady_state(spec["train"]["warmup_steps"]))
    return result


def main(argv: list[str]) -> int:
    spec_path, result_path = argv
    result = measure(json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
