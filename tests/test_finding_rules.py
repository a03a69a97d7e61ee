"""The finding verdict rules (one per finding module) and the nothing-learned gate, each outcome
with its numbers."""

from __future__ import annotations

import numpy as np
import pytest

from pefttune.analysis.findings import Finding, FindingKey, Ruling, Verdict
from pefttune.analysis.findings._base import hold_back
from pefttune.analysis.findings.darts_vs_uniform import rule as darts_rule
from pefttune.analysis.findings.ensembles import rule as ensembles_rule
from pefttune.analysis.findings.error_diversity import rule as errors_rule
from pefttune.analysis.findings.references import nothing_learned
from pefttune.analysis.intervals import (
    Comparison, PairAgreement, agreement_by_seed, bonferroni_confidence, paired_bootstrap,
)


def _cmp(lo: float, hi: float, conf: float = 0.95, p: float = 0.5) -> Comparison:
    return Comparison((lo + hi) / 2, lo, hi, p, "synthetic", 600, 3, 3, confidence=conf)


def _pair(name: str, k: tuple[float, float], o: tuple[float, float], conf: float) -> PairAgreement:
    a, b = name.split("-")
    return PairAgreement(a, b, sum(k) / 2, *k, sum(o) / 2, *o, 600, 3, conf)


# --------------------------------------------------------------------------- finding 1
def test_finding1_each_outcome_with_numbers():
    v = darts_rule(_cmp(-0.03, 0.005), margin=0.01, converged=True)
    assert v.verdict == "reproduced" and "[-0.0300, +0.0050]" in v.rule and "+0.0100" in v.rule
    v = darts_rule(_cmp(0.02, 0.06), margin=0.01, converged=True)
    assert v.verdict == "not reproduced" and "[+0.0200, +0.0600]" in v.rule and "above 0" in v.rule
    v = darts_rule(_cmp(0.002, 0.008), margin=0.01, converged=True)
    assert v.verdict == "not reproduced" and "less than delta = +0.0100" in v.rule
    for lo, hi in ((-0.02, 0.03), (-0.01, 0.01), (0.0, 0.02)):
        v = darts_rule(_cmp(lo, hi), margin=0.01, converged=True)
        assert v.verdict == "inconclusive" and f"[{lo:+.4f}, {hi:+.4f}]" in v.rule
    v = darts_rule(_cmp(-0.03, 0.005), margin=0.01, converged=False)
    assert v.verdict == "inconclusive" and "did not converge" in v.rule and "[-0.0300, +0.0050]" in v.rule
    assert v.details["converged"] is False


def test_finding1_never_rests_on_a_straddling_interval():
    rng = np.random.default_rng(0)
    for _ in range(300):
        lo = rng.uniform(-0.05, 0.05)
        c = _cmp(lo, lo + rng.uniform(0, 0.04))
        v = darts_rule(c, margin=0.01, converged=True)
        if v.verdict == "reproduced":
            assert c.lies_below(0.01) and not c.straddles(0.01)
        elif v.verdict == "not reproduced":
            assert c.lies_above(0.0) and not c.straddles(0.0)
        else:
            assert c.straddles(0.0) or c.straddles(0.01)


def test_finding1_from_a_real_bootstrap():
    rng = np.random.default_rng(5)
    base = (rng.random(600) < 0.7).astype(float)
    uniform = [np.where(rng.random(600) < 0.05, 1 - base, base) for _ in range(3)]
    darts = [np.where(rng.random(600) < 0.3, 0.0, u) for u in uniform]  # clearly worse
    c = paired_bootstrap(darts, uniform, draws=2000)
    assert darts_rule(c, 0.01, True).verdict == "reproduced"
    assert darts_rule(paired_bootstrap(uniform, darts, draws=2000), 0.01, True).verdict == "not reproduced"


