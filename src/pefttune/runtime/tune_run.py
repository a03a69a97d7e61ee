"""Ray's run config of every Ray experiment of a study, in one place.

The discrete search, the replicates, the DARTS search and retrains and the rounds of further
seeds are Ray experiments in the study folder; :func:`run_config` gives each the same
checkpointing (the newest ``keep`` checkpoints), retries (``search.max_failures``), console
(``verbose``), the tracking callbacks of ``tracking:`` (:mod:`pefttune.runtime.tracking`) and,
in a local folder, atomic writes of Ray's state files (:mod:`pefttune.runtime.atomic_fs`: pass
:func:`~pefttune.runtime.atomic_fs.restore_filesystem` to ``Tuner.restore`` too).

Example::

    from pefttune.runtime.study_dir import study_dir
    run_config(config, f"{study_dir(config)}/replicates", verbose=1, callbacks=[console.callback()])
"""
from __future__ import annotations

import os
from typing import Sequence

from pefttune.config import StudyConfig
from pefttune.runtime.atomic_fs import ray_storage_filesystem
from pefttune.runtime.study_dir import study_dir
from pefttune.runtime.tracking import mlflow_target, relative_experiment


def run_config(config: StudyConfig, path: str, *, verbose: int = 1, callbacks: Sequence = (), reporter=None,
               keep: int = 2, json_results: bool = False):
    """``tune.RunConfig`` of the Ray experiment at ``path`` (``<storage path>/<name>``).

    ``verbose``: 0 silent, 1 pefttune's console (the given ``callbacks``), 2 Ray's status table
    (``reporter``) as well. ``keep``: checkpoints kept per trial (two: the one the last experiment
    snapshot refers to still exists when a resume needs it). ``json_results``: Ray's JSON logger
    even where its default loggers are off (a history that is part of the results)."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    storage, name = path.rstrip("/").rsplit("/", 1)
    extra = [JsonLoggerCallback()] if json_results else []
    filesystem = ray_storage_filesystem(storage)
    return tune.RunConfig(
        name=name,
        storage_path=storage if filesystem is None else os.path.abspath(storage),
        storage_filesystem=filesystem,  # a local folder: Ray's state files written atomically
        checkpoint_config=tune.CheckpointConfig(num_to_keep=keep),
        failure_config=tune.FailureConfig(max_failures=config.search.max_failures),
        progress_reporter=reporter if verbose >= 2 else None,
        verbose=1 if verbose >= 2 else 0,
        callbacks=extra + list(callbacks) + tune_callbacks(config, study_dir(config), path),
    )


def tune_callbacks(config: StudyConfig, study_path: str, experiment_path: str) -> list:
    """The tracking callbacks of one Ray experiment of the study (``experiment_path``: its folder)."""
    if config.tracking is None:
        return []
    experiment = relative_experiment(experiment_path, study_path)
    out: list = []
    target = mlflow_target(config, study_path)
    if target is not None:
        from pefttune.runtime.mlflow_trials import MlflowTrials  # imports MLflow: only when it is on

        out.append(MlflowTrials(target, experiment))
    wandb = config.tracking.wandb
    if wandb is not None:
        from pefttune.runtime.wandb_trials import WandbTrials  # imports wandb: only when it is on

        out.append(WandbTrials(wandb.project or config.name, config.name, wandb.mode,
                               wandb.dir or f"{study_path}/wandb", experiment))
    return out
