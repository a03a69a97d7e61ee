"""Where an experiment stands (`pefttune status EXP`), read from the results store alone.

It works while the driver runs, after it finished and after it crashed: it reads what Ray
wrote to the experiment folder (:mod:`pefttune.analysis.store`), never the driver.

Per kind of trial (uniform, hybrid, discrete, frozen, darts, darts-derived): trials done,
running, pending and errored, and the best dev score so far; for the experiment: elapsed time
and an ETA.

Rules, stated so the numbers can be checked:

- *done*: completed, stopped early by ASHA, or rejected over budget; *pending*: pending or
  paused; *errored*: Ray status ERROR.
- *expected* trials of the discrete search come from the saved config when it can tell
  (``search.num_samples`` + one uniform trial per method + the hybrid); trials the searcher
  has not created yet count as pending. The replicates and DARTS experiments create all their
  trials when they start.
- *ETA* = mean wall time of the done trials x (pending + half the running trials) / the
  number of trials running now (at least 1). No ETA before a trial is done.
- A trial shown RUNNING while Ray's experiment state has not changed for ``stale_after``
  seconds (default 600) marks the experiment *interrupted*: the driver is gone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from pefttune.analysis.store import Experiment, open_experiment

DONE = ("completed", "stopped_early", "over_budget")
PENDING = ("pending", "paused")


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
    state: str  # running | finished | interrupted
    kinds: list[KindStatus] = field(default_factory=list)
    elapsed_s: float | None = None
    eta_s: float | None = None
    unseen: int = 0  # expected trials Ray has not created yet

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


def _expected_discrete(config: dict | None) -> int | None:
    """Trials the discrete arm will run, from the saved config (None when it cannot tell)."""
    if not config:
        return None
    try:
        search = config.get("search") or {}
        methods = [m for m in (config.get("methods") or {}) if m != "hybrid"]  # a hybrid candidate has no baseline
        fixed = len(methods) if search.get("uniform_baselines", True) else 0
        hybrid = search.get("hybrid", True)
        fixed += 1 if hybrid not in (False, None) and (hybrid != "candidates" or len(methods) > 1) else 0
        return int(search.get("num_samples", 0)) + fixed
    except (TypeError, ValueError, AttributeError):
        return None


def _state_age(experiment: Experiment) -> float | None:
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


def experiment_status(path, stale_after: float = 600.0) -> Status:
    """The status of the experiment folder ``path`` (local or URI); see the module docstring."""
    experiment = open_experiment(path)
    by_kind: dict[str, KindStatus] = {}
    starts, ends, durations = [], [], []
    better = (lambda a, b: a > b) if experiment.mode == "max" else (lambda a, b: a < b)
    for trial in experiment.trials:
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
    expected = _expected_discrete(experiment.config)
    seen = sum(1 for t in experiment.trials if t.experiment == "." and t.kind not in ("darts", "darts-derived"))
    unseen = max(0, expected - seen) if expected is not None else 0
    pending = sum(k.pending for k in kinds) + unseen

    age = _state_age(experiment)
    if running or pending:
        state = "interrupted" if age is not None and age > stale_after else "running"
    else:
        state = "finished"
    now = time.time()
    elapsed = None
    if starts:
        elapsed = (now if state == "running" else max(ends)) - min(starts)
    eta = None
    if durations and state == "running":
        eta = sum(durations) / len(durations) * (pending + 0.5 * running) / max(1, running)
    return Status(experiment.uri, experiment.metric, experiment.mode, state, kinds, elapsed, eta, unseen)


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f} min"


def format_status(status: Status) -> str:
    """A table no wider than 120 columns."""
    lines = [f"experiment {status.path}: {status.state}, elapsed {_minutes(status.elapsed_s)}, "
             f"ETA {_minutes(status.eta_s) if status.state == 'running' else '-'}"]
    header = f"  {'kind':<14} {'done':>5} {'running':>8} {'pending':>8} {'errored':>8}  best dev {status.metric} (trial)"
    lines.append(header)
    for k in status.kinds + [status.totals]:
        pending = k.pending if k.kind != "all" else k.pending
        best = "-" if k.best is None else f"{k.best:.4f} ({k.best_trial})"
        lines.append(f"  {k.kind:<14} {k.done:>5} {k.running:>8} {pending:>8} {k.errored:>8}  {best}")
    if status.unseen:
        lines.append(f"  ({status.unseen} expected trial(s) of the discrete arm not created yet, counted as pending)")
    return "\n".join(line[:120] for line in lines)
