"""A suite: the study on several tasks with the same candidates and budget, one table.

The paper reports several SUPERB tasks side by side. A config with ``tasks`` (a list of task
names, or a mapping task -> overrides of the config, e.g. ``pr: {train: {epochs: 40}}``), or
``pefttune run --suite``, runs :func:`pefttune.study.run_study` once per task into
``<storage>/<name>/<task>/`` (each a complete study with its own report) and then writes:

- ``<storage>/<name>/suite.md``: configuration rows (frozen, log-mel, each uniform method,
  hybrid, best discrete, DARTS-derived, majority vote, best ensemble) by task columns, each
  cell the mean over seeds with its 95% Student-t interval; the three findings per task with
  their rules, and over all tasks;
- ``<storage>/<name>/suite.parquet`` (+ ``.csv``): one row per task, configuration and seed:
  ``task, row, config_id, seed, metric, score`` (test scores).

Selections use dev only: "best discrete" and "DARTS-derived" are the configurations of their
kind with the best mean dev score, "best ensemble" the strategy with the best mean dev score
over the per-seed ensembles. ``--resume`` skips finished tasks and resumes the interrupted one.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from pefttune.analysis.findings import across_tasks, ensembles
from pefttune.analysis.store import analysis_dir, local_output_dir
from pefttune.config import StudyConfig, resolve_config, suite_path, task_configs
from pefttune.schema import TrialKind

#: The tasks of ``pefttune run --suite`` when the config names none (the synthesized corpora).
DEFAULT_TASKS = ("ks", "sid", "pr")
SUITE_FILE = "suite.md"
SUITE_TABLE = "suite"


@dataclass
class SuiteResult:
    path: str
    studies: dict = field(default_factory=dict)  # task -> StudyResult (None: finished before, reused)
    seconds: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    exit_code: int = 0


def run_suite(config: StudyConfig | str | Path | None = None, address: str | None = None, resume: bool = False,
              name: str | None = None, verbose: int = 1, tasks=None) -> SuiteResult:
    """Run the study on every task of the suite, then write ``suite.md`` and the ``suite`` table."""
    from pefttune.runtime.study_dir import refuse_existing, study_dir
    from pefttune.runtime.heartbeat import Heartbeat

    config = resolve_config(config, name)
    configs = task_configs(config, tasks or config.tasks or list(DEFAULT_TASKS))
    root = suite_path(config)
    if not resume:  # refuse before any compute: every task folder named
        for task_config in configs.values():
            refuse_existing(study_dir(task_config), "a study of this suite")
    result = SuiteResult(root)
    start = time.perf_counter()
    with Heartbeat(root) as beat:  # the suite's own: which task runs (each study has its own too)
        for task, task_config in configs.items():
            beat.stage(f"task {task}")
            _run_task(result, task, list(configs), task_config, address, resume, verbose)
        beat.stage("suite table")
        result.files = write_suite(root, {task: study_dir(c) for task, c in configs.items()})
    result.seconds["total"] = time.perf_counter() - start
    print(f"\nsuite: {result.files.get('suite', root)}")
    print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items()), flush=True)
    return result


# -- the table -----------------------------------------------------------------------------------


def _summary(path: str) -> dict:
    file = analysis_dir(path) / "summary.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def _best(configs, kind: str, mode: str):
    rows = configs[(configs["kind"] == kind) & configs["dev_mean"].notna()]
    if rows.empty:
        return None
    return rows.loc[rows["dev_mean"].idxmax() if mode == "max" else rows["dev_mean"].idxmin()]


def task_rows(task: str, path: str):
    """Per-seed test scores of the suite's rows for one task's finished study."""
    import pandas as pd

    summary = _summary(path)
    tables = analysis_dir(path) / "tables"
    if not summary or not (tables / "configs.parquet").is_file():
        return pd.DataFrame(columns=["task", "row", "config_id", "seed", "metric", "score"])
    configs = pd.read_parquet(tables / "configs.parquet")
    trials = pd.read_parquet(tables / "trials.parquet").set_index("trial_id")
    metric, mode = summary.get("metric", "accuracy"), summary.get("mode", "max")
    chosen = []
    for kind, label in ((TrialKind.FROZEN, "frozen (head only)"), (TrialKind.LOG_MEL, "log-mel (no encoder)")):
        chosen += [(label, row) for _, row in configs[configs["kind"] == kind].iterrows()]
    for _, row in configs[configs["kind"] == TrialKind.UNIFORM].sort_values("method").iterrows():
        chosen.append((f"uniform {row['method']}", row))
    hybrid = configs[configs["kind"] == TrialKind.HYBRID]
    chosen += [("hybrid (merged in each layer)", row) for _, row in hybrid.iterrows()]
    for kind, label in ((TrialKind.DISCRETE, "best discrete (by dev)"),
                        (TrialKind.DARTS_DERIVED, "DARTS-derived (by dev)")):
        best = _best(configs, kind, mode)
        if best is not None:
            chosen.append((label, best))
    records = []
    for label, row in chosen:
        for trial_id in str(row["trial_ids"]).split(","):
            if trial_id in trials.index:
                trial = trials.loc[trial_id]
                records.append({"task": task, "row": label, "config_id": row["config_id"],
                                "seed": _int(trial.get("seed")), "metric": metric, "score": float(trial["test_score"])})
    records += ensembles.suite_records(task, summary.get("findings", {}).get(ensembles.KEY, {}), metric, mode)
    return pd.DataFrame.from_records(records, columns=["task", "row", "config_id", "seed", "metric", "score"])


def _int(value):
    try:
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)
    except (TypeError, ValueError):
        return None


ROW_ORDER = ("frozen (head only)", "log-mel (no encoder)", "uniform", "hybrid (merged in each layer)",
             "best discrete (by dev)", "DARTS-derived (by dev)", "majority vote", "best ensemble (by dev)")


def _row_key(label: str) -> tuple:
    prefix = next((i for i, p in enumerate(ROW_ORDER) if label.startswith(p)), len(ROW_ORDER))
    return prefix, label


def suite_frame(task_dirs: dict[str, str]):
    import pandas as pd

    frames = [task_rows(task, path) for task, path in task_dirs.items()]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["task", "row", "config_id", "seed", "metric", "score"])
    return pd.concat(frames, ignore_index=True)


def _run_task(result: SuiteResult, task: str, tasks: list[str], config: StudyConfig, address: str | None,
              resume: bool, verbose: int) -> None:
    """One task's study into ``result`` (a task finished before is kept on resume)."""
    from pefttune.runtime.study_dir import study_dir
    from pefttune.runtime.storage import storage_exists
    from pefttune.study import run_study

    path = study_dir(config)
    if resume and (analysis_dir(path) / "summary.json").is_file():
        print(f"\n##### suite task {task}: finished before, kept ({path})", flush=True)
        result.studies[task] = None
        return
    print(f"\n##### suite task {task} ({tasks.index(task) + 1} of {len(tasks)}) #####", flush=True)
    t = time.perf_counter()
    study = run_study(config, address=address, resume=resume and storage_exists(path), verbose=verbose)
    result.studies[task] = study
    result.seconds[task] = time.perf_counter() - t
    result.exit_code = max(result.exit_code, study.exit_code)


