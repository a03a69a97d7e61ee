"""What every finding shares: the verdict, the intervals its rule read, the typed result, the
seeds that would decide it, and the nothing-learned gate.

A finding module (:mod:`.darts_vs_uniform`, :mod:`.ensembles`, :mod:`.error_diversity`) holds one
claim: ``rule(...) -> Ruling`` (the rule, stated in full in its docstring), ``decide(...) ->
Finding`` on a study's trials, ``text(finding)`` (its paragraph) and ``render(finding, context)``
(its Markdown section).  A :class:`Finding` is data only: the verdict, the rule with its numbers,
every interval the rule read as an :class:`Interval`, and the finding's evidence as typed rows,
so any renderer (Markdown today) reads the same objects; ``summary`` gives the plain dict that
``summary.json`` holds.

Example::

    >>> iv = Interval("DARTS - best uniform", 0.004, -0.01, 0.018, 0.95, "seeds x speakers")
    >>> iv.text(), iv.lies_below(0.01), iv.straddles(0.0)
    ('[-0.0100, +0.0180]', False, True)
    >>> f = Finding(FindingKey.DARTS_VS_UNIFORM, "a claim", Verdict.INCONCLUSIVE, "inconclusive: ...", (iv,))
    >>> f.interval is iv, str(hold_back(f, 0.01).verdict)
    (True, 'inconclusive: nothing learned')
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any, Generic, TypeVar

from pefttune.analysis.intervals import Comparison, PairAgreement, percent
from pefttune.analysis.seeds_speakers import Spread, seeds_to_decide

__all__ = ["ASSUMPTION", "Finding", "FindingKey", "Interval", "ReportContext", "Ruling", "SeedsPlan",
           "SeedsToDecide", "Verdict", "check_margin", "comparison_summary", "hold_back", "not_run", "seeds_needed"]


class FindingKey(str, Enum):
    """Which finding: its number in the report (``str(key)`` and f-strings give ``"1"``)."""

    DARTS_VS_UNIFORM = "1"
    ENSEMBLES = "2"
    ERROR_DIVERSITY = "3"

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class Verdict(str, Enum):
    """A finding's verdict, as the report prints it."""

    REPRODUCED = "reproduced"
    NOT_REPRODUCED = "not reproduced"
    PARTLY_REPRODUCED = "partly reproduced"
    INCONCLUSIVE = "inconclusive"
    NOTHING_LEARNED = "inconclusive: nothing learned"  # the gate held the finding's own verdict back
    NOT_RUN = "not run"

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


@dataclass(frozen=True)
class Interval:
    """One interval a rule read: ``name`` (what it estimates), the estimate, ``[low, high]`` at
    ``level``; ``covers`` says what it covers ("seeds x speakers", "examples only: these trained
    models", "speakers only (one seed)"), ``method`` how it was built, ``caveat`` why no verdict
    may rest on it; ``spread`` its seed and speaker variances; ``supporting`` the examples-only
    interval of the same quantity."""

    name: str
    estimate: float
    low: float
    high: float
    level: float
    covers: str
    method: str = ""
    caveat: str = ""
    spread: Spread | None = None
    supporting: "Interval | None" = None

    def text(self) -> str:
        return f"[{self.low:+.4f}, {self.high:+.4f}]"

    def lies_below(self, threshold: float) -> bool:
        return bool(self.high < threshold)

    def lies_above(self, threshold: float) -> bool:
        return bool(self.low > threshold)

    def straddles(self, threshold: float) -> bool:
        return not (self.lies_below(threshold) or self.lies_above(threshold))

    @classmethod
    def of(cls, name: str, c: Comparison) -> "Interval":
        """A comparison's interval of its difference (``diff > 0``: A better)."""
        support = cls.of(name, c.supporting) if c.supporting is not None else None
        return cls(name, c.diff, c.ci_low, c.ci_high, c.confidence, c.interval, c.method, c.caveat, c.spread, support)

    @classmethod
    def kappa(cls, p: PairAgreement) -> "Interval":
        support = cls.kappa(p.supporting) if p.supporting is not None else None
        return cls(f"{p.a}/{p.b} kappa", p.kappa, p.kappa_ci_low, p.kappa_ci_high, p.confidence, p.interval,
                   "", p.caveat, p.kappa_spread, support)

    @classmethod
    def overlap(cls, p: PairAgreement) -> "Interval":
        support = cls.overlap(p.supporting) if p.supporting is not None else None
        return cls(f"{p.a}/{p.b} overlap", p.overlap, p.overlap_ci_low, p.overlap_ci_high, p.confidence, p.interval,
                   "", p.caveat, p.overlap_spread, support)


