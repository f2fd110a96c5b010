"""Generate one scale of the demo world: python -m post_train.world --params params.yaml --scale demo --out data/demo"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from post_train.world.generate import write_world
from post_train.world.params import WorldParamsError, load_world_params


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m post_train.world", description=__doc__.split(":")[0])
    parser.add_argument("--params", type=Path, required=True, help="YAML file with a world.<scale> section")
    parser.add_argument("--scale", required=True, help="which world.<scale> section to use, e.g. demo or smoke")
    parser.add_argument("--out", type=Path, required=True, help="directory to (re)create with the JSONL files")
    args = parser.parse_args(argv)
    try:
        params = load_world_params(args.params, args.scale)
    except WorldParamsError as error:
        sys.exit(f"error: {error}")
    write_world(params, args.out)
    print(f"wrote the {args.scale} world (seed {params.seed}) to {args.out}")


if __name__ == "__main__":
    main()
