"""The group-sequential design of :mod:`pefttune.analysis.sequential`, and its error rates by simulation.

Each replication is one finding-1 comparison (DARTS - best uniform, margin delta) decided by the
adaptive rule: train ``n_planned`` seeds; at each look, "not reproduced" when the interval lies
above 0, "reproduced" when it lies below +delta (the order of ``darts_vs_uniform.rule``), otherwise
one more seed, until ``n_max`` (then "inconclusive").  Seed s's difference on the whole test set is
``truth + b + e_s``: a seed effect e_s ~ N(0, SD_SEED^2), and a speaker-level shift b ~ N(0, tau^2)
drawn once per replication (one test set for all seeds and looks), whose variance V_spk enters the
standard error as seeds_speakers.py adds it: ``SE^2 = s_d^2 / n + V_spk``, df = n - 1, with V_spk
estimated from SPEAKERS speakers (``tau^2 chi2_{K-1} / (K-1)``).  The same rule is run with the
sequential design (level ``confidence_at(n)`` at each look) and with the naive fixed 95% interval
at every look.  REPS replications per case, fixed RNG seeds; the Monte-Carlo slack of a rate
bounded by p is 3 binomial standard errors, ``3 sqrt(p (1 - p) / REPS)``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import stdtrit

from pefttune.analysis.findings.darts_vs_uniform import rule as darts_rule
from pefttune.analysis.intervals import Comparison, bonferroni_confidence, seeds_speakers_bootstrap
from pefttune.analysis.seeds_speakers import Clusters, Spread, t_interval
from pefttune.analysis.sequential import SPENDINGS, SequentialDesign, spent_alpha

ALPHA, DELTA, SD_SEED, SPEAKERS = 0.05, 0.02, 0.02, 24
REPS = 20_000
SLACK = 3.0 * math.sqrt((ALPHA / 2) * (1 - ALPHA / 2) / REPS)  # 3 SE at the bound alpha / 2
COVER_SLACK = 3.0 * math.sqrt(ALPHA * (1 - ALPHA) / REPS)
VERDICTS = ("inconclusive", "reproduced", "not reproduced")

# (n_planned, n_max, spending, tau: the sd of the speaker-level shift)
SETTINGS = {
    "3-8 OBF, seeds only": (3, 8, "obrien-fleming", 0.0),
    "3-6 Pocock, seeds x speakers": (3, 6, "pocock", 0.003),
    "2-10 Pocock, seeds only": (2, 10, "pocock", 0.0),
}


# --------------------------------------------------------------------------- the design itself

def test_looks_and_levels_spend_exactly_alpha():
    for spending in SPENDINGS:
        d = SequentialDesign(3, 8, ALPHA, spending)
        assert d.looks() == [3, 4, 5, 6, 7, 8]
        levels = np.array([d.alpha_at(n) for n in d.looks()])
        assert (levels > 0).all()
        assert levels.sum() == pytest.approx(ALPHA, abs=1e-12)
        assert [d.confidence_at(n) for n in d.looks()] == pytest.approx(list(1 - levels))
    obf, poc = SequentialDesign(3, 8), SequentialDesign(3, 8, spending="pocock")
    assert obf.spending == "obrien-fleming" and obf.alpha == 0.05
    # O'Brien-Fleming keeps alpha for the end, Pocock spends it early
    assert obf.alpha_at(3) < poc.alpha_at(3) and obf.alpha_at(8) > poc.alpha_at(8)
    assert np.all(np.diff([obf.alpha_at(n) for n in obf.looks()]) > 0)


def test_spending_functions_match_their_published_values():
    # Lan & DeMets (1983): at t = 0.5, alpha = 0.05: OBF-type 0.0056, Pocock-type 0.0310
    assert spent_alpha(0.5, 0.05, "obrien-fleming") == pytest.approx(0.005575, abs=2e-6)
    assert spent_alpha(0.5, 0.05, "pocock") == pytest.approx(0.05 * math.log(1 + (math.e - 1) / 2), rel=1e-12)
    for spending in SPENDINGS:
        assert spent_alpha(0.0, 0.05, spending) == 0.0
        assert spent_alpha(1.0, 0.05, spending) == pytest.approx(0.05, abs=1e-12)
        grid = spent_alpha(np.linspace(0, 1, 11), 0.05, spending)
        assert np.all(np.diff(grid) > 0)
    with pytest.raises(ValueError, match="t must lie"):
        spent_alpha(1.5, 0.05, "pocock")


def test_one_look_is_the_fixed_sample_interval():
    d = SequentialDesign(4, 4)
    assert d.looks() == [4] and d.alpha_at(4) == pytest.approx(0.05) and d.confidence_at(4) == pytest.approx(0.95)


@pytest.mark.parametrize("kwargs, field", [
    ({"n_planned": 1, "n_max": 5}, "n_planned"),
    ({"n_planned": 3.0, "n_max": 5}, "n_planned"),
    ({"n_planned": True, "n_max": 5}, "n_planned"),
    ({"n_planned": 4, "n_max": 3}, "n_max"),
    ({"n_planned": 3, "n_max": 5, "alpha": 0.0}, "alpha"),
    ({"n_planned": 3, "n_max": 5, "alpha": 1.0}, "alpha"),
    ({"n_planned": 3, "n_max": 5, "spending": "haybittle"}, "spending"),
])
def test_invalid_designs_name_the_argument(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        SequentialDesign(**kwargs)


def test_alpha_at_only_at_the_looks():
    d = SequentialDesign(3, 6)
    for n in (2, 7, 3.5):
        with pytest.raises(ValueError, match="^n must be one of the looks 3..6"):
            d.alpha_at(n)


def test_describe_names_method_looks_and_spending():
    text = SequentialDesign(3, 8, spending="pocock").describe()
    for part in ("group-sequential", "n = 3, ..., 8 seeds", "Lan-DeMets Pocock-type", "n/8", "union bound",
                 "95%", "seeds x speakers"):
        assert part in text, (part, text)
    assert "O'Brien-Fleming" in SequentialDesign(3, 8).describe()
    assert "\n" not in text


def test_the_interval_code_takes_the_level_of_a_look():
    """seeds_speakers_bootstrap at ``confidence_at(n)``: its half-width is the t quantile of the
    spent level times the seeds x speakers SE, and the Comparison records that level."""
    d = SequentialDesign(3, 6, spending="pocock")
    rng = np.random.default_rng(5)
    speakers = Clusters.from_speakers(np.repeat([f"s{j}" for j in range(8)], 10))
    for n in d.looks():
        a = [(rng.random(80) < 0.7).astype(float) for _ in range(n)]
        b = [(rng.random(80) < 0.6).astype(float) for _ in range(n)]
        c = seeds_speakers_bootstrap(a, b, clusters=speakers, seeds_a=list(range(n)), seeds_b=list(range(n)),
                                     draws=200, confidence=d.confidence_at(n), seed=n)
        assert c.confidence == d.confidence_at(n) and c.spread.df == n - 1
        q = stdtrit(n - 1, 1 - d.alpha_at(n) / 2)
        assert (c.ci_high - c.ci_low) / 2 == pytest.approx(q * c.spread.se, rel=1e-9)
    # a family of m comparisons at one look: Bonferroni inside the look's level
    assert bonferroni_confidence(d.confidence_at(3), 4) == pytest.approx(1 - d.alpha_at(3) / 4)


# --------------------------------------------------------------------------- the simulation

def _levels(design: SequentialDesign, naive: bool) -> np.ndarray:
    return np.array([ALPHA if naive else design.alpha_at(n) for n in design.looks()])


def _looks(design: SequentialDesign, naive: bool, truth: float, tau: float, seed: int):
    """Per look (k, reps): estimate, SE and t quantile; the seed effects are drawn for n_max seeds,
    the first n of which make the look with n seeds."""
    rng = np.random.default_rng(seed)
    n_max, looks = design.n_max, np.array(design.looks())
    b = rng.normal(0.0, tau, REPS) if tau > 0 else np.zeros(REPS)
    v_spk = tau ** 2 * rng.chisquare(SPEAKERS - 1, REPS) / (SPEAKERS - 1)
    d = truth + b[:, None] + rng.normal(0.0, SD_SEED, (REPS, n_max))
    cum, cum2 = np.cumsum(d, axis=1)[:, looks - 1].T, np.cumsum(d ** 2, axis=1)[:, looks - 1].T
    n = looks[:, None].astype(float)
    est = cum / n
    s2 = (cum2 - n * est ** 2) / (n - 1)
    se = np.sqrt(np.maximum(s2, 0.0) / n + v_spk)
    q = stdtrit(looks - 1, 1 - _levels(design, naive) / 2)[:, None]
    return est, se, q, s2, v_spk


def simulate(setting: str, truth: float, naive: bool, seed: int = 0) -> dict:
    """The adaptive rule over REPS replications: verdict rates, coverage of the interval at the
    stopping time (the last look when undecided), mean seeds used."""
    n_planned, n_max, spending, tau = SETTINGS[setting]
    design = SequentialDesign(n_planned, n_max, ALPHA, spending)
    est, se, q, _, _ = _looks(design, naive, truth, tau, seed)
    low, high = est - q * se, est + q * se
    verdict = np.where(low > 0, 2, np.where(high < DELTA, 1, 0))  # darts_vs_uniform.rule's order
    decided = verdict > 0
    stop = np.where(decided.any(axis=0), decided.argmax(axis=0), len(design.looks()) - 1)
    cols = np.arange(REPS)
    final, lo, hi = verdict[stop, cols], low[stop, cols], high[stop, cols]
    out = {v: float(np.mean(final == k)) for k, v in enumerate(VERDICTS)}
    out["coverage"] = float(np.mean((lo <= truth) & (truth <= hi)))
    out["mean seeds"] = float(np.mean(np.array(design.looks())[stop]))
    return out


def _pair(setting: str, truth: float, seed: int = 0) -> tuple[dict, dict]:
    seq, naive = simulate(setting, truth, False, seed), simulate(setting, truth, True, seed)
    fmt = lambda r: ", ".join(f"{k} {v:.4f}" for k, v in r.items())  # noqa: E731
    print(f"\n{setting}, truth {truth:+.4f}\n  sequential: {fmt(seq)}\n  naive 95%:  {fmt(naive)}")
    return seq, naive


def test_the_vectorised_looks_are_the_interval_code_and_its_verdicts():
    """The simulation's interval is ``t_interval`` at ``confidence_at(n)`` and its verdict that of
    :func:`pefttune.analysis.findings.darts_vs_uniform.rule`, checked on replications of one setting."""
    n_planned, n_max, spending, tau = SETTINGS["3-6 Pocock, seeds x speakers"]
    design = SequentialDesign(n_planned, n_max, ALPHA, spending)
    est, se, q, s2, v_spk = _looks(design, False, DELTA / 2, tau, seed=11)
    labels = []
    for k, n in enumerate(design.looks()):
        for r in range(0, REPS, REPS // 40):
            spread = Spread("paired", n, float(s2[k, r]), float(s2[k, r]) / n, float(v_spk[r]), float(n - 1))
            low, high, p = t_interval(float(est[k, r]), spread, design.confidence_at(n))
            assert (low, high) == pytest.approx((est[k, r] - q[k, 0] * se[k, r], est[k, r] + q[k, 0] * se[k, r]),
                                                rel=1e-9, abs=1e-12)
            c = Comparison(float(est[k, r]), low, high, p, "t", 100, n, n, confidence=design.confidence_at(n),
                           interval="seeds x speakers", spread=spread)
            mine = 2 if low > 0 else 1 if high < DELTA else 0
            labels.append(darts_rule(c, DELTA, converged=True).verdict)
            assert labels[-1] == VERDICTS[mine]
    assert len(set(labels)) >= 2  # the check saw more than one verdict


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_wrong_reproduced_at_the_margin(setting):
    """True difference exactly +delta: "reproduced" (interval below +delta) is wrong."""
    seq, naive = _pair(setting, DELTA)
    assert seq["reproduced"] <= ALPHA / 2 + SLACK, seq
    assert naive["reproduced"] > ALPHA / 2 + SLACK, naive  # optional stopping inflates the naive rule
    assert naive["reproduced"] > 2 * seq["reproduced"]


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("truth", [0.0, -DELTA / 10])
def test_wrong_not_reproduced_at_or_below_zero(setting, truth):
    """True difference 0 (the boundary) or slightly below: "not reproduced" (above 0) is wrong."""
    seq, naive = _pair(setting, truth, seed=1)
    assert seq["not reproduced"] <= ALPHA / 2 + SLACK, seq
    if truth == 0.0:
        assert naive["not reproduced"] > ALPHA / 2 + SLACK, naive
    assert naive["not reproduced"] > 2 * seq["not reproduced"]


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("truth", [0.0, DELTA / 2, DELTA])
def test_coverage_at_the_stopping_time(setting, truth):
    seq, naive = _pair(setting, truth, seed=2)
    assert seq["coverage"] >= 0.93, seq
    assert seq["coverage"] >= 1 - ALPHA - COVER_SLACK, seq  # the union bound's guarantee
    assert naive["coverage"] < seq["coverage"], (naive, seq)
