"""Ensembles of fine-tuned members, as plain functions over numpy arrays.

All members are aligned on the same examples (same order).  Two families:

* **Classification** -- ``probs`` of shape ``(M, N, C)``: M members, N
  examples, C classes, holding probabilities (not log-probabilities).  A list
  of M arrays of shape ``(N, C)`` is accepted too.
* **CTC** -- ``log_probs`` of shape ``(M, N, T, V)``: per-frame
  log-posteriors (log-softmax outputs), padded to T frames, with the true
  frame count of each example in ``lengths`` (shape ``(N,)``); all members
  share the frame rate and the vocabulary.  A list of M ``(N, T, V)`` arrays
  is accepted too.  Padded frames are never read.  Hypothesis-level voting
  (:func:`rover_vote`) works on decoded token sequences instead.

Tie-breaking is deterministic everywhere and stated in each docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from pefttune.metrics import _check_lengths, _collapse, _to_numpy, accuracy

__all__ = [
    "ENSEMBLE_STRATEGIES",
    "apply_selection",
    "caruana_selection",
    "ctc_frame_vote",
    "ctc_posterior_average",
    "majority_vote",
    "rover_vote",
    "soft_vote",
    "weighted_vote",
]

#: Default absolute tolerance under which two vote scores / summed
#: probabilities count as tied (guards against 0.1 + 0.2 != 0.3).
TIE_TOL = 1e-9


# --------------------------------------------------------------------------- input checks
def _stack_members(x: Any, name: str, member_ndim: int, what: str) -> np.ndarray:
    """Turn ``x`` (stacked array or list of per-member arrays) into one array (M, ...)."""
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise ValueError(f"{name} must contain at least one member, got an empty list")
        members = [_to_numpy(m, f"{name}[{i}]") for i, m in enumerate(x)]
        ref = members[0]
        if ref.ndim != member_ndim:
            raise ValueError(f"{name}[0] must have shape {what}, got {ref.shape}")
        for i, m in enumerate(members[1:], start=1):
            if m.ndim != member_ndim:
                raise ValueError(f"{name}[{i}] must have shape {what}, got {m.shape}")
            if m.shape[-1] != ref.shape[-1]:
                raise ValueError(
                    f"{name}[{i}] has vocabulary/class size {m.shape[-1]}, but {name}[0] has "
                    f"{ref.shape[-1]}; all members must share the vocabulary"
                )
            if m.shape != ref.shape:
                raise ValueError(f"{name}[{i}] has shape {m.shape}, but {name}[0] has {ref.shape}")
        arr = np.stack(members)
    else:
        arr = _to_numpy(x, name)
        if arr.ndim != member_ndim + 1:
            raise ValueError(f"{name} must have shape (M, {what[1:]}, got {arr.shape}")
        if arr.shape[0] == 0:
            raise ValueError(f"{name} must contain at least one member (M >= 1), got shape {arr.shape}")
    if arr.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty class/vocabulary axis, got shape {arr.shape}")
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    return arr


def _check_probs(probs: Any, name: str = "probs") -> np.ndarray:
    p = _stack_members(probs, name, 2, "(N, C)").astype(np.float64, copy=False)
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} must be finite")
    if np.any(p < 0):
        raise ValueError(f"{name} must hold probabilities (>= 0); exponentiate log-probabilities first")
    return p


def _check_log_probs(log_probs: Any, lengths: Any, blank: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate shapes, lengths and blank; the array keeps its dtype (no full copy)."""
    lp = _stack_members(log_probs, "log_probs", 3, "(N, T, V)")
    _, n, t, v = lp.shape
    lens = _check_lengths(lengths, n, t)
    if not 0 <= int(blank) < v:
        raise ValueError(f"blank must be in [0, {v}), got {blank}")
    return lp, lens, int(blank)


