"""`pefttune ensemble`: ensembles over the stored predictions of an experiment's trials."""
from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser(
        "ensemble",
        help="Ensemble stored trial predictions (majority/weighted/soft vote, Caruana; CTC frame vote, "
        "posterior averaging, ROVER).",
    )
    parser.add_argument("experiment", help="Experiment folder <storage>/<name> (local path or URI).")
    parser.add_argument(
        "--members",
        default="top-k",
        help="top-K (e.g. top-5; top-k = the config's ensemble_size), per-method (best uniform trial per "
        "method) or comma-separated trial ids (default top-k).",
    )
    parser.add_argument(
        "--strategy",
        action="append",
        help="vote, weighted, soft, caruana (classification); frame_vote, posterior_avg, rover (CTC). "
        "Repeat or comma-separate; default: all for the task.",
    )
    parser.add_argument("--out", help="Output folder (default <experiment>/analysis).")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pefttune.analysis.ensemble_runner import run_ensembles, save_ensembles
    from pefttune.analysis.markdown import fmt as _fmt, fmt_p as _p
    from pefttune.analysis.store import open_results

    experiment = open_results(args.experiment)
    result = run_ensembles(experiment, args.members, args.strategy)
    metric = experiment.metric
    print(f"experiment {experiment.uri}: {experiment.task}, metric {metric} "
          f"({'higher' if experiment.mode == 'max' else 'lower'} is better)")
    print(f"\nmembers ({result.members}):")
    rows = [("trial", "kind", "params", f"dev {metric}", f"test {metric}")]
    for t in result.trials:
        s = result.member_scores[t.trial_id]
        rows.append((t.trial_id, t.label, _fmt(t.trainable_params), _fmt(s["dev"]), _fmt(s["test"])))
    _print(rows)
    print("\nensembles:")
    rows = [("strategy", f"dev {metric}", f"test {metric}", "gain vs best", "McNemar p", "selected")]
    for r in result.results:
        selected = ",".join(r.selected) if r.strategy == "caruana" else ""
        rows.append((r.strategy, _fmt(r.dev_score), _fmt(r.test_score), _fmt(r.delta_vs_best), _p(r.mcnemar_p), selected))
    _print(rows)
    out = args.out or experiment.default_out_dir()
    files = save_ensembles(experiment, [result], out)
    print("\nwrote " + ", ".join(str(p) for p in files.values()))
    return 0


def _print(rows) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
