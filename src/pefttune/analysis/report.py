"""The experiment report: the paper's three findings checked on this experiment.

:func:`analyze` runs everything (ensembles, exports, statistics, plots, ``report.md``)
and returns the key numbers; ``pefttune report EXPERIMENT`` calls it.

Findings of Lin et al. 2024 and how each verdict is decided (all on the test split;
trials are *selected* on dev, never on test):

1. **DARTS placement does not beat uniform placement.**  The best darts-derived trial
   (by dev) against the best uniform trial (by dev): test scores and the exact McNemar
   test on per-example correctness.  *reproduced* unless darts-derived is better with
   p < :data:`ALPHA`.  The best discrete-search trial is compared the same way (shown,
   not part of the verdict).  *not run* without darts-derived or uniform trials.
2. **Ensembles, particularly majority voting, perform best.**  On the headline member
   set (best trial per uniform method when there are >= 2 methods, else top-k): the
   majority vote (``vote``; CTC: ``rover``) against the best member by dev.
   *reproduced* if the vote beats that member and no other strategy beats the vote;
   *partly reproduced* if some ensemble beats the member but the vote is not the best
   (or not better); *not reproduced* if no ensemble beats it.
3. **Different PEFT methods make different errors.**  Between the best trials of the
   uniform methods, pairwise: agreement, Cohen's kappa, error overlap (Jaccard of the
   error sets) and McNemar.  *reproduced* if the mean error overlap is below
   :data:`OVERLAP_THRESHOLD` (most errors of a pair are made by one method only);
   *partly reproduced* if not, but some pair's error rates differ (McNemar p < ALPHA);
   *not reproduced* otherwise; *inconclusive* if no pair has errors.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from pefttune.analysis.ensemble_runner import (
    EnsembleRun,
    correct,
    default_ensembles,
    gain,
    load_members,
    majority_strategy,
    save_ensembles,
    score,
    strategies_for,
)
from pefttune.analysis.export import export_experiment
from pefttune.analysis.selection import best_per_method, ranked
from pefttune.analysis.stats import agreement_matrix, mcnemar_exact, pairwise_table
from pefttune.analysis.store import Experiment, MissingPredictionsError, TrialRecord, open_experiment
from pefttune.analysis.tables import alpha_table, trials_table, write_table
from pefttune.runtime.storage import atomic_write_text

__all__ = ["ALPHA", "OVERLAP_THRESHOLD", "analyze", "format_comparison", "pairwise_methods", "pairwise_trials"]

ALPHA = 0.05
OVERLAP_THRESHOLD = 0.5
NOT_RUN = "not run"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{float(value):.{digits}f}"
    return str(value)


def _p(value: float) -> str:
    return "-" if value is None or math.isnan(value) else (f"{value:.3g}" if value < 0.001 else f"{value:.3f}")


def md_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """A GitHub markdown table (``|`` in cells escaped)."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        cells = [_fmt(row.get(c)).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- scores on stored predictions
def _test_eval(experiment: Experiment, trial: TrialRecord) -> tuple[float, np.ndarray, np.ndarray] | None:
    """(test score, example index, correctness) from stored predictions (None if missing)."""
    try:
        data = load_members(experiment, [trial], "test")
    except MissingPredictionsError:
        return None
    ref = data.labels if experiment.task == "classification" else data.refs
    preds = data.preds(0)
    return score(experiment, preds, ref), data.index, correct(experiment.task, preds, ref)


def _compare(experiment: Experiment, a: TrialRecord, b: TrialRecord) -> dict:
    """Test scores of a and b and McNemar(a correct, b correct) on their common examples."""
    ea, eb = _test_eval(experiment, a), _test_eval(experiment, b)
    if ea is None or eb is None:
        return {}
    common, ia, ib = np.intersect1d(ea[1], eb[1], return_indices=True)
    mb, mc, p = mcnemar_exact(ea[2][ia], eb[2][ib])
    return {"a": a.trial_id, "b": b.trial_id, "a_test": ea[0], "b_test": eb[0], "mcnemar_b": mb,
            "mcnemar_c": mc, "mcnemar_p": p, "n": int(common.shape[0]),
            "gain": gain(ea[0], eb[0], experiment.mode)}


