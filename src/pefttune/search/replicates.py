"""Replicates of the discrete arm: the same configurations trained with the other seeds.

The search itself (Optuna/ASHA) runs once, with ``train.seed`` (= ``train.seeds[0]``). Once it
finished, :func:`run_replicates` trains, as one Ray experiment ``<storage>/<name>/replicates``
(FIFO, no early stopping, never told to Optuna):

- every fixed point (one uniform trial per method, the hybrid) with each other seed;
- the ``frozen`` reference (no PEFT in any layer, head only) with every seed
  (``search.frozen_reference``);
- the ``log-mel`` reference (the same head on log-mel features, no SSL encoder: the
  ``log-mel`` pseudo-backbone) with every seed (``analysis.logmel_reference``);
- the ``search.replicate_top`` best searched placements by dev (completed trials, distinct
  placements) with each other seed.

Each trial trains at its configuration's rate (:mod:`pefttune.tuning`: the fixed
configurations' chosen in the tune-lr stage, a searched placement's drawn by its search; without
``train.lr_grid`` every one at ``train.lr``); the references train ``train.reference_epochs``.
Each trial config carries ``seed`` and ``config_id`` (the configuration it replicates, the
same for every seed: :func:`pefttune.runtime.study_dir.config_id`), so the analysis groups
a configuration's seeds. DARTS-derived placements get their seeds in the DARTS arm's retrain
experiment.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace

import pandas as pd

from pefttune.backbones import LOG_MEL, backbone_info
from pefttune.config import StudyConfig
from pefttune.placement import Placement
from pefttune.runtime.cluster import fit_environment, grid_tune_config
from pefttune.runtime.console import Console, quiet_ray_loggers
from pefttune.runtime.plan import GridPlan, check_plan, grid_tuner, plan_inputs, restore_grid
from pefttune.runtime.study_dir import (
    config_id,
    study_dir,
    holds_run,
    load_results,
    results_frame,
)
from pefttune.runtime.tune_run import run_config
from pefttune.schema import CONTINUES, TrialKind, metric_key
from pefttune.search.space import fixed_points, validate_space
from pefttune.search.summary import top_k
from pefttune.trainables.setup import Faults, make_setup
from pefttune.tuning import REFERENCE_KINDS, LrChoices, stored_choices, trial_epochs

REPLICATES_DIR = "replicates"


@dataclass(frozen=True)
class Replicate:
    """One trial of the replicates experiment."""

    config_id: str
    kind: str
    method: str
    placement: str  # JSON
    seed: int
    budget_exempt: bool = False  # as in the search: fixed points per search.budget_exempt_fixed
    lr: float | None = None  # None: train.lr
    epochs: int | None = None  # None: train.epochs (the references: train.reference_epochs)
    head_lr: float | None = None  # None: train.head_lr (the references: their chosen rate)
    continues: str | None = None  # the rung checkpoint it starts from (the chosen rate's first seed)

    def trial_config(self) -> dict:
        return {"config_id": self.config_id, "kind": self.kind, "method": self.method, "placement": self.placement,
                "seed": self.seed, "lr": self.lr, "head_lr": self.head_lr, "epochs": self.epochs,
                "budget_exempt": self.budget_exempt, "backbone": LOG_MEL if self.kind == TrialKind.LOG_MEL else None,
                CONTINUES: self.continues}


def frozen_placement(num_layers: int) -> Placement:
    return Placement.from_dict({"num_layers": num_layers, "layers": ["none"] * num_layers})


def fixed_configurations(config: StudyConfig) -> list[Replicate]:
    """Every fixed configuration a finding or a reference row uses, as its first seed's trial
    (``train.seed``, at ``train.lr``): the search's fixed points (uniform baselines, hybrid) and the
    references ``frozen`` (``search.frozen_reference``) and ``log-mel`` (``analysis.logmel_reference``)."""
    space = validate_space(config, backbone_info(config.backbone))
    seed, lr = config.train.seed, config.train.lr

    def make(cid: str, kind: str, method: str, placement: Placement, exempt: bool) -> Replicate:
        text = json.dumps(placement.to_dict(), separators=(",", ":"))
        return Replicate(cid, kind, method, text, seed, exempt, lr, trial_epochs(config, kind))

    out = []
    for point in fixed_points(config):
        placement = space.fixed_placement(point)
        out.append(make(point.extra.get("config_id") or config_id(point.kind, point.method, placement), point.kind,
                        point.method or "", placement, config.search.budget_exempt_fixed))
    if config.search.frozen_reference:
        kind = TrialKind.FROZEN.value  # the references' configuration id is their kind
        out.append(make(kind, kind, "", frozen_placement(space.info.num_layers), True))
    if config.analysis.logmel_reference:
        kind = TrialKind.LOG_MEL.value
        out.append(make(kind, kind, "", Placement.from_dict({"num_layers": 0, "layers": []}), True))
    return out


def plan_replicates(config: StudyConfig, search: pd.DataFrame, choices: LrChoices | None = None) -> list[Replicate]:
    """The replicates of ``config`` given the search's results (one row per trial) and the rates
    the learning-rate protocol chose (``choices``; none: ``train.lr``). The search's fixed points
    train their first seed in the search; the references every seed here; a searched placement
    keeps the rate its searched trial drew."""
    seeds = config.train.replicate_seeds
    others = seeds[1:]
    choices = choices or LrChoices()
    out: list[Replicate] = []
    for fixed in fixed_configurations(config):
        rate = choices.lr(fixed.config_id, config.train.lr)
        reference = fixed.kind in REFERENCE_KINDS  # the head alone: the chosen rate is the head's
        head = rate if reference and fixed.config_id in choices.choices else None
        out.extend(replace(fixed, seed=s, lr=rate, head_lr=head, continues=choices.continues(fixed.config_id, s))
                   for s in (seeds if reference else others))
    if config.search.replicate_top and others and len(search) and "kind" in search:
        metric = metric_key("dev", config.metric, best=True)
        best = top_k(search, metric, space_mode(config), k=len(search), kinds=[TrialKind.DISCRETE])
        chosen: list[str] = []
        for _, row in best.iterrows():
            placement = Placement.from_json(row["placement"])
            cid = config_id(TrialKind.DISCRETE, None, placement)
            if cid not in chosen:
                chosen.append(cid)
                rate = float(row["lr"]) if "lr" in row and pd.notna(row["lr"]) else config.train.lr
                text = json.dumps(placement.to_dict(), separators=(",", ":"))
                out.extend(Replicate(cid, TrialKind.DISCRETE.value, "", text, s, False, rate, config.train.epochs)
                           for s in others)
            if len(chosen) == config.search.replicate_top:
                break
    return out


def space_mode(config: StudyConfig) -> str:
    from pefttune.metrics import metric_mode

    return metric_mode(config.metric)


#: The config fields a replicates plan is derived from (with the search's results and the chosen rates).
PLAN_INPUTS = ("methods", "budget", "train.seeds", "train.lr", "train.lr_grid", "train.lr_rung", "train.epochs",
               "train.reference_epochs", "search.hybrid", "search.uniform_baselines", "search.replicate_top",
               "search.frozen_reference", "search.budget_exempt_fixed", "analysis.logmel_reference")


def replicates_plan(config: StudyConfig, search: pd.DataFrame, choices: LrChoices | None = None) -> GridPlan:
    """The replicates of ``config`` as data: one trial config per replicate."""
    trials = [r.trial_config() for r in plan_replicates(config, search, choices)]
    return GridPlan(trials, plan_inputs(config, PLAN_INPUTS))


def run_replicates(
    config: StudyConfig,
    search: pd.DataFrame,
    resume: bool = False,
    *,
    verbose: int = 1,
    faults: Faults | None = None,
):
    """Train the replicates of ``config`` (Ray must be connected); returns the ResultGrid, or
    None when there is nothing to replicate. ``resume`` finishes an interrupted replicates run
    from its stored plan (``replicates/plan.json``), refusing one this config would plan otherwise."""
    from pefttune.trainables.discrete import train_fn
    from pefttune.trainables.trial import make_trainable

    path = replicates_path(config)
    setup = make_setup(config, path, faults)
    plan = replicates_plan(config, search, stored_choices(config))
    if resume and holds_run(path):
        check_plan(path, plan)
        tuner = restore_grid(path, make_trainable(train_fn, setup))
    else:
        if not plan.trials:
            return None
        if holds_run(path):
            raise FileExistsError(f"{path} already holds replicates; resume them (--resume)")
        console = Console("replicates", config.metric, space_mode(config), total=len(plan.trials),
                          study_dir=study_dir(config))
        tuner = grid_tuner(make_trainable(train_fn, setup), path, plan,
                           grid_tune_config(config.search.max_concurrent, config.search.reuse_actors),
                           run_config(config, path, verbose=verbose,
                                      callbacks=[console.callback()] if verbose == 1 else []))
    with fit_environment(), quiet_ray_loggers(verbose):
        results = tuner.fit()
    if verbose:
        frame = results_frame(results, config.train.epochs)
        ok = int((frame["status"] == "TERMINATED").sum()) if len(frame) else 0
        print(f"replicates: {ok} of {len(frame)} trials finished", flush=True)
    return results


def replicates_path(config: StudyConfig) -> str:
    return f"{study_dir(config)}/{REPLICATES_DIR}"


def load_replicates(config: StudyConfig):
    path = replicates_path(config)
    return load_results(path) if holds_run(path) else None