@dataclass(frozen=True)
class Ruling:
    """What a finding's rule says: the verdict, the rule with its numbers, and what it read."""

    verdict: Verdict
    rule: str
    details: Mapping[str, Any] = field(default_factory=dict)


#: How :func:`seeds_needed` counts seeds, as the report states it.
ASSUMPTION = ("assuming the true difference is the observed mean and the seed and speaker variances stay as "
              "measured: the smallest n seeds per configuration with t_{n-1} x sqrt(seed variance / n + speaker "
              "variance) below the distance from the mean to the threshold the interval must clear")


@dataclass(frozen=True)
class SeedsToDecide:
    """Seeds per configuration that would decide one interval (``n`` None: none would, ``reason``)."""

    interval: str
    n: int | None
    gap: float
    reason: str


@dataclass(frozen=True)
class SeedsPlan:
    """Seeds per configuration that would decide a finding: the largest ``n`` of its undecided
    intervals, None when one of them cannot be decided by seeds."""

    n: int | None
    intervals: tuple[SeedsToDecide, ...]
    assumption: str = ASSUMPTION

    def summary(self) -> dict:
        return {"n": self.n, "intervals": [asdict(r) for r in self.intervals], "assumption": self.assumption}


def seeds_needed(items: Sequence[tuple[Interval, float, float]]) -> SeedsPlan:
    """For each undecided ``(interval, low, high)`` (deciding = lying above ``low`` or below
    ``high``), :func:`~pefttune.analysis.seeds_speakers.seeds_to_decide`; the finding needs the
    largest n (every such interval cleared)."""
    rows = []
    for iv, low, high in items:
        need = seeds_to_decide(iv.estimate, iv.spread, iv.level, low, high)
        rows.append(SeedsToDecide(iv.name, need.n, need.gap, need.reason))
    ns = [r.n for r in rows]
    return SeedsPlan(max(ns) if rows and all(x is not None for x in ns) else None, tuple(rows))


E = TypeVar("E")


@dataclass(frozen=True)
class Finding(Generic[E]):
    """One finding decided on one study.

    ``intervals``: every interval the rule read, the headline first (:attr:`interval`);
    ``evidence``: the finding's own typed numbers (None when not run); ``seeds_needed``: what
    would decide it while inconclusive; ``compares``: the configurations it compares (what one
    more seed would train); ``beyond_seeds``: why more seeds cannot change the verdict ("" when
    they may); ``held_back``: its own ruling when the nothing-learned gate held it back;
    ``reason``: why it was not run, ``note``: a supporting computation's failure said with it."""

    key: FindingKey
    claim: str
    verdict: Verdict
    rule: str
    intervals: tuple[Interval, ...] = ()
    evidence: E | None = None
    seeds_needed: SeedsPlan | None = None
    compares: tuple[str, ...] = ()
    beyond_seeds: str = ""
    held_back: Ruling | None = None
    reason: str = ""
    note: str = ""

    @property
    def interval(self) -> Interval | None:
        """The headline interval (the first the rule read), None when not run."""
        return self.intervals[0] if self.intervals else None

    @property
    def open(self) -> bool:
        """Inconclusive, or held back by the gate, for a reason more seeds may change."""
        return self.verdict in (Verdict.INCONCLUSIVE, Verdict.NOTHING_LEARNED) and not self.beyond_seeds

    def summary(self, fields: Mapping[str, Any], trailing: Mapping[str, Any] | None = None) -> dict:
        """The dict of ``summary.json``: number, claim, verdict and rule, then the finding's
        ``fields``, its own ruling when held back, then ``trailing``."""
        out = {"finding": int(self.key.value), "claim": self.claim, "verdict": self.verdict, "rule": self.rule,
               **fields}
        if self.held_back is not None:
            out["own_verdict"], out["own_rule"] = self.held_back.verdict, self.held_back.rule
        return {**out, **(trailing or {})}