def write_suite(root: str, task_dirs: dict[str, str]) -> dict:
    """Write ``suite.md`` and the ``suite`` table (parquet + csv) under ``root``."""
    from pefttune.analysis.intervals import seed_summary
    from pefttune.runtime.storage import atomic_write_text

    frame = suite_frame(task_dirs)
    out = local_output_dir(root)  # the suite folder itself, or ./pefttune-analysis/<suite> for remote storage
    out.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out / f"{SUITE_TABLE}.parquet", index=False)
    frame.to_csv(out / f"{SUITE_TABLE}.csv", index=False)
    tasks = list(task_dirs)
    summaries = {task: _summary(path) for task, path in task_dirs.items()}
    metrics = {t: (summaries[t].get("metric") or "-") for t in tasks}
    lines = ["# pefttune suite", "",
             "Test score per configuration and task: mean over training seeds [95% Student-t interval] (n seeds). "
             "Rows chosen by dev only. Per task, the study's own report has the paired comparisons.", "",
             "| configuration | " + " | ".join(f"{t} ({metrics[t]})" for t in tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for label in sorted(set(frame["row"]), key=_row_key):
        cells = []
        for task in tasks:
            scores = frame[(frame["row"] == label) & (frame["task"] == task)]["score"].tolist()
            if not scores:
                cells.append("-")
                continue
            s = seed_summary(scores)
            interval = f" [{s.ci_low:.3f}, {s.ci_high:.3f}]" if s.n > 1 else f" ({s.note})"
            cells.append(f"{s.mean:.3f}{interval} (n={s.n})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    findings, overall = across_tasks.render(summaries)
    lines += findings
    atomic_write_text(str(out / SUITE_FILE), "\n".join(lines) + "\n")
    atomic_write_text(str(out / "suite.json"), json.dumps({"tasks": task_dirs, "findings": overall}, indent=2) + "\n")
    return {"suite": str(out / SUITE_FILE), "table": str(out / f"{SUITE_TABLE}.parquet")}
