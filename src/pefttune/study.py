"""The whole study in one call: what `pefttune run` does, as a list of named stages.

======================  =========================================================================
stage                   what it does
======================  =========================================================================
``data``                the corpus is made on first use (synthesized offline for the embedded
                        default) and every audio file checked
``prefill``             a local run fills the frozen cache once, before the trials
``tune-lr``             the learning-rate protocol: each fixed configuration's rate chosen on dev
                        from ``train.lr_grid`` with the first seed (:mod:`pefttune.tuning`)
``discrete``            uniform baselines, the hybrid and the Optuna/ASHA per-layer search
                        (:func:`pefttune.search.run.run_search`)
``replicates``          the configurations a finding compares, once per other seed, and the
                        references (:func:`pefttune.search.replicates.run_replicates`)
``darts-search``        the DARTS relaxation (:func:`pefttune.darts.run.run_darts_search`)
``darts-retrain``       each derived placement trained like the baselines, once per seed, at the
                        rate the protocol chose for it
``more-seeds``          while a finding is open, one more seed of what it compares, up to
                        ``analysis.max_seeds`` (:mod:`pefttune.more_seeds`; off by default)
``analysis``            ensembles, tables, statistics, plots and the report on the paper's three
                        findings (:func:`pefttune.analysis.report.analyze`)
======================  =========================================================================

Every stage is resumable: ``resume=True`` (``pefttune run --resume``) runs each stage again,
and each finishes what it left (Ray's experiment state, the grid plans stored as data, the
corpus and cache files written whole). Everything lands in ``<storage>/<name>/`` (default
``./pefttune-results/<name>/``); one Ray instance serves the trial stages.

Example::

    from pefttune.study import run_study
    result = run_study()             # the embedded default study
    print(result.seconds)            # {'data': ..., 'prefill': ..., 'discrete': ..., ..., 'total': ...}
"""
from __future__ import annotations

import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from pefttune.config import StudyConfig, resolve_config
from pefttune.schema import TrialKind


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


@dataclass
class StudyRun:
    """What the stages of one study share."""

    config: StudyConfig
    path: str  # <storage>/<name>
    address: str | None = None
    resume: bool = False
    verbose: int = 1
    data: object | None = None  # DataRef, from the data stage
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)  # stage -> one row per trial
    darts_search: object | None = None  # the DARTS search's ResultGrid
    lr_choices: object | None = None  # the tune-lr stage's LrChoices
    summary: dict = field(default_factory=dict)

    @property
    def discrete_finished(self) -> bool:
        frame = self.frames.get("discrete")
        return frame is not None and bool((frame["status"] == "TERMINATED").any())


@dataclass(frozen=True)
class Stage:
    """One named step of the study; ``ray``: it runs Ray trials (the study connects once)."""

    name: str
    title: str
    run: Callable[[StudyRun], None]
    ray: bool = False
    when: Callable[[StudyConfig], bool] = lambda config: True  # noqa: E731 - the stage is part of this study


def stage_data(study: StudyRun) -> None:
    from pefttune.data.loaders import prepare_data

    study.data = prepare_data(study.config)  # made and every audio file checked before Ray starts (errors: exit 2)


def stage_prefill(study: StudyRun) -> None:
    from pefttune.trainables.setup import prefill_local

    prefill_local(study.config, study.data, study.address)  # a local run: its trials share this machine's cache


def stage_tune_lr(study: StudyRun) -> None:
    from pefttune.search.tune_lr import run_tune_lr

    study.lr_choices = run_tune_lr(study.config, study.resume, verbose=study.verbose)


def stage_discrete(study: StudyRun) -> None:
    from pefttune.runtime.study_dir import CONFIG_COPY, results_frame
    from pefttune.runtime.storage import storage_exists
    from pefttune.search.run import run_search

    resume = study.resume and storage_exists(f"{study.path}/{CONFIG_COPY}")  # it had started
    results = run_search(study.config, address=None, resume=resume, verbose=study.verbose, replicates=False,
                         lr_choices=study.lr_choices)
    study.frames["discrete"] = results_frame(results, study.config.train.epochs)


