"""The `pefttune` command line.

Each subcommand lives in its own small module exposing ``register(subparsers)``,
which adds its parser and sets ``func`` to a function taking the parsed args.
Arguments are parsed only here, at the entry point.
"""
from __future__ import annotations

import argparse
import sys

from pefttune.cli import backbone as backbone_cli
from pefttune.cli import darts as darts_cli
from pefttune.cli import data as data_cli
from pefttune.cli import ensemble as ensemble_cli
from pefttune.cli import export as export_cli
from pefttune.cli import export_model as export_model_cli
from pefttune.cli import info
from pefttune.cli import init as init_cli
from pefttune.cli import predict as predict_cli
from pefttune.cli import report as report_cli
from pefttune.cli import run as run_cli
from pefttune.cli import search as search_cli
from pefttune.cli import status as status_cli
from pefttune.cli.common import quiet_libraries

# Subcommand modules, in the order `pefttune --help` lists them.
SUBCOMMANDS = [init_cli, run_cli, status_cli, data_cli, info, search_cli, darts_cli, ensemble_cli, export_cli, report_cli, export_model_cli, predict_cli, backbone_cli]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pefttune",
        description="Which PEFT method where in a frozen speech SSL encoder: search, DARTS, ensembles.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries(args)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # bad input: before any compute
        print(f"pefttune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a run that failed (e.g. no DARTS trial finished)
        print(f"pefttune {args.command}: failed: {err}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
