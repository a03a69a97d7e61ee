"""The trial schema both arms and the analysis share: trial kinds, metric keys, the checkpoint
layout's file names and the one ranking of trials.

- :class:`TrialKind`: what a trial is (``kind`` in its config, its metrics and the trials
  table).  A ``str`` enum: members compare and hash equal to the stored strings, and format as
  them, so written files hold the plain value.
- :func:`metric_key`: the name of a reported metric, ``dev_accuracy``, ``best_dev_accuracy``.
- ``STATE_FILE`` and the other names of a checkpoint's files (the format is
  :mod:`pefttune.trainables.checkpoint`; the results store reads it).
- :func:`rank_trials`: best first by a score, ties by trial id.

Only the standard library is imported here: every layer may import this module.
"""
from __future__ import annotations

import math
import re
from enum import Enum
from typing import Callable, Iterable, TypeVar

__all__ = [
    "BEST_DIR", "CHECKPOINT_NAME", "CONTINUES", "FILES_KEY", "MODEL_DIR", "PREDICTIONS_DIR", "STATE_FILE", "STOP_EPOCH",
    "TRAINER_FILE",
    "TrialKind", "metric_key", "predictions_file", "rank_trials",
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