def stage_replicates(study: StudyRun) -> None:
    from pefttune.runtime.study_dir import results_frame
    from pefttune.search.replicates import run_replicates

    results = run_replicates(study.config, study.frames["discrete"], study.resume, verbose=study.verbose)
    if results is not None:
        study.frames["replicates"] = results_frame(results, study.config.train.epochs)


def stage_darts_search(study: StudyRun) -> None:
    from pefttune.darts.run import darts_frame, prepare_directories, run_darts_search, validate

    if not (study.config.darts.enabled and study.discrete_finished):
        return
    validate(study.config)
    prepare_directories(study.config, study.path, study.resume and _holds(study, "darts"))
    try:
        study.darts_search = run_darts_search(study.config, study.resume, verbose=study.verbose,
                                              local=study.address is None)
        study.frames["darts-search"] = darts_frame(study.darts_search).assign(kind=TrialKind.DARTS.value)
    except RuntimeError as err:  # no DARTS trial finished: the rest of the study stands
        print(f"DARTS arm failed: {err}", flush=True)
        study.frames["darts-search"] = pd.DataFrame([{"status": "ERROR", "kind": TrialKind.DARTS.value,
                                                      "error": str(err)}])


def stage_darts_retrain(study: StudyRun) -> None:
    from pefttune.darts.run import run_darts_retrain
    from pefttune.runtime.study_dir import results_frame

    if study.darts_search is None:
        return
    study.frames["darts-retrain"] = results_frame(run_darts_retrain(study.config, study.darts_search, study.resume,
                                                                    verbose=study.verbose))


def stage_more_seeds(study: StudyRun) -> None:
    from functools import partial

    from pefttune.analysis.report import current_findings
    from pefttune.more_seeds import more_seeds

    if study.discrete_finished:
        more_seeds(study.config, study.path, study.resume, study.verbose, partial(current_findings, study.path))


def stage_analysis(study: StudyRun) -> None:
    from pefttune.analysis.report import analyze
    from pefttune.runtime.tracking import log_study, study_files

    if study.discrete_finished:
        study.summary = analyze(study.path)
        log_study(study.config, study.path, study_files(study.summary))  # report, tables, plots


def _holds(study: StudyRun, sub: str) -> bool:
    from pefttune.runtime.study_dir import holds_run

    return holds_run(f"{study.path}/{sub}")


#: The study, in order.
STAGES: tuple[Stage, ...] = (
    Stage("data", "data: corpus and audio check", stage_data),
    Stage("prefill", "prefill: the frozen cache", stage_prefill),
    Stage("tune-lr", "learning rates: each fixed configuration's chosen on dev (train.lr_grid)", stage_tune_lr,
          ray=True, when=lambda config: bool(config.train.lr_grid)),
    Stage("discrete", "discrete arm: uniform baselines, hybrid, per-layer search", stage_discrete, ray=True),
    Stage("replicates", "replicates: every compared configuration once per seed", stage_replicates, ray=True),
    Stage("darts-search", "DARTS arm: relaxation search", stage_darts_search, ray=True),
    Stage("darts-retrain", "DARTS arm: derived placements retrained", stage_darts_retrain, ray=True),
    Stage("more-seeds", "more seeds: where a finding is still open (analysis.max_seeds)", stage_more_seeds, ray=True,
          when=lambda config: config.analysis.max_seeds is not None),
    Stage("analysis", "analysis: ensembles, tables, statistics, plots, report", stage_analysis),
)


