"""Experiment tracking: a study and its trials in MLflow (and W&B) through Ray Tune's logger callbacks.

With ``tracking: {mlflow: ...}`` in the config (off by default):

- every Ray experiment of the study (the discrete search, the replicates, the DARTS search and
  retrains, further seeds' rounds) logs through
  :class:`~pefttune.runtime.mlflow_trials.MlflowTrials`, Ray's ``MLflowLoggerCallback``: one
  MLflow run per trial with its config as parameters, its metrics per epoch (step: ``epoch``)
  and the tags ``kind``, ``config_id``, ``seed`` (``method``, ``variant`` where the trial has
  them), nested under the study's run;
- the study's run (:func:`start_study`, :func:`log_study`, :func:`end_study`) holds the
  provenance as tags, ``experiment.yaml``, and after the analysis ``report.md`` (and
  ``report.html``), the tables and the plots as artifacts.

Identity: the run ids are kept in ``<study>/tracking/mlflow-runs.json`` (written as soon as a
run is made), so ``--resume`` logs into the same runs, never new ones; a trial's run also carries the
tag ``pefttune_run`` (``<Ray experiment>/<trial id>``), found again even if the file missed it.

A tracker that cannot be reached does not fail the study: the first error is printed once
(``tracking: MLflow at <uri> failed ...; the study goes on without it``) and tracking stays off
for this process.  The default store is ``sqlite:///<study>/mlflow.db`` (artifacts in
``<study>/mlflow-artifacts``); MLflow is imported only when tracking is on
(:func:`check_tracking` names the field and the install command before compute).

Example::

    # experiment.yaml
    tracking:
      mlflow: true            # or: {uri: http://mlflow.lab:5000, experiment: ks-placements}

    import mlflow
    mlflow.set_tracking_uri("sqlite:///pefttune-results/embedded-ks/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["embedded-ks"])   # one row per trial + the study's
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from pefttune.config import StudyConfig
from pefttune.runtime.storage import atomic_write_text, read_storage_text, write_storage_text

#: The run ids, in a folder of the study: Ray's ``Tuner.restore`` copies the ``.json`` files at the
#: top of an experiment folder (the study folder is the search's) and writes them back while it runs,
#: which would undo every id written meanwhile.
RUNS_FILE = "tracking/mlflow-runs.json"
ARTIFACTS_DIR = "mlflow-artifacts"
MLFLOW_INSTALL = "pip install 'pefttune[tracking]' (or: pip install mlflow-skinny)"
#: The tag that names what a run is: ``study:<study folder>`` or ``<Ray experiment>/<trial id>``.
RUN_TAG = "pefttune_run"

#: tracker ("MLflow at <uri>") -> why it is off in this process (warned once)
_OFF: dict[str, str] = {}


def warn_once(tracker: str, err: BaseException) -> None:
    if tracker in _OFF:
        return
    reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    _OFF[tracker] = reason
    print(f"tracking: {tracker} failed ({type(err).__name__}: {reason}); the study goes on without it",
          file=sys.stderr, flush=True)


def tracker_off(tracker: str) -> bool:
    return tracker in _OFF


# -- config -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MlflowTarget:
    """Where a study's runs go."""

    uri: str
    experiment: str
    artifact_location: str | None  # local stores: beside the database (MLflow's default is ./mlruns)
    study_path: str

    @property
    def label(self) -> str:
        return f"MLflow at {self.uri}"


def mlflow_target(config: StudyConfig, study_path: str) -> MlflowTarget | None:
    """The MLflow target of ``config`` (None when off); the default store is ``<study>/mlflow.db``."""
    section = config.tracking.mlflow if config.tracking else None
    if section is None:
        return None
    uri = section.uri or f"sqlite:///{study_path}/mlflow.db"
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = str(Path(uri.removeprefix("sqlite:///")).parent / ARTIFACTS_DIR)
    return MlflowTarget(uri, section.experiment or config.name, artifacts, study_path)


def check_tracking(config: StudyConfig) -> None:
    """Before compute: the trackers ``config`` enables are installed (errors name the field)."""
    tracking = config.tracking
    if tracking is None:
        return
    if tracking.mlflow is not None:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ValueError(f"tracking.mlflow: MLflow is not installed; {MLFLOW_INSTALL}") from None
    if tracking.wandb is not None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("tracking.wandb: wandb is not installed; pip install wandb") from None


def relative_experiment(path: str, root: str) -> str:
    """A Ray experiment's folder relative to the study folder (``.``: the folder itself, the search)."""
    path, root = path.rstrip("/"), root.rstrip("/")
    return "." if path == root else path[len(root) + 1:] if path.startswith(root + "/") else path


# -- the client and the run ids ------------------------------------------------------------------


def mlflow_client(target: MlflowTarget):
    """An MlflowClient of ``target`` that gives up in seconds, not minutes, when the server is down."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    for name in ("mlflow", "alembic"):  # the store's schema migrations log at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=target.uri)


def experiment_id(client, target: MlflowTarget) -> str:
    """The id of ``target``'s MLflow experiment, made on first use (artifacts at ``artifact_location``)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(target.experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(target.experiment, artifact_location=target.artifact_location)
    except MlflowException:  # made meanwhile by another process
        return client.get_experiment_by_name(target.experiment).experiment_id


