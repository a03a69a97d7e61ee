"""Finding 3: "different PEFT methods make different errors".

Kappa and error overlap (Jaccard of the error sets) of each pair of uniform methods, per seed
pair, with simultaneous intervals over seed pairs and speakers (Bonferroni over the pairs);
CTC systems are compared over aligned reference phonemes.  The rule: :func:`rule`.

Example::

    >>> from pefttune.analysis.intervals import PairAgreement, bonferroni_confidence
    >>> level = bonferroni_confidence(0.95, 1)
    >>> pair = PairAgreement("lora", "bitfit", 0.4, 0.3, 0.5, 0.3, 0.2, 0.4, 600, 3, level)
    >>> str(rule([pair]).verdict)
    'reproduced'
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Mapping, Sequence

from pefttune.analysis.findings._base import (
    Finding, FindingKey, Interval, ReportContext, Ruling, Verdict, first_caveat, not_run, not_run_text,
    render_section, seeds_needed,
)
from pefttune.analysis.findings._inputs import Config, Scorer
from pefttune.analysis.intervals import PairAgreement, bonferroni_confidence, check_simultaneous, percent
from pefttune.schema import TrialKind

__all__ = ["CLAIM", "ErrorEvidence", "KEY", "THRESHOLD", "TITLE", "decide", "pair_row", "render", "rule",
           "suite_note", "summary", "text"]

KEY = FindingKey.ERROR_DIVERSITY
CLAIM = "different PEFT methods make different errors"
TITLE = "Different methods, different errors"
THRESHOLD = 0.8  # kappa and error overlap: the lower edge of "almost perfect" agreement


def rule(pairs: Sequence[PairAgreement], kappa_threshold: float = THRESHOLD, overlap_threshold: float = THRESHOLD, *,
         family_confidence: float = 0.95) -> Ruling:
    """Finding 3, "different PEFT methods err differently", over the m method pairs.

    A pair *errs differently* when ``kappa_ci_high < kappa_threshold`` AND ``overlap_ci_high <
    overlap_threshold``: both intervals exclude near-identical behaviour (0.8 is the lower edge
    of "almost perfect" agreement, Landis & Koch 1977; an error overlap of 0.8 means 80% of the
    pair's errors are shared).  It *errs alike* when ``kappa_ci_low >= kappa_threshold`` OR
    ``overlap_ci_low >= overlap_threshold``; otherwise (an interval straddles, or is NaN) it is
    unclear.  An interval with a caveat (one seed) -> "inconclusive", the caveat stated.
    "reproduced" when more than m/2 pairs err differently; "not reproduced" when more
    than m/2 err alike; otherwise "inconclusive".  The intervals must be simultaneous
    (``bonferroni_confidence(family_confidence, m)``; ValueError otherwise).  Note: the overlap
    of two independent models of accuracy p is ``(1-p)^2 / (1-p^2)``, high near chance (0.85 at
    1/12), so the nothing-learned gate (:mod:`.references`) comes before this verdict.
    """
    if len(pairs) == 0:
        raise ValueError("finding 3 needs at least one method pair")
    check_simultaneous(list(pairs), family_confidence, "pairs")
    kt, ot, m = float(kappa_threshold), float(overlap_threshold), len(pairs)
    status = {f"{p.a}-{p.b}": "different" if p.kappa_ci_high < kt and p.overlap_ci_high < ot else
              "alike" if p.kappa_ci_low >= kt or p.overlap_ci_low >= ot else "unclear" for p in pairs}
    n_diff, n_alike = (sum(v == x for v in status.values()) for x in ("different", "alike"))
    details = {"status": status, "different": n_diff, "alike": n_alike, "pairs": m,
               "kappa_threshold": kt, "overlap_threshold": ot}
    cis = "; ".join(f"{p.a}-{p.b} kappa [{p.kappa_ci_low:.3f}, {p.kappa_ci_high:.3f}] overlap "
                    f"[{p.overlap_ci_low:.3f}, {p.overlap_ci_high:.3f}]" for p in pairs)
    crit = (f"a pair errs differently when its kappa CI < {kt:.2f} and its error-overlap CI < {ot:.2f}, "
            f"alike when either lower bound >= its threshold; {percent(pairs[0].confidence)} {pairs[0].interval} "
            "intervals")
    caveat = first_caveat(pairs)
    if caveat:
        return Ruling(Verdict.INCONCLUSIVE, f"inconclusive: {caveat}: the pairs' intervals cover test sampling only "
                      f"({crit}): {cis}", {**details, "caveat": caveat})
    if 2 * n_diff > m:
        return Ruling(Verdict.REPRODUCED, f"reproduced: {n_diff} of {m} pairs err differently (> half; {crit}): "
                      f"{cis}", details)
    if 2 * n_alike > m:
        return Ruling(Verdict.NOT_REPRODUCED, f"not reproduced: {n_alike} of {m} pairs err alike (> half; {crit}): "
                      f"{cis}", details)
    return Ruling(Verdict.INCONCLUSIVE, f"inconclusive: {n_diff} of {m} pairs err differently, {n_alike} alike, "
                  f"neither more than half ({crit}): {cis}", details)


@dataclass(frozen=True)
class ErrorEvidence:
    """The numbers behind finding 3: each pair of uniform methods' kappa and error overlap with
    simultaneous intervals at ``family_confidence``; ``ctc``: over aligned reference phonemes."""

    pairs: tuple[PairAgreement, ...]
    family_confidence: float
    ctc: bool = False


def decide(configs: dict[str, Config], scorer: Scorer, confidence: float, draws: int,
           note: str = "") -> Finding[ErrorEvidence]:
    """Finding 3 on this study; ``note``: why the report's pairwise table failed, said with a
    finding that could not be run."""
    uniform = sorted((c for c in configs.values() if c.kind == TrialKind.UNIFORM), key=lambda c: c.config_id)
    pairs_in = list(combinations(uniform, 2))
    if not pairs_in:
        return not_run(KEY, CLAIM, "fewer than 2 uniform methods", note)
    family = bonferroni_confidence(confidence, len(pairs_in))
    pairs = []
    for a, b in pairs_in:
        seeds = sorted(set(a.seeds) & set(b.seeds), key=lambda s: (s is None, s))
        if not seeds:
            continue
        pa = [scorer.preds(next(t for t in a.trials if t.seed == s)) for s in seeds]
        pb = [scorer.preds(next(t for t in b.trials if t.seed == s)) for s in seeds]
        pairs.append(scorer.agreement(pa, pb, (a.config_id, b.config_id), family, draws))
    if not pairs:
        return not_run(KEY, CLAIM, "no pair of uniform methods shares a seed", note)
    ruling = rule(pairs, family_confidence=confidence)
    intervals = tuple(iv for p in pairs for iv in (Interval.kappa(p), Interval.overlap(p)))
    need = None
    if ruling.verdict is Verdict.INCONCLUSIVE:  # the kappa and overlap intervals on neither side of 0.8
        need = seeds_needed([(iv, THRESHOLD, THRESHOLD) for iv in intervals
                             if not (iv.high < THRESHOLD or iv.low >= THRESHOLD)])
    return Finding(KEY, CLAIM, ruling.verdict, ruling.rule, intervals, ErrorEvidence(tuple(pairs), family, scorer.ctc),
                   need, tuple(c.config_id for c in uniform))


def pair_row(pair: PairAgreement, family: float) -> dict:
    """One pair as ``summary.json`` holds it (and the decision's ``pairs``)."""
    row = {"a": pair.a, "b": pair.b, "seeds": pair.seeds, "kappa": pair.kappa,
           "kappa_ci_low": pair.kappa_ci_low, "kappa_ci_high": pair.kappa_ci_high,
           "error_overlap": pair.overlap, "overlap_ci_low": pair.overlap_ci_low,
           "overlap_ci_high": pair.overlap_ci_high, "confidence": family, "interval": pair.interval,
           "caveat": pair.caveat}
    s = pair.supporting
    if s is not None:
        row.update({"supporting_interval": s.interval, "supporting_kappa_ci": [s.kappa_ci_low, s.kappa_ci_high],
                    "supporting_overlap_ci": [s.overlap_ci_low, s.overlap_ci_high]})
    return row


def _pair_text(p: PairAgreement) -> str:
    out = (f"{p.a}/{p.b} kappa {p.kappa:.3f} [{p.kappa_ci_low:.3f}, {p.kappa_ci_high:.3f}], "
           f"overlap {p.overlap:.3f} [{p.overlap_ci_low:.3f}, {p.overlap_ci_high:.3f}]")
    s = p.supporting
    if s is not None:
        out += (f" (supporting, {s.interval}: kappa [{s.kappa_ci_low:.3f}, {s.kappa_ci_high:.3f}], overlap "
                f"[{s.overlap_ci_low:.3f}, {s.overlap_ci_high:.3f}])")
    return out


def text(finding: Finding[ErrorEvidence]) -> str:
    """The finding's paragraph: every pair's kappa and error overlap with their intervals."""
    ev = finding.evidence
    if ev is None:
        return not_run_text(finding)
    units = ("reference phonemes (each hypothesis aligned to its reference by Levenshtein; a phoneme is an error "
             "when substituted or deleted, insertions are not counted)" if ev.ctc else "test examples")
    return (f"{len(ev.pairs)} pairs of uniform methods, paired by seed; kappa and error overlap (Jaccard of the error "
            f"sets) over {units}, with simultaneous {ev.family_confidence:.1%} {ev.pairs[0].interval} intervals: "
            + "; ".join(_pair_text(p) for p in ev.pairs) + ".")


def summary(finding: Finding[ErrorEvidence]) -> dict:
    """Finding 3 as ``summary.json`` holds it."""
    ev = finding.evidence
    if ev is None:
        return finding.summary({"text": text(finding)})
    fields = {"text": text(finding), "pairs": [pair_row(p, ev.family_confidence) for p in ev.pairs]}
    if finding.seeds_needed is not None:
        fields["seeds_needed"] = finding.seeds_needed.summary()
    return finding.summary(fields)


def render(finding: Finding[ErrorEvidence], context: ReportContext) -> list[str]:
    """The report's section of finding 3."""
    return render_section(finding, TITLE, text(finding))


def suite_note(stored: Mapping) -> str:
    """What the suite says next to this finding's verdict on a task: nothing more."""
    return ""