def _posteriors(lp: np.ndarray, n: int, length: int) -> np.ndarray:
    """``exp`` of example n's valid frames, shape (M, length, V), float64, checked.

    Each valid frame must be a log-distribution: |logsumexp| <= 1e-2 (loose
    enough for fp16/bf16 outputs, tight enough to reject raw logits or
    probabilities passed by mistake).
    """
    x = np.asarray(lp[:, n, :length], dtype=np.float64)
    if np.any(np.isnan(x)) or np.any(x == np.inf):
        raise ValueError(f"log_probs must not contain NaN or +inf in valid frames (example {n})")
    post = np.exp(x)
    if length:
        total = post.sum(axis=-1)
        if np.any(np.abs(np.log(total)) > 1e-2):
            raise ValueError(
                "log_probs must be log-probabilities (log_softmax outputs): the probabilities "
                f"of a frame must sum to 1, got sums in [{total.min():.3g}, {total.max():.3g}] "
                f"for example {n}; raw logits or probabilities were passed"
            )
    return post


def _resolve(votes: np.ndarray, scores: np.ndarray, prob_sums: np.ndarray, tol: float) -> np.ndarray:
    """Pick one class per column from vote scores, with the shared tie-breaking rule.

    ``votes`` (M, K): each member's class per item; ``scores`` (K, C): vote
    score per class; ``prob_sums`` (K, C): summed member probabilities.
    Tied = score within ``tol`` of the best score; among those, tied = summed
    probability within ``tol`` of the best; among the classes still tied, the
    class voted for by the lowest-indexed member that votes for any of them.
    Only classes with at least one voter are candidates.
    """
    k = votes.shape[1]
    voted = np.zeros(scores.shape, dtype=bool)
    voted[np.broadcast_to(np.arange(k), votes.shape), votes] = True
    tied = voted & (scores >= scores.max(axis=1, keepdims=True) - tol)
    masked = np.where(tied, prob_sums, -np.inf)
    tied &= prob_sums >= masked.max(axis=1, keepdims=True) - tol
    # Every remaining class has at least one voter, so ``first`` is a real voter.
    voter_hits = tied[np.arange(k)[None, :], votes]  # (M, K)
    first = np.argmax(voter_hits, axis=0)
    return votes[first, np.arange(k)]


def _check_tol(tol: float) -> float:
    tol = float(tol)
    if not np.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    return tol


