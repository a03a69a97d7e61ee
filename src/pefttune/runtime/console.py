"""What a person sees while an experiment runs, and how a run ends.

By default (verbosity 1) Ray's own console stream is replaced by:

- one line per finished trial: id, kind, placement (short form), dev and test score, minutes;
- a live progress line: stage, trials done/total, running, errored, best so far, ETA
  (rewritten in place on a terminal, printed every ``interval`` seconds otherwise);
- one short line per failed trial attempt; the full traceback goes to ``errors.log`` in the
  experiment folder, never to the console.

With ``-v`` (verbosity 2) Ray's status tables, checkpoint lines and the workers' output
(transformers' weight-loading bars among them) come back, with Ray's notice on token
authentication and Optuna's line on the study it created. Ray's files in the experiment
(``result.json``, ``error.txt``, ...) are complete either way.

:func:`failure_summary` groups identical trial errors and decides the exit status: a run
fails (non-zero) when no trial finished, or when every trial of a kind failed.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import TextIO

import pandas as pd
from ray.tune import Callback

from pefttune.runtime.storage import read_storage_text, write_storage_text
from pefttune.schema import TrialKind, metric_key

ERRORS_LOG = "errors.log"
WIDTH = 120  # the summary and the trial lines fit in this many columns

#: Loggers whose records would put Ray's tracebacks and status lines on the console.
_RAY_LOGGERS = ("ray", "ray.tune", "ray.train", "ray.air")
#: Loggers whose info lines ("A new study created in RDB with name: ...") stay off the console.
_INFO_LOGGERS = ("optuna",)
#: Warnings that say nothing a user can act on: Ray's note that pefttune's search space (a
#: define-by-run function) took over a second on a busy machine.
_QUIET_WARNINGS = ("Define-by-run function passed in the `space` argument took",)


def _fmt(value, digits: int = 3) -> str:
    value = _number(value)
    return "-" if value is None else f"{value:.{digits}f}"


def _number(value) -> float | None:
    """``value`` as a finite-or-infinite float; None for NaN and for anything that is not a number
    (a tuple, a dict, a string that does not parse, ...)."""
    try:
        value = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return None if value != value else value


def _text(value, default: str = "?") -> str:
    """Any value as display text (None: ``default``); never raises."""
    if value is None:
        return default
    if isinstance(value, str):
        return value
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - a value whose __str__ fails still gets a line
        return f"<{type(value).__name__}>"


def _clip(text: str, width: int) -> str:
    text = str(text)
    return text if len(text) <= width else text[: max(0, width - 3)] + "..."


def last_error_line(text) -> str:
    """The line of a traceback that names the exception (``AudioReadError: cannot ...``);
    ``text`` may be any value (an exception, NaN from a table): it is shown as text."""
    if not isinstance(text, str):
        text = "" if text is None or (isinstance(text, float) and text != text) else _text(text, "")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line
    return lines[-1] if lines else "unknown error"


@dataclass
class Console:
    """Prints trial lines and the progress line; a Ray Tune callback is built on it
    (:meth:`callback`), so it can be tested without Ray."""

    stage: str
    metric: str  # the task metric, e.g. accuracy
    mode: str  # max | min
    total: int | None = None  # trials expected in this stage
    study_dir: str | None = None  # where errors.log goes
    stream: TextIO | None = None  # None: sys.stdout at the time of writing (so the console pickles)
    interval: float = 30.0
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    errored: int = 0
    running: set = field(default_factory=set)
    best: float | None = None
    durations: list = field(default_factory=list)
    _last_progress: float | None = None
    _live: bool = False

    # -- events ------------------------------------------------------------------------------
    def trial_started(self, trial_id: str) -> None:
        self.running.add(trial_id)

    def trial_finished(self, trial_id: str, config: dict, result: dict) -> None:
        self.running.discard(trial_id)
        self.done += 1
        config, result = config if isinstance(config, dict) else {}, result if isinstance(result, dict) else {}
        dev = result.get(metric_key("dev", self.metric, best=True), result.get(metric_key("dev", self.metric)))
        test = result.get(metric_key("test", self.metric))
        seconds = _number(result.get("time_total_s")) or 0.0
        self.durations.append(seconds)
        if result.get("over_budget"):
            note = "over budget, not trained"
        else:
            note = f"dev {_fmt(dev)} test {_fmt(test)} {seconds / 60:5.1f} min"
            self._update_best(dev)
        kind = _text(config.get("kind") or result.get("kind"))
        if config.get("seed") is not None and kind != TrialKind.DARTS:
            kind = f"{kind} s{_text(config.get('seed'))}"
        placement = _text(result.get("placement_short") or result.get("derived_placement_short"), "")
        head = f"{_text(trial_id):<10} {kind:<16} "
        room = WIDTH - len(head) - len(note) - 2
        self.line(f"{head}{_clip(placement, room):<{max(room, 0)}}  {note}")

    def trial_failed(self, trial_id: str, config: dict, error_text: str | None, final: bool = True) -> None:
        if final:
            self.running.discard(trial_id)
            self.errored += 1
        config = config if isinstance(config, dict) else {}
        self.log_error(trial_id, config, error_text)
        what = "failed" if final else "failed (retrying)"
        kind = _text(config.get("kind"))
        self.line(_clip(f"{_text(trial_id):<10} {kind:<16} {what}: {last_error_line(error_text)}", WIDTH))

    def result(self, result: dict) -> None:
        if isinstance(result, dict) and not result.get("over_budget"):
            self._update_best(result.get(metric_key("dev", self.metric, best=True)))

    def _update_best(self, value) -> None:
        value = _number(value)
        if value is None:
            return
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best = value

    # -- output ------------------------------------------------------------------------------
    def eta_seconds(self) -> float | None:
        if self.total is None or not self.durations:
            return None
        left = max(0, self.total - self.done - self.errored)
        elapsed = time.monotonic() - self.started
        finished = self.done + self.errored
        return elapsed / finished * left if finished else None

    def progress_text(self) -> str:
        total = "?" if self.total is None else str(self.total)
        eta = self.eta_seconds()
        parts = [
            f"[{self.stage}] trials {self.done}/{total} done",
            f"{len(self.running)} running",
            f"{self.errored} errored",
            f"best dev {self.metric} {_fmt(self.best)}",
            f"elapsed {(time.monotonic() - self.started) / 60:.1f} min",
            f"ETA {eta / 60:.1f} min" if eta is not None else "ETA -",
        ]
        return _clip(", ".join(parts), WIDTH)

    def progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and self._last_progress is not None and now - self._last_progress < self.interval:
            return
        self._last_progress = now
        text = self.progress_text()
        if self._isatty():
            self.out.write("\r" + text.ljust(WIDTH)[:WIDTH])
            self._live = True
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def line(self, text: str) -> None:
        if self._live:  # end the live line first
            self.out.write("\r" + " " * WIDTH + "\r")
            self._live = False
        self.out.write(text + "\n")
        self.out.flush()

    def close(self) -> None:
        if self._live:
            self.out.write("\n")
            self._live = False
        self.out.flush()

    @property
    def out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stdout

    def _isatty(self) -> bool:
        return bool(getattr(self.out, "isatty", lambda: False)())

    def log_error(self, trial_id: str, config: dict, error_text: str | None) -> None:
        """Append the full traceback to ``<experiment>/errors.log``."""
        if not self.study_dir:
            return
        path = f"{self.study_dir}/{ERRORS_LOG}"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with contextlib.suppress(Exception):  # the log must never fail the run
            entry = (f"=== {stamp} [{self.stage}] trial {_text(trial_id)} kind={_text(config.get('kind'))} "
                     f"placement={_text(config.get('placement'), '')}\n{_text(error_text, '').rstrip()}\n\n")
            write_storage_text(path, (read_storage_text(path) or "") + entry)

    def callback(self) -> "ConsoleCallback":
        """A ``ray.tune.Callback`` that feeds this console."""
        return ConsoleCallback(self)


def _never_raises(hook):
    """A console hook that cannot fail the run: an error in it becomes one console line."""
    @functools.wraps(hook)
    def guarded(self, *args, **kwargs):
        try:
            return hook(self, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - what is shown must never stop the trials
            with contextlib.suppress(Exception):
                self.console.line(_clip(f"(console: {hook.__name__}: {type(err).__name__}: {err})", WIDTH))
            return None
    return guarded


class ConsoleCallback(Callback):
    """Ray Tune events to a :class:`Console` (module level: Ray pickles it with the run config).
    No hook raises: the console only shows, it never stops a run."""

    def __init__(self, console: Console):
        self.console = console

    @_never_raises
    def on_trial_start(self, iteration, trials, trial, **info):
        self.console.trial_started(trial.trial_id)

    @_never_raises
    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.console.result(result)

    @_never_raises
    def on_trial_complete(self, iteration, trials, trial, **info):
        self.console.trial_finished(trial.trial_id, trial.config or {}, trial.last_result or {})

    @_never_raises
    def on_trial_error(self, iteration, trials, trial, **info):
        self.console.trial_failed(trial.trial_id, trial.config or {}, _error_text(trial))

    @_never_raises
    def on_trial_recover(self, iteration, trials, trial, **info):
        self.console.trial_failed(trial.trial_id, trial.config or {}, _error_text(trial), final=False)

    @_never_raises
    def on_step_end(self, iteration, trials, **info):
        self.console.progress()

    @_never_raises
    def on_experiment_end(self, trials, **info):
        self.console.progress(force=True)
        self.console.close()


def _error_text(trial) -> str | None:
    """The trial's last failure: Ray writes ``error.txt`` locally first (``trial.error_file``)
    and syncs it to the experiment storage later (``trial.get_error()``)."""
    with contextlib.suppress(Exception):
        text = None
        if trial.error_file and os.path.exists(trial.error_file):
            with open(trial.error_file, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        text = text or trial.get_error()
        if text:
            # error.txt holds every failure of the trial; the last one is what ended it
            blocks = text.split("Failure # ")
            return "Failure # " + blocks[-1] if len(blocks) > 1 else text
    return None


@contextlib.contextmanager
def quiet_ray_loggers(verbose: int):
    """Below ``-v``, keep Ray's driver-side log records (trial tracebacks, status), Optuna's info
    lines (a study created or loaded) and Ray's note on a slow search space off the console;
    Optuna's warnings still show."""
    if verbose >= 2:
        yield
        return
    loggers = [(logging.getLogger(name), logging.CRITICAL) for name in _RAY_LOGGERS]
    loggers += [(logging.getLogger(name), logging.WARNING) for name in _INFO_LOGGERS]
    levels = [logger.level for logger, _ in loggers]
    for logger, level in loggers:
        logger.setLevel(level)
    try:
        with warnings.catch_warnings():
            for message in _QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for (logger, _), level in zip(loggers, levels):
            logger.setLevel(level)