# --------------------------------------------------------------------------- finding 2
def test_finding2_each_outcome_with_numbers():
    fam = bonferroni_confidence(0.95, 2)
    quiet = {"weighted": _cmp(-0.03, 0.008, fam, p=0.4), "soft": _cmp(-0.04, 0.0, fam, p=0.2)}
    others_flat = {"weighted": _cmp(-0.01, 0.03, fam), "soft": _cmp(-0.02, 0.02, fam)}
    v = ensembles_rule(_cmp(0.01, 0.05), others_flat, quiet, margin=0.01)
    assert v.verdict == "reproduced" and "[+0.0100, +0.0500]" in v.rule and "all below +0.0100" in v.rule
    np.testing.assert_allclose(list(v.details["vote_vs_others_holm_p"].values()), [0.4, 0.4])

    # better than the vote significantly, if by less than delta: the vote is not the best ("beats", as the
    # issue's rule says); the rule says it was by less than delta
    slightly = {**quiet, "soft": _cmp(0.002, 0.008, fam)}
    v = ensembles_rule(_cmp(0.01, 0.05), others_flat, slightly, margin=0.01)
    assert v.verdict == "partly reproduced" and "soft [+0.0020, +0.0080] beats the vote" in v.rule
    assert "soft beats it by less than delta = +0.0100 (CI below +0.0100)" in v.rule and "not shown" not in v.rule

    beats = {**quiet, "weighted": _cmp(0.005, 0.03, fam)}
    v = ensembles_rule(_cmp(0.01, 0.05), others_flat, beats, margin=0.01)
    assert v.verdict == "partly reproduced" and "weighted [+0.0050, +0.0300] beats the vote" in v.rule
    assert "weighted not shown to be within delta = +0.0100" in v.rule
    # two beat it, one of them within delta: the rule says which is which
    both = {**quiet, "weighted": _cmp(0.005, 0.03, fam), "soft": _cmp(0.002, 0.008, fam)}
    v = ensembles_rule(_cmp(0.01, 0.05), others_flat, both, margin=0.01)
    assert v.verdict == "partly reproduced" and "beat the vote" in v.rule and "weighted not shown" in v.rule
    assert "soft beats it by less than delta" in v.rule
    assert v.details["beats_vote"] == ["weighted", "soft"] and v.details["not_within_margin_of_vote"] == ["weighted"]

    # not shown better and not shown within delta: a "no strategy beats the vote" would rest on noise
    straddles = {**quiet, "weighted": _cmp(-0.0001, 0.0102, fam)}
    v = ensembles_rule(_cmp(0.01, 0.05), others_flat, straddles, margin=0.01)
    assert v.verdict == "inconclusive" and "weighted [-0.0001, +0.0102] straddles +delta = +0.0100" in v.rule

    other_up = {**others_flat, "weighted": _cmp(0.005, 0.04, fam)}
    v = ensembles_rule(_cmp(-0.01, 0.02), other_up, quiet, margin=0.01)
    assert v.verdict == "partly reproduced" and "weighted [+0.0050, +0.0400]" in v.rule

    flat = {"weighted": _cmp(-0.02, 0.008, fam), "soft": _cmp(-0.05, -0.01, fam)}
    v = ensembles_rule(_cmp(-0.03, 0.005), flat, quiet, margin=0.01)
    assert v.verdict == "not reproduced" and "+0.0100" in v.rule and "[-0.0300, +0.0050]" in v.rule

    v = ensembles_rule(_cmp(-0.01, 0.03), flat, quiet, margin=0.01)
    assert v.verdict == "inconclusive" and "[-0.0100, +0.0300]" in v.rule
    v = ensembles_rule(_cmp(-0.03, 0.005), others_flat, quiet, margin=0.01)
    assert v.verdict == "inconclusive"  # other gains straddle +delta: cannot say "not reproduced"


def test_finding2_requires_simultaneous_intervals():
    others = {"weighted": _cmp(-0.01, 0.03), "soft": _cmp(-0.02, 0.02)}  # 95% each: not simultaneous
    with pytest.raises(ValueError, match="bonferroni_confidence"):
        ensembles_rule(_cmp(0.01, 0.05), others, {}, margin=0.01)
    v = ensembles_rule(_cmp(0.01, 0.05), {"weighted": _cmp(-0.01, 0.03)}, {"weighted": _cmp(-0.02, 0.005)},
                         margin=0.01)
    assert v.verdict == "reproduced"  # a family of one needs no correction


