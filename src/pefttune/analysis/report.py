"""The experiment report: the paper's three findings checked on this experiment.

:func:`analyze` runs everything (ensembles, exports, statistics, plots, ``report.md``)
and returns the key numbers; ``pefttune report EXPERIMENT`` calls it. The findings are decided
in :mod:`pefttune.analysis.findings`; this module gathers and renders (about 500 lines, most of
them the Markdown of the report's sections).

Trials are *selected* on dev, compared on test. Every configuration is trained once per
seed of ``train.seeds``; each finding is decided by :mod:`pefttune.analysis.findings` on
intervals over training seeds and test speakers (``analysis.interval: seeds-speakers``: a
Student-t seed level, because a bootstrap over 3 seeds undercovers, plus a cluster bootstrap
variance over the test speakers; the report names the resampling unit and the number of test
speakers, and keeps the examples-only paired bootstrap as a supporting number).  The rules are
printed next to the verdicts, and an undecided finding says how many seeds would decide it:

1. **DARTS placement does not beat uniform placement** (best DARTS-derived vs best uniform
   configuration; inconclusive while the relaxation has not converged);
2. **ensembles, particularly majority voting, perform best** (per-seed ensembles of the
   uniform methods; gains over the best member with intervals);
3. **different PEFT methods make different errors** (kappa and error overlap of each pair
   of uniform methods, with simultaneous intervals).

The margin delta (``analysis.margin``), the confidence (``analysis.confidence``), the
bootstrap draws (``analysis.bootstrap_draws``) and the interval (``analysis.interval``) come
from the experiment's config. When no
configuration beats the trivial reference by more than delta, every finding is
*inconclusive: nothing learned*. McNemar and kappa per seed stay as supporting numbers.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from pefttune.analysis.sequential import SequentialDesign
from pefttune.analysis.ensemble_runner import (
    EnsembleRun,
    errors,
    default_ensembles,
    gain,
    load_members,
    majority_strategy,
    save_ensembles,
    score,
    strategies_for,
)
from pefttune.analysis.export import export_experiment
from pefttune.analysis.markdown import fmt, fmt_p, md_table
from pefttune.analysis.selection import best_per_method, ranked
from pefttune.analysis.intervals import agreement_matrix, pairwise_table, sign_test
from pefttune.analysis.store import ResultsStore, MissingPredictionsError, TrialRecord, open_results
from pefttune.analysis.findings import configurations, decide
from pefttune.analysis.tables import alpha_table, configs_table, trials_table, write_table
from pefttune.runtime.storage import atomic_write_text
from pefttune.metrics import align_corpus
from pefttune.schema import TrialKind

__all__ = ["analyze", "format_comparison", "pairwise_methods", "pairwise_trials"]

NOT_RUN = "not run"
SKIPPED_AUDIO = "skipped_audio.csv"  # written by pefttune.trainables.setup when data.on_error: skip dropped files


def analysis_settings(experiment: ResultsStore) -> dict:
    """``analysis`` and ``darts.converged_entropy`` of the experiment's saved config (defaults
    when absent)."""
    config = experiment.config or {}
    section = config.get("analysis") or {}
    darts = config.get("darts") or {}
    confidence = float(section.get("confidence", 0.95))
    design = None
    if section.get("max_seeds"):  # seeds added while a finding is open: a group-sequential design
        train = config.get("train") or {}
        planned = len(train.get("seeds") or [train.get("seed", 0)])
        design = SequentialDesign(planned, int(section["max_seeds"]), 1 - confidence,
                                  section.get("spending", "obrien-fleming"))
    return {
        "margin": float(section.get("margin", 0.01)),
        "confidence": confidence,
        "draws": int(section.get("bootstrap_draws", 2000)),
        "interval": str(section.get("interval", "seeds-speakers")),
        "converged_entropy": float(darts.get("converged_entropy", 0.7)),
        "design": design,
    }


def current_findings(path: str) -> dict:
    """The findings of the study at ``path`` as it stands (nothing written)."""
    experiment = open_results(path)
    return decide(experiment, alpha=alpha_table(experiment), **analysis_settings(experiment))


def _strategies_by_seed(finding: dict, metric: str, mode: str = "max") -> list[str]:
    """Finding 2's per-seed table: each strategy's test score and its difference from the vote,
    so a reader sees whether one seed or every seed carries the verdict."""
    rows = [r for r in finding.get("per_seed", []) if r.get("strategies")]
    vote = finding.get("majority_strategy")
    if not rows or vote is None or any(vote not in r["strategies"] for r in rows):
        return []
    names = [vote] + [s for s in rows[0]["strategies"] if s != vote]
    lines = [f"Per seed, test {metric} of each strategy, with its advantage over the vote in brackets (positive: "
             "better than the vote, as in the rule's strategy - vote); each is one trained seed's ensemble on the test "
             "set, so it has no interval of its own (the intervals above resample its examples):",
             "", "| seed | best member | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]

    def cell(score, v) -> str:  # the strategy's advantage over the vote, as ensemble_runner.gain orients it
        return fmt(score) if score is None or v is None else f"{fmt(score)} ({gain(score, v, mode):+.4f})"

    for r in rows:
        v = r["strategies"][vote]["test"]
        cells = [fmt(v)] + [cell(r["strategies"][s]["test"], v) if s in r["strategies"] else "-" for s in names[1:]]
        lines.append(f"| {r['seed']} | {fmt(r['best_member_test'])} | " + " | ".join(cells) + " |")
    return lines + [""]


def _intervals_line(result: dict, metric: str) -> str:
    """The report's statement of what every interval covers: the resampling unit, the number of
    test speakers, the method and why, and the supporting examples-only interval."""
    settings, decision = result.get("settings", {}), result.get("decision", {})
    conf, draws, margin = settings.get("confidence", 0.95), settings.get("draws", 2000), settings.get("margin", 0.01)
    unit = decision.get("resampling_unit")
    tail = f"margin delta = {margin} ({metric}); `analysis.interval: {settings.get('interval', 'seeds-speakers')}`"
    sequential = decision.get("sequential")
    if sequential:  # seeds added while a finding was open: this look's level, not the nominal one
        conf = sequential["confidence"]
        tail += (f"; seeds added while a finding was open (`analysis.max_seeds: {sequential['n_max']}`): "
                 f"{sequential['design']} This is the look at {sequential['look']} seeds, so every interval here "
                 f"is a {conf:.2%} interval")
    if unit in (None, "examples"):
        return (f"- intervals: {conf:.0%} paired bootstrap over test examples ({draws} draws), each configuration's "
                f"seeds averaged inside every draw: examples only, these trained models; they do not cover what "
                f"another set of training seeds or other speakers would change; {tail}")
    speakers = decision.get("test_speakers")
    who = (f"{speakers} test speakers ({decision.get('clusters')} clusters: a clip without a speaker is its own)"
           if speakers is not None else f"{decision.get('clusters')} test utterances as units "
           f"({decision.get('clusters_note') or 'no speakers known'})")
    return (f"- intervals: resampling unit **{unit}**, {who}; {conf:.0%} intervals: Student-t over training seeds "
            "(paired by seed where both sides share seeds, Welch otherwise; a bootstrap over 3 seeds cannot see the "
            "tails and undercovers) plus the variance of a cluster bootstrap over the test "
            f"{'speakers' if speakers is not None else 'utterances'} ({draws} draws; one resample for both sides "
            "and all seeds; CTC: edit counts summed per cluster), t quantile at the seed level's df, Bonferroni on "
            "it within a family. They cover what other training seeds and other speakers would change; with one "
            "seed an interval covers speakers only and its verdict is inconclusive. Supporting: the paired bootstrap "
            f"over test examples (examples only: these trained models); {tail}")


def _seed_rounds_lines(experiment: ResultsStore) -> list[str]:
    """The rounds of further seeds (``seed_rounds.json``): which seed, for which open findings and
    configurations, and why they stopped; nothing when the study planned its seeds only."""
    from pefttune.runtime.storage import read_storage_text

    text = read_storage_text(f"{experiment.uri}/seed_rounds.json")
    if text is None:
        return []
    log = json.loads(text)
    rows = [{"seed": r["seed"], "open": ", ".join(r["open_findings"]),
             "configs": ", ".join(r["config_ids"]) + (" + a DARTS search" if r["darts"] else ""),
             "time": f"{r['seconds'] / 60:.1f} min" if r.get("seconds") is not None else "unfinished"}
            for r in log.get("rounds", [])]
    lines = ["## Further seeds", "",
             "Seeds trained after `train.seeds` because a finding was still open (`analysis.max_seeds`); the "
             "configurations table above gives every configuration's seeds.", ""]
    if rows:
        lines += [md_table(rows, ["seed", "open", "configs", "time"],
                           ["seed", "open findings", "configurations trained", "wall time"]), ""]
    return lines + [f"Stopped: {log.get('stopped') or 'not yet'}.", ""]


def _darts_by_seed(f: dict, metric: str) -> list[str]:
    """Finding 1's DARTS searches, one row each, and how far their derived placements agree."""
    threshold = f.get("convergence", {}).get("threshold", 0.7)
    rows = [{**r, "h": fmt(r["entropy_norm_mean"]) if r["entropy_norm_mean"] is not None else "-",
             "flag": ", ".join(f"L{i}" for i in r["unconverged_layers"]) or "none",
             "test": fmt(r["retrain_test"]) if r["retrain_test"] is not None else "-"} for r in f["by_seed"]]
    lines = [f"DARTS searches (one per seed; `?` marks a layer whose own final H/ln K is above {threshold}: its "
             "argmax is close to a coin flip):", "",
             md_table(rows, ["seed", "variant", "placement", "h", "flag", "test"],
                      ["seed", "variant", "derived placement", "mean H/ln K", "layers not converged",
                       f"retrained test {metric}"]), ""]
    agreement = f.get("agreement")
    if agreement:
        common = ", ".join(f"L{i}" for i in agreement["layers_in_common"]) or "none"
        lines += [f"Agreement of the {agreement['searches']} derived placements: on average "
                  f"{agreement['pairwise_same_layers_mean']:.0%} of the {agreement['num_layers']} layers get the same "
                  f"method in two searches; the same in every search: {common}.", ""]
    return lines


