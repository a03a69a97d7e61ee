"""The trial schema both arms and the analysis share: trial kinds, metric keys, what a trial
reports, the checkpoint layout's names and state, and the one ranking of trials.

- :class:`TrialKind`: what a trial is (``kind`` in its config, its metrics and the trials
  table).  A ``str`` enum: members compare and hash equal to the stored strings, and format as
  them, so written files hold the plain value.
- :func:`metric_key`: the name of a reported metric, ``dev_accuracy``, ``best_dev_accuracy``.
- :class:`TrialReport`: what a trial reports (``tune.report``) after every epoch and at the end;
  the trainables write their rows with it, the results store reads Ray's rows back with it.
- ``STATE_FILE`` and the other names of a checkpoint's files, and :class:`CheckpointState`, what
  its ``state.json`` holds (the format is :mod:`pefttune.trainables.checkpoint`; the results
  store reads it).
- :func:`rank_trials`: best first by a score, ties by trial id.

Example (a fake trial's last row, as a test builds one)::

    report = TrialReport("accuracy", {"kind": TrialKind.UNIFORM.value, "seed": 0}, epoch=2,
                         scores={"train_loss": 0.4, "dev_accuracy": 0.8}, best_dev=0.8, best_epoch=2,
                         over_budget=False, final={"test_accuracy": 0.75})
    row = report.row()        # {"kind": "uniform", "seed": 0, "epoch": 2, ..., "best_dev_accuracy": 0.8, ...}
    TrialReport.from_row(row, "accuracy").test_score   # 0.75

Only the standard library is imported here: every layer may import this module.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Callable, Iterable, Mapping, TypeVar

__all__ = [
    "BEST_DIR", "CHECKPOINT_NAME", "CONTINUES", "FILES_KEY", "MODEL_DIR", "PREDICTIONS_DIR", "RAY_KEYS",
    "RAY_PROGRESS", "STATE_FILE", "STOP_EPOCH", "TRAINER_FILE", "CheckpointState", "TrialKind", "TrialReport",
    "listed_files", "metric_key", "predictions_file", "rank_trials", "state_json",
]


class TrialKind(str, Enum):
    """What a trial is.  ``str(kind)`` and f-strings give the stored value (``"log-mel"``)."""

    UNIFORM = "uniform"  # one method in every layer
    HYBRID = "hybrid"  # several methods merged in every layer
    DISCRETE = "discrete"  # a placement from the per-layer search
    FROZEN = "frozen"  # the head alone on the frozen encoder
    LOG_MEL = "log-mel"  # the head alone on log-mel features, no encoder
    DARTS = "darts"  # a DARTS search (a supernet, not a usable model)
    DARTS_DERIVED = "darts-derived"  # a placement derived by DARTS, retrained

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


#: A trial config key: the trial ends after this epoch, on the schedule of all its epochs (a rung of the
#: learning-rate protocol, :mod:`pefttune.tuning`); such a trial is stopped early by design, never a result.
STOP_EPOCH = "stop_epoch"
#: A trial config key: the checkpoint (folder or URI) a trial without one of its own starts from: the rung of the
#: learning-rate protocol that it continues, at the chosen rate with the same seed.
CONTINUES = "continues"


def metric_key(split: str, metric: str, best: bool = False) -> str:
    """The key a trial reports ``metric`` under: ``metric_key("dev", "accuracy")`` is
    ``"dev_accuracy"``, with ``best=True`` ``"best_dev_accuracy"`` (the best epoch's score)."""
    return f"best_{split}_{metric}" if best else f"{split}_{metric}"


#: Ray's bookkeeping keys of a reported row (never metric columns of the tables).
RAY_KEYS = frozenset({
    "timestamp", "checkpoint_dir_name", "should_checkpoint", "done", "trial_id", "date", "pid",
    "hostname", "node_ip", "config", "experiment_tag", "logdir", "iterations_since_restore",
    "time_since_restore",
})
#: Ray's progress keys of a reported row (the tables show them).
RAY_PROGRESS = frozenset({"training_iteration", "time_this_iter_s", "time_total_s"})
#: An epoch's measurements every trainable reports (besides ``dev_<metric>``/``dev_loss``).
EPOCH_SCORES = ("train_loss", "samples_per_s", "epoch_seconds")
#: Prefixes of the final scores: the test split (placements), the derived placement (DARTS searches).
FINAL_PREFIXES = ("test_", "derived_dev_")


@dataclass
class TrialReport:
    """What a trial reports to Ray (``tune.report``): one row after every epoch, the last one with
    its final scores; a trial rejected before training (over the budget) reports one row with
    ``epoch=0`` and ``over_budget=True``.

    :meth:`row` gives the row, its keys in this order: ``columns``, ``epoch``, ``scores``,
    ``best_dev_<metric>``, ``best_epoch``, ``over_budget``, ``start_epoch``, ``extra``, ``final``
    (a rejected trial's ``over_budget`` comes right after its columns).  :meth:`from_row` reads a
    row back, Ray's keys (:data:`RAY_KEYS`, :data:`RAY_PROGRESS`) set apart in ``ray``; there the keys the
    schema does not name (a trainable's own columns and measurements) are all in ``columns``.
    """

    metric: str  # the study's metric: the keys dev_<metric>, best_dev_<metric>, test_<metric>
    columns: dict  # what the trial is, the same in every row: kind, seed, config_id, placement, params...
    epoch: int | None  # the epoch just finished (0: rejected before training; None: not reported)
    scores: dict = field(default_factory=dict)  # the epoch's measurements: train_loss, dev_<metric>, dev_loss...
    best_dev: float | None = None  # best_dev_<metric>: the best epoch's dev score so far
    best_epoch: int | None = None
    over_budget: bool | None = None  # trials of a placement: rejected for the budget; None: not reported (DARTS)
    start_epoch: int | None = None  # the first epoch this attempt trained (> 1 after a resume)
    extra: dict = field(default_factory=dict)  # the trainable's own per-epoch columns (DARTS: the derived placement)
    final: dict = field(default_factory=dict)  # the last epoch's final scores: test_<metric>/test_loss, derived_dev_<metric>
    ray: dict = field(default_factory=dict)  # read back only: Ray's bookkeeping (training_iteration, time_total_s...)

    def row(self) -> dict:
        """The row ``tune.report`` receives (key order in the class docstring)."""
        rejected = self.over_budget is True
        out = {**self.columns}
        if rejected:
            out["over_budget"] = True
        if self.epoch is not None:
            out["epoch"] = self.epoch
        out.update(self.scores)
        if self.best_dev is not None or self.best_epoch is not None:
            out[metric_key("dev", self.metric, best=True)] = self.best_dev
        if self.best_epoch is not None:
            out["best_epoch"] = self.best_epoch
        if self.over_budget is not None and not rejected:
            out["over_budget"] = self.over_budget
        if self.start_epoch is not None:
            out["start_epoch"] = self.start_epoch
        out.update(self.extra)
        out.update(self.final)
        return out

    @classmethod
    def from_row(cls, row: Mapping[str, Any], metric: str) -> "TrialReport":
        """A reported row read back (a Ray result's ``metrics``, a ``result.json`` line)."""
        report = cls(metric, columns={}, epoch=None)
        best = metric_key("dev", metric, best=True)
        for key, value in row.items():
            if key in RAY_KEYS or key in RAY_PROGRESS:
                report.ray[key] = value
            elif key == "epoch":
                report.epoch = value
            elif key == best:
                report.best_dev = value
            elif key == "best_epoch":
                report.best_epoch = value
            elif key == "over_budget":
                report.over_budget = value
            elif key == "start_epoch":
                report.start_epoch = value
            elif key in EPOCH_SCORES or key.startswith("dev_"):
                report.scores[key] = value
            elif key.startswith(FINAL_PREFIXES):
                report.final[key] = value
            else:
                report.columns[key] = value
        return report

    @property
    def kind(self) -> str | None:
        """The trial's kind as reported (a :class:`TrialKind` value), None when not reported."""
        kind = self.columns.get("kind")
        return kind if isinstance(kind, str) and kind else None

    @property
    def dev_score(self) -> Any:
        return self.scores.get(metric_key("dev", self.metric))

    @property
    def test_score(self) -> Any:
        return self.final.get(metric_key("test", self.metric))

    @property
    def rejected(self) -> bool:
        """Rejected before training (over the budget)."""
        return bool(self.over_budget)


# A checkpoint's layout (pefttune.trainables.checkpoint writes it, pefttune.analysis.store reads it).
STATE_FILE = "state.json"  # written last: epoch, best score, finished, metrics and the file list
TRAINER_FILE = "trainer_state.pt"  # optimizer, scheduler and RNG state
MODEL_DIR = "model"  # the current weights
BEST_DIR = "best"  # the best-dev weights
PREDICTIONS_DIR = "predictions"  # per-example predictions of the final checkpoint
FILES_KEY = "files"  # state.json: relative path -> [size, sha256] of every other file
CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)$")  # Ray's checkpoint folders in a trial's folder


