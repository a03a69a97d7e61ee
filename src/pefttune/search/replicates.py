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

Each trial config carries ``seed`` and ``config_id`` (the configuration it replicates, the
same for every seed: :func:`pefttune.runtime.study_dir.config_id`), so the analysis groups
a configuration's seeds. DARTS-derived placements get their seeds in the DARTS arm's retrain
experiment.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

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
from pefttune.schema import TrialKind, metric_key
from pefttune.search.space import fixed_points, validate_space
from pefttune.search.summary import top_k
from pefttune.trainables.setup import Faults, make_setup

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

    def trial_config(self, lr: float) -> dict:
        return {"config_id": self.config_id, "kind": self.kind, "method": self.method, "placement": self.placement,
                "seed": self.seed, "lr": lr, "budget_exempt": self.budget_exempt,
                "backbone": LOG_MEL if self.kind == TrialKind.LOG_MEL else None}


def frozen_placement(num_layers: int) -> Placement:
    return Placement.from_dict({"num_layers": num_layers, "layers": ["none"] * num_layers})


def plan_replicates(config: StudyConfig, search: pd.DataFrame) -> list[Replicate]:
    """The replicates of ``config`` given the search's results (one row per trial)."""
    seeds = config.train.replicate_seeds
    others = seeds[1:]
    space = validate_space(config, backbone_info(config.backbone))
    out: list[Replicate] = []

    def add(cid: str, kind: str, method: str, placement: Placement, with_seeds, exempt: bool = False) -> None:
        text = json.dumps(placement.to_dict(), separators=(",", ":"))
        out.extend(Replicate(cid, kind, method, text, s, exempt) for s in with_seeds)

    for point in fixed_points(config):
        placement = space.fixed_placement(point)
        add(point.extra.get("config_id") or config_id(point.kind, point.method, placement), point.kind,
            point.method or "", placement, others, config.search.budget_exempt_fixed)
    if config.search.frozen_reference:
        kind = TrialKind.FROZEN.value  # the references' configuration id is their kind
        add(kind, kind, "", frozen_placement(space.info.num_layers), seeds, True)
    if config.analysis.logmel_reference:
        kind = TrialKind.LOG_MEL.value
        add(kind, kind, "", Placement.from_dict({"num_layers": 0, "layers": []}), seeds, True)
    if config.search.replicate_top and others and len(search) and "kind" in search:
        metric = metric_key("dev", config.metric, best=True)
        best = top_k(search, metric, space_mode(config), k=len(search), kinds=[TrialKind.DISCRETE])
        chosen: list[str] = []
        for _, row in best.iterrows():
            placement = Placement.from_json(row["placement"])
            cid = config_id(TrialKind.DISCRETE, None, placement)
            if cid not in chosen:
                chosen.append(cid)
                add(cid, TrialKind.DISCRETE.value, "", placement, others)
            if len(chosen) == config.search.replicate_top:
                break
    return out


def space_mode(config: StudyConfig) -> str:
    from pefttune.metrics import metric_mode

    return metric_mode(config.metric)


#: The config fields a replicates plan is derived from (with the search's results).
PLAN_INPUTS = ("methods", "budget", "train.seeds", "train.lr", "search.hybrid", "search.uniform_baselines",
               "search.replicate_top", "search.frozen_reference", "search.budget_exempt_fixed",
               "analysis.logmel_reference")


def replicates_plan(config: StudyConfig, search: pd.DataFrame) -> GridPlan:
    """The replicates of ``config`` as data: one trial config per replicate."""
    trials = [r.trial_config(config.train.lr) for r in plan_replicates(config, search)]
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
    plan = replicates_plan(config, search)
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
