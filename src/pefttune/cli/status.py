"""`pefttune status EXP`: trials done, running, pending and errored per kind, best so far, ETA."""
from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser(
        "status",
        help="Where an experiment stands: per kind done/running/pending/errored, best so far, elapsed, ETA.",
        description="Reads the experiment folder (the results store), so it works while the study runs, "
        "after it finished and after a crash.",
    )
    parser.add_argument("experiment", help="Experiment folder <storage>/<name> (local path or URI).")
    parser.add_argument("--stale-after", type=float, default=600.0,
                        help="Seconds without an update of Ray's experiment state after which running trials "
                        "mean the driver is gone (default 600).")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pefttune.analysis.status import experiment_status, format_status

    print(format_status(experiment_status(args.experiment, stale_after=args.stale_after)))
    return 0