def format_table(frame: pd.DataFrame, columns: list[str], width: int = 120) -> str:
    """Rows of ``frame`` as fixed-width text no wider than ``width``: numbers to 3 decimals,
    the widest text column (the placement) clipped with ``...`` to fit."""
    columns = [c for c in columns if c in frame]
    if frame.empty or not columns:
        return "  (none)"

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:.0f}" if value.is_integer() and abs(value) >= 10 else f"{value:.3f}"
        return str(value)

    cells = [[cell(row[c]) for c in columns] for _, row in frame.iterrows()]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    excess = sum(widths) + 2 * (len(columns) - 1) + 2 - width
    if excess > 0:
        widest = max(range(len(columns)), key=lambda i: widths[i])
        widths[widest] = max(8, widths[widest] - excess)

    def fit(text: str, w: int) -> str:
        return text if len(text) <= w else text[: w - 3] + "..."

    lines = ["  " + "  ".join(fit(c, w).ljust(w) for c, w in zip(columns, widths)).rstrip()]
    for r in cells:
        lines.append("  " + "  ".join(fit(v, w).ljust(w) for v, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


# -- how a run ends ------------------------------------------------------------------------------


def _kind_label(kind) -> str:
    """A trial kind from a results table as text: missing (None, NaN, empty) is ``?``."""
    if kind is None or (isinstance(kind, float) and kind != kind):
        return "?"
    return _text(kind) or "?"


def _kind_in_folder(path) -> str:
    """The kind in the trial folder's ``params.json`` (Ray's copy of the trial config), ``?`` when none.

    A trial that failed before its first result and was read back from the folder (a resumed
    run) has an empty config in Ray's results; its folder still holds the config."""
    if not isinstance(path, str) or not path:
        return "?"
    with contextlib.suppress(Exception):
        params = json.loads(read_storage_text(f"{path.rstrip('/')}/params.json") or "{}")
        if isinstance(params, dict):
            return _kind_label(params.get("kind"))
    return "?"


@dataclass
class Outcome:
    """Grouped failures of one or more stages, and the exit status they give."""

    lines: list[str]
    exit_code: int


def failure_summary(frame: pd.DataFrame, kinds: tuple[str, ...] | None = None) -> Outcome:
    """Group identical trial errors and decide the exit status.

    ``frame`` has one row per trial with ``status`` (TERMINATED/ERROR), ``kind`` and
    ``error`` (e.g. :func:`pefttune.runtime.study_dir.results_frame`, several stages
    concatenated). The run fails (exit 1) when no trial finished, or when every trial of a
    kind failed; ``kinds`` limits the kinds checked (default: all present). A row without a
    kind and with a ``path`` (its trial folder) takes the kind from the folder's ``params.json``.
    Values of any type are shown as text.
    """
    lines: list[str] = []
    if frame.empty:
        return Outcome(["no trial ran"], 1)
    failed = frame[frame["status"] == "ERROR"]
    if len(failed):
        errors = failed["error"] if "error" in failed else pd.Series([""] * len(failed), index=failed.index)
        groups = Counter(last_error_line(e) for e in errors)
        for text, count in groups.most_common():
            lines.append(_clip(f"{count} trial{'s' if count > 1 else ''} failed: {text}", WIDTH))
    exit_code = 0
    finished = frame[frame["status"] == "TERMINATED"]
    if finished.empty:
        lines.append("no trial finished")
        exit_code = 1
    kind_column = (frame["kind"].map(_kind_label) if "kind" in frame
                   else pd.Series(["?"] * len(frame), index=frame.index))
    if "path" in frame and (kind_column == "?").any():
        kind_column = kind_column.where(kind_column != "?", frame["path"].map(_kind_in_folder))
    for kind in sorted(set(kind_column)):
        if kinds is not None and kind not in kinds:
            continue
        rows = frame[kind_column == kind]
        if len(rows) and (rows["status"] == "ERROR").all():
            lines.append(f"every {kind} trial failed ({len(rows)})")
            exit_code = 1
    return Outcome(lines, exit_code)