def predictions_file(split: str) -> str:
    """The file name of a split's predictions under ``PREDICTIONS_DIR``."""
    return f"{split}.safetensors"


@dataclass
class CheckpointState:
    """What a checkpoint's ``STATE_FILE`` holds besides its file list: what a trial needs, besides
    weights, to resume or to be read afterwards."""

    epoch: int = 0  # last finished epoch
    best_score: float | None = None
    best_epoch: int = 0
    finished: bool = False  # final evaluation done, predictions stored
    metrics: dict = field(default_factory=dict)  # the row reported with this checkpoint (TrialReport.row)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=_json_default) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "CheckpointState":
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def state_json(state: CheckpointState, files: Mapping[str, tuple[int, str]] | None = None) -> str:
    """The text of a ``STATE_FILE``: ``state`` and, when given, the list of every other file of the
    checkpoint (relative path -> (size, sha256)) that makes it complete."""
    data = json.loads(state.to_json())
    if files is not None:
        data[FILES_KEY] = {rel: [int(size), str(digest)] for rel, (size, digest) in files.items()}
    return json.dumps(data, indent=2, default=_json_default) + "\n"


def listed_files(text: str) -> dict[str, tuple[int, str]] | None:
    """The file list of a ``STATE_FILE`` text, None for an older one without a list.  Raises
    ``ValueError`` naming what is wrong when the text is not a valid state (cut off, malformed)."""
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{STATE_FILE} is not valid JSON (cut off?): {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{STATE_FILE} holds no state")
    files = data.get(FILES_KEY)
    if files is None:
        return None
    try:
        return {str(rel): (int(size), str(digest)) for rel, (size, digest) in files.items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"{STATE_FILE}: its '{FILES_KEY}' list is malformed") from None


T = TypeVar("T")


def rank_trials(trials: Iterable[T], score: Callable[[T], float | None], trial_id: Callable[[T], str],
                mode: str) -> list[T]:
    """``trials`` best first by ``score`` (``mode``: ``"max"`` or ``"min"``); ties by trial id,
    ascending.  Trials without a score (None or NaN) are dropped."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    scored = [(float(s), t) for t in trials if (s := score(t)) is not None and not math.isnan(float(s))]
    scored.sort(key=lambda item: (-item[0] if mode == "max" else item[0], trial_id(item[1])))
    return [t for _, t in scored]