def _trial_summary(experiment: Experiment, trial: TrialRecord | None) -> dict | None:
    if trial is None:
        return None
    return {
        "trial_id": trial.trial_id, "kind": trial.kind, "method": trial.method,
        "placement": trial.placement_short, "trainable_params": trial.trainable_params,
        "dev": experiment.score(trial, "dev"), "test": experiment.score(trial, "test"),
    }


def _best_of_kind(experiment: Experiment, kind: str) -> TrialRecord | None:
    pool = ranked(experiment, trials=[t for t in experiment.trials if t.usable and t.kind == kind])
    return pool[0] if pool else None


# --------------------------------------------------------------------------- findings
def finding_darts(experiment: Experiment) -> dict:
    uniform = _best_of_kind(experiment, "uniform")
    darts = _best_of_kind(experiment, "darts-derived")
    discrete = _best_of_kind(experiment, "discrete")
    out: dict[str, Any] = {"finding": 1, "claim": "DARTS over per-layer placement does not beat uniform placement"}
    out["uniform"], out["darts_derived"] = _trial_summary(experiment, uniform), _trial_summary(experiment, darts)
    out["discrete"] = _trial_summary(experiment, discrete)
    if discrete is not None and uniform is not None:
        out["discrete_vs_uniform"] = _compare(experiment, discrete, uniform)
    n_search = sum(t.kind == "darts" for t in experiment.trials)
    if uniform is None or darts is None:
        missing = "uniform baselines" if uniform is None else "darts-derived (retrained) trials"
        extra = f" ({n_search} DARTS search trial(s) found, but no retrained placement)" if n_search and darts is None else ""
        out.update(verdict=NOT_RUN, text=f"Not run: this experiment has no usable {missing}{extra}.")
        return out
    cmp = _compare(experiment, darts, uniform)
    out["comparison"] = cmp
    if not cmp:
        out.update(verdict=NOT_RUN, text="Not run: test predictions are missing for the compared trials.")
        return out
    darts_better = cmp["gain"] > 0
    significant = cmp["mcnemar_p"] < ALPHA
    verdict = "not reproduced" if darts_better and significant else "reproduced"
    relation = "better than" if darts_better else ("equal to" if cmp["gain"] == 0 else "worse than")
    text = (
        f"Best darts-derived trial `{darts.trial_id}` ({darts.placement_short}) scores test "
        f"{experiment.metric} {_fmt(cmp['a_test'])}, {relation} the best uniform trial `{uniform.trial_id}` "
        f"({uniform.label}) at {_fmt(cmp['b_test'])} (McNemar b={cmp['mcnemar_b']}, c={cmp['mcnemar_c']}, "
        f"p={_p(cmp['mcnemar_p'])}, n={cmp['n']}). "
    )
    text += (
        "DARTS is significantly better here, so the finding is **not reproduced**."
        if verdict == "not reproduced"
        else "DARTS does not significantly beat uniform placement: **reproduced**."
    )
    if out.get("discrete_vs_uniform"):
        d = out["discrete_vs_uniform"]
        text += (
            f" (Discrete search, best `{discrete.trial_id}`: {_fmt(d['a_test'])} vs uniform {_fmt(d['b_test'])}, "
            f"McNemar p={_p(d['mcnemar_p'])}.)"
        )
    out.update(verdict=verdict, text=text)
    return out


