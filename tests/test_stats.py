"""Hand-computed checks of the paired statistics in pefttune.analysis.intervals: agreement, kappa,
error overlap, McNemar, the sign test, the pairwise table, and the percentile bootstrap."""

import math

import numpy as np
import pytest

from pefttune.analysis.intervals import (
    agreement_matrix,
    agreement_rate,
    cohen_kappa,
    error_overlap,
    mcnemar_exact,
    paired_bootstrap,
    pairwise_table,
    sign_test,
)


def _table_2x2(n00, n01, n10, n11):
    """Two raters' labels realising the contingency table rows=a, cols=b."""
    a = [0] * (n00 + n01) + [1] * (n10 + n11)
    b = [0] * n00 + [1] * n01 + [0] * n10 + [1] * n11
    return np.array(a), np.array(b)


def test_agreement_rate():
    assert agreement_rate([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    with pytest.raises(ValueError, match="same shape"):
        agreement_rate([0, 1], [0])


def test_cohen_kappa_2x2_table():
    # [[20, 5], [10, 15]]: p_o = 35/50 = .7; a: (.5, .5), b: (.6, .4); p_e = .5 -> kappa = .4
    a, b = _table_2x2(20, 5, 10, 15)
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(b, a) == pytest.approx(0.4)


def test_cohen_kappa_string_labels_and_extremes():
    # p_o = 3/4; a: x .5 y .25 z .25; b: x .25 y .5 z .25; p_e = .3125 -> 0.4375/0.6875 = 7/11
    assert cohen_kappa(["x", "x", "y", "z"], ["x", "y", "y", "z"]) == pytest.approx(7 / 11)
    assert cohen_kappa([0, 1, 0, 1], [0, 1, 0, 1]) == 1.0
    assert cohen_kappa([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert math.isnan(cohen_kappa([3, 3, 3], [3, 3, 3]))  # p_e = 1: undefined


def test_mcnemar_exact_hand_computed():
    # b=2, c=5: p = 2 * P(X <= 2 | n=7) = 2 * (1 + 7 + 21) / 128
    ca = np.array([1, 0, 0, 0, 0, 0, 1, 1], dtype=bool)
    cb = np.array([0, 1, 1, 1, 1, 1, 1, 0], dtype=bool)
    assert mcnemar_exact(ca, cb) == (2, 5, pytest.approx(2 * (1 + 7 + 21) / 128))
    ca, cb = _table_2x2(3, 1, 5, 4)  # 0/1 = wrong/right
    b, c, p = mcnemar_exact(ca, cb)
    # a correct & b wrong = n10 = 5, a wrong & b correct = n01 = 1
    assert (b, c) == (5, 1)
    # p = 2 * P(X <= 1 | n=6) = 2 * (1 + 6) / 64
    assert p == pytest.approx(14 / 64)
    # b=2, c=8: 2 * (1 + 10 + 45) / 1024
    ca, cb = _table_2x2(0, 8, 2, 0)
    assert mcnemar_exact(ca, cb) == (2, 8, pytest.approx(112 / 1024))
    # Symmetric b = c = 3: two-sided p capped at 1.
    ca, cb = _table_2x2(1, 3, 3, 1)
    assert mcnemar_exact(ca, cb) == (3, 3, pytest.approx(1.0))
    # No discordant pairs.
    assert mcnemar_exact([True, False], [True, False]) == (0, 0, 1.0)


def test_sign_test_on_edit_counts_and_equal_to_mcnemar_on_0_1_errors():
    rng = np.random.default_rng(3)
    ca, cb = rng.random(50) < 0.7, rng.random(50) < 0.6
    assert sign_test((~ca).astype(int), (~cb).astype(int)) == mcnemar_exact(ca, cb)
    # per-utterance edit counts: 5 -> 1 counts for a, although both sentences are wrong
    a, b = [1, 0, 2, 3, 0], [5, 0, 2, 1, 4]
    assert sign_test(a, b) == (2, 1, pytest.approx(1.0))  # b=2 (utts 0, 4), c=1 (utt 3), ties dropped
    assert sign_test([0] * 8, [1] * 8) == (8, 0, pytest.approx(2 / 256))
    assert sign_test([2, 2], [2, 2]) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="paired"):
        sign_test([1, 2], [1])


def test_mcnemar_rejects_non_boolean():
    with pytest.raises(ValueError, match="correct_a must be boolean"):
        mcnemar_exact([0, 2], [0, 1])


def test_error_overlap():
    ca = [True, False, False, True, False]
    cb = [True, False, True, False, False]
    assert error_overlap(ca, cb) == 0.5  # both wrong {1, 4}, either wrong {1, 2, 3, 4}
    assert math.isnan(error_overlap([True], [True]))


PREDS = {"lora": [0, 1, 1, 0], "adapter": [0, 1, 0, 0], "prefix": [1, 1, 1, 0]}
REF = [0, 1, 1, 1]


def test_agreement_matrix():
    m = agreement_matrix(PREDS)
    assert list(m.index) == list(m.columns) == ["lora", "adapter", "prefix"]
    np.testing.assert_allclose(m.to_numpy(), [[1, 0.75, 0.75], [0.75, 1, 0.5], [0.75, 0.5, 1]])
    k = agreement_matrix(PREDS, measure="kappa")
    # lora vs adapter: p_o=.75, lora (.5,.5), adapter (.75,.25) -> p_e=.5 -> kappa .5
    assert k.loc["lora", "adapter"] == pytest.approx(0.5)
    assert k.loc["adapter", "lora"] == pytest.approx(0.5)
    assert k.loc["prefix", "prefix"] == 1.0
    with pytest.raises(ValueError, match="measure"):
        agreement_matrix(PREDS, measure="f1")
    with pytest.raises(ValueError, match=r"preds\['b'\] has 2 examples"):
        agreement_matrix({"a": [0, 1, 1], "b": [0, 1]})
    with pytest.raises(ValueError, match="non-empty dict"):
        agreement_matrix({})


def test_pairwise_table():
    t = pairwise_table(PREDS, REF)
    assert list(t.columns) == [
        "a",
        "b",
        "agreement",
        "kappa",
        "mcnemar_b",
        "mcnemar_c",
        "mcnemar_p",
        "both_wrong",
        "error_overlap",
    ]
    assert list(zip(t.a, t.b)) == [("lora", "adapter"), ("lora", "prefix"), ("adapter", "prefix")]
    row = t.iloc[0]
    # lora correct [T,T,T,F], adapter correct [T,T,F,F]
    assert row.agreement == 0.75
    assert row.kappa == pytest.approx(0.5)
    assert (row.mcnemar_b, row.mcnemar_c, row.mcnemar_p) == (1, 0, 1.0)
    assert row.both_wrong == 1
    assert row.error_overlap == 0.5
    row = t.iloc[2]
    # adapter correct [T,T,F,F], prefix correct [F,T,T,F]: b=1, c=1 -> p = 1
    assert (row.mcnemar_b, row.mcnemar_c, row.both_wrong) == (1, 1, 1)
    assert row.error_overlap == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="ref has 3 examples"):
        pairwise_table(PREDS, [0, 1, 1])


def test_bootstrap_hand_checkable():
    """The percentile bootstrap over examples against a fixed reference that gets every example wrong."""
    # All correct: every resample scores 1.
    c = paired_bootstrap([[1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0]], draws=200)
    assert (c.diff, c.ci_low, c.ci_high) == (1.0, 1.0, 1.0)
    # Two examples, one right: resampled accuracy is 0, .5, 1 w.p. 1/4, 1/2, 1/4,
    # so the 2.5% / 97.5% quantiles are 0 and 1.
    c = paired_bootstrap([[1.0, 0.0]], [[0.0, 0.0]], draws=1000, seed=3)
    assert (c.diff, c.ci_low, c.ci_high) == (0.5, 0.0, 1.0)


def test_bootstrap_percentiles_of_the_resampled_differences():
    rng = np.random.default_rng(7)
    ref = rng.integers(0, 2, size=40)
    pred = np.where(rng.random(40) < 0.7, ref, 1 - ref)
    a, b = (pred == ref).astype(float), (ref == 1).astype(float)
    c = paired_bootstrap([a], [b], draws=200, seed=5, confidence=0.9)
    idx = np.random.default_rng(5).integers(0, 40, size=(200, 40))  # one resample for both sides
    diffs = a[idx].mean(1) - b[idx].mean(1)
    assert c.diff == pytest.approx(a.mean() - b.mean())
    assert (c.ci_low, c.ci_high) == pytest.approx(tuple(np.quantile(diffs, [0.05, 0.95])))
    assert c.ci_low <= c.diff <= c.ci_high
    assert paired_bootstrap([a], [b], draws=200, seed=5, confidence=0.9) == c
    # an error rate is summed edits over summed reference lengths (corpus WER), lower is better
    w = paired_bootstrap([(np.array([0.0, 1.0]), np.array([2.0, 2.0]))], [(np.array([2.0, 2.0]), np.array([2.0, 2.0]))],
                         draws=50, higher_is_better=False)
    assert w.mean_a == 0.25 and w.diff == 0.75 and 0.5 <= w.ci_low <= w.ci_high <= 1.0


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap([[1.0, 0.0]], [[1.0]])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([[1.0]], [[1.0]], confidence=1.5)
    with pytest.raises(ValueError, match="draws must be"):
        paired_bootstrap([[1.0]], [[1.0]], draws=0)
    with pytest.raises(ValueError, match="non-empty"):
        paired_bootstrap([], [[1.0]])


def test_one_kappa_and_one_overlap_for_the_table_and_the_intervals():
    """The pairwise table's kappa and error overlap are the computation the finding-3 intervals
    resample, to the last bit."""
    from pefttune.analysis.intervals import agreement_by_seed

    rng = np.random.default_rng(11)
    for _ in range(40):
        n, k = int(rng.integers(5, 400)), int(rng.integers(2, 15))
        y = rng.integers(0, k, n)
        a, b = (np.where(rng.random(n) < 0.7, y, rng.integers(0, k, n)) for _ in range(2))
        pair = agreement_by_seed([a], [b], y, draws=2)
        assert cohen_kappa(a, b) == pair.kappa_by_seed[0] or math.isnan(pair.kappa_by_seed[0])
        assert error_overlap(a == y, b == y) == pair.overlap_by_seed[0] or math.isnan(pair.overlap_by_seed[0])
