"""The interval and test maths of the findings: intervals over seeds, speakers and test
examples, paired tests, agreement statistics and family corrections.  Numbers only: the verdict
rules that read them live in :mod:`pefttune.analysis.findings`, one module per finding.

The default interval of a comparison (``analysis.interval: seeds-speakers``,
:func:`seeds_speakers_bootstrap`) covers what the findings are about: training randomness and
new speakers.  Each seed's difference is taken on the whole test set; the seed level is a
Student-t interval over seeds (paired by training seed where both sides share seeds, Welch
otherwise), because a bootstrap over 3 seeds cannot see the tails and undercovers; the speaker
level adds the variance of a cluster bootstrap over test speakers (utterances when the manifest
names no speakers).  The maths and why: :mod:`pefttune.analysis.seeds_speakers`; the coverage,
measured by simulation: ``tests/test_interval_coverage.py``.  With one seed the interval covers
speakers only and carries the caveat :data:`~pefttune.analysis.seeds_speakers.ONE_SEED`.  The
paired bootstrap over test examples (:func:`paired_bootstrap`, ``analysis.interval: examples``)
stays as a supporting number: it says how sure we are about these trained models, not about the
methods.

Also here: Cohen's kappa and the error overlap (:func:`cohen_kappa`, :func:`error_overlap`, and
with intervals :func:`agreement_by_seed`, :func:`agreement_seeds_speakers`), the exact paired
tests (:func:`mcnemar_exact`, :func:`sign_test`, :func:`paired_permutation`), Holm's step-down
p-values and the Bonferroni level of a family of simultaneous intervals
(:func:`bonferroni_confidence`, :func:`check_simultaneous`).

Example::

    >>> from pefttune.analysis.intervals import paired_bootstrap
    >>> c = paired_bootstrap([[1.0, 1.0, 0.0, 1.0]], [[0.0, 1.0, 0.0, 1.0]], draws=200)
    >>> c.diff, c.ci_low <= c.diff <= c.ci_high
    (0.25, True)

Numpy only, plus scipy's Student-t quantile and binomial test.  Sources:
Koehn (EMNLP 2004) and Bisani & Ney (ICASSP 2004), paired bootstrap over test examples with one
resample for both systems and, for error rates, summed edits over summed reference lengths;
Field & Welsh (JRSS-B 2007), bootstrapping clustered data; Colas et al. (2018) and Agarwal et al.
(NeurIPS 2021) on few runs; Dror et al. (ACL 2018), bootstrap and permutation tests for paired
systems and Holm's correction (Holm, Scand. J. Stat. 1979); Bouthillier et al. (MLSys 2021) and
Dodge et al. (2020), why results are compared over seeds; Cohen (1960), kappa; McNemar (1947).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import stdtrit
from scipy.stats import binomtest

from pefttune.analysis.seeds_speakers import (
    ONE_SEED, Clusters, Spread, cluster_counts, cluster_sums, seed_level, t_interval,
)
from pefttune.metrics import _labels_1d, _pair_1d, align_corpus

__all__ = [
    "EXAMPLES_ONLY", "INTERVALS", "Comparison", "PairAgreement", "SeedSummary", "agreement_by_seed",
    "agreement_matrix", "agreement_rate", "agreement_seeds_speakers", "bonferroni_confidence", "check_simultaneous",
    "cohen_kappa", "ctc_agreement_by_seed", "ctc_phoneme_examples", "error_overlap", "holm", "mcnemar_exact",
    "paired_bootstrap", "paired_permutation", "pairwise_table", "percent", "seed_summary", "seeds_speakers_bootstrap",
    "sign_test",
]

#: The settings of ``analysis.interval``: the default over seeds and speakers, or test examples only.
INTERVALS = ("seeds-speakers", "examples")
#: The label of today's paired bootstrap over test examples, a statement about the trained models.
EXAMPLES_ONLY = "examples only: these trained models"

_CHUNK_CELLS = 2_000_000  # draws x examples per chunk of the resampling matrix
_NAN = float("nan")


def _check_confidence(confidence: float) -> float:
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(confidence)


def _check_draws(draws: int) -> int:
    if int(draws) != draws or draws < 1:
        raise ValueError(f"draws must be a positive integer, got {draws}")
    return int(draws)


def percent(confidence: float) -> str:
    """A confidence level as the report writes it: ``percent(0.9875)`` is ``"98.75%"``."""
    return f"{100 * confidence:.4g}%"


def _percentile_ci(x: np.ndarray, confidence: float) -> tuple[float, float]:
    x = x[np.isfinite(x)]  # a resample can make a ratio or kappa undefined
    if x.size == 0:
        return _NAN, _NAN
    low, high = np.quantile(x, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return float(low), float(high)


@dataclass(frozen=True)
class SeedSummary:
    """Mean over seeds with a Student-t interval; ``n_nan`` NaN inputs were dropped."""
    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    note: str = ""
    n_nan: int = 0


def seed_summary(values: Sequence[float], confidence: float = 0.95) -> SeedSummary:
    """Per-configuration summary over training seeds (Bouthillier et al. 2021).

    Student-t interval for the mean of n seeds: ``mean +- t_{n-1, (1+confidence)/2} * std /
    sqrt(n)``, sample std (ddof=1).  NaNs are dropped and counted (``n_nan``); with one seed
    the std and the interval are NaN and ``note`` says "one seed: no interval".
    """
    confidence = _check_confidence(confidence)
    x = np.asarray(values, dtype=float).ravel()
    n_nan = int(np.isnan(x).sum())
    x = x[~np.isnan(x)]
    if np.isinf(x).any():
        raise ValueError("values must be finite (NaN is dropped, inf is an error)")
    n = int(x.size)
    notes = [f"{n_nan} NaN dropped"] if n_nan else []
    if n < 2:
        notes.append("one seed: no interval" if n == 1 else "no values")
        mean = float(x[0]) if n == 1 else _NAN
        return SeedSummary(n, mean, _NAN, _NAN, _NAN, "; ".join(notes), n_nan)
    mean, std = float(x.mean()), float(x.std(ddof=1))
    half = float(stdtrit(n - 1, 0.5 + confidence / 2.0)) * std / math.sqrt(n)
    return SeedSummary(n, mean, std, mean - half, mean + half, "; ".join(notes), n_nan)


@dataclass(frozen=True)
class Comparison:
    """Configuration A against B over seeds and the same test examples.

    ``diff`` is A's advantage in the better direction: ``mean_a - mean_b`` when higher is
    better, ``mean_b - mean_a`` when lower is better (error rates), so ``diff > 0`` always
    means "A is better"; ``ci_low``/``ci_high`` and ``p_value`` refer to ``diff``.
    ``interval`` names what the interval covers ("seeds x speakers", "seeds x utterances",
    "speakers only (one seed)", :data:`EXAMPLES_ONLY`); ``caveat`` is set when a verdict must
    not rest on it (:data:`~pefttune.analysis.seeds_speakers.ONE_SEED`); ``spread`` holds the
    seed and speaker variances of a seeds x speakers interval; ``supporting`` the examples-only
    interval of the same difference.
    """
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    method: str
    n_examples: int
    seeds_a: int
    seeds_b: int
    mean_a: float = _NAN
    mean_b: float = _NAN
    confidence: float = 0.95
    higher_is_better: bool = True
    interval: str = EXAMPLES_ONLY
    caveat: str = ""
    spread: Spread | None = None
    supporting: "Comparison | None" = None

    def lies_below(self, threshold: float) -> bool:
        """The whole interval is below ``threshold`` (``ci_high < threshold``)."""
        return bool(self.ci_high < threshold)

    def lies_above(self, threshold: float) -> bool:
        """The whole interval is above ``threshold`` (``ci_low > threshold``)."""
        return bool(self.ci_low > threshold)

    def straddles(self, threshold: float) -> bool:
        """Neither below nor above ``threshold`` (also True for a NaN interval)."""
        return not (self.lies_below(threshold) or self.lies_above(threshold))

    def ci_text(self) -> str:
        return f"[{self.ci_low:+.4f}, {self.ci_high:+.4f}]"


def _runs(x: Any, name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(num, den, kind): (seeds, examples) arrays; den is ones for plain scores."""
    if isinstance(x, tuple):
        raise ValueError(f"{name} must be a list with one entry per seed (one (num, den) pair: [(num, den)])")
    if not isinstance(x, (list, np.ndarray)) or len(x) == 0 or getattr(x, "ndim", 2) != 2:
        raise ValueError(f"{name} must be a non-empty list with one entry per seed (or a seeds x examples array)")
    nums, dens, kinds = [], [], set()
    for k, e in enumerate(x):
        pair = isinstance(e, tuple)
        if pair and len(e) != 2:
            raise ValueError(f"{name}[{k}] must be per-example scores or a (numerator, denominator) pair")
        num = np.asarray(e[0] if pair else e, dtype=float)
        den = np.asarray(e[1], dtype=float) if pair else np.ones_like(num)
        kinds.add("ratio" if pair else "mean")
        if num.ndim != 1 or num.size == 0 or num.shape != den.shape or (nums and num.size != nums[0].size):
            raise ValueError(f"{name}[{k}]: every seed needs non-empty 1-D arrays over the same examples")
        if not (np.isfinite(num).all() and np.isfinite(den).all()):
            raise ValueError(f"{name}[{k}] has non-finite per-example values")
        if (den < 0).any() or den.sum() <= 0:
            raise ValueError(f"{name}[{k}]: denominators must be >= 0 with a positive total")
        nums.append(num)
        dens.append(den)
    if len(kinds) > 1:
        raise ValueError(f"{name} mixes plain scores and (numerator, denominator) pairs")
    return np.stack(nums), np.stack(dens), kinds.pop()


