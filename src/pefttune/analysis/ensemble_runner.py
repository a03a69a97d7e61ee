"""Ensembles of stored trials: members from the results store, strategies from
:mod:`pefttune.analysis.ensembles`, scores with :mod:`pefttune.metrics`.

Members are aligned on the example ``index`` stored with their predictions (every member
must have been evaluated on the same examples); nothing is re-trained or re-run.

Strategies (:data:`CLASSIFICATION_STRATEGIES`, :data:`CTC_STRATEGIES`):

``vote``           majority vote of the members' argmax classes;
``weighted``       weighted vote, weights = the members' dev scores (from their stored
                   dev predictions);
``soft``           mean of the members' probabilities, argmax;
``caruana``        greedy forward selection (with replacement) fitted on dev, applied to
                   test; its dev score is the fitted (optimistic) one;
``frame_vote``     CTC: per-frame majority vote of the members' labels, greedy decoding;
``posterior_avg``  CTC: mean of the members' frame posteriors, greedy decoding;
``rover``          CTC: ROVER voting over the members' decoded hypotheses (best-dev member
                   first).

Classification scores use the experiment's metric (accuracy / macro-F1); CTC scores are
the corpus error rate over the stored token-id sequences (what the trainable reports for
per/wer/cer).  For McNemar tests an example is *correct* when ``pred == label`` or,
for CTC, when the hypothesis equals the reference exactly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from safetensors import safe_open

from pefttune.analysis import ensembles as E
from pefttune.analysis.intervals import paired_bootstrap, sign_test
from pefttune.analysis.selection import select_members
from pefttune.analysis.store import ResultsStore, MissingPredictionsError, TrialRecord, open_results
from pefttune.analysis.tables import ensembles_table, write_table
from pefttune.metrics import METRICS, edit_distance, error_rate
from pefttune.runtime.provenance import collect
from pefttune.runtime.storage import atomic_write_text
from pefttune.training import unpack_sequences

__all__ = [
    "CLASSIFICATION_STRATEGIES",
    "CTC_STRATEGIES",
    "EnsembleResult",
    "EnsembleRun",
    "MemberPredictions",
    "combine",
    "load_members",
    "majority_strategy",
    "run_ensembles",
    "save_ensembles",
    "strategies_for",
]

CLASSIFICATION_STRATEGIES = ("vote", "weighted", "soft", "caruana")
CTC_STRATEGIES = ("frame_vote", "posterior_avg", "rover")
#: The "majority vote" of finding 2, per task.
MAJORITY = {"classification": "vote", "ctc": "rover"}
#: CTC examples processed at once (log-posteriors are sliced lazily per chunk).
CTC_CHUNK = 64


def strategies_for(task: str) -> tuple[str, ...]:
    return CLASSIFICATION_STRATEGIES if task == "classification" else CTC_STRATEGIES


def majority_strategy(task: str) -> str:
    return MAJORITY[task]


# --------------------------------------------------------------------------- predictions
@dataclass
class MemberPredictions:
    """The members' predictions on one split, aligned on ``index`` (sorted)."""

    task: str
    split: str
    trial_ids: list[str]
    index: np.ndarray  # (N,)
    labels: np.ndarray | None = None  # classification (N,)
    probs: np.ndarray | None = None  # classification (M, N, C)
    refs: list[list[int]] | None = None  # CTC references
    hyps: list[list[list[int]]] | None = None  # CTC: hyps[m][n]
    frames: np.ndarray | None = None  # CTC (N,)
    log_prob_files: list[str] = field(default_factory=list)  # CTC: local safetensors files
    orders: list[np.ndarray] = field(default_factory=list)  # per member: stored row of each aligned example

    @property
    def size(self) -> int:
        return len(self.trial_ids)

    def preds(self, m: int):
        """Member m's predictions: class ids (N,) or token sequences."""
        return self.probs[m].argmax(-1) if self.task == "classification" else self.hyps[m]

    def log_probs_chunk(self, rows: np.ndarray) -> np.ndarray:
        """(M, len(rows), T, V) log-posteriors of aligned examples ``rows``, T = their max frames."""
        t_max = max(1, int(self.frames[rows].max())) if len(rows) else 1
        out = []
        for path, order in zip(self.log_prob_files, self.orders):
            stored = order[rows]
            lo, hi = int(stored.min()), int(stored.max()) + 1
            with safe_open(path, framework="numpy") as handle:
                block = handle.get_slice("log_probs")[lo:hi, :t_max]
            out.append(np.asarray(block)[stored - lo])
        widths = {a.shape[1] for a in out}
        if len(widths) > 1:  # members padded to different lengths: pad to the widest
            width = max(widths)
            out = [np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0))) for a in out]
        return np.stack(out)


