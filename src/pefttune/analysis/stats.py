"""Paired statistics between models evaluated on the same test examples.

Predictions are 1-D label arrays aligned on the same examples (ints or
strings; torch tensors accepted).  "Correct" arrays are 1-D booleans (or 0/1)
saying whether each example was right, so the McNemar and error-overlap
functions also work for sequence tasks (e.g. utterance correct = zero edits).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from pefttune.metrics import _labels_1d, _pair_1d, _to_numpy

__all__ = [
    "BootstrapCI",
    "agreement_matrix",
    "agreement_rate",
    "bootstrap_ci",
    "cohen_kappa",
    "error_overlap",
    "mcnemar_exact",
    "sign_test",
    "pairwise_table",
]


def _correct_pair(correct_a: Any, correct_b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _pair_1d(correct_a, correct_b, "correct_a", "correct_b")
    out = []
    for name, arr in (("correct_a", a), ("correct_b", b)):
        if arr.dtype != bool:
            if arr.dtype.kind not in "iuf" or not np.all((arr == 0) | (arr == 1)):
                raise ValueError(f"{name} must be boolean (or 0/1): whether each example is correct")
            arr = arr.astype(bool)
        out.append(arr)
    return out[0], out[1]


def agreement_rate(pred_a: Any, pred_b: Any) -> float:
    """Fraction of examples on which the two models predict the same label."""
    a, b = _pair_1d(pred_a, pred_b, "pred_a", "pred_b")
    return float(np.mean(a == b))


def cohen_kappa(pred_a: Any, pred_b: Any) -> float:
    """Cohen's kappa between two label arrays: ``(p_o - p_e) / (1 - p_e)``.

    ``p_o`` is the observed agreement rate; ``p_e = sum_k pa_k * pb_k`` with
    ``pa_k`` (``pb_k``) the fraction of examples model a (b) labels ``k``, over
    the union of labels of both.  When ``p_e == 1`` (both models always output
    the same single label) kappa is undefined and ``nan`` is returned.
    """
    a, b = _pair_1d(pred_a, pred_b, "pred_a", "pred_b")
    _, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    n = a.shape[0]
    ia, ib = inv[:n], inv[n:]
    k = int(inv.max()) + 1
    pa = np.bincount(ia, minlength=k) / n
    pb = np.bincount(ib, minlength=k) / n
    po = float(np.mean(ia == ib))
    pe = float(np.dot(pa, pb))
    if np.isclose(pe, 1.0, rtol=0.0, atol=1e-12):
        return float("nan")
    return (po - pe) / (1.0 - pe)


def mcnemar_exact(correct_a: Any, correct_b: Any) -> tuple[int, int, float]:
    """Exact McNemar test on paired correctness.

    ``b`` = #(a correct, b wrong), ``c`` = #(a wrong, b correct).  The p-value
    is the exact two-sided binomial test of ``b`` successes in ``b + c`` trials
    with success probability 1/2 (``scipy.stats.binomtest``); it is 1.0 when
    ``b + c == 0``.  Returns ``(b, c, p_value)``.
    """
    a, b_ = _correct_pair(correct_a, correct_b)
    b = int(np.sum(a & ~b_))
    c = int(np.sum(~a & b_))
    if b + c == 0:
        return b, c, 1.0
    return b, c, float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def sign_test(errors_a: Any, errors_b: Any) -> tuple[int, int, float]:
    """Exact two-sided sign test on paired per-example error counts.

    ``b`` = #(a has fewer errors than b), ``c`` = #(a has more); ties are left out; the
    p-value is the exact binomial test of ``b`` in ``b + c`` at 1/2 (1.0 when ``b + c == 0``).
    On 0/1 errors (classification) this is :func:`mcnemar_exact`; on a CTC task's
    per-utterance edit counts it is the sign test NIST's sc_stats runs, which credits an
    utterance that went from 5 errors to 1 (exact-sentence match would call both wrong).
    """
    a = np.asarray(errors_a, dtype=np.float64).ravel()
    b_ = np.asarray(errors_b, dtype=np.float64).ravel()
    if a.shape != b_.shape:
        raise ValueError(f"errors_a and errors_b must be paired, got {a.size} and {b_.size} examples")
    b, c = int(np.sum(a < b_)), int(np.sum(a > b_))
    if b + c == 0:
        return b, c, 1.0
    return b, c, float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def error_overlap(correct_a: Any, correct_b: Any) -> float:
    """Jaccard overlap of the two models' error sets.

    ``#(both wrong) / #(either wrong)``; ``nan`` when neither model makes an
    error (the overlap of two empty sets is undefined).
    """
    a, b = _correct_pair(correct_a, correct_b)
    either = int(np.sum(~a | ~b))
    if either == 0:
        return float("nan")
    return int(np.sum(~a & ~b)) / either


def _check_preds(preds: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(preds, Mapping) or len(preds) == 0:
        raise ValueError("preds must be a non-empty dict mapping model name -> prediction array")
    out: dict[str, np.ndarray] = {}
    n = None
    first = None
    for name, p in preds.items():
        arr = _labels_1d(p, f"preds[{name!r}]")
        if n is None:
            n, first = arr.shape[0], name
        elif arr.shape[0] != n:
            raise ValueError(
                f"preds[{name!r}] has {arr.shape[0]} examples, but preds[{first!r}] has {n}"
            )
        out[name] = arr
    return out


def agreement_matrix(preds: Mapping[str, Any], measure: str = "agreement") -> pd.DataFrame:
    """Square DataFrame of pairwise ``measure`` between models, in dict order.

    ``measure`` is ``"agreement"`` (:func:`agreement_rate`, diagonal 1.0) or
    ``"kappa"`` (:func:`cohen_kappa`; the diagonal is 1.0 except ``nan`` for a
    model that always predicts one label).  Index and columns are the names.
    """
    fns: dict[str, Callable[[Any, Any], float]] = {"agreement": agreement_rate, "kappa": cohen_kappa}
    if measure not in fns:
        raise ValueError(f"measure must be one of {sorted(fns)}, got {measure!r}")
    p = _check_preds(preds)
    names = list(p)
    fn = fns[measure]
    mat = np.empty((len(names), len(names)))
    for i, a in enumerate(names):
        for j in range(i, len(names)):
            mat[i, j] = mat[j, i] = fn(p[a], p[names[j]])
    return pd.DataFrame(mat, index=pd.Index(names), columns=pd.Index(names))


def pairwise_table(preds: Mapping[str, Any], ref: Any) -> pd.DataFrame:
    """One row per unordered pair ``(a, b)`` of models (dict order, a before b).

    Columns: ``a``, ``b``, ``agreement`` (:func:`agreement_rate`), ``kappa``
    (:func:`cohen_kappa`), ``mcnemar_b`` (a right, b wrong), ``mcnemar_c``
    (a wrong, b right), ``mcnemar_p`` (:func:`mcnemar_exact`), ``both_wrong``
    (number of examples both get wrong -- the fourth cell of McNemar's 2x2
    table) and ``error_overlap`` (:func:`error_overlap`).  Correct means
    ``pred == ref``.
    """
    p = _check_preds(preds)
    r = _labels_1d(ref, "ref")
    n = next(iter(p.values())).shape[0]
    if r.shape[0] != n:
        raise ValueError(f"ref has {r.shape[0]} examples, but the predictions have {n}")
    names = list(p)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ca, cb = p[a] == r, p[b] == r
            mb, mc, mp = mcnemar_exact(ca, cb)
            rows.append(
                {
                    "a": a,
                    "b": b,
                    "agreement": agreement_rate(p[a], p[b]),
                    "kappa": cohen_kappa(p[a], p[b]),
                    "mcnemar_b": mb,
                    "mcnemar_c": mc,
                    "mcnemar_p": mp,
                    "both_wrong": int(np.sum(~ca & ~cb)),
                    "error_overlap": error_overlap(ca, cb),
                }
            )
    columns = ["a", "b", "agreement", "kappa", "mcnemar_b", "mcnemar_c", "mcnemar_p", "both_wrong", "error_overlap"]
    return pd.DataFrame(rows, columns=columns)


class BootstrapCI(NamedTuple):
    """Point estimate on all examples and the percentile bootstrap interval."""

    estimate: float
    low: float
    high: float


def _take(x: Any, idx: np.ndarray) -> Any:
    if isinstance(x, np.ndarray):
        return x[idx]
    return [x[i] for i in idx]


def bootstrap_ci(
    metric_fn: Callable[[Any, Any], float],
    pred: Any,
    ref: Any,
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> BootstrapCI:
    """Percentile bootstrap confidence interval of ``metric_fn(pred, ref)``.

    Example indices are resampled with replacement, all resamples at once:
    ``idx = np.random.default_rng(seed).integers(0, N, size=(n, N))``; the
    metric is computed on each ``(pred[idx[k]], ref[idx[k]])`` and the
    interval is ``np.quantile(scores, [alpha/2, 1 - alpha/2])`` (numpy's
    default linear interpolation).  ``pred``/``ref`` may be arrays or lists
    (e.g. lists of strings for :func:`~pefttune.metrics.wer`); lists are
    resampled as lists.  Returns ``BootstrapCI(estimate, low, high)`` with
    ``estimate = metric_fn(pred, ref)`` on the full data.
    """
    if not callable(metric_fn):
        raise ValueError("metric_fn must be a callable metric_fn(pred, ref) -> float")
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if isinstance(pred, str) or isinstance(ref, str):
        raise ValueError("pred and ref must be per-example sequences, not a single str")
    if hasattr(pred, "detach"):
        pred = _to_numpy(pred, "pred")
    if hasattr(ref, "detach"):
        ref = _to_numpy(ref, "ref")
    size = len(pred)
    if len(ref) != size:
        raise ValueError(f"pred and ref must have the same length, got {size} and {len(ref)}")
    if size == 0:
        raise ValueError("pred must not be empty")
    estimate = float(metric_fn(pred, ref))
    idx = np.random.default_rng(seed).integers(0, size, size=(int(n), size))
    scores = np.array([float(metric_fn(_take(pred, row), _take(ref, row))) for row in idx])
    low, high = np.quantile(scores, [alpha / 2.0, 1.0 - alpha / 2.0])
    return BootstrapCI(estimate, float(low), float(high))
