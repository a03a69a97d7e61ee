"""More seeds while a verdict is open: a group-sequential design with alpha spending over the looks.

The study trains ``n_planned`` seeds, decides, and while a finding's interval straddles its
threshold trains one more seed of the configurations that finding compares and decides again,
until it is decided or ``n_max`` seeds (or the wall-time budget) are spent.  Reading a fixed 95%
interval after every round inflates the error rate (optional stopping;
Howard et al., Annals of Statistics 2021; Lan & DeMets 1983); ``tests/test_sequential.py``
measures it, with this design beside it.

**Method: Lan-DeMets alpha spending with Bonferroni over the looks.**  The looks are fixed in
advance: n = n_planned, n_planned + 1, ..., n_max seeds.  A spending function alpha(t), increasing
from alpha(0) = 0 to alpha(1) = alpha, is read at the information fraction t_k = n_k / n_max; the
look with n_k seeds spends the increment ``alpha_k = alpha(t_k) - alpha(t_{k-1})`` (t_0 = 0) and
builds the ordinary seeds x speakers interval (:mod:`pefttune.analysis.seeds_speakers`) at
confidence ``1 - alpha_k``.  Two shapes (Lan & DeMets, Biometrika 1983):

* ``"obrien-fleming"``: ``alpha(t) = 2 - 2 Phi(z_{1 - alpha/2} / sqrt(t))`` (O'Brien & Fleming
  1979): almost nothing at the first looks (at 3 of 8 seeds, 0.0014 of 0.05), the most at the
  later ones;
* ``"pocock"``: ``alpha(t) = alpha ln(1 + (e - 1) t)`` (Pocock 1977): fast early (0.025 of 0.05
  at 3 of 8 seeds, about 0.005 at each later look), so an early look can decide, at the price of
  wider later ones.

**Why it is valid.**  Each look's interval is a fixed-sample interval of the first n_k seeds at
level 1 - alpha_k: training one more seed does not change the distribution of the seeds already
trained, so the probability that look k's interval misses is <= alpha_k, whether or not the
study goes on to reach look k.  By the union bound, P(some look
misses) <= sum_k alpha_k = alpha(1) = alpha, with no assumption on how the looks are correlated
(they share seeds and the whole test set).  So all looks' intervals hold together with probability
>= 1 - alpha, and the interval at *any* stopping time, chosen by any rule (the verdict rule, the
wall-time budget, a crash), covers with probability >= 1 - alpha; each one-sided wrong verdict
("reproduced" when the truth is at or above +delta, "not reproduced" when it is at or below 0)
has probability <= alpha / 2.  Skipping a look (a seed that failed) only leaves its alpha unspent;
what must not happen is two looks at the same n with different data.  The bound is conservative:
correlated looks overlap, so the simulated error rates sit well below alpha / 2.  An exact
group-sequential t boundary would be tighter, but it needs the correlation of the looks, which
here depends on the unknown ratio of speaker to seed variance (the speaker part does not shrink
with more seeds).  A confidence sequence (Howard et al. 2021) holds at every n without a fixed
maximum, but it treats the data as a stream whose information grows with each observation; its
nonparametric forms need bounded observations or a known variance scale, and none takes a second
level that is one draw for the whole stream (the test speakers), which the union bound over
ordinary seeds x speakers intervals takes as it is.  The validity of each look
rests on that of the seeds x speakers interval (Student-t over seeds, normal seed effects), now
read further in the t tail; with 3 seeds and O'Brien-Fleming spending the first looks' t quantiles
are large (df = 2), so those looks rarely decide.

**For the report** (:meth:`SequentialDesign.describe` gives it with the numbers): "Seeds were
added one at a time while a finding was undecided, under a group-sequential design: looks at n =
n_planned, ..., n_max seeds, alpha spent by a Lan-DeMets spending function (O'Brien-Fleming or
Pocock shape) at information fraction n / n_max, each look's seeds x speakers interval built at
its own spent level, so that by the union bound all looks' intervals hold together with
probability at least 1 - alpha whatever the stopping rule."

Numpy and scipy only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from scipy.stats import norm

__all__ = ["SPENDINGS", "SequentialDesign", "Spending", "spent_alpha"]

Spending = Literal["obrien-fleming", "pocock"]
#: The spending shapes :class:`SequentialDesign` accepts.
SPENDINGS: tuple[str, ...] = get_args(Spending)


def spent_alpha(t, alpha: float, spending: Spending):
    """The cumulative alpha spent by information fraction ``t`` (scalar or array in [0, 1]).

    Lan-DeMets spending functions: O'Brien-Fleming type ``2 - 2 Phi(z_{1-alpha/2} / sqrt(t))``,
    Pocock type ``alpha ln(1 + (e - 1) t)``; both 0 at t = 0 and ``alpha`` at t = 1."""
    t = np.asarray(t, dtype=float)
    if np.any((t < 0) | (t > 1)):
        raise ValueError(f"t must lie in [0, 1], got {t}")
    if spending == "obrien-fleming":
        with np.errstate(divide="ignore"):
            out = np.where(t > 0, 2.0 * norm.sf(norm.isf(alpha / 2.0) / np.sqrt(np.where(t > 0, t, 1.0))), 0.0)
    elif spending == "pocock":
        out = alpha * np.log1p((math.e - 1.0) * t)
    else:
        raise ValueError(f"spending must be one of {SPENDINGS}, got {spending!r}")
    return float(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class SequentialDesign:
    """Looks at ``n_planned, ..., n_max`` seeds; ``alpha`` spent over them by ``spending``.

    >>> d = SequentialDesign(n_planned=3, n_max=8)
    >>> d.looks()
    [3, 4, 5, 6, 7, 8]
    >>> round(sum(d.alpha_at(n) for n in d.looks()), 12)
    0.05

    The interval at the look with n seeds is built with ``confidence=d.confidence_at(n)``; for a
    family of m comparisons, ``bonferroni_confidence(d.confidence_at(n), m)``."""

    n_planned: int  # seeds before the first look
    n_max: int  # at most this many seeds
    alpha: float = 0.05  # family error of all looks together
    spending: Spending = "obrien-fleming"

    def __post_init__(self) -> None:
        for name in ("n_planned", "n_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.n_planned < 2:
            raise ValueError(f"n_planned must be >= 2 (one seed cannot bound training randomness), "
                             f"got {self.n_planned}")
        if self.n_max < self.n_planned:
            raise ValueError(f"n_max must be >= n_planned ({self.n_planned}), got {self.n_max}")
        if isinstance(self.alpha, bool) or not (isinstance(self.alpha, (int, float)) and 0.0 < self.alpha < 1.0):
            raise ValueError(f"alpha must be a number in (0, 1), got {self.alpha!r}")
        if self.spending not in SPENDINGS:
            raise ValueError(f"spending must be one of {SPENDINGS}, got {self.spending!r}")

    def looks(self) -> list[int]:
        """The seed counts at which the intervals are read: ``[n_planned, ..., n_max]``."""
        return list(range(int(self.n_planned), int(self.n_max) + 1))

    def alpha_at(self, n: int) -> float:
        """The level spent at the look with ``n`` seeds: ``alpha(n / n_max) - alpha((n - 1) / n_max)``,
        the first look ``alpha(n_planned / n_max)``."""
        looks = self.looks()
        if isinstance(n, bool) or n not in looks:
            raise ValueError(f"n must be one of the looks {looks[0]}..{looks[-1]} seeds, got {n!r}")
        before = 0.0 if n == looks[0] else spent_alpha((n - 1) / self.n_max, self.alpha, self.spending)
        return spent_alpha(n / self.n_max, self.alpha, self.spending) - before

    def confidence_at(self, n: int) -> float:
        """``1 - alpha_at(n)``: the confidence of the intervals read at the look with ``n`` seeds."""
        return 1.0 - self.alpha_at(n)

    def describe(self) -> str:
        """One sentence for the report: the method, the looks and the spending."""
        looks = self.looks()
        shape = "O'Brien-Fleming" if self.spending == "obrien-fleming" else "Pocock"
        levels = ", ".join(f"n={n}: {100 * self.confidence_at(n):.4g}%" for n in looks)
        where = f"n = {looks[0]}" if len(looks) == 1 else f"n = {looks[0]}, ..., {looks[-1]} seeds"
        return (f"group-sequential design with looks at {where}: alpha = {self.alpha:g} spent by the "
                f"Lan-DeMets {shape}-type function at information fraction n/{self.n_max}, each look's "
                f"seeds x speakers interval at its own level ({levels}), so that by the union bound all "
                f"looks' intervals hold together with probability >= {100 * (1 - self.alpha):g}% whatever "
                f"the stopping rule")