def load_members(experiment: ResultsStore, members: Sequence[TrialRecord], split: str) -> MemberPredictions:
    """Load and align the members' stored predictions on ``split``."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    task = experiment.task
    ids = [t.trial_id for t in members]
    out = MemberPredictions(task, split, ids, np.empty(0, dtype=np.int64))
    probs, hyps = [], []
    ref_index = None
    for trial in members:
        arrays = experiment.predictions(trial, split)
        index = np.asarray(arrays["index"], dtype=np.int64)
        order = np.argsort(index, kind="stable")
        sorted_index = index[order]
        if ref_index is None:
            ref_index = sorted_index
            if np.unique(sorted_index).shape[0] != sorted_index.shape[0]:
                raise ValueError(f"trial {trial.trial_id}: duplicate example indices in its {split} predictions")
        elif not np.array_equal(ref_index, sorted_index):
            raise ValueError(
                f"trials {ids[0]} and {trial.trial_id} were evaluated on different {split} examples "
                f"({ref_index.shape[0]} vs {sorted_index.shape[0]}); members must share the examples"
            )
        if task == "classification":
            if "probs" not in arrays:
                raise ValueError(f"trial {trial.trial_id}: {split} predictions hold no 'probs' (not classification)")
            label = np.asarray(arrays["label"])[order]
            if out.labels is None:
                out.labels = label
            elif not np.array_equal(out.labels, label):
                raise ValueError(f"trials {ids[0]} and {trial.trial_id} disagree on the {split} labels")
            probs.append(np.asarray(arrays["probs"], dtype=np.float64)[order])
        else:
            if "log_probs" not in arrays:
                raise ValueError(f"trial {trial.trial_id}: {split} predictions hold no 'log_probs' (not CTC)")
            frames = np.asarray(arrays["frames"], dtype=np.int64)[order]
            if out.frames is None:
                out.frames = frames
            elif not np.array_equal(out.frames, frames):
                raise ValueError(
                    f"trials {ids[0]} and {trial.trial_id} have different frame counts on {split}; "
                    "CTC ensembles need members with the same frame rate"
                )
            seqs = unpack_sequences(arrays["hyp_flat"], arrays["hyp_len"])
            hyps.append([seqs[i] for i in order])
            refs = unpack_sequences(arrays["ref_flat"], arrays["ref_len"])
            refs = [refs[i] for i in order]
            if out.refs is None:
                out.refs = refs
            elif out.refs != refs:
                raise ValueError(f"trials {ids[0]} and {trial.trial_id} disagree on the {split} references")
            out.log_prob_files.append(experiment.local_file(trial.prediction_files[split]))
            out.orders.append(order)
    out.index = ref_index
    if task == "classification":
        shapes = {p.shape for p in probs}
        if len(shapes) > 1:
            raise ValueError(f"members have different numbers of classes on {split}: {sorted(shapes)}")
        out.probs = np.stack(probs)
    else:
        out.hyps = hyps
    return out


# --------------------------------------------------------------------------- scoring
def score(experiment: ResultsStore, preds, ref) -> float:
    """The experiment's metric of predictions against labels / references."""
    if experiment.task == "classification":
        fn = METRICS[experiment.metric][0] if experiment.metric in METRICS else METRICS["accuracy"][0]
        return float(fn(np.asarray(preds), np.asarray(ref)))
    return float(error_rate(preds, ref))


