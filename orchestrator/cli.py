"""``rlhf``: validate, plan and run pipelines. Bad input exits 2 with a message, never a traceback."""

from __future__ import annotations

import argparse
import sys

from orchestrator.errors import UserError

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="Ray-native RLHF pipelines")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("validate", "check a pipeline YAML and print its plan (exit 0 valid, 2 invalid)"),
        ("plan", "print the stage graph and resource plan"),
        ("run", "run a pipeline: one MLflow parent run, one child run per stage"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("pipeline", help="pipeline YAML file")
        cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. stages.offline_dpo.schedule.steps=10 (repeatable)")
        if name == "run":
            cmd.add_argument("--quiet", action="store_true", help="no progress bars or plan printout")
            cmd.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_ID",
                             help="continue an interrupted run (default: this pipeline's latest): completed "
                             "stages with unchanged config are skipped, the interrupted one continues from its "
                             "last checkpoint, in the same MLflow runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from orchestrator.config import load_pipeline

        config = load_pipeline(args.pipeline, args.overrides)
        if args.command in ("validate", "plan"):
            from orchestrator.plan import format_plan, plan_pipeline

            print(f"{args.pipeline}: valid pipeline {config.name!r} with {len(config.stages)} stage(s)")
            print(format_plan(plan_pipeline(config)))
            return 0
        from orchestrator.report import print_summary
        from orchestrator.runner import run_pipeline

        result = run_pipeline(config, quiet=args.quiet, resume=getattr(args, "resume", None))
        print_summary(result)
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
