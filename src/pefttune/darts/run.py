"""The DARTS arm of an experiment on Ray Tune: search, derive, retrain (`pefttune darts`).

:func:`run_darts` runs two Ray Tune experiments inside the experiment folder
``<storage>/<name>/`` (the discrete search's folder):

- ``<storage>/<name>/darts/``: one trial of :func:`pefttune.trainables.darts.darts_fn` per
  (seed of the searches: ``train.seeds`` by default) x (variant in ``darts.variants``,
  default: the ``darts`` section itself); every trial reports alpha per epoch and ends with
  its derived placement (``derived_placement``, a JSON string);
- ``<storage>/<name>/darts-retrain/``: derived placements trained from scratch by the
  *discrete* trainable (:func:`pefttune.trainables.discrete.train_fn`) exactly as the uniform
  baselines are (``train.epochs``, the same budget check and final dev/test evaluation with
  predictions, at the rate the learning-rate protocol chose for the configuration on its first
  seed, in ``<storage>/<name>/tune-lr-darts/``: :mod:`pefttune.tuning`; ``train.lr`` without
  ``train.lr_grid``), tagged ``kind="darts-derived"``, with ``derived_from`` (the
  DARTS trials that derived it: ``"<trial_id> seed=<s> variant=<v>"``) in its trial config.
  With ``darts.retrain: per-seed`` (the default) the placement derived with seed k is trained
  with seed k, and all of them form one configuration, ``darts-derived``: DARTS as a method,
  whose search is inside every interval's seed level. With ``every-seed`` each distinct
  derived placement is trained with every seed of ``train.seeds`` (a configuration each).

The discrete search (``<storage>/<name>/`` itself) is untouched, so the two arms can run in
either order, and :mod:`pefttune.analysis.store` finds all three Ray experiments under the
one folder. Retrains are a separate Ray experiment rather than fixed points of the discrete
search so that they never enter its Optuna study (TPE would learn from them).

Resuming (``resume=True``) finishes unfinished DARTS trials, then starts the retrains or
finishes unfinished ones. A new run refuses a folder whose ``darts/`` already holds a
search; a run in a folder whose discrete search used another config is refused too.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import ray
from ray import tune

from pefttune.backbones import backbone_info
from pefttune.config import StudyConfig, resolve_config
from pefttune.placement import Placement
from pefttune.metrics import metric_mode
from pefttune.runtime.atomic_fs import restore_filesystem, restore_path
from pefttune.runtime.console import WIDTH, Console, Outcome, failure_summary, format_table, quiet_ray_loggers
from pefttune.runtime.cluster import (
    alive_nodes,
    check_cluster_storage,
    connect_ray,
    fit_environment,
    grid_tune_config,
    trial_name,
)
from pefttune.runtime.study_dir import (
    CONFIG_COPY,
    check_same_config,
    config_id,
    error_text,
    study_dir,
    holds_run,
    load_results,
    require_resumable,
    results_frame,
    write_config_copy,
)
from pefttune.runtime.plan import GridPlan, check_plan, grid_tuner, plan_inputs, restore_grid
from pefttune.runtime.tracking import check_tracking
from pefttune.runtime.tune_run import run_config
from pefttune.schema import CONTINUES, TrialKind, metric_key
from pefttune.trainables.darts import darts_candidates, darts_fn, variant_settings
from pefttune.trainables.discrete import train_fn
from pefttune.trainables.setup import Faults, make_setup, prefill_local
from pefttune.trainables.trial import make_trainable
from pefttune.tuning import DARTS_TUNE_DIR, LrChoices, LrProtocol, stored_choices, tune_rates

SEARCH_DIR = "darts"
RETRAIN_DIR = "darts-retrain"


@dataclass
class DerivedPlacement:
    """A placement derived by one or more DARTS trials."""

    placement: Placement
    trials: list[str] = field(default_factory=list)  # "<trial_id> seed=<s> variant=<v>"

    @property
    def key(self) -> str:
        return canonical(self.placement)


@dataclass
class DartsRun:
    """The two Ray experiments' results and what was derived."""

    path: str
    search: object  # ray.tune.ResultGrid of the DARTS trials
    derived: list[DerivedPlacement]
    retrain: object | None  # ResultGrid of the retrains (None when nothing was derived)

    def frame(self) -> pd.DataFrame:
        return darts_frame(self.search, self.retrain)


def canonical(placement: Placement) -> str:
    return json.dumps(placement.to_dict(), sort_keys=True, separators=(",", ":"))