def errors(task: str, preds, ref) -> np.ndarray:
    """Per-example errors: 0/1 (classification), the edit count of each utterance (CTC).
    What the supporting paired tests (:func:`pefttune.analysis.intervals.sign_test`) compare."""
    if task == "classification":
        return (np.asarray(preds) != np.asarray(ref)).astype(np.int64)
    return np.array([edit_distance(list(h), list(r)) for h, r in zip(preds, ref)], dtype=np.int64)


def contributions(task: str, errs: np.ndarray, ref):
    """What :func:`pefttune.analysis.intervals.paired_bootstrap` takes for one system, from its
    per-example :func:`errors`: correctness (classification: accuracy is their mean), or (edit
    counts, reference lengths) (CTC: the error rate is their ratio of sums)."""
    if task == "classification":
        return 1.0 - np.asarray(errs, dtype=np.float64)
    return (np.asarray(errs, dtype=np.float64), np.array([len(r) for r in ref], dtype=np.float64))


def gain_interval(experiment: ResultsStore, ensemble_errors: np.ndarray, member_errors: np.ndarray, ref,
                  confidence: float = 0.95, draws: int = 2000) -> tuple[float | None, float | None]:
    """Paired bootstrap interval (over test examples) of the ensemble's gain over one member, from
    their per-example :func:`errors`.  ``(None, None)`` when the metric is not accuracy or an error
    rate (macro F1 is not a sum over examples)."""
    if experiment.metric not in ("accuracy", "per", "wer", "cer"):
        return None, None
    task = experiment.task
    c = paired_bootstrap([contributions(task, ensemble_errors, ref)], [contributions(task, member_errors, ref)],
                         draws=draws, confidence=confidence, higher_is_better=task == "classification")
    return c.ci_low, c.ci_high


def better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def gain(ensemble: float, member: float, mode: str) -> float:
    """How much better the ensemble is (positive = better), in metric units."""
    return ensemble - member if mode == "max" else member - ensemble


# --------------------------------------------------------------------------- running
@dataclass
class EnsembleResult:
    """One strategy over one member set."""

    ensemble_id: str
    members: str  # the member choice: top-5, per-method, ids
    strategy: str
    member_ids: list[str]
    selected: list[str]  # Caruana: the selection (repeats = weights); else member_ids
    metric: str
    mode: str
    dev_score: float | None
    test_score: float
    best_member_id: str  # best member by dev score
    best_member_dev: float | None
    best_member_test: float
    oracle_member_test: float  # best member test score (chosen on test, for reference)
    delta_vs_best: float  # test gain over the best-dev member (positive = better)
    mcnemar_b: int  # ensemble right, best member wrong (test)
    mcnemar_c: int  # ensemble wrong, best member right
    mcnemar_p: float
    test_pred: list = field(default_factory=list, repr=False)  # per aligned test example
    # paired bootstrap interval of delta_vs_best over test examples (None: the metric is not a sum
    # over examples, e.g. macro F1)
    gain_ci_low: float | None = None
    gain_ci_high: float | None = None

    def row(self) -> dict:
        return {
            "ensemble_id": self.ensemble_id,
            "members": self.members,
            "strategy": self.strategy,
            "member_ids": ",".join(self.member_ids),
            "n_members": len(self.member_ids),
            "selected": ",".join(self.selected),
            "metric": self.metric,
            "mode": self.mode,
            "dev_score": self.dev_score,
            "test_score": self.test_score,
            "best_member_id": self.best_member_id,
            "best_member_dev": self.best_member_dev,
            "best_member_test": self.best_member_test,
            "oracle_member_test": self.oracle_member_test,
            "delta_vs_best": self.delta_vs_best,
            "gain_ci_low": self.gain_ci_low,
            "gain_ci_high": self.gain_ci_high,
            "mcnemar_b": self.mcnemar_b,
            "mcnemar_c": self.mcnemar_c,
            "mcnemar_p": self.mcnemar_p,
        }


