"""Summaries of a discrete search's results: the best trials, the Pareto front, a text table.

Ray has no top-k: :func:`~pefttune.runtime.study_dir.results_frame` + :func:`top_k` sort
the trials.
"""
from __future__ import annotations

import pandas as pd

from pefttune.config import StudyConfig
from pefttune.metrics import metric_mode
from pefttune.runtime.console import format_table
from pefttune.schema import TrialKind, metric_key, rank_trials
from pefttune.search.optuna_search import PARAMS_METRIC


def top_k(frame: pd.DataFrame, metric: str, mode: str, k: int = 5, kinds: list[str] | None = None) -> pd.DataFrame:
    """The k best finished trials by ``metric`` (e.g. ``best_dev_accuracy``): no errors, no
    over-budget or early-stopped trials; ranked by :func:`~pefttune.schema.rank_trials` (ties
    by trial id, as the analysis ranks them)."""
    if metric not in frame:
        return frame.iloc[0:0]
    keep = (frame["status"] == "TERMINATED") & ~frame["over_budget"] & ~frame["stopped_early"]
    keep &= frame[metric].notna()
    if kinds is not None:
        keep &= frame["kind"].isin(kinds)
    chosen = frame[keep]
    scores, ids = chosen[metric].tolist(), chosen["trial_id"].astype(str).tolist()
    order = rank_trials(range(len(chosen)), scores.__getitem__, ids.__getitem__, mode)
    return chosen.iloc[order[:k]]


def pareto_front(frame: pd.DataFrame, metric: str, mode: str, params: str = PARAMS_METRIC) -> pd.DataFrame:
    """Finished trials not dominated in (metric, trainable parameters), fewest parameters first."""
    chosen = top_k(frame, metric, mode, k=len(frame))
    sign = 1.0 if mode == "max" else -1.0
    front = []
    for index, row in chosen.iterrows():
        score, size = sign * row[metric], row[params]
        dominated = any(
            (sign * other[metric] >= score and other[params] <= size)
            and (sign * other[metric] > score or other[params] < size)
            for _, other in chosen.iterrows()
        )
        if not dominated:
            front.append(index)
    return chosen.loc[front].sort_values(params, kind="mergesort")


def summary_table(frame: pd.DataFrame, config: StudyConfig, k: int = 5, width: int = 120) -> str:
    """Text summary, no wider than ``width``: counts, best trials, uniform baselines (+ hybrid),
    Pareto front, errors grouped by message."""
    from collections import Counter

    metric = metric_key("dev", config.metric, best=True)
    mode = metric_mode(config.metric)
    test = metric_key("test", config.metric)
    columns = ["trial_id", "kind", "seed", "placement_short", "trainable_params", metric, test, "epoch"]
    lines = [f"experiment {config.name}: {len(frame)} trials"]
    if len(frame):
        counts = {
            "finished": int(((frame["status"] == "TERMINATED") & ~frame["over_budget"] & ~frame["stopped_early"]).sum()),
            "stopped early": int(frame["stopped_early"].sum()),
            "over budget": int(frame["over_budget"].sum()),
            "errors": int((frame["status"] == "ERROR").sum()),
        }
        lines.append(", ".join(f"{v} {k}" for k, v in counts.items()))
        best = top_k(frame, metric, mode, k)
        lines += [f"\nbest {len(best)} trials by {metric}:", format_table(best, columns, width)]
        if "kind" in frame:
            fixed = frame[frame["kind"].isin([TrialKind.UNIFORM, TrialKind.HYBRID, TrialKind.FROZEN])]
            if len(fixed):
                lines += ["\nuniform baselines and hybrid:", format_table(fixed, columns + ["status"], width)]
        if config.search.multi_objective:
            front = pareto_front(frame, metric, mode)
            lines += ["\nPareto front (metric vs trainable parameters):", format_table(front, columns, width)]
        errors = frame[frame["status"] == "ERROR"]
        if len(errors):
            lines.append("\nerrors:")
            for text, count in Counter(errors["error"].fillna("").astype(str)).most_common():
                label = f"  {count} trial{'s' if count > 1 else ''}: {text}"
                lines.append(label if len(label) <= width else label[: width - 3] + "...")
    return "\n".join(lines)
