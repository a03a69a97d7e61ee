"""The maths of the default interval: training seeds at one level, test speakers at the other.

A finding is a claim about methods across training randomness and across new speakers, so an
interval of a difference must cover both (Bouthillier et al., MLSys 2021: seeds; Field & Welsh,
JRSS-B 2007: clustered test data).  The method, for a difference D of two configurations:

* **seed level, t-based**: d_s, the difference of seed s on the whole test set (paired by
  training seed where both sides have the same seeds: the shared seeds; otherwise the two means
  with Welch's variance).  Estimate: the mean over seeds; seed variance ``s_d^2 / n`` (paired)
  or ``s_a^2 / n_a + s_b^2 / n_b`` (Welch).  A bootstrap over 3 seeds cannot see the tails and
  undercovers (Colas et al. 2018; Agarwal et al. 2021), so this level is Student-t.
* **speaker level, cluster bootstrap**: ``V_spk``, the variance of the seed-averaged D when
  whole speakers are resampled with replacement (Field & Welsh 2007; Saravanan et al. 2020),
  one resample shared by both sides and all their seeds.  Clips of one speaker are not
  independent; a clip without a speaker (a silence clip) is a cluster of its own; without a
  ``speaker`` column the clusters are the utterances.  CTC metrics stay edit counts over
  reference lengths, summed per cluster (never a mean of per-utterance rates).
* **interval**: ``estimate +- t_{df, 1 - alpha/2} sqrt(seed variance + V_spk)``, df = n - 1
  (paired) or Welch-Satterthwaite (unpaired) of the seed level.  Charging the speaker variance
  with the seed level's df is conservative; so is counting each seed's own test noise at both
  levels.  Families use Bonferroni on the t quantile (the caller passes the per-interval
  confidence).  ``tests/test_interval_coverage.py`` measures the coverage by simulation.
* **one seed**: the seed level cannot be bounded; the interval is the percentile interval of
  the speaker bootstrap alone and carries the caveat :data:`ONE_SEED`, which makes every verdict
  that rests on it *inconclusive*.

:func:`seeds_to_decide` turns an undecided interval into the number of seeds per configuration
that its observed variance implies (Colas, Sigaud & Oudeyer 2018).  Numpy and scipy only.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import t as student_t

__all__ = ["Clusters", "ONE_SEED", "SeedsNeeded", "Spread", "cluster_counts", "cluster_sums", "seed_level",
           "seeds_to_decide", "t_interval"]

#: The caveat of an interval that covers test sampling only.
ONE_SEED = "one seed: training randomness not bounded"


@dataclass(frozen=True)
class Clusters:
    """The resampling unit of the test set: one cluster index (0..count-1) per aligned test example."""

    ids: np.ndarray
    unit: str  # "speakers" or "utterances"
    n_speakers: int = 0  # distinct named speakers (0 when the unit is utterances)
    note: str = ""  # why the unit is utterances (no speaker column, manifest not found, ...)

    @property
    def count(self) -> int:
        return int(self.ids.max()) + 1 if self.ids.size else 0

    @property
    def label(self) -> str:
        """``seeds x speakers`` or ``seeds x utterances``."""
        return f"seeds x {self.unit}"

    @classmethod
    def utterances(cls, n: int, note: str = "") -> "Clusters":
        return cls(np.arange(int(n)), "utterances", 0, note)

    @classmethod
    def from_speakers(cls, speakers: Sequence) -> "Clusters":
        """Clusters from one speaker id per example; a missing one (None, NaN, "") is its own cluster."""
        values = list(speakers)
        missing = np.array([v is None or (isinstance(v, str) and not v.strip()) or
                            (not isinstance(v, str) and bool(pd.isna(v))) for v in values], dtype=bool)
        named = np.array([str(v) for v, m in zip(values, missing) if not m], dtype=object)
        names, inverse = np.unique(named, return_inverse=True) if named.size else (np.array([]), np.array([], int))
        ids = np.empty(len(values), dtype=np.int64)
        ids[~missing] = inverse.ravel()
        ids[missing] = names.size + np.arange(int(missing.sum()))
        return cls(ids, "speakers", int(names.size))


@dataclass(frozen=True)
class Spread:
    """How an interval of seeds x speakers was built, enough to plan more seeds.

    ``seed_var``: the variance of one replicate's difference (paired: ``s_d^2``; Welch:
    ``s_a^2 + s_b^2``), so n seeds per configuration give a seed level of ``seed_var / n``;
    ``seed_se2``: the seed level's variance as measured (``s_d^2 / n``, or ``s_a^2 / n_a +
    s_b^2 / n_b``); ``speaker_var``: V_spk; ``df``: the t degrees of freedom."""

    pairing: str  # "paired", "Welch", "fixed reference" or "one seed"
    n_seeds: int
    seed_var: float
    seed_se2: float
    speaker_var: float
    df: float
    n_clusters: int = 0

    @property
    def se(self) -> float:
        return math.sqrt(self.seed_se2 + self.speaker_var)


def cluster_counts(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """(rows, n) multiplicities of ``rows`` resamples of n units with replacement."""
    idx = rng.integers(0, n, size=(rows, n), dtype=np.int64)
    idx += (np.arange(rows, dtype=np.int64) * n)[:, None]
    w = np.zeros((rows, n))
    np.add.at(w.reshape(-1), idx.reshape(-1), 1.0)
    return w


def cluster_sums(x: np.ndarray, ids: np.ndarray, count: int) -> np.ndarray:
    """(seeds, count): each seed's per-example values summed per cluster."""
    return np.stack([np.bincount(ids, weights=row, minlength=count) for row in np.atleast_2d(x)])