@dataclass
class EnsembleRun:
    """Ensembles of one member set: the members' scores and one result per strategy."""

    members: str
    trials: list[TrialRecord]
    member_scores: dict[str, dict[str, float | None]]  # trial id -> {"dev", "test"}
    results: list[EnsembleResult]
    index: np.ndarray  # aligned test example indices
    test_ref: list  # labels or reference sequences
    member_test_preds: dict[str, list]

    def result(self, strategy: str) -> EnsembleResult:
        for r in self.results:
            if r.strategy == strategy:
                return r
        raise KeyError(strategy)


def _apply(strategy: str, experiment: ResultsStore, data: MemberPredictions, weights=None, selection=None):
    """Predictions of ``strategy`` on ``data`` (class ids, or token sequences for CTC)."""
    if strategy == "vote":
        return E.majority_vote(data.probs)
    if strategy == "weighted":
        return E.weighted_vote(data.probs, weights)
    if strategy == "soft":
        return E.soft_vote(data.probs)[0]
    if strategy == "caruana":
        return E.apply_selection(data.probs, selection).argmax(-1)
    if strategy == "rover":
        return E.rover_vote(data.hyps)
    if strategy in ("frame_vote", "posterior_avg"):
        fn = E.ctc_frame_vote if strategy == "frame_vote" else E.ctc_posterior_average
        out: list[list[int]] = []
        n = data.index.shape[0]
        for start in range(0, n, CTC_CHUNK):
            rows = np.arange(start, min(n, start + CTC_CHUNK))
            out.extend(fn(data.log_probs_chunk(rows), data.frames[rows], blank=0))
        return out
    raise ValueError(f"unknown strategy {strategy!r}")


def combine(strategy: str, experiment: ResultsStore, data: MemberPredictions, weights=None, selection=None):
    """The predictions of ``strategy`` over the members' loaded predictions ``data`` (``weights``:
    the weighted vote's; ``selection``: Caruana's member indices, with repeats)."""
    return _apply(strategy, experiment, data, weights, selection)


def _check_strategies(task: str, strategies: Iterable[str] | None) -> list[str]:
    valid = strategies_for(task)
    if strategies is None:
        return list(valid)
    if isinstance(strategies, str):
        strategies = [strategies]
    chosen = []
    for name in strategies:
        for part in str(name).split(","):
            part = part.strip()
            if not part:
                continue
            if part not in E.ENSEMBLE_STRATEGIES:
                raise ValueError(f"unknown ensemble strategy {part!r}; known: {sorted(E.ENSEMBLE_STRATEGIES)}")
            if part not in valid:
                raise ValueError(f"strategy {part!r} does not apply to a {task} experiment; use one of {list(valid)}")
            if part not in chosen:
                chosen.append(part)
    if not chosen:
        raise ValueError(f"no ensemble strategy given; use one of {list(valid)}")
    return chosen


def run_ensembles(
    experiment: ResultsStore | str,
    members: str | Sequence[str] | Sequence[TrialRecord] = "top-5",
    strategies: Iterable[str] | None = None,
    confidence: float = 0.95,
    draws: int = 2000,
) -> EnsembleRun:
    """Run ``strategies`` (default: all for the task) over one member choice.

    ``members``: ``top-K``, ``per-method``, trial ids (list or comma-separated), or
    :class:`TrialRecord` objects (label ``ids``).  Needs at least 2 members; every member
    needs stored test predictions, and ``weighted`` / ``caruana`` also dev predictions.
    Each result's gain over the best member carries a paired bootstrap interval
    (:func:`gain_interval`, ``confidence``, ``draws``).
    """
    experiment = open_results(experiment)
    label, trials = _chosen_members(experiment, members)
    chosen = _check_strategies(experiment.task, strategies)
    test = load_members(experiment, trials, "test")
    try:
        dev = load_members(experiment, trials, "dev")
    except MissingPredictionsError:
        dev = None
    member_scores, member_preds = _member_scores(experiment, trials, test, dev)
    best = _best_member(experiment, trials, member_scores)
    results = [_ensemble_result(experiment, label, trials, strategy, test, dev, member_scores, member_preds, best,
                                confidence, draws)
               for strategy in chosen]
    return EnsembleRun(label, trials, member_scores, results, test.index, list(_reference(experiment, test)),
                       member_preds)


