"""Arguments shared by the commands that run experiments (`run`, `search`, `darts`)."""
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
