"""Flat tables of an experiment (parquet and CSV), built on the results store.

:func:`pefttune.analysis.export.export_experiment` writes them all (``pefttune export EXPERIMENT --out DIR``).

One concept, one module (about 660 lines, a fifth of them the column reference below): every
table's builder sits next to the documentation of its columns, so the two cannot drift apart.

Every table is written as ``<name>.parquet`` and ``<name>.csv``, each atomically (a
temporary file in the same folder, then ``os.replace``).  Column reference (COLUMNS):

``trials`` -- one row per trial (of every Ray experiment under the experiment folder)
    trial_id (str)            Ray trial id (prefixed ``<ray experiment>/`` only if two collide)
    experiment (str)          Ray experiment dir, relative to the experiment folder (``.`` = itself)
    trial_name (str)          trial dir name
    status (str)              Ray status: TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    outcome (str)             completed, stopped_early, over_budget, error, running, pending, paused, or
                              incomplete (finished, but its final checkpoint was cut off: see ``note``;
                              left out of every comparison)
    usable (bool)             ensemble member by default (completed, test predictions, not a DARTS search)
    kind (str)                uniform, discrete, hybrid, frozen, darts-derived, darts (DARTS search supernet)
    method (str, null)        the method of a uniform trial
    config_id (str)           the configuration the trial replicates (same for all its seeds): uniform:<method>,
                              hybrid, frozen, discrete:<hash>, darts-derived:<hash>, darts:<variant>
    seed (Int64)              the training seed
    metric (str)              the task metric (accuracy, macro_f1, per, wer, cer)
    dev_score (float64)       last reported ``dev_<metric>``
    best_dev_score (float64)  ``best_dev_<metric>`` (else the best ``dev_<metric>`` of its history)
    test_score (float64)      ``test_<metric>`` of the final row (null if the trial did not finish)
    trainable_params (Int64)  reported trainable parameters (PEFT + head), else ``peft_params``
    epochs (Int64)            epochs run (last reported ``epoch``)
    time_total_s (float64)    training time Ray measured (``time_total_s``)
    wall_time_s (float64)     first start to last result, seconds
    start_time (float64)      unix time of the trial's (last) start
    num_failures (Int64)      failures Ray retried
    placement (str)           placement JSON (``Placement.to_dict``; DARTS search: the supernet's)
    placement_short (str)     e.g. ``L0:lora(r=8) L1:none``
    num_layers (Int64)        layers of the placement
    layer_00, layer_01, ... (str)  method per layer: ``none``, ``lora``, ``houlsby+lora`` (hybrid)
    derived_placement (str, null)  DARTS: the placement derived from alpha (JSON)
    error (str, null)         last line of Ray's error file
    checkpoint (str, null)    the final checkpoint dir (holding the predictions when stored)
    has_predictions (bool)    test predictions are stored (in a complete checkpoint)
    note (str, null)          why the trial's newest checkpoint is not used (incomplete: no valid
                              ``state.json``, or a listed file missing or cut off), else null
    <reported keys>           every other scalar the trial reported in its last row
                              (``dev_<metric>``, ``test_loss``, ``lr``, ``over_budget``...;
                              not ``alpha/...``, which is in ``alpha``)
    config/<key> (mixed)      the trial config, flattened with ``/``; lists/dicts as JSON

``configs`` -- one row per configuration over its seeds (``train.seeds``)
    config_id, kind, method, placement_short (str); trainable_params (Int64); lr (float64: the learning rate
    its seeds trained at, chosen by the learning-rate protocol, :mod:`pefttune.tuning`; null if they
    differ); n_seeds (Int64); seeds (str,
    comma-separated); metric (str); dev_mean, dev_std, dev_ci_low, dev_ci_high, test_mean, test_std,
    test_ci_low, test_ci_high (float64: mean, std and Student-t interval over seeds, dev = best dev);
    confidence (float64); note (why an interval is missing, e.g. one seed); trial_ids (str).

``history`` -- one row per trial per reported result (normally one per epoch)
    trial_id, experiment, kind, method (str); training_iteration, epoch (Int64);
    time_total_s, time_this_iter_s (float64); then every numeric/bool key the trial
    reported (``dev_<metric>``, ``dev_loss``, ``train_loss``, ``best_dev_<metric>``,
    ``samples_per_s``, DARTS ``entropy/Lxx``...), float64 (bool as 0/1).  From Ray's
    ``result.json`` (else ``progress.csv``; a run without Ray's loggers keeps only its last row).

``alpha`` -- DARTS architecture weights, one row per trial, result, layer and candidate
    trial_id, experiment (str); training_iteration, epoch, layer (Int64); method (str);
    prob (float64): the reported ``alpha/Lxx/<method>``, the relaxation's probabilities,
    softmax(alpha / T) (Gumbel: softmax(alpha); Fair-DARTS: sigmoid(alpha), not summing to 1);
    entropy_norm, margin (float64): the layer's normalised entropy H / ln K and the margin
    between its top two probabilities at that result (the same on every method row of the layer).
    Empty, with these columns, when no trial reported alpha.

``predictions`` -- one row per trial with stored predictions, split and example
    trial_id, experiment, kind, method, split (``dev``/``test``) (str); index (int64, the
    example id); correct (bool);
    classification: label, pred (int64); prob_pred (float64, probability of ``pred``);
    prob_0 ... prob_{C-1} (float64);
    CTC: ref, hyp (str, space-separated token ids); ref_len, hyp_len, edits (int64: edit
    distance hyp -> ref); frames (int64).  ``correct`` = exact match for CTC.

``ensembles`` -- one row per ensemble (member choice x strategy)
    ensemble_id (str)         ``<members>:<strategy>``, e.g. ``per-method:vote``
    members (str)             top-K, per-method or ids
    strategy (str)            vote, weighted, soft, caruana, frame_vote, posterior_avg, rover
    member_ids (str)          comma-separated trial ids, best dev first
    n_members (int64)
    selected (str)            Caruana: the selected ids with repeats (weights); else = member_ids
    metric, mode (str)
    dev_score, test_score (float64)   the ensemble's scores (Caruana dev = fitted, optimistic)
    best_member_id (str)      the member with the best dev score
    best_member_dev, best_member_test (float64)
    oracle_member_test (float64)      the best member test score (picked on test)
    delta_vs_best (float64)   test gain over the best member, positive = better (either mode)
    mcnemar_b, mcnemar_c (int64)      ensemble right & best member wrong / the reverse (test)
    mcnemar_p (float64)       exact McNemar p-value of ensemble vs best member

``costs`` -- one row per arm: the compute each arm's results took (:func:`costs_table`)
    arm (str)                 ``uniform:<method>``, ``hybrid``, ``discrete search`` (the searched trials: kind
                              discrete, the search's seed, the first of ``train.seeds``), ``discrete replicates``
                              (the best searched placements' other seeds), ``darts search + retrain``, ``frozen``,
                              ``log-mel``; then ``ensemble <ensemble_id>`` (one per ensembles-table row) and
                              ``ensembles per seed:<strategy>`` (finding 2's ensembles: each seed's uniform trials)
    kind (str)                the trials' kind(s), comma-separated; ``ensemble`` for an ensemble row
    trials (Int64)            trials run, whatever their outcome (an ensemble: its members)
    completed (Int64)         of which completed
    epochs (Int64)            epochs trained, summed over the trials (a trial that continued a rung counts only its own)
    trial_seconds (float64)   Ray's ``time_total_s`` summed over the trials: seconds each trial held its slot (see
                              ``slot``), i.e. slot-seconds, not the process's CPU time; the arm rows (not the
                              ensembles) sum to the trials table's total
    search_trials (Int64)     the trials that searched: every trial of ``discrete search``, the DARTS supernets of
                              ``darts search + retrain``; null for the other arms
    search_seconds (float64)  their ``trial_seconds``
    params_min, params_max (Int64)  trainable parameters (PEFT + head) per configuration, smallest and largest
                              (an ensemble: the sum over its members, both)
    params (str)              ``params_min``, or ``min-max`` where the arm's configurations differ
    slot (str)                what one trial held, from the experiment config: ``resources.cpu`` CPUs (the DARTS
                              search: ``darts.search_cpu``) and ``resources.gpu`` GPUs, e.g. ``1 CPU``
    device (str)              ``cpu`` or ``gpu`` (``resources.gpu`` > 0): what a trial-second is a second of
    combine_ms_per_example (float64)  ensembles: MEASURED in the analysis, the strategy combining the members'
                              stored test predictions (median of 5 timings, ``time.perf_counter``) over the test
                              examples, in ms per example; the members' forward passes are not run (their
                              predictions are stored), see the next column
    members_ms_per_example_bound (float64)  ensembles: DERIVED, not measured: the sum over members of 1000 /
                              ``samples_per_s`` (each member's last reported training throughput: forward and
                              backward, so an upper bound of its forward pass in the same setting); null when a
                              member did not report it
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from pefttune.analysis.store import ResultsStore, TrialRecord, open_results
from pefttune.metrics import edit_distance
from pefttune.runtime.provenance import Provenance
from pefttune.runtime.storage import atomic_output
from pefttune.schema import RAY_KEYS, TrialKind, metric_key
from pefttune.training import unpack_sequences

#: The placement of a configuration whose seeds each derived their own (DARTS as a method).
VARIES_BY_SEED = "its own per seed"

__all__ = [
    "ALPHA_COLUMNS",
    "COST_COLUMNS",
    "ENSEMBLE_COLUMNS",
    "TABLES",
    "alpha_table",
    "costs_table",
    "ensembles_table",
    "history_table",
    "predictions_table",
    "trials_table",
    "write_table",
]

TABLES = ("trials", "configs", "history", "alpha", "predictions", "ensembles", "costs")
FORMATS = ("parquet", "csv")
LAYER_COLUMN = re.compile(r"^layer_\d+$")
ALPHA_KEY = re.compile(r"^alpha/L(\d+)/(.+)$")

TRIAL_COLUMNS = [
    "trial_id", "experiment", "trial_name", "status", "outcome", "usable", "kind", "method", "config_id", "seed",
    "metric",
    "dev_score", "best_dev_score", "test_score", "trainable_params", "epochs", "time_total_s",
    "wall_time_s", "start_time", "num_failures", "placement", "placement_short", "num_layers",
]
TRIAL_TAIL = ["derived_placement", "error", "checkpoint", "has_predictions", "note"]
HISTORY_COLUMNS = ["trial_id", "experiment", "kind", "method", "training_iteration", "epoch",
                   "time_total_s", "time_this_iter_s"]
ALPHA_COLUMNS = ["trial_id", "experiment", "training_iteration", "epoch", "layer", "method", "prob",
                 "entropy_norm", "margin"]
PREDICTION_COLUMNS = ["trial_id", "experiment", "kind", "method", "split", "index", "correct"]
ENSEMBLE_COLUMNS = [
    "ensemble_id", "members", "strategy", "member_ids", "n_members", "selected", "metric", "mode",
    "dev_score", "test_score", "best_member_id", "best_member_dev", "best_member_test",
    "oracle_member_test", "delta_vs_best", "mcnemar_b", "mcnemar_c", "mcnemar_p",
]
_STR = ["trial_id", "experiment", "trial_name", "status", "outcome", "kind", "method", "config_id", "metric",
        "placement",
        "placement_short", "derived_placement", "error", "checkpoint", "note", "split", "ensemble_id", "members",
        "strategy", "member_ids", "selected", "mode", "best_member_id", "ref", "hyp"]
_INT = ["seed", "trainable_params", "epochs", "num_failures", "num_layers", "training_iteration", "epoch", "layer"]
_FLOAT = ["dev_score", "best_dev_score", "test_score", "time_total_s", "wall_time_s", "start_time",
          "time_this_iter_s", "prob", "best_member_dev", "best_member_test", "oracle_member_test",
          "delta_vs_best", "mcnemar_p", "prob_pred"]


# --------------------------------------------------------------------------- helpers
def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, np.generic))


def _flatten(prefix: str, value: Any, out: dict) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}/{key}", item, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(value, default=str)
    else:
        out[prefix] = value


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Fix dtypes: documented str / Int64 / float64 columns; mixed object columns -> str."""
    for col in frame.columns:
        if col in _STR or LAYER_COLUMN.match(col):
            frame[col] = frame[col].astype("string")
        elif col in _INT:
            frame[col] = pd.to_numeric(frame[col], errors="coerce").round().astype("Int64")
        elif col in _FLOAT:
            frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
        elif frame[col].dtype == object:
            values = [v for v in frame[col] if v is not None and not (isinstance(v, float) and math.isnan(v))]
            kinds = {type(v) for v in values}
            if kinds <= {bool, np.bool_} and values:
                frame[col] = frame[col].astype("boolean")
            elif kinds and kinds <= {int, float, np.int64, np.float64}:
                frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
            else:
                frame[col] = frame[col].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v))
                                            else v if isinstance(v, str) else json.dumps(v, default=str))
                frame[col] = frame[col].astype("string")
    return frame