def _chosen_members(experiment: ResultsStore, members) -> tuple[str, list[TrialRecord]]:
    """(label, trials) of a member choice; at least 2 of them."""
    if isinstance(members, (list, tuple)) and members and isinstance(members[0], TrialRecord):
        label, trials = "ids", list(members)
    else:
        label, trials = select_members(experiment, members)
    if len(trials) < 2:
        raise ValueError(
            f"an ensemble needs at least 2 members; members {label!r} of {experiment.uri} gave "
            f"{len(trials)} ({[t.trial_id for t in trials]})"
        )
    return label, trials


def _reference(experiment: ResultsStore, split):
    """The split's reference: labels (classification) or reference sequences (CTC)."""
    return split.labels if experiment.task == "classification" else split.refs


def _member_scores(experiment: ResultsStore, trials: list[TrialRecord], test, dev):
    """(trial id -> {"dev", "test"} scores from the stored predictions, trial id -> test predictions)."""
    test_ref = _reference(experiment, test)
    dev_ref = None if dev is None else _reference(experiment, dev)
    member_scores: dict[str, dict[str, float | None]] = {}
    member_preds: dict[str, list] = {}
    for m, trial in enumerate(trials):
        preds = test.preds(m)
        member_preds[trial.trial_id] = list(preds)
        member_scores[trial.trial_id] = {
            "dev": None if dev is None else score(experiment, dev.preds(m), dev_ref),
            "test": score(experiment, preds, test_ref),
        }
    return member_scores, member_preds


def _best_member(experiment: ResultsStore, trials: list[TrialRecord], member_scores: dict) -> TrialRecord:
    """The best member by dev (the one picked without ensembling; the reported dev score where no dev
    predictions are stored), the first of the best on ties (members are ranked)."""

    def dev_key(t: TrialRecord) -> float:
        value = member_scores[t.trial_id]["dev"]
        value = experiment.score(t, "dev") if value is None else value
        if value is None:
            return -np.inf
        return value if experiment.mode == "max" else -value

    return max(trials, key=dev_key)


def _strategy_inputs(experiment: ResultsStore, strategy: str, trials: list[TrialRecord], dev, member_scores: dict):
    """(weights, selection): the dev scores as vote weights (``weighted``), Caruana's greedy
    selection on dev (``caruana``); None for the other strategies."""
    weights = selection = None
    if strategy in ("weighted", "caruana") and dev is None:
        raise MissingPredictionsError(
            f"strategy {strategy!r} needs dev predictions, missing for some of {[t.trial_id for t in trials]}"
        )
    if strategy == "weighted":
        weights = np.array([member_scores[t.trial_id]["dev"] for t in trials], dtype=np.float64)
        if experiment.mode == "min":
            weights = np.clip(1.0 - weights, 0.0, None)
        if not np.all(np.isfinite(weights)) or weights.sum() <= 0:
            raise ValueError(f"weighted vote: the members' dev scores give no usable weights: {weights.tolist()}")
    if strategy == "caruana":
        metric_fn = METRICS[experiment.metric][0] if experiment.metric in METRICS else METRICS["accuracy"][0]
        selection = E.caruana_selection(dev.probs, dev.labels, metric=metric_fn)
    return weights, selection