def finding_ensembles(experiment: Experiment, runs: Sequence[EnsembleRun], error: str | None = None) -> dict:
    out: dict[str, Any] = {"finding": 2, "claim": "ensembles, particularly majority voting, perform best"}
    if not runs:
        reason = error or "fewer than 2 usable trials with stored predictions"
        out.update(verdict=NOT_RUN, text=f"Not run: {reason}.")
        return out
    headline = next((r for r in runs if r.members == "per-method"), runs[0])
    majority = majority_strategy(experiment.task)
    results = {r.strategy: r for r in headline.results}
    out["members"] = headline.members
    out["member_ids"] = [t.trial_id for t in headline.trials]
    out["strategies"] = {s: {"dev": r.dev_score, "test": r.test_score, "delta_vs_best": r.delta_vs_best,
                             "mcnemar_p": r.mcnemar_p} for s, r in results.items()}
    if majority not in results:
        out.update(verdict=NOT_RUN, text=f"Not run: the majority vote ({majority}) was not computed.")
        return out
    vote = results[majority]
    # the best strategy on test; ties go to the majority vote, then to the listed order
    ordered = [vote] + [r for r in results.values() if r is not vote]
    best_strategy = max(ordered, key=lambda r: gain(r.test_score, vote.test_score, experiment.mode))
    out.update(
        majority_strategy=majority, vote_test=vote.test_score, best_member_id=vote.best_member_id,
        best_member_test=vote.best_member_test, oracle_member_test=vote.oracle_member_test,
        vote_gain=vote.delta_vs_best, mcnemar_b=vote.mcnemar_b, mcnemar_c=vote.mcnemar_c, mcnemar_p=vote.mcnemar_p,
        best_strategy=best_strategy.strategy, best_strategy_test=best_strategy.test_score,
    )
    any_beats = any(r.delta_vs_best > 0 for r in results.values())
    vote_is_best = gain(best_strategy.test_score, vote.test_score, experiment.mode) <= 0
    if vote.delta_vs_best > 0 and vote_is_best:
        verdict = "reproduced"
    elif any_beats:
        verdict = "partly reproduced"
    else:
        verdict = "not reproduced"
    text = (
        f"On the {headline.members} members ({len(headline.trials)} trials), the majority vote ({majority}) scores "
        f"test {experiment.metric} {_fmt(vote.test_score)} vs {_fmt(vote.best_member_test)} for the best single "
        f"member by dev `{vote.best_member_id}` (gain {_fmt(vote.delta_vs_best)}, McNemar b={vote.mcnemar_b}, "
        f"c={vote.mcnemar_c}, p={_p(vote.mcnemar_p)}; best member on test: {_fmt(vote.oracle_member_test)}). "
        f"Best strategy: {best_strategy.strategy} ({_fmt(best_strategy.test_score)}). "
    )
    text += {
        "reproduced": "Majority voting beats the best single member and no strategy beats it: **reproduced**.",
        "partly reproduced": "An ensemble beats the best single member, but majority voting is not the best "
        "(or does not beat it): **partly reproduced**.",
        "not reproduced": "No ensemble beats the best single member: **not reproduced**.",
    }[verdict]
    out.update(verdict=verdict, text=text)
    return out


