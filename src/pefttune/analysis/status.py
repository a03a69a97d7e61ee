"""Where an experiment stands (`pefttune status EXP`), read from the study folder alone.

It works while the driver runs, after it finished and after it crashed: it reads what Ray
wrote to the experiment folder (:mod:`pefttune.analysis.store`) and the driver's heartbeat
(``heartbeat.json``, :mod:`pefttune.runtime.heartbeat`), never the driver itself.

Per kind of trial (uniform, hybrid, discrete, frozen, darts, darts-derived): trials done,
running, pending and errored, and the best dev score so far; for the experiment: its state,
the current stage, elapsed time and an ETA.

Rules, stated so the numbers can be checked:

- *done*: completed, stopped early by ASHA, or rejected over budget; *pending*: pending or
  paused; *errored*: Ray status ERROR.
- *expected* trials of the discrete search come from the saved config when it can tell
  (``search.num_samples`` + one uniform trial per method + the hybrid); trials the searcher
  has not created yet count as pending. The replicates and DARTS experiments create all their
  trials when they start.
- *state* with a heartbeat: ``running`` while the driver lives
  (:func:`pefttune.runtime.heartbeat.driver_alive`: on its host, its process exists; from
  another host, the heartbeat is at most ``heartbeat_stale_after`` seconds old, default 15);
  ``interrupted`` as soon as it does not while the heartbeat still says running (a killed
  driver), or when the heartbeat says so; ``finished`` / ``failed`` as the heartbeat says.
  Without a heartbeat (folders of older versions): a trial shown RUNNING while Ray's
  experiment state has not changed for ``stale_after`` seconds (default 600) marks the
  experiment ``interrupted``; nothing running or pending: ``finished``.
- *elapsed* with a heartbeat: from the driver's start to now while running, to its last
  heartbeat otherwise (the end when it finished or failed, the last sign of life when it was
  killed). Without one: from the first trial's start to now while running, else to the last
  trial's end.
- *ETA* (running only; none before a trial is done), with ``mean`` the mean wall time of the
  done trials and ``concurrency`` the config's ``search.max_concurrent`` (else the trials
  running now, at least 1):
  the stage in progress: ``mean x (pending + half the running trials) / max(1, running now)``;
  plus each stage not started yet (no Ray experiment folder of it): ``mean x its trials /
  concurrency``, its trials estimated from the saved config copy (``experiment.yaml``):

  * tune-lr (``tune-lr/``, with ``train.lr_grid``): ``fixed points x len(train.lr_grid)`` + ``references x
    len(train.reference_lr_grid)`` (default: the same grid);
    DARTS tune-lr (``tune-lr-darts/``): ``derived configurations x len(train.lr_grid)`` (one per
    variant with ``darts.retrain: per-seed``);
  * replicates (``replicates/``): ``fixed points x (len(train.seeds) - 1)`` + ``len(train.seeds)``
    for the frozen reference (``search.frozen_reference``) and again for the log-mel reference
    (``analysis.logmel_reference``) + ``min(search.replicate_top, search.num_samples) x
    (len(train.seeds) - 1)``; fixed points: one uniform trial per candidate method and the hybrid;
  * DARTS search (``darts/``, when ``darts.enabled``): ``len(darts.seeds) x max(1, len(darts.variants))``
    (darts.seeds defaults to train.seeds with ``darts.retrain: per-seed``);
  * DARTS retrain (``darts-retrain/``): one per search trial with ``per-seed``; otherwise
    ``derived placements x len(train.seeds)``, the derived
    placements being the distinct ones the finished DARTS search trials reported, or one per
    DARTS search trial before they finished (an upper bound).

  The analysis stage runs no trial and is not counted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import yaml

from pefttune.analysis.store import ResultsStore, open_results
from pefttune.runtime.heartbeat import HeartbeatRecord, driver_alive, read_heartbeat
from pefttune.schema import TrialKind
from pefttune.tuning import DARTS_TUNE_DIR, TUNE_DIR

DONE = ("completed", "stopped_early", "over_budget")
PENDING = ("pending", "paused")
#: The Ray experiment folders of the later stages, relative to the study folder.
REPLICATES_DIR, DARTS_DIR, RETRAIN_DIR = "replicates", "darts", "darts-retrain"


@dataclass
class KindStatus:
    kind: str
    done: int = 0
    running: int = 0
    pending: int = 0
    errored: int = 0
    best: float | None = None
    best_trial: str | None = None


@dataclass
class Status:
    path: str
    metric: str
    mode: str
    state: str  # running | finished | interrupted | failed
    kinds: list[KindStatus] = field(default_factory=list)
    elapsed_s: float | None = None
    eta_s: float | None = None
    unseen: int = 0  # expected trials Ray has not created yet
    stage: str | None = None  # the heartbeat's current stage (None: unknown, or none in progress)
    heartbeat: HeartbeatRecord | None = None
    upcoming: dict[str, int] = field(default_factory=dict)  # stage not started yet -> estimated trials
    heartbeat_age_s: float | None = None  # seconds since the last heartbeat

    @property
    def totals(self) -> KindStatus:
        total = KindStatus("all")
        for k in self.kinds:
            total.done += k.done
            total.running += k.running
            total.pending += k.pending
            total.errored += k.errored
        total.pending += self.unseen
        return total


def _int(value, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _section(config: dict | None, name: str) -> dict:
    value = (config or {}).get(name)
    return value if isinstance(value, dict) else {}


def _fixed_points(config: dict) -> int:
    """Uniform baselines (one per candidate method) and the hybrid, as the config sets them."""
    search = _section(config, "search")
    methods = [m for m in (config.get("methods") or {}) if m != "hybrid"]  # a hybrid candidate has no baseline
    fixed = len(methods) if search.get("uniform_baselines", True) else 0
    hybrid = search.get("hybrid", True)
    fixed += 1 if hybrid not in (False, None) and (hybrid != "candidates" or len(methods) > 1) else 0
    return fixed


def _expected_discrete(config: dict | None) -> int | None:
    """Trials the discrete arm will run, from the saved config (None when it cannot tell)."""
    if not config:
        return None
    try:
        return int(_section(config, "search").get("num_samples", 0)) + _fixed_points(config)
    except (TypeError, ValueError, AttributeError):
        return None


def _seeds(config: dict) -> int:
    train = _section(config, "train")
    seeds = train.get("seeds")
    return len(seeds) if isinstance(seeds, list) and seeds else 1


def expected_replicates(config: dict | None) -> int | None:
    """Trials of the replicates experiment (see the module docstring), None when the config cannot tell."""
    if not config:
        return None
    try:
        search, analysis = _section(config, "search"), _section(config, "analysis")
        seeds = _seeds(config)
        others = seeds - 1
        total = _fixed_points(config) * others
        total += seeds if search.get("frozen_reference", True) else 0
        total += seeds if analysis.get("logmel_reference", True) else 0
        total += min(_int(search.get("replicate_top", 2)), _int(search.get("num_samples", 0))) * others
        return total
    except (TypeError, ValueError, AttributeError):
        return None


def expected_darts_search(config: dict | None) -> int:
    """Trials of the DARTS search (0 when the DARTS arm is off or the config cannot tell)."""
    darts = _section(config, "darts")
    if not config or not darts.get("enabled", True):
        return 0
    seeds = darts.get("seeds")
    variants = darts.get("variants")
    if seeds is None and darts.get("retrain", "per-seed") == "per-seed":
        seeds = _section(config, "train").get("seeds")
    count = len(seeds) if isinstance(seeds, list) and seeds else 1
    return count * max(1, len(variants) if isinstance(variants, list) else 0)


def _derived_placements(experiment: ResultsStore | None, config: dict | None) -> int:
    """Distinct placements the DARTS search derived, or one per search trial before they finished."""
    searched = [t for t in (experiment.trials if experiment else []) if t.experiment == DARTS_DIR]
    if searched and all(t.outcome in DONE or t.outcome == "error" for t in searched):
        return len({str(t.value("derived_placement")) for t in searched
                    if t.outcome in DONE and t.value("derived_placement")})
    return len(searched) or expected_darts_search(config)


def upcoming_stages(experiment: ResultsStore | None, config: dict | None) -> dict[str, int]:
    """Stages that have not started (no Ray experiment folder yet) -> their estimated trials."""
    if not config:
        return {}
    present = set(experiment.ray_experiments) if experiment else set()
    out: dict[str, int] = {}
    grid = _section(config, "train").get("lr_grid")
    rates = len(grid) if isinstance(grid, list) else 0
    if rates and TUNE_DIR not in present:
        search, analysis = _section(config, "search"), _section(config, "analysis")
        references = bool(search.get("frozen_reference", True)) + bool(analysis.get("logmel_reference", True))
        reference_grid = _section(config, "train").get("reference_lr_grid")
        reference_rates = len(reference_grid) if isinstance(reference_grid, list) else rates
        out["tune-lr"] = _fixed_points(config) * rates + references * reference_rates
    if REPLICATES_DIR not in present:
        replicates = expected_replicates(config)
        if replicates:
            out["replicates"] = replicates
    darts = expected_darts_search(config)
    if darts and DARTS_DIR not in present:
        out["DARTS search"] = darts
    if darts and rates and DARTS_TUNE_DIR not in present:
        variants = _section(config, "darts").get("variants")
        per_seed = _section(config, "darts").get("retrain", "per-seed") == "per-seed"
        configurations = max(1, len(variants) if isinstance(variants, list) else 0) if per_seed else \
            _derived_placements(experiment, config)
        out["DARTS tune-lr"] = configurations * rates
    if darts and RETRAIN_DIR not in present:
        if _section(config, "darts").get("retrain", "per-seed") == "per-seed":
            out["DARTS retrain"] = darts
        else:
            derived = _derived_placements(experiment, config)
            if derived:
                out["DARTS retrain"] = derived * _seeds(config)
    return out


def _state_age(experiment: ResultsStore) -> float | None:
    """Seconds since Ray last wrote any experiment state under the experiment folder."""
    import pyarrow.fs as pafs

    newest = None
    for rel in experiment.ray_experiments:
        folder = experiment.root if rel == "." else f"{experiment.root}/{rel}"
        for info in experiment.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
            if info.base_name.startswith("experiment_state") and info.mtime is not None:
                stamp = info.mtime.timestamp()
                newest = stamp if newest is None else max(newest, stamp)
    return None if newest is None else time.time() - newest


def _saved_config(path) -> dict | None:
    """The config copy ``experiment.yaml`` of a folder Ray has not written to yet."""
    from pefttune.runtime.storage import read_storage_text

    text = str(path)
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    try:
        data = yaml.safe_load(read_storage_text(f"{text.rstrip('/')}/experiment.yaml") or "")
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def experiment_status(path, stale_after: float = 600.0, heartbeat_stale_after: float = 15.0,
                      now: float | None = None) -> Status:
    """The status of the experiment folder ``path`` (local or URI); see the module docstring."""
    record = read_heartbeat(path)
    try:
        experiment = open_results(path)
    except ValueError:
        if record is None:
            raise
        experiment = None  # the driver runs (or ran) a stage before the first Ray experiment
    config = experiment.config if experiment is not None else _saved_config(path)
    trials = experiment.trials if experiment is not None else []
    mode = experiment.mode if experiment is not None else "max"
    by_kind: dict[str, KindStatus] = {}
    starts, ends, durations = [], [], []
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    for trial in trials:
        status = by_kind.setdefault(trial.kind or "?", KindStatus(trial.kind or "?"))
        outcome = trial.outcome
        if outcome in DONE:
            status.done += 1
            if trial.wall_time_s:
                durations.append(trial.wall_time_s)
        elif outcome == "running":
            status.running += 1
        elif outcome in PENDING:
            status.pending += 1
        elif outcome == "error":
            status.errored += 1
        if outcome not in ("error", "over_budget"):
            score = experiment.score(trial, "dev")
            if score is not None and (status.best is None or better(score, status.best)):
                status.best, status.best_trial = score, trial.trial_id
        if trial.start_time:
            starts.append(trial.start_time)
            ends.append(trial.start_time + (trial.wall_time_s or 0.0))
    kinds = sorted(by_kind.values(), key=lambda k: k.kind)
    running = sum(k.running for k in kinds)
    expected = _expected_discrete(config)
    seen = sum(1 for t in trials if t.experiment == "." and t.kind not in (TrialKind.DARTS, TrialKind.DARTS_DERIVED))
    unseen = max(0, expected - seen) if expected is not None else 0
    pending = sum(k.pending for k in kinds) + unseen

    now = time.time() if now is None else now
    elapsed = None
    if record is not None:
        if record.state == "running":
            state = "running" if driver_alive(record, now, heartbeat_stale_after) else "interrupted"
        else:
            state = record.state
        elapsed = max(0.0, (now if state == "running" else record.updated) - record.started)
    else:
        age = _state_age(experiment)
        if running or pending:
            state = "interrupted" if age is not None and age > stale_after else "running"
        else:
            state = "finished"
        if starts:
            elapsed = (now if state == "running" else max(ends)) - min(starts)
    upcoming = upcoming_stages(experiment, config) if state == "running" else {}
    eta = None
    if durations and state == "running":
        mean = sum(durations) / len(durations)
        concurrency = max(1, _int(_section(config, "search").get("max_concurrent")) or running)
        eta = mean * (pending + 0.5 * running) / max(1, running) + mean * sum(upcoming.values()) / concurrency
    return Status(experiment.uri if experiment is not None else str(path),
                  experiment.metric if experiment is not None else str(_section(config, "train").get("metric") or "-"),
                  mode, state, kinds, elapsed, eta, unseen,
                  stage=record.stage if record is not None else None, heartbeat=record,
                  upcoming=upcoming, heartbeat_age_s=None if record is None else max(0.0, now - record.updated))


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f} min"


def _driver_line(status: Status) -> str | None:
    """The heartbeat's facts: stage, driver, last sign of life."""
    record = status.heartbeat
    if record is None:
        return None
    stage = f"stage {status.stage}" if status.stage else (
        f"after stage {record.stages[-1].get('name')}" if record.stages else "no stage yet")
    age = "-" if status.heartbeat_age_s is None else f"{status.heartbeat_age_s:.0f} s ago"
    if status.state == "running":
        started = f" (for {_minutes(time.time() - record.stage_started)})" if record.stage_started else ""
        return f"  {stage}{started}; driver pid {record.pid} on {record.host}, last heartbeat {age}"
    if status.state == "interrupted" and record.state == "running":
        return f"  interrupted in {stage}: driver pid {record.pid} on {record.host} is gone; last heartbeat {age}"
    if status.state == "failed":
        return f"  failed in {stage}; the driver's traceback is in errors.log"
    if status.state == "finished":
        return f"  finished, {len(record.stages)} stage(s)"
    return f"  {status.state} in {stage}"


