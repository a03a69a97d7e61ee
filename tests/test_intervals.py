"""Intervals over seeds and examples, paired tests, Holm and Bonferroni, kappa and error overlap."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from pefttune.analysis.findings.darts_vs_uniform import rule as darts_rule
from pefttune.analysis.findings.ensembles import rule as ensembles_rule
from pefttune.analysis.findings.error_diversity import rule as errors_rule
from pefttune.analysis.intervals import (
    agreement_by_seed,
    agreement_seeds_speakers,
    bonferroni_confidence,
    cohen_kappa,
    ctc_agreement_by_seed,
    error_overlap,
    holm,
    paired_bootstrap,
    paired_permutation,
    seed_summary,
    seeds_speakers_bootstrap,
)
from pefttune.analysis.seeds_speakers import ONE_SEED, Clusters, Spread, seeds_to_decide


# --------------------------------------------------------------------------- seed_summary
def test_seed_summary_matches_scipy_t_interval():
    x = [0.41, 0.45, 0.43, 0.47, 0.40]
    s = seed_summary(x)
    lo, hi = stats.t.interval(0.95, df=4, loc=np.mean(x), scale=stats.sem(x))
    assert (s.n, s.n_nan, s.note) == (5, 0, "")
    assert s.mean == pytest.approx(np.mean(x)) and s.std == pytest.approx(np.std(x, ddof=1))
    assert (s.ci_low, s.ci_high) == (pytest.approx(lo), pytest.approx(hi))
    lo90, hi90 = stats.t.interval(0.90, df=4, loc=np.mean(x), scale=stats.sem(x))
    s90 = seed_summary(x, confidence=0.90)
    assert (s90.ci_low, s90.ci_high) == (pytest.approx(lo90), pytest.approx(hi90))


def test_seed_summary_one_seed_and_nans():
    s = seed_summary([0.42, float("nan"), float("nan")])
    assert s.n == 1 and s.n_nan == 2 and s.mean == pytest.approx(0.42)
    assert math.isnan(s.std) and math.isnan(s.ci_low) and math.isnan(s.ci_high)
    assert "one seed: no interval" in s.note and "2 NaN dropped" in s.note
    s2 = seed_summary([0.5, float("nan"), 0.6])
    assert s2.n == 2 and s2.n_nan == 1 and s2.ci_low < 0.55 < s2.ci_high
    assert seed_summary([]).n == 0 and math.isnan(seed_summary([]).mean)


# --------------------------------------------------------------------------- paired bootstrap
def _correlated_sets(rng, n, seeds, p_a, p_b, shared):
    """Per example: with prob `shared` every run of A and B gets one common outcome
    (Bernoulli 0.5); otherwise each run draws independently, A at p_a, B at p_b."""
    common = rng.random(n) < shared
    u = (rng.random(n) < 0.5).astype(float)
    a = [np.where(common, u, rng.random(n) < p_a).astype(float) for _ in range(seeds)]
    b = [np.where(common, u, rng.random(n) < p_b).astype(float) for _ in range(seeds)]
    return a, b, (1 - shared) * (p_a - p_b)


def _unpaired_ci(a, b, draws, rng, conf=0.95):
    """The broken interval: A and B resampled independently (pairing ignored)."""
    n = a[0].size
    ia, ib = rng.integers(0, n, (draws, n)), rng.integers(0, n, (draws, n))
    d = np.mean([x[ia].mean(1) for x in a], 0) - np.mean([x[ib].mean(1) for x in b], 0)
    return np.quantile(d, [(1 - conf) / 2, (1 + conf) / 2])


def test_paired_bootstrap_covers_known_difference():
    rng = np.random.default_rng(2024)
    reps, cover95, cover50, cover_unpaired = 200, 0, 0, 0
    for r in range(reps):
        a, b, true = _correlated_sets(rng, n=150, seeds=3, p_a=0.7, p_b=0.55, shared=0.6)
        c = paired_bootstrap(a, b, draws=1000, seed=r)
        cover95 += c.ci_low <= true <= c.ci_high
        c50 = paired_bootstrap(a, b, draws=1000, seed=r, confidence=0.5)
        cover50 += c50.ci_low <= true <= c50.ci_high
        lo, hi = _unpaired_ci(a, b, 1000, rng)
        cover_unpaired += lo <= true <= hi
    assert 0.90 <= cover95 / reps <= 0.99, cover95
    assert 0.36 <= cover50 / reps <= 0.64, cover50
    # the same bounds reject an interval that ignores the pairing (it is far too wide)
    assert cover_unpaired / reps > 0.99, cover_unpaired


def test_paired_resample_is_much_narrower_than_unpaired():
    rng = np.random.default_rng(7)
    n = 500
    base = (rng.random(n) < 0.6).astype(float)
    a = [np.where(rng.random(n) < 0.03, 1 - base, base) for _ in range(3)]
    b = [np.where(rng.random(n) < 0.05, 1 - base, base) for _ in range(3)]
    c = paired_bootstrap(a, b, draws=2000)
    assert c.diff == pytest.approx(np.mean([x.mean() for x in a]) - np.mean([x.mean() for x in b]))
    assert c.ci_low <= c.diff <= c.ci_high
    lo, hi = _unpaired_ci(a, b, 2000, rng)
    assert (c.ci_high - c.ci_low) < 0.5 * (hi - lo)


def test_ctc_ratio_form_point_estimate_and_orientation():
    den = np.array([10.0, 2.0, 8.0])
    a = [(np.array([1.0, 1.0, 0.0]), den), (np.array([0.0, 2.0, 2.0]), den)]  # PER 2/20, 4/20
    b = [(np.array([5.0, 1.0, 4.0]), den)]  # PER 10/20
    c = paired_bootstrap(a, b, draws=500, higher_is_better=False)
    assert c.mean_a == pytest.approx(0.15) and c.mean_b == pytest.approx(0.5)
    assert c.diff == pytest.approx(0.35)  # lower is better: diff = mean_b - mean_a > 0, A better
    assert (c.seeds_a, c.seeds_b, c.n_examples) == (2, 1, 3) and not c.higher_is_better
    # not the mean of per-utterance rates (a's first seed would be 0.2 there, not 0.1)
    rates_a = np.mean([np.mean(x / den) for x, _ in a])
    assert c.mean_a != pytest.approx(rates_a)
    assert c.ci_low <= c.diff <= c.ci_high
    up = paired_bootstrap(a, b, draws=500, higher_is_better=True)
    assert up.diff == pytest.approx(-0.35) and up.ci_low == pytest.approx(-c.ci_high)


# --------------------------------------------------------------------------- seeds x speakers
def _balanced(rng, seeds, speakers=20, clips=10, deltas=None):
    """A and B per seed over ``speakers`` x ``clips`` examples; B is A with ``deltas[s]`` clips
    more wrong in EVERY speaker (so each speaker's difference is the same: no speaker variance)."""
    a, b = [], []
    for s in range(seeds):
        x = (rng.random((speakers, clips)) < 0.5).astype(float)
        x[:, : clips // 2] = 1.0  # at least half right in each speaker
        y = x.copy()
        y[:, : deltas[s]] = 0.0  # B loses deltas[s] of A's right clips in every speaker
        a.append(x.ravel())
        b.append(y.ravel())
    return a, b, Clusters.from_speakers(np.repeat(np.arange(speakers), clips))


def test_seeds_speakers_is_a_t_interval_over_seeds_when_speakers_agree():
    a, b, clusters = _balanced(np.random.default_rng(0), 4, deltas=[1, 2, 4, 1])
    c = seeds_speakers_bootstrap(a, b, clusters=clusters, seeds_a=[0, 1, 2, 3], seeds_b=[0, 1, 2, 3], draws=500)
    d = np.array([1, 2, 4, 1]) / 10  # per seed: deltas[s] of 10 clips wrong in every speaker
    lo, hi = stats.t.interval(0.95, df=3, loc=d.mean(), scale=stats.sem(d))
    assert c.diff == pytest.approx(d.mean()) and c.spread.speaker_var == pytest.approx(0.0, abs=1e-20)
    assert (c.ci_low, c.ci_high) == (pytest.approx(lo), pytest.approx(hi))
    assert c.spread.pairing == "paired" and c.spread.df == 3 and c.spread.n_clusters == 20
    assert c.interval == "seeds x speakers" and c.caveat == "" and "t over 4 seeds (paired" in c.method
    assert c.p_value == pytest.approx(2 * stats.t.sf(d.mean() / stats.sem(d), 3))
    # Bonferroni on the t quantile: a family of 3 widens it to t_{3, 1 - 0.05/6}
    c3 = seeds_speakers_bootstrap(a, b, clusters=clusters, seeds_a=[0, 1, 2, 3], seeds_b=[0, 1, 2, 3], draws=500,
                                  confidence=bonferroni_confidence(0.95, 3))
    assert c3.ci_high - c3.diff == pytest.approx(stats.t.ppf(1 - 0.05 / 6, 3) * stats.sem(d))


def test_speaker_variance_is_the_cluster_bootstrap_variance_of_the_seed_average():
    """One seed pair's difference per speaker delta_j (10 clips each): resampling 20 speakers
    gives the seed-averaged difference the variance var(delta_j, ddof=0) / 20."""
    rng = np.random.default_rng(1)
    speakers, clips = 20, 10
    a = [(rng.random(speakers * clips) < 0.8).astype(float) for _ in range(2)]
    b = [np.where(np.repeat(rng.random(speakers) < 0.5, clips), 0.0, x) for x in a]  # B loses half the speakers
    clusters = Clusters.from_speakers(np.repeat(np.arange(speakers), clips))
    c = seeds_speakers_bootstrap(a, b, clusters=clusters, seeds_a=[7, 8], seeds_b=[7, 8], draws=20000)
    delta = np.mean([(x - y).reshape(speakers, clips).mean(1) for x, y in zip(a, b)], axis=0)
    assert c.spread.speaker_var == pytest.approx(delta.var() / speakers, rel=0.05)
    d = np.array([x.mean() - y.mean() for x, y in zip(a, b)])
    se = math.sqrt(d.var(ddof=1) / 2 + c.spread.speaker_var)
    assert c.ci_high - c.diff == pytest.approx(stats.t.ppf(0.975, 1) * se)
    # the same data with clips as independent units: the variance of the clustered errors is missed
    clips_only = seeds_speakers_bootstrap(a, b, seeds_a=[7, 8], seeds_b=[7, 8], draws=4000)
    assert clips_only.interval == "seeds x utterances" and clips_only.spread.n_clusters == speakers * clips
    assert clips_only.spread.speaker_var < 0.5 * c.spread.speaker_var


def test_seeds_speakers_pairs_shared_seeds_else_welch():
    rng = np.random.default_rng(2)
    a = [(rng.random(300) < p).astype(float) for p in (0.6, 0.65, 0.7)]
    b = [(rng.random(300) < p).astype(float) for p in (0.55, 0.5, 0.6)]
    ma, mb = np.array([x.mean() for x in a]), np.array([x.mean() for x in b])
    shared = seeds_speakers_bootstrap(a, b, seeds_a=[0, 1, 2], seeds_b=[1, 2, 3], draws=300)
    assert shared.spread.pairing == "paired" and shared.spread.n_seeds == 2
    assert shared.diff == pytest.approx(np.mean(ma[[1, 2]] - mb[[0, 1]]))  # seeds 1 and 2 of each side
    welch = seeds_speakers_bootstrap(a, b, seeds_a=[0, 1, 2], seeds_b=[3, 4, 5], draws=300)
    va, vb = ma.var(ddof=1) / 3, mb.var(ddof=1) / 3
    assert welch.spread.pairing == "Welch" and welch.diff == pytest.approx(ma.mean() - mb.mean())
    assert welch.spread.df == pytest.approx((va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2))
    assert welch.spread.seed_se2 == pytest.approx(va + vb)
    assert seeds_speakers_bootstrap(a, b, draws=300).spread.pairing == "Welch"  # seeds not named: not paired
    with pytest.raises(ValueError, match="seeds_a"):
        seeds_speakers_bootstrap(a, b, seeds_a=[0, 1], seeds_b=[0, 1, 2])


def test_one_seed_covers_speakers_only_and_no_verdict_rests_on_it():
    rng = np.random.default_rng(3)
    a = [(rng.random(400) < 0.9).astype(float)]
    b = [(rng.random(400) < 0.5).astype(float)]
    clusters = Clusters.from_speakers(np.repeat(np.arange(40), 10))
    c = seeds_speakers_bootstrap(a, b, clusters=clusters, seeds_a=[0], seeds_b=[0], draws=1000)
    assert c.caveat == ONE_SEED == "one seed: training randomness not bounded"
    assert c.interval == "speakers only (one seed)" and c.spread.pairing == "one seed"
    assert c.ci_low > 0.3 and "speakers only" in c.method
    v = darts_rule(c, margin=0.01, converged=True)
    assert v.verdict == "inconclusive" and v.rule.startswith("inconclusive: one seed: training randomness not bounded")
    assert "speakers only (one seed) CI" in v.rule
    fam = bonferroni_confidence(0.95, 1)
    v2 = ensembles_rule(c, {"soft": replace(c, confidence=fam)}, {"soft": replace(c, confidence=fam)}, 0.01)
    assert v2.verdict == "inconclusive" and "one seed: training randomness not bounded" in v2.rule


def test_fixed_reference_pairs_every_seed_with_it():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 300)
    trivial = [(y == 0).astype(float)]
    models = [(rng.random(300) < p).astype(float) for p in (0.7, 0.75, 0.8)]
    c = seeds_speakers_bootstrap(models, trivial, fixed_b=True, draws=400)
    d = np.array([m.mean() for m in models]) - trivial[0].mean()
    assert c.spread.pairing == "fixed reference" and c.spread.n_seeds == 3 and c.diff == pytest.approx(d.mean())
    assert c.spread.seed_var == pytest.approx(d.var(ddof=1))
    with pytest.raises(ValueError, match="deterministic reference"):
        seeds_speakers_bootstrap(models, models, fixed_b=True)


def test_ctc_sums_edits_per_speaker_not_rates():
    den = np.array([10.0, 2.0, 8.0, 4.0])
    a = [(np.array([1.0, 1.0, 0.0, 0.0]), den), (np.array([0.0, 2.0, 2.0, 0.0]), den)]
    b = [(np.array([5.0, 1.0, 4.0, 2.0]), den), (np.array([4.0, 2.0, 4.0, 2.0]), den)]
    clusters = Clusters.from_speakers(["x", "x", "y", None])
    c = seeds_speakers_bootstrap(a, b, clusters=clusters, seeds_a=[0, 1], seeds_b=[0, 1], draws=500,
                                 higher_is_better=False)
    assert clusters.count == 3 and clusters.n_speakers == 2  # the clip without a speaker is a cluster of its own
    assert c.mean_a == pytest.approx(np.mean([2 / 24, 4 / 24])) and c.mean_b == pytest.approx(np.mean([12 / 24, 12 / 24]))
    assert c.diff == pytest.approx(c.mean_b - c.mean_a) and "per cluster" in c.method


def test_clusters_from_speakers_give_missing_speakers_clusters_of_their_own():
    c = Clusters.from_speakers(["b", None, "a", float("nan"), "b", "", "a"])
    assert c.unit == "speakers" and c.n_speakers == 2 and c.count == 5 and c.label == "seeds x speakers"
    assert c.ids[0] == c.ids[4] and c.ids[2] == c.ids[6] and len({c.ids[1], c.ids[3], c.ids[5]}) == 3
    u = Clusters.utterances(4, "no speaker column")
    assert u.count == 4 and u.label == "seeds x utterances" and u.note == "no speaker column"
    with pytest.raises(ValueError, match="one cluster per test example"):
        seeds_speakers_bootstrap([np.ones(5)], [np.zeros(5)], clusters=u)


def test_seeds_to_decide_puts_the_t_half_width_inside_the_gap():
    spread = Spread("paired", 3, 0.0036, 0.0012, 0.0, 2.0)  # seed sd 0.06, no speaker variance
    need = seeds_to_decide(0.05, spread, 0.95, 0.0, 0.01)  # gap: 0.05 above 0
    assert need.gap == pytest.approx(0.05)
    n = need.n
    assert stats.t.ppf(0.975, n - 1) * math.sqrt(0.0036 / n) < 0.05 <= stats.t.ppf(0.975, n - 2) * math.sqrt(
        0.0036 / (n - 1))
    assert n == 9  # t_8 x 0.06 / 3 = 0.0461 < 0.05; t_7 x 0.06 / sqrt(8) = 0.0502
    # the speakers alone are too wide: no number of seeds decides it
    wide = Spread("paired", 3, 0.0036, 0.0012, 0.03 ** 2, 2.0)
    assert seeds_to_decide(0.05, wide, 0.95, 0.0, 0.01).n is None
    assert "more test speakers" in seeds_to_decide(0.05, wide, 0.95, 0.0, 0.01).reason
    assert "one seed" in seeds_to_decide(0.05, Spread("one seed", 1, math.nan, math.nan, 0.0, math.nan),
                                         0.95, 0.0, 0.01).reason


def test_p_values_small_for_real_difference_large_for_none():
    rng = np.random.default_rng(11)
    a = [(rng.random(300) < 0.75).astype(float) for _ in range(3)]
    b = [(rng.random(300) < 0.55).astype(float) for _ in range(2)]
    assert paired_permutation(a, b, draws=2000) < 0.01
    assert paired_bootstrap(a, b, draws=2000).p_value < 0.01
    # an extreme difference: no resample or relabelling reaches it, so p is the +1-corrected floor
    ones, zeros = [np.ones(200)], [np.zeros(200)]
    assert paired_permutation(ones, zeros, draws=999) == pytest.approx(1 / 1000)
    assert paired_bootstrap(ones, zeros, draws=999).p_value == pytest.approx(1 / 1000)
    # exactly no difference: B is A with each adjacent pair of examples swapped
    b0 = [x.reshape(-1, 2)[:, ::-1].ravel() for x in a]
    assert paired_permutation(a, b0, draws=2000) > 0.99
    assert paired_bootstrap(a, b0, draws=2000).p_value > 0.99
    # under a true null the permutation p-value is roughly uniform
    ps = []
    for r in range(30):
        x = [(rng.random(300) < 0.6).astype(float) for _ in range(3)]
        y = [(rng.random(300) < 0.6).astype(float) for _ in range(3)]
        ps.append(paired_permutation(x, y, draws=500, seed=r))
    assert np.median(ps) > 0.2 and 0.3 < np.mean(ps) < 0.7


def test_bootstrap_is_deterministic_and_validates_inputs():
    rng = np.random.default_rng(0)
    a = [rng.random(50) for _ in range(2)]
    b = [rng.random(50)]
    assert paired_bootstrap(a, b, draws=300, seed=5) == paired_bootstrap(a, b, draws=300, seed=5)
    assert paired_bootstrap(np.stack(a), b, draws=300, seed=5) == paired_bootstrap(a, b, draws=300, seed=5)
    assert paired_bootstrap(a, b, draws=300, seed=6) != paired_bootstrap(a, b, draws=300, seed=5)
    with pytest.raises(ValueError, match="one entry per seed"):
        paired_bootstrap((a[0], a[1]), b)
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap(a, [rng.random(49)])
    with pytest.raises(ValueError, match="same metric form"):
        paired_bootstrap(a, [(rng.random(50), np.ones(50))])
    with pytest.raises(ValueError, match="non-finite"):
        paired_bootstrap(a, [np.full(50, np.nan)])


def test_bootstrap_speed_600_examples_3_seeds():
    rng = np.random.default_rng(1)
    a = [(rng.random(600) < 0.6).astype(float) for _ in range(3)]
    b = [(rng.random(600) < 0.5).astype(float) for _ in range(3)]
    paired_bootstrap(a, b, draws=50)
    t0 = time.perf_counter()
    paired_bootstrap(a, b, draws=5000)
    assert time.perf_counter() - t0 < 3.0  # about 0.1 s on a quiet core; generous for a loaded one


# --------------------------------------------------------------------------- multiple comparisons
def test_holm_hand_computed_nan_and_brute_force():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, max(.03, 2*.03), max(.06, 1*.04)
    out = holm([0.01, 0.04, 0.03, 0.005, float("nan")])
    np.testing.assert_allclose(out[:4], [0.03, 0.06, 0.06, 0.02])
    assert math.isnan(out[4])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.random(7) ** 3
        m = p.size
        ranks = np.argsort(np.argsort(p))
        brute = [max(min(1.0, (m - ranks[j]) * p[j]) for j in range(m) if p[j] <= p[i]) for i in range(m)]
        np.testing.assert_allclose(holm(p), brute)
        assert np.all(holm(p) >= p) and np.all(holm(p) <= np.minimum(1, m * p) + 1e-15)


def test_holm_matches_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    rng = np.random.default_rng(1)
    for _ in range(20):
        p = rng.random(9) ** 2
        np.testing.assert_allclose(holm(p), multitest.multipletests(p, method="holm")[1])


def test_bonferroni_confidence():
    assert bonferroni_confidence(0.95, 1) == pytest.approx(0.95)
    assert bonferroni_confidence(0.95, 4) == pytest.approx(0.9875)
    with pytest.raises(ValueError):
        bonferroni_confidence(0.95, 0)


# --------------------------------------------------------------------------- agreement
def test_agreement_by_seed_matches_stats_and_bounds():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 12, 400)
    a = [np.where(rng.random(400) < 0.6, y, rng.integers(0, 12, 400)) for _ in range(3)]
    b = [np.where(rng.random(400) < 0.6, y, rng.integers(0, 12, 400)) for _ in range(3)]
    pa = agreement_by_seed(a, b, y, names=("lora", "prefix"), draws=500)
    for k in range(3):
        assert pa.kappa_by_seed[k] == pytest.approx(cohen_kappa(a[k], b[k]))
        assert pa.overlap_by_seed[k] == pytest.approx(error_overlap(a[k] == y, b[k] == y))
    assert pa.kappa == pytest.approx(np.mean(pa.kappa_by_seed))
    assert pa.kappa_ci_low <= pa.kappa <= pa.kappa_ci_high and pa.kappa_ci_high < 0.8
    assert pa.overlap_ci_low <= pa.overlap <= pa.overlap_ci_high
    words = np.array(["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "_unknown_", "_silence_"])
    pw = agreement_by_seed([words[x] for x in a], [words[x] for x in b], words[y], draws=500)
    assert pw.kappa_by_seed == pytest.approx(pa.kappa_by_seed) and pw.overlap == pytest.approx(pa.overlap)
    same = agreement_by_seed(a, a, y, draws=200)
    assert same.kappa_ci_low == pytest.approx(1.0) and same.overlap_ci_low == pytest.approx(1.0)


def test_agreement_over_seed_pairs_and_speakers_covers_seeds_that_agree_differently():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 12, 800)
    b = [np.where(rng.random(800) < 0.7, y, rng.integers(0, 12, 800)) for _ in range(3)]
    # seed 0: A copies B (kappa 1); seeds 1, 2: A independent of B (kappa ~0.5)
    a = [b[0].copy()] + [np.where(rng.random(800) < 0.7, y, rng.integers(0, 12, 800)) for _ in range(2)]
    speakers = np.repeat(np.arange(40), 20)
    one = agreement_by_seed(a, b, y, draws=800)
    two = agreement_seeds_speakers(a, b, y, clusters=speakers, unit="speakers", draws=800)
    assert two.kappa == pytest.approx(one.kappa) and two.overlap == pytest.approx(one.overlap)
    assert two.interval == "seeds x speakers" and one.interval == "examples only: these trained models"
    k = np.array(two.kappa_by_seed)
    half = stats.t.ppf(0.975, 2) * math.sqrt(k.var(ddof=1) / 3 + two.kappa_spread.speaker_var)
    assert two.kappa_ci_low == pytest.approx(k.mean() - half) and two.kappa_ci_high == 1.0  # clipped at 1
    assert two.kappa_ci_high - two.kappa_ci_low > 3 * (one.kappa_ci_high - one.kappa_ci_low)
    assert two.kappa_spread.n_clusters == 40 and two.kappa_spread.df == 2
    # every seed alike: the seed level adds nothing, the interval is the speakers' alone
    same = agreement_seeds_speakers(b, b, y, clusters=speakers, unit="speakers", draws=200)
    assert same.kappa_ci_low == pytest.approx(1.0) and same.overlap_ci_low == pytest.approx(1.0)
    # one seed pair: speakers only, and finding 3 does not rest on it
    single = agreement_seeds_speakers(a[1:2], b[1:2], y, clusters=speakers, unit="speakers", draws=300)
    assert single.caveat == ONE_SEED and single.interval == "speakers only (one seed)"
    v = errors_rule([single])
    assert v.verdict == "inconclusive" and ONE_SEED in v.rule


def test_grouped_bootstrap_resamples_whole_groups():
    """With groups, a draw takes all examples of a group or none, so errors that come in bursts
    (whole utterances) widen the interval; the point estimates do not change."""
    y = np.zeros(40, dtype=int)
    a = [np.where(np.arange(40) < 20, 0, 1)]  # wrong on group 1 (examples 20-39)
    b = [np.zeros(40, dtype=int)]
    groups = np.repeat([0, 1], 20)
    free = agreement_by_seed(a, b, y, draws=400, seed=1)
    grouped = agreement_by_seed(a, b, y, draws=400, seed=1, groups=groups)
    # B is never wrong: overlap 0 in every draw, either way
    assert grouped.overlap == free.overlap == 0.0 and grouped.overlap_ci_high == 0.0
    with pytest.raises(ValueError, match="one group per example"):
        agreement_by_seed(a, b, y, groups=groups[:-1])
    # the interval is wider when examples within a group move together: A's error share per draw
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 600)
    groups = np.repeat(np.arange(30), 20)
    burst = rng.random(30) < 0.5  # A is wrong on whole groups, B on scattered examples
    pa = [np.where(burst[groups], (y + 1) % 5, y)]
    pb = [np.where(rng.random(600) < 0.5, (y + 2) % 5, y)]
    free = agreement_by_seed(pa, pb, y, draws=1000)
    grouped = agreement_by_seed(pa, pb, y, draws=1000, groups=groups)
    assert grouped.kappa == pytest.approx(free.kappa) and grouped.overlap == pytest.approx(free.overlap)
    width = lambda p: p.overlap_ci_high - p.overlap_ci_low  # noqa: E731
    assert width(grouped) > 1.5 * width(free)


