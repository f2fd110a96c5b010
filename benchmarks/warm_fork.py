"""Does a stage forked from the warm server train as fast as a fresh process? `python -m benchmarks.warm_fork`.

The same training work (a random-init Llama, one fixed batch, AdamW; steps after the warm-up timed) runs as
`python -m benchmarks.warm_fork --work` in a fresh process and forked from a warm server
(`post_train.executors.warm`, its default preload), alternating, the order reversed on every other repetition.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULE = "benchmarks.warm_fork"
WARMUP_STEPS = 5


def work(steps: int) -> float:
    """Seconds of `steps` optimizer steps after `WARMUP_STEPS` untimed ones."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16384,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, config.vocab_size, (8, 256))
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            started = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - started


def measure(repetitions: int, steps: int) -> dict[str, Any]:
    from post_train.executors import warm
    from post_train.executors.local import run_command, run_forked

    arguments = ["--work", "--steps", str(steps)]
    env = dict(os.environ)
    server = warm.WarmServer(env, REPO_ROOT)
    seconds: dict[str, list[float]] = {"forked": [], "fresh": []}
    try:
        for repetition in range(repetitions):
            for kind in ("forked", "fresh") if repetition % 2 == 0 else ("fresh", "forked"):
                lines: list[str] = []
                if kind == "forked":
                    status = run_forked(functools.partial(server.fork, MODULE, arguments, env), lines.append)
                else:
                    status = run_command([sys.executable, "-m", MODULE, *arguments], env, lines.append, REPO_ROOT)
                if status != 0:
                    raise SystemExit(f"the {kind} run failed ({status}):\n" + "\n".join(lines[-20:]))
                seconds[kind].append(float(lines[-1]))
                print(f"{kind}, repetition {repetition + 1}: {seconds[kind][-1]:.2f} s", flush=True)
    finally:
        server.close()
    return {
        kind: {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}
        for kind, values in seconds.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.warm_fork", description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per run")
    parser.add_argument("--work", action="store_true", help="(internal) run the training work and print its time")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.work:
        print(f"{work(args.steps):.4f}")
        return 0
    from post_train.provenance import cpu_model, git_commit

    load = os.getloadavg()[0]
    times = measure(args.repetitions, args.steps)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": [load, os.getloadavg()[0]],
        "post_train_commit": git_commit(REPO_ROOT, short=True, mark_dirty=True),
        "steps": args.steps,
        "repetitions": args.repetitions,
        "seconds": times,
        "forked_over_fresh": times["forked"]["median"] / times["fresh"]["median"],
    }
    text = "\n".join(
        [
            "# Training forked from the warm server vs in a fresh process",
            "",
            f"{result['date']} on {result['cpu']} ({result['cpu_count']} cores, load average "
            f"{load:.2f} at the start, {result['load_average'][1]:.2f} at the end), post-train "
            f"{result['post_train_commit']}: {args.steps} timed AdamW steps of an 8M-parameter Llama (batch 8 × 256), "
            f"{args.repetitions} alternating repetitions each.",
            "",
            "| process | seconds, median (min–max) |",
            "|---|---:|",
            *(
                f"| {kind} | {stats['median']:.2f} ({stats['min']:.2f}–{stats['max']:.2f}) |"
                for kind, stats in times.items()
            ),
            "",
            f"Forked / fresh: **{result['forked_over_fresh']:.3f}×** the time.",
            "",
        ]
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "warm-fork.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out_dir / "warm-fork.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
