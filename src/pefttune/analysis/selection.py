"""Choosing trials from the results store: ranked, top-k, best per method, ensemble members.

Ray has no top-k: the trials table (:func:`pefttune.analysis.tables.trials_table`) is
sorted here and mapped back to the trials (and so to their final checkpoints).
"""
from __future__ import annotations

import re
from typing import Iterable

import pandas as pd

from pefttune.analysis.store import ResultsStore, TrialRecord, open_results
from pefttune.analysis.tables import trials_table
from pefttune.metrics import METRICS
from pefttune.schema import TrialKind, metric_key, rank_trials

__all__ = ["best_per_method", "ranked", "select_members", "top_k"]


def _rank_key(experiment: ResultsStore, metric: str | None, mode: str | None) -> tuple[str, str]:
    metric = metric or experiment.metric
    if metric in METRICS:  # a task metric name: rank by its best dev score
        return metric_key("dev", metric, best=True), mode or METRICS[metric][1]
    if mode is None:
        base = metric.split("_")[-1]
        if metric == "trainable_params":
            mode = "min"
        elif base in METRICS:
            mode = METRICS[base][1]
        else:
            raise ValueError(f"top_k: give mode='max' or 'min' for column {metric!r}")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    return metric, mode


def ranked(
    experiment: ResultsStore | str,
    metric: str | None = None,
    mode: str | None = None,
    trials: Iterable[TrialRecord] | None = None,
) -> list[TrialRecord]:
    """Trials (default: the usable ones) best first by ``metric`` (:func:`~pefttune.schema.rank_trials`:
    ties by trial id).

    ``metric`` is a task metric name (ranked by ``best_dev_<metric>``, falling back to the
    last ``dev_<metric>``) or any numeric column of the trials table.
    Trials without a value are dropped.
    """
    experiment = open_results(experiment)
    column, mode = _rank_key(experiment, metric, mode)
    pool = list(trials) if trials is not None else [t for t in experiment.trials if t.usable]
    frame = trials_table(experiment).set_index("trial_id")
    if column not in frame.columns:
        if column == metric_key("dev", experiment.metric, best=True):
            column = "best_dev_score"
        else:
            raise ValueError(f"no column {column!r} in the trials table of {experiment.uri}")
    values = pd.to_numeric(frame[column], errors="coerce")
    if column.startswith("best_dev_"):
        values = values.fillna(pd.to_numeric(frame["dev_score"], errors="coerce"))
    return rank_trials(pool, lambda t: values.get(t.trial_id), lambda t: t.trial_id, mode)


def top_k(experiment: ResultsStore | str, k: int, metric: str | None = None,
          mode: str | None = None) -> list[TrialRecord]:
    """The ``k`` best usable trials by ``metric`` (default: the experiment's dev metric).

    Ray has no top-k: the trials table is sorted here and mapped back to the trials (and
    so to their final checkpoints).  Errored, over-budget, early-stopped and DARTS-search
    trials are never returned.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    return ranked(experiment, metric, mode)[: int(k)]


def best_per_method(
    experiment: ResultsStore | str, metric: str | None = None, mode: str | None = None
) -> dict[str, TrialRecord]:
    """The best usable *uniform* trial of each method, best method first."""
    experiment = open_results(experiment)
    out: dict[str, TrialRecord] = {}
    uniform = [t for t in experiment.trials if t.usable and t.kind == TrialKind.UNIFORM]
    for trial in ranked(experiment, metric, mode, uniform):
        out.setdefault(trial.method or "?", trial)
    return out


def select_members(experiment: ResultsStore | str,
                   spec: str | Iterable[str] = "top-5") -> tuple[str, list[TrialRecord]]:
    """Resolve a member choice to ``(label, trials)``.

    ``top-K`` / ``topK`` (``top-k``: the config's ``ensemble_size``), ``per-method``
    (best uniform trial per method), or explicit trial ids (a list, or one comma-separated
    string).  Explicit trials may be of any outcome but must have test predictions.
    """
    experiment = open_results(experiment)
    if isinstance(spec, str):
        text = spec.strip()
        match = re.fullmatch(r"top-?(\d+|k)", text, flags=re.IGNORECASE)
        if match:
            k = experiment.ensemble_size if match.group(1).lower() == "k" else int(match.group(1))
            members = top_k(experiment, k)
            return f"top-{k}", members
        if text.lower() in ("per-method", "per_method", "permethod", "diverse"):
            return "per-method", list(best_per_method(experiment).values())
        ids = [part.strip() for part in text.removeprefix("ids:").split(",") if part.strip()]
    else:
        ids = [str(part) for part in spec]
    if not ids:
        raise ValueError("members: give top-K, per-method, or a comma-separated list of trial ids")
    members = [experiment.trial(key) for key in ids]
    for trial in members:
        if not trial.has_predictions:
            experiment.predictions(trial, "test")  # raises MissingPredictionsError with the details
    return "ids", members