def not_run(key: FindingKey, claim: str, reason: str, note: str = "") -> Finding:
    """A finding that could not be decided on this study, and why."""
    return Finding(key, claim, Verdict.NOT_RUN, f"not run: {reason}", reason=reason, note=note)


def not_run_text(finding: Finding) -> str:
    return finding.reason + (f" ({finding.note})" if finding.note else "")


def hold_back(finding: Finding, margin: float) -> Finding:
    """The nothing-learned gate: no configuration beats the trivial reference by more than
    ``margin``, so the finding's own verdict is held back (a finding not run stays so)."""
    if finding.verdict is Verdict.NOT_RUN:
        return finding
    rule = (f"inconclusive: nothing learned: no configuration beats the trivial reference by more than delta = "
            f"+{margin:.4f}; the finding's own rule said: {finding.rule}")
    return replace(finding, verdict=Verdict.NOTHING_LEARNED, rule=rule, held_back=Ruling(finding.verdict, finding.rule))


def check_margin(margin: float) -> float:
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    return float(margin)


def ci_name(c: Comparison) -> str:
    """e.g. "95% seeds x speakers CI": the confidence and what the interval covers."""
    return f"{percent(c.confidence)} {c.interval} CI"


def first_caveat(items: Sequence[Any]) -> str:
    """The first caveat among intervals (comparisons or pair agreements), "" when none."""
    return next((x.caveat for x in items if getattr(x, "caveat", "")), "")


def supporting_text(c: Comparison) -> str:
    s = c.supporting
    return f" (supporting, {s.interval}: {s.ci_text()})" if s is not None else ""


def comparison_summary(c: Comparison | None) -> dict | None:
    """A comparison as ``summary.json`` holds it."""
    if c is None:
        return None
    return {"diff": c.diff, "ci_low": c.ci_low, "ci_high": c.ci_high, "p_value": c.p_value, "confidence": c.confidence,
            "mean_a": c.mean_a, "mean_b": c.mean_b, "seeds_a": c.seeds_a, "seeds_b": c.seeds_b,
            "n_examples": c.n_examples, "method": c.method, "interval": c.interval, "caveat": c.caveat,
            "spread": asdict(c.spread) if c.spread is not None else None,
            "supporting": comparison_summary(c.supporting)}


@dataclass(frozen=True)
class ReportContext:
    """What a finding's section needs of its study: the metric, its direction, the task."""

    metric: str
    mode: str = "max"
    task: str = "classification"

    @property
    def paired_test(self) -> str:
        return ("McNemar" if self.task == "classification" else
                "sign test on per-utterance edit counts: b = utterances with fewer edits, c = more")


def render_section(finding: Finding, title: str, text: str) -> list[str]:
    """The head of a finding's section: title and verdict, its paragraph, its rule, the seeds
    that would decide it."""
    lines = [f"### Finding {finding.key}: {title} -- {finding.verdict}", "", text, "", f"Rule: {finding.rule}", ""]
    need = finding.seeds_needed
    if need is None or not need.intervals or finding.verdict is not Verdict.INCONCLUSIVE:
        return lines
    each = "; ".join(f"{r.interval}: " + (f"n = {r.n}" if r.n is not None else f"none ({r.reason})")
                     + f" (distance to the threshold {r.gap:+.4f})" for r in need.intervals)
    head = f"**{need.n} seeds per configuration**" if need.n is not None else "no number of seeds alone"
    return lines + [f"Seeds to decide it: {head} ({need.assumption}): {each}.", ""]
