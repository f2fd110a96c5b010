"""`post-train`: run the flow from a shell and read its summary."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from post_train.comparison import DEFAULT_OBJECTIVES
from post_train.config import available_recipes, available_scales, parse_overrides
from post_train.errors import ConfigError, DataError
from post_train.executors.warm import started_early
from post_train.server import ServerError, run_api


def _percent(value: Any) -> str:
    return "  n/a" if value is None or value != value else f"{100 * value:5.1f}"


def _training_lines(summary: dict[str, Any]) -> list[str]:
    """The SFT stage's line (absent when the joint stage started from the base), then DPO's or the joint stage's."""
    lines = []
    sft = summary.get("sft")
    if sft:
        lines.append(
            f"  SFT loss             {sft['loss_first']:.4f} -> {sft['loss_final']:.4f}"
            f"   KL to base {sft['kl_to_base_final']:.4f}   entropy {sft['entropy_final']:.4f}"
        )
    final = summary.get("joint") or summary["dpo"]
    name = "joint loss" if "joint" in summary else "DPO loss"
    line = f"  {name:<21}{final['loss_first']:.4f} -> {final['loss_final']:.4f}"
    if "joint" in summary:
        line += f"   (SFT part {final['sft_loss_final']:.4f}, DPO part {final['dpo_loss_final']:.4f})"
    accuracy, margin = final["rewards/accuracies_final"], final["rewards/margins_final"]
    lines.append(f"{line}   reward accuracy {accuracy:.2f}   margin {margin:.3f}")
    return lines