def _metric_columns(trial: TrialRecord, skip: set[str]) -> dict:
    out = {}
    for key, value in trial.last_result.items():
        if key in skip or key in RAY_KEYS or key.startswith("alpha/") or LAYER_COLUMN.match(key):
            continue
        if key in ("placement", "placement_short", "derived_placement"):
            continue
        if _is_scalar(value):
            out[key] = value.item() if isinstance(value, np.generic) else value
    return out


def _best_dev(experiment: ResultsStore, trial: TrialRecord) -> float | None:
    value = trial.last_result.get(metric_key("dev", experiment.metric, best=True))
    if value is not None:
        return value
    frame = experiment.history(trial)
    col = metric_key("dev", experiment.metric)
    if col in frame.columns:
        values = pd.to_numeric(frame[col], errors="coerce").dropna()
        if len(values):
            return float(values.max() if experiment.mode == "max" else values.min())
    return None


# --------------------------------------------------------------------------- tables
def trials_table(experiment: ResultsStore | str) -> pd.DataFrame:
    """One row per trial (columns in the module docstring)."""
    experiment = open_results(experiment)
    cached = getattr(experiment, "_trials_table", None)
    if cached is not None:
        return cached.copy()
    num_layers = max((len(t.layers) for t in experiment.trials), default=0)
    layer_cols = [f"layer_{i:02d}" for i in range(num_layers)]
    fixed = set(TRIAL_COLUMNS) | set(TRIAL_TAIL) | set(layer_cols)
    rows, extra_keys, config_keys = [], [], []
    for t in experiment.trials:
        derived = t.last_result.get("derived_placement", t.config.get("derived_placement"))
        row = {
            "trial_id": t.trial_id,
            "experiment": t.experiment,
            "trial_name": t.trial_name,
            "status": t.status,
            "outcome": t.outcome,
            "usable": t.usable,
            "kind": t.kind,
            "method": t.method,
            "config_id": t.config_id,
            "seed": t.seed,
            "metric": experiment.metric,
            "dev_score": t.last_result.get(metric_key("dev", experiment.metric)),
            "best_dev_score": _best_dev(experiment, t),
            "test_score": t.last_result.get(metric_key("test", experiment.metric)),
            "trainable_params": t.trainable_params,
            "epochs": t.epochs,
            "time_total_s": t.time_total_s,
            "wall_time_s": t.wall_time_s,
            "start_time": t.start_time,
            "num_failures": t.num_failures,
            "placement": json.dumps(t.placement, separators=(",", ":")) if t.placement is not None else None,
            "placement_short": t.placement_short or None,
            "num_layers": len(t.layers) if t.layers else None,
        }
        for i, col in enumerate(layer_cols):
            row[col] = t.layers[i] if i < len(t.layers) else None
        row["derived_placement"] = (
            derived if isinstance(derived, str) or derived is None else json.dumps(derived, separators=(",", ":"))
        )
        row["error"] = t.error
        row["checkpoint"] = t.checkpoint
        row["has_predictions"] = t.has_predictions
        row["note"] = t.note
        for key, value in _metric_columns(t, fixed).items():
            if key not in extra_keys:
                extra_keys.append(key)
            row[key] = value
        flat: dict = {}
        for key, value in t.config.items():
            _flatten(f"config/{key}", value, flat)
        for key, value in flat.items():
            if key not in config_keys:
                config_keys.append(key)
            row[key] = value
        rows.append(row)
    columns = TRIAL_COLUMNS + layer_cols + TRIAL_TAIL + extra_keys + sorted(config_keys)
    frame = _typed(pd.DataFrame(rows, columns=columns))
    for col in ("usable", "has_predictions"):
        frame[col] = frame[col].astype(bool)
    experiment._trials_table = frame
    return frame.copy()


