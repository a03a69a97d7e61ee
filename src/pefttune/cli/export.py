"""`pefttune export`: an experiment's trials, history, alpha, predictions and ensembles as tables."""
from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("export", help="Export an experiment as parquet + CSV tables (see pefttune.analysis.export).")
    parser.add_argument("experiment", help="Experiment folder <storage>/<name> (local path or URI).")
    parser.add_argument("--out", required=True, help="Output folder for the tables.")
    parser.add_argument("--format", action="append", choices=["parquet", "csv"],
                        help="Format(s) to write (repeatable; default both).")
    parser.add_argument("--tables", help="Comma-separated subset of trials,history,alpha,predictions,ensembles.")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pefttune.analysis.export import FORMATS, TABLES, export_experiment
    from pefttune.analysis.store import open_results

    experiment = open_results(args.experiment)
    tables = [t.strip() for t in args.tables.split(",") if t.strip()] if args.tables else list(TABLES)
    files = export_experiment(experiment, args.out, formats=args.format or FORMATS, tables=tables)
    print(f"experiment {experiment.uri}: {len(experiment.trials)} trials in {len(experiment.ray_experiments)} "
          f"Ray experiment(s)")
    for name, path in files.items():
        print(f"  wrote {path}")
    return 0
