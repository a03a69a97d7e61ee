"""Arguments shared by the commands: those that run experiments (`run`, `search`, `darts`), and
``-v`` for the commands that load models (`export-model`, `predict`)."""
from __future__ import annotations

import argparse


def add_experiment_arguments(parser: argparse.ArgumentParser, resume_help: str) -> None:
    """--address (Ray cluster), --resume (with the command's own meaning) and --name."""
    parser.add_argument(
        "--address",
        help="Join a running Ray cluster: auto, ray://host:10001 or host:port "
        "(default: start a private local Ray on the loopback interface, dashboard off).",
    )
    parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.add_argument("--name", help="Experiment name (overrides `name` in the config).")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="Also show Ray's status tables, checkpoint lines and the workers' output (default: one line per "
        "finished trial and a progress line; full tracebacks go to <experiment>/errors.log).",
    )


def verbosity(args) -> int:
    """0 (--quiet), 1 (default: pefttune's console) or 2 (-v: Ray's stream as well)."""
    if getattr(args, "quiet", False):
        return 0
    return 2 if args.verbose else 1


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    """``-v``: show what the libraries print while they load a model (transformers' progress bars)."""
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="Also show the libraries' progress bars while models load (default: off).")


def quiet_libraries(args) -> None:
    """Without ``-v``: no transformers progress bars ("Loading weights") on this process's console."""
    if getattr(args, "verbose", 0):
        return
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