def history_table(experiment: ResultsStore | str) -> pd.DataFrame:
    """One row per trial per reported result (columns in the module docstring)."""
    experiment = open_results(experiment)
    frames, keys = [], []
    for t in experiment.trials:
        hist = experiment.history(t)
        if hist.empty:
            continue
        part = pd.DataFrame({
            "trial_id": t.trial_id, "experiment": t.experiment, "kind": t.kind, "method": t.method,
        }, index=hist.index)
        for col in hist.columns:
            if col in RAY_KEYS or col.startswith("alpha/") or col.startswith("config/") or col in part.columns:
                continue
            values = hist[col]
            if values.dtype == bool or values.dtype == "boolean":
                values = values.astype("float64")
            elif values.dtype == object:
                if not all(isinstance(v, (bool, int, float, np.generic)) or v is None for v in values):
                    continue
                values = pd.to_numeric(values.map(lambda v: float(v) if v is not None else np.nan), errors="coerce")
            elif not pd.api.types.is_numeric_dtype(values):
                continue
            part[col] = values.astype("float64")
            if col not in keys:
                keys.append(col)
        if "epoch" not in part.columns and "training_iteration" in part.columns:
            part["epoch"] = part["training_iteration"]
        frames.append(part)
    extra = [k for k in keys if k not in HISTORY_COLUMNS]
    columns = HISTORY_COLUMNS + extra
    if not frames:
        return _typed(pd.DataFrame({c: pd.Series(dtype="float64") for c in columns}))
    frame = pd.concat(frames, ignore_index=True).reindex(columns=columns)
    frame = _typed(frame)
    for col in extra:
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
    return frame


