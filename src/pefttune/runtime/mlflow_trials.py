"""One MLflow run per trial: Ray Tune's ``MLflowLoggerCallback`` with the study's identity rules.

Imported only when ``tracking.mlflow`` is on (it imports MLflow); built by
:func:`pefttune.runtime.tune_run.tune_callbacks` (:mod:`pefttune.runtime.tracking` says what a
trial's run holds). Compared with Ray's callback:

- a trial's run is found again after ``Tuner.restore`` (``--resume``) through
  ``<study>/tracking/mlflow-runs.json`` or its ``pefttune_run`` tag, and marked RUNNING again,
  instead of a new run per restore; when Ray gives a trial a new id (a grid restored from a
  snapshot older than its trials makes them again), the run of the same trial config whose Ray
  trial is gone (tag ``pefttune_config``) follows it; at the end of the experiment, runs of trials
  that are no longer in it are marked KILLED;
- it is nested under the study's run and tagged ``kind``, ``config_id``, ``seed`` (from the trial
  config, else from the first result that reports them);
- metrics go in one ``log_batch`` per result with step ``epoch``; names MLflow refuses
  (``alpha/L00/houlsby+lora``) are rewritten (``alpha/L00/houlsby_lora``); Ray's bookkeeping
  keys and the nested config are not metrics;
- any tracker error is printed once and tracking goes off for the process: the study goes on.

Example::

    from pefttune.runtime.tracking import mlflow_target
    callback = MlflowTrials(mlflow_target(config, study_path), "replicates")
    tune.RunConfig(..., callbacks=[callback])
"""
from __future__ import annotations

import hashlib
import json
import numbers
import re
import time

from ray.air.integrations.mlflow import MLflowLoggerCallback

from pefttune.runtime.tracking import (
    RUN_TAG,
    MlflowTarget,
    RunIds,
    existing_run,
    experiment_id,
    mlflow_client,
    tagged_run,
    tracker_off,
    warn_once,
)

#: Trial-config and result keys that become tags of a trial's run.
TRIAL_TAGS = ("kind", "config_id", "seed", "method", "variant")
#: Longest parameter value MLflow stores.
MAX_PARAM = 6000
#: Ray's bookkeeping keys: not metrics.
SKIPPED_KEYS = ("config", "trial_id", "date", "hostname", "node_ip", "pid", "timestamp", "done")
#: The tag that names a trial's configuration in its Ray experiment (the same under a new Ray id).
CONFIG_TAG = "pefttune_config"
BATCH = 100  # parameters per log_batch (MLflow's limit)
METRIC_BATCH = 900  # metrics per log_batch (MLflow's limit: 1000)


def mlflow_name(key: str) -> str:
    """A metric or parameter name MLflow accepts (``alpha/L00/houlsby+lora`` -> ``alpha/L00/houlsby_lora``)."""
    return re.sub(r"[^\w./\- :]", "_", key)[:250]


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_key(experiment: str, config: dict) -> str:
    """``<Ray experiment>/<SHA-256 of the trial config, 16 hex digits>``."""
    text = json.dumps(config, sort_keys=True, default=str)
    return f"{experiment}/{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def trial_tags(values: dict) -> dict[str, str]:
    """The :data:`TRIAL_TAGS` of a trial config or result that are plain values."""
    return {k: str(values[k]) for k in TRIAL_TAGS
            if values.get(k) is not None and not isinstance(values[k], (dict, list))}