def _ensemble_result(experiment: ResultsStore, label: str, trials: list[TrialRecord], strategy: str, test, dev,
                     member_scores: dict, member_preds: dict, best: TrialRecord, confidence: float,
                     draws: int) -> EnsembleResult:
    """One strategy's ensemble: its dev and test scores, its gain over the best member with the
    sign test and the paired bootstrap interval."""
    mode, test_ref = experiment.mode, _reference(experiment, test)
    weights, selection = _strategy_inputs(experiment, strategy, trials, dev, member_scores)
    test_pred = _apply(strategy, experiment, test, weights, selection)
    dev_score = None
    if dev is not None:
        dev_score = score(experiment, _apply(strategy, experiment, dev, weights, selection), _reference(experiment, dev))
    test_score = score(experiment, test_pred, test_ref)
    best_test = member_scores[best.trial_id]["test"]
    best_errors = errors(experiment.task, member_preds[best.trial_id], test_ref)
    ensemble_errors = errors(experiment.task, test_pred, test_ref)
    b, c, p = sign_test(ensemble_errors, best_errors)
    gain_low, gain_high = gain_interval(experiment, ensemble_errors, best_errors, test_ref, confidence, draws)
    tests = [s["test"] for s in member_scores.values()]
    ids = [t.trial_id for t in trials]
    return EnsembleResult(
        ensemble_id=f"{label}:{strategy}",
        members=label,
        strategy=strategy,
        member_ids=ids,
        selected=[ids[i] for i in selection] if selection is not None else ids,
        metric=experiment.metric,
        mode=mode,
        dev_score=dev_score,
        test_score=test_score,
        best_member_id=best.trial_id,
        best_member_dev=member_scores[best.trial_id]["dev"],
        best_member_test=best_test,
        oracle_member_test=max(tests) if mode == "max" else min(tests),
        delta_vs_best=gain(test_score, best_test, mode),
        mcnemar_b=b,
        mcnemar_c=c,
        mcnemar_p=p,
        gain_ci_low=gain_low,
        gain_ci_high=gain_high,
        test_pred=list(test_pred) if experiment.task == "ctc" else np.asarray(test_pred).tolist(),
    )


def default_ensembles(experiment: ResultsStore | str, strategies: Iterable[str] | None = None,
                      confidence: float = 0.95, draws: int = 2000) -> list[EnsembleRun]:
    """The ensembles ``analyze`` runs: top-k (k = the config's ``ensemble_size``) and
    per-method, each when it has at least 2 members."""
    experiment = open_results(experiment)
    runs = []
    for spec in (f"top-{experiment.ensemble_size}", "per-method"):
        label, trials = select_members(experiment, spec)
        if len(trials) >= 2:
            runs.append(run_ensembles(experiment, trials if label == "ids" else spec, strategies, confidence, draws))
    return runs


# --------------------------------------------------------------------------- writing
def ensembles_json(experiment: ResultsStore, runs: Sequence[EnsembleRun]) -> dict:
    return {
        "experiment": experiment.uri,
        "metric": experiment.metric,
        "mode": experiment.mode,
        "task": experiment.task,
        "runs": [
            {
                "members": run.members,
                "member_scores": [
                    {"trial_id": t.trial_id, "kind": t.kind, "method": t.method,
                     "trainable_params": t.trainable_params, **run.member_scores[t.trial_id]}
                    for t in run.trials
                ],
                "ensembles": [r.row() for r in run.results],
            }
            for run in runs
        ],
    }


def save_ensembles(experiment: ResultsStore, runs: Sequence[EnsembleRun], out_dir: str | Path) -> dict[str, Path]:
    """Write ``ensembles.json`` and the ``ensembles`` table (parquet + CSV) to ``out_dir``."""

    out_dir = Path(out_dir)
    path = atomic_write_text(out_dir / "ensembles.json", json.dumps(ensembles_json(experiment, runs), indent=2) + "\n")
    files = {"ensembles.json": path}
    files.update(write_table(ensembles_table([r for run in runs for r in run.results]), out_dir, "ensembles",
                             provenance=collect(experiment.config)))
    return files
