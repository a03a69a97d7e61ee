"""One discrete placement search on Ray Tune: build, run, resume, read the results.

:func:`run_search` is the entry point (``pefttune search`` and ``pefttune run`` call it):

1. validate the config, the space and the experiment directory ``<storage>/<name>/``
   (a new search never reuses an existing directory; ``resume=True`` needs one), all
   before Ray starts;
2. start a private local Ray (loopback, no dashboard, private temp dir) or join one
   (``address``, else ``RAY_ADDRESS``); on a multi-node cluster refuse a node-local
   ``storage`` unless ``storage_shared`` (:func:`check_cluster_storage`); write
   ``experiment.yaml`` to the experiment directory;
3. run a :class:`ray.tune.Tuner` of :func:`pefttune.trainables.discrete.train_fn` with
   :class:`~pefttune.search.optuna_search.PefttuneSearch` (Optuna study in
   ``<dir>/optuna.db``), ASHA on ``epoch`` (``max_t = train.epochs``) and
   ``FailureConfig(max_failures=search.max_failures)``; or restore it
   (``Tuner.restore(..., resume_unfinished=True)``) to finish unfinished trials.

Design choices
--------------
- **Fixed points**: uniform baselines (one per candidate method, first listed value of
  each hyper-parameter, at the rate the learning-rate protocol chose for them,
  :mod:`pefttune.search.tune_lr`; ``train.lr`` without ``train.lr_grid``) and the hybrid are trials of the *same*
  experiment and the same Optuna study: they are enqueued Optuna trials, run first, tagged
  ``kind="uniform"``/``"hybrid"``. ``num_samples`` counts only the searched trials.
- **Budget**: rejection when the trial starts: the trainable reports once with
  ``over_budget=True``, ``epoch=0`` and the worst score, and trains nothing. Optuna gets
  the constraint ``peft_params - budget`` (set by the space), so TPE/NSGA-II learn the
  region is infeasible. ``search.budget_exempt_fixed`` lets fixed points train anyway.
- **Objective**: ``best_dev_<metric>`` (best dev score so far, full epochs only) for ASHA
  and Optuna; plus ``trainable_params`` (min) with ``search.multi_objective``.
- **Early stopping**: ASHA ranks the searched trials among themselves (the fixed points run to
  the end and enter no rung); ASHA-stopped trials are told PRUNED to Optuna (not COMPLETE).
- **Divergence**: a NaN loss ends the trial as ERROR with the DivergedError message; retries
  re-raise at once (the trainable leaves a marker), so the experiment continues.
- **Top-k**: Ray has none; :func:`results_frame` + :func:`top_k` sort the trials.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pefttune.backbones import backbone_info
from pefttune.config import StudyConfig, resolve_config
from pefttune.metrics import metric_mode
from pefttune.runtime.atomic_fs import restore_filesystem, restore_path
from pefttune.runtime.console import Console, failure_summary, quiet_ray_loggers
from pefttune.runtime.cluster import alive_nodes, check_cluster_storage, connect_ray, fit_environment, trial_name
from pefttune.runtime.study_dir import (
    CONFIG_COPY,
    check_same_config,
    study_dir,
    holds_run,
    refuse_existing,
    require_resumable,
    results_frame,
    write_config_copy,
)
from pefttune.runtime.storage import storage_exists
from pefttune.runtime.tracking import check_tracking
from pefttune.runtime.tune_run import run_config
from pefttune.schema import TrialKind, metric_key
from pefttune.search.optuna_search import (
    Objective,
    PefttuneSearch,
    PefttuneSearchGenerator,
    make_sampler,
    make_storage,
)
from pefttune.search.space import FixedPoint, PlacementSpace, fixed_points, validate_space, with_rates
from pefttune.search.summary import summary_table
from pefttune.trainables.setup import Faults, make_setup, prefill_local

logger = logging.getLogger(__name__)

OPTUNA_DB = "optuna.db"


# -- the search plan ----------------------------------------------------------------------------


@dataclass
class SearchPlan:
    """Everything a search needs, built and validated before Ray starts."""

    config: StudyConfig
    path: str  # <storage>/<name>, absolute local path or URI
    space: PlacementSpace
    objective: Objective
    points: list[FixedPoint] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return self.objective.metric

    @property
    def mode(self) -> str:
        return self.objective.mode

    @property
    def is_local(self) -> bool:
        return "://" not in self.path

    @property
    def optuna_url(self) -> str:
        if self.config.search.optuna_storage:
            return self.config.search.optuna_storage
        if not self.is_local:
            raise ValueError(
                f"search.optuna_storage: required when storage is a URI ({self.config.storage}); "
                "give an RDB URL such as sqlite:////shared/optuna.db or postgresql://..."
            )
        return f"sqlite:///{Path(self.path) / OPTUNA_DB}"

    @property
    def num_samples(self) -> int:
        """Ray trials: searched ones (the whole grid at most) plus the fixed points."""
        searched = self.config.search.num_samples
        if self.config.search.algorithm == "grid":
            size = self.space.grid_size()
            searched = size if searched == 0 else min(searched, size)
        return searched + len(self.points)


def build_search_plan(config: StudyConfig, extra_points: list[FixedPoint] | None = None) -> SearchPlan:
    """Validate everything that can be checked without Ray (errors name the field)."""
    check_tracking(config)
    info = backbone_info(config.backbone)
    space = validate_space(config, info)
    metric = config.metric
    objective = Objective(
        metric=metric_key("dev", metric, best=True),
        mode=metric_mode(metric),
        max_epochs=config.train.epochs,
        multi_objective=config.search.multi_objective,
    )
    if config.search.scheduler == "asha" and config.search.grace_period > config.train.epochs:
        raise ValueError(
            f"search.grace_period: {config.search.grace_period} is more than train.epochs ({config.train.epochs})"
        )
    points = fixed_points(config) + list(extra_points or [])
    for point in points:
        space.fixed_placement(point)
    plan = SearchPlan(config, study_dir(config), space, objective, points)
    plan.optuna_url  # noqa: B018 - raises for a URI storage without optuna_storage
    return plan


# -- the experiment directory ---------------------------------------------------------------------


def prepare_directory(plan: SearchPlan, resume: bool, write: bool = True) -> bool:
    """Refuse to overwrite an experiment; on resume, require one with the same config. Returns
    whether there is a Ray run to restore.

    A new search's config copy is written unless ``write=False`` (then
    :func:`~pefttune.runtime.study_dir.write_config_copy` writes it later, once the cluster
    checks passed). A resumed search that was stopped after its config copy was written but
    before Ray saved any state starts afresh (nothing of it was trained)."""
    path = plan.path
    if not resume:
        refuse_existing(path, "a search")
        if write:
            write_config_copy(plan.config, path)
        return False
    copy = f"{path}/{CONFIG_COPY}"
    if not holds_run(path) and not storage_exists(copy):
        require_resumable(path, "search")
    check_same_config(plan.config, copy, "resume with the saved config", prefix="--resume: ")
    return holds_run(path)


# -- Ray ---------------------------------------------------------------------------------------------


def build_searcher(plan: SearchPlan) -> PefttuneSearch:
    sampler = make_sampler(plan.config, plan.space)
    storage = make_storage(plan.optuna_url)
    return PefttuneSearch(
        plan.space,
        plan.objective,
        sampler=sampler,
        storage=storage,
        study_name=plan.config.name,
        points=plan.points,
    )


#: Trial kinds that ASHA never stops: the baselines every comparison (and ensemble) needs.
FIXED_KINDS = (TrialKind.UNIFORM, TrialKind.HYBRID)


def build_scheduler(plan: SearchPlan):
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

    class BaselineKeepingASHA(AsyncHyperBandScheduler):
        """ASHA over the searched trials, ranked among themselves; uniform baselines and the hybrid
        always run to the end (their final dev/test predictions feed the comparisons and the
        ensembles) and enter no rung: continuing their learning-rate rung (:mod:`pefttune.tuning`),
        they report from a later epoch than a rung's, at a rate chosen for them."""

        def on_trial_result(self, tune_controller, trial, result):
            if trial.config.get("kind") in FIXED_KINDS:
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result):
            if trial.config.get("kind") in FIXED_KINDS:
                self._trial_info.pop(trial.trial_id, None)
                return
            super().on_trial_complete(tune_controller, trial, result)

    search = plan.config.search
    if search.scheduler == "none":
        return FIFOScheduler()
    return BaselineKeepingASHA(
        time_attr="epoch",
        metric=plan.metric,
        mode=plan.mode,
        max_t=plan.config.train.epochs,
        grace_period=search.grace_period,
        reduction_factor=search.reduction_factor,
    )


