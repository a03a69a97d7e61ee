"""The skeleton every trial runs: :class:`Trial` and its :meth:`Trial.run`.

A trial, whatever it trains, goes through the same steps; a trainable writes only the steps
that differ (a subclass) and a Ray function that runs it::

    class MyTrial(Trial):
        def plan(self):          # seed, TrainConfig and the columns that say what the trial is
            ...
        def build(self, device):  # model, loaders, optimizer on the device -> Parts
            ...

    def my_fn(config: dict, setup: TrialSetup) -> None:
        MyTrial(config, setup).run()

    tuner = tune.Tuner(make_trainable(my_fn, setup), ...)

:meth:`Trial.run`:

1. :meth:`~Trial.plan` (no compute): the seed, the :class:`~pefttune.training.TrainConfig` and
   the trial's columns (:class:`~pefttune.schema.TrialReport`'s ``columns``);
2. a trial that diverged in an earlier attempt (``DIVERGED`` in its folder of the experiment
   storage) raises :class:`~pefttune.training.DivergedError` at once, never trains again;
3. :meth:`~Trial.reject`: a report instead of training (the budget of a placement), or None;
4. threads, device, ``torch.manual_seed(seed)``, then :meth:`~Trial.build` (:class:`Parts`);
5. resume from the newest complete checkpoint (:func:`~pefttune.trainables.checkpoint.restore`,
   with :meth:`~Trial.restore_extra`); a finished trial reports its last row again, trains nothing;
6. the epoch loop (:func:`~pefttune.training.fit`) with :meth:`~Trial.hooks`; after each epoch
   the best-dev bookkeeping (the best weights too when ``keep_best_weights``), the trainable's own
   columns (:meth:`~Trial.epoch_columns`), on the last epoch :meth:`~Trial.final_scores` (before
   the report: ASHA stops a trial right at its ``max_t`` report), one
   :class:`~pefttune.schema.TrialReport` with a checkpoint (:meth:`~Trial.write_extra` adds the
   trainable's files), then the test seam's ``after_epoch``;
7. a NaN/inf loss writes its message to ``DIVERGED`` and re-raises.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from ray import tune

from pefttune.runtime import storage
from pefttune.runtime.cluster import set_threads, trial_device
from pefttune.schema import TrialReport
from pefttune.trainables import checkpoint as ckpt
from pefttune.trainables.checkpoint import CheckpointState
from pefttune.trainables.setup import TrialSetup
from pefttune.training import DivergedError, EpochResult, Evaluation, Hooks, TrainConfig, fit, is_better

__all__ = ["Parts", "Trial", "make_trainable"]


def make_trainable(fn: Callable[[dict, TrialSetup], None], setup: TrialSetup):
    """The function trainable ``fn`` bound to ``setup``, with the per-trial resources of the experiment."""
    resources = setup.experiment.resources
    trainable = tune.with_parameters(fn, setup=setup)
    return tune.with_resources(trainable, {"cpu": resources.cpu, "gpu": resources.gpu})


@dataclass
class Parts:
    """What :meth:`Trial.build` makes on the trial's device."""

    model: torch.nn.Module  # the PeftSpeechModel whose trainable weights a checkpoint holds
    train: Iterable  # what fit() trains on
    dev: Any  # the dev loader fit() scores each epoch on
    sampler: Any  # the training sampler (EpochSampler): set to the restored epoch
    optimizer: torch.optim.Optimizer
    scheduler: Any
    cache: Any = None  # the frozen-prefix cache (FrozenStateCache) or None