def format_summary(summary: dict[str, Any]) -> str:
    from post_train.data import describe_counts
    from post_train.results import splits_in
    from post_train.tracking import tracking_uri

    evaluation = summary["evaluation"]
    judge = summary.get("judge", "gold")
    lines = [
        "",
        f"post-train finished: recipe {summary['recipe']} at scale {summary['scale']}",
        f"  data hash (DVC)      {summary['data_hash']}",
        *(f"  {dataset + ' data':<21}{counts}" for dataset, counts in describe_counts(summary.get("data") or {})),
        f"  base model           {summary['base_model']['path']}"
        + ("  (cached)" if summary["base_model"]["cache_hit"] else ""),
        *_training_lines(summary),
        f"  win rate vs reference ({judge} judge, %): raw ± s.e. [95% bootstrap CI], discrete, length-controlled",
    ]
    for split in splits_in(evaluation):

        def get(key: str, split: str = split) -> Any:
            return evaluation.get(f"{key}/{split}")

        line = (
            f"    {split:<16} {_percent(get('win_rate'))} ± {100 * (get('win_rate_se') or 0):.1f}"
            f" [{_percent(get('win_rate_ci_low')).strip()}, {_percent(get('win_rate_ci_high')).strip()}]"
            f"  discrete {_percent(get('win_rate_discrete')).strip()}  LC {_percent(get('lc_win_rate')).strip()}"
            f"  (n={int(get('num_prompts') or 0)},"
            f" length {get('avg_length') or 0:.0f} vs {get('reference_avg_length') or 0:.0f}"
        )
        if get("gold_reward") is not None:
            line += f", gold reward {get('gold_reward'):.3f} vs {get('reference_gold_reward'):.3f}"
        lines.append(line + ")")
    diagnostics = [
        ("KL to base", [("sft", "kl_to_base/sft"), ("dpo", "kl_to_base/dpo")], "{:.4f}"),
        (
            "native KL to base",
            [("sft", "native_kl_to_base/sft/all"), ("dpo", "native_kl_to_base/dpo/all")],
            "{:.4f}",
        ),
        (
            "retention held out",
            [("sft", "retention/sft/held_out"), ("dpo", "retention/dpo/held_out")],
            "{:.2f}",
        ),
        ("gold reward all", [("sft", "sft_gold_reward/all"), ("dpo", "gold_reward/all")], "{:.3f}"),
        ("entropy", [("base", "entropy/base"), ("sft", "entropy/sft"), ("dpo", "entropy/dpo")], "{:.3f}"),
        (
            "implicit-reward acc.",
            [
                ("dpo vs sft", "implicit_reward_accuracy/dpo_vs_sft/all"),
                ("sft vs base", "implicit_reward_accuracy/sft_vs_base/all"),
            ],
            "{:.2f}",
        ),
        (
            "Q-value Spearman",
            [("dpo vs sft", "q_value_spearman/dpo_vs_sft"), ("sft vs base", "q_value_spearman/sft_vs_base")],
            "{:.3f}",
        ),
    ]
    for label, keys, fmt in diagnostics:
        found = [f"{name} {fmt.format(evaluation[key])}" for name, key in keys if key in evaluation]
        if found:
            lines.append(f"  {label:<21}{'   '.join(found)}")
    for regression in summary.get("regressions") or []:
        lines.append(f"  got worse            {regression}")
    registration = summary.get("registration") or {}
    aliases = ", ".join(registration.get("aliases") or (["champion"] if summary["champion"] else []))
    lines.append(f"  registered model     {summary['model_uri']}" + (f"  (aliases: {aliases})" if aliases else ""))
    if registration.get("already_registered"):  # the same weights: nothing was registered or promoted now
        lines.append(f"  registration         {registration['reason']}")
    elif registration.get("reason"):
        decision = "promoted" if registration.get("promoted") else "not promoted"
        lines.append(f"  promotion            {decision}: {registration['reason']}")
    lines += [
        f"  MLflow run           {summary['mlflow_run_uri']}",
        f"  run directory        {summary['run_dir']}",
        "",
        "Browse the results:",
        f"  MLflow:  mlflow ui --backend-store-uri {tracking_uri()} --port 5000   (then http://127.0.0.1:5000)",
        "  Prefect: prefect server start   (then http://127.0.0.1:4200; runs made without a server are kept",
        "           in the same local database and show up there)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="post-train", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the traceback of an error, not only its message")
    run_parser = commands.add_parser("run", help="validate the inputs, then run the post-train flow", parents=[debug])
    validate_parser = commands.add_parser(
        "validate", help="check everything a run reads, report every problem, run nothing", parents=[debug]
    )
    for recipe_parser in (run_parser, validate_parser):
        recipe_parser.add_argument("--recipe", default="lowlr", help=f"one of {available_recipes()} or a .yaml path")
        recipe_parser.add_argument("--scale", default="demo", help=f"one of {available_scales()} or a .yaml path")
        recipe_parser.add_argument(
            "-o",
            "--override",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. -o sft.learning_rate=1e-4 (repeatable)",
        )
    run_parser.add_argument("--force", action="store_true", help="rerun every stage, ignoring cached results")
    commands.add_parser("recipes", help="list recipes and scales")
    compare_parser = commands.add_parser(
        "compare", help="compare SFT objectives x SFT learning rates x seeds by post-DPO win rate", parents=[debug]
    )
    compare_parser.add_argument(
        "--recipe", default="baseline", help="base recipe, for everything the grid does not set"
    )
    compare_parser.add_argument("--scale", default="demo", help=f"one of {available_scales()} or a .yaml path")
    compare_parser.add_argument(
        "--objectives",
        nargs="+",
        default=list(DEFAULT_OBJECTIVES),
        metavar="OBJECTIVE",
        help="SFT objectives (sft.objective names)",
    )
    compare_parser.add_argument(
        "--learning-rates",
        nargs="+",
        type=float,
        default=None,
        metavar="LR",
        help="SFT learning rates (default: the recipe's and a quarter of it)",
    )
    compare_parser.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED", help="SFT and DPO seeds")
    compare_parser.add_argument("--parallelism", type=int, default=1, help="grid cells run at once")
    compare_parser.add_argument("--force", action="store_true", help="rerun stages even when cached")
    compare_parser.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value for every cell (repeatable)",
    )
    study_parser = commands.add_parser(
        "study", help="run a study (studies/<name>.yaml) and write its report", parents=[debug]
    )
    study_parser.add_argument("name", nargs="?", default="papers", help="a study in studies/ or a .yaml path")
    study_parser.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED", help="replace its seeds")
    study_parser.add_argument("--parallelism", type=int, default=None, help="cells at once (replaces the file's)")
    study_parser.add_argument(
        "--report-dir", default="docs/results", help="where results.md and its plots are copied (default: %(default)s)"
    )
    study_parser.add_argument("--force", action="store_true", help="rerun stages even when cached")
    study_parser.add_argument(
        "-o", "--override", action="append", default=[], metavar="KEY=VALUE", help="override a value for every arm"
    )
    args = parser.parse_args(argv)
    try:
        return _command(args)
    except (ConfigError, DataError) as error:  # bad input: the message says what to fix
        if getattr(args, "debug", False):
            raise
        print(f"post-train: {error}", file=sys.stderr)
        return 2


