"""The experiment report: the paper's three findings checked on this experiment.

:func:`analyze` runs everything (ensembles, exports, statistics, plots, ``report.md``)
and returns the key numbers; ``pefttune report EXPERIMENT`` calls it. The findings are decided
and rendered in :mod:`pefttune.analysis.findings` (one module per finding); this module
assembles them with the study's tables, ensembles, pairwise statistics and plots.

Trials are *selected* on dev, compared on test. Every configuration is trained once per
seed of ``train.seeds``; each finding is decided on intervals over training seeds and test
speakers (``analysis.interval: seeds-speakers``: a Student-t seed level, because a bootstrap
over 3 seeds undercovers, plus a cluster bootstrap variance over the test speakers; the report
names the resampling unit and the number of test speakers, and keeps the examples-only paired
bootstrap as a supporting number).  The rules are printed next to the verdicts, and an
undecided finding says how many seeds would decide it.

The margin delta (``analysis.margin``), the confidence (``analysis.confidence``), the
bootstrap draws (``analysis.bootstrap_draws``) and the interval (``analysis.interval``) come
from the experiment's config. When no configuration beats the trivial reference by more than
delta, every finding is *inconclusive: nothing learned*. McNemar and kappa per seed stay as
supporting numbers.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from pefttune.analysis import costs as cost_section, findings, html_report
from pefttune.analysis.ensemble_runner import (
    EnsembleRun,
    default_ensembles,
    load_members,
    save_ensembles,
    strategies_for,
)
from pefttune.analysis.export import export_experiment
from pefttune.analysis.findings import Decision, FindingKey, ReportContext, decide
from pefttune.analysis.findings import references as reference_section
from pefttune.analysis.intervals import agreement_matrix, pairwise_table
from pefttune.analysis.markdown import compact_placement, fmt, md_table, wrap
from pefttune.analysis.selection import best_per_method, ranked
from pefttune.analysis.sequential import SequentialDesign
from pefttune.analysis.store import ResultsStore, MissingPredictionsError, TrialRecord, open_results
from pefttune.analysis.tables import alpha_table, configs_table, trials_table, write_table
from pefttune.tuning import protocol_lines
from pefttune.runtime.provenance import collect as collect_provenance, markdown as provenance_markdown
from pefttune.runtime.storage import atomic_write_text
from pefttune.metrics import align_corpus
from pefttune.schema import TrialKind

__all__ = ["analyze", "current_findings", "format_comparison", "pairwise_methods", "pairwise_trials"]

SKIPPED_AUDIO = "skipped_audio.csv"  # written by pefttune.trainables.setup when data.on_error: skip dropped files
PAIRWISE_COLUMNS = ["a", "b", "agreement", "kappa", "mcnemar_b", "mcnemar_c", "mcnemar_p", "both_wrong",
                    "error_overlap"]


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


def current_findings(path: str) -> Decision:
    """The findings of the study at ``path`` as it stands (nothing written)."""
    experiment = open_results(path)
    return decide(experiment, alpha=alpha_table(experiment), **analysis_settings(experiment))


def _intervals_line(decision: Decision, settings: dict, metric: str) -> str:
    """The report's statement of what every interval covers: the resampling unit, the number of
    test speakers, the method and why, and the supporting examples-only interval."""
    conf, draws, margin = settings.get("confidence", 0.95), settings.get("draws", 2000), settings.get("margin", 0.01)
    units = decision.units
    tail = f"margin delta = {margin} ({metric}); `analysis.interval: {settings.get('interval', 'seeds-speakers')}`"
    look = decision.sequential
    if look is not None:  # seeds added while a finding was open: this look's level, not the nominal one
        conf = look.confidence
        tail += (f"; seeds added while a finding was open (`analysis.max_seeds: {look.n_max}`): "
                 f"{look.design} This is the look at {look.look} seeds, so every interval here "
                 f"is a {conf:.2%} interval")
    if units.resampling_unit in (None, "examples"):
        return (f"- intervals: {conf:.0%} paired bootstrap over test examples ({draws} draws), each configuration's "
                f"seeds averaged inside every draw: examples only, these trained models; they do not cover what "
                f"another set of training seeds or other speakers would change; {tail}")
    speakers = units.test_speakers
    who = (f"{speakers} test speakers ({units.clusters} clusters: a clip without a speaker is its own)"
           if speakers is not None else f"{units.clusters} test utterances as units "
           f"({units.clusters_note or 'no speakers known'})")
    return (f"- intervals: resampling unit **{units.resampling_unit}**, {who}; {conf:.0%} intervals: Student-t over "
            "training seeds (paired by seed where both sides share seeds, Welch otherwise; a bootstrap over 3 seeds "
            "cannot see the tails and undercovers) plus the variance of a cluster bootstrap over the test "
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


@dataclass(frozen=True)
class _Pairwise:
    """The pairwise statistics between the best trials of the uniform methods, and why there are
    none when they could not be computed."""

    pairs: pd.DataFrame
    kappa: pd.DataFrame
    by_method: dict[str, TrialRecord]
    error: str | None = None


def _write_tables(experiment: ResultsStore, tables_dir: Path, ensemble_rows: list) -> tuple[dict, _Pairwise]:
    """The exported tables and the pairwise table (written), and the pairwise statistics."""
    exported = export_experiment(experiment, tables_dir, ensembles=ensemble_rows)
    try:
        pairwise = _Pairwise(*pairwise_methods(experiment))
    except (ValueError, FileNotFoundError) as err:
        pairwise = _Pairwise(pd.DataFrame(), pd.DataFrame(), best_per_method(experiment), str(err))
    pairs = pairwise.pairs if not pairwise.pairs.empty else pd.DataFrame(columns=PAIRWISE_COLUMNS)
    exported.update(write_table(pairs, tables_dir, "pairwise", provenance=collect_provenance(experiment.config)))
    return {k: str(v) for k, v in exported.items()}, pairwise


def _write_plots(experiment: ResultsStore, plots_dir: Path, trials: pd.DataFrame, kappa: pd.DataFrame,
                 runs: Sequence[EnsembleRun]) -> dict[str, Any]:
    """Placements, Pareto front, alpha, kappa and one bar chart per ensemble run (paths, None
    where a plot has nothing to show)."""
    plots: dict[str, Any] = {}
    mode, metric = experiment.mode, experiment.metric
    plots["placements"] = _plot(lambda: _plots().placement_heatmap(trials, plots_dir / "placements.png", mode))
    plots["pareto"] = _plot(lambda: _plots().pareto_plot(trials, plots_dir / "pareto.png", mode, metric))
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
    return plots


def _result(experiment: ResultsStore, decision: Decision, settings: dict, runs: Sequence[EnsembleRun],
            ensemble_rows: list, by_method: dict[str, TrialRecord], out: Path) -> dict:
    """What :func:`analyze` returns and ``summary.json`` holds (the files are added after)."""
    config_rows = configs_table(experiment, settings["confidence"])
    best = {kind.value: _trial_summary(experiment, _best_of_kind(experiment, kind))
            for kind in (TrialKind.UNIFORM, TrialKind.DISCRETE, TrialKind.HYBRID, TrialKind.DARTS_DERIVED)}
    overall = ranked(experiment)
    best["overall"] = _trial_summary(experiment, overall[0] if overall else None)
    summary = decision.summary()
    return {
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
        "findings": summary["findings"],
        "decision": {k: v for k, v in summary.items() if k != "findings"},
        "settings": {**settings, "design": settings["design"].describe() if settings["design"] else None},
        "configs": config_rows.astype(object).where(config_rows.notna(), None).to_dict("records"),
        "skipped_audio": _skipped_audio(experiment),
        "comparison": _comparison(experiment, runs),
        "out_dir": str(out),
        "provenance": collect_provenance(experiment.config).to_dict(),
    }


def analyze(study: str | Path | ResultsStore, out_dir: str | Path | None = None) -> dict:
    """Ensembles + exports + statistics + plots + ``report.md`` in one go.

    Writes to ``out_dir`` (default ``<experiment>/analysis``; ``./pefttune-analysis/<name>``
    for a remote experiment): ``report.md``, ``summary.json`` (this function's result),
    ``ensembles.json``, ``tables/`` (trials, history, alpha, predictions, ensembles,
    pairwise; parquet + CSV) and ``plots/*.png``.  Returns a dict with ``experiment``,
    ``name``, ``task``, ``metric``, ``mode``, ``n_trials``, ``outcomes`` (count per
    outcome), ``best`` (per kind: trial id, placement, params, dev, test), ``uniform``
    (best trial per method), ``ensembles`` (table rows), ``findings`` ("1", "2", "3": a
    ``verdict``, a ``text`` and the numbers behind it, :meth:`Decision.summary`),
    ``comparison`` (rows for :func:`format_comparison`) and ``files``.
    """
    experiment = open_results(study)
    out = Path(out_dir) if out_dir is not None else experiment.default_out_dir()
    runs, ensemble_error = _run_default_ensembles(experiment)
    ensemble_rows = [r for run in runs for r in run.results]
    files: dict[str, Any] = {"ensembles": {k: str(v) for k, v in save_ensembles(experiment, runs, out).items()}}
    files["tables"], pairwise = _write_tables(experiment, out / "tables", ensemble_rows)
    trials = trials_table(experiment)
    files["plots"] = _write_plots(experiment, out / "plots", trials, pairwise.kappa, runs)
    settings = analysis_settings(experiment)
    notes = {key: error for key, error in ((FindingKey.ENSEMBLES, ensemble_error),
                                           (FindingKey.ERROR_DIVERSITY, pairwise.error)) if error}
    decision = decide(experiment, alpha=alpha_table(experiment), notes=notes, **settings)
    result = _result(experiment, decision, settings, runs, ensemble_rows, pairwise.by_method, out)
    report_path, summary_path, html_path = out / "report.md", out / "summary.json", out / "report.html"
    files["report"], files["summary"], files["report_html"] = str(report_path), str(summary_path), str(html_path)
    result["files"] = files
    atomic_write_text(report_path, render_report(experiment, result, decision, trials, pairwise.pairs,
                                                 pairwise.kappa, out))
    atomic_write_text(html_path, html_report.render(result, decision, trials, pairwise.pairs,
                                                    _intervals_line(decision, settings, experiment.metric)))
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


def render_report(experiment: ResultsStore, result: dict, decision: Decision, trials: pd.DataFrame,
                  pairs: pd.DataFrame, kappa: pd.DataFrame, out: Path) -> str:
    """``report.md``: the study, what the intervals cover, the findings, then the supporting sections."""
    metric, settings = experiment.metric, result.get("settings", {})
    lines = _head_lines(experiment, result)
    lines += [_intervals_line(decision, settings, metric), ""]
    lines += findings.render(decision, ReportContext(metric, experiment.mode, experiment.task))
    lines += _configs_lines(result, decision, settings, metric)
    lines += _head_description(experiment.config) if result.get("configs") else []
    lines += protocol_lines(experiment.config, trials, metric) if result.get("configs") else []
    tables = (result.get("files") or {}).get("tables", {})
    lines += cost_section.render(experiment, decision, tables.get("costs.parquet"))
    lines += _seed_rounds_lines(experiment)
    lines += reference_section.render(decision.references, decision.hybrid, metric)
    lines += _best_trials_lines(experiment, trials)
    lines += _ensembles_lines(result, settings, metric)
    lines += _pairwise_lines(pairs, kappa)
    lines += _plots_lines(result, out)
    lines += provenance_markdown(result["provenance"]) if result.get("provenance") else []
    lines += ["## Files", "", "Tables (parquet + CSV) are in `tables/`: trials, history, alpha, predictions, "
              "ensembles, costs, pairwise; `ensembles.json` and `summary.json` hold the numbers above; `report.html` is "
              "this report as one page.", ""]
    return wrap("\n".join(lines))


def _head_lines(experiment: ResultsStore, result: dict) -> list[str]:
    better = "higher" if experiment.mode == "max" else "lower"
    lines = [
        f"# pefttune report: {experiment.name}",
        "",
        f"- experiment: `{experiment.uri}`",
        f"- Ray experiments: {', '.join(f'`{r}`' for r in experiment.ray_experiments)}",
        f"- task: {experiment.task}; metric: **{experiment.metric}** ({better} is better); trials are selected on "
        "dev, compared on test",
        f"- trials: {len(experiment.trials)} ("
        + ", ".join(f"{k}: {v}" for k, v in sorted(result["outcomes"].items())) + ")",
        "",
    ]
    if result.get("skipped_audio"):
        lines.append(f"- audio: {result['skipped_audio']} manifest rows with unreadable audio were dropped "
                     f"(`data.on_error: skip`; listed in `{SKIPPED_AUDIO}`)")
    return lines


def _head_description(config: dict | None) -> list[str]:
    """The head every configuration shares, from the saved config (nothing when it cannot be read)."""
    from pefttune.config import HeadSection, task_kind_of

    try:
        head = HeadSection(**((config or {}).get("head") or {}))
    except ValueError:
        return []
    sentence = head.describe(task_kind_of(((config or {}).get("data") or {}).get("task", "ks")))
    return [wrap(sentence[0].upper() + sentence[1:] + "."), ""]


def _configs_lines(result: dict, decision: Decision, settings: dict, metric: str) -> list[str]:
    """Every configuration's mean over seeds with its t-interval."""
    if not result.get("configs"):
        return []
    conf = settings.get("confidence", 0.95)
    units = decision.units
    speakers = (f"{units.test_speakers} test speakers" if units.test_speakers is not None
                else f"{units.clusters} test utterances, no speakers known")
    lines = [f"## Configurations (mean over seeds, {conf:.0%} t-interval; test split: {speakers})", "",
             "Reference rows: `frozen` (the head only, no PEFT) and `log-mel` (the same head on log-mel "
             "features, no SSL encoder) show what PEFT and the encoder add.", ""]
    rows = []
    for r in result["configs"]:
        ci = r["note"] if r.get("note") else f"[{fmt(r['test_ci_low'])}, {fmt(r['test_ci_high'])}]"
        rows.append({**r, "test": f"{fmt(r['test_mean'])} ± {fmt(r['test_std'])}", "ci": ci, "dev": fmt(r["dev_mean"]),
                     "placement_short": compact_placement(r.get("placement_short"))})
    return lines + [md_table(rows, ["config_id", "kind", "placement_short", "trainable_params", "lr", "seeds", "dev",
                                    "test", "ci"],
                             ["configuration", "kind", "placement", "params", "lr", "seeds", f"dev {metric} (mean)",
                              f"test {metric} (mean ± std)", "test CI"]), ""]


def _best_trials_lines(experiment: ResultsStore, trials: pd.DataFrame) -> list[str]:
    """The ten best single trials by dev."""
    m = experiment.metric
    lines = ["## Best trials (completed, by dev)", "",
             "Single trials, one training seed each: no interval (the configurations table above has the intervals "
             "over seeds).", ""]
    cols = ["trial_id", "kind", "method", "placement_short", "trainable_params", "best_dev_score", "test_score",
            "outcome"]
    top = trials[trials["best_dev_score"].notna() & (trials["kind"] != TrialKind.DARTS)
                 & (trials["outcome"] == "completed")]
    top = top.sort_values(["best_dev_score", "trial_id"], ascending=[experiment.mode == "min", True]).head(10)
    top = top.assign(placement_short=top["placement_short"].map(compact_placement))
    headers = ["trial", "kind", "method", "placement", "params", f"dev {m}", f"test {m}", "outcome"]
    return lines + [md_table(top.astype(object).where(top.notna(), None).to_dict("records"), cols, headers), ""]


def _ensembles_lines(result: dict, settings: dict, metric: str) -> list[str]:
    """The uniform baselines (best trial per method) and the default ensembles."""
    lines = []
    if result["uniform"]:
        lines += ["## Uniform baselines (best trial per method)", "",
                  "Single trials, the best seed by dev: no interval (see the configurations table).", ""]
        rows = [{"method": k, **v} for k, v in result["uniform"].items()]
        lines += [md_table(rows, ["method", "trial_id", "trainable_params", "dev", "test"],
                           ["method", "trial", "params", f"dev {metric}", f"test {metric}"]), ""]
    lines += ["## Ensembles", ""]
    if not result["ensembles"]:
        return lines + ["Not run: fewer than 2 usable trials with stored predictions.", ""]
    conf = settings.get("confidence", 0.95)
    paired_test_name = "McNemar p" if result.get("task") == "classification" else "sign test p (edit counts)"
    rows = [{**r, "gain_ci": "-" if r.get("gain_ci_low") is None else
             f"[{r['gain_ci_low']:+.4f}, {r['gain_ci_high']:+.4f}]"} for r in result["ensembles"]]
    lines += [md_table(rows, ["ensemble_id", "n_members", "dev_score", "test_score", "best_member_test",
                              "delta_vs_best", "gain_ci", "mcnemar_p"],
                       ["ensemble", "members", f"dev {metric}", f"test {metric}", "best member (test)", "gain",
                        f"gain {conf:.0%} CI", paired_test_name]), ""]
    lines.append("Members: the top-k trials by dev, or the best trial of each method, whatever their seeds "
                 "(finding 2 instead builds one ensemble per seed). Gain: test improvement over the best member by "
                 f"dev (positive = better), with its {conf:.0%} paired bootstrap interval over test examples "
                 f"({settings.get('draws', 2000)} draws; '-' where the metric is not a sum over examples); "
                 f"{paired_test_name}: ensemble vs that member. Caruana's dev score is the one it was fitted on.")
    return lines + [""]


def _pairwise_lines(pairs: pd.DataFrame, kappa: pd.DataFrame) -> list[str]:
    """Agreement, kappa, McNemar and error overlap of the best trial of each uniform method."""
    lines = ["## Pairwise statistics between uniform methods (test)", ""]
    if pairs.empty:
        return lines + ["Not run: fewer than 2 uniform methods with stored test predictions.", ""]
    lines += ["The best trial of each method (one seed each): no interval; finding 3 gives kappa and error "
              "overlap over all seeds with simultaneous intervals.", ""]
    lines += [md_table(pairs.to_dict("records"), list(pairs.columns),
                       ["a", "b", "agreement", "kappa", "McNemar b", "McNemar c", "McNemar p", "both wrong",
                        "error overlap"]), ""]
    rows = [{"": idx, **{c: kappa.loc[idx, c] for c in kappa.columns}} for idx in kappa.index]
    return lines + ["Cohen's kappa:", "", md_table(rows, [""] + list(kappa.columns)), ""]


def _plots_lines(result: dict, out: Path) -> list[str]:
    lines = ["## Plots", ""]
    plots = result["files"]["plots"] if "files" in result else {}
    for name, path in plots.items():
        for p in path if isinstance(path, list) else [path]:
            rel = _rel(p, out)
            if rel:
                lines += [f"![{name}]({rel})", ""]
    if not plots.get("alpha"):
        lines += ["No DARTS search trials: no alpha plot.", ""]
    return lines