def _pair_runs(a: Any, b: Any):
    (na, da, ka), (nb, db, kb) = _runs(a, "a"), _runs(b, "b")
    if ka != kb:
        raise ValueError("a and b must use the same metric form (scores, or (num, den) pairs)")
    if na.shape[1] != nb.shape[1]:
        raise ValueError(f"a has {na.shape[1]} examples, b has {nb.shape[1]}: they must be the same examples")
    return na, da, nb, db, ka


def _seed_avg(w: np.ndarray, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """(draws,): the seed-averaged metric on each resample; ``w`` (draws, units), num/den (seeds, units)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return ((w @ num.T) / (w @ den.T)).mean(axis=1)  # (draws, seeds): each seed's metric, then the mean


def _resampled_diffs(sides, n_units: int, draws: int, seed: int, sign: float) -> np.ndarray:
    """(draws,) A - B (signed) over resamples of ``n_units`` units, one resample for both sides
    and all their seeds; ``sides`` = (num_a, den_a, num_b, den_b), each (seeds, units)."""
    na, da, nb, db = sides
    rng, out = np.random.default_rng(seed), np.empty(draws)
    chunk = max(1, _CHUNK_CELLS // n_units)
    for start in range(0, draws, chunk):
        w = cluster_counts(rng, min(chunk, draws - start), n_units)
        out[start:start + w.shape[0]] = sign * (_seed_avg(w, na, da) - _seed_avg(w, nb, db))
    return out


def _shifted_p(out: np.ndarray, diff: float) -> float:
    out = out[np.isfinite(out)]
    tol = 1e-12 * max(1.0, abs(diff))
    return (1 + int(np.sum(np.abs(out - diff) >= abs(diff) - tol))) / (out.size + 1)


def paired_bootstrap(a: Any, b: Any, *, draws: int = 5000, confidence: float = 0.95, seed: int = 0,
                     higher_is_better: bool = True) -> Comparison:
    """Paired bootstrap of A - B over test examples, averaged over seeds: an interval for these
    trained models (:data:`EXAMPLES_ONLY`), not for the methods across training randomness.

    Method (Koehn 2004; Bisani & Ney 2004): ``a`` and ``b`` are lists, one entry per seed (the
    counts may differ), each over the SAME test examples in the same order: a 1-D array of
    per-example scores (metric = mean), or a ``(numerator, denominator)`` pair of 1-D arrays
    (CTC: edit counts and reference lengths; metric = sum(num) / sum(den), never a mean of
    per-utterance rates).  Each draw resamples example indices with replacement, ONE resample
    shared by A, B and all their seeds, computes each seed's metric on it, averages over A's
    seeds and over B's seeds, and records the difference.

    Point estimate: the same difference on the full set.  Interval: percentile, ``np.quantile``
    at ``(1 -+ confidence) / 2``.  p-value, two-sided, shifted null: the bootstrap distribution
    centred on the estimate stands in for the null distribution, so
    ``p = (1 + #{|diff* - diff| >= |diff|}) / (draws + 1)``.  Orientation: see
    :class:`Comparison` (``diff > 0``: A better).
    """
    confidence, draws = _check_confidence(confidence), _check_draws(draws)
    na, da, nb, db, kind = _pair_runs(a, b)
    (sa, n), sb = na.shape, nb.shape[0]
    sign = 1.0 if higher_is_better else -1.0
    mean_a, mean_b = float(np.mean(na.sum(1) / da.sum(1))), float(np.mean(nb.sum(1) / db.sum(1)))
    diff = sign * (mean_a - mean_b)
    out = _resampled_diffs((na, da, nb, db), n, draws, seed, sign)
    low, high = _percentile_ci(out, confidence)
    method = (f"paired bootstrap over examples, seeds averaged, {draws} draws, metric "
              f"{'sum(num)/sum(den)' if kind == 'ratio' else 'mean'}; {percent(confidence)} percentile CI; "
              f"shifted-null two-sided p")
    return Comparison(diff, low, high, float(_shifted_p(out, diff)), method, n, sa, sb, mean_a, mean_b,
                      confidence, bool(higher_is_better))


def _pairing(seeds_a: Sequence | None, seeds_b: Sequence | None, n_a: int, n_b: int,
             fixed_b: bool) -> tuple[list[int], list[int], str]:
    """(rows of A, rows of B, pairing) of the seed level; see :func:`seeds_speakers_bootstrap`."""
    if fixed_b:
        if n_b != 1:
            raise ValueError(f"fixed_b: b must be one deterministic reference, got {n_b} entries")
        return list(range(n_a)), [0] * n_a, "fixed reference" if n_a > 1 else "one seed"
    for name, ids, n in (("seeds_a", seeds_a, n_a), ("seeds_b", seeds_b, n_b)):
        if ids is not None and len(ids) != n:
            raise ValueError(f"{name} must name the seed of each of the {n} entries of its side; got {list(ids)}")
    both = seeds_a is not None and seeds_b is not None
    shared = list(dict.fromkeys(s for s in seeds_a if s is not None and s in set(seeds_b))) if both else []
    rows = ([list(seeds_a).index(s) for s in shared], [list(seeds_b).index(s) for s in shared])
    if len(shared) >= 2:
        return rows[0], rows[1], "paired"
    if n_a >= 2 and n_b >= 2:
        return list(range(n_a)), list(range(n_b)), "Welch"
    return (rows if shared else (list(range(n_a)), list(range(n_b)))) + ("one seed",)


def _check_clusters(clusters: Clusters | None, n: int) -> Clusters:
    clusters = Clusters.utterances(n) if clusters is None else clusters
    if clusters.ids.shape != (n,):
        raise ValueError(f"clusters must give one cluster per test example: {clusters.ids.size} for {n} examples")
    return clusters


def seeds_speakers_bootstrap(a: Any, b: Any, *, clusters: Clusters | None = None, seeds_a: Sequence | None = None,
                             seeds_b: Sequence | None = None, fixed_b: bool = False, draws: int = 2000,
                             confidence: float = 0.95, seed: int = 0, higher_is_better: bool = True) -> Comparison:
    """A - B over training seeds (Student-t) and test speakers (cluster bootstrap variance).

    ``a``, ``b``: as in :func:`paired_bootstrap`.  ``clusters``: the test examples' speakers
    (:class:`~pefttune.analysis.seeds_speakers.Clusters`; None: every example its own cluster).
    ``seeds_a``/``seeds_b`` name each entry's training seed: the seeds both sides have (at least
    2) are paired, the others left out; otherwise Welch over all seeds of each side.
    ``fixed_b``: B is one deterministic reference (the trivial majority label, all blank), paired
    with every seed of A.  With fewer than 2 seeds on a side (or in the pairing) the seed level
    cannot be bounded: the percentile interval of the speaker bootstrap alone, with the caveat
    :data:`~pefttune.analysis.seeds_speakers.ONE_SEED`.

    Estimate: A's mean over the seeds used minus B's; SE^2 = seed level + V_spk, V_spk the
    variance of the seed-averaged difference over cluster resamples (one resample for both sides
    and all their seeds; CTC: edit counts and reference lengths summed per cluster); interval
    ``estimate +- t_{df, (1 + confidence)/2} SE``; p from the same t.  See
    :mod:`pefttune.analysis.seeds_speakers` for why.
    """
    confidence, draws = _check_confidence(confidence), _check_draws(draws)
    na, da, nb, db, kind = _pair_runs(a, b)
    clusters = _check_clusters(clusters, na.shape[1])
    ra, rb, pairing = _pairing(seeds_a, seeds_b, na.shape[0], nb.shape[0], fixed_b)
    sign = 1.0 if higher_is_better else -1.0
    ma, mb = (na.sum(1) / da.sum(1))[ra], (nb.sum(1) / db.sum(1))[rb]
    k = clusters.count
    sums = [cluster_sums(x[rows], clusters.ids, k) for x, rows in ((na, ra), (da, ra), (nb, rb), (db, rb))]
    star = _resampled_diffs(sums, k, draws, seed, sign)
    finite = star[np.isfinite(star)]
    v_spk = float(finite.var(ddof=1)) if finite.size > 1 else _NAN
    metric = "sum(num)/sum(den) per cluster" if kind == "ratio" else "mean"
    if pairing == "one seed":
        est = sign * float(ma.mean() - mb.mean())
        low, high = _percentile_ci(star, confidence)
        spread = Spread("one seed", min(len(ra), len(rb)), _NAN, _NAN, v_spk, _NAN, k)
        method = (f"cluster bootstrap over {k} {clusters.unit} only ({draws} draws, metric {metric}); "
                  f"{percent(confidence)} percentile CI; {ONE_SEED}")
        return Comparison(est, low, high, float(_shifted_p(star, est)), method, na.shape[1], na.shape[0],
                          nb.shape[0], float(ma.mean()), float(mb.mean()), confidence, bool(higher_is_better),
                          f"{clusters.unit} only (one seed)", ONE_SEED, spread)
    est, spread = seed_level(sign * ma, sign * mb, pairing)
    spread = replace(spread, speaker_var=v_spk, n_clusters=k)
    low, high, p = t_interval(est, spread, confidence)
    units = (f"{k} clusters ({clusters.n_speakers} speakers, the other clips without one)"
             if clusters.unit == "speakers" and k != clusters.n_speakers else f"{k} {clusters.unit}")
    method = (f"t over {spread.n_seeds} seeds ({pairing}, df {spread.df:.3g}) + cluster bootstrap variance over "
              f"{units} ({draws} draws, metric {metric}); {percent(confidence)} t interval")
    return Comparison(est, low, high, p, method, na.shape[1], na.shape[0], nb.shape[0], float(ma.mean()),
                      float(mb.mean()), confidence, bool(higher_is_better), clusters.label, "", spread)


def paired_permutation(a: Any, b: Any, *, draws: int = 5000, seed: int = 0) -> float:
    """Two-sided paired permutation (randomisation) test of A vs B (Dror et al. 2018).

    Example i contributes ``d_i = c_a,i - c_b,i`` to the seed-averaged difference, with
    ``c_x,i`` the mean over x's seeds of ``num[s, i] / sum(den[s])`` (scores: ``score[s, i] / n``).
    Under the null an example's A/B labels are exchangeable, so each draw swaps them per example
    with probability 1/2 (flips the sign of ``d_i``); ``p = (1 + #{|sum_i s_i d_i| >= |sum_i
    d_i|}) / (draws + 1)``.  Denominators stay at their full-set totals: exact for scores and
    when A and B share per-example denominators (the same references, as in CTC).
    """
    draws = _check_draws(draws)
    na, da, nb, db, _ = _pair_runs(a, b)
    d = (na / da.sum(1, keepdims=True)).mean(0) - (nb / db.sum(1, keepdims=True)).mean(0)
    observed = abs(float(d.sum()))
    tol = 1e-12 * max(1.0, observed)
    rng, hits, chunk = np.random.default_rng(seed), 0, max(1, _CHUNK_CELLS // d.size)
    for start in range(0, draws, chunk):
        signs = rng.integers(0, 2, size=(min(chunk, draws - start), d.size)) * 2.0 - 1.0
        hits += int(np.sum(np.abs(signs @ d) >= observed - tol))
    return (1 + hits) / (draws + 1)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values (Holm 1979), in the input order.

    With the m non-NaN p-values sorted ascending, ``adj_(j) = max_{k <= j} min(1, (m - k + 1)
    p_(k))``: monotone, capped at 1, never above Bonferroni's ``m p``.  NaN passes through and
    does not count in m.  Equals statsmodels' ``multipletests(p, method="holm")[1]``.
    """
    p = np.asarray(p_values, dtype=float).ravel()
    if ((p < 0) | (p > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    out[order] = np.maximum.accumulate(np.minimum(1.0, (ok.size - np.arange(ok.size)) * p[order]))
    return out


def bonferroni_confidence(confidence: float, m: int) -> float:
    """Per-interval confidence ``1 - (1 - confidence) / m``: m intervals then hold at once with
    probability >= ``confidence`` (Bonferroni).  A rule over a family of m intervals ("some",
    "no" or "most" of m comparisons) needs them built at this level (:func:`check_simultaneous`)."""
    confidence = _check_confidence(confidence)
    if int(m) != m or m < 1:
        raise ValueError(f"m must be a positive integer, got {m}")
    return 1.0 - (1.0 - confidence) / int(m)


def check_simultaneous(items: Sequence[Any], family_confidence: float, what: str) -> None:
    """ValueError unless every interval of ``items`` (each with a ``confidence``) was built at
    ``bonferroni_confidence(family_confidence, len(items))``, so that they hold together."""
    need = bonferroni_confidence(family_confidence, max(1, len(items)))
    if any(c.confidence < need - 1e-9 for c in items):
        raise ValueError(f"{what}: intervals are not simultaneous for {len(items)} comparisons; build them with "
                         f"confidence=bonferroni_confidence({family_confidence}, {len(items)}) = {need:.6g}")


@dataclass(frozen=True)
class PairAgreement:
    """Two methods on the same examples, averaged over paired seeds, with intervals: ``kappa``
    (Cohen's kappa of the predicted labels) and ``overlap`` (Jaccard overlap of the error sets:
    #both wrong / #either wrong).  ``interval``, ``caveat`` and ``supporting`` as in
    :class:`Comparison`; ``kappa_spread``/``overlap_spread``: the seed and speaker variances of a
    seeds x speakers interval."""
    a: str
    b: str
    kappa: float
    kappa_ci_low: float
    kappa_ci_high: float
    overlap: float
    overlap_ci_low: float
    overlap_ci_high: float
    n_examples: int
    seeds: int
    confidence: float = 0.95
    kappa_by_seed: tuple = ()
    overlap_by_seed: tuple = ()
    interval: str = EXAMPLES_ONLY
    caveat: str = ""
    kappa_spread: Spread | None = None
    overlap_spread: Spread | None = None
    supporting: "PairAgreement | None" = None


def _one_hot(codes: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(n, len(classes)) indicator of ``codes`` over sorted ``classes``; other codes: zero rows."""
    out = np.zeros((codes.size, classes.size))
    if classes.size:
        pos = np.minimum(np.searchsorted(classes, codes), classes.size - 1)
        hit = np.flatnonzero(classes[pos] == codes)
        out[hit, pos[hit]] = 1.0
    return out


def _kappa(w: np.ndarray, ca: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """Cohen's kappa per row of multiplicities ``w`` (rows, n) of integer codes ``ca``, ``cb``:
    ``(p_o - p_e) / (1 - p_e)``, NaN where ``p_e == 1``."""
    both = np.intersect1d(ca, cb)  # p_e only needs the classes both models predict
    total = w.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        po = (w @ (ca == cb).astype(float)) / total
        pe = np.sum((w @ _one_hot(ca, both)) * (w @ _one_hot(cb, both)), axis=1) / total**2
        return np.where(np.isclose(pe, 1.0, rtol=0, atol=1e-12), np.nan, (po - pe) / (1.0 - pe))


def _overlap(w: np.ndarray, wrong_a: np.ndarray, wrong_b: np.ndarray) -> np.ndarray:
    """#both wrong / #either wrong per row of multiplicities ``w``, NaN where neither is wrong."""
    with np.errstate(divide="ignore", invalid="ignore"):
        either = w @ (wrong_a | wrong_b).astype(float)
        return np.where(either > 0, (w @ (wrong_a & wrong_b).astype(float)) / either, np.nan)


def _agreement(w: np.ndarray, ca: np.ndarray, cb: np.ndarray, y: np.ndarray):
    """(kappa, overlap) per row of multiplicities ``w`` (rows, n), for integer codes."""
    return _kappa(w, ca, cb), _overlap(w, ca != y, cb != y)


def _nanmean(rows: Any, axis: int = 0) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # every seed undefined -> NaN
        return np.nanmean(np.asarray(rows, dtype=float), axis=axis)


@dataclass(frozen=True)
class _AgreementData:
    """Predictions of seed pairs as integer codes over the examples, and the examples' groups."""
    pairs: list
    y: np.ndarray
    group_of: np.ndarray
    n_groups: int


def _agreement_data(preds_a_by_seed: Sequence[Any], preds_b_by_seed: Sequence[Any], labels: Any,
                    groups: Any) -> _AgreementData:
    s, y = len(preds_a_by_seed), np.asarray(labels).ravel()
    if s == 0 or s != len(preds_b_by_seed):
        raise ValueError("preds_a_by_seed and preds_b_by_seed need the same, non-zero number of seeds")
    arrs = [np.asarray(p).ravel() for p in (*preds_a_by_seed, *preds_b_by_seed)]
    if y.size == 0 or any(p.size != y.size for p in arrs):
        raise ValueError(f"every prediction array must cover the {y.size} examples of labels")
    if groups is None:
        group_of, n_groups = np.arange(y.size), y.size
    else:
        group_ids = np.asarray(groups).ravel()
        if group_ids.size != y.size:
            raise ValueError(f"groups must give one group per example: {group_ids.size} for {y.size} examples")
        group_of = np.unique(group_ids, return_inverse=True)[1].ravel()
        n_groups = int(group_of.max()) + 1
    codes = np.unique(np.concatenate([y, *arrs]), return_inverse=True)[1].reshape(-1, y.size)
    return _AgreementData([(codes[1 + i], codes[1 + s + i]) for i in range(s)], codes[0], group_of, n_groups)


def _agreement_draws(data: _AgreementData, draws: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kappa, overlap), each (draws, seed pairs): every draw resamples the groups once for all seeds."""
    rng, n = np.random.default_rng(seed), data.y.size
    kap, ovl = np.empty((draws, len(data.pairs))), np.empty((draws, len(data.pairs)))
    chunk = max(1, _CHUNK_CELLS // n)
    for start in range(0, draws, chunk):
        w = cluster_counts(rng, min(chunk, draws - start), data.n_groups)[:, data.group_of]
        for k, (ca, cb) in enumerate(data.pairs):
            kap[start:start + w.shape[0], k], ovl[start:start + w.shape[0], k] = _agreement(w, ca, cb, data.y)
    return kap, ovl


def _by_seed(data: _AgreementData) -> tuple[tuple, tuple]:
    full = [_agreement(np.ones((1, data.y.size)), ca, cb, data.y) for ca, cb in data.pairs]
    return tuple(float(f[0][0]) for f in full), tuple(float(f[1][0]) for f in full)


def agreement_by_seed(preds_a_by_seed: Sequence[Any], preds_b_by_seed: Sequence[Any], labels: Any, *,
                      names: tuple[str, str] = ("a", "b"), draws: int = 2000, confidence: float = 0.95,
                      seed: int = 0, groups: Any = None) -> PairAgreement:
    """Kappa and error overlap of two methods, with a paired bootstrap CI over examples
    (:data:`EXAMPLES_ONLY`: for these trained models).

    Seed k of A is paired with seed k of B (the same training seed; the counts must match).
    Each statistic is computed per seed and averaged over seeds (undefined seeds skipped); each
    draw resamples the examples once for both methods and all seeds (Koehn 2004); percentile
    interval.  Kappa as :func:`cohen_kappa`; labels may be any comparable values (strings too).

    ``groups`` (one integer id per example) makes the bootstrap resample whole groups: for a
    CTC task the examples are reference phonemes and the groups their utterances, so that
    phonemes of one utterance, which are not independent, are drawn together (Bisani & Ney 2004).
    """
    confidence, draws = _check_confidence(confidence), _check_draws(draws)
    data = _agreement_data(preds_a_by_seed, preds_b_by_seed, labels, groups)
    kap_s, ovl_s = _by_seed(data)
    kap, ovl = (_nanmean(x, axis=1) for x in _agreement_draws(data, draws, seed))
    return PairAgreement(names[0], names[1], float(_nanmean(list(kap_s))), *_percentile_ci(kap, confidence),
                         float(_nanmean(list(ovl_s))), *_percentile_ci(ovl, confidence), data.y.size,
                         len(data.pairs), confidence, kap_s, ovl_s)


def _t_statistic(by_seed: tuple, star: np.ndarray, confidence: float, bounds: tuple[float, float],
                 n_clusters: int) -> tuple[float, float, float, Spread]:
    """(estimate, low, high, spread) of a per-seed-pair statistic: t over the defined seed pairs
    plus the variance of its seed average over cluster resamples; clipped to ``bounds``."""
    x = np.asarray(by_seed, dtype=float)
    x = x[np.isfinite(x)]
    seed_avg = _nanmean(star, axis=1)
    seed_avg = seed_avg[np.isfinite(seed_avg)]
    v_spk = float(seed_avg.var(ddof=1)) if seed_avg.size > 1 else _NAN
    est = float(x.mean()) if x.size else _NAN
    if x.size < 2:
        low, high = _percentile_ci(seed_avg, confidence)
        return est, low, high, Spread("one seed", int(x.size), _NAN, _NAN, v_spk, _NAN, n_clusters)
    est, spread = seed_level(x, np.zeros_like(x), "paired")
    spread = replace(spread, speaker_var=v_spk, n_clusters=n_clusters)
    low, high, _ = t_interval(est, spread, confidence)
    return est, max(bounds[0], low), min(bounds[1], high), spread


def agreement_seeds_speakers(preds_a_by_seed: Sequence[Any], preds_b_by_seed: Sequence[Any], labels: Any, *,
                             clusters: Any = None, unit: str = "utterances", names: tuple[str, str] = ("a", "b"),
                             draws: int = 2000, confidence: float = 0.95, seed: int = 0) -> PairAgreement:
    """Kappa and error overlap of two methods over seed pairs and test speakers.

    Seed k of A goes with seed k of B.  Each statistic per seed pair on the whole test set; the
    estimate is their mean; the interval ``mean +- t_{n-1, (1+confidence)/2} sqrt(s^2 / n +
    V_spk)`` with V_spk the variance of the seed-averaged statistic when whole clusters
    (``clusters``: one id per example, e.g. each example's speaker, or for CTC phonemes the
    speaker of their utterance; None: every example its own) are resampled, once for both
    methods and all seeds; clipped to the statistic's range (kappa [-1, 1], overlap [0, 1]).
    One seed pair: the percentile interval of the cluster bootstrap, with the caveat
    :data:`~pefttune.analysis.seeds_speakers.ONE_SEED`.
    """
    confidence, draws = _check_confidence(confidence), _check_draws(draws)
    data = _agreement_data(preds_a_by_seed, preds_b_by_seed, labels, clusters)
    kap_s, ovl_s = _by_seed(data)
    kap_star, ovl_star = _agreement_draws(data, draws, seed)
    kappa = _t_statistic(kap_s, kap_star, confidence, (-1.0, 1.0), data.n_groups)
    overlap = _t_statistic(ovl_s, ovl_star, confidence, (0.0, 1.0), data.n_groups)
    one = kappa[3].pairing == "one seed"
    return PairAgreement(names[0], names[1], *kappa[:3], *overlap[:3], data.y.size, len(data.pairs), confidence,
                         kap_s, ovl_s, f"{unit} only (one seed)" if one else f"seeds x {unit}",
                         ONE_SEED if one else "", kappa[3], overlap[3])


def ctc_phoneme_examples(hyps_a_by_seed: Sequence[Sequence[Sequence[int]]],
                         hyps_b_by_seed: Sequence[Sequence[Sequence[int]]], refs: Sequence[Sequence[int]]):
    """CTC systems as per-phoneme labels: (A's aligned labels per seed, B's, the reference
    phonemes, each phoneme's utterance index).  See :func:`ctc_agreement_by_seed`."""
    refs = [list(r) for r in refs]
    for side, hyps_by_seed in (("a", hyps_a_by_seed), ("b", hyps_b_by_seed)):
        bad = [k for k, hyps in enumerate(hyps_by_seed) if len(hyps) != len(refs)]
        if bad:
            raise ValueError(f"hyps_{side}_by_seed: seed(s) {bad} do not hold one hypothesis per reference "
                             f"({len(refs)})")
    labels = np.array([int(x) for r in refs for x in r], dtype=np.int64)
    utterance = np.repeat(np.arange(len(refs)), [len(r) for r in refs])
    return ([align_corpus(h, refs) for h in hyps_a_by_seed], [align_corpus(h, refs) for h in hyps_b_by_seed],
            labels, utterance)


def ctc_agreement_by_seed(hyps_a_by_seed: Sequence[Sequence[Sequence[int]]],
                          hyps_b_by_seed: Sequence[Sequence[Sequence[int]]], refs: Sequence[Sequence[int]], *,
                          names: tuple[str, str] = ("a", "b"), draws: int = 2000, confidence: float = 0.95,
                          seed: int = 0) -> PairAgreement:
    """:func:`agreement_by_seed` for CTC systems, over reference phonemes.

    Exact-sentence errors say nothing here: at a PER of 0.3 nearly every sentence holds an
    error, so any two systems "share" nearly all their errors.  Each hypothesis is aligned to
    its reference instead (:func:`pefttune.metrics.align_to_reference`); the examples are the
    reference phonemes, a system's label for one is the token aligned to it (-1: deleted), so
    a phoneme is an error when substituted or deleted (insertions are not counted).  The
    bootstrap resamples utterances, each with all its phonemes.
    """
    pa, pb, labels, utterance = ctc_phoneme_examples(hyps_a_by_seed, hyps_b_by_seed, refs)
    return agreement_by_seed(pa, pb, labels, names=names, draws=draws, confidence=confidence, seed=seed,
                             groups=utterance)


# --------------------------------------------------------------------------- point statistics of a pair
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
    ``pa_k`` (``pb_k``) the fraction of examples model a (b) labels ``k``.  When
    ``p_e == 1`` (both models always output the same single label) kappa is
    undefined and ``nan`` is returned.  The same computation as the kappa of
    :func:`agreement_by_seed` (all examples weighted once).
    """
    a, b = _pair_1d(pred_a, pred_b, "pred_a", "pred_b")
    codes = np.unique(np.concatenate([a, b]), return_inverse=True)[1].reshape(2, -1)
    return float(_kappa(np.ones((1, a.shape[0])), codes[0], codes[1])[0])


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
    return float(_overlap(np.ones((1, a.shape[0])), ~a, ~b)[0])


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