def _validated(args: argparse.Namespace) -> bool:
    """`post_train.validate` on the command's recipe, scale and overrides, its report printed; whether it passed."""
    from post_train.validate import InvalidInputs, validate

    found = validate(args.recipe, args.scale, args.override)
    if found.problems and args.debug:
        raise InvalidInputs(found.report().removeprefix("post-train: "))
    print(found.report(), file=sys.stderr if found.problems else sys.stdout)
    return not found.problems


def _while_the_server_starts() -> None:
    """Do in this process, while the Prefect server starts, what the flow would otherwise do first: open the
    tracking store (a new store's tables, ~2 s)."""
    from post_train.tracking import experiment_id

    experiment_id()


def _command(args: argparse.Namespace) -> int:
    if args.command == "compare":
        from post_train.comparison import plan_grid
        from post_train.tracking import flatten, tracking_uri

        if not _validated(args):  # refuse bad input and a bad grid before anything starts
            return 2
        overrides = flatten(parse_overrides(args.override))
        plan_grid(
            args.recipe, args.scale, args.objectives, args.learning_rates, args.seeds, overrides, args.parallelism
        )
        with run_api() as api:  # the server starts while the flow's modules import
            from flows.compare import compare

            _while_the_server_starts()
            try:
                api.ready()
                result = compare(
                    recipe=args.recipe,
                    scale=args.scale,
                    objectives=args.objectives,
                    learning_rates=args.learning_rates,
                    seeds=args.seeds,
                    overrides=overrides,
                    parallelism=args.parallelism,
                    force=args.force,
                )
            except ServerError as error:
                print(f"post-train: {error}", file=sys.stderr)
                return 1
        print("\n" + result["markdown"])
        if result["aggregated_markdown"]:
            print("mean over seeds (95% CI: Student t over the per-seed win rates):\n")
            print(result["aggregated_markdown"])
        print(f"results: {result['output_dir']}")
        print(f"MLflow run: {result['mlflow_run_uri']}   (mlflow ui --backend-store-uri {tracking_uri()} --port 5000)")
        return 0

    if args.command == "study":
        return _study(args)
    if args.command == "recipes":
        print("recipes:", ", ".join(available_recipes()))
        print("scales: ", ", ".join(available_scales()))
        return 0
    if args.command == "validate":
        return 0 if _validated(args) else 2
    with started_early(dict(os.environ), Path.cwd()):  # the stages' libraries import while the inputs are checked
        if not _validated(args):  # refuse bad input before anything starts
            return 2
        overrides = parse_overrides(args.override)
        from post_train.config import load_config
        from post_train.stages import warm_up
        from post_train.tracking import flatten

        warm_up(load_config(args.recipe, args.scale, overrides))  # keeps that server, or starts the one it needs
    with run_api() as api:  # the Prefect server starts while the flow's modules import
        from flows.pipeline import post_train

        _while_the_server_starts()
        try:
            api.ready()
            summary = post_train(recipe=args.recipe, scale=args.scale, overrides=flatten(overrides), force=args.force)
        except ServerError as error:
            print(f"post-train: {error}", file=sys.stderr)
            return 1
    print(format_summary(summary))
    return 0


def _study(args: argparse.Namespace) -> int:
    from post_train.study import load_study, plan_study
    from post_train.tracking import flatten

    overrides = flatten(parse_overrides(args.override))
    spec = load_study(args.name)
    if args.seeds or args.parallelism:
        spec = spec.model_copy(
            update={k: v for k, v in {"seeds": args.seeds, "parallelism": args.parallelism}.items() if v}
        )
    plan = plan_study(spec, overrides)  # every arm's configuration, before Prefect starts
    baseline = spec.arms[spec.baseline]  # the arms share the data, so one check of it covers them all
    inputs = [f"{key}={value}" for key, value in {**baseline.overrides, **overrides}.items()]
    if not _validated(argparse.Namespace(recipe=baseline.recipe, scale=spec.scale, override=inputs, debug=args.debug)):
        return 2
    with run_api() as api:
        from flows.study import run_study

        _while_the_server_starts()
        try:
            api.ready()
            result = run_study(
                name=args.name,
                seeds=args.seeds,
                parallelism=args.parallelism,
                overrides=overrides,
                report_dir=args.report_dir,
                force=args.force,
            )
        except ServerError as error:
            print(f"post-train: {error}", file=sys.stderr)
            return 1
    print(f"study {args.name}: {len(plan.cells)} cells; report {result['report']} (copied to {args.report_dir})")
    for claim in result["claims"]:
        print(f"  {claim['verdict']:>13}: {claim['paper']}: {claim['statement']}")
    print(f"MLflow run: runs:/{result['mlflow_run_id']}")
    return 0