def alpha_table(experiment: ResultsStore | str) -> pd.DataFrame:
    """DARTS probabilities per trial, result, layer and method (columns in the module docstring).

    Also, repeated on each of a layer's method rows: ``entropy_norm`` (float64), that
    result's normalised entropy H / ln K of the layer's probabilities (rows normalised to
    sum 1; 1 = uniform, 0 = one-hot), and ``margin`` (float64), the difference between the
    layer's two largest normalised probabilities (see :mod:`pefttune.darts.convergence`).
    """
    experiment = open_results(experiment)
    rows = []
    for t in experiment.trials:
        if not any(k.startswith("alpha/") for k in t.last_result):
            continue
        hist = experiment.history(t)
        for _, result in hist.iterrows():
            iteration = result.get("training_iteration")
            epoch = result.get("epoch", iteration)
            for key, value in result.items():
                match = ALPHA_KEY.match(str(key))
                if match is None or value is None or (isinstance(value, float) and math.isnan(value)):
                    continue
                rows.append({
                    "trial_id": t.trial_id, "experiment": t.experiment, "training_iteration": iteration,
                    "epoch": epoch, "layer": int(match.group(1)), "method": match.group(2), "prob": float(value),
                })
    frame = pd.DataFrame(rows, columns=ALPHA_COLUMNS[:-2])
    # per (trial, result, layer): normalised entropy and top-2 margin of the normalised row
    keys = ["trial_id", "experiment", "training_iteration", "layer"]
    share = frame["prob"] / frame.groupby(keys, dropna=False)["prob"].transform("sum").clip(lower=1e-12)
    plogp = -(share * np.log(share.clip(lower=1e-12)))
    size = frame.groupby(keys, dropna=False)["prob"].transform("size").astype("float64")
    entropy = plogp.groupby([frame[k] for k in keys], dropna=False).transform("sum")
    frame["entropy_norm"] = np.where(size > 1, entropy / np.log(size.where(size > 1, 2.0)), np.nan)
    top = share.groupby([frame[k] for k in keys], dropna=False)
    frame["margin"] = top.transform(lambda x: np.sort(x.to_numpy())[-1] - np.sort(x.to_numpy())[-2] if len(x) > 1 else np.nan)
    frame = frame.reindex(columns=ALPHA_COLUMNS)
    frame["entropy_norm"] = frame["entropy_norm"].astype("float64").clip(0.0, 1.0)
    frame["margin"] = frame["margin"].astype("float64")
    return _typed(frame)