class Trial(ABC):
    """One trial of a trainable: its config, the shared setup and the steps :meth:`run` takes
    (see the module docstring).  A subclass sets the steps that differ; :meth:`plan` and
    :meth:`build` it must write."""

    #: keep a copy of the best-dev weights (scored at the end, stored in the checkpoint's ``best/``)
    keep_best_weights: bool = False

    def __init__(self, config: dict, setup: TrialSetup):
        self.config = config
        self.setup = setup
        self.experiment = setup.experiment
        # set by plan():
        self.seed: int = 0
        self.train: TrainConfig | None = None
        self.columns: dict = {}
        self.over_budget: bool | None = None  # reported by trials that have a budget check
        self.device = None  # the trial's device, set before build()
        # optional, set by plan(): the last epoch this run trains (default: all of ``train.epochs``, on
        # whose schedule it trains); a rung (never scored on test); a checkpoint to start from when the
        # trial has none of its own
        self.stop_epoch: int | None = None
        self.rung: bool = False
        self.start_from: str | None = None

    # -- the steps a trainable writes -----------------------------------------------------------
    @abstractmethod
    def plan(self) -> None:
        """Set ``seed``, ``train`` and ``columns`` from the trial config; no compute."""

    def reject(self) -> TrialReport | None:
        """A report instead of training (e.g. over the budget), else None."""
        return None

    @abstractmethod
    def build(self, device) -> Parts:
        """Data, model, cache, optimizer and scheduler on ``device`` (after ``torch.manual_seed``)."""

    def restore_extra(self, path: Path) -> None:
        """Read the trainable's own files of the checkpoint being restored."""

    def hooks(self, parts: Parts, state: CheckpointState) -> Hooks:
        """The training loop's hooks (after the restore: ``state`` is the restored one)."""
        return Hooks()

    def epoch_columns(self, result: EpochResult) -> dict:
        """The trainable's own columns of an epoch's report (``TrialReport.extra``)."""
        return {}

    def final_scores(self, parts: Parts, best_weights) -> tuple[dict, dict[str, Evaluation] | None]:
        """The last epoch's final scores (``TrialReport.final``) and the predictions the final
        checkpoint stores (None: none)."""
        return {}, None

    def metadata(self) -> dict:
        """What the checkpoint's ``model.json`` records (the epoch is added)."""
        return {}

    def write_extra(self, path: Path) -> None:
        """Write the trainable's own files into a checkpoint folder."""

    # -- the skeleton ---------------------------------------------------------------------------
    def run(self) -> None:
        """Plan, refuse a diverged trial, reject, build, resume, train with reports and checkpoints."""
        self.plan()
        directory = storage.trial_dir(self.setup.ray_dir)
        previous = storage.diverged_message(directory)
        if previous is not None:
            raise DivergedError(f"{previous} (diverged in an earlier attempt; not retried)")
        rejected = self.reject()
        if rejected is not None:
            ckpt.report(rejected.row())
            return
        resources = self.experiment.resources
        set_threads(resources.cpu)
        self.device = device = trial_device(resources.gpu, resources.gpu_wait_s)
        torch.manual_seed(self.train.seed)
        parts = self.build(device)
        restored = ckpt.restore(parts.model, optimizer=parts.optimizer, scheduler=parts.scheduler,
                                on_restore=self.restore_extra, start_from=self.start_from)  # never incomplete
        state, best_weights = CheckpointState(), None
        if restored is not None:
            state, best_weights = restored
            if state.finished:  # restored after the final report: report it again, train nothing
                ckpt.report(state.metrics)
                return
        if not self.keep_best_weights:
            best_weights = None
        start_epoch = state.epoch + 1
        parts.sampler.set_epoch(state.epoch)
        hooks = self.hooks(parts, state)
        stop = self.train.epochs if self.stop_epoch is None else min(self.stop_epoch, self.train.epochs)
        if start_epoch > stop:
            return
        on_epoch = _EpochEnd(self, parts, state, best_weights, start_epoch, directory)
        try:
            fit(parts.model, parts.train, parts.dev, self.train, optimizer=parts.optimizer,
                scheduler=parts.scheduler, start_epoch=start_epoch, end_epoch=stop, hooks=hooks, on_epoch=on_epoch,
                device=device, cache=parts.cache)
        except DivergedError as err:
            storage.mark_diverged(directory, str(err))
            raise

    def report(self, result: EpochResult, state: CheckpointState, start_epoch: int, extra: dict,
               final: dict) -> TrialReport:
        """The epoch's report (``state`` holds the best score so far)."""
        scores = result.metrics()
        scores.pop("epoch")
        return TrialReport(self.train.metric, self.columns, result.epoch, scores, best_dev=state.best_score,
                           best_epoch=state.best_epoch, over_budget=self.over_budget, start_epoch=start_epoch,
                           extra=extra, final=final)


class _EpochEnd:
    """What happens after each epoch of :meth:`Trial.run` (``fit``'s ``on_epoch``)."""

    def __init__(self, trial: Trial, parts: Parts, state: CheckpointState, best_weights, start_epoch: int,
                 directory):
        self.trial, self.parts, self.state, self.best_weights = trial, parts, state, best_weights
        self.start_epoch, self.directory = start_epoch, directory

    def __call__(self, result: EpochResult) -> None:
        trial, state = self.trial, self.state
        if is_better(result.dev.score, state.best_score, trial.train.mode):
            state.best_score, state.best_epoch = result.dev.score, result.epoch
            if trial.keep_best_weights:
                self.best_weights = ckpt.trainable_state(self.parts.model)
        state.epoch = result.epoch
        extra = trial.epoch_columns(result)
        final, predictions = {}, None
        if result.epoch == trial.train.epochs and not trial.rung:
            final, predictions = trial.final_scores(self.parts, self.best_weights)
            state.finished = True
        metrics = trial.report(result, state, self.start_epoch, extra, final).row()
        state.metrics = metrics

        def write(path: Path) -> None:
            ckpt.write_checkpoint(path, self.parts.model, state, optimizer=self.parts.optimizer,
                                  scheduler=self.parts.scheduler, best_weights=self.best_weights,
                                  predictions=predictions, metadata={**trial.metadata(), "epoch": result.epoch})
            trial.write_extra(path)

        ckpt.report(metrics, write)
        trial.setup.after_epoch(trial.config, result.epoch, self.directory)