def test_finding3_each_outcome_with_numbers():
    fam = bonferroni_confidence(0.95, 3)
    diff, alike, unclear = ((0.3, 0.5), (0.2, 0.4)), ((0.82, 0.9), (0.5, 0.7)), ((0.7, 0.85), (0.5, 0.7))
    v = errors_rule([_pair("lora-prefix", *diff, fam), _pair("lora-seq", *diff, fam),
                          _pair("prefix-seq", *unclear, fam)])
    assert v.verdict == "reproduced" and "2 of 3" in v.rule and "0.80" in v.rule and "[0.300, 0.500]" in v.rule
    v = errors_rule([_pair("lora-prefix", *alike, fam), _pair("lora-seq", (0.5, 0.7), (0.85, 0.9), fam),
                          _pair("prefix-seq", *diff, fam)])
    assert v.verdict == "not reproduced" and "2 of 3" in v.rule and v.details["alike"] == 2
    v = errors_rule([_pair("lora-prefix", *diff, fam), _pair("lora-seq", *alike, fam),
                          _pair("prefix-seq", *unclear, fam)])
    assert v.verdict == "inconclusive" and v.details["status"]["prefix-seq"] == "unclear"
    with pytest.raises(ValueError, match="bonferroni_confidence"):
        errors_rule([_pair("lora-prefix", *diff, 0.95), _pair("lora-seq", *diff, 0.95)])


def test_finding3_from_synthetic_predictions():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 12, 600)
    fam = bonferroni_confidence(0.95, 3)

    def method():  # 70% accurate, independent errors
        return [np.where(rng.random(600) < 0.7, y, (y + rng.integers(1, 12, 600)) % 12) for _ in range(3)]

    m = {k: method() for k in ("lora", "prefix", "seq")}
    pairs = [agreement_by_seed(m[a], m[b], y, names=(a, b), draws=500, confidence=fam)
             for a, b in (("lora", "prefix"), ("lora", "seq"), ("prefix", "seq"))]
    assert errors_rule(pairs).verdict == "reproduced"
    clone = {k: [np.where(rng.random(600) < 0.01, (p + 1) % 12, p) for p in m["lora"]] for k in ("x", "y", "z")}
    pairs = [agreement_by_seed(clone[a], clone[b], y, names=(a, b), draws=500, confidence=fam)
             for a, b in (("x", "y"), ("x", "z"), ("y", "z"))]
    assert errors_rule(pairs).verdict == "not reproduced"


# --------------------------------------------------------------------------- nothing learned
def test_nothing_learned_holds_every_verdict_back():
    ruling = darts_rule(_cmp(-0.03, 0.005), margin=0.01, converged=True)
    flat = {"uniform-lora": _cmp(-0.01, 0.012), "darts": _cmp(-0.02, 0.004), "hybrid": _cmp(0.002, 0.02)}
    assert nothing_learned(flat, 0.01)
    finding = Finding(FindingKey.DARTS_VS_UNIFORM, "claim", ruling.verdict, ruling.rule)
    held = hold_back(finding, 0.01)
    assert held.verdict == Verdict.NOTHING_LEARNED == "inconclusive: nothing learned"
    assert held.rule.startswith("inconclusive: nothing learned: no configuration beats the trivial reference by "
                                "more than delta = +0.0100; the finding's own rule said: reproduced: ")
    assert held.held_back == Ruling(Verdict.REPRODUCED, ruling.rule) and held.open
    not_run = Finding(FindingKey.ENSEMBLES, "claim", Verdict.NOT_RUN, "not run: no ensembles")
    assert hold_back(not_run, 0.01) is not_run
    learned = {**flat, "hybrid": _cmp(0.011, 0.09)}  # above the margin, not only above 0
    assert not nothing_learned(learned, 0.01)
    with pytest.raises(ValueError, match="at least one"):
        nothing_learned({}, 0.01)


def test_nothing_learned_on_ctc_against_all_blank():
    rng = np.random.default_rng(2)
    den = rng.integers(5, 30, 200).astype(float)
    blank = [(den.copy(), den)]  # all-blank output: every reference token deleted, PER 1
    model = [(np.round(den * rng.uniform(0.1, 0.4, 200)), den) for _ in range(3)]
    c = paired_bootstrap(model, blank, draws=1000, higher_is_better=False)
    assert c.diff > 0.5 and not nothing_learned({"lora": c}, 0.01)
    stuck = [(den.copy(), den) for _ in range(3)]  # a model that also emits only blanks
    assert nothing_learned({"lora": paired_bootstrap(stuck, blank, draws=500, higher_is_better=False)}, 0.01)
