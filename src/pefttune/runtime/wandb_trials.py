"""One Weights & Biases run per trial: Ray Tune's ``WandbLoggerCallback``, offline by default.

Imported only when ``tracking.wandb`` is on (it imports wandb); built by
:func:`pefttune.runtime.tune_run.tune_callbacks`. A trial's W&B run id is its Ray trial id
(Ray's choice), and runs are opened with ``resume="allow"``: a trial resumed by ``--resume``
writes into the same run. Runs are grouped by the study's name, ``job_type`` the Ray experiment
(``.``, ``replicates``, ``darts``...). Offline runs land in ``<study>/wandb/wandb/offline-run-*``
(``wandb sync`` uploads them). As with MLflow, an error of the tracker (e.g. online without an
API key) is printed once and the study goes on.

Example::

    # experiment.yaml
    tracking:
      wandb: {project: ks-placements}       # offline; mode: online sends the runs to W&B
"""
from __future__ import annotations

import os

from ray.air.integrations.wandb import WandbLoggerCallback

from pefttune.runtime.tracking import tracker_off, warn_once


class WandbTrials(WandbLoggerCallback):
    """Ray's W&B callback for the Ray experiment ``experiment`` of a study."""

    def __init__(self, project: str, group: str, mode: str, folder: str, experiment: str):
        super().__init__(project=project, group=group, mode=mode, dir=folder, job_type=experiment, resume="allow")
        self.args = (project, group, mode, folder, experiment)
        self.label = f"W&B ({mode}) project {project}"

    def __reduce__(self):  # Ray pickles the run config (tuner.pkl): rebuilt from its arguments
        return (WandbTrials, self.args)

    def _guard(self, action, *args) -> None:
        if tracker_off(self.label):
            return
        try:
            action(*args)
        except Exception as err:  # noqa: BLE001 - a tracker never fails the study
            warn_once(self.label, err)

    def setup(self, *args, **kwargs) -> None:
        os.makedirs(self.args[3], exist_ok=True)
        os.environ["WANDB_MODE"] = self.args[2]  # Ray asks for an API key unless WANDB_MODE is offline
        self._guard(super().setup, *args)

    def log_trial_start(self, trial) -> None:
        self._guard(super().log_trial_start, trial)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        self._guard(super().log_trial_result, iteration, trial, result)

    def log_trial_save(self, trial) -> None:
        self._guard(super().log_trial_save, trial)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        self._guard(super().log_trial_end, trial, failed)

    def on_experiment_end(self, trials, **info) -> None:
        self._guard(super().on_experiment_end, trials)