def pairwise_trials(
    experiment: Experiment | str, trials: dict[str, TrialRecord] | Sequence[TrialRecord], split: str = "test"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pairwise statistics between trials on the same examples of ``split``.

    ``trials``: name -> trial (names label the rows), or a list (named by trial id).
    Returns (:func:`stats.pairwise_table`: agreement, kappa, McNemar, error overlap per
    pair; :func:`stats.agreement_matrix` of Cohen's kappa).  CTC predictions are compared
    as whole hypotheses (token strings; correct = exact match).
    """
    experiment = open_experiment(experiment)
    named = trials if isinstance(trials, dict) else {t.trial_id: t for t in trials}
    if len(named) < 2:
        return pd.DataFrame(), pd.DataFrame()
    data = load_members(experiment, list(named.values()), split)
    if experiment.task == "classification":
        preds = {m: data.probs[i].argmax(-1) for i, m in enumerate(named)}
        ref = data.labels
    else:
        preds = {m: np.array([" ".join(map(str, h)) for h in data.hyps[i]]) for i, m in enumerate(named)}
        ref = np.array([" ".join(map(str, r)) for r in data.refs])
    return pairwise_table(preds, ref), agreement_matrix(preds, "kappa")


def pairwise_methods(experiment: Experiment) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, TrialRecord]]:
    """:func:`pairwise_trials` between the best trials of the uniform methods (test split);
    also returns those trials by method."""
    best = best_per_method(experiment)
    pairs, kappa = pairwise_trials(experiment, best)
    return pairs, kappa, best


def finding_errors(experiment: Experiment, pairs: pd.DataFrame, error: str | None = None) -> dict:
    out: dict[str, Any] = {"finding": 3, "claim": "different PEFT methods make different errors"}
    if pairs.empty:
        reason = error or "fewer than 2 uniform methods with stored test predictions"
        out.update(verdict=NOT_RUN, text=f"Not run: {reason}.")
        return out
    sig = pairs["mcnemar_p"] < ALPHA
    overlap = pairs["error_overlap"].astype(float)
    stats = {
        "pairs": int(len(pairs)),
        "mean_agreement": float(pairs["agreement"].mean()),
        "mean_kappa": float(pairs["kappa"].astype(float).mean()),
        "mean_error_overlap": float(overlap.mean()) if overlap.notna().any() else float("nan"),
        "share_mcnemar_significant": float(sig.mean()),
        "significant_pairs": [f"{a}/{b}" for a, b in pairs.loc[sig, ["a", "b"]].itertuples(index=False)],
        "min_mcnemar_p": float(pairs["mcnemar_p"].min()),
    }
    out.update(stats)
    if overlap.notna().sum() == 0:
        verdict = "inconclusive"
    elif stats["mean_error_overlap"] < OVERLAP_THRESHOLD:
        verdict = "reproduced"
    elif stats["share_mcnemar_significant"] > 0:
        verdict = "partly reproduced"
    else:
        verdict = "not reproduced"
    text = (
        f"Over {stats['pairs']} pairs of uniform methods: mean agreement {_fmt(stats['mean_agreement'])}, "
        f"mean Cohen's kappa {_fmt(stats['mean_kappa'])}, mean error overlap (Jaccard) "
        f"{_fmt(stats['mean_error_overlap'])}; {sum(sig)}/{len(pairs)} pairs "
        f"({stats['share_mcnemar_significant']:.0%}) differ in error rate at McNemar p < {ALPHA} "
        f"(smallest p={_p(stats['min_mcnemar_p'])}). "
    )
    text += {
        "reproduced": f"Most errors are not shared (overlap < {OVERLAP_THRESHOLD}): **reproduced**.",
        "partly reproduced": "Errors overlap largely, but some methods' error rates differ significantly: "
        "**partly reproduced**.",
        "not reproduced": "The methods largely make the same errors: **not reproduced**.",
        "inconclusive": "No method makes errors on the test set: **inconclusive**.",
    }[verdict]
    out.update(verdict=verdict, text=text)
    return out


# --------------------------------------------------------------------------- analyze
def _comparison(experiment: Experiment, runs: Sequence[EnsembleRun]) -> list[dict]:
    rows = []
    for method, trial in best_per_method(experiment).items():
        rows.append({"name": f"uniform:{method}", **_trial_summary(experiment, trial)})
    for kind in ("hybrid", "discrete", "darts-derived"):
        trial = _best_of_kind(experiment, kind)
        if trial is not None:
            rows.append({"name": f"best {kind}", **_trial_summary(experiment, trial)})
    for run in runs:
        for r in run.results:
            params = sum(t.trainable_params or 0 for t in run.trials)
            rows.append({"name": f"ensemble {r.ensemble_id}", "trial_id": ",".join(r.member_ids), "kind": "ensemble",
                         "method": r.strategy, "placement": "", "trainable_params": params,
                         "dev": r.dev_score, "test": r.test_score})
    return rows


def format_comparison(result: dict) -> str:
    """The comparison rows of :func:`analyze` as an aligned text table."""
    rows = result.get("comparison", [])
    header = ("name", "params", "dev", "test")
    table = [header] + [
        (r["name"], _fmt(r.get("trainable_params")), _fmt(r.get("dev")), _fmt(r.get("test"))) for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _run_default_ensembles(experiment: Experiment) -> tuple[list[EnsembleRun], str | None]:
    """The default ensembles, and why there are none when they could not be run."""
    try:
        try:
            return default_ensembles(experiment), None
        except MissingPredictionsError:
            # some member lacks dev predictions: keep the strategies that need test only
            needs_dev = {"weighted", "caruana"}
            return default_ensembles(experiment, [s for s in strategies_for(experiment.task) if s not in needs_dev]), None
    except (ValueError, FileNotFoundError) as err:  # e.g. members evaluated on different examples
        return [], str(err)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def analyze(experiment_path: str | Path | Experiment, out_dir: str | Path | None = None) -> dict:
    """Ensembles + exports + statistics + plots + ``report.md`` in one go.

    Writes to ``out_dir`` (default ``<experiment>/analysis``; ``./pefttune-analysis/<name>``
    for a remote experiment): ``report.md``, ``summary.json`` (this function's result),
    ``ensembles.json``, ``tables/`` (trials, history, alpha, predictions, ensembles,
    pairwise; parquet + CSV) and ``plots/*.png``.  Returns a dict with ``experiment``,
    ``name``, ``task``, ``metric``, ``mode``, ``n_trials``, ``outcomes`` (count per
    outcome), ``best`` (per kind: trial id, placement, params, dev, test), ``uniform``
    (best trial per method), ``ensembles`` (table rows), ``findings`` ("1", "2", "3": a
    ``verdict``, a ``text`` and the numbers behind it), ``comparison`` (rows for
    :func:`format_comparison`) and ``files``.
    """
    experiment = open_experiment(experiment_path)
    out = Path(out_dir) if out_dir is not None else experiment.default_out_dir()
    tables_dir, plots_dir = out / "tables", out / "plots"
    runs, ensemble_error = _run_default_ensembles(experiment)
    ensemble_rows = [r for run in runs for r in run.results]
    files: dict[str, Any] = {"ensembles": {k: str(v) for k, v in save_ensembles(experiment, runs, out).items()}}
    exported = export_experiment(experiment, tables_dir, ensembles=ensemble_rows)
    try:
        pairs, kappa, by_method = pairwise_methods(experiment)
        pairwise_error = None
    except (ValueError, FileNotFoundError) as err:
        pairs, kappa, by_method, pairwise_error = pd.DataFrame(), pd.DataFrame(), best_per_method(experiment), str(err)
    exported.update(write_table(pairs if not pairs.empty else pd.DataFrame(columns=[
        "a", "b", "agreement", "kappa", "mcnemar_b", "mcnemar_c", "mcnemar_p", "both_wrong", "error_overlap"]),
        tables_dir, "pairwise"))
    files["tables"] = {k: str(v) for k, v in exported.items()}

    trials = trials_table(experiment)
    plots: dict[str, Any] = {}
    plots["placements"] = _plot(lambda: _plots().placement_heatmap(trials, plots_dir / "placements.png", experiment.mode))
    plots["pareto"] = _plot(lambda: _plots().pareto_plot(trials, plots_dir / "pareto.png", experiment.mode, experiment.metric))
    plots["alpha"] = [str(p) for p in _plots().alpha_evolution(alpha_table(experiment), plots_dir)]
    plots["agreement"] = _plot(lambda: _plots().agreement_heatmap(kappa, plots_dir / "kappa.png",
                                                                 "Cohen's kappa between uniform methods (test)"))
    for run in runs:
        members = [(t.label if run.members == "per-method" else t.trial_id, run.member_scores[t.trial_id]["test"])
                   for t in run.trials]
        ens = [(r.strategy, r.test_score) for r in run.results]
        plots[f"ensembles_{run.members}"] = _plot(lambda: _plots().ensemble_bar(
            members, ens, plots_dir / f"ensembles_{run.members}.png", experiment.metric, experiment.mode,
            f"Ensembles of {run.members} members vs the members (test {experiment.metric})"))
    files["plots"] = plots

    findings = {
        "1": finding_darts(experiment),
        "2": finding_ensembles(experiment, runs, ensemble_error),
        "3": finding_errors(experiment, pairs, pairwise_error),
    }
    best = {kind: _trial_summary(experiment, _best_of_kind(experiment, kind))
            for kind in ("uniform", "discrete", "hybrid", "darts-derived")}
    overall = ranked(experiment)
    best["overall"] = _trial_summary(experiment, overall[0] if overall else None)
    result = {
        "experiment": experiment.uri,
        "name": experiment.name,
        "task": experiment.task,
        "metric": experiment.metric,
        "mode": experiment.mode,
        "n_trials": len(experiment.trials),
        "outcomes": dict(Counter(t.outcome for t in experiment.trials)),
        "ray_experiments": list(experiment.ray_experiments),
        "best": best,
        "uniform": {m: _trial_summary(experiment, t) for m, t in by_method.items()},
        "ensembles": [r.row() for r in ensemble_rows],
        "findings": findings,
        "comparison": _comparison(experiment, runs),
        "out_dir": str(out),
    }
    report_path, summary_path = out / "report.md", out / "summary.json"
    files["report"], files["summary"] = str(report_path), str(summary_path)
    result["files"] = files
    atomic_write_text(report_path, render_report(experiment, result, trials, pairs, kappa, out))
    atomic_write_text(summary_path, json.dumps(_json_safe(result), indent=2) + "\n")
    return result


def _plots():
    from pefttune.analysis import plots

    return plots


def _plot(make) -> str | None:
    path = make()
    return str(path) if path is not None else None


# --------------------------------------------------------------------------- markdown
def _rel(path: str | None, out: Path) -> str | None:
    if not path:
        return None
    try:
        return Path(path).relative_to(out).as_posix()
    except ValueError:
        return str(path)


def render_report(experiment: Experiment, result: dict, trials: pd.DataFrame, pairs: pd.DataFrame,
                  kappa: pd.DataFrame, out: Path) -> str:
    m = experiment.metric
    better = "higher" if experiment.mode == "max" else "lower"
    lines = [
        f"# pefttune report: {experiment.name}",
        "",
        f"- experiment: `{experiment.uri}`",
        f"- Ray experiments: {', '.join(f'`{r}`' for r in experiment.ray_experiments)}",
        f"- task: {experiment.task}; metric: **{m}** ({better} is better); trials are selected on dev, "
        "compared on test",
        f"- trials: {len(experiment.trials)} ("
        + ", ".join(f"{k}: {v}" for k, v in sorted(result["outcomes"].items())) + ")",
        "",
        "## Findings of Lin et al. 2024 on this experiment",
        "",
        "| # | claim | verdict |",
        "|---|---|---|",
    ]
    for key, f in result["findings"].items():
        lines.append(f"| {key} | {f['claim']} | **{f['verdict']}** |")
    lines.append("")
    titles = {"1": "DARTS vs uniform placement", "2": "Ensembles and majority voting",
              "3": "Different methods, different errors"}
    for key, f in result["findings"].items():
        lines += [f"### Finding {key}: {titles[key]} -- {f['verdict']}", "", f["text"], ""]

    lines += ["## Best trials (completed, by dev)", ""]
    cols = ["trial_id", "kind", "method", "placement_short", "trainable_params", "best_dev_score", "test_score", "outcome"]
    top = trials[trials["best_dev_score"].notna() & (trials["kind"] != "darts") & (trials["outcome"] == "completed")]
    top = top.sort_values(["best_dev_score", "trial_id"], ascending=[experiment.mode == "min", True]).head(10)
    lines += [md_table(top.astype(object).where(top.notna(), None).to_dict("records"), cols,
                       ["trial", "kind", "method", "placement", "params", f"dev {m}", f"test {m}", "outcome"]), ""]

    if result["uniform"]:
        lines += ["## Uniform baselines (best trial per method)", ""]
        rows = [{"method": k, **v} for k, v in result["uniform"].items()]
        lines += [md_table(rows, ["method", "trial_id", "trainable_params", "dev", "test"],
                           ["method", "trial", "params", f"dev {m}", f"test {m}"]), ""]

    lines += ["## Ensembles", ""]
    if result["ensembles"]:
        lines += [md_table(result["ensembles"], ["ensemble_id", "n_members", "dev_score", "test_score",
                                                 "best_member_test", "delta_vs_best", "mcnemar_p"],
                           ["ensemble", "members", f"dev {m}", f"test {m}", "best member (test)", "gain",
                            "McNemar p"]), ""]
        lines.append("Gain: test improvement over the best member by dev (positive = better); McNemar: ensemble vs "
                     "that member. Caruana's dev score is the one it was fitted on.")
        lines.append("")
    else:
        lines += ["Not run: fewer than 2 usable trials with stored predictions.", ""]

    lines += ["## Pairwise statistics between uniform methods (test)", ""]
    if not pairs.empty:
        lines += [md_table(pairs.to_dict("records"), list(pairs.columns),
                           ["a", "b", "agreement", "kappa", "McNemar b", "McNemar c", "McNemar p", "both wrong",
                            "error overlap"]), ""]
        rows = [{"": idx, **{c: kappa.loc[idx, c] for c in kappa.columns}} for idx in kappa.index]
        lines += ["Cohen's kappa:", "", md_table(rows, [""] + list(kappa.columns)), ""]
    else:
        lines += ["Not run: fewer than 2 uniform methods with stored test predictions.", ""]

    lines += ["## Plots", ""]
    plots = result["files"]["plots"] if "files" in result else {}
    for name, path in plots.items():
        paths = path if isinstance(path, list) else [path]
        for p in paths:
            rel = _rel(p, out)
            if rel:
                lines += [f"![{name}]({rel})", ""]
    if not plots.get("alpha"):
        lines += ["No DARTS search trials: no alpha plot.", ""]
    lines += ["## Files", "", "Tables (parquet + CSV) are in `tables/`: trials, history, alpha, predictions, "
              "ensembles, pairwise; `ensembles.json` and `summary.json` hold the numbers above.", ""]
    return "\n".join(lines)