def predictions_table(
    experiment: ResultsStore | str,
    trials: Iterable[TrialRecord] | None = None,
    splits: Sequence[str] = ("dev", "test"),
) -> pd.DataFrame:
    """Per-example predictions of ``trials`` (default: every trial with stored predictions)."""
    experiment = open_results(experiment)
    trials = [t for t in experiment.trials if t.prediction_files] if trials is None else list(trials)
    frames = []
    num_classes = 0
    for t in trials:
        for split in splits:
            if split not in t.prediction_files:
                continue
            arrays = experiment.predictions(t, split)
            index = np.asarray(arrays["index"], dtype=np.int64)
            part = pd.DataFrame({
                "trial_id": t.trial_id, "experiment": t.experiment, "kind": t.kind, "method": t.method,
                "split": split, "index": index,
            })
            if "probs" in arrays:
                probs = np.asarray(arrays["probs"], dtype=np.float64)
                label = np.asarray(arrays["label"], dtype=np.int64)
                pred = np.asarray(arrays.get("pred", probs.argmax(-1)), dtype=np.int64)
                part["correct"] = pred == label
                part["label"] = label
                part["pred"] = pred
                part["prob_pred"] = probs[np.arange(len(pred)), pred]
                num_classes = max(num_classes, probs.shape[1])
                for c in range(probs.shape[1]):
                    part[f"prob_{c}"] = probs[:, c]
            else:
                hyps = unpack_sequences(arrays["hyp_flat"], arrays["hyp_len"])
                refs = unpack_sequences(arrays["ref_flat"], arrays["ref_len"])
                part["correct"] = [h == r for h, r in zip(hyps, refs)]
                part["ref"] = [" ".join(map(str, r)) for r in refs]
                part["hyp"] = [" ".join(map(str, h)) for h in hyps]
                part["ref_len"] = np.array([len(r) for r in refs], dtype=np.int64)
                part["hyp_len"] = np.array([len(h) for h in hyps], dtype=np.int64)
                part["edits"] = np.array([edit_distance(h, r) for h, r in zip(hyps, refs)], dtype=np.int64)
                part["frames"] = np.asarray(arrays["frames"], dtype=np.int64)
            frames.append(part)
    if experiment.task == "classification":
        tail = ["label", "pred", "prob_pred"] + [f"prob_{c}" for c in range(num_classes)]
    else:
        tail = ["ref", "hyp", "ref_len", "hyp_len", "edits", "frames"]
    columns = PREDICTION_COLUMNS + tail
    if not frames:
        frame = pd.DataFrame({c: pd.Series(dtype="float64") for c in columns})
        frame["correct"] = frame["correct"].astype(bool)
        frame["index"] = frame["index"].astype("int64")
        return _typed(frame)
    frame = _typed(pd.concat(frames, ignore_index=True).reindex(columns=columns))
    frame["correct"] = frame["correct"].astype(bool)
    for col in ("index", "label", "pred", "ref_len", "hyp_len", "edits", "frames"):
        if col in frame.columns:
            frame[col] = frame[col].astype("int64")
    for col in frame.columns:
        if col.startswith("prob_"):
            frame[col] = frame[col].astype("float64")
    return frame