def test_ctc_agreement_is_on_aligned_phonemes_not_sentences():
    """Every sentence has an error for both systems, but at different phonemes: exact-sentence
    agreement would call the errors shared (overlap 1); on aligned phonemes they are disjoint."""
    rng = np.random.default_rng(2)
    refs = [list(rng.integers(1, 30, 25)) for _ in range(80)]

    def corrupt(position):
        out = []
        for r in refs:
            h = list(r)
            if position == "first":
                h[3] = h[3] % 29 + 1  # a substitution
            else:
                del h[20]  # a deletion
            out.append(h)
        return out

    a, b = corrupt("first"), corrupt("last")
    sentence = agreement_by_seed([np.array([" ".join(map(str, h)) for h in a])],
                                 [np.array([" ".join(map(str, h)) for h in b])],
                                 np.array([" ".join(map(str, r)) for r in refs]), draws=200)
    assert sentence.overlap == 1.0  # the degenerate view
    pair = ctc_agreement_by_seed([a], [b], refs, draws=200)
    assert pair.n_examples == 80 * 25 and pair.overlap == 0.0 and pair.overlap_ci_high == 0.0
    # they agree on 23 of 25 phonemes in every sentence (29 classes): kappa 23/25 less chance
    assert 0.85 < pair.kappa < 23 / 25
    same = ctc_agreement_by_seed([a, a], [a, a], refs, draws=200)
    assert same.overlap == 1.0 and same.kappa == pytest.approx(1.0) and same.seeds == 2
    with pytest.raises(ValueError, match=r"seed\(s\) \[0\]"):
        ctc_agreement_by_seed([a[:-1]], [b], refs)
