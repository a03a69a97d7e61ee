"""Fault injection for tests: ready-made hooks for :class:`pefttune.trainables.setup.Faults`.

Trainables carry no test branches: a test passes a ``Faults`` object to
:func:`pefttune.search.run.run_search` / :func:`pefttune.darts.run.run_darts`,
filled with hooks from here. They live in the package (not under ``tests/``) so Ray workers
can unpickle them. Each hook targets the trials whose placement is in ``placements`` and
whose ``kind`` is in ``kinds`` (all trials when both are None).

    faults = Faults(after_epoch=fail_once_after(1, placements=[p]), before_step=nan_at(1, placements=[q]))
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from pefttune.placement import Placement
from pefttune.runtime.storage import read_marker, write_marker
from pefttune.trainables.setup import Faults

__all__ = ["Faults", "fail_once_after", "nan_at", "sleep_after", "chain"]

FAILED_ONCE = "FAILED_ONCE"


def _key(value) -> str:
    """Canonical JSON of a placement given as a Placement, a mapping or a JSON string."""
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, Placement):
        value = Placement.from_dict(value)
    return json.dumps(value.to_dict(), sort_keys=True)


@dataclass
class _Target:
    placements: tuple[str, ...] | None
    kinds: tuple[str, ...] | None = None

    def hits(self, trial_config: dict) -> bool:
        if self.kinds is not None and trial_config.get("kind") not in self.kinds:
            return False
        if self.placements is None:
            return True
        placement = trial_config.get("placement")
        return placement is not None and _key(placement) in self.placements


def _target(placements: Sequence | None) -> tuple[str, ...] | None:
    return None if placements is None else tuple(_key(p) for p in placements)


@dataclass
class fail_once_after(_Target):  # noqa: N801 - used like a function
    """Raise once after ``epoch``'s checkpoint; a marker in the trial's storage folder makes it once."""

    epoch: int = 1

    def __init__(self, epoch: int, placements: Sequence | None = None, kinds: Sequence[str] | None = None):
        super().__init__(_target(placements), None if kinds is None else tuple(kinds))
        self.epoch = epoch

    def __call__(self, trial_config: dict, epoch: int, trial_dir: str | None) -> None:
        if not self.hits(trial_config) or epoch != self.epoch or trial_dir is None:
            return
        if read_marker(trial_dir, FAILED_ONCE) is None:
            write_marker(trial_dir, FAILED_ONCE, json.dumps({"epoch": epoch}))
            raise RuntimeError(f"injected failure after epoch {epoch}")


@dataclass
class nan_at(_Target):  # noqa: N801
    """Set the head's weights to NaN at ``epoch``'s first step, so the real NaN-loss path runs."""

    epoch: int = 1

    def __init__(self, epoch: int, placements: Sequence | None = None, kinds: Sequence[str] | None = None):
        super().__init__(_target(placements), None if kinds is None else tuple(kinds))
        self.epoch = epoch

    def __call__(self, trial_config: dict, model, step: int, epoch: int) -> None:
        if self.hits(trial_config) and epoch == self.epoch and step == 0:
            with torch.no_grad():
                for param in model.head.parameters():
                    param.fill_(float("nan"))


@dataclass
class sleep_after(_Target):  # noqa: N801
    """Wait ``seconds`` after each epoch's report: a trial slow enough to interrupt."""

    seconds: float = 1.0

    def __init__(self, seconds: float, placements: Sequence | None = None, kinds: Sequence[str] | None = None):
        super().__init__(_target(placements), None if kinds is None else tuple(kinds))
        self.seconds = seconds

    def __call__(self, trial_config: dict, epoch: int, trial_dir: str | None) -> None:
        if self.hits(trial_config):
            time.sleep(self.seconds)


@dataclass
class chain:  # noqa: N801
    """Run several ``after_epoch`` hooks in order."""

    hooks: tuple

    def __init__(self, *hooks):
        self.hooks = hooks

    def __call__(self, *args) -> None:
        for hook in self.hooks:
            hook(*args)
