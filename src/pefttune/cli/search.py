"""`pefttune search CONFIG`: the discrete placement search on Ray Tune."""
from __future__ import annotations

from pefttune.cli.common import add_experiment_arguments, verbosity
from pefttune.schema import TrialKind


def register(sub) -> None:
    parser = sub.add_parser(
        "search",
        help="Search which PEFT method to put in which layer (Optuna TPE + ASHA on Ray Tune).",
        description="Run a discrete per-layer placement search described by an experiment YAML file. "
        "Results go to <storage>/<name>/ (Ray Tune experiment, optuna.db, experiment.yaml).",
    )
    parser.add_argument("config", help="Experiment YAML file (see pefttune/configs/).")
    add_experiment_arguments(parser, "Finish the unfinished trials of an existing search.")
    parser.add_argument(
        "--resume-errored", action="store_true", help="With --resume: also retry trials that ended with an error."
    )
    parser.add_argument("--quiet", action="store_true", help="No live progress table.")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pefttune.config import load_config
    from pefttune.runtime.console import failure_summary
    from pefttune.runtime.study_dir import results_frame
    from pefttune.search.run import run_search

    config = load_config(args.config)  # validated before Ray starts
    results = run_search(
        config,
        address=args.address,
        resume=args.resume,
        name=args.name,
        resume_errored=args.resume_errored,
        verbose=verbosity(args),
        prefill=True,
    )
    frame = results_frame(results, config.train.epochs)
    outcome = failure_summary(frame, kinds=(TrialKind.UNIFORM, TrialKind.HYBRID, TrialKind.DISCRETE, TrialKind.FROZEN,
                                               TrialKind.DARTS_DERIVED))
    if args.quiet:
        from pefttune.search.summary import summary_table

        named = config if args.name is None else config.model_copy(update={"name": args.name})
        print(summary_table(frame, named))
        print("\n".join(outcome.lines))
    return outcome.exit_code
