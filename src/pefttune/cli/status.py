"""`pefttune status EXP`: state, stage, trials done/running/pending/errored per kind, best so far, ETA."""
from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser(
        "status",
        help="Where an experiment stands: state and stage, per kind done/running/pending/errored, best so far, "
        "elapsed, ETA.",
        description="Reads the experiment folder (the results store and the driver's heartbeat.json), so it works "
        "while the study runs, after it finished and after a crash: a driver that is gone makes the study "
        "'interrupted' at once.",
    )
    parser.add_argument("experiment", help="Experiment folder <storage>/<name> (local path or URI).")
    parser.add_argument("--stale-after", type=float, default=600.0,
                        help="Folders without heartbeat.json (older versions): seconds without an update of Ray's "
                        "experiment state after which running trials mean the driver is gone (default 600).")
    parser.add_argument("--heartbeat-stale-after", type=float, default=15.0,
                        help="Seen from another host than the driver's: seconds without a heartbeat after which the "
                        "driver counts as gone (default 15; on the driver's host its process is checked).")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pefttune.analysis.status import experiment_status, format_status

    print(format_status(experiment_status(args.experiment, stale_after=args.stale_after,
                                          heartbeat_stale_after=args.heartbeat_stale_after)))
    return 0