def _seeds_needed_line(finding: dict) -> list[str]:
    need = finding.get("seeds_needed")
    if not need or not need.get("intervals") or finding.get("verdict") != "inconclusive":
        return []
    each = "; ".join(f"{r['interval']}: " + (f"n = {r['n']}" if r["n"] is not None else f"none ({r['reason']})")
                     + f" (distance to the threshold {r['gap']:+.4f})" for r in need["intervals"])
    head = (f"**{need['n']} seeds per configuration**" if need["n"] is not None else
            "no number of seeds alone")
    return [f"Seeds to decide it: {head} ({need['assumption']}): {each}.", ""]


def _with_supporting(c: dict) -> str:
    text = f"{c['diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] ({c.get('interval', 'examples')})"
    if c.get("caveat"):
        text += f", {c['caveat']}"
    s = c.get("supporting")
    if s:
        text += f"; supporting, {s['interval']}: [{s['ci_low']:+.4f}, {s['ci_high']:+.4f}]"
    return text


def _mcnemar_by_seed(experiment: ResultsStore, a: list[TrialRecord], b: list[TrialRecord]) -> list[dict]:
    """Supporting numbers: McNemar of a vs b for every seed both have."""
    by_seed = {t.seed: t for t in b}
    rows = []
    for trial in a:
        other = by_seed.get(trial.seed)
        if other is not None:
            cmp = _compare(experiment, trial, other)
            if cmp:
                rows.append({"seed": trial.seed, **cmp})
    return rows