def trial_space(config: StudyConfig) -> dict:
    """Ray param_space of the DARTS trials: seeds x variants."""
    variants = config.darts.variants or [{}]
    return {"seed": tune.grid_search(config.darts_seeds), "variant": tune.grid_search(list(variants))}


def validate(config: StudyConfig) -> None:
    """What can be checked before Ray starts (errors name the field)."""
    check_tracking(config)
    backbone_info(config.backbone)
    darts_candidates(config)  # the candidates must fit in one supernet layer
    for variant in config.darts.variants or [{}]:
        settings = variant_settings(config, variant)
        if settings.budget_penalty and config.budget is None:
            raise ValueError("darts.budget_penalty: needs `budget` (the expected-parameter penalty is relative to it)")
        if settings.hard and settings.relaxation != "gumbel":
            raise ValueError("darts.hard: straight-through one-hot weights need relaxation 'gumbel'")
        epochs = settings.epochs or config.train.epochs
        if settings.warmup_epochs >= epochs:
            raise ValueError(
                f"darts.warmup_epochs: {settings.warmup_epochs} warm-up epochs of {epochs} leave no alpha update"
            )


def prepare_directories(config: StudyConfig, path: str, resume: bool) -> None:
    """Refuse to overwrite a DARTS search; never mix configs in one experiment folder."""
    hint = "an experiment folder holds one config (choose another name, or use the saved config)"
    for copy in (f"{path}/{CONFIG_COPY}", f"{path}/{SEARCH_DIR}/{CONFIG_COPY}"):
        check_same_config(config, copy, hint)
    search = f"{path}/{SEARCH_DIR}"
    if resume:
        require_resumable(search, "DARTS search")
        return
    if holds_run(search) or holds_run(f"{path}/{RETRAIN_DIR}"):
        raise FileExistsError(
            f"{search} already holds a DARTS search; resume it (--resume) or choose another name"
        )
    write_config_copy(config, search)


def _run_config(config: StudyConfig, path: str, reporter, verbose: int, console: Console):
    # result.json always: the per-epoch alpha history is part of the results (Ray adds no second
    # JSON logger when its default loggers are on); one checkpoint per trial
    return run_config(config, path, verbose=verbose, callbacks=[console.callback()] if verbose == 1 else [],
                      reporter=reporter, keep=1, json_results=True)


def _reporter(config: StudyConfig, parameters: dict, extra: dict):
    metric = config.metric
    return tune.CLIReporter(
        metric_columns={"epoch": "epoch", metric_key("dev", metric): metric_key("dev", metric), **extra},
        parameter_columns=parameters,
        max_report_frequency=30,
    )


def _mode(config: StudyConfig) -> str:
    return metric_mode(config.metric)


def _search_trials(config: StudyConfig) -> int:
    return len(config.darts_seeds) * len(config.darts.variants or [{}])


def search_experiment(config: StudyConfig) -> StudyConfig:
    """The config the search trials see: ``resources.cpu`` set to ``darts.search_cpu`` when given."""
    cpu = config.darts.search_cpu
    if cpu is None or cpu == config.resources.cpu:
        return config
    return config.model_copy(update={"resources": config.resources.model_copy(update={"cpu": cpu})})