class MlflowTrials(MLflowLoggerCallback):
    """One MLflow run per trial of the Ray experiment ``experiment`` (relative to the study folder)."""

    def __init__(self, target: MlflowTarget, experiment: str):
        super().__init__(tracking_uri=target.uri, experiment_name=target.experiment)
        self.target = target
        self.experiment = experiment
        self._trial_runs: dict = {}
        self._tagged: dict = {}
        self._live: set[str] = set()  # the Ray trial ids of the experiment

    def __reduce__(self):  # Ray pickles the run config (tuner.pkl): rebuilt from its target, no live client
        return (MlflowTrials, (self.target, self.experiment))

    def _guard(self, action, *args) -> None:
        if tracker_off(self.target.label):
            return
        try:
            action(*args)
        except Exception as err:  # noqa: BLE001 - a tracker never fails the study
            warn_once(self.target.label, err)

    # -- Ray's LoggerCallback hooks ------------------------------------------------------------------

    def setup(self, *args, **kwargs) -> None:
        self._trial_runs, self._tagged, self.tags = {}, {}, {}
        self._guard(self._setup)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._live = {t.trial_id for t in trials}
        self.log_trial_start(trial)

    def log_trial_start(self, trial) -> None:
        self._guard(self._start, trial)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        self._guard(self._result, trial, result)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        self._guard(self._end, trial, failed)

    def on_experiment_end(self, trials: list, **info) -> None:
        self._guard(self._close_gone, trials)

    # -- what they do ------------------------------------------------------------------------------

    def _setup(self) -> None:
        self.client = mlflow_client(self.target)
        self.experiment_id = experiment_id(self.client, self.target)
        self.mlflow_util.setup_mlflow(tracking_uri=self.target.uri, experiment_id=self.experiment_id)
        self.ids = RunIds(self.target)

    def _start(self, trial) -> None:
        if trial in self._trial_runs:  # a retry of a failed trial: its run again
            self.client.update_run(self._trial_runs[trial], status="RUNNING")
            return
        key = f"{self.experiment}/{trial.trial_id}"
        run = (existing_run(self.client, self.ids.get(key)) or tagged_run(self.client, self.experiment_id, key)
               or self._gone_run_of(trial))
        if run is not None:  # a resumed trial
            self._trial_runs[trial] = run.info.run_id
            old = run.data.tags.get(RUN_TAG)
            self.ids.put(key, run.info.run_id, replaces=old if old != key else None)
            self.client.update_run(run.info.run_id, status="RUNNING")
            if old != key:  # the same trial under a new Ray id: the run follows it
                self.client.set_tag(run.info.run_id, RUN_TAG, key)
                self.client.set_tag(run.info.run_id, "trial_name", str(trial))
            return
        tags = {RUN_TAG: key, CONFIG_TAG: config_key(self.experiment, trial.config), "trial_name": str(trial),
                "ray_experiment": self.experiment, "study_path": self.target.study_path, **trial_tags(trial.config)}
        parent = self.ids.get("study")
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=str(trial), tags=tags)
        self.ids.put(key, run.info.run_id)  # at once: a kill from here on resumes into this run
        self._trial_runs[trial] = run.info.run_id
        self._tagged[trial] = set(tags)
        self._params(run.info.run_id, trial.config)

    def _gone_run_of(self, trial):
        """The run of ``trial``'s config in this Ray experiment whose Ray trial is gone (not one of the
        experiment's trials, nor followed by another trial here), or None."""
        claimed = set(self._trial_runs.values())
        found = self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.{CONFIG_TAG} = '{config_key(self.experiment, trial.config)}'"))
        for run in found:
            trial_id = run.data.tags.get(RUN_TAG, "").rsplit("/", 1)[-1]
            if (run.data.tags.get("study_path") == self.target.study_path and run.info.run_id not in claimed
                    and trial_id not in self._live | {trial.trial_id}):
                return run
        return None

    def _close_gone(self, trials: list) -> None:
        """Mark KILLED the runs of this Ray experiment left RUNNING by trials it no longer holds."""
        live = {f"{self.experiment}/{t.trial_id}" for t in trials}
        found = self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.ray_experiment = '{self.experiment}' and attributes.status = 'RUNNING'"))
        for run in found:
            if run.data.tags.get("study_path") == self.target.study_path and run.data.tags.get(RUN_TAG) not in live:
                self.client.set_terminated(run.info.run_id, status="KILLED")

    def _params(self, run_id: str, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(mlflow_name(k), str(v)[:MAX_PARAM]) for k, v in flatten(config).items()]
        for start in range(0, len(params), BATCH):
            self.client.log_batch(run_id, params=params[start:start + BATCH])

    def _result(self, trial, result: dict) -> None:
        from mlflow.entities import Metric, RunTag

        if trial not in self._trial_runs:
            self._start(trial)
        run_id = self._trial_runs[trial]
        step = int(result.get("epoch", result.get("training_iteration")) or 0)
        now = int(time.time() * 1000)
        values = flatten({k: v for k, v in result.items() if k not in SKIPPED_KEYS})
        metrics = [Metric(mlflow_name(k), float(v), now, step) for k, v in values.items()
                   if isinstance(v, numbers.Real)]
        done = self._tagged.setdefault(trial, set())
        tags = [RunTag(k, v) for k, v in trial_tags(result).items() if k not in done]
        done.update(t.key for t in tags)
        for start in range(0, max(len(metrics), 1), METRIC_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start:start + METRIC_BATCH], tags=tags if not start else [])

    def _end(self, trial, failed: bool) -> None:
        run_id = self._trial_runs.get(trial)
        if run_id is not None:
            self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