# --------------------------------------------------------------------------- scores on stored predictions
def _test_eval(experiment: ResultsStore, trial: TrialRecord) -> tuple[float, np.ndarray, np.ndarray] | None:
    """(test score, example index, per-example errors) from stored predictions (None if missing)."""
    try:
        data = load_members(experiment, [trial], "test")
    except MissingPredictionsError:
        return None
    ref = data.labels if experiment.task == "classification" else data.refs
    preds = data.preds(0)
    return score(experiment, preds, ref), data.index, errors(experiment.task, preds, ref)


def _compare(experiment: ResultsStore, a: TrialRecord, b: TrialRecord) -> dict:
    """Test scores of a and b and the exact paired test on their common examples: McNemar
    (classification) or the sign test on per-utterance edit counts (CTC), :func:`~pefttune.analysis.intervals.sign_test`."""
    ea, eb = _test_eval(experiment, a), _test_eval(experiment, b)
    if ea is None or eb is None:
        return {}
    common, ia, ib = np.intersect1d(ea[1], eb[1], return_indices=True)
    mb, mc, p = sign_test(ea[2][ia], eb[2][ib])
    return {"a": a.trial_id, "b": b.trial_id, "a_test": ea[0], "b_test": eb[0], "mcnemar_b": mb,
            "mcnemar_c": mc, "mcnemar_p": p, "n": int(common.shape[0]),
            "gain": gain(ea[0], eb[0], experiment.mode)}