def search_tuner(config: StudyConfig, path: str, setup, verbose: int):
    reporter = _reporter(
        config, {"seed": "seed", "variant": "variant"},
        {"entropy_mean": "entropy", "none_share": "none", "derived_placement_short": "derived"},
    )
    return tune.Tuner(
        make_trainable(darts_fn, setup),
        param_space=trial_space(config),
        tune_config=tune.TuneConfig(
            num_samples=1,
            max_concurrent_trials=config.search.max_concurrent,
            reuse_actors=False,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=_run_config(config, f"{path}/{SEARCH_DIR}", reporter, verbose,
                               Console("DARTS search", config.metric, _mode(config), total=_search_trials(config),
                                       study_dir=path)),
    )


#: The config fields a retrain plan is derived from (with the derived placements).
RETRAIN_INPUTS = ("train.seeds", "train.lr", "train.lr_grid", "train.lr_rung", "train.epochs", "darts.retrain",
                  "darts.seeds", "darts.variants")


@dataclass(frozen=True)
class SearchOutcome:
    """What one finished DARTS search trial derived."""

    seed: int
    variant: str  # variant label ("base" for the darts section itself)
    placement: Placement
    label: str  # "<trial_id> seed=<s> variant=<v>"


def search_outcomes(results) -> list[SearchOutcome]:
    """The finished DARTS search trials' derived placements, by variant and seed."""
    out = []
    for result in results:
        metrics = result.metrics or {}
        text = metrics.get("derived_placement")
        if result.error or not text or "derived_dev_loss" not in metrics:  # not finished
            continue
        label = f"{metrics.get('trial_id', '?')} seed={metrics.get('seed')} variant={metrics.get('variant')}"
        out.append(SearchOutcome(int(metrics["seed"]), str(metrics.get("variant") or "base"),
                                 Placement.from_json(text), label))
    return sorted(out, key=lambda o: (o.variant, o.seed))


def derived_config_id(config: StudyConfig, variant: str) -> str:
    """The configuration id of DARTS-derived retrains with ``darts.retrain: per-seed``: one per variant."""
    kind = TrialKind.DARTS_DERIVED.value
    return kind if len(config.darts.variants) <= 1 else f"{kind}:{variant}"


def _retrain_trial(config: StudyConfig, cid: str, placement: Placement, sources: list[str], seed: int,
                   choices: LrChoices) -> dict:
    return {"config_id": cid, "kind": TrialKind.DARTS_DERIVED.value, "method": "",
            "placement": json.dumps(placement.to_dict(), separators=(",", ":")), "derived_from": list(sources),
            "seed": seed, "lr": choices.lr(cid, config.train.lr), "epochs": config.train.epochs,
            CONTINUES: choices.continues(cid, seed)}


def retrain_plan(config: StudyConfig, search, choices: LrChoices | None = None) -> GridPlan:
    """The retrains of the derived placements, as the uniform baselines are trained, at the rates
    the learning-rate protocol chose for their configurations (``choices``; none: ``train.lr``).

    ``per-seed``: the placement derived with seed k trained with seed k (DARTS as a method);
    ``every-seed``: each distinct derived placement trained with every seed of ``train.seeds``."""
    choices = choices or LrChoices()
    if config.darts.retrain == "per-seed":
        trials = [_retrain_trial(config, derived_config_id(config, o.variant), o.placement, [o.label], o.seed, choices)
                  for o in search_outcomes(search)]
    else:
        trials = [_retrain_trial(config, config_id(TrialKind.DARTS_DERIVED, None, d.placement), d.placement, d.trials,
                                 seed, choices)
                  for d in collect_derived(search) for seed in config.train.replicate_seeds]
    return GridPlan(trials, plan_inputs(config, RETRAIN_INPUTS))


def derived_candidates(config: StudyConfig, search) -> list[dict]:
    """The first-seed trial of each DARTS-derived configuration, which the learning-rate protocol
    tunes: ``per-seed``, per variant, the placement derived with the lowest seed, trained with it;
    ``every-seed``, each distinct derived placement with ``train.seed``."""
    plan = retrain_plan(config, search)
    first: dict[str, dict] = {}
    for trial in sorted(plan.trials, key=lambda t: t["seed"]):
        first.setdefault(trial["config_id"], trial)
    return list(first.values())


def tune_derived(config: StudyConfig, search, resume: bool = False, *, verbose: int = 1,
                 root: str | None = None) -> LrChoices:
    """The rates of the DARTS-derived configurations (:mod:`pefttune.tuning`, Ray connected): the
    study's ``tune-lr-darts`` choices; a further-seeds round (``root``) tunes in its own folder only a
    configuration the study's choices lack. No choices without ``train.lr_grid``."""
    if LrProtocol.of(config) is None:
        return LrChoices()
    candidates = derived_candidates(config, search)
    stored = stored_choices(config, DARTS_TUNE_DIR, required=False) if root is not None else None
    if stored is not None and all(c["config_id"] in stored.choices for c in candidates):
        return stored
    path = f"{root or study_dir(config)}/{DARTS_TUNE_DIR}"
    setup = make_setup(config, path)
    return tune_rates(config, path, candidates, make_trainable(train_fn, setup), resume=resume, verbose=verbose,
                      title="DARTS tune-lr")


def retrain_tuner(config: StudyConfig, path: str, setup, plan: GridPlan, verbose: int):
    best = metric_key("dev", config.metric, best=True)
    reporter = _reporter(config, {"point": "point"}, {best: "best", "placement_short": "placement"})
    console = Console("DARTS retrain", config.metric, _mode(config), total=len(plan.trials), study_dir=path)
    return grid_tuner(make_trainable(train_fn, setup), f"{path}/{RETRAIN_DIR}", plan,
                      grid_tune_config(config.search.max_concurrent, config.search.reuse_actors),
                      _run_config(config, f"{path}/{RETRAIN_DIR}", reporter, verbose, console))


def collect_derived(results) -> list[DerivedPlacement]:
    """Distinct derived placements of the finished DARTS trials, each with the trials that derived
    it in (variant, seed) order, the placements in the order of their first trial: the same
    whatever order Ray returns the results in (a restored experiment returns them in another)."""
    by_key: dict[str, DerivedPlacement] = {}
    for outcome in search_outcomes(results):
        by_key.setdefault(canonical(outcome.placement), DerivedPlacement(outcome.placement)).trials.append(outcome.label)
    return list(by_key.values())


def run_darts(
    config: StudyConfig | str | Path,
    address: str | None = None,
    resume: bool = False,
    *,
    name: str | None = None,
    verbose: int = 1,
    faults: Faults | None = None,
    prefill: bool = False,
) -> DartsRun:
    """Search (one trial per seed x variant), derive, and retrain the derived placements.

    Results land in ``<storage>/<name>/darts`` and ``<storage>/<name>/darts-retrain`` (see
    the module docstring). ``address`` joins a running Ray; ``resume`` finishes an
    interrupted run. ``faults`` is the test seam (:class:`~pefttune.trainables.setup.Faults`),
    given to the DARTS trials. Raises RuntimeError when no DARTS trial finished.  With
    ``prefill`` (``pefttune darts``), a local run first fills the frozen cache with the
    experiment's own ``resources``, so the search trials (``darts.search_cpu`` threads) read the
    states a study's trials would.
    """
    config = resolve_config(config, name)
    validate(config)
    path = study_dir(config)
    prepare_directories(config, path, resume)
    if prefill:
        prefill_local(config, make_setup(config, f"{path}/{RETRAIN_DIR}").data, address)
    started = connect_ray(address, log_to_driver=verbose >= 2)
    try:
        check_cluster_storage(config.storage, alive_nodes(), config.storage_shared)
        search = run_darts_search(config, resume, verbose=verbose, faults=faults, local=address is None)
        derived = collect_derived(search)
        retrain = run_darts_retrain(config, search, resume, verbose=verbose)
    finally:
        if started:
            ray.shutdown()
    run = DartsRun(path, search, derived, retrain)
    if verbose:
        print(summary(run, config))
        print("\n".join(run_outcome(run).lines))
    return run


def run_darts_search(config: StudyConfig, resume: bool = False, *, verbose: int = 1,
                     faults: Faults | None = None, local: bool = True, root: str | None = None):
    """The relaxation search (Ray connected, folders prepared by :func:`prepare_directories`) into
    ``<root>/darts`` (default root: the study folder); returns its ResultGrid. Raises
    RuntimeError when no DARTS trial finished."""
    path = root or study_dir(config)
    search_path = f"{path}/{SEARCH_DIR}"
    setup = dataclasses.replace(make_setup(config, search_path, faults), experiment=search_experiment(config))
    if local and config.darts.search_cpu:  # a local Ray: a trial it cannot place would wait forever
        have = ray.cluster_resources().get("CPU", 0)
        if config.darts.search_cpu > have:
            raise ValueError(f"darts.search_cpu: {config.darts.search_cpu:g} CPUs per search trial, but this "
                             f"machine's Ray has {have:g}")
    if resume and holds_run(search_path):
        tuner = tune.Tuner.restore(restore_path(search_path), trainable=make_trainable(darts_fn, setup),
                                   resume_unfinished=True, storage_filesystem=restore_filesystem(search_path))
    else:
        tuner = search_tuner(config, path, setup, verbose)
    with fit_environment(), quiet_ray_loggers(verbose):
        search = tuner.fit()
    if not collect_derived(search):
        errors = [str(r.error).strip().splitlines()[-1] for r in search if r.error]
        raise RuntimeError(f"darts: no DARTS trial finished ({len(errors)} errors: {errors[:3]})")
    return search


def run_darts_retrain(config: StudyConfig, search, resume: bool = False, *, verbose: int = 1,
                      root: str | None = None):
    """Retrain what the DARTS search (its ResultGrid) derived, per :func:`retrain_plan` (Ray
    connected), into ``<root>/darts-retrain`` (default root: the study folder); returns the
    ResultGrid. A resume finishes the stored plan (``darts-retrain/plan.json``)."""
    path = root or study_dir(config)
    retrain_path = f"{path}/{RETRAIN_DIR}"
    choices = tune_derived(config, search, resume, verbose=verbose, root=root)
    setup = make_setup(config, retrain_path)
    plan = retrain_plan(config, search, choices)
    if resume and holds_run(retrain_path):
        check_plan(retrain_path, plan)
        tuner = restore_grid(retrain_path, make_trainable(train_fn, setup))
    else:
        tuner = retrain_tuner(config, path, setup, plan, verbose)
    with fit_environment(), quiet_ray_loggers(verbose):
        return tuner.fit()


def run_outcome(run: DartsRun) -> Outcome:
    """Grouped failures of the DARTS search and the retrains, and the exit status: non-zero
    when every DARTS search trial or every retrain failed."""
    frames = [darts_frame(run.search).assign(kind=TrialKind.DARTS.value)]
    if run.retrain is not None:
        frames.append(results_frame(run.retrain))
    frame = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else frames[0]
    if "error" not in frame:
        frame["error"] = ""
    return failure_summary(frame)


# -- results ------------------------------------------------------------------------------------------


def darts_frame(search, retrain=None) -> pd.DataFrame:
    """One row per DARTS trial: seed, variant, search scores, collapse guard, derived
    placement, and the retrained placement's scores (``retrain_*`` columns)."""
    rows = []
    for result in search:
        metrics = result.metrics or {}
        config = result.config or {}
        row = {
            "trial_id": metrics.get("trial_id", ""),
            "status": "ERROR" if result.error else "TERMINATED",
            "error": error_text(result.error) if result.error else "",
            "seed": metrics.get("seed", config.get("seed")),
            "variant": metrics.get("variant", ""),
        }
        row.update({k: v for k, v in metrics.items() if not k.startswith(("alpha/", "entropy/")) and k != "config"})
        rows.append(row)
    frame = pd.DataFrame(rows)
    if retrain is None or frame.empty or "derived_placement" not in frame:
        return frame
    retrained = results_frame(retrain)
    if retrained.empty or "placement" not in retrained:
        return frame
    keep = [c for c in retrained.columns if c.startswith(("best_dev_", "test_")) or c in ("trial_id", "status", "epoch")]
    retrained = retrained[keep + ["placement"]].copy()
    retrained["key"] = [canonical(Placement.from_json(p)) for p in retrained["placement"]]
    # one row per derived placement: scores are the mean over its seeds (train.seeds)
    scores = [c for c in keep if c.startswith(("best_dev_", "test_"))]
    how = {c: "mean" for c in scores}
    how.update({c: f for c, f in (("trial_id", lambda ids: ",".join(map(str, ids))),
                                  ("status", lambda s: s.iloc[0] if s.nunique() == 1 else "MIXED"),
                                  ("epoch", "min")) if c in retrained})
    grouped = retrained.groupby("key", sort=False)
    retrained = grouped.agg(how).join(grouped.size().rename("seeds")).reset_index()
    retrained = retrained.add_prefix("retrain_").rename(columns={"retrain_key": "key"})
    frame["key"] = [canonical(Placement.from_json(p)) if isinstance(p, str) else None for p in frame["derived_placement"]]
    return frame.merge(retrained, on="key", how="left").drop(columns=["key"])


def summary(run: DartsRun, config: StudyConfig) -> str:
    metric = config.metric
    frame = run.frame()
    columns = [
        c for c in ["seed", "variant", metric_key("dev", metric, best=True), "entropy_mean", "none_share",
                    "derived_placement_short", "derived_params", "derived_" + metric_key("dev", metric),
                    "retrain_" + metric_key("dev", metric, best=True), "retrain_" + metric_key("test", metric)]
        if c in frame
    ]
    lines = [f"DARTS {config.name}: {len(frame)} search trial(s), {len(run.derived)} distinct derived placement(s)"]
    lines.append(format_table(frame, columns, WIDTH))
    return "\n".join(lines)


def load_darts(path: str | Path) -> pd.DataFrame:
    """:func:`darts_frame` of an experiment folder, read from storage without running anything."""
    path = str(path)
    search = load_results(f"{path}/{SEARCH_DIR}")
    retrain = load_results(f"{path}/{RETRAIN_DIR}") if holds_run(f"{path}/{RETRAIN_DIR}") else None
    return darts_frame(search, retrain)


def darts_started(config: StudyConfig) -> bool:
    """Whether ``<storage>/<name>/darts`` holds a DARTS search (``pefttune run --resume``
    resumes it then, and starts it otherwise)."""
    return holds_run(f"{study_dir(config)}/{SEARCH_DIR}")