def progress_reporter(plan: SearchPlan):
    from ray import tune

    metric = plan.config.metric
    return tune.CLIReporter(
        metric_columns={
            "epoch": "epoch",
            metric_key("dev", metric): metric_key("dev", metric),
            plan.metric: plan.metric,
            "trainable_params": "params",
            "over_budget": "over_budget",
        },
        parameter_columns={"kind": "kind", "lr": "lr"},
        max_report_frequency=30,
        sort_by_metric=True,
        metric=plan.metric,
        mode=plan.mode,
    )


def build_tuner(plan: SearchPlan, setup, verbose: int = 1, callbacks: list | None = None):
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from pefttune.trainables.discrete import train_fn
    from pefttune.trainables.trial import make_trainable

    search = plan.config.search
    searcher = ConcurrencyLimiter(build_searcher(plan), max_concurrent=search.max_concurrent)
    return tune.Tuner(
        make_trainable(train_fn, setup),
        tune_config=tune.TuneConfig(
            search_alg=PefttuneSearchGenerator(searcher),  # restored to agree with the experiment state
            scheduler=build_scheduler(plan),
            num_samples=plan.num_samples,
            reuse_actors=search.reuse_actors,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=run_config(plan.config, plan.path, verbose=verbose, callbacks=callbacks or (),
                              reporter=progress_reporter(plan) if verbose >= 2 else None),
    )


def run_search(
    config: StudyConfig | str | Path,
    address: str | None = None,
    resume: bool = False,
    *,
    name: str | None = None,
    extra_points: list[FixedPoint] | None = None,
    resume_errored: bool = False,
    verbose: int = 1,
    faults: Faults | None = None,
    replicates: bool = True,
    prefill: bool = False,
    lr_choices=None,
):
    """Run (or resume) the discrete placement search of ``config``; returns the ResultGrid.

    ``extra_points`` adds fixed points (e.g. ``FixedPoint("darts-derived", placement=...)``)
    to a new search. ``resume=True`` finishes the unfinished trials of ``<storage>/<name>``
    and never re-runs finished ones (``resume_errored=True`` also retries errored trials).
    ``faults`` is the test seam (:class:`~pefttune.trainables.setup.Faults`). With
    ``train.lr_grid``, the fixed points train at the rates ``lr_choices`` holds
    (:class:`~pefttune.tuning.LrChoices`), chosen first by :func:`~pefttune.search.tune_lr.run_tune_lr`
    when not given (``pefttune run`` runs that as its own stage). Once the search
    finished, ``replicates`` trains the configurations again with the other seeds of
    ``train.seeds`` and the frozen reference (:mod:`pefttune.search.replicates`).  With
    ``prefill`` (``pefttune search``), a local search first fills the frozen cache
    (:func:`~pefttune.trainables.setup.prefill_local`; ``pefttune run`` does that once for both arms).

    ``verbose``: 0 prints nothing; 1 (default) one line per finished trial, a progress line
    and the summary (:mod:`pefttune.runtime.console`); 2 adds Ray's own console stream.
    """
    config = resolve_config(config, name)
    plan = build_search_plan(config, extra_points)
    restore = prepare_directory(plan, resume, write=False)
    setup = make_setup(config, plan.path, faults)
    if prefill:
        prefill_local(config, setup.data, address)

    started = connect_ray(address, log_to_driver=verbose >= 2)
    try:
        # before the Tuner (and before the config copy, so a refused search can be rerun)
        check_cluster_storage(config.storage, alive_nodes(), config.storage_shared)
        if lr_choices is None:
            from pefttune.search.tune_lr import run_tune_lr

            lr_choices = run_tune_lr(config, resume, verbose=verbose, faults=faults)
        plan.points = with_rates(plan.points, lr_choices)
        if not restore:
            write_config_copy(config, plan.path)
        with quiet_ray_loggers(verbose):  # Optuna's study is created or loaded here
            tuner = _search_tuner(plan, setup, restore, resume_errored, verbose)
        with fit_environment(), quiet_ray_loggers(verbose):
            results = tuner.fit()
        if replicates:
            from pefttune.search.replicates import run_replicates

            run_replicates(config, results_frame(results, config.train.epochs), resume, verbose=verbose, faults=faults)
    finally:
        if started:
            import ray

            ray.shutdown()
    if verbose:
        frame = results_frame(results, config.train.epochs)
        print(summary_table(frame, config))
        print("\n".join(failure_summary(frame).lines))
    return results


def _search_tuner(plan: SearchPlan, setup, restore: bool, resume_errored: bool, verbose: int):
    """The search's Tuner: restored to finish an earlier run, else new."""
    if restore:
        from ray import tune

        from pefttune.trainables.discrete import train_fn
        from pefttune.trainables.trial import make_trainable

        return tune.Tuner.restore(restore_path(plan.path), trainable=make_trainable(train_fn, setup),
                                  resume_unfinished=True, resume_errored=resume_errored,
                                  storage_filesystem=restore_filesystem(plan.path))
    console = Console("discrete arm", plan.config.metric, plan.mode, total=plan.num_samples, study_dir=plan.path)
    return build_tuner(plan, setup, verbose, [console.callback()] if verbose == 1 else None)


def load_study(path: str | Path, name: str | None = None):
    """The Optuna study of a search directory (sqlite default storage)."""
    import optuna

    path = Path(path)
    url = f"sqlite:///{path / OPTUNA_DB}"
    return optuna.load_study(study_name=name or path.name, storage=url)


