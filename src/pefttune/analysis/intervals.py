"""Intervals over seeds and test examples, paired tests, and the finding verdict rules.

One concept, one module (about 520 lines): the verdict rules are stated in full in their
docstrings, next to the intervals they read, so a reader checks a rule in one place.

Numpy only, plus scipy's Student-t quantile (scipy is a runtime dependency).  Sources, as in
``shared/reference/statistics.md``: Koehn (EMNLP 2004) and Bisani & Ney (ICASSP 2004), paired
bootstrap over test examples with one resample for both systems, percentile interval, and for
error rates summed edits over summed reference lengths; Agarwal et al. (NeurIPS 2021), stratified
bootstrap over few runs; Dror et al. (ACL 2018), bootstrap and permutation tests for paired
systems and Holm's correction (Holm, Scand. J. Stat. 1979); Bouthillier et al. (MLSys 2021) and
Dodge et al. (2020), why results are compared over seeds.

Verdicts decide on intervals, never on p-values alone: "no better" needs the interval below a
margin delta; an interval that straddles its threshold gives "inconclusive"; a comparison among
models that learned nothing is "inconclusive".  A rule over a *family* of intervals ("some", "no"
or "most" of m comparisons) requires simultaneous intervals, built at
``bonferroni_confidence(family_confidence, m)``; Holm-adjusted p-values go to ``details``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import stdtrit

from pefttune.metrics import align_corpus

__all__ = [
    "Comparison", "PairAgreement", "SeedSummary", "Verdict", "agreement_by_seed",
    "bonferroni_confidence", "ctc_agreement_by_seed", "finding1_verdict", "finding2_verdict", "finding3_verdict",
    "holm", "nothing_learned", "paired_bootstrap", "paired_permutation", "seed_summary",
    "unless_nothing_learned",
]

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


def _pct(confidence: float) -> str:
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


def _counts(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """(rows, n) multiplicities of ``rows`` resamples of n indices with replacement."""
    idx = rng.integers(0, n, size=(rows, n), dtype=np.int64)
    idx += (np.arange(rows, dtype=np.int64) * n)[:, None]
    w = np.zeros((rows, n))
    np.add.at(w.reshape(-1), idx.reshape(-1), 1.0)
    return w


def _seed_avg(w: np.ndarray, num: np.ndarray, den: np.ndarray, seed_w: np.ndarray | None) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        per_seed = (w @ num.T) / (w @ den.T)  # (draws, seeds): each seed's metric on each resample
    return per_seed.mean(axis=1) if seed_w is None else (per_seed * seed_w).sum(axis=1)


def paired_bootstrap(a: Any, b: Any, *, draws: int = 5000, confidence: float = 0.95, seed: int = 0,
                     higher_is_better: bool = True, resample_seeds: bool = False,
                     paired_seeds: bool = False) -> Comparison:
    """Paired bootstrap of A - B over test examples, averaged over seeds.

    Method (Koehn 2004; Bisani & Ney 2004): ``a`` and ``b`` are lists, one entry per seed (the
    counts may differ), each over the SAME test examples in the same order: a 1-D array of
    per-example scores (metric = mean), or a ``(numerator, denominator)`` pair of 1-D arrays
    (CTC: edit counts and reference lengths; metric = sum(num) / sum(den), never a mean of
    per-utterance rates).  Each draw resamples example indices with replacement, ONE resample
    shared by A, B and all their seeds, computes each seed's metric on it, averages over A's
    seeds and over B's seeds, and records the difference.  ``resample_seeds=True`` also
    resamples seeds with replacement within A and within B in each draw (a two-level,
    stratified bootstrap in the style of Agarwal et al. 2021).  ``paired_seeds=True`` (with
    ``resample_seeds``) says seed k of A and seed k of B belong together (the same training
    seed, or the same seed's ensemble members): one seed resample is then shared by A and B, so
    the interval covers the seed-to-seed spread of the *difference*, not of each side.

    Point estimate: the same difference on the full set.  Interval: percentile, ``np.quantile``
    at ``(1 -+ confidence) / 2``.  p-value, two-sided, shifted null: the bootstrap distribution
    centred on the estimate stands in for the null distribution, so
    ``p = (1 + #{|diff* - diff| >= |diff|}) / (draws + 1)``.  Orientation: see
    :class:`Comparison` (``diff > 0``: A better).
    """
    confidence, draws = _check_confidence(confidence), _check_draws(draws)
    na, da, nb, db, kind = _pair_runs(a, b)
    (sa, n), sb = na.shape, nb.shape[0]
    if resample_seeds and paired_seeds and sa != sb:
        raise ValueError(f"paired_seeds needs as many seeds in a as in b (a has {sa}, b has {sb})")
    sign = 1.0 if higher_is_better else -1.0
    mean_a, mean_b = float(np.mean(na.sum(1) / da.sum(1))), float(np.mean(nb.sum(1) / db.sum(1)))
    diff = sign * (mean_a - mean_b)
    rng = np.random.default_rng(seed)
    out = np.empty(draws)
    chunk = max(1, _CHUNK_CELLS // n)
    for start in range(0, draws, chunk):
        rows = min(chunk, draws - start)
        w = _counts(rng, rows, n)
        wa = _counts(rng, rows, sa) / sa if resample_seeds else None
        wb = (wa if paired_seeds else _counts(rng, rows, sb) / sb) if resample_seeds else None
        out[start:start + rows] = sign * (_seed_avg(w, na, da, wa) - _seed_avg(w, nb, db, wb))
    low, high = _percentile_ci(out, confidence)
    out = out[np.isfinite(out)]
    tol = 1e-12 * max(1.0, abs(diff))
    p = (1 + int(np.sum(np.abs(out - diff) >= abs(diff) - tol))) / (out.size + 1)
    level = ("examples, seeds averaged" if not resample_seeds else
             "examples and paired seeds (two-level)" if paired_seeds else "examples and seeds (two-level)")
    method = (f"paired bootstrap over {level}, {draws} draws, metric "
              f"{'sum(num)/sum(den)' if kind == 'ratio' else 'mean'}; {_pct(confidence)} percentile CI; "
              f"shifted-null two-sided p")
    return Comparison(diff, low, high, float(p), method, n, sa, sb, mean_a, mean_b, confidence,
                      bool(higher_is_better))


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
    probability >= ``confidence`` (Bonferroni).  The family rules of :func:`finding2_verdict`
    and :func:`finding3_verdict` require intervals built at this level."""
    confidence = _check_confidence(confidence)
    if int(m) != m or m < 1:
        raise ValueError(f"m must be a positive integer, got {m}")
    return 1.0 - (1.0 - confidence) / int(m)


def _check_family(items: Sequence[Any], family_confidence: float, what: str) -> None:
    need = bonferroni_confidence(family_confidence, max(1, len(items)))
    if any(c.confidence < need - 1e-9 for c in items):
        raise ValueError(f"{what}: intervals are not simultaneous for {len(items)} comparisons; build them with "
                         f"confidence=bonferroni_confidence({family_confidence}, {len(items)}) = {need:.6g}")


def _check_margin(margin: float) -> float:
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    return float(margin)


@dataclass(frozen=True)
class Verdict:
    """A finding's label, the rule that gave it (numbers substituted) and its inputs."""
    label: str
    rule: str
    details: dict = field(default_factory=dict)


def finding1_verdict(comparison: Comparison, margin: float, converged: bool) -> Verdict:
    """Finding 1, "the DARTS-derived placement does not beat the best uniform".

    ``comparison`` = DARTS - best uniform (``diff > 0``: DARTS better); delta = ``margin``.  In order:
    * relaxation not converged -> "inconclusive" (the derived placement is an argmax over noise);
    * ``ci_low > 0`` -> "not reproduced" (DARTS better; also when ``ci_high < +delta``: a
      significant gain is reported as one even when it is smaller than delta);
    * ``ci_high < +delta`` -> "reproduced" (DARTS is not better by delta or more);
    * otherwise "inconclusive" (the interval straddles 0 or +delta).
    """
    margin, c = _check_margin(margin), comparison
    dm = f"+{margin:.4f}"
    details = {"diff": c.diff, "ci_low": c.ci_low, "ci_high": c.ci_high, "margin": margin,
               "confidence": c.confidence, "converged": bool(converged), "p_value": c.p_value}
    head = f"the {_pct(c.confidence)} CI of DARTS - best uniform {c.ci_text()} (diff {c.diff:+.4f})"
    if not converged:
        return Verdict("inconclusive", f"inconclusive: the DARTS relaxation did not converge, so the derived "
                       f"placement is not a search result; {head} is not used (delta = {dm})", details)
    if c.lies_above(0.0):
        extra = f", though by less than delta = {dm}" if c.lies_below(margin) else ""
        return Verdict("not reproduced", f"not reproduced: {head} lies above 0: DARTS is better{extra}", details)
    if c.lies_below(margin):
        return Verdict("reproduced", f"reproduced: {head} lies below +delta = {dm}", details)
    return Verdict("inconclusive", f"inconclusive: {head} is neither below +delta = {dm} nor above 0", details)


def _cis(d: Mapping[str, Comparison], names: Sequence[str] | None = None) -> str:
    return ", ".join(f"{s} {d[s].ci_text()}" for s in (d if names is None else names)) or "none"


def finding2_verdict(vote_gain: Comparison, other_gains: Mapping[str, Comparison],
                     vote_vs_others: Mapping[str, Comparison], margin: float, *,
                     family_confidence: float = 0.95) -> Verdict:
    """Finding 2, "majority vote beats its best member, and no other strategy beats the vote".

    ``vote_gain`` = vote - its best member; ``other_gains[s]`` = strategy s - its best member;
    ``vote_vs_others[s]`` = strategy s - vote (``diff > 0``: s better).  ``other_gains`` and
    ``vote_vs_others`` must each hold simultaneous intervals, built at
    ``bonferroni_confidence(family_confidence, len(family))`` (ValueError otherwise); the
    Holm-adjusted p-values of ``vote_vs_others`` are reported in ``details``, not used.

    A strategy *beats* the vote when its strategy - vote interval lies above 0 (significantly
    better, as the issue's rule says).  "No strategy beats the vote" is also a claim of *no
    better*, which needs the margin (a non-significant difference is not evidence of none), so
    "reproduced" asks for both.  In order (delta = ``margin``):
    * vote ``ci_low > 0``, no strategy - vote ``ci_low > 0`` and every strategy - vote
      ``ci_high < +delta`` -> "reproduced";
    * vote ``ci_low > 0`` and some strategy beats the vote -> "partly reproduced" (ensembles
      gain, but the vote is not the best of them; the rule says by how much: by less than delta
      when that strategy's interval also lies below +delta);
    * some other gain with ``ci_low > 0`` (the vote's not) -> "partly reproduced";
    * every gain (vote and others) with ``ci_high < +delta`` -> "not reproduced";
    * otherwise "inconclusive": a gain interval straddles 0 or +delta, or the vote gains, no
      strategy beats it, but a strategy - vote interval straddles +delta.
    """
    margin, v = _check_margin(margin), vote_gain
    _check_family(list(other_gains.values()), family_confidence, "other_gains")
    _check_family(list(vote_vs_others.values()), family_confidence, "vote_vs_others")
    dm = f"+{margin:.4f}"
    beat = [s for s, c in vote_vs_others.items() if c.lies_above(0.0)]
    not_within = [s for s, c in vote_vs_others.items() if not c.lies_below(margin)]
    helped = [s for s, c in other_gains.items() if c.lies_above(0.0)]
    triples = {k: {s: (c.diff, c.ci_low, c.ci_high) for s, c in d.items()}
               for k, d in (("other_gains", other_gains), ("vote_vs_others", vote_vs_others))}
    holm_p = holm([c.p_value for c in vote_vs_others.values()])
    details = {"vote_gain": (v.diff, v.ci_low, v.ci_high), "margin": margin, "beats_vote": beat,
               "not_within_margin_of_vote": not_within, "gain_above_0": helped, **triples,
               "vote_vs_others_holm_p": dict(zip(vote_vs_others, holm_p))}
    vtext = f"the vote's {_pct(v.confidence)} gain CI over its best member {v.ci_text()}"
    if v.lies_above(0.0) and not beat and not not_within:
        return Verdict("reproduced", f"reproduced: {vtext} lies above 0 and no strategy beats the vote, nor is "
                       f"better than it by delta = {dm} or more (strategy - vote CIs, simultaneous, none above 0, "
                       f"all below {dm}: {_cis(vote_vs_others)})", details)
    if v.lies_above(0.0) and beat:
        small = [s for s in beat if s not in not_within]
        how = (f"; {', '.join(small)} {'beats' if len(small) == 1 else 'beat'} it by less than delta = {dm} "
               f"(CI below {dm})" if small else "")
        unsure = [s for s in beat if s in not_within]
        how += (f"; {', '.join(unsure)} not shown to be within delta = {dm} of it (CI not below {dm})"
                if unsure else "")
        return Verdict("partly reproduced", f"partly reproduced: {vtext} lies above 0 (ensembles gain), but "
                       f"{_cis(vote_vs_others, beat)} beat{'s' if len(beat) == 1 else ''} the vote (strategy - vote "
                       f"CI above 0), so majority voting is not the best strategy{how}", details)
    if v.lies_above(0.0):
        return Verdict("inconclusive", f"inconclusive: {vtext} lies above 0 and no strategy beats the vote, but the "
                       f"strategy - vote CI of {_cis(vote_vs_others, not_within)} straddles +delta = {dm}: no "
                       "strategy is shown to be no better than the vote", details)
    if helped:
        return Verdict("partly reproduced", f"partly reproduced: {vtext} does not lie above 0, but the gain CI "
                       f"of {_cis(other_gains, helped)} does", details)
    if all(c.lies_below(margin) for c in (v, *other_gains.values())):
        return Verdict("not reproduced", f"not reproduced: every gain CI lies below +delta = {dm} "
                       f"({vtext}; others: {_cis(other_gains)})", details)
    return Verdict("inconclusive", f"inconclusive: no gain CI lies above 0 and not all lie below +delta = "
                   f"{dm} ({vtext}; others: {_cis(other_gains)})", details)


@dataclass(frozen=True)
class PairAgreement:
    """Two methods on the same examples, averaged over paired seeds, with bootstrap intervals:
    ``kappa`` (Cohen's kappa of the predicted labels) and ``overlap`` (Jaccard overlap of the
    error sets: #both wrong / #either wrong)."""
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


def _one_hot(codes: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(n, len(classes)) indicator of ``codes`` over sorted ``classes``; other codes: zero rows."""
    out = np.zeros((codes.size, classes.size))
    if classes.size:
        pos = np.minimum(np.searchsorted(classes, codes), classes.size - 1)
        hit = np.flatnonzero(classes[pos] == codes)
        out[hit, pos[hit]] = 1.0
    return out


def _agreement(w: np.ndarray, ca: np.ndarray, cb: np.ndarray, y: np.ndarray):
    """(kappa, overlap) per row of multiplicities ``w`` (rows, n), for integer codes."""
    both = np.intersect1d(ca, cb)  # p_e only needs the classes both models predict
    wrong_a, wrong_b, total = ca != y, cb != y, w.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        po = (w @ (ca == cb).astype(float)) / total
        pe = np.sum((w @ _one_hot(ca, both)) * (w @ _one_hot(cb, both)), axis=1) / total**2
        kappa = np.where(np.isclose(pe, 1.0, rtol=0, atol=1e-12), np.nan, (po - pe) / (1.0 - pe))
        either = w @ (wrong_a | wrong_b).astype(float)
        overlap = np.where(either > 0, (w @ (wrong_a & wrong_b).astype(float)) / either, np.nan)
    return kappa, overlap


def _nanmean(rows: list) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # every seed undefined -> NaN
        return np.nanmean(np.asarray(rows, dtype=float), axis=0)


def _seed_weighted_mean(rows: list, weights: np.ndarray | None) -> np.ndarray:
    """Mean over seeds of ``rows`` (one (draws,) array per seed), NaN seeds skipped; ``weights``
    (draws, seeds): each draw's seed multiplicities (a two-level bootstrap), None for equal."""
    if weights is None:
        return _nanmean(rows)
    values = np.asarray(rows, dtype=float).T  # (draws, seeds)
    w = np.where(np.isnan(values), 0.0, weights)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nansum(values * w, axis=1) / w.sum(axis=1)


def agreement_by_seed(preds_a_by_seed: Sequence[Any], preds_b_by_seed: Sequence[Any], labels: Any, *,
                      names: tuple[str, str] = ("a", "b"), draws: int = 2000, confidence: float = 0.95,
                      seed: int = 0, groups: Any = None, resample_seeds: bool = False) -> PairAgreement:
    """Kappa and error overlap of two methods, with a paired bootstrap CI over examples.

    Seed k of A is paired with seed k of B (the same training seed; the counts must match).
    Each statistic is computed per seed and averaged over seeds (undefined seeds skipped); each
    draw resamples the examples once for both methods and all seeds (Koehn 2004); percentile
    interval.  Kappa as ``stats.cohen_kappa``; labels may be any comparable values (strings too).

    ``groups`` (one integer id per example) makes the bootstrap resample whole groups: for a
    CTC task the examples are reference phonemes and the groups their utterances, so that
    phonemes of one utterance, which are not independent, are drawn together (Bisani & Ney 2004).
    ``resample_seeds`` also resamples the seed pairs in each draw (two-level, seeds paired).
    """
    confidence, draws = _check_confidence(confidence), _check_draws(draws)
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
    pairs = [(codes[1 + i], codes[1 + s + i]) for i in range(s)]
    full = [_agreement(np.ones((1, y.size)), ca, cb, codes[0]) for ca, cb in pairs]
    kap_s, ovl_s = (tuple(float(f[j][0]) for f in full) for j in (0, 1))
    rng, kap, ovl = np.random.default_rng(seed), np.empty(draws), np.empty(draws)
    chunk = max(1, _CHUNK_CELLS // y.size)
    for start in range(0, draws, chunk):
        w = _counts(rng, min(chunk, draws - start), n_groups)[:, group_of]
        ws = _counts(rng, w.shape[0], s) if resample_seeds else None
        res = [_agreement(w, ca, cb, codes[0]) for ca, cb in pairs]
        kap[start:start + w.shape[0]] = _seed_weighted_mean([r[0] for r in res], ws)
        ovl[start:start + w.shape[0]] = _seed_weighted_mean([r[1] for r in res], ws)
    return PairAgreement(names[0], names[1], float(_nanmean(list(kap_s))), *_percentile_ci(kap, confidence),
                         float(_nanmean(list(ovl_s))), *_percentile_ci(ovl, confidence), y.size, s, confidence,
                         kap_s, ovl_s)


def ctc_agreement_by_seed(hyps_a_by_seed: Sequence[Sequence[Sequence[int]]],
                          hyps_b_by_seed: Sequence[Sequence[Sequence[int]]], refs: Sequence[Sequence[int]], *,
                          names: tuple[str, str] = ("a", "b"), draws: int = 2000, confidence: float = 0.95,
                          seed: int = 0, resample_seeds: bool = False) -> PairAgreement:
    """:func:`agreement_by_seed` for CTC systems, over reference phonemes.

    Exact-sentence errors say nothing here: at a PER of 0.3 nearly every sentence holds an
    error, so any two systems "share" nearly all their errors.  Each hypothesis is aligned to
    its reference instead (:func:`pefttune.metrics.align_to_reference`); the examples are the
    reference phonemes, a system's label for one is the token aligned to it (-1: deleted), so
    a phoneme is an error when substituted or deleted (insertions are not counted).  The
    bootstrap resamples utterances, each with all its phonemes.
    """
    refs = [list(r) for r in refs]
    for side, hyps_by_seed in (("a", hyps_a_by_seed), ("b", hyps_b_by_seed)):
        bad = [k for k, hyps in enumerate(hyps_by_seed) if len(hyps) != len(refs)]
        if bad:
            raise ValueError(f"hyps_{side}_by_seed: seed(s) {bad} do not hold one hypothesis per reference "
                             f"({len(refs)})")

    labels = np.array([int(x) for r in refs for x in r], dtype=np.int64)
    groups = np.repeat(np.arange(len(refs)), [len(r) for r in refs])
    return agreement_by_seed([align_corpus(h, refs) for h in hyps_a_by_seed],
                             [align_corpus(h, refs) for h in hyps_b_by_seed], labels,
                             names=names, draws=draws, confidence=confidence, seed=seed, groups=groups,
                             resample_seeds=resample_seeds)


def finding3_verdict(pairs: Sequence[PairAgreement], kappa_threshold: float = 0.8,
                     overlap_threshold: float = 0.8, *, family_confidence: float = 0.95) -> Verdict:
    """Finding 3, "different PEFT methods err differently", over the m method pairs.

    A pair *errs differently* when ``kappa_ci_high < kappa_threshold`` AND ``overlap_ci_high <
    overlap_threshold``: both intervals exclude near-identical behaviour (0.8 is the lower edge
    of "almost perfect" agreement, Landis & Koch 1977; an error overlap of 0.8 means 80% of the
    pair's errors are shared).  It *errs alike* when ``kappa_ci_low >= kappa_threshold`` OR
    ``overlap_ci_low >= overlap_threshold``; otherwise (an interval straddles, or is NaN) it is
    unclear.  "reproduced" when more than m/2 pairs err differently; "not reproduced" when more
    than m/2 err alike; otherwise "inconclusive".  The intervals must be simultaneous
    (``bonferroni_confidence(family_confidence, m)``; ValueError otherwise).  Note: the overlap
    of two independent models of accuracy p is ``(1-p)^2 / (1-p^2)``, high near chance (0.85 at
    1/12), so apply :func:`unless_nothing_learned` before reading this verdict.
    """
    if len(pairs) == 0:
        raise ValueError("finding 3 needs at least one method pair")
    _check_family(list(pairs), family_confidence, "pairs")
    kt, ot, m = float(kappa_threshold), float(overlap_threshold), len(pairs)
    status = {f"{p.a}-{p.b}": "different" if p.kappa_ci_high < kt and p.overlap_ci_high < ot else
              "alike" if p.kappa_ci_low >= kt or p.overlap_ci_low >= ot else "unclear" for p in pairs}
    n_diff, n_alike = (sum(v == x for v in status.values()) for x in ("different", "alike"))
    details = {"status": status, "different": n_diff, "alike": n_alike, "pairs": m,
               "kappa_threshold": kt, "overlap_threshold": ot}
    cis = "; ".join(f"{p.a}-{p.b} kappa [{p.kappa_ci_low:.3f}, {p.kappa_ci_high:.3f}] overlap "
                    f"[{p.overlap_ci_low:.3f}, {p.overlap_ci_high:.3f}]" for p in pairs)
    crit = (f"a pair errs differently when its kappa CI < {kt:.2f} and its error-overlap CI < {ot:.2f}, "
            f"alike when either lower bound >= its threshold; {_pct(pairs[0].confidence)} intervals")
    if 2 * n_diff > m:
        return Verdict("reproduced", f"reproduced: {n_diff} of {m} pairs err differently (> half; {crit}): {cis}",
                       details)
    if 2 * n_alike > m:
        return Verdict("not reproduced", f"not reproduced: {n_alike} of {m} pairs err alike (> half; {crit}): "
                       f"{cis}", details)
    return Verdict("inconclusive", f"inconclusive: {n_diff} of {m} pairs err differently, {n_alike} alike, "
                   f"neither more than half ({crit}): {cis}", details)


def nothing_learned(vs_reference: Mapping[str, Comparison], margin: float) -> bool:
    """True when no configuration beats its reference (frozen, log-mel, chance, all-blank) by
    more than the margin: no ``vs_reference[name]`` (configuration - reference, ``diff > 0``:
    better) has ``ci_low > margin``."""
    margin = _check_margin(margin)
    if len(vs_reference) == 0:
        raise ValueError("vs_reference must hold at least one configuration-vs-reference comparison")
    return not any(c.lies_above(margin) for c in vs_reference.values())


def unless_nothing_learned(verdict: Verdict, vs_reference: Mapping[str, Comparison], margin: float) -> Verdict:
    """``verdict`` unchanged, or "inconclusive" (nothing learned) when :func:`nothing_learned`."""
    if not nothing_learned(vs_reference, margin):
        return verdict
    best = max(vs_reference, key=lambda s: vs_reference[s].ci_low)
    rule = (f"inconclusive: nothing learned: no configuration beats its reference by more than delta = "
            f"+{margin:.4f} (highest lower bound: {best} {vs_reference[best].ci_text()}); the finding's own "
            f"rule said: {verdict.rule}")
    return Verdict("inconclusive", rule, {**verdict.details, "nothing_learned": True, "overridden": verdict.label})
