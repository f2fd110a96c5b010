"""Serve the flows as deployments: `python -m flows.serve` (or `make serve`).

One deployment of `post-train` per recipe (`post-train/<recipe>`, the recipe preset) and
`retrain/scheduled` on a cron schedule. Run them from another shell:

    prefect deployment run post-train/lowlr -p scale=smoke --watch
    prefect deployment run post-train/baseline -p overrides='{"sft.learning_rate": 1e-4}' -p force=true

Without a server answering at `PREFECT_API_URL` (default http://127.0.0.1:4200/api), a local
one is started first and stopped again on Ctrl-C (post_train/server.py). Flow runs execute in
child processes of this one, in its working directory: relative paths (`runs/`, `cache/`,
`mlflow.db`, the DVC root `.`) resolve there, as for `post-train run`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from flows.compare import compare_deployment
from flows.pipeline import post_train
from flows.retrain import retrain
from flows.study import study_deployment
from post_train.config import available_recipes

RETRAIN_DEPLOYMENT = "scheduled"
DEFAULT_RETRAIN_CRON = "0 3 * * *"
CRON_ENV = "POST_TRAIN_RETRAIN_CRON"
TIMEZONE_ENV = "POST_TRAIN_RETRAIN_TIMEZONE"
TAGS = ["post-train"]


def build_deployments(retrain_cron: str | None = DEFAULT_RETRAIN_CRON, timezone: str = "UTC") -> list[RunnerDeployment]:
    """`post-train/<recipe>` for every recipe in recipes/, and `retrain/scheduled`.

    An empty `retrain_cron` registers `retrain/scheduled` without a schedule (runs on demand only).
    Raises ValueError for a bad cron string or time zone.
    """
    try:
        ZoneInfo(timezone)
    except (ValueError, ZoneInfoNotFoundError):
        raise ValueError(f"unknown time zone {timezone!r}") from None
    # Module entrypoints (`flows.pipeline.post_train`) load from the installed package, whatever
    # the flow-run process's working directory.
    deployments = [
        post_train.to_deployment(
            name=recipe,
            parameters={"recipe": recipe},
            description=f"post-train with recipe `{recipe}`: prepare, base model, SFT, DPO, evaluate, register.",
            tags=[*TAGS, recipe],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        for recipe in available_recipes()
    ]
    schedules = [Cron(retrain_cron, timezone=timezone)] if retrain_cron else []
    deployments.append(
        retrain.to_deployment(
            name=RETRAIN_DEPLOYMENT,
            schedules=schedules,
            description="Retrain when the data changed since the champion was trained; record a skip otherwise.",
            tags=[*TAGS, "retrain"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
    )
    deployments.append(compare_deployment())
    deployments.append(study_deployment())
    return deployments


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--retrain-cron",
        default=os.environ.get(CRON_ENV, DEFAULT_RETRAIN_CRON),
        help=f"cron schedule of retrain/{RETRAIN_DEPLOYMENT} "
        f"(default: ${CRON_ENV} or {DEFAULT_RETRAIN_CRON!r}); '' for none",
    )
    parser.add_argument(
        "--retrain-timezone",
        default=os.environ.get(TIMEZONE_ENV, "UTC"),
        help=f"time zone of that schedule, e.g. Europe/Paris (default: ${TIMEZONE_ENV} or UTC)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=1,
        help="flow runs executed at the same time (default 1: training runs share the machine)",
    )
    args = parser.parse_args(argv)

    from post_train.server import ServerError, local_server

    try:
        deployments = build_deployments(args.retrain_cron, args.retrain_timezone)
    except ValueError as error:
        parser.error(f"retrain schedule: {error}")
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the server we started, as Ctrl-C does
    try:
        with local_server():
            serve(*deployments, limit=args.limit)
    except ServerError as error:
        print(f"serve: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
