"""What each arm cost, next to what it scored: the ``costs`` table and the report's "Cost of each arm".

The table (:func:`pefttune.analysis.tables.costs_table`, columns in
:mod:`pefttune.analysis.tables`) gives each arm's trials, epochs, trial-seconds (Ray's
``time_total_s``: seconds a trial held its slot of ``resources.cpu`` CPUs / ``resources.gpu``
GPUs) and trainable parameters; for the ensembles, their members' training and the measured
time of combining the members' stored test predictions (:func:`combine_ms_per_example`).

The head-to-head rows compare the discrete search with the DARTS search on the interval the
findings use (``analysis.interval``, through the same
:meth:`~pefttune.analysis.findings.Scorer.compare_configs` finding 1 uses).  They are reported
comparisons, not findings: no rule, no verdict.

- *replicated*: the discrete search's best placement (the searched trial with the best dev
  score, as the replicates choose it, with all its seeds) minus the best DARTS-derived
  configuration (by mean dev, as finding 1 chooses it); the cost beside it is each search's
  trial-seconds (every searched trial; every DARTS supernet);
- *equal budget*: one search against one search.  The DARTS side is the DARTS-derived trial of
  the search's seed (the first of ``train.seeds``) and its budget the trial-seconds of the DARTS
  search it was derived from; the discrete side is the best by dev among the searched trials
  that, in order of start time, fit in that budget (:func:`within_budget`).  One trial per side,
  one seed: the interval covers the test speakers only (the seeds' randomness is not bounded).

Example::

    >>> import pandas as pd
    >>> frame = pd.DataFrame({"trial_id": ["a", "b", "c"], "start_time": [3.0, 1.0, 2.0],
    ...                       "time_total_s": [10.0, 20.0, 30.0], "outcome": ["completed"] * 3,
    ...                       "best_dev_score": [0.9, 0.5, 0.7]})
    >>> pick = within_budget(frame, budget=55.0, mode="max")
    >>> pick.trial_id, pick.trials, pick.seconds
    ('c', 2, 50.0)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from pefttune.analysis.ensemble_runner import combine, load_members, majority_strategy
from pefttune.analysis.findings import Decision, Scorer, configurations
from pefttune.analysis.findings._base import supporting_text
from pefttune.analysis.findings._inputs import Config, best_config
from pefttune.analysis.findings.ensembles import uniform_by_seed
from pefttune.analysis.intervals import Comparison
from pefttune.analysis.markdown import md_table
from pefttune.analysis.selection import ranked
from pefttune.analysis.store import MissingPredictionsError, ResultsStore, TrialRecord
from pefttune.analysis.tables import (
    DISCRETE_SEARCH, cost_arm, costs_table, search_seed, trials_table,
)
from pefttune.schema import TrialKind

__all__ = ["BudgetPick", "HeadToHead", "combine_ms_per_example", "experiment_costs", "head_to_head", "render",
           "within_budget"]

TITLE = "## Cost of each arm"
REPEATS = 5


# --------------------------------------------------------------------------- ensembles
def combine_ms_per_example(experiment: ResultsStore, members: Sequence[TrialRecord], strategy: str,
                           selected: Sequence[str] = ()) -> float | None:
    """Milliseconds per test example the ``strategy`` takes to combine the members' stored test
    predictions (median of :data:`REPEATS` timings; loading the files is not timed).  The
    weighted vote is timed with equal weights and Caruana with its ``selected`` members: the time
    does not depend on the values.  None when a member has no stored test predictions, or the
    members were evaluated on different examples."""
    try:
        data = load_members(experiment, list(members), "test")
    except (MissingPredictionsError, ValueError):  # ValueError: members evaluated on different examples
        return None
    ids = [t.trial_id for t in members]
    weights = np.ones(len(ids)) if strategy == "weighted" else None
    selection = None
    if strategy == "caruana":
        selection = [ids.index(s) for s in selected if s in ids] or list(range(len(ids)))
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        combine(strategy, experiment, data, weights, selection)
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times)) / max(1, int(data.index.shape[0]))


def experiment_costs(experiment: ResultsStore, ensembles: Iterable = ()) -> pd.DataFrame:
    """The ``costs`` table of ``experiment``: its arms, the ``ensembles`` (ensembles-table rows or
    results) and finding 2's per-seed majority votes, each ensemble's combination timed."""
    rows = [r if isinstance(r, dict) else r.row() for r in ensembles]
    configs = configurations(experiment)
    vote = majority_strategy(experiment.task)
    for seed, members in uniform_by_seed(experiment, configs).items():
        if len(members) >= 2:
            rows.append({"ensemble_id": f"per seed {seed}:{vote}", "strategy": vote,
                         "member_ids": ",".join(t.trial_id for t in members), "selected": ""})
    timed = {}
    for row in rows:
        ids = [i for i in str(row["member_ids"]).split(",") if i]
        members = [experiment.trial(i) for i in ids]
        selected = [i for i in str(row.get("selected") or "").split(",") if i]
        timed[str(row["ensemble_id"])] = combine_ms_per_example(experiment, members, str(row["strategy"]), selected)
    return costs_table(experiment, rows, timed)


# --------------------------------------------------------------------------- head to head
@dataclass(frozen=True)
class BudgetPick:
    """The best searched trial by dev among those that fit in a budget, in order of start time:
    ``trials`` and ``seconds`` are what the fitting prefix ran (None: none of them completed)."""

    trial_id: str | None
    trials: int
    seconds: float


def within_budget(searched: pd.DataFrame, budget: float, mode: str) -> BudgetPick:
    """:class:`BudgetPick` over ``searched`` (trials-table rows: ``trial_id``, ``start_time``,
    ``time_total_s``, ``outcome``, ``best_dev_score``): the trials, in order of start time,
    whose cumulative ``time_total_s`` stays within ``budget``; the best completed one by
    ``best_dev_score`` (ties: the earlier start)."""
    order = searched.sort_values(["start_time", "trial_id"], kind="mergesort")
    spent = pd.to_numeric(order["time_total_s"], errors="coerce").fillna(0.0).cumsum()
    fit = order[spent <= budget + 1e-9]
    seconds = float(pd.to_numeric(fit["time_total_s"], errors="coerce").fillna(0.0).sum())
    done = fit[(fit["outcome"] == "completed") & fit["best_dev_score"].notna()]
    if done.empty:
        return BudgetPick(None, len(fit), seconds)
    sign = -1.0 if mode == "max" else 1.0
    ranks = done.assign(_key=sign * done["best_dev_score"].astype(float), _pos=range(len(done)))
    best = ranks.sort_values(["_key", "_pos"], kind="mergesort").iloc[0]
    return BudgetPick(str(best["trial_id"]), len(fit), seconds)


@dataclass(frozen=True)
class HeadToHead:
    """Discrete search - DARTS search on test (``comparison``: ``diff > 0``, discrete better), with
    each side's search cost in trial-seconds; ``note``: why there is no comparison, or what its
    interval covers."""

    label: str
    discrete: str  # the configuration (replicated) or the trial (equal budget)
    discrete_seeds: tuple
    darts: str
    darts_seeds: tuple
    discrete_seconds: float
    darts_seconds: float
    discrete_trials: int
    comparison: Comparison | None = None
    note: str = ""


def _searched(experiment: ResultsStore) -> list[TrialRecord]:
    first = search_seed(experiment.config)
    return [t for t in experiment.trials
            if cost_arm(t.kind, t.method, t.seed, first) == DISCRETE_SEARCH]


def head_to_head(experiment: ResultsStore, decision: Decision) -> list[HeadToHead] | str:
    """The replicated and the equal-budget rows (module docstring); empty without a completed
    searched trial or a DARTS-derived configuration; why not, when the trials cannot be compared
    (e.g. evaluated on different test examples)."""
    try:
        return _head_to_head(experiment, decision)
    except (MissingPredictionsError, ValueError) as err:
        return str(err)


def _head_to_head(experiment: ResultsStore, decision: Decision) -> list[HeadToHead]:
    configs = decision.configs
    darts = best_config(experiment, dict(configs), TrialKind.DARTS_DERIVED)
    searched = _searched(experiment)
    best = ranked(experiment, trials=[t for t in searched if t.usable])
    if darts is None or not best:
        return []
    frame = trials_table(experiment)
    darts_seconds = float(frame.loc[frame["kind"] == TrialKind.DARTS, "time_total_s"].fillna(0.0).sum())
    search_frame = frame[frame["trial_id"].isin([t.trial_id for t in searched])]
    search_seconds = float(search_frame["time_total_s"].fillna(0.0).sum())
    scorer = Scorer(experiment, decision.interval)
    conf, draws = decision.confidence, decision.draws
    rows = []
    chosen = configs.get(best[0].config_id)
    if chosen is not None:
        rows.append(HeadToHead("replicated: best searched placement, all its seeds", chosen.config_id,
                               tuple(chosen.seeds), darts.config_id, tuple(darts.seeds), search_seconds,
                               darts_seconds, len(searched), scorer.compare_configs(chosen, darts, conf, draws)))
    rows.append(_equal_budget(experiment, frame, search_frame, darts, scorer, conf, draws))
    return rows


def _equal_budget(experiment: ResultsStore, frame: pd.DataFrame, search_frame: pd.DataFrame, darts: Config,
                  scorer: Scorer, conf: float, draws: int) -> HeadToHead:
    """One search against one search: the DARTS-derived trial of the search's seed (else its first
    seed) and the trial-seconds of the DARTS search(es) it was derived from; the best searched
    trial within those seconds (:func:`within_budget`); both one seed."""
    first = search_seed(experiment.config)
    retrain = next((t for t in darts.trials if t.seed == first), darts.trials[0])
    sources = {str(s).split()[0] for s in retrain.config.get("derived_from") or []}
    searches = frame[(frame["kind"] == TrialKind.DARTS)
                     & (frame["trial_id"].isin(sources) if sources else frame["seed"] == retrain.seed)]
    budget = float(searches["time_total_s"].fillna(0.0).sum())
    pick = within_budget(search_frame, budget, experiment.mode)
    label = (f"equal budget: best searched trial within the seed-{retrain.seed} DARTS search's trial-seconds, "
             f"against that search's retrain")
    darts_name = f"{darts.config_id} (trial {retrain.trial_id})"
    if pick.trial_id is None:
        return HeadToHead(label, "-", (), darts_name, (retrain.seed,), pick.seconds, budget, pick.trials, None,
                          f"no searched trial completed within {budget:.0f} s")
    trial = experiment.trial(pick.trial_id)
    cmp = scorer.compare([scorer.trial(trial)], [scorer.trial(retrain)], conf, draws, [trial.seed], [retrain.seed])
    return HeadToHead(label, f"{trial.config_id} (trial {trial.trial_id})", (trial.seed,), darts_name,
                      (retrain.seed,), pick.seconds, budget, pick.trials, cmp,
                      "one trial per side, one seed: the interval covers the test speakers only, not the seeds")


# --------------------------------------------------------------------------- render
def _cost_rows(costs: pd.DataFrame) -> list[dict]:
    rows = []
    for r in costs.astype(object).where(costs.notna(), None).to_dict("records"):
        search = (f"{r['search_trials']} trials, {r['search_seconds']:.0f} s"
                  if r.get("search_seconds") is not None else "-")
        infer = "-"
        if r.get("kind") == "ensemble":
            ms = r.get("combine_ms_per_example")
            combined = f"{1000 * ms:.2f} µs" if ms is not None else "not measured"
            bound = r.get("members_ms_per_example_bound")
            infer = f"combine {combined} (measured); members <= {f'{bound:.1f} ms' if bound else '- (not reported)'}"
        rows.append({**r, "seconds": f"{r['trial_seconds']:.0f}", "search": search, "infer": infer,
                     "params": r.get("params") or "-"})
    return rows


def _h2h_lines(rows: Sequence[HeadToHead] | str, metric: str, confidence: float) -> list[str]:
    if isinstance(rows, str):
        return [f"Discrete against DARTS search: not run ({rows}).", ""]
    if not rows:
        return ["Discrete against DARTS search: not run (no completed searched trial, or no DARTS-derived "
                "configuration).", ""]
    lines = ["### Discrete against DARTS search (a reported comparison, not a finding: no rule, no verdict)", "",
             f"Test {metric}, discrete minus DARTS (positive: the discrete search's placement is better), on the "
             f"findings' {confidence:.0%} interval; search cost in trial-seconds: every searched trial of the "
             "discrete search, every DARTS search (supernet) trial; the retrains and replicates are in the table "
             "above.", ""]
    table, notes = [], []
    for r in rows:
        c = r.comparison
        name = r.label.split(":")[0]
        table.append({"label": name, "discrete": f"`{r.discrete.split()[0]}`", "darts": f"`{r.darts.split()[0]}`",
                      "ci": "-" if c is None else f"{c.diff:+.4f} {c.ci_text()}",
                      "means": "-" if c is None else f"{c.mean_a:.4f} vs {c.mean_b:.4f}",
                      "cost": f"{r.discrete_seconds:.0f} s vs {r.darts_seconds:.0f} s"})
        detail = [r.label, f"discrete `{r.discrete}` seeds {list(r.discrete_seeds)} "
                           f"({r.discrete_trials} searched trial(s)), DARTS `{r.darts}` seeds {list(r.darts_seeds)}"]
        if c is not None:
            detail.append(f"interval over {c.interval}{supporting_text(c)}")
        if r.note:
            detail.append(r.note)
        notes.append(f"- {'; '.join(detail)}.")
    lines += [md_table(table, ["label", "discrete", "darts", "means", "ci", "cost"],
                       ["comparison", "discrete", "DARTS-derived", f"test {metric}", "discrete - DARTS, interval",
                        "search cost (discrete vs DARTS)"]), "", *notes, ""]
    return lines


def render(experiment: ResultsStore, decision: Decision, costs: pd.DataFrame | str | Path | None) -> list[str]:
    """The report's "Cost of each arm": the ``costs`` table (a frame, or its parquet file) and
    the discrete-against-DARTS rows."""
    if costs is None:
        return []
    costs = costs if isinstance(costs, pd.DataFrame) else pd.read_parquet(costs)
    device = ", ".join(sorted(set(costs["device"].dropna()))) or "cpu"
    lines = [TITLE, "",
             f"What each arm's results took: trials (every outcome), epochs and trial-seconds (Ray's `time_total_s`, "
             f"summed: seconds a trial held its slot, {device.upper()} slot-seconds, not process CPU time) and "
             "trainable parameters per configuration. \"DARTS does not beat uniform\" (finding 1) and \"majority "
             "voting is best\" (finding 2) are read at these costs. An ensemble's training is its members' trials; "
             "its inference per test example is the combination of stored predictions, measured here, plus its "
             "members' forward passes, which the analysis does not run: bounded by their training throughput.", ""]
    lines += [md_table(_cost_rows(costs), ["arm", "trials", "completed", "epochs", "seconds", "search", "params",
                                           "slot", "infer"],
                       ["arm", "trials", "completed", "epochs", "trial-seconds", "of which searching", "params",
                        "slot", "inference per test example"]), ""]
    return lines + _h2h_lines(head_to_head(experiment, decision), experiment.metric, decision.confidence)
