"""`pefttune run [CONFIG]`: the whole study (discrete arm, DARTS arm, ensembles, report)."""
from __future__ import annotations

import sys

from pefttune.cli.common import add_experiment_arguments, verbosity


def register(sub) -> None:
    parser = sub.add_parser(
        "run",
        help="Run the whole study: uniform baselines, search, hybrid, DARTS, ensembles, report.",
        description="With no CONFIG, the embedded default study: the shipped self-supervised tiny HuBERT, "
        "a keyword-spotting corpus synthesized offline, local Ray. Results go to <storage>/<name>/.",
    )
    parser.add_argument("config", nargs="?", help="Experiment YAML (default: the embedded study).")
    parser.add_argument("--suite", action="store_true",
                        help="Run the study on several tasks (the config's `tasks`, default ks, sid and pr) and write "
                        "suite.md, one table of configurations by tasks; a config with `tasks` is a suite anyway.")
    add_experiment_arguments(parser, "Finish an interrupted study of the same name.")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Run the study (or suite); a failure of the driver itself is one line on stderr and exit 1
    (its traceback is in the study's errors.log)."""
    from pefttune.runtime.heartbeat import StageFailed

    try:
        return _run(args)
    except StageFailed as err:
        cause = err.__cause__
        if err.stage == "data" and isinstance(cause, INPUT_ERRORS):  # bad data: every bad file named, exit 2
            print(f"pefttune run: error: {cause}", file=sys.stderr, flush=True)
            return 2
        print(f"pefttune run: {err}", file=sys.stderr, flush=True)
        return 1


#: Errors of the data stage that mean bad input (a missing or bad manifest or audio file).
INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def _run(args) -> int:
    from pefttune.config import load_config
    from pefttune.study import run_study

    if args.suite and not args.config:  # the embedded suite: ks, sid and pr with per-task settings
        from pefttune.config import CONFIG_DIR

        args.config = str(CONFIG_DIR / "embedded-suite.yaml")
    config = load_config(args.config)
    if args.suite or config.tasks:
        from pefttune.suite import run_suite

        result = run_suite(config, address=args.address, resume=args.resume, name=args.name, verbose=verbosity(args))
        return result.exit_code
    result = run_study(config, address=args.address, resume=args.resume, name=args.name, verbose=verbosity(args))
    return result.exit_code
