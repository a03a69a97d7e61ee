"""The whole study in one call: what `pefttune run` does.

1. data: the corpus is made on first use (synthesized offline for the embedded default);
2. discrete arm: uniform baselines (one per candidate method), the hybrid, and the
   Optuna/ASHA per-layer search, all under the same parameter budget
   (:func:`pefttune.search.experiment.run_search`);
3. DARTS arm: relaxation search, derived placements retrained like the baselines
   (:func:`pefttune.darts.experiment.run_darts`);
4. analysis: ensembles over the best trials, trial tables, statistics, plots and the
   report on the paper's three findings (:func:`pefttune.analysis.report.analyze`).

Everything lands in ``<storage>/<name>/`` (default ``./pefttune-results/<name>/``).
One Ray instance serves both arms.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pefttune.config import ExperimentConfig, load_config


@dataclass
class StudyResult:
    experiment: str
    summary: dict
    seconds: dict

    @property
    def report(self) -> Path:
        return Path(self.summary["files"]["report"]) if "report" in self.summary.get("files", {}) else Path()


def _stage(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def run_study(
    config: ExperimentConfig | str | Path | None = None,
    address: str | None = None,
    resume: bool = False,
    name: str | None = None,
    verbose: int = 1,
) -> StudyResult:
    """Run the discrete arm, the DARTS arm and the analysis of ``config`` (default: embedded)."""
    import ray

    from pefttune.analysis.report import analyze, format_comparison
    from pefttune.search.experiment import connect_ray, experiment_path, run_search

    if not isinstance(config, ExperimentConfig):
        config = load_config(config)
    if name is not None:
        config = ExperimentConfig.model_validate({**config.model_dump(), "name": name})
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    print(f"pefttune run: {config.name}: backbone {config.backbone}, {config.data.source}/{config.data.task}, "
          f"candidates {sorted(config.methods)}, budget {config.budget}", flush=True)
    started = connect_ray(address)
    try:
        _stage("discrete arm: uniform baselines, hybrid, per-layer search")
        t = time.perf_counter()
        run_search(config, address=None, resume=resume, verbose=verbose)
        seconds["discrete"] = time.perf_counter() - t
        if config.darts.enabled:
            from pefttune.darts.experiment import darts_started, run_darts

            _stage("DARTS arm: relaxation search, derive, retrain")
            t = time.perf_counter()
            run_darts(config, address=None, resume=resume and darts_started(config), verbose=verbose)
            seconds["darts"] = time.perf_counter() - t
    finally:
        if started:
            ray.shutdown()
    _stage("analysis: ensembles, tables, statistics, plots, report")
    t = time.perf_counter()
    path = experiment_path(config)
    summary = analyze(path)
    seconds["analysis"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start
    print(format_comparison(summary))
    for key in ("1", "2", "3"):
        finding = summary.get("findings", {}).get(key)
        if finding:
            print(f"finding {key}: {finding.get('verdict')}: {finding.get('text')}")
    files = summary.get("files", {})
    print(f"\nresults: {path}")
    if files.get("report"):
        print(f"report:  {files['report']}")
    print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()), flush=True)
    return StudyResult(str(path), summary, seconds)