# --------------------------------------------------------------------------- classification
def weighted_vote(probs: Any, weights: Any, tol: float = TIE_TOL) -> np.ndarray:
    """Weighted hard vote; returns predictions of shape ``(N,)``.

    Each member votes for its argmax class (lowest class index if a member's
    own probabilities tie).  ``weights`` (shape ``(M,)``, finite, >= 0, not all
    zero; e.g. dev accuracies) are normalised to sum to 1 and the score of a
    class is the total weight of the members voting for it.  Ties -- scores
    within ``tol`` of the maximum -- are broken as in :func:`majority_vote`:
    first by the probability of the tied classes summed over *all* members
    (unweighted; within ``tol`` counts as tied), then by taking the class
    voted for by the lowest-indexed member among the members voting for a
    still-tied class.  With equal weights this is exactly :func:`majority_vote`.
    """
    p = _check_probs(probs)
    m, _, c = p.shape
    w = _to_numpy(weights, "weights")
    if w.ndim != 1 or w.shape[0] != m:
        raise ValueError(f"weights must have shape ({m},) (one per member), got {w.shape}")
    w = w.astype(np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")
    if w.sum() <= 0:
        raise ValueError("weights must not all be zero")
    w = w / w.sum()
    tol = _check_tol(tol)
    votes = np.argmax(p, axis=-1)  # (M, N)
    onehot = votes[..., None] == np.arange(c)  # (M, N, C)
    scores = np.einsum("m,mnc->nc", w, onehot.astype(np.float64))
    return _resolve(votes, scores, p.sum(axis=0), tol)


def majority_vote(probs: Any, tol: float = TIE_TOL) -> np.ndarray:
    """Plurality hard vote of the members' argmax classes; returns ``(N,)``.

    Each member votes for its argmax class (lowest class index if its own
    probabilities tie); the class with the most votes wins.  Ties are broken

    1. by the summed probability of each tied class over *all* M members
       (``probs[:, n, c].sum()``), highest wins; sums within ``tol`` tie;
    2. if still tied, by member index: the winner is the class predicted by the
       lowest-indexed member among the members voting for a still-tied class.

    Example: ``probs[:, n] = [[.4, .6], [.6, .4]]`` -- member 0 votes 1, member
    1 votes 0, both summed probabilities are 1.0, so member 0's class 1 wins
    (not the lower class index 0).
    """
    p = _check_probs(probs)
    return weighted_vote(p, np.ones(p.shape[0]), tol=tol)


def soft_vote(probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Soft vote: ``mean_probs = probs.mean(axis=0)`` (shape ``(N, C)``).

    Returns ``(pred, mean_probs)`` with ``pred = argmax(mean_probs, -1)``
    (lowest class index on ties).
    """
    p = _check_probs(probs)
    mean = p.mean(axis=0)
    return np.argmax(mean, axis=-1), mean


def caruana_selection(
    dev_probs: Any,
    dev_labels: Any,
    max_size: int | None = None,
    metric: Callable[[np.ndarray, np.ndarray], float] = accuracy,
    with_replacement: bool = True,
) -> list[int]:
    """Greedy forward ensemble selection (Caruana et al., 2004).

    The ensemble's output is the mean of its selected members' probabilities
    (a member selected k times has weight k) and its prediction the argmax
    (lowest class index on ties).  ``metric(pred, dev_labels)`` is maximised
    (higher is better).

    1. Start from the best single member (lowest index on ties).
    2. While the selection has fewer than ``max_size`` entries (default ``None``
       = M, the number of members): score adding each candidate -- every
       member if ``with_replacement``, else only unselected ones -- and take
       the best (lowest index on ties).  Add it only if it *strictly* improves
       the current score; otherwise stop.

    Returns the selected member indices in selection order, repeats included.
    """
    p = _check_probs(dev_probs, "dev_probs")
    m, n, _ = p.shape
    y = _to_numpy(dev_labels, "dev_labels")
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"dev_labels must have shape ({n},) to match dev_probs, got {y.shape}")
    if n == 0:
        raise ValueError("dev_probs must contain at least one example")
    if max_size is None:
        max_size = m
    if int(max_size) != max_size or max_size < 1:
        raise ValueError(f"max_size must be a positive integer, got {max_size}")
    if not callable(metric):
        raise ValueError("metric must be a callable metric(pred, ref) -> float")

    def score(total: np.ndarray) -> float:
        return float(metric(np.argmax(total, axis=-1), y))

    singles = [score(p[i]) for i in range(m)]
    best = int(np.argmax(singles))  # first maximum
    selected = [best]
    total = p[best].copy()
    current = singles[best]
    while len(selected) < max_size:
        cands = range(m) if with_replacement else [i for i in range(m) if i not in selected]
        best_i, best_s = -1, -np.inf
        for i in cands:
            s = score(total + p[i])
            if s > best_s:
                best_i, best_s = i, s
        if best_i < 0 or not best_s > current:
            break
        selected.append(best_i)
        total += p[best_i]
        current = best_s
    return selected


def apply_selection(probs: Any, selected: Sequence[int]) -> np.ndarray:
    """Ensemble probabilities ``probs[selected].mean(axis=0)``, shape ``(N, C)``.

    Repeated indices count with their multiplicity (Caruana weights).
    """
    p = _check_probs(probs)
    idx = np.asarray(list(selected))
    if idx.ndim != 1 or idx.shape[0] == 0:
        raise ValueError("selected must be a non-empty list of member indices")
    if idx.dtype.kind not in "iu":
        raise ValueError(f"selected must contain integer member indices, got dtype {idx.dtype}")
    if np.any(idx < 0) or np.any(idx >= p.shape[0]):
        raise ValueError(f"selected indices must lie in [0, {p.shape[0]}), got {idx.tolist()}")
    return p[idx].mean(axis=0)


# --------------------------------------------------------------------------- CTC
def ctc_frame_vote(log_probs: Any, lengths: Any, blank: int = 0, tol: float = TIE_TOL) -> list[list[int]]:
    """Frame-level majority vote, then greedy CTC decoding.

    For each valid frame (``t < lengths[n]``) every member votes for its argmax
    label (blank included; lowest label index on a member's own ties); the
    frame label is the most-voted one.  Ties are broken by the highest
    posterior probability ``exp(log_probs)`` summed over all members (within
    ``tol`` counts as tied), then by the label of the lowest-indexed member
    voting for a still-tied label -- exactly :func:`majority_vote` applied per
    frame.  The voted frame path is collapsed (merge repeats, drop ``blank``).
    ``lengths=None`` means every example uses all T frames.
    """
    lp, lens, blank = _check_log_probs(log_probs, lengths, blank)
    tol = _check_tol(tol)
    out = []
    for n, length in enumerate(lens):
        post = _posteriors(lp, n, length)  # (M, L, V)
        if length == 0:
            out.append([])
            continue
        votes = np.argmax(post, axis=-1)
        counts = (votes[..., None] == np.arange(post.shape[-1])).sum(axis=0).astype(np.float64)
        path = _resolve(votes, counts, post.sum(axis=0), tol)
        out.append(_collapse(path, blank))
    return out


def ctc_posterior_average(log_probs: Any, lengths: Any, blank: int = 0) -> list[list[int]]:
    """Average the members' frame posteriors, then greedy CTC decoding.

    Per valid frame: ``mean_m exp(log_probs[m, n, t])`` (probabilities, not
    log-probabilities), argmax (lowest label index on ties), then collapse
    repeats and drop ``blank``.  ``lengths=None`` means all T frames are valid.
    """
    lp, lens, blank = _check_log_probs(log_probs, lengths, blank)
    out = []
    for n, length in enumerate(lens):
        mean = _posteriors(lp, n, length).mean(axis=0)  # (L, V)
        out.append(_collapse(np.argmax(mean, axis=-1), blank) if length else [])
    return out


_NULL = None  # epsilon arc in the word transition network


def _align_to_network(slots: list[list[Hashable]], hyp: list[Hashable], n_prev: int) -> list[list[Hashable]]:
    """Align ``hyp`` to the network ``slots`` (each slot: one entry per each of the
    ``n_prev`` members aligned so far); returns slots with one more entry each."""
    s, h = len(slots), len(hyp)
    has_null = np.array([any(x is _NULL for x in slot) for slot in slots], dtype=bool)
    skip = np.where(has_null, 0, 1).astype(np.int64)  # cost of giving this member NULL
    # sub[i, j] = 0 if hyp[j] equals a non-NULL entry of slot i, else 1.
    ids: dict[Hashable, int] = {}
    hyp_ids = np.array([ids.setdefault(t, len(ids)) for t in hyp], dtype=np.int64)
    # Slot entries as ids; NULL and tokens absent from hyp become -1 (match nothing).
    slot_ids = np.array([[ids.get(x, -1) if x is not _NULL else -1 for x in slot] for slot in slots],
                        dtype=np.int64).reshape(s, n_prev)
    sub = np.where((slot_ids[:, :, None] == hyp_ids[None, None, :]).any(axis=1), 0, 1)
    # d[i, j]: cost of aligning the first i slots with the first j tokens.  Rows are
    # vectorised; the horizontal (insertion, cost 1) move is a running minimum.
    jj = np.arange(h + 1, dtype=np.int64)
    d = np.empty((s + 1, h + 1), dtype=np.int64)
    d[0] = jj
    for i in range(1, s + 1):
        cand = np.empty(h + 1, dtype=np.int64)
        cand[0] = d[i - 1, 0] + skip[i - 1]
        cand[1:] = np.minimum(d[i - 1, :-1] + sub[i - 1], d[i - 1, 1:] + skip[i - 1])
        d[i] = np.minimum.accumulate(cand - jj) + jj
    # Backtrace from the end; preference: slot+token, then skip slot, then insert token.
    out: list[list[Hashable]] = []
    i, j = s, h
    while i > 0 or j > 0:
        if i > 0 and j > 0 and d[i, j] == d[i - 1, j - 1] + sub[i - 1, j - 1]:
            out.append(slots[i - 1] + [hyp[j - 1]])
            i, j = i - 1, j - 1
        elif i > 0 and d[i, j] == d[i - 1, j] + skip[i - 1]:
            out.append(slots[i - 1] + [_NULL])
            i -= 1
        else:
            out.append([_NULL] * n_prev + [hyp[j - 1]])
            j -= 1
    out.reverse()
    return out


def rover_vote(hypotheses: Sequence[Sequence[Sequence[Hashable]]]) -> list[list[Hashable]]:
    """ROVER-style hypothesis-level voting.

    ``hypotheses[m][n]`` is member m's decoded token sequence for example n
    (all members cover the same N examples).  Per example:

    **Alignment** into a word transition network (WTN): a list of *slots*, each
    holding one entry per member already aligned -- a token or NULL (epsilon).
    The network starts as member 0's hypothesis, one slot per token, and each
    further member m = 1..M-1 (in index order) is aligned to the whole current
    network by edit-distance dynamic programming with costs:

    * token x against slot s: 0 if x equals any non-NULL entry of s, else 1;
    * skipping slot s (member m gets NULL there): 0 if s already holds a NULL,
      else 1;
    * inserting token x as a new slot (all earlier members NULL there): 1.

    Among minimum-cost alignments, each step of the backtrace (which runs from
    the ends of both sequences) prefers token-against-slot, then slot skip,
    then insertion.  Member order therefore matters; put the most trusted
    member first.  Tokens may be any hashable values except ``None``.

    **Vote** per slot: the most frequent entry, NULL included; ties go to the
    entry of the lowest-indexed member holding a tied entry.  NULL winners are
    dropped.  E.g. ``[1,2,3]``, ``[1,3]``, ``[1,2,4,3]`` align to slots
    ``(1,1,1) (2,NULL,2) (NULL,NULL,4) (3,3,3)`` and vote ``[1, 2, 3]``.
    """
    if isinstance(hypotheses, (str, bytes)) or len(hypotheses) == 0:
        raise ValueError("hypotheses must be a non-empty list (one entry per member)")
    members = [list(h) for h in hypotheses]
    n = len(members[0])
    for m, h in enumerate(members):
        if len(h) != n:
            raise ValueError(
                f"hypotheses[{m}] has {len(h)} examples, but hypotheses[0] has {n}; "
                "members must be aligned on the same examples"
            )
    out = []
    for ex in range(n):
        seqs = []
        for m in range(len(members)):
            seq = members[m][ex]
            seq = seq.tolist() if isinstance(seq, np.ndarray) else list(seq)
            if any(tok is _NULL for tok in seq):
                raise ValueError(f"hypotheses[{m}][{ex}] contains None, which is reserved for NULL arcs")
            seqs.append(seq)
        slots: list[list[Hashable]] = [[tok] for tok in seqs[0]]
        for m, seq in enumerate(seqs[1:], start=1):
            slots = _align_to_network(slots, seq, n_prev=m)
        result = []
        for slot in slots:
            counts: dict[Hashable, int] = {}
            for entry in slot:
                counts[entry] = counts.get(entry, 0) + 1
            top = max(counts.values())
            winner = next(e for e in slot if counts[e] == top)  # lowest member index
            if winner is not _NULL:
                result.append(winner)
        out.append(result)
    return out


#: Strategy name -> function.  "vote", "weighted", "soft" and "caruana"
#: take classification probabilities; "frame_vote" and "posterior_avg" CTC
#: log-posteriors; "rover" decoded token sequences.
ENSEMBLE_STRATEGIES: dict[str, Callable[..., Any]] = {
    "vote": majority_vote,
    "weighted": weighted_vote,
    "soft": soft_vote,
    "caruana": caruana_selection,
    "frame_vote": ctc_frame_vote,
    "posterior_avg": ctc_posterior_average,
    "rover": rover_vote,
}