def format_status(status: Status) -> str:
    """A table no wider than 120 columns."""
    tail = (f": {status.state}, elapsed {_minutes(status.elapsed_s)}, "
            f"ETA {_minutes(status.eta_s) if status.state == 'running' else '-'}")
    room = 120 - len("experiment ") - len(tail)
    path = status.path if len(status.path) <= room else "..." + status.path[-max(0, room - 3):]
    lines = [f"experiment {path}{tail}"]
    driver = _driver_line(status)
    if driver:
        lines.append(driver)
    header = f"  {'kind':<14} {'done':>5} {'running':>8} {'pending':>8} {'errored':>8}  best dev {status.metric} (trial)"
    lines.append(header)
    for k in status.kinds + [status.totals]:
        best = "-" if k.best is None else f"{k.best:.4f} ({k.best_trial})"
        lines.append(f"  {k.kind:<14} {k.done:>5} {k.running:>8} {k.pending:>8} {k.errored:>8}  {best}")
    if status.unseen:
        lines.append(f"  ({status.unseen} expected trial(s) of the discrete arm not created yet, counted as pending)")
    if status.upcoming:
        lines.append("  stages to come (estimated trials, in the ETA): "
                     + ", ".join(f"{name} {count}" for name, count in status.upcoming.items()))
    return "\n".join(line[:120] for line in lines)
