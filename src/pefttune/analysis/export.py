"""Export an experiment as flat tables (parquet and CSV): ``pefttune export EXPERIMENT --out DIR``.

The tables and their columns are documented in :mod:`pefttune.analysis.tables`; the
``ensembles`` table needs the ensembles, hence this module sits above
:mod:`pefttune.analysis.ensemble_runner`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from pefttune.analysis.costs import experiment_costs
from pefttune.analysis.ensemble_runner import default_ensembles
from pefttune.analysis.store import ResultsStore, open_results
from pefttune.analysis.tables import (
    FORMATS,
    TABLES,
    alpha_table,
    configs_table,
    ensembles_table,
    history_table,
    predictions_table,
    trials_table,
    write_table,
)
from pefttune.runtime.provenance import collect

__all__ = ["FORMATS", "TABLES", "export_experiment"]


def export_experiment(
    experiment: ResultsStore | str,
    out_dir: str | Path,
    *,
    formats: Sequence[str] = FORMATS,
    ensembles: Iterable[Any] | None = None,
    tables: Sequence[str] = TABLES,
) -> dict[str, Path]:
    """Write the tables (default all of :data:`TABLES`) to ``out_dir``; returns name -> path.

    ``ensembles``: ensemble results to export; default the ensembles of
    :func:`pefttune.analysis.ensemble_runner.default_ensembles` (top-k and per-method,
    every strategy of the task), empty when fewer than 2 trials are usable.
    """
    experiment = open_results(experiment)
    unknown = set(tables) - set(TABLES)
    if unknown:
        raise ValueError(f"unknown tables {sorted(unknown)}; known: {list(TABLES)}")
    files: dict[str, Path] = {}
    provenance = collect(experiment.config)  # in each parquet file's schema metadata
    builders = {
        "trials": lambda: trials_table(experiment),
        "configs": lambda: configs_table(experiment),
        "history": lambda: history_table(experiment),
        "alpha": lambda: alpha_table(experiment),
        "predictions": lambda: predictions_table(experiment),
    }
    ensembles = None if ensembles is None else list(ensembles)
    for name in tables:
        if name in ("ensembles", "costs") and ensembles is None:
            ensembles = [r for run in default_ensembles(experiment) for r in run.results]
        if name == "ensembles":
            frame = ensembles_table(ensembles)
        elif name == "costs":  # each ensemble's combination timed (pefttune.analysis.costs)
            frame = experiment_costs(experiment, ensembles)
        else:
            frame = builders[name]()
        files.update(write_table(frame, out_dir, name, formats, provenance))
    return files
