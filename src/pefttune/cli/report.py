"""`pefttune report`: ensembles, exports, statistics, plots and report.md for an experiment."""
from __future__ import annotations

import textwrap


def register(sub) -> None:
    parser = sub.add_parser(
        "report", help="Analyse an experiment: ensembles, tables, plots and report.md with the paper's findings."
    )
    parser.add_argument("experiment", help="Experiment folder <storage>/<name> (local path or URI).")
    parser.add_argument("--out", help="Output folder (default <experiment>/analysis).")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pefttune.analysis.report import analyze, format_comparison

    result = analyze(args.experiment, args.out)
    print(f"experiment {result['experiment']}: {result['n_trials']} trials, metric {result['metric']}")
    print()
    print(format_comparison(result))
    print()
    for key, finding in result["findings"].items():
        print(f"finding {key} ({finding['claim']}): {finding['verdict']}")
        print(textwrap.fill(f"rule: {finding.get('rule', '')}", 120, initial_indent="  ", subsequent_indent="    "))
    print(f"\nwrote {result['files']['report']}\nwrote {result['files']['report_html']}")
    return 0