CONFIG_COLUMNS = [
    "config_id", "kind", "method", "placement_short", "trainable_params", "lr", "n_seeds", "seeds", "metric",
    "dev_mean", "dev_std", "dev_ci_low", "dev_ci_high", "test_mean", "test_std", "test_ci_low", "test_ci_high",
    "confidence", "note", "trial_ids",
]


def configs_table(experiment: ResultsStore | str, confidence: float = 0.95) -> pd.DataFrame:
    """One row per configuration (``config_id``) over its completed seeds: mean, std and a
    Student-t interval over seeds of the dev (best-dev) and test scores
    (:func:`pefttune.analysis.intervals.seed_summary`; one seed: no interval, ``note`` says so).
    DARTS search trials (supernets) are not configurations and are left out."""
    from pefttune.analysis.intervals import seed_summary

    experiment = open_results(experiment)
    trials = trials_table(experiment)
    done = trials[(trials["outcome"] == "completed") & (trials["kind"] != TrialKind.DARTS)
                  & trials["config_id"].notna()]
    rows = []
    for cid, group in done.groupby("config_id", sort=False):
        group = group.sort_values("seed", kind="mergesort")
        dev = seed_summary(group["best_dev_score"].astype(float).tolist(), confidence)
        test = seed_summary(group["test_score"].astype(float).tolist(), confidence)
        first = group.iloc[0]
        rows.append({
            "config_id": cid, "kind": first["kind"], "method": first["method"],
            # DARTS as a method derives its own placement per seed (the report's per-seed table lists them)
            "placement_short": first["placement_short"] if group["placement_short"].nunique() <= 1 else
            VARIES_BY_SEED,
            "trainable_params": first["trainable_params"] if group["trainable_params"].nunique() <= 1 else None,
            "lr": group["lr"].iloc[0] if "lr" in group and group["lr"].nunique(dropna=False) == 1 else None,
            "n_seeds": len(group), "seeds": ",".join(str(int(s)) for s in group["seed"].dropna()),
            "metric": experiment.metric,
            "dev_mean": dev.mean, "dev_std": dev.std, "dev_ci_low": dev.ci_low, "dev_ci_high": dev.ci_high,
            "test_mean": test.mean, "test_std": test.std, "test_ci_low": test.ci_low, "test_ci_high": test.ci_high,
            "confidence": confidence, "note": test.note or dev.note,
            "trial_ids": ",".join(group["trial_id"]),
        })
    frame = pd.DataFrame(rows, columns=CONFIG_COLUMNS)
    for col in ("lr", "dev_mean", "dev_std", "dev_ci_low", "dev_ci_high", "test_mean", "test_std", "test_ci_low",
                "test_ci_high", "confidence"):
        frame[col] = frame[col].astype("float64")
    for col in ("trainable_params", "n_seeds"):
        frame[col] = pd.to_numeric(frame[col]).astype("Int64")
    return frame