class RunIds:
    """``<study>/tracking/mlflow-runs.json``: the MLflow run ids of the study (``study``) and of its
    trials (``<Ray experiment>/<trial id>``), for one tracking URI."""

    def __init__(self, target: MlflowTarget):
        self.target = target
        self.path = f"{target.study_path}/{RUNS_FILE}"

    def _read(self) -> dict:
        text = read_storage_text(self.path)
        data = json.loads(text) if text else {}
        mlflow = data.get("mlflow") or {}
        return mlflow.get("runs", {}) if mlflow.get("uri") == self.target.uri else {}

    def get(self, key: str) -> str | None:
        return self._read().get(key)

    def put(self, key: str, run_id: str, replaces: str | None = None) -> None:
        """Keep ``key``'s run id (``replaces``: a key that no longer names it)."""
        runs = {k: v for k, v in self._read().items() if k != replaces}
        runs[key] = run_id
        text = json.dumps({"mlflow": {"uri": self.target.uri, "runs": runs}}, indent=1, sort_keys=True) + "\n"
        if "://" in self.path:
            write_storage_text(self.path, text)
        else:
            atomic_write_text(self.path, text)


def existing_run(client, run_id: str | None):
    """The run ``run_id`` if the store still holds it (None if it was deleted)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return run if run.info.lifecycle_stage == "active" else None


def tagged_run(client, experiment: str, value: str):
    """The run of ``experiment`` whose :data:`RUN_TAG` is ``value`` (None if there is none)."""
    runs = client.search_runs([experiment], filter_string=f"tags.{RUN_TAG} = '{value}'", max_results=1)
    return runs[0] if runs else None


# -- the study's run -----------------------------------------------------------------------------


def start_study(config: StudyConfig, study_path: str, resume: bool) -> str | None:
    """Make the study's run (on ``resume``: find it again, RUNNING again) with the provenance as tags
    and ``experiment.yaml`` as an artifact; its id, or None when tracking is off or failed."""
    target = mlflow_target(config, study_path)
    if target is None or tracker_off(target.label):
        return None
    try:
        return _start_study(config, target, resume)
    except Exception as err:  # noqa: BLE001 - a tracker never fails the study
        warn_once(target.label, err)
        return None


def _start_study(config: StudyConfig, target: MlflowTarget, resume: bool) -> str:
    from pefttune.runtime.provenance import collect
    from pefttune.runtime.study_dir import config_yaml

    client, ids = mlflow_client(target), RunIds(target)
    experiment = experiment_id(client, target)
    tag = f"study:{target.study_path}"
    run = existing_run(client, ids.get("study")) if resume else None
    if run is None and resume:
        run = tagged_run(client, experiment, tag)
    if run is not None:
        client.update_run(run.info.run_id, status="RUNNING")
        ids.put("study", run.info.run_id)
        return run.info.run_id
    prov = collect(config)
    tags = {RUN_TAG: tag, "study": config.name, "study_path": target.study_path,
            **{f"provenance.{k}": str(v) for k, v in prov.to_dict().items()}}
    run = client.create_run(experiment, run_name=f"study {config.name}", tags=tags)
    ids.put("study", run.info.run_id)
    client.log_text(run.info.run_id, config_yaml(config), "experiment.yaml")
    return run.info.run_id


def log_study(config: StudyConfig, study_path: str, files: Iterable[str | Path]) -> None:
    """Log ``files`` (report, tables, plots: paths under ``<study>/analysis`` keep their folders)
    as artifacts of the study's run."""
    target = mlflow_target(config, study_path)
    if target is None or tracker_off(target.label):
        return
    try:
        client, run_id = mlflow_client(target), RunIds(target).get("study")
        if run_id is None:
            return
        root = Path(study_path) / "analysis"
        for file in map(Path, files):
            if file.is_file():
                rel = file.parent.relative_to(root).as_posix() if file.is_relative_to(root) else ""
                client.log_artifact(run_id, str(file), rel if rel not in ("", ".") else None)
    except Exception as err:  # noqa: BLE001
        warn_once(target.label, err)


def end_study(config: StudyConfig, study_path: str, status: str = "FINISHED") -> None:
    """End the study's run (FINISHED, FAILED or KILLED)."""
    target = mlflow_target(config, study_path)
    if target is None or tracker_off(target.label):
        return
    try:
        run_id = RunIds(target).get("study")
        if run_id is not None:
            mlflow_client(target).set_terminated(run_id, status=status)
    except Exception as err:  # noqa: BLE001
        warn_once(target.label, err)


# -- the study's files ---------------------------------------------------------------------------


def study_files(summary: dict) -> list[str]:
    """The files of an analysis summary (``summary["files"]``) that the study's run keeps: the
    report(s), ``summary.json``, the tables and the plots."""
    files = summary.get("files", {})
    out: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif isinstance(value, (str, Path)) and value:
            out.append(str(value))

    walk(files)
    report = files.get("report")
    if report:
        html = Path(report).with_suffix(".html")
        if html.is_file():
            out.append(str(html))
    return sorted(set(out))
