"""Read a finished (or running) pefttune experiment from its storage, without the Tuner.

An *experiment* is the folder ``<storage>/<name>`` (a local path or any URI pyarrow
understands: ``s3://``, ``gs://``, ``file://``...).  It holds one or more **Ray Tune
experiment dirs** -- the discrete search, and e.g. ``darts/`` and ``darts-retrain/`` next
to or below it -- each recognised by its ``experiment_state-*.json``; all of them are
discovered (up to :data:`MAX_DEPTH` levels down) and their trials merged.

Nothing is unpickled.  Ray's ``experiment_state-*.json`` is plain JSON whose non-JSON
values are hex cloudpickle blobs (``{"_type": "CLOUDPICKLE_FALLBACK", ...}``); they are
read as opaque data and ignored.  Per trial the store reads the trial status, config,
last result (read through the trial schema, :class:`pefttune.schema.TrialReport`, as every
trainable reports it), start/end times, error file name and trial dir from that JSON, the history
from ``result.json`` (JSON lines; ``progress.csv`` as a fall-back; the last result only
when a run disabled Ray's loggers), the checkpoints by listing ``checkpoint_NNNNNN``
dirs, and predictions with safetensors (``<checkpoint>/predictions/{dev,test}.safetensors``,
written by :mod:`pefttune.trainables.checkpoint`).

Outcome of a trial (column ``outcome``):

``completed``      Ray status TERMINATED and the trial reported its final row
                   (``test_<metric>``), or ran all epochs of its Ray experiment;
``stopped_early``  TERMINATED with fewer epochs than expected (ASHA), or a rung of the
                   learning-rate protocol (``stop_epoch`` in its config: :mod:`pefttune.tuning`);
``over_budget``    the trial reported ``over_budget=True`` (rejected, never trained);
``error``          Ray status ERROR;
``incomplete``     it would be ``completed``, but its newest checkpoint was not written to
                   the end (no valid ``state.json``, or a file it lists missing or cut off:
                   a kill mid-write, lost data); ``note`` says what is wrong.  Its files are
                   not read, and it takes part in no comparison;
``running`` / ``pending`` / ``paused``: not finished.

Incomplete checkpoints (see :mod:`pefttune.trainables.checkpoint`: ``state.json``, written
last, lists every file with its size) are never used: predictions come only from complete
ones, and the reason is kept in :attr:`TrialRecord.note`.

Only ``completed`` trials with test predictions, of a kind other than ``darts`` (DARTS
supernets are searches, not placements), are **usable** as ensemble members unless a
trial is listed explicitly.

Main entry points: :func:`open_results`, :meth:`ResultsStore.history`,
:meth:`ResultsStore.predictions`. The store only reads: tables are built on it by
:mod:`pefttune.analysis.tables`, selections (top-k, per-method) by
:mod:`pefttune.analysis.selection`, ensembles and the report above those.

One concept, one module: reading Ray's experiment state, result logs, checkpoints and
predictions, locally or from a URI, is what this module is; it stays whole (about 600 lines)
rather than be split along Ray's file formats.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import yaml

from pefttune.metrics import METRICS
from pefttune.placement import Placement
from pefttune.runtime.study_dir import config_id
from pefttune.runtime.storage import atomic_output
from pefttune.schema import (CHECKPOINT_NAME, PREDICTIONS_DIR, STATE_FILE, STOP_EPOCH, TrialKind, TrialReport,
                             listed_files, metric_key, predictions_file)
from pefttune.training import load_predictions

__all__ = [
    "ResultsStore",
    "MissingPredictionsError",
    "TrialRecord",
    "open_results",
]

#: How deep below the experiment folder Ray experiment dirs are looked for.
MAX_DEPTH = 3
#: Folders never searched for Ray experiments (our own outputs, Ray's internals).
SKIP_DIRS = {"analysis", "driver_artifacts", "__pycache__"}
EXPERIMENT_STATE = re.compile(r"^experiment_state-.*\.json$")
SPLITS = ("dev", "test")
CTC_METRICS = ("per", "wer", "cer")


class MissingPredictionsError(FileNotFoundError):
    """A trial has no stored predictions for a split (and none can be recomputed here)."""


# --------------------------------------------------------------------------- file access
def _is_uri(path: str) -> bool:
    return "://" in path


def local_path(path: str | os.PathLike) -> Path | None:
    """The absolute local path of ``path`` (a plain path or ``file://``), None for remote storage."""
    path = str(path)
    if _is_uri(path) and not path.startswith("file://"):
        return None
    return Path(os.path.abspath(os.path.expanduser(path.removeprefix("file://"))))


def _output_dir(path: str | os.PathLike, name: str | None, subdir: str | None) -> Path:
    """``path[/subdir]`` when local, else ``./pefttune-analysis/<name>`` (``name``: by default
    the last part of ``path``): results on remote storage are analysed into a local folder."""
    local = local_path(path)
    if local is not None:
        return local / subdir if subdir else local
    return Path("pefttune-analysis") / (name or PurePosixPath(str(path).rstrip("/")).name or "experiment")


def local_output_dir(path: str | os.PathLike, name: str | None = None) -> Path:
    """Where output about the results at ``path`` is written: ``path`` itself when local, else
    ``./pefttune-analysis/<name>`` (``name``: by default the last part of ``path``)."""
    return _output_dir(path, name, None)


def analysis_dir(path: str | os.PathLike, name: str | None = None) -> Path:
    """Where the analysis of the experiment at ``path`` goes unless told otherwise:
    ``<experiment>/analysis`` for a local one (a plain path or ``file://``), else
    ``./pefttune-analysis/<name>`` (``name``: the experiment's, by default the last part of ``path``)."""
    return _output_dir(path, name, "analysis")


def _filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    path = str(path)
    if _is_uri(path):
        fs, fs_path = pafs.FileSystem.from_uri(path)
        return fs, fs_path.rstrip("/") or "/"
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _join(*parts: str) -> str:
    return str(PurePosixPath(parts[0]).joinpath(*parts[1:])) if parts[0] else "/".join(parts[1:])


def _list(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    try:
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except (FileNotFoundError, NotADirectoryError, OSError):
        return []


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.readall()


def _read_text(fs: pafs.FileSystem, path: str) -> str:
    return _read_bytes(fs, path).decode("utf-8")


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


# --------------------------------------------------------------------------- records
@dataclass
class TrialRecord:
    """One trial of one Ray experiment, as stored."""

    trial_id: str
    experiment: str  # Ray experiment dir relative to the experiment folder ("." = itself)
    trial_name: str  # the trial dir name (Ray's relative_logdir)
    path: str  # trial dir (filesystem path of the experiment's filesystem)
    status: str  # Ray status: TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    outcome: str = ""
    config: dict = field(default_factory=dict)
    last_result: dict = field(default_factory=dict)  # the last reported row, as Ray stored it
    report: TrialReport | None = None  # that row read through the schema (set once the metric is known)
    kind: str = ""
    method: str | None = None
    placement: dict | None = None
    layers: list[str] = field(default_factory=list)
    placement_short: str = ""
    trainable_params: int | None = None
    epochs: int | None = None
    time_total_s: float | None = None
    wall_time_s: float | None = None
    start_time: float | None = None
    num_failures: int = 0
    error: str | None = None
    checkpoints: list[str] = field(default_factory=list)  # checkpoint dir paths, oldest first
    checkpoint: str | None = None  # the final one (holding predictions when any has them)
    prediction_files: dict[str, str] = field(default_factory=dict)  # split -> file path
    seed: int | None = None  # the training seed (replicates of a configuration differ only in it)
    config_id: str | None = None  # the configuration, the same for all its seeds
    note: str | None = None  # why its newest checkpoint is not used (incomplete), else None

    def value(self, key: str) -> Any:
        return self.last_result.get(key)

    @property
    def has_predictions(self) -> bool:
        return "test" in self.prediction_files

    @property
    def usable(self) -> bool:
        """Eligible as an ensemble member without being listed explicitly."""
        return self.outcome == "completed" and self.has_predictions and self.kind != TrialKind.DARTS

    @property
    def label(self) -> str:
        """Short human label: ``uniform:lora``, ``discrete``, ``darts-derived``..."""
        return f"{self.kind}:{self.method}" if self.method else self.kind


def _clean(value: Any) -> Any:
    """Drop Ray's opaque cloudpickle blobs from JSON data (never decoded)."""
    if isinstance(value, dict):
        if value.get("_type") == "CLOUDPICKLE_FALLBACK":
            return None
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _finite(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _layer_labels(placement: dict) -> list[str]:
    """One label per layer ("none", "lora", "houlsby+lora") from a placement mapping."""
    try:
        return Placement.from_dict(placement).layer_methods()
    except Exception:  # noqa: BLE001 - unknown method names etc.: label the raw data
        raw = placement.get("layers", [])
        if isinstance(raw, dict):
            n = int(placement.get("num_layers") or 0)
            raw = [raw.get(str(i), raw.get(i)) for i in range(n)]
        labels = []
        for entry in raw:
            items = entry if isinstance(entry, list) else [entry] if entry else []
            names = [i if isinstance(i, str) else (i or {}).get("method", "?") for i in items]
            names = [n for n in names if n != "none"]
            labels.append("+".join(names) if names else "none")
        return labels


def _short(placement: dict, layers: list[str]) -> str:
    try:
        return Placement.from_dict(placement).short()
    except Exception:  # noqa: BLE001
        return " ".join(f"L{i}:{m}" for i, m in enumerate(layers))


def infer_kind(layers: list[str]) -> str:
    """uniform (one method everywhere), hybrid (the same merge everywhere) or discrete."""
    if layers and len(set(layers)) == 1 and layers[0] != "none":
        return TrialKind.HYBRID.value if "+" in layers[0] else TrialKind.UNIFORM.value
    return TrialKind.DISCRETE.value


# --------------------------------------------------------------------------- the experiment
class ResultsStore:
    """All Ray experiments under one experiment folder; see the module docstring."""

    def __init__(self, path: str | os.PathLike):
        self.uri = str(path)
        self.fs, self.root = _filesystem(path)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"experiment {self.uri} does not exist")
        if info.type != pafs.FileType.Directory:
            raise ValueError(f"experiment {self.uri} is not a folder")
        self.config, self.config_path = self._read_config()
        self.ray_experiments = self._discover()
        if not self.ray_experiments:
            raise ValueError(
                f"experiment {self.uri}: no Ray Tune experiment found (no experiment_state-*.json "
                f"in it or up to {MAX_DEPTH} folders below)"
            )
        self.trials: list[TrialRecord] = []
        for rel in self.ray_experiments:
            self.trials.extend(self._load_ray_experiment(rel))
        self._dedupe_ids()
        self.metric = self._infer_metric()
        self.mode = METRICS[self.metric][1] if self.metric in METRICS else "max"
        self.task = self._infer_task()
        for trial in self.trials:
            trial.report = TrialReport.from_row(trial.last_result, self.metric)
        for trial in self.trials:
            self._settle(trial)
        self._history: dict[str, pd.DataFrame] = {}
        self._cache_dir: str | None = None
        self._trials_table: pd.DataFrame | None = None  # cached by export.trials_table

    # -- basic facts ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        if self.config and isinstance(self.config.get("name"), str):
            return self.config["name"]
        return PurePosixPath(self.root).name or "experiment"

    def __repr__(self) -> str:
        return f"ResultsStore({self.uri!r}, {len(self.trials)} trials, metric={self.metric})"

    def default_out_dir(self) -> Path:
        """``<experiment>/analysis`` for a local experiment, ``./pefttune-analysis/<name>`` else."""
        return Path(self.root) / "analysis" if self.is_local else analysis_dir(self.uri, self.name)

    @property
    def ensemble_size(self) -> int:
        value = (self.config or {}).get("ensemble_size")
        return int(value) if isinstance(value, int) and value >= 2 else 5

    def trial(self, key: str) -> TrialRecord:
        """A trial by id, unique id prefix, or trial dir name."""
        for t in self.trials:
            if key in (t.trial_id, t.trial_name):
                return t
        matches = [t for t in self.trials if t.trial_id.startswith(key) or t.trial_name.startswith(key)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise ValueError(f"experiment {self.uri}: no trial {key!r}; known: {[t.trial_id for t in self.trials]}")
        raise ValueError(f"trial {key!r} is ambiguous: {[t.trial_id for t in matches]}")

    # -- loading ---------------------------------------------------------------------------
    def _read_config(self) -> tuple[dict | None, str | None]:
        """``experiment.yaml`` (the copy the search writes) in the folder or its parent."""
        candidates = [self.root, str(PurePosixPath(self.root).parent)]
        for folder in candidates:
            for name in ("experiment.yaml", "experiment.yml"):
                path = _join(folder, name)
                if _exists(self.fs, path):
                    try:
                        data = yaml.safe_load(_read_text(self.fs, path))
                    except yaml.YAMLError as err:
                        raise ValueError(f"{path}: not valid YAML: {err}") from None
                    if isinstance(data, dict):
                        return data, path
        return None, None

    def _discover(self) -> list[str]:
        found: list[str] = []
        queue: list[tuple[str, int]] = [(self.root, 0)]
        while queue:
            folder, depth = queue.pop(0)
            entries = _list(self.fs, folder)
            states = sorted(e.base_name for e in entries if e.type == pafs.FileType.File and EXPERIMENT_STATE.match(e.base_name))
            skip: set[str] = set()
            if states:
                rel = os.path.relpath(folder, self.root) if folder != self.root else "."
                found.append(rel.replace(os.sep, "/"))
                skip = {t["relative_logdir"] for t in self._state_trials(folder)}
            if depth >= MAX_DEPTH:
                continue
            for entry in sorted(entries, key=lambda e: e.base_name):
                name = entry.base_name
                if (
                    entry.type != pafs.FileType.Directory
                    or name in skip
                    or name in SKIP_DIRS
                    or name.startswith(".")
                    or CHECKPOINT_NAME.match(name)
                ):
                    continue
                queue.append((entry.path, depth + 1))
        return found

    def _ray_dir(self, rel: str) -> str:
        return self.root if rel == "." else _join(self.root, rel)

    def _state_trials(self, folder: str) -> list[dict]:
        """Trials of the newest experiment_state file of ``folder`` (plain JSON only)."""
        names = sorted(
            e.base_name for e in _list(self.fs, folder) if EXPERIMENT_STATE.match(e.base_name)
        )
        if not names:
            return []
        data = json.loads(_read_text(self.fs, _join(folder, names[-1])))
        out = []
        for entry in data.get("trial_data", []):
            state, runtime = (_maybe_json(x) for x in entry)
            state, runtime = _clean(state) or {}, _clean(runtime) or {}
            out.append({**state, "_runtime": runtime})
        return out

    def _load_ray_experiment(self, rel: str) -> list[TrialRecord]:
        folder = self._ray_dir(rel)
        records = []
        for state in self._state_trials(folder):
            runtime = state["_runtime"]
            trial_dir = _join(folder, state["relative_logdir"])
            last = runtime.get("last_result") or {}
            config = state.get("config") or {}
            start = _finite(runtime.get("start_time"))
            end = _finite(runtime.get("last_result_time"))
            record = TrialRecord(
                trial_id=str(state.get("trial_id")),
                experiment=rel,
                trial_name=state["relative_logdir"],
                path=trial_dir,
                status=str(state.get("status", "PENDING")),
                config=config if isinstance(config, dict) else {},
                last_result=last if isinstance(last, dict) else {},
                start_time=start,
                wall_time_s=(end - start) if start is not None and end is not None else None,
                num_failures=int(runtime.get("num_failures") or 0),
            )
            if runtime.get("error_filename"):
                record.error = self._read_error(_join(trial_dir, str(runtime["error_filename"])))
            self._find_checkpoints(record)
            records.append(record)
        return records

    def _read_error(self, path: str) -> str:
        try:
            lines = [line.strip() for line in _read_text(self.fs, path).splitlines() if line.strip()]
        except OSError:
            return "error (error file unreadable)"
        return lines[-1][:500] if lines else "error"

    def _checkpoint_problem(self, path: str) -> str | None:
        """Why the checkpoint at ``path`` is incomplete (None: complete): ``state.json`` missing
        or not valid, or a file it lists missing or of another size (sizes only: cheap on any
        storage). An older ``state.json`` without a file list is taken as complete."""
        name = PurePosixPath(path).name
        try:
            text = _read_text(self.fs, _join(path, STATE_FILE))
        except (FileNotFoundError, OSError):
            return f"{name}: no {STATE_FILE} (not written to the end)"
        except UnicodeDecodeError:
            return f"{name}: {STATE_FILE} is not valid JSON (cut off?)"
        try:
            files = listed_files(text)  # the schema's reading of a state file
        except ValueError as err:  # not JSON, no state, a malformed list: cut off
            return f"{name}: {err}"
        if not files:
            return None
        infos = self.fs.get_file_info([_join(path, rel) for rel in files])
        for (rel, (size, _)), info in zip(files.items(), infos):
            if info.type != pafs.FileType.File:
                return f"{name}: {rel} is missing"
            if info.size != size:
                return f"{name}: {rel} has {info.size} bytes, {STATE_FILE} lists {size} (cut off)"
        return None

    def _find_checkpoints(self, trial: TrialRecord) -> None:
        dirs = []
        for entry in _list(self.fs, trial.path):
            match = CHECKPOINT_NAME.match(entry.base_name)
            if match and entry.type == pafs.FileType.Directory:
                dirs.append((int(match.group(1)), entry.path))
        trial.checkpoints = [p for _, p in sorted(dirs)]
        if not trial.checkpoints:
            return
        # Only complete checkpoints are read; the newest one's problem, if any, is the trial's note.
        trial.note = self._checkpoint_problem(trial.checkpoints[-1])
        # The final checkpoint holds the predictions; prefer the newest one with test
        # predictions, then the newest with any predictions, then the last reported one.
        fallback: tuple[str, dict] | None = None
        for path in reversed(trial.checkpoints):
            files = {
                split: _join(path, PREDICTIONS_DIR, predictions_file(split))
                for split in SPLITS
                if _exists(self.fs, _join(path, PREDICTIONS_DIR, predictions_file(split)))
            }
            if files and self._checkpoint_problem(path) is not None:
                continue
            if "test" in files:
                trial.checkpoint, trial.prediction_files = path, files
                return
            if files and fallback is None:
                fallback = (path, files)
        if fallback is not None:
            trial.checkpoint, trial.prediction_files = fallback
            return
        last_name = trial.last_result.get("checkpoint_dir_name")
        named = [p for p in trial.checkpoints if PurePosixPath(p).name == last_name]
        trial.checkpoint = named[0] if named else trial.checkpoints[-1]

    def _dedupe_ids(self) -> None:
        seen: dict[str, int] = {}
        for t in self.trials:
            seen[t.trial_id] = seen.get(t.trial_id, 0) + 1
        for t in self.trials:
            if seen[t.trial_id] > 1:
                t.trial_id = f"{t.experiment}/{t.trial_id}"

    def _infer_metric(self) -> str:
        cfg = self.config or {}
        train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
        if isinstance(train.get("metric"), str):
            return train["metric"]
        data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
        if data.get("task"):
            return {"pr": "per", "asr": "wer"}.get(data["task"], "accuracy")
        for name in METRICS:
            keys = (metric_key("dev", name), metric_key("dev", name, best=True))
            if any(key in t.last_result for t in self.trials for key in keys):
                return name
        return "accuracy"

    def _infer_task(self) -> str:
        if self.metric in CTC_METRICS:
            return "ctc"
        return "classification"

    def _settle(self, trial: TrialRecord) -> None:
        """Derive placement, kind, method, params, epochs and outcome of a trial."""
        report, config = trial.report, trial.config
        last = report.columns  # what the trial is, as it reported it
        placement = None
        for source in (last.get("placement"), config.get("placement")):
            value = _maybe_json(source)
            if isinstance(value, dict) and "layers" in value:
                placement = value
                break
        if placement is None and trial.checkpoint is not None:
            for name in ("model/placement.json", "best/placement.json", "placement.json"):
                path = _join(trial.checkpoint, name)
                if _exists(self.fs, path):
                    with contextlib.suppress(ValueError):
                        placement = json.loads(_read_text(self.fs, path))
                    break
        trial.placement = placement
        if placement is not None:
            trial.layers = _layer_labels(placement)
            trial.placement_short = str(last.get("placement_short") or _short(placement, trial.layers))
        else:
            layer_keys = sorted(k for k in last if re.fullmatch(r"layer_\d+", k))
            trial.layers = [str(last[k]) for k in layer_keys]
            trial.placement_short = str(last.get("placement_short") or "")
        kind = report.kind or config.get("kind")
        if not isinstance(kind, str) or not kind:
            if any(k.startswith("alpha/") for k in last):
                kind = TrialKind.DARTS.value
            elif "retrain" in trial.experiment or config.get("derived_from"):
                kind = TrialKind.DARTS_DERIVED.value
            else:
                kind = infer_kind(trial.layers)
        trial.kind = kind
        method = last.get("method") or config.get("method")
        if not method and kind == TrialKind.UNIFORM and trial.layers:
            method = trial.layers[0]
        trial.method = str(method) if method else None
        for key in ("trainable_params", "peft_params", "derived_params"):
            value = _finite(last.get(key, config.get(key)))
            if value is not None:
                trial.trainable_params = int(value)
                break
        epoch = report.epoch if report.epoch is not None else report.ray.get("training_iteration")
        trial.epochs = int(epoch) if _finite(epoch) is not None else None
        trial.time_total_s = _finite(report.ray.get("time_total_s"))
        trial.seed, trial.config_id = self._replicate_of(trial)
        trial.outcome = self._outcome(trial)

    def _replicate_of(self, trial: TrialRecord) -> tuple[int | None, str | None]:
        """(seed, config_id): as the trial reported them; for older trials, the experiment's
        ``train.seed`` and the id computed from kind, method and placement."""
        last, config = trial.report.columns, trial.config
        seed = _finite(last.get("seed", config.get("seed")))
        if seed is None:
            seed = _finite(((self.config or {}).get("train") or {}).get("seed", 0))
        cid = last.get("config_id") or config.get("config_id")
        if not cid:
            if trial.kind == TrialKind.DARTS:
                variant = last.get("variant") or "base"
                cid = f"{TrialKind.DARTS}:{variant}"
            elif trial.placement is not None or trial.kind in (TrialKind.UNIFORM, TrialKind.HYBRID, TrialKind.FROZEN):
                with contextlib.suppress(Exception):
                    cid = config_id(trial.kind, trial.method, trial.placement)
        return (None if seed is None else int(seed)), (str(cid) if cid else None)

    def _outcome(self, trial: TrialRecord) -> str:
        outcome = self._status_outcome(trial)
        if outcome == "completed" and trial.note is not None:
            return "incomplete"  # finished, but its final checkpoint was not written to the end
        return outcome

    def _status_outcome(self, trial: TrialRecord) -> str:
        status = trial.status.upper()
        if status == "ERROR":
            return "error"
        if status in ("RUNNING", "PENDING", "PAUSED"):
            return status.lower()
        if trial.report.rejected:
            return "over_budget"
        if not trial.last_result:
            return "stopped_early"
        if trial.report.test_score is not None:
            return "completed"
        if trial.config.get(STOP_EPOCH) is not None:
            return "stopped_early"  # a rung of the learning-rate protocol: stopped by design
        siblings = [t for t in self.trials if t.experiment == trial.experiment]
        if any(t.report.test_score is not None for t in siblings):
            return "stopped_early"  # others of its Ray experiment reached the final row
        iteration = lambda t: int(t.report.ray.get("training_iteration") or 0)  # noqa: E731
        expected = max((iteration(t) for t in siblings), default=0)
        return "completed" if iteration(trial) >= expected else "stopped_early"

    # -- scores ------------------------------------------------------------------------------
    def score(self, trial: TrialRecord, split: str = "dev") -> float | None:
        """The reported score: ``best_dev_<m>`` (else last ``dev_<m>``) or ``test_<m>``."""
        if split == "test":
            return _finite(trial.report.test_score)
        best = _finite(trial.report.best_dev)
        return best if best is not None else _finite(trial.report.dev_score)

    def history(self, trial: TrialRecord) -> pd.DataFrame:
        """Every result row the trial reported (result.json, else progress.csv, else the last
        result), one per ``training_iteration`` (the last report of a re-reported one)."""
        if trial.trial_id in self._history:
            return self._history[trial.trial_id]
        rows: list[dict] = []
        json_path = _join(trial.path, "result.json")
        csv_path = _join(trial.path, "progress.csv")
        if _exists(self.fs, json_path):
            for line in _read_text(self.fs, json_path).splitlines():
                line = line.strip()
                if line:
                    with contextlib.suppress(json.JSONDecodeError):
                        rows.append(json.loads(line))
            frame = pd.DataFrame(rows)
        elif _exists(self.fs, csv_path):
            frame = pd.read_csv(io.StringIO(_read_text(self.fs, csv_path)), dtype={"trial_id": str})
        elif trial.last_result:
            frame = pd.DataFrame([trial.last_result])
        else:
            frame = pd.DataFrame()
        frame = frame.drop(columns=[c for c in frame.columns if c == "config"], errors="ignore")
        if "training_iteration" in frame.columns and len(frame):
            # a restored trial re-reports iterations: keep the last report of each
            frame = frame.drop_duplicates("training_iteration", keep="last").reset_index(drop=True)
        self._history[trial.trial_id] = frame
        return frame

    # -- predictions -------------------------------------------------------------------------
    def local_file(self, path: str) -> str:
        """A local path for a file of the experiment (remote files are copied to a temp dir)."""
        if self.is_local:
            return path
        if self._cache_dir is None:
            self._cache_dir = tempfile.mkdtemp(prefix="pefttune-analysis-")
        digest = hashlib.sha1(path.encode("utf-8")).hexdigest()[:16]
        target = os.path.join(self._cache_dir, f"{digest}-{PurePosixPath(path).name}")
        if not os.path.exists(target):
            with atomic_output(target) as tmp:
                tmp.write_bytes(_read_bytes(self.fs, path))
        return target

    def predictions(self, trial: TrialRecord | str, split: str = "test") -> dict[str, np.ndarray]:
        """The stored per-example predictions of a trial (see :func:`pefttune.training.evaluate`).

        Raises :class:`MissingPredictionsError` naming the trial when none were stored:
        predictions are written to the final checkpoint of trials that finished; re-running
        inference needs the trial's data and is not done here.
        """
        trial = self.trial(trial) if isinstance(trial, str) else trial
        path = trial.prediction_files.get(split)
        if path is None:
            where = trial.checkpoint or "no checkpoint"
            raise MissingPredictionsError(
                f"predictions are missing for trial {trial.trial_id} ({trial.label}, outcome {trial.outcome}): "
                f"no {PREDICTIONS_DIR}/{predictions_file(split)} in its checkpoints ({where}); only trials that ran "
                "their final epoch store predictions, and re-running inference is not possible from the "
                "results store"
            )
        return load_predictions(self.local_file(path))

    def close(self) -> None:
        if self._cache_dir is not None:
            shutil.rmtree(self._cache_dir, ignore_errors=True)
            self._cache_dir = None

    def __del__(self):  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()


def open_results(path: str | os.PathLike | ResultsStore) -> ResultsStore:
    """Open an experiment folder (local path or URI) without the Tuner that made it."""
    return path if isinstance(path, ResultsStore) else ResultsStore(path)
