"""A grid experiment's trials, stored as data in its folder (``plan.json``).

The replicates and the DARTS retrains are grid experiments: a fixed list of trial configs,
one Ray trial each. Ray keeps a ``tune.sample_from`` value as a reference to its function in every
trial config and resolves it from the ``param_space`` it is given; ``Tuner.restore`` without
that ``param_space`` leaves ``('__fn_ph', ...)`` tuples where the values should be. So such an
experiment writes its trial configs to ``plan.json`` before Ray starts it, and a resume rebuilds
the same ``param_space`` from that file (:func:`restore_grid`), never from a recomputation.

A plan also records the config fields it was derived from (``inputs``, dotted names). A resume
whose config would give another plan is refused, naming the fields (:func:`check_plan`).

Example::

    plan = GridPlan(trials=[{"seed": 0, "lr": 0.01}, {"seed": 1, "lr": 0.01}], inputs={"train.seeds": [0, 1]})
    write_plan(path, plan)
    tuner = grid_tuner(trainable, plan, tune_config, run_config)   # a new run
    tuner = restore_grid(path, trainable)                          # after a kill
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ray import tune

from pefttune.runtime.atomic_fs import restore_filesystem, restore_path
from pefttune.runtime.storage import read_storage_text, write_storage_text

PLAN_FILE = "plan.json"
#: The grid's index key in every trial config of a planned experiment.
POINT = "point"


@dataclass(frozen=True)
class GridPlan:
    """The trial configs of a grid experiment (the same keys in every trial), and the config
    fields they were derived from."""

    trials: list[dict]
    inputs: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"trials": self.trials, "inputs": self.inputs}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GridPlan":
        data = json.loads(text)
        return cls(list(data["trials"]), dict(data.get("inputs") or {}))


def plan_inputs(config, fields: tuple[str, ...]) -> dict:
    """The values of ``fields`` (dotted names, e.g. ``train.seeds``) in ``config``."""
    dumped = config.model_dump(mode="json")
    out = {}
    for name in fields:
        value = dumped
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        out[name] = value
    return out


def write_plan(path: str, plan: GridPlan) -> None:
    write_storage_text(f"{path}/{PLAN_FILE}", plan.to_json())


def read_plan(path: str) -> GridPlan | None:
    text = read_storage_text(f"{path}/{PLAN_FILE}")
    return None if text is None else GridPlan.from_json(text)


def check_plan(path: str, current: GridPlan) -> None:
    """Refuse to resume ``path`` when ``current`` (the plan the config gives now) differs from
    the stored one; the error names the config fields, else the trials, that differ."""
    stored = read_plan(path)
    key = lambda t: json.dumps(t, sort_keys=True)  # noqa: E731
    if stored is None or (stored.inputs == current.inputs
                          and sorted(map(key, stored.trials)) == sorted(map(key, current.trials))):
        return  # the same trials (a restore runs them in the stored order)
    fields = sorted(k for k in set(stored.inputs) | set(current.inputs)
                    if stored.inputs.get(k) != current.inputs.get(k))
    if fields:
        raise ValueError(f"--resume: {path}/{PLAN_FILE} was planned with other values of {', '.join(fields)}; "
                         "resume with the saved config, or start a study of another name")
    gone = {key(t) for t in stored.trials} - {key(t) for t in current.trials}
    new = {key(t) for t in current.trials} - {key(t) for t in stored.trials}
    raise ValueError(f"--resume: the trials planned in {path}/{PLAN_FILE} differ from those this config gives "
                     f"({len(gone)} planned trial(s) no longer given, {len(new)} new); resume with the saved "
                     "config, or start a study of another name")


def grid_space(trials: list[dict]) -> dict:
    """Ray ``param_space``: one grid point per trial, each key of its config looked up by the point."""
    keys = list(trials[0])
    return {
        POINT: tune.grid_search(list(range(len(trials)))),
        **{key: tune.sample_from(lambda spec, key=key: trials[spec[POINT]][key]) for key in keys},
    }


def grid_tuner(trainable, path: str, plan: GridPlan, tune_config, run_config):
    """A new grid experiment at ``path`` (its ``plan.json`` written first)."""
    write_plan(path, plan)
    return tune.Tuner(trainable, param_space=grid_space(plan.trials), tune_config=tune_config, run_config=run_config)


def restore_grid(path: str, trainable):
    """Restore the grid experiment at ``path`` to finish its unfinished trials, its values resolved
    from the stored plan."""
    plan = read_plan(path)
    if plan is None:
        raise FileNotFoundError(f"--resume: {path} holds a run but no {PLAN_FILE}; it cannot be resumed")
    return tune.Tuner.restore(restore_path(path), trainable=trainable, resume_unfinished=True,
                              param_space=grid_space(plan.trials), storage_filesystem=restore_filesystem(path))
