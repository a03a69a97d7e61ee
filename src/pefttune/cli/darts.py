"""`pefttune darts CONFIG`: DARTS search, derivation and retraining on Ray Tune."""
from __future__ import annotations

from pefttune.cli.common import add_experiment_arguments, verbosity


def register(sub) -> None:
    parser = sub.add_parser(
        "darts",
        help="Relaxed (DARTS) search of which PEFT method goes where, then retrain the derived placements.",
        description="Run one DARTS search per seed x variant of the config's `darts` section, derive a discrete "
        "placement from each (argmax per layer, or the most probable one within `budget`), and retrain the "
        "derived placements from scratch like the uniform baselines. Results go to <storage>/<name>/darts and "
        "<storage>/<name>/darts-retrain, next to the discrete search.",
    )
    parser.add_argument("config", help="Experiment YAML file (see pefttune/configs/).")
    add_experiment_arguments(parser, "Finish an interrupted DARTS run (search, then retrains).")
    parser.add_argument("--quiet", action="store_true", help="No live progress table.")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pefttune.config import load_config
    from pefttune.darts.run import run_darts, run_outcome, summary

    config = load_config(args.config)  # validated before Ray starts
    result = run_darts(config, address=args.address, resume=args.resume, name=args.name, verbose=verbosity(args),
                      prefill=True)
    outcome = run_outcome(result)
    if args.quiet:
        named = config if args.name is None else config.model_copy(update={"name": args.name})
        print(summary(result, named))
        print("\n".join(outcome.lines))
    return outcome.exit_code