def ensembles_table(results: Iterable[Any] = ()) -> pd.DataFrame:
    """One row per :class:`~pefttune.analysis.ensemble_runner.EnsembleResult` (or row dict)."""
    rows = [r if isinstance(r, dict) else r.row() for r in results]
    frame = _typed(pd.DataFrame(rows, columns=ENSEMBLE_COLUMNS))
    for col in ("n_members", "mcnemar_b", "mcnemar_c"):
        frame[col] = pd.to_numeric(frame[col]).astype("int64")
    return frame


COST_COLUMNS = [
    "arm", "kind", "trials", "completed", "epochs", "trial_seconds", "search_trials", "search_seconds", "params_min",
    "params_max", "params", "slot", "device", "combine_ms_per_example", "members_ms_per_example_bound",
]
#: The arm of the discrete search's own trials, and of the replicates of its best placements.
DISCRETE_SEARCH, DISCRETE_REPLICATES, DARTS_ARM = "discrete search", "discrete replicates", "darts search + retrain"


def search_seed(config: dict | None) -> int:
    """The seed the discrete search ran with: the first of ``train.seeds`` (else ``train.seed``, 0)."""
    train = (config or {}).get("train") or {}
    seeds = train.get("seeds") or [train.get("seed", 0)]
    return int(seeds[0])


def trained_epochs(trials: pd.DataFrame) -> pd.Series:
    """The epochs each trial trained itself: its ``epochs``, less, for a trial that continued a rung of
    the learning-rate protocol (``config/continues``: the rung's checkpoint), the rung's epochs, which
    the rung's own trial counts."""
    epochs = pd.to_numeric(trials["epochs"], errors="coerce")
    if "config/continues" not in trials:
        return epochs
    by_id = dict(zip(trials["trial_id"], epochs))

    def rung(path) -> float:
        if not isinstance(path, str) or not path:
            return 0.0
        trial = Path(path.rstrip("/")).parent.name.split("_", 2)[-1]  # <trainable>_fn_<trial id>
        found = by_id.get(trial)
        return 0.0 if found is None or pd.isna(found) else float(found)

    return epochs - trials["config/continues"].map(rung).astype("float64")


def cost_arm(kind: str, method: str | None, seed: int | None, first_seed: int) -> str:
    """The ``costs`` arm of one trial (module docstring)."""
    if kind == TrialKind.UNIFORM:
        return f"{TrialKind.UNIFORM}:{method}"
    if kind == TrialKind.DISCRETE:
        return DISCRETE_SEARCH if seed is None or int(seed) == first_seed else DISCRETE_REPLICATES
    if kind in (TrialKind.DARTS, TrialKind.DARTS_DERIVED):
        return DARTS_ARM
    return str(kind)


def _slot(config: dict | None, darts_search: bool) -> tuple[str, str]:
    resources = (config or {}).get("resources") or {}
    cpu = resources.get("cpu", 1)
    if darts_search:
        cpu = ((config or {}).get("darts") or {}).get("search_cpu") or cpu
    gpu = float(resources.get("gpu") or 0)
    text = f"{float(cpu):g} CPU" + (f" + {gpu:g} GPU" if gpu > 0 else "")
    return text, "gpu" if gpu > 0 else "cpu"


def _params_text(low: Any, high: Any) -> str | None:
    if low is None or pd.isna(low):
        return None
    return f"{int(low):,}" if low == high else f"{int(low):,}-{int(high):,}"


def _cost_row(arm: str, group: pd.DataFrame, config: dict | None, params: pd.Series) -> dict:
    kinds = list(dict.fromkeys(str(k) for k in group["kind"].dropna()))
    slots = {_slot(config, k == TrialKind.DARTS) for k in kinds} or {_slot(config, False)}
    search = None
    if arm == DISCRETE_SEARCH:
        search = group
    elif arm == DARTS_ARM:
        search = group[group["kind"] == TrialKind.DARTS]
    low, high = (params.min(), params.max()) if params.notna().any() else (None, None)
    return {
        "arm": arm, "kind": ",".join(kinds), "trials": len(group),
        "completed": int((group["outcome"] == "completed").sum()),
        "epochs": int(group["_trained_epochs"].fillna(0).sum()),
        "trial_seconds": float(pd.to_numeric(group["time_total_s"], errors="coerce").fillna(0.0).sum()),
        "search_trials": None if search is None else len(search),
        "search_seconds": None if search is None else
        float(pd.to_numeric(search["time_total_s"], errors="coerce").fillna(0.0).sum()),
        "params_min": low, "params_max": high, "params": _params_text(low, high),
        "slot": "; ".join(sorted(s for s, _ in slots)), "device": ",".join(sorted({d for _, d in slots})),
    }


