"""The three findings decided on one study, with the references and the nothing-learned gate.

:func:`decide` reads the study's trials once (:mod:`._inputs`), decides each finding in its own
module, compares every configuration with the trivial reference, and holds every verdict back
when nothing was learned.  :class:`Decision` is the typed result; :meth:`Decision.summary` is
the plain dict ``summary.json`` keeps, :func:`render` the report's findings section.

Example::

    decision = decide(open_results("pefttune-results/embedded-ks"), draws=2000)
    decision.findings[FindingKey.ENSEMBLES].verdict   # Verdict.INCONCLUSIVE
    decision.findings[FindingKey.ENSEMBLES].interval  # the vote's gain over its best member
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from pefttune.analysis.findings import darts_vs_uniform, ensembles, error_diversity
from pefttune.analysis.findings._base import Finding, FindingKey, ReportContext, hold_back
from pefttune.analysis.findings._inputs import (
    Config, Scorer, SequentialLook, Units, configurations, sequential_look, units,
)
from pefttune.analysis.findings.references import (
    HybridRow, References, compare_references, hybrid_row, nothing_learned,
)
from pefttune.analysis.sequential import SequentialDesign
from pefttune.analysis.store import ResultsStore

__all__ = ["Decision", "MODULES", "decide", "render"]

#: Each finding's module: its ``decide``, ``text``, ``summary``, ``render`` and ``suite_note``.
MODULES = {m.KEY: m for m in (darts_vs_uniform, ensembles, error_diversity)}


@dataclass(frozen=True)
class Decision:
    """The findings of one study (by :class:`FindingKey`, in report order), whether anything was
    learned, the settings they were decided with, the references, and what the intervals resample."""

    findings: Mapping[FindingKey, Finding]
    learned: bool
    margin: float
    confidence: float
    draws: int
    interval: str
    configs: Mapping[str, Config] = field(default_factory=dict)
    references: References | None = None
    hybrid: HybridRow | None = None
    sequential: SequentialLook | None = None
    units: Units = Units()

    def pairs(self) -> list[dict]:
        """Finding 3's method pairs as rows (empty when it was not run)."""
        f = self.findings.get(FindingKey.ERROR_DIVERSITY)
        if f is None or f.evidence is None:
            return []
        return [error_diversity.pair_row(p, f.evidence.family_confidence) for p in f.evidence.pairs]

    def summary(self) -> dict:
        """The decision as ``summary.json`` keeps it (findings keyed "1", "2", "3")."""
        return {
            "findings": {str(k): MODULES[k].summary(f) for k, f in self.findings.items()},
            "learned": self.learned,
            "hybrid": self.hybrid.summary() if self.hybrid is not None else None,
            "margin": self.margin,
            "confidence": self.confidence,
            "draws": self.draws,
            "interval": self.interval,
            "sequential": asdict(self.sequential) if self.sequential is not None else None,
            **asdict(self.units),
            "pairs": self.pairs(),
            "references": self.references.summary() if self.references is not None else {},
            "configs": {cid: {"kind": c.kind, "seeds": c.seeds, "dev_mean": c.dev_mean,
                              "trials": [t.trial_id for t in c.trials]} for cid, c in self.configs.items()},
        }


def decide(experiment: ResultsStore, margin: float = 0.01, confidence: float = 0.95, draws: int = 2000,
           converged_entropy: float = 0.7, alpha=None, interval: str = "seeds-speakers",
           design: SequentialDesign | None = None, notes: Mapping[FindingKey, str] | None = None) -> Decision:
    """All three findings with their rules, the reference comparisons and the nothing-learned gate.
    ``interval`` (``analysis.interval``): ``seeds-speakers`` (default) or ``examples``. With a
    ``design`` (``analysis.max_seeds``: seeds added while a finding is open), every interval is
    taken at the level the design spends at this look (the seeds every uniform method has).
    ``notes``: why a supporting computation of the report failed, said with a finding not run."""
    configs = configurations(experiment)
    sequential = None
    if design is not None:
        sequential = sequential_look(design, configs)
        confidence = sequential.confidence
    scorer = Scorer(experiment, interval)
    notes = notes or {}
    convergence = darts_vs_uniform.darts_convergence(alpha, converged_entropy)
    findings = {
        FindingKey.DARTS_VS_UNIFORM: darts_vs_uniform.decide(experiment, configs, scorer, convergence, margin,
                                                             confidence, draws),
        FindingKey.ENSEMBLES: ensembles.decide(experiment, configs, scorer, margin, confidence, draws,
                                               notes.get(FindingKey.ENSEMBLES, "")),
        FindingKey.ERROR_DIVERSITY: error_diversity.decide(configs, scorer, confidence, draws,
                                                           notes.get(FindingKey.ERROR_DIVERSITY, "")),
    }
    references, learned = None, True
    if configs and scorer.ref is not None:
        references = compare_references(experiment, configs, scorer, confidence, draws)
        if references.vs_trivial:
            learned = not nothing_learned(references.vs_trivial, margin)
    if not learned:
        findings = {key: hold_back(f, margin) for key, f in findings.items()}
    return Decision(findings, learned, margin, confidence, draws, interval, configs, references,
                    hybrid_row(experiment, configs, references), sequential, units(scorer))


def render(decision: Decision, context: ReportContext) -> list[str]:
    """The report's findings: a table of verdicts, the rules (a list: they are long), then each
    finding's section."""
    lines = ["## Findings of Lin et al. 2024 on this experiment", "", "| # | claim | verdict |", "|---|---|---|"]
    lines += [f"| {key} | {f.claim} | **{f.verdict}** |" for key, f in decision.findings.items()]
    lines += ["", "The rules (each finding's section repeats its own):", ""]
    lines += [f"- {key}: {f.rule}" for key, f in decision.findings.items()]
    lines.append("")
    if not decision.learned:
        lines += ["**Nothing learned**: no configuration beats the trivial reference (most frequent label; CTC: "
                  "all blank) by more than the margin, so no finding is judged.", ""]
    for key, f in decision.findings.items():
        lines += MODULES[key].render(f, context)
    return lines
