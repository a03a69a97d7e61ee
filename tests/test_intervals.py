"""Intervals over seeds and examples, paired tests, Holm, and the finding verdict rules."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy import stats

from pefttune.analysis import stats as pstats
from pefttune.analysis.intervals import (
    Comparison,
    PairAgreement,
    agreement_by_seed,
    bonferroni_confidence,
    ctc_agreement_by_seed,
    finding1_verdict,
    finding2_verdict,
    finding3_verdict,
    holm,
    nothing_learned,
    paired_bootstrap,
    paired_permutation,
    seed_summary,
    unless_nothing_learned,
)


def _cmp(lo: float, hi: float, conf: float = 0.95, p: float = 0.5) -> Comparison:
    return Comparison((lo + hi) / 2, lo, hi, p, "synthetic", 600, 3, 3, confidence=conf)


def _pair(name: str, k: tuple[float, float], o: tuple[float, float], conf: float) -> PairAgreement:
    a, b = name.split("-")
    return PairAgreement(a, b, sum(k) / 2, *k, sum(o) / 2, *o, 600, 3, conf)


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


def test_bootstrap_ci_covers_known_difference():
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


def test_two_level_bootstrap_widens_with_seed_spread():
    rng = np.random.default_rng(3)
    n = 600
    a = [(rng.random(n) < p).astype(float) for p in (0.45, 0.6, 0.75)]
    b = [(rng.random(n) < 0.6).astype(float) for _ in range(3)]
    one = paired_bootstrap(a, b, draws=2000)
    two = paired_bootstrap(a, b, draws=2000, resample_seeds=True)
    assert two.diff == pytest.approx(one.diff)
    assert (two.ci_high - two.ci_low) > 1.5 * (one.ci_high - one.ci_low)
    assert "two-level" in two.method
    back = paired_bootstrap(b, a, draws=2000, resample_seeds=True)  # the spread seeds are now B's
    assert back.diff == pytest.approx(-one.diff)
    assert (back.ci_high - back.ci_low) > 1.5 * (one.ci_high - one.ci_low)


def test_two_level_interval_covers_a_difference_that_varies_with_the_training_seed():
    """The quantity a verdict is about: A - B over training seeds, not for the seeds that happened
    to be trained.  Each replication trains 5 seeds of A and B, whose accuracies move with the seed
    (sd 0.03 shared by A and B, 0.03 each alone; true mean difference +0.03), and tests them on 500
    examples.  The interval over examples alone misses the seed spread; the paired two-level one
    covers it (95% nominal)."""
    rng = np.random.default_rng(0)
    n, seeds, reps, delta = 500, 5, 100, 0.03
    hits = {False: 0, True: 0}
    for r in range(reps):
        shared = rng.normal(0, 0.03, seeds)
        pa = 0.73 + shared + rng.normal(0, 0.03, seeds)
        pb = 0.70 + shared + rng.normal(0, 0.03, seeds)
        a = [(rng.random(n) < p).astype(float) for p in pa]
        b = [(rng.random(n) < p).astype(float) for p in pb]
        for two_level in hits:
            c = paired_bootstrap(a, b, draws=300, seed=r, resample_seeds=two_level, paired_seeds=True)
            hits[two_level] += c.ci_low <= delta <= c.ci_high
    assert hits[True] / reps >= 0.9 and hits[False] / reps <= 0.8  # measured: 0.97 and 0.67


def test_paired_seed_resampling_follows_the_spread_of_the_difference():
    # a seed moves A and B together (shared members, same training seed): A = B + 0.05 on every seed
    rng = np.random.default_rng(5)
    n = 2000
    b = [(rng.random(n) < p).astype(float) for p in (0.45, 0.6, 0.75)]
    a = []
    for x in b:  # A gets 100 of B's errors right on each seed (+0.05), at random places
        y = x.copy()
        y[rng.choice(np.flatnonzero(y == 0), 100, replace=False)] = 1.0
        a.append(y)
    one = paired_bootstrap(a, b, draws=2000)
    unpaired = paired_bootstrap(a, b, draws=2000, resample_seeds=True)
    paired = paired_bootstrap(a, b, draws=2000, resample_seeds=True, paired_seeds=True)
    assert paired.diff == pytest.approx(0.05) == pytest.approx(unpaired.diff)
    assert "paired seeds" in paired.method
    # the difference is the same on every seed: pairing removes the seed spread of each side
    assert paired.ci_high - paired.ci_low < 0.5 * (unpaired.ci_high - unpaired.ci_low)
    assert paired.ci_low > 0 and unpaired.ci_low < 0
    assert paired.ci_high - paired.ci_low <= 1.5 * (one.ci_high - one.ci_low)
    # the difference itself varies by seed (+0.0, +0.05, +0.10): paired two-level is wider than examples only
    a2 = [b[0].copy(), a[1], b[2].copy()]
    extra = rng.choice(np.flatnonzero(b[2] == 0), 200, replace=False)
    a2[2][extra] = 1.0
    one2 = paired_bootstrap(a2, b, draws=2000)
    paired2 = paired_bootstrap(a2, b, draws=2000, resample_seeds=True, paired_seeds=True)
    assert paired2.ci_high - paired2.ci_low > 2 * (one2.ci_high - one2.ci_low)
    with pytest.raises(ValueError, match="as many seeds"):
        paired_bootstrap(a[:2], b, resample_seeds=True, paired_seeds=True)


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


# --------------------------------------------------------------------------- finding 1
def test_finding1_each_outcome_with_numbers():
    v = finding1_verdict(_cmp(-0.03, 0.005), margin=0.01, converged=True)
    assert v.label == "reproduced" and "[-0.0300, +0.0050]" in v.rule and "+0.0100" in v.rule
    v = finding1_verdict(_cmp(0.02, 0.06), margin=0.01, converged=True)
    assert v.label == "not reproduced" and "[+0.0200, +0.0600]" in v.rule and "above 0" in v.rule
    v = finding1_verdict(_cmp(0.002, 0.008), margin=0.01, converged=True)
    assert v.label == "not reproduced" and "less than delta = +0.0100" in v.rule
    for lo, hi in ((-0.02, 0.03), (-0.01, 0.01), (0.0, 0.02)):
        v = finding1_verdict(_cmp(lo, hi), margin=0.01, converged=True)
        assert v.label == "inconclusive" and f"[{lo:+.4f}, {hi:+.4f}]" in v.rule
    v = finding1_verdict(_cmp(-0.03, 0.005), margin=0.01, converged=False)
    assert v.label == "inconclusive" and "did not converge" in v.rule and "[-0.0300, +0.0050]" in v.rule
    assert v.details["converged"] is False


def test_finding1_never_rests_on_a_straddling_interval():
    rng = np.random.default_rng(0)
    for _ in range(300):
        lo = rng.uniform(-0.05, 0.05)
        c = _cmp(lo, lo + rng.uniform(0, 0.04))
        v = finding1_verdict(c, margin=0.01, converged=True)
        if v.label == "reproduced":
            assert c.lies_below(0.01) and not c.straddles(0.01)
        elif v.label == "not reproduced":
            assert c.lies_above(0.0) and not c.straddles(0.0)
        else:
            assert c.straddles(0.0) or c.straddles(0.01)


def test_finding1_from_a_real_bootstrap():
    rng = np.random.default_rng(5)
    base = (rng.random(600) < 0.7).astype(float)
    uniform = [np.where(rng.random(600) < 0.05, 1 - base, base) for _ in range(3)]
    darts = [np.where(rng.random(600) < 0.3, 0.0, u) for u in uniform]  # clearly worse
    c = paired_bootstrap(darts, uniform, draws=2000)
    assert finding1_verdict(c, 0.01, True).label == "reproduced"
    assert finding1_verdict(paired_bootstrap(uniform, darts, draws=2000), 0.01, True).label == "not reproduced"


# --------------------------------------------------------------------------- finding 2
def test_finding2_each_outcome_with_numbers():
    fam = bonferroni_confidence(0.95, 2)
    quiet = {"weighted": _cmp(-0.03, 0.008, fam, p=0.4), "soft": _cmp(-0.04, 0.0, fam, p=0.2)}
    others_flat = {"weighted": _cmp(-0.01, 0.03, fam), "soft": _cmp(-0.02, 0.02, fam)}
    v = finding2_verdict(_cmp(0.01, 0.05), others_flat, quiet, margin=0.01)
    assert v.label == "reproduced" and "[+0.0100, +0.0500]" in v.rule and "all below +0.0100" in v.rule
    np.testing.assert_allclose(list(v.details["vote_vs_others_holm_p"].values()), [0.4, 0.4])

    # better than the vote significantly, if by less than delta: the vote is not the best ("beats", as the
    # issue's rule says); the rule says it was by less than delta
    slightly = {**quiet, "soft": _cmp(0.002, 0.008, fam)}
    v = finding2_verdict(_cmp(0.01, 0.05), others_flat, slightly, margin=0.01)
    assert v.label == "partly reproduced" and "soft [+0.0020, +0.0080] beats the vote" in v.rule
    assert "soft beats it by less than delta = +0.0100 (CI below +0.0100)" in v.rule and "not shown" not in v.rule

    beats = {**quiet, "weighted": _cmp(0.005, 0.03, fam)}
    v = finding2_verdict(_cmp(0.01, 0.05), others_flat, beats, margin=0.01)
    assert v.label == "partly reproduced" and "weighted [+0.0050, +0.0300] beats the vote" in v.rule
    assert "weighted not shown to be within delta = +0.0100" in v.rule
    # two beat it, one of them within delta: the rule says which is which
    both = {**quiet, "weighted": _cmp(0.005, 0.03, fam), "soft": _cmp(0.002, 0.008, fam)}
    v = finding2_verdict(_cmp(0.01, 0.05), others_flat, both, margin=0.01)
    assert v.label == "partly reproduced" and "beat the vote" in v.rule and "weighted not shown" in v.rule
    assert "soft beats it by less than delta" in v.rule
    assert v.details["beats_vote"] == ["weighted", "soft"] and v.details["not_within_margin_of_vote"] == ["weighted"]

    # not shown better and not shown within delta: a "no strategy beats the vote" would rest on noise
    straddles = {**quiet, "weighted": _cmp(-0.0001, 0.0102, fam)}
    v = finding2_verdict(_cmp(0.01, 0.05), others_flat, straddles, margin=0.01)
    assert v.label == "inconclusive" and "weighted [-0.0001, +0.0102] straddles +delta = +0.0100" in v.rule

    other_up = {**others_flat, "weighted": _cmp(0.005, 0.04, fam)}
    v = finding2_verdict(_cmp(-0.01, 0.02), other_up, quiet, margin=0.01)
    assert v.label == "partly reproduced" and "weighted [+0.0050, +0.0400]" in v.rule

    flat = {"weighted": _cmp(-0.02, 0.008, fam), "soft": _cmp(-0.05, -0.01, fam)}
    v = finding2_verdict(_cmp(-0.03, 0.005), flat, quiet, margin=0.01)
    assert v.label == "not reproduced" and "+0.0100" in v.rule and "[-0.0300, +0.0050]" in v.rule

    v = finding2_verdict(_cmp(-0.01, 0.03), flat, quiet, margin=0.01)
    assert v.label == "inconclusive" and "[-0.0100, +0.0300]" in v.rule
    v = finding2_verdict(_cmp(-0.03, 0.005), others_flat, quiet, margin=0.01)
    assert v.label == "inconclusive"  # other gains straddle +delta: cannot say "not reproduced"


def test_finding2_requires_simultaneous_intervals():
    others = {"weighted": _cmp(-0.01, 0.03), "soft": _cmp(-0.02, 0.02)}  # 95% each: not simultaneous
    with pytest.raises(ValueError, match="bonferroni_confidence"):
        finding2_verdict(_cmp(0.01, 0.05), others, {}, margin=0.01)
    v = finding2_verdict(_cmp(0.01, 0.05), {"weighted": _cmp(-0.01, 0.03)}, {"weighted": _cmp(-0.02, 0.005)},
                         margin=0.01)
    assert v.label == "reproduced"  # a family of one needs no correction


# --------------------------------------------------------------------------- finding 3
def test_agreement_by_seed_matches_stats_and_bounds():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 12, 400)
    a = [np.where(rng.random(400) < 0.6, y, rng.integers(0, 12, 400)) for _ in range(3)]
    b = [np.where(rng.random(400) < 0.6, y, rng.integers(0, 12, 400)) for _ in range(3)]
    pa = agreement_by_seed(a, b, y, names=("lora", "prefix"), draws=500)
    for k in range(3):
        assert pa.kappa_by_seed[k] == pytest.approx(pstats.cohen_kappa(a[k], b[k]))
        assert pa.overlap_by_seed[k] == pytest.approx(pstats.error_overlap(a[k] == y, b[k] == y))
    assert pa.kappa == pytest.approx(np.mean(pa.kappa_by_seed))
    assert pa.kappa_ci_low <= pa.kappa <= pa.kappa_ci_high and pa.kappa_ci_high < 0.8
    assert pa.overlap_ci_low <= pa.overlap <= pa.overlap_ci_high
    words = np.array(["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "_unknown_", "_silence_"])
    pw = agreement_by_seed([words[x] for x in a], [words[x] for x in b], words[y], draws=500)
    assert pw.kappa_by_seed == pytest.approx(pa.kappa_by_seed) and pw.overlap == pytest.approx(pa.overlap)
    same = agreement_by_seed(a, a, y, draws=200)
    assert same.kappa_ci_low == pytest.approx(1.0) and same.overlap_ci_low == pytest.approx(1.0)


def test_agreement_two_level_covers_seeds_that_agree_differently():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 12, 800)
    b = [np.where(rng.random(800) < 0.7, y, rng.integers(0, 12, 800)) for _ in range(3)]
    # seed 0: A copies B (kappa 1); seeds 1, 2: A independent of B (kappa ~0.5)
    a = [b[0].copy()] + [np.where(rng.random(800) < 0.7, y, rng.integers(0, 12, 800)) for _ in range(2)]
    one = agreement_by_seed(a, b, y, draws=800)
    two = agreement_by_seed(a, b, y, draws=800, resample_seeds=True)
    assert two.kappa == pytest.approx(one.kappa) and two.overlap == pytest.approx(one.overlap)
    assert two.kappa_ci_high - two.kappa_ci_low > 3 * (one.kappa_ci_high - one.kappa_ci_low)
    assert two.kappa_ci_high == pytest.approx(1.0)  # some draws hold seed 0 three times
    # every seed alike: resampling seeds adds nothing beyond the examples
    same = agreement_by_seed(b, b, y, draws=200, resample_seeds=True)
    assert same.kappa_ci_low == pytest.approx(1.0)


def test_finding3_each_outcome_with_numbers():
    fam = bonferroni_confidence(0.95, 3)
    diff, alike, unclear = ((0.3, 0.5), (0.2, 0.4)), ((0.82, 0.9), (0.5, 0.7)), ((0.7, 0.85), (0.5, 0.7))
    v = finding3_verdict([_pair("lora-prefix", *diff, fam), _pair("lora-seq", *diff, fam),
                          _pair("prefix-seq", *unclear, fam)])
    assert v.label == "reproduced" and "2 of 3" in v.rule and "0.80" in v.rule and "[0.300, 0.500]" in v.rule
    v = finding3_verdict([_pair("lora-prefix", *alike, fam), _pair("lora-seq", (0.5, 0.7), (0.85, 0.9), fam),
                          _pair("prefix-seq", *diff, fam)])
    assert v.label == "not reproduced" and "2 of 3" in v.rule and v.details["alike"] == 2
    v = finding3_verdict([_pair("lora-prefix", *diff, fam), _pair("lora-seq", *alike, fam),
                          _pair("prefix-seq", *unclear, fam)])
    assert v.label == "inconclusive" and v.details["status"]["prefix-seq"] == "unclear"
    with pytest.raises(ValueError, match="bonferroni_confidence"):
        finding3_verdict([_pair("lora-prefix", *diff, 0.95), _pair("lora-seq", *diff, 0.95)])


def test_finding3_from_synthetic_predictions():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 12, 600)
    fam = bonferroni_confidence(0.95, 3)

    def method():  # 70% accurate, independent errors
        return [np.where(rng.random(600) < 0.7, y, (y + rng.integers(1, 12, 600)) % 12) for _ in range(3)]

    m = {k: method() for k in ("lora", "prefix", "seq")}
    pairs = [agreement_by_seed(m[a], m[b], y, names=(a, b), draws=500, confidence=fam)
             for a, b in (("lora", "prefix"), ("lora", "seq"), ("prefix", "seq"))]
    assert finding3_verdict(pairs).label == "reproduced"
    clone = {k: [np.where(rng.random(600) < 0.01, (p + 1) % 12, p) for p in m["lora"]] for k in ("x", "y", "z")}
    pairs = [agreement_by_seed(clone[a], clone[b], y, names=(a, b), draws=500, confidence=fam)
             for a, b in (("x", "y"), ("x", "z"), ("y", "z"))]
    assert finding3_verdict(pairs).label == "not reproduced"


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


# --------------------------------------------------------------------------- nothing learned
def test_nothing_learned_overrides_a_verdict():
    verdict = finding1_verdict(_cmp(-0.03, 0.005), margin=0.01, converged=True)
    flat = {"uniform-lora": _cmp(-0.01, 0.012), "darts": _cmp(-0.02, 0.004), "hybrid": _cmp(0.002, 0.02)}
    assert nothing_learned(flat, 0.01)
    v = unless_nothing_learned(verdict, flat, 0.01)
    assert v.label == "inconclusive" and "nothing learned" in v.rule and "hybrid [+0.0020, +0.0200]" in v.rule
    assert v.details["overridden"] == "reproduced"
    learned = {**flat, "hybrid": _cmp(0.011, 0.09)}  # above the margin, not only above 0
    assert not nothing_learned(learned, 0.01)
    assert unless_nothing_learned(verdict, learned, 0.01) is verdict


def test_nothing_learned_on_ctc_against_all_blank():
    rng = np.random.default_rng(2)
    den = rng.integers(5, 30, 200).astype(float)
    blank = [(den.copy(), den)]  # all-blank output: every reference token deleted, PER 1
    model = [(np.round(den * rng.uniform(0.1, 0.4, 200)), den) for _ in range(3)]
    c = paired_bootstrap(model, blank, draws=1000, higher_is_better=False)
    assert c.diff > 0.5 and not nothing_learned({"lora": c}, 0.01)
    stuck = [(den.copy(), den) for _ in range(3)]  # a model that also emits only blanks
    assert nothing_learned({"lora": paired_bootstrap(stuck, blank, draws=500, higher_is_better=False)}, 0.01)