def costs_table(experiment: ResultsStore | str, ensembles: Iterable[Any] = (),
                combine_ms: dict[str, float] | None = None) -> pd.DataFrame:
    """One row per arm, then one per ensemble (columns in the module docstring).

    ``ensembles``: rows with ``ensemble_id`` and ``member_ids`` (comma-separated trial ids: the
    ensembles table's rows, or :class:`~pefttune.analysis.ensemble_runner.EnsembleResult`);
    an ``ensemble_id`` starting with ``per seed`` is finding 2's and is named
    ``ensembles per seed:<strategy>``.  ``combine_ms``: ensemble id -> the measured combination
    time per example (:func:`pefttune.analysis.costs.combine_ms_per_example`).
    """
    experiment = open_results(experiment)
    trials = trials_table(experiment)
    config = experiment.config
    first = search_seed(config)
    arms = [cost_arm(str(k) if not pd.isna(k) else "unknown", m if not pd.isna(m) else None,
                     s if not pd.isna(s) else None, first)
            for k, m, s in zip(trials["kind"], trials["method"], trials["seed"])]
    trials = trials.assign(_arm=arms, _trained_epochs=trained_epochs(trials))
    rows = []
    for arm, group in trials.groupby("_arm", sort=False):
        # per configuration: the parameters of its (first) completed trial, else any
        params = pd.to_numeric(group.sort_values("outcome", key=lambda o: o != "completed", kind="mergesort")
                               .groupby("config_id", dropna=False)["trainable_params"].first(), errors="coerce")
        rows.append(_cost_row(str(arm), group, config, params))
    samples = (pd.to_numeric(trials["samples_per_s"], errors="coerce") if "samples_per_s" in trials
               else pd.Series(np.nan, index=trials.index))
    by_id = trials.assign(_sps=samples).set_index("trial_id")
    for ens in ensembles:
        row = ens if isinstance(ens, dict) else ens.row()
        ids = [i for i in str(row["member_ids"]).split(",") if i]
        group = trials[trials["trial_id"].isin(ids)]
        name = str(row["ensemble_id"])
        arm = f"ensembles {name}" if name.startswith("per seed") else f"ensemble {name}"
        out = _cost_row(arm, group, config, pd.Series(dtype="float64"))
        total = pd.to_numeric(group["trainable_params"], errors="coerce").sum(min_count=1)
        sps = by_id.loc[[i for i in ids if i in by_id.index], "_sps"]
        out.update({"kind": "ensemble", "params_min": total, "params_max": total,
                    "params": _params_text(total, total),
                    "combine_ms_per_example": (combine_ms or {}).get(name),
                    "members_ms_per_example_bound": float((1000.0 / sps).sum())
                    if len(sps) == len(ids) and len(ids) and sps.notna().all() and (sps > 0).all() else None})
        rows.append(out)
    frame = pd.DataFrame(rows, columns=COST_COLUMNS)
    for col in ("trials", "completed", "epochs", "search_trials", "params_min", "params_max"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").round().astype("Int64")
    for col in ("trial_seconds", "search_seconds", "combine_ms_per_example", "members_ms_per_example_bound"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
    for col in ("arm", "kind", "params", "slot", "device"):
        frame[col] = frame[col].astype("string")
    return frame


# --------------------------------------------------------------------------- writing
def write_table(frame: pd.DataFrame, out_dir: str | Path, name: str, formats: Sequence[str] = FORMATS,
                provenance: Provenance | None = None) -> dict[str, Path]:
    """Write ``frame`` as ``<out_dir>/<name>.<format>`` for each format, atomically; ``provenance``
    goes into the parquet schema metadata (key ``pefttune.provenance``, JSON)."""
    out_dir = Path(out_dir)
    files = {}
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown export format {fmt!r}; use {list(FORMATS)}")
        path = out_dir / f"{name}.{fmt}"
        with atomic_output(path) as tmp:
            if fmt == "parquet":
                _write_parquet(frame, tmp, provenance)
            else:
                frame.to_csv(tmp, index=False)
        files[f"{name}.{fmt}"] = path
    return files


def _write_parquet(frame: pd.DataFrame, path: Path, provenance: Provenance | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    if provenance is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **provenance.parquet_metadata()})
    pq.write_table(table, path)
