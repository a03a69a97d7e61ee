"""Task metrics as plain functions over numpy arrays (torch tensors accepted).

Classification metrics compare two 1-D label arrays aligned on the same
examples.  Sequence metrics (WER / PER / CER) compare lists of token sequences
with a Levenshtein alignment.  :data:`METRICS` maps each task-metric name to
``(function, mode)`` where ``mode`` is ``"max"`` when higher is better and
``"min"`` when lower is better (the ``mode`` argument Ray Tune expects).
"""

from __future__ import annotations

import math

from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "METRICS",
    "accuracy",
    "align_corpus",
    "align_to_reference",
    "cer",
    "ctc_greedy_decode",
    "edit_distance",
    "edit_ops",
    "error_rate",
    "macro_f1",
    "metric_mode",
    "wer",
    "worst_score",
]


# --------------------------------------------------------------------------- helpers
def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors are detached and moved to CPU.

    Reduced-precision float tensors (bf16/fp16) are upcast to float32 first,
    because numpy has no bfloat16.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        t = x.detach().cpu()
        if t.is_floating_point() and t.dtype.itemsize < 4:
            t = t.float()
        return t.numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # ragged nested lists and the like
        raise ValueError(f"{name} could not be converted to an array: {exc}") from exc


def _labels_1d(x: Any, name: str, allow_empty: bool = False) -> np.ndarray:
    arr = _to_numpy(x, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of labels, got shape {arr.shape}")
    if not allow_empty and arr.shape[0] == 0:
        raise ValueError(f"{name} must not be empty")
    return arr


def _pair_1d(a: Any, b: Any, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    a_arr = _labels_1d(a, name_a)
    b_arr = _labels_1d(b, name_b)
    if a_arr.shape != b_arr.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {a_arr.shape} and {b_arr.shape}"
        )
    return a_arr, b_arr


def _as_token_list(seq: Any, name: str) -> list:
    if isinstance(seq, np.ndarray) or (hasattr(seq, "detach") and hasattr(seq, "cpu")):
        arr = _to_numpy(seq, name)
        if arr.ndim != 1:
            raise ValueError(f"{name} must be a 1-D token sequence, got shape {arr.shape}")
        return arr.tolist()
    if isinstance(seq, (str, Sequence)):
        return list(seq)
    raise ValueError(f"{name} must be a sequence of tokens, got {type(seq).__name__}")


# --------------------------------------------------------------------------- classification
def accuracy(pred: Any, ref: Any) -> float:
    """Fraction of examples with ``pred[i] == ref[i]``.

    ``pred`` and ``ref`` are 1-D, non-empty and of equal length; labels may be
    any type numpy can compare for equality (ints, strings).
    """
    p, r = _pair_1d(pred, ref, "pred", "ref")
    return float(np.mean(p == r))


def macro_f1(pred: Any, ref: Any, labels: Sequence[Hashable] | None = None) -> float:
    """Unweighted mean over classes of the per-class F1 score.

    For class ``c``: ``TP = #(pred==c & ref==c)``, ``FP = #(pred==c & ref!=c)``,
    ``FN = #(pred!=c & ref==c)`` and ``F1_c = 2*TP / (2*TP + FP + FN)``.

    Semantics follow scikit-learn's ``f1_score(average="macro",
    zero_division=0)``:

    * ``labels=None``: the classes are the sorted union of the values seen in
      ``pred`` and ``ref``; so a class absent from both is not averaged over
      (and no class has ``2*TP + FP + FN == 0``).
    * ``labels`` given: the average is taken over exactly those classes.  A
      listed class absent from both ``pred`` and ``ref`` scores ``F1 = 0``
      (zero_division=0).  Predictions or references outside ``labels`` still
      count as FN/FP of the listed classes they miss or hit, but are not
      averaged over themselves.
    """
    p, r = _pair_1d(pred, ref, "pred", "ref")
    if labels is None:
        classes = np.union1d(p, r)
    else:
        classes = _to_numpy(list(labels), "labels")
        if classes.ndim != 1 or classes.shape[0] == 0:
            raise ValueError("labels must be a non-empty 1-D sequence of class labels")
        if np.unique(classes).shape[0] != classes.shape[0]:
            raise ValueError("labels must not contain duplicates")
    scores = []
    for c in classes:
        pc, rc = p == c, r == c
        tp = int(np.sum(pc & rc))
        denom = 2 * tp + int(np.sum(pc & ~rc)) + int(np.sum(~pc & rc))
        scores.append(0.0 if denom == 0 else 2.0 * tp / denom)
    return float(np.mean(scores))


# --------------------------------------------------------------------------- edit distance
def _alignment_rows(hyp: list, ref: list, K: int) -> Iterator[np.ndarray]:
    """Rows 0..len(hyp) of the Levenshtein table of ``hyp`` against ``ref`` (both non-empty).

    One scalar key orders alignments lexicographically by (cost, -substitutions):
    key = K*cost - S with 0 <= S <= cost < K (``K > max(len(hyp), len(ref))``).  Match +0,
    substitution +K-1, insertion/deletion +K.  All steps are additive, so ordinary DP applies.
    """
    # Encode tokens as ints so a row of the DP is one vectorised comparison.
    vocab: dict[Hashable, int] = {}
    h_ids = np.array([vocab.setdefault(t, len(vocab)) for t in hyp], dtype=np.int64)
    r_ids = np.array([vocab.setdefault(t, len(vocab)) for t in ref], dtype=np.int64)
    j = np.arange(len(ref) + 1, dtype=np.int64)
    prev = K * j  # row 0: j deletions
    yield prev
    for i in range(1, len(hyp) + 1):
        cand = np.empty(len(ref) + 1, dtype=np.int64)
        cand[0] = prev[0] + K  # i insertions
        diag = prev[:-1] + np.where(r_ids == h_ids[i - 1], 0, K - 1)
        cand[1:] = np.minimum(diag, prev[1:] + K)
        # Horizontal moves (deletions): cur[j] = min_k<=j cand[k] + K*(j-k).
        prev = np.minimum.accumulate(cand - K * j) + K * j
        yield prev


def edit_ops(a: Sequence[Hashable], b: Sequence[Hashable]) -> tuple[int, int, int]:
    """Levenshtein alignment of hypothesis ``a`` to reference ``b``.

    Returns ``(substitutions, deletions, insertions)`` where a *deletion* is a
    token of the reference ``b`` missing from ``a`` and an *insertion* is an
    extra token of ``a``.  Every operation costs 1; ``S + D + I`` is the edit
    distance.  Tokens are compared with ``==`` (any hashable: words, phoneme
    strings, ints).

    Tie-breaking: among all minimum-cost alignments the one with the most
    substitutions (equivalently the fewest deletions + insertions) is chosen.
    Since ``D - I == len(b) - len(a)`` this makes ``(S, D, I)`` unique.
    """
    hyp = _as_token_list(a, "a")
    ref = _as_token_list(b, "b")
    n, m = len(hyp), len(ref)
    if n == 0:
        return 0, m, 0
    if m == 0:
        return 0, 0, n
    K = max(n, m) + 1
    for prev in _alignment_rows(hyp, ref, K):  # only the last row is needed
        pass
    key = int(prev[-1])
    cost = -(-key // K)
    subs = cost * K - key
    dels = ((cost - subs) + (m - n)) // 2
    ins = ((cost - subs) - (m - n)) // 2
    return subs, dels, ins


def align_to_reference(a: Sequence[Hashable], b: Sequence[Hashable]) -> list:
    """For each token of the reference ``b``, the hypothesis token aligned to it, or ``None``
    where it was deleted; the hypothesis' insertions are left out.

    The alignment is one of :func:`edit_ops`' (minimum cost, most substitutions), so
    ``sum(x != r for x, r in zip(result, b))`` is its ``S + D``.  Used to compare two systems'
    errors position by position on the same reference (finding 3 for CTC tasks).
    """
    hyp = _as_token_list(a, "a")
    ref = _as_token_list(b, "b")
    n, m = len(hyp), len(ref)
    if n == 0 or m == 0:
        return [None] * m
    K = max(n, m) + 1
    table = np.stack(list(_alignment_rows(hyp, ref, K)))  # (n + 1, m + 1), for the backtrace
    out: list = [None] * m
    i, k = n, m
    while i > 0 and k > 0:
        step = 0 if hyp[i - 1] == ref[k - 1] else K - 1
        if table[i, k] == table[i - 1, k - 1] + step:
            out[k - 1] = hyp[i - 1]
            i, k = i - 1, k - 1
        elif table[i, k] == table[i - 1, k] + K:  # an inserted hypothesis token
            i -= 1
        else:  # a deleted reference token
            k -= 1
    return out


def align_corpus(hyps: Sequence[Sequence[int]], refs: Sequence[Sequence[int]]) -> np.ndarray:
    """Integer-token hypotheses aligned to their references (:func:`align_to_reference`),
    concatenated: one entry per reference token, the aligned token or -1 where deleted."""
    if len(hyps) != len(refs):
        raise ValueError(f"hyps and refs must have the same length, got {len(hyps)} and {len(refs)}")
    return np.array([-1 if x is None else int(x) for h, r in zip(hyps, refs)
                     for x in align_to_reference(list(h), list(r))], dtype=np.int64)


def edit_distance(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Levenshtein distance between two token sequences (unit costs, symmetric)."""
    return int(sum(edit_ops(a, b)))


def error_rate(hyps: Sequence[Sequence[Hashable]], refs: Sequence[Sequence[Hashable]]) -> float:
    """Corpus-level error rate: ``sum_i edit_distance(hyps[i], refs[i]) / sum_i len(refs[i])``.

    With word tokens this is WER, with phonemes PER, with characters CER.
    ``hyps`` and ``refs`` are equally long, non-empty lists of token sequences;
    the references must contain at least one token in total.
    """
    if isinstance(hyps, str) or isinstance(refs, str):
        raise ValueError("hyps and refs must be lists of token sequences, not a single str")
    hyps = list(hyps)
    refs = list(refs)
    if len(hyps) != len(refs):
        raise ValueError(f"hyps and refs must have the same length, got {len(hyps)} and {len(refs)}")
    if not refs:
        raise ValueError("refs must not be empty")
    ref_lists = [_as_token_list(r, f"refs[{i}]") for i, r in enumerate(refs)]
    n_ref = sum(len(r) for r in ref_lists)
    if n_ref == 0:
        raise ValueError("refs contain no tokens; the error rate is undefined")
    edits = sum(
        edit_distance(_as_token_list(h, f"hyps[{i}]"), r) for i, (h, r) in enumerate(zip(hyps, ref_lists))
    )
    return edits / n_ref


def _check_strings(x: Any, name: str) -> list[str]:
    if isinstance(x, str):
        raise ValueError(f"{name} must be a list of strings, not a single str")
    out = list(x)
    for i, s in enumerate(out):
        if not isinstance(s, str):
            raise ValueError(f"{name}[{i}] must be a str, got {type(s).__name__}")
    return out


def wer(hyp_strings: Sequence[str], ref_strings: Sequence[str]) -> float:
    """Word error rate: :func:`error_rate` over ``str.split()`` (any whitespace) tokens."""
    hyps = _check_strings(hyp_strings, "hyp_strings")
    refs = _check_strings(ref_strings, "ref_strings")
    return error_rate([h.split() for h in hyps], [r.split() for r in refs])


def cer(hyp_strings: Sequence[str], ref_strings: Sequence[str]) -> float:
    """Character error rate: :func:`error_rate` over characters.

    Each string is whitespace-normalised first (``" ".join(s.split())``: runs
    of whitespace become one space, leading/trailing whitespace is dropped);
    the remaining single spaces count as characters.
    """
    hyps = _check_strings(hyp_strings, "hyp_strings")
    refs = _check_strings(ref_strings, "ref_strings")
    return error_rate([list(" ".join(h.split())) for h in hyps], [list(" ".join(r.split())) for r in refs])


# --------------------------------------------------------------------------- CTC
def _collapse(path: np.ndarray, blank: int) -> list[int]:
    """Greedy CTC collapse of a frame path: merge runs of equal labels, then drop blanks."""
    if path.shape[0] == 0:
        return []
    keep = np.ones(path.shape[0], dtype=bool)
    keep[1:] = path[1:] != path[:-1]
    keep &= path != blank
    return [int(t) for t in path[keep]]


def _check_lengths(lengths: Any, n: int, t: int, name: str = "lengths") -> np.ndarray:
    """Validate per-example frame counts; ``None`` means every example has ``t`` frames."""
    if lengths is None:
        return np.full(n, t, dtype=np.int64)
    arr = np.atleast_1d(_to_numpy(lengths, name))
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must contain integers")
    arr = arr.astype(np.int64)
    if np.any(arr < 0) or np.any(arr > t):
        raise ValueError(f"{name} must lie in [0, {t}] (the padded number of frames), got {arr.tolist()}")
    return arr


def ctc_greedy_decode(log_probs: Any, lengths: Any = None, blank: int = 0) -> list[list[int]]:
    """Best-path CTC decoding.

    ``log_probs`` has shape ``(T, V)`` (one utterance, treated as a batch of
    one) or ``(B, T, V)``; numpy arrays or torch tensors.  Only the first
    ``lengths[b]`` frames of utterance ``b`` are used (``lengths=None``: all
    ``T``; an int is accepted for 2-D input).  Per frame the argmax label is
    taken (on ties the lowest label index, as ``np.argmax``), runs of equal
    labels are merged, then ``blank`` labels are removed; e.g. the path
    ``[0, 1, 1, 0, 1, 2, 2, 0]`` decodes to ``[1, 1, 2]``.  Argmax is invariant
    to the log, so probabilities or logits work as well.

    Returns one list of label ids per utterance (always a list of lists).
    """
    x = _to_numpy(log_probs, "log_probs")
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"log_probs must have shape (T, V) or (B, T, V), got {x.shape}")
    b, t, v = x.shape
    if v == 0:
        raise ValueError("log_probs must have a non-empty vocabulary axis")
    if not 0 <= int(blank) < v:
        raise ValueError(f"blank must be in [0, {v}), got {blank}")
    lens = _check_lengths(lengths, b, t)
    paths = np.argmax(x, axis=-1) if t > 0 else np.zeros((b, 0), dtype=np.int64)
    return [_collapse(paths[i, : lens[i]], int(blank)) for i in range(b)]


# --------------------------------------------------------------------------- registry
#: Task metric name -> (function, mode); ``mode`` is "max" if higher is better.
#: "per" is :func:`error_rate` over phoneme token sequences.
METRICS: dict[str, tuple[Callable[..., float], str]] = {
    "accuracy": (accuracy, "max"),
    "macro_f1": (macro_f1, "max"),
    "per": (error_rate, "min"),
    "wer": (wer, "min"),
    "cer": (cer, "min"),
}


def metric_mode(metric: str) -> str:
    """``max`` or ``min``: the direction in which ``metric`` improves."""
    return METRICS[metric][1]


def worst_score(mode: str) -> float:
    """Score reported by a trial that never trained (over budget): 0 for max, inf for min."""
    return 0.0 if mode == "max" else math.inf