def _trial_summary(experiment: ResultsStore, trial: TrialRecord | None) -> dict | None:
    if trial is None:
        return None
    return {
        "trial_id": trial.trial_id, "kind": trial.kind, "method": trial.method,
        "placement": trial.placement_short, "trainable_params": trial.trainable_params,
        "dev": experiment.score(trial, "dev"), "test": experiment.score(trial, "test"),
    }


def _best_of_kind(experiment: ResultsStore, kind: str) -> TrialRecord | None:
    pool = ranked(experiment, trials=[t for t in experiment.trials if t.usable and t.kind == kind])
    return pool[0] if pool else None


def pairwise_trials(
    experiment: ResultsStore | str, trials: dict[str, TrialRecord] | Sequence[TrialRecord], split: str = "test"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pairwise statistics between trials on the same examples of ``split``.

    ``trials``: name -> trial (names label the rows), or a list (named by trial id).
    Returns (:func:`~pefttune.analysis.intervals.pairwise_table`: agreement, kappa, McNemar, error
    overlap per pair; :func:`~pefttune.analysis.intervals.agreement_matrix` of Cohen's kappa).  CTC
    predictions are compared phoneme by phoneme: each hypothesis aligned to its reference (:func:`metrics.align_corpus`;
    a reference phoneme is wrong when substituted or deleted), not as whole sentences, which
    nearly always hold some error.  McNemar there counts phonemes as independent: supporting only.
    """
    experiment = open_results(experiment)
    named = trials if isinstance(trials, dict) else {t.trial_id: t for t in trials}
    if len(named) < 2:
        return pd.DataFrame(), pd.DataFrame()
    data = load_members(experiment, list(named.values()), split)
    if experiment.task == "classification":
        preds = {m: data.probs[i].argmax(-1) for i, m in enumerate(named)}
        ref = data.labels
    else:
        preds = {m: align_corpus(data.hyps[i], data.refs) for i, m in enumerate(named)}
        ref = np.array([int(x) for r in data.refs for x in r], dtype=np.int64)
    return pairwise_table(preds, ref), agreement_matrix(preds, "kappa")


def pairwise_methods(experiment: ResultsStore) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, TrialRecord]]:
    """:func:`pairwise_trials` between the best trials of the uniform methods (test split);
    also returns those trials by method."""
    best = best_per_method(experiment)
    pairs, kappa = pairwise_trials(experiment, best)
    return pairs, kappa, best


# --------------------------------------------------------------------------- analyze
def _comparison(experiment: ResultsStore, runs: Sequence[EnsembleRun]) -> list[dict]:
    rows = []
    for method, trial in best_per_method(experiment).items():
        rows.append({"name": f"{TrialKind.UNIFORM}:{method}", **_trial_summary(experiment, trial)})
    for kind in (TrialKind.HYBRID, TrialKind.DISCRETE, TrialKind.DARTS_DERIVED):
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
        (r["name"], fmt(r.get("trainable_params")), fmt(r.get("dev")), fmt(r.get("test"))) for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _run_default_ensembles(experiment: ResultsStore) -> tuple[list[EnsembleRun], str | None]:
    """The default ensembles, and why there are none when they could not be run."""
    settings = analysis_settings(experiment)
    interval = {"confidence": settings["confidence"], "draws": settings["draws"]}  # one trial per member: no seeds
    try:
        try:
            return default_ensembles(experiment, **interval), None
        except MissingPredictionsError:
            # some member lacks dev predictions: keep the strategies that need test only
            needs_dev = {"weighted", "caruana"}
            return default_ensembles(experiment, [s for s in strategies_for(experiment.task) if s not in needs_dev],
                                     **interval), None
    except (ValueError, FileNotFoundError) as err:  # e.g. members evaluated on different examples
        return [], str(err)


def _skipped_audio(experiment: ResultsStore) -> int:
    """Manifest rows the audio check dropped (``data.on_error: skip``), 0 when none."""
    if not experiment.is_local:
        return 0
    path = Path(experiment.root) / SKIPPED_AUDIO
    if not path.exists():
        return 0
    return max(0, len(path.read_text().strip().splitlines()) - 1)


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


def analyze(study: str | Path | ResultsStore, out_dir: str | Path | None = None) -> dict:
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
    experiment = open_results(study)
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

    settings = analysis_settings(experiment)
    decided = decide(experiment, alpha=alpha_table(experiment), **settings)
    findings = decided["findings"]
    f1 = findings["1"]
    if f1["verdict"] != NOT_RUN:
        configs = configurations(experiment)
        f1["mcnemar_by_seed"] = _mcnemar_by_seed(experiment, configs[f1["darts_config"]].trials,
                                                 configs[f1["uniform_config"]].trials)
    if findings["2"]["verdict"] == NOT_RUN and ensemble_error:
        findings["2"]["text"] += f" ({ensemble_error})"
    if findings["3"]["verdict"] == NOT_RUN and pairwise_error:
        findings["3"]["text"] += f" ({pairwise_error})"
    config_rows = configs_table(experiment, settings["confidence"])
    skipped = _skipped_audio(experiment)
    best = {kind.value: _trial_summary(experiment, _best_of_kind(experiment, kind))
            for kind in (TrialKind.UNIFORM, TrialKind.DISCRETE, TrialKind.HYBRID, TrialKind.DARTS_DERIVED)}
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
        "decision": {k: v for k, v in decided.items() if k != "findings"},
        "settings": {**settings, "design": settings["design"].describe() if settings["design"] else None},
        "configs": config_rows.astype(object).where(config_rows.notna(), None).to_dict("records"),
        "skipped_audio": skipped,
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


def render_report(experiment: ResultsStore, result: dict, trials: pd.DataFrame, pairs: pd.DataFrame,
                  kappa: pd.DataFrame, out: Path) -> str:
    m = experiment.metric
    better = "higher" if experiment.mode == "max" else "lower"
    paired_test_name = "McNemar p" if result.get("task") == "classification" else "sign test p (edit counts)"
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
    ]
    settings = result.get("settings", {})
    if result.get("skipped_audio"):
        lines.append(f"- audio: {result['skipped_audio']} manifest rows with unreadable audio were dropped "
                     f"(`data.on_error: skip`; listed in `{SKIPPED_AUDIO}`)")
    lines += [_intervals_line(result, m),
        "",
        "## Findings of Lin et al. 2024 on this experiment",
        "",
        "| # | claim | verdict | rule |",
        "|---|---|---|---|",
    ]
    for key, f in result["findings"].items():
        lines.append(f"| {key} | {f['claim']} | **{f['verdict']}** | {f.get('rule', '')} |")
    lines.append("")
    if not result.get("decision", {}).get("learned", True):
        lines += ["**Nothing learned**: no configuration beats the trivial reference (most frequent label; CTC: "
                  "all blank) by more than the margin, so no finding is judged.", ""]
    titles = {"1": "DARTS vs uniform placement", "2": "Ensembles and majority voting",
              "3": "Different methods, different errors"}
    for key, f in result["findings"].items():
        lines += [f"### Finding {key}: {titles[key]} -- {f['verdict']}", "", f.get("text", ""), "",
                  f"Rule: {f.get('rule', '')}", ""] + _seeds_needed_line(f)
        if key == "1" and f.get("convergence", {}).get("trials"):
            conv = f["convergence"]
            lines += [f"DARTS convergence (final mean normalised entropy H/ln K of alpha, threshold "
                      f"{conv['threshold']}): " + ", ".join(
                          f"`{t}` {v['entropy_norm_mean']:.3f} (min top-2 margin {v['margin_min']:.3f})"
                          for t, v in conv["trials"].items())
                      + f" -> {'converged' if conv['converged'] else 'not converged'}.", ""]
        if key == "1" and f.get("by_seed"):
            lines += _darts_by_seed(f, result.get("metric", "metric"))
        paired_test = ("McNemar" if result.get("task") == "classification" else
                       "sign test on per-utterance edit counts: b = utterances with fewer edits, c = more")
        if key == "1" and f.get("mcnemar_by_seed"):
            lines += [f"Supporting, per seed (DARTS-derived vs uniform, {paired_test}): " + "; ".join(
                f"seed {r['seed']}: {fmt(r['a_test'])} vs {fmt(r['b_test'])}, b={r['mcnemar_b']}, c={r['mcnemar_c']}, "
                f"p={fmt_p(r['mcnemar_p'])}" for r in f["mcnemar_by_seed"]), ""]
        if key == "2" and f.get("per_seed"):
            lines += [f"Supporting, per seed (majority vote vs its best member, {paired_test}): " + "; ".join(
                f"seed {r['seed']}: {fmt(r['vote_test'])} vs {fmt(r['best_member_test'])}, b={r['mcnemar_b']}, "
                f"c={r['mcnemar_c']}, p={fmt_p(r['mcnemar_p'])}" for r in f["per_seed"]), ""]
            lines += _strategies_by_seed(f, result.get("metric", "metric"), result.get("mode", "max"))

    if result.get("configs"):
        conf = settings.get("confidence", 0.95)
        decision = result.get("decision", {})
        speakers = (f"{decision['test_speakers']} test speakers" if decision.get("test_speakers") is not None
                    else f"{decision.get('clusters', '?')} test utterances, no speakers known")
        lines += [f"## Configurations (mean over seeds, {conf:.0%} t-interval; test split: {speakers})", "",
                  "Reference rows: `frozen` (the head only, no PEFT) and `log-mel` (the same head on log-mel "
                  "features, no SSL encoder) show what PEFT and the encoder add.", ""]
        rows = []
        for r in result["configs"]:
            ci = r["note"] if r.get("note") else f"[{fmt(r['test_ci_low'])}, {fmt(r['test_ci_high'])}]"
            rows.append({**r, "test": f"{fmt(r['test_mean'])} ± {fmt(r['test_std'])}", "ci": ci,
                         "dev": fmt(r["dev_mean"])})
        lines += [md_table(rows, ["config_id", "kind", "placement_short", "trainable_params", "seeds", "dev", "test", "ci"],
                           ["configuration", "kind", "placement", "params", "seeds", f"dev {m} (mean)",
                            f"test {m} (mean ± std)", "test CI"]), ""]
    lines += _seed_rounds_lines(experiment)
    refs = result.get("decision", {}).get("references", {})
    ref_lines = []
    for name, label in (("uniform_vs_frozen", "best uniform minus frozen (what PEFT adds)"),
                        ("uniform_vs_log-mel", "best uniform minus log-mel (what the SSL encoder adds)")):
        c = refs.get(name)
        if c:
            ref_lines.append(f"- {label}: {_with_supporting(c)}")
    trivial = refs.get("vs_trivial") or {}
    if trivial:
        ref_lines.append("- the nothing-learned check, each configuration minus the trivial reference (most frequent "
                         "label; CTC: all blank): " + "; ".join(f"`{cid}` {_with_supporting(c)}"
                                                                for cid, c in trivial.items()))
    if ref_lines:
        lines += ["## References", ""] + ref_lines + [""]
    hybrid = result.get("decision", {}).get("hybrid")
    if hybrid:
        lines += ["## Hybrid (merged in each layer) vs the best uniform", "",
                  f"This experiment's result, not a claim of the paper: the hybrid ({hybrid['hybrid']}, "
                  f"{fmt(hybrid['hybrid_params'])} trainable parameters) minus the best uniform configuration "
                  f"`{hybrid['uniform']}` ({fmt(hybrid['uniform_params'])} trainable parameters): test {m} "
                  f"{_with_supporting(hybrid)} ({hybrid['confidence']:.0%}; "
                  f"{hybrid.get('method', 'paired bootstrap').split(';')[0]}).", ""]

    lines += ["## Best trials (completed, by dev)", "",
              "Single trials, one training seed each: no interval (the configurations table above has the intervals "
              "over seeds).", ""]
    cols = ["trial_id", "kind", "method", "placement_short", "trainable_params", "best_dev_score", "test_score", "outcome"]
    top = trials[trials["best_dev_score"].notna() & (trials["kind"] != TrialKind.DARTS)
                 & (trials["outcome"] == "completed")]
    top = top.sort_values(["best_dev_score", "trial_id"], ascending=[experiment.mode == "min", True]).head(10)
    lines += [md_table(top.astype(object).where(top.notna(), None).to_dict("records"), cols,
                       ["trial", "kind", "method", "placement", "params", f"dev {m}", f"test {m}", "outcome"]), ""]

    if result["uniform"]:
        lines += ["## Uniform baselines (best trial per method)", "",
                  "Single trials, the best seed by dev: no interval (see the configurations table).", ""]
        rows = [{"method": k, **v} for k, v in result["uniform"].items()]
        lines += [md_table(rows, ["method", "trial_id", "trainable_params", "dev", "test"],
                           ["method", "trial", "params", f"dev {m}", f"test {m}"]), ""]

    lines += ["## Ensembles", ""]
    if result["ensembles"]:
        conf = settings.get("confidence", 0.95)
        rows = [{**r, "gain_ci": "-" if r.get("gain_ci_low") is None else
                 f"[{r['gain_ci_low']:+.4f}, {r['gain_ci_high']:+.4f}]"} for r in result["ensembles"]]
        lines += [md_table(rows, ["ensemble_id", "n_members", "dev_score", "test_score", "best_member_test",
                                  "delta_vs_best", "gain_ci", "mcnemar_p"],
                           ["ensemble", "members", f"dev {m}", f"test {m}", "best member (test)", "gain",
                            f"gain {conf:.0%} CI", paired_test_name]), ""]
        lines.append("Members: the top-k trials by dev, or the best trial of each method, whatever their seeds "
                     "(finding 2 instead builds one ensemble per seed). Gain: test improvement over the best member by "
                     f"dev (positive = better), with its {conf:.0%} paired bootstrap interval over test examples "
                     f"({settings.get('draws', 2000)} draws; '-' where the metric is not a sum over examples); "
                     f"{paired_test_name}: ensemble vs that member. Caruana's dev score is the one it was fitted on.")
        lines.append("")
    else:
        lines += ["Not run: fewer than 2 usable trials with stored predictions.", ""]

    lines += ["## Pairwise statistics between uniform methods (test)", ""]
    if not pairs.empty:
        lines += ["The best trial of each method (one seed each): no interval; finding 3 gives kappa and error "
                  "overlap over all seeds with simultaneous intervals.", ""]
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
