"""Ray Tune's OptunaSearch, made right for epoch-wise trials with early stopping.

:class:`PefttuneSearch` subclasses :class:`ray.tune.search.optuna.OptunaSearch` and
changes what Optuna is told:

- **Early-stopped trials are PRUNED.** Ray's OptunaSearch tells Optuna ``COMPLETE`` with
  the last (partial) score of every trial that did not error, including trials ASHA
  stopped early, which poisons TPE with under-trained scores. Here a trial whose last
  result has ``epoch < max_epochs`` (and no error, and not over budget) is told
  ``PRUNED``; Optuna then uses its last intermediate value as a pruned trial's value.
- **Only full-epoch metrics are reported** as intermediate values (step = ``epoch``);
  the zero-epoch row of an over-budget trial is not.
- **Over-budget trials** (``over_budget=True``, zero epochs) are told ``COMPLETE`` with
  the worst score the trainable reported; the space function already set their
  ``budget`` constraint > 0, so TPE/NSGA-II treat them as infeasible.
- **Fixed points** (uniform baselines, hybrid) are enqueued into a fresh study with the
  ``pefttune_fixed`` user attribute, so they are ordinary Optuna trials of the same study.
- **Resume**: Ray saves the experiment state (its trials) and the search state (the count of
  trials suggested, the links to Optuna trials) as separate files, so a driver killed between
  the two leaves them a trial apart. Restored, both follow the experiment state
  (:class:`PefttuneSearchGenerator`, :meth:`PefttuneSearch.restore_from_dir`): a trial the
  experiment holds is linked again and never suggested twice; an Optuna trial left ``RUNNING``
  that the experiment does not hold (asked right before a crash) is marked ``FAIL`` and its
  place suggested anew.

The study lives in an RDB storage (sqlite in the experiment dir by default), so
``optuna-dashboard sqlite:///<dir>/optuna.db`` opens it and a resumed search keeps the
sampler's history.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState
from ray.tune.search import SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from pefttune.config import StudyConfig
from pefttune.search.space import FIXED_ATTR, FixedPoint, PlacementSpace

logger = logging.getLogger(__name__)

PARAMS_METRIC = "trainable_params"


def make_sampler(config: StudyConfig, space: PlacementSpace) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named by ``search.algorithm`` (seeded with ``train.seed``)."""
    search, seed = config.search, config.train.seed
    if search.algorithm == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # group=True
            return optuna.samplers.TPESampler(
                multivariate=True,
                group=True,
                constant_liar=True,  # parallel trials: pending ones count as bad, fewer duplicates
                n_startup_trials=search.tpe_startup_trials,
                seed=seed,
            )
    if search.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search.algorithm == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if search.algorithm == "nsga2":
        population = max(2, min(50, search.num_samples // 2 or 2))
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    raise ValueError(f"search.algorithm: unknown algorithm {search.algorithm!r}")


def make_storage(url: str) -> optuna.storages.RDBStorage:
    # sqlite: several processes (driver, optuna-dashboard) may open it; wait on locks.
    engine_kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


@dataclass(frozen=True)
class Objective:
    """What the searcher optimises: the task metric, plus trainable parameters in MO mode."""

    metric: str  # e.g. dev_accuracy (best-so-far score is best_dev_accuracy)
    mode: str
    max_epochs: int
    multi_objective: bool = False

    @property
    def metrics(self) -> list[str]:
        return [self.metric, PARAMS_METRIC] if self.multi_objective else [self.metric]

    @property
    def modes(self) -> list[str]:
        return [self.mode, "min"] if self.multi_objective else [self.mode]


def classify_result(objective: Objective, result: dict | None, error: bool) -> tuple[TrialState, list[float] | None]:
    """Optuna state (and values) for a finished Ray trial: FAIL, PRUNED or COMPLETE."""
    if error:
        return TrialState.FAIL, None
    if not result:
        return TrialState.PRUNED, None  # removed before it reported anything
    values = [result.get(m) for m in objective.metrics]
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return TrialState.FAIL, None
    values = [float(v) for v in values]
    if result.get("over_budget"):
        return TrialState.COMPLETE, values  # worst score; infeasible through its constraint
    epoch = result.get("epoch")
    if epoch is None or int(epoch) < objective.max_epochs:
        return TrialState.PRUNED, None  # stopped early (ASHA): partial scores are not final scores
    return TrialState.COMPLETE, values


class PefttuneSearch(OptunaSearch):
    """OptunaSearch with pruning-aware completion, fixed points and resume hygiene."""

    def __init__(
        self,
        space: PlacementSpace,
        objective: Objective,
        *,
        sampler: optuna.samplers.BaseSampler,
        storage: optuna.storages.BaseStorage,
        study_name: str,
        points: list[FixedPoint] = (),
    ):
        self.objective = objective
        self._reported_steps: dict[str, set[int]] = {}
        metric = objective.metrics if objective.multi_objective else objective.metric
        mode = objective.modes if objective.multi_objective else objective.mode
        super().__init__(space=space, metric=metric, mode=mode, sampler=sampler, study_name=study_name, storage=storage)
        if not self._ot_study.get_trials(deepcopy=False):  # fresh study: enqueue the fixed points once
            for point in points:
                self._ot_study.enqueue_trial(
                    space.optuna_params(point), user_attrs={FIXED_ATTR: point.to_attr()}, skip_if_exists=False
                )

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if config is not None:  # link the Optuna trial to its Ray trial (dashboard, analysis)
            self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.objective.multi_objective or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return  # Optuna has no intermediate values for multi-objective studies
        epoch, value = result.get("epoch"), result.get(self.objective.metric)
        if not epoch or result.get("over_budget") or value is None or not math.isfinite(float(value)):
            return  # full epochs only
        steps = self._reported_steps.setdefault(trial_id, set())
        if int(epoch) in steps:
            return  # re-reported after a restore
        steps.add(int(epoch))
        try:
            self._ot_trials[trial_id].report(float(value), int(epoch))
        except optuna.exceptions.UpdateFinishedTrialError:  # told before a crash, Ray re-ran it after the resume
            self._completed_trials.add(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            logger.warning("pefttune search: trial %s completed but Optuna never suggested it", trial_id)
            return
        frozen = self._ot_study._storage.get_trial(ot_trial._trial_id)
        if frozen.state.is_finished():
            self._completed_trials.add(trial_id)
            return  # told before a crash, Ray re-reported it after the resume
        if result and not error:
            # Tune passes the result that made the scheduler stop a trial (ASHA's rung, or
            # max_t) only here, never to on_trial_result: record it as an intermediate value
            self.on_trial_result(trial_id, result)
        self._completed_trials.add(trial_id)
        state, values = classify_result(self.objective, result, error)
        try:
            self._ot_study.tell(ot_trial, values, state=state)
        except (ValueError, RuntimeError) as err:  # keep the experiment going
            logger.warning("pefttune search: could not tell Optuna trial %s %s: %s", ot_trial.number, state, err)

    def restore(self, checkpoint_path: str) -> None:
        follow = self.__dict__.pop("_follow_trial_ids", None)  # set by restore_from_dir
        super().restore(checkpoint_path)
        if not hasattr(self, "_reported_steps"):
            self._reported_steps = {}
        if follow is None:
            self.fail_orphans()
        else:
            self.follow_experiment(follow)

    def restore_from_dir(self, checkpoint_dir: str) -> None:
        """Restore, then follow the experiment state saved beside it (:func:`experiment_trial_ids`)."""
        self._follow_trial_ids = experiment_trial_ids(checkpoint_dir)
        try:
            super().restore_from_dir(checkpoint_dir)
        finally:
            self.__dict__.pop("_follow_trial_ids", None)

    def follow_experiment(self, trial_ids: set[str]) -> None:
        """Make the links to Optuna trials those of the Ray trials in ``trial_ids``.

        A Ray trial whose link was suggested after the searcher's last save is linked again to
        its Optuna trial (found by its ``ray_trial_id``); a link to a Ray trial the experiment
        does not hold is dropped, and its Optuna trial, if still running, marked ``FAIL``."""
        for trial_id in [t for t in self._ot_trials if t not in trial_ids]:
            del self._ot_trials[trial_id]
            self._completed_trials.discard(trial_id)
        for frozen in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            trial_id = frozen.user_attrs.get("ray_trial_id")
            if trial_id in trial_ids and trial_id not in self._ot_trials:
                self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, frozen._trial_id)
        self.fail_orphans()

    def fail_orphans(self) -> list[int]:
        """Mark RUNNING Optuna trials that Ray does not know as FAIL; return their numbers."""
        known = {t.number for t in self._ot_trials.values()}
        orphans = [t.number for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        orphans = [n for n in orphans if n not in known]
        for number in orphans:
            self._ot_study.tell(number, state=TrialState.FAIL)
        return orphans


class PefttuneSearchGenerator(SearchGenerator):
    """Ray's :class:`~ray.tune.search.SearchGenerator` whose count of created trials, restored,
    is the experiment state's (Ray saves the two in separate files: see the module docstring).

    Without it, a count saved before the experiment's last trial was created makes the restored
    search suggest that trial's place again, and a count saved after a trial the experiment state
    does not hold leaves that place empty.

    Example::

        generator = PefttuneSearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=2))
        tune.Tuner(trainable, tune_config=tune.TuneConfig(search_alg=generator, num_samples=5))
    """

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        trial_ids = experiment_trial_ids(dirpath)
        if trial_ids is not None:
            self._counter = len(trial_ids)


#: Ray Tune's experiment state file (``TuneController.CKPT_FILE_TMPL``).
EXPERIMENT_STATE = "experiment_state-*.json"


def experiment_trial_ids(directory: str) -> set[str] | None:
    """The trial ids in the newest experiment state of ``directory`` (the one Ray restores: the
    greatest file name), or None when it holds none or cannot be read."""
    files = glob.glob(os.path.join(glob.escape(directory), EXPERIMENT_STATE))
    if not files:
        return None
    try:
        with open(max(files)) as f:
            state = json.load(f)
        return {json.loads(trial)["trial_id"] for trial, _ in state["trial_data"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("pefttune search: could not read the trials of %s: %s", max(files), err)
        return None