def _banner(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def run_stages(study: StudyRun, stages: tuple[Stage, ...] = STAGES) -> dict[str, float]:
    """Run ``stages`` in order (Ray connected for the trial stages only); their wall seconds.

    The driver's heartbeat (``<study>/heartbeat.json``: pid, host, stage, refreshed every 2 s)
    tells ``pefttune status`` where the study is, and that it was interrupted as soon as the
    driver is gone. A stage that raises ends the study with
    :class:`~pefttune.runtime.heartbeat.StageFailed` naming it (traceback in ``errors.log``)."""
    import ray

    from pefttune.runtime.heartbeat import Heartbeat

    seconds: dict[str, float] = {}
    started = False
    try:
        with Heartbeat(study.path) as beat:
            for stage in (s for s in stages if s.when(study.config)):
                beat.stage(stage.name)
                started = _run_stage(study, stage, started, seconds)
    finally:
        if started:
            ray.shutdown()
    return seconds


def _run_stage(study: StudyRun, stage: Stage, started: bool, seconds: dict[str, float]) -> bool:
    """One stage (Ray connected first when it runs trials, shut down after the last); whether
    this study's Ray is running."""
    import ray

    from pefttune.runtime.cluster import connect_ray

    if stage.ray and not ray.is_initialized():
        started = connect_ray(study.address, log_to_driver=study.verbose >= 2)
    elif not stage.ray and started:
        ray.shutdown()
        started = False
    if stage.ray or stage.name == "analysis":
        _banner(stage.title)
    t = time.perf_counter()
    stage.run(study)
    seconds[stage.name] = time.perf_counter() - t
    return started


def run_study(
    config: StudyConfig | str | Path | None = None,
    address: str | None = None,
    resume: bool = False,
    name: str | None = None,
    verbose: int = 1,
) -> StudyResult:
    """Run the stages of ``config`` (default: embedded) into ``<storage>/<name>/``.

    ``verbose``: 0 quiet, 1 pefttune's console, 2 Ray's stream as well (``-v``). The result's
    ``exit_code`` is non-zero when no trial finished or every trial of a kind failed; the
    analysis is skipped when the discrete arm finished no trial.
    """
    from pefttune.runtime.console import failure_summary
    from pefttune.runtime.study_dir import refuse_existing, study_dir
    from pefttune.runtime.tracking import end_study, start_study
    from pefttune.search.run import build_search_plan

    config = resolve_config(config, name)
    if config.tasks:
        raise ValueError(f"tasks: {config.name} is a suite of {list(config.tasks)}; run it with "
                         "pefttune.suite.run_suite (what `pefttune run` does for such a config)")
    start = time.perf_counter()
    print(f"pefttune run: {config.name}: backbone {config.backbone}, {config.data.source}/{config.data.task}, "
          f"candidates {sorted(config.methods)}, budget {config.budget}", flush=True)
    build_search_plan(config)  # every check that needs no Ray (errors name the field: exit 2)
    path = study_dir(config)
    if not resume:
        refuse_existing(path, "a study")
    study = StudyRun(config, path, address, resume, verbose)
    start_study(config, path, resume)  # the tracker's run of the study (tracking: ...), found again on resume
    try:
        seconds = run_stages(study)
    except BaseException as err:
        end_study(config, path, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    seconds["total"] = time.perf_counter() - start
    frame = pd.concat([f for f in study.frames.values() if len(f)], ignore_index=True)
    if "error" not in frame:
        frame["error"] = ""
    outcome = failure_summary(frame)
    end_study(config, path, "FINISHED" if study.discrete_finished and not outcome.exit_code else "FAILED")
    if not study.discrete_finished:
        print("\n".join(outcome.lines + [f"no analysis: the discrete arm finished no trial (see {path}/errors.log)"]))
        return StudyResult(str(path), {}, seconds, 1, outcome.lines)
    print_findings(study.summary)
    files = study.summary.get("files", {})
    print(f"\nresults: {path}")
    if files.get("report"):
        print(f"report:  {files['report']}")
    print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()), flush=True)
    if outcome.lines:
        print("\n".join(outcome.lines), flush=True)
    return StudyResult(str(path), study.summary, seconds, outcome.exit_code, outcome.lines)


def print_findings(summary: dict) -> None:
    from pefttune.analysis.report import format_comparison

    print(format_comparison(summary))
    for key in ("1", "2", "3"):
        finding = summary.get("findings", {}).get(key)
        if finding:
            print(f"finding {key}: {finding.get('verdict')}")
            print(textwrap.fill(f"rule: {finding.get('rule', '')}", 120, initial_indent="  ", subsequent_indent="    "))