def seed_level(per_seed_a: np.ndarray, per_seed_b: np.ndarray, pairing: str) -> tuple[float, Spread]:
    """The estimate and the seed level of A - B from each seed's value on the whole test set.

    ``paired``/``fixed reference``: ``per_seed_a[k]`` goes with ``per_seed_b[k]`` (equal lengths);
    ``Welch``: the two means, each side with its own seed variance (Welch-Satterthwaite df).
    The speaker variance is left NaN for the caller to fill in."""
    a, b = np.asarray(per_seed_a, float), np.asarray(per_seed_b, float)
    if pairing in ("paired", "fixed reference"):
        d = a - b
        var = float(d.var(ddof=1)) if d.size > 1 else math.nan
        return float(d.mean()), Spread(pairing, d.size, var, var / d.size, math.nan, float(d.size - 1))
    sa, sb = (float(x.var(ddof=1)) if x.size > 1 else math.nan for x in (a, b))
    va, vb = sa / a.size, sb / b.size
    term = va + vb
    df = term ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1)) if term > 0 else float(a.size + b.size - 2)
    return float(a.mean() - b.mean()), Spread("Welch", min(a.size, b.size), sa + sb, term, math.nan, float(df))


def t_interval(estimate: float, spread: Spread, confidence: float) -> tuple[float, float, float]:
    """(low, high, two-sided p) of ``estimate +- t_{df, (1 + confidence)/2} * spread.se``."""
    se = spread.se
    q = float(student_t.ppf(0.5 + confidence / 2.0, spread.df))
    if se == 0.0:
        return estimate, estimate, (1.0 if estimate == 0.0 else 0.0)
    p = float(2.0 * student_t.sf(abs(estimate) / se, spread.df))
    return estimate - q * se, estimate + q * se, p


@dataclass(frozen=True)
class SeedsNeeded:
    """Seeds per configuration that would decide an interval, if the true difference is the
    observed mean and the variances stay as measured; ``n`` None: no number of seeds does."""

    n: int | None
    gap: float  # the distance from the observed mean to the threshold the interval must clear
    reason: str = ""


def seeds_to_decide(estimate: float, spread: Spread | None, confidence: float, low: float, high: float,
                    max_seeds: int = 1000) -> SeedsNeeded:
    """The smallest n with ``t_{n-1, (1+confidence)/2} * sqrt(seed_var / n + speaker_var) < gap``.

    The interval decides when it lies above ``low`` or below ``high``; at the observed mean that
    takes a half-width below ``gap = max(estimate - low, high - estimate)``.  The speaker
    variance does not shrink with more seeds: when it alone is too wide, more test speakers are
    needed and ``n`` is None.  df = n - 1 (for Welch, with n seeds per side, conservative)."""
    gap = max(estimate - low, high - estimate)
    if spread is None or spread.pairing == "one seed" or not math.isfinite(spread.seed_var):
        return SeedsNeeded(None, gap, f"{ONE_SEED}: the seed variance is unknown until a second seed is trained")
    if not gap > 0:
        return SeedsNeeded(None, gap, "the observed mean sits on the threshold")
    z = float(student_t.ppf(0.5 + confidence / 2.0, 1e9))
    if z * math.sqrt(spread.speaker_var) >= gap:
        return SeedsNeeded(None, gap, f"the test speakers alone give a half-width of at least "
                           f"{z * math.sqrt(spread.speaker_var):.4f} >= {gap:.4f}: more test speakers are needed")
    n = np.arange(2, max_seeds + 1)
    half = student_t.ppf(0.5 + confidence / 2.0, n - 1) * np.sqrt(spread.seed_var / n + spread.speaker_var)
    ok = np.flatnonzero(half < gap)
    if ok.size == 0:
        return SeedsNeeded(None, gap, f"more than {max_seeds} seeds")
    return SeedsNeeded(int(n[ok[0]]), gap)
