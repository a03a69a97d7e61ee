"""The experiment directory ``<storage>/<name>`` and reading a Ray experiment's results.

Rules shared by the discrete and the DARTS arm:

- a new run never reuses a directory that already holds a Ray experiment
  (:func:`refuse_existing`); ``--resume`` needs one (:func:`require_resumable`);
- a folder holds one config: its copy ``experiment.yaml`` is written when a run starts and a
  later run (resume, or the other arm) with a different config is refused
  (:func:`check_same_config`), naming the fields that differ.

:func:`load_results` reads a finished or interrupted Ray experiment without running it;
:func:`results_frame` turns its results into one row per trial.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import yaml

from pefttune.config import StudyConfig
from pefttune.placement import Placement
from pefttune.runtime.storage import read_storage_text, storage_exists, write_storage_text
from pefttune.schema import TrialKind

CONFIG_COPY = "experiment.yaml"
TUNER_FILE = "tuner.pkl"


def study_dir(config: StudyConfig) -> str:
    """``<storage>/<name>``: an absolute local path, or a URI."""
    storage = config.storage
    if "://" in storage:
        return f"{storage.rstrip('/')}/{config.name}"
    return str(Path(storage).expanduser().resolve() / config.name)


def config_yaml(config: StudyConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def holds_run(path: str) -> bool:
    """The Ray experiment directory ``path`` holds a run (Ray's tuner state)."""
    return storage_exists(f"{path}/{TUNER_FILE}")


def refuse_existing(path: str, what: str = "a search") -> None:
    """A new run never reuses a folder that holds a run (or its config copy)."""
    if holds_run(path) or storage_exists(f"{path}/{CONFIG_COPY}"):
        raise FileExistsError(
            f"experiment directory {path} already holds {what}; resume it (--resume) "
            "or choose another name (--name)"
        )


def require_resumable(path: str, what: str = "search") -> None:
    if not holds_run(path):
        raise FileNotFoundError(f"--resume: no {what} to resume at {path} (missing {TUNER_FILE})")


def check_same_config(config: StudyConfig, copy: str, hint: str = "resume with the saved config",
                      prefix: str = "") -> None:
    """Refuse ``config`` when the config copy at ``copy`` (if any) differs; names the fields."""
    text = read_storage_text(copy)
    if text is None:
        return
    changed = changed_fields(yaml.safe_load(text), config.model_dump(mode="json"))
    if changed:
        raise ValueError(f"{prefix}the config differs from {copy} in {', '.join(changed)}; {hint}")


def changed_fields(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ (``train.seeds``, not ``train``)."""
    out = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(changed_fields(a, b, f"{prefix}{key}."))
        else:
            out.append(f"{prefix}{key}")
    return out


def write_config_copy(config: StudyConfig, path: str) -> None:
    """Write ``experiment.yaml`` into the Ray experiment directory ``path``."""
    write_storage_text(f"{path}/{CONFIG_COPY}", config_yaml(config))


def load_results(path: str | Path):
    """The ResultGrid of a finished (or interrupted) Ray experiment directory, without running it."""
    from ray import tune  # Ray on use: the analysis reads results without it
    from ray.tune import ResultGrid  # Ray on use: the analysis reads results without it

    return ResultGrid(tune.ExperimentAnalysis(str(path)))


# -- results ---------------------------------------------------------------------------------------------

#: Columns every row of :func:`results_frame` has.
BASE_COLUMNS = [
    "trial_id", "status", "kind", "method", "placement_short", "peft_params", "trainable_params",
    "over_budget", "epoch", "stopped_early", "error",
]


def results_frame(results, epochs: int | None = None) -> pd.DataFrame:
    """One row per trial: its last reported metrics, ``status`` (TERMINATED/ERROR),
    ``error``, ``stopped_early``, ``checkpoint`` and the placement columns (taken from the
    trial config when the trial errored before reporting)."""
    rows = []
    for result in results:
        metrics = {k: v for k, v in (result.metrics or {}).items() if k != "config"}
        config = result.config or {}
        row = dict(metrics)
        row["trial_id"] = metrics.get("trial_id") or getattr(result, "path", "").rsplit("/", 1)[-1]
        row["status"] = "ERROR" if result.error else "TERMINATED"
        row["error"] = error_text(result.error) if result.error else ""
        row["checkpoint"] = result.checkpoint.path if result.checkpoint else ""
        row["path"] = result.path
        if "placement" not in row and "placement" in config:
            row.update(placement_columns(parse_placement(config["placement"])))
        for key in ("kind", "method", "lr", "peft_params"):
            if row.get(key) is None and key in config:
                row[key] = config[key] if config[key] is not None else ""
        row.setdefault("over_budget", False)
        row.setdefault("epoch", 0)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=BASE_COLUMNS)
    if "head_params" in frame:
        head = frame["head_params"].dropna()
        if len(head):
            frame["head_params"] = frame["head_params"].fillna(head.iloc[0])
            missing = frame["trainable_params"].isna() if "trainable_params" in frame else True
            frame.loc[missing, "trainable_params"] = frame["peft_params"] + frame["head_params"]
    frame["over_budget"] = frame["over_budget"].fillna(False).astype(bool)
    frame["epoch"] = frame["epoch"].fillna(0).astype(int)
    if epochs is None:  # default: the most epochs any trial ran
        epochs = int(frame["epoch"].max())
    frame["stopped_early"] = (frame["status"] == "TERMINATED") & ~frame["over_budget"] & (frame["epoch"] < epochs)
    layers = sorted(c for c in frame.columns if c.startswith("layer_"))
    ordered = [c for c in BASE_COLUMNS if c in frame] + layers
    return frame[ordered + [c for c in frame.columns if c not in ordered]]


def error_text(error) -> str:
    text = str(error)
    for line in reversed(text.strip().splitlines()):
        if "Error" in line:
            return line.strip()
    return text.strip().splitlines()[-1] if text.strip() else type(error).__name__




def placement_columns(placement: Placement) -> dict:
    """Result columns describing a placement: JSON, short form, one column per layer."""
    columns = {
        "placement": json.dumps(placement.to_dict(), separators=(",", ":")),
        "placement_short": placement.short(),
    }
    for index, label in enumerate(placement.layer_methods()):
        columns[f"layer_{index:02d}"] = label
    return columns


def parse_placement(value) -> Placement:
    """A placement from a trial config value: dict, JSON string or Placement."""
    if isinstance(value, Placement):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"trial config 'placement': not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"trial config 'placement': expected a placement mapping or JSON string, got {value!r}")
    return Placement.from_dict(value)


def config_id(kind: str, method: str | None, placement: Placement | dict | str) -> str:
    """The configuration a trial replicates, the same for every seed: ``uniform:lora``,
    ``hybrid``, ``frozen``, ``log-mel``, or ``<kind>:<8 hex digits of the placement>`` (searched and
    DARTS-derived placements)."""
    if kind == TrialKind.UNIFORM and method:
        return f"{TrialKind.UNIFORM}:{method}"
    if kind in (TrialKind.HYBRID, TrialKind.FROZEN, TrialKind.LOG_MEL):
        return str(kind)
    placement = parse_placement(placement)
    digest = hashlib.sha1(json.dumps(placement.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return f"{kind}:{digest}"
