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

import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from pefttune.config import ExperimentConfig, load_config


@dataclass
class StudyResult:
    experiment: str
    summary: dict
    seconds: dict
    exit_code: int = 0  # non-zero: no trial finished, or every trial of a kind failed
    failures: list = field(default_factory=list)  # grouped trial errors

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
    """Run the discrete arm, the DARTS arm and the analysis of ``config`` (default: embedded).

    ``verbose``: 0 quiet, 1 pefttune's console, 2 Ray's stream as well (``-v``). The result's
    ``exit_code`` is non-zero when no trial finished or every trial of a kind failed; the
    analysis is skipped when the discrete arm finished no trial.
    """
    import pandas as pd
    import ray

    from pefttune.analysis.report import analyze, format_comparison
    from pefttune.data.loaders import prepare_data
    from pefttune.runtime.cluster import connect_ray
    from pefttune.runtime.console import failure_summary
    from pefttune.runtime.experiment import experiment_path, refuse_existing, results_frame
    from pefttune.search.experiment import build_experiment, run_search
    from pefttune.trainables.setup import prefill_local

    if not isinstance(config, ExperimentConfig):
        config = load_config(config)
    if name is not None:
        config = ExperimentConfig.model_validate({**config.model_dump(), "name": name})
    if config.tasks:
        raise ValueError(f"tasks: {config.name} is a suite of {list(config.tasks)}; run it with "
                         "pefttune.suite.run_suite (what `pefttune run` does for such a config)")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    print(f"pefttune run: {config.name}: backbone {config.backbone}, {config.data.source}/{config.data.task}, "
          f"candidates {sorted(config.methods)}, budget {config.budget}", flush=True)
    build_experiment(config)  # every check that needs no Ray (errors name the field: exit 2)
    if not resume:
        refuse_existing(experiment_path(config), "a study")
    ref = prepare_data(config)  # data made and every audio file checked before Ray starts (errors: exit 2)
    prefill = prefill_local(config, ref, address)  # a local run: its trials share this machine's frozen cache
    if prefill is not None:
        seconds["prefill"] = prefill
    started = connect_ray(address, log_to_driver=verbose >= 2)
    frames = []
    try:
        _stage("discrete arm: uniform baselines, hybrid, per-layer search")
        t = time.perf_counter()
        results = run_search(config, address=None, resume=resume, verbose=verbose)
        frames.append(results_frame(results, config.train.epochs))
        seconds["discrete"] = time.perf_counter() - t
        if config.darts.enabled and (frames[0]["status"] == "TERMINATED").any():
            from pefttune.darts.experiment import darts_frame, darts_started, run_darts

            _stage("DARTS arm: relaxation search, derive, retrain")
            t = time.perf_counter()
            try:
                run = run_darts(config, address=None, resume=resume and darts_started(config), verbose=verbose)
                frames.append(darts_frame(run.search).assign(kind="darts"))
                if run.retrain is not None:
                    frames.append(results_frame(run.retrain))
            except RuntimeError as err:  # no DARTS trial finished: the rest of the study stands
                print(f"DARTS arm failed: {err}", flush=True)
                frames.append(pd.DataFrame([{"status": "ERROR", "kind": "darts", "error": str(err)}]))
            seconds["darts"] = time.perf_counter() - t
    finally:
        if started:
            ray.shutdown()
    frame = pd.concat(frames, ignore_index=True)
    if "error" not in frame:
        frame["error"] = ""
    outcome = failure_summary(frame)
    path = experiment_path(config)
    if not (frames[0]["status"] == "TERMINATED").any():
        print("\n".join(outcome.lines + [f"no analysis: the discrete arm finished no trial (see {path}/errors.log)"]))
        seconds["total"] = time.perf_counter() - start
        return StudyResult(str(path), {}, seconds, 1, outcome.lines)
    _stage("analysis: ensembles, tables, statistics, plots, report")
    t = time.perf_counter()
    summary = analyze(path)
    seconds["analysis"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start
    print(format_comparison(summary))
    for key in ("1", "2", "3"):
        finding = summary.get("findings", {}).get(key)
        if finding:
            print(f"finding {key}: {finding.get('verdict')}")
            print(textwrap.fill(f"rule: {finding.get('rule', '')}", 120, initial_indent="  ", subsequent_indent="    "))
    files = summary.get("files", {})
    print(f"\nresults: {path}")
    if files.get("report"):
        print(f"report:  {files['report']}")
    print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()), flush=True)
    if outcome.lines:
        print("\n".join(outcome.lines), flush=True)
    return StudyResult(str(path), summary, seconds, outcome.exit_code, outcome.lines)
