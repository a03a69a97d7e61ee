"""`pefttune run [CONFIG]`: the whole study (discrete arm, DARTS arm, ensembles, report)."""
from __future__ import annotations

from pefttune.cli.common import add_experiment_arguments, verbosity


def register(sub) -> None:
    parser = sub.add_parser(
        "run",
        help="Run the whole study: uniform baselines, search, hybrid, DARTS, ensembles, report.",
        description="With no CONFIG, the embedded default study: the shipped self-supervised tiny HuBERT, "
        "a keyword-spotting corpus synthesized offline, local Ray. Results go to <storage>/<name>/.",
    )
    parser.add_argument("config", nargs="?", help="Experiment YAML (default: the embedded study).")
    add_experiment_arguments(parser, "Finish an interrupted study of the same name.")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pefttune.study import run_study

    result = run_study(args.config, address=args.address, resume=args.resume, name=args.name, verbose=verbosity(args))
    return result.exit_code
