"""What PEFT and the SSL encoder add, and the nothing-learned gate every finding passes first.

Every configuration is compared with the trivial reference (classification: always the most
frequent dev label; CTC: an all-blank output, PER 1).  When none beats it by more than the
margin, nothing was learned and every finding is *inconclusive: nothing learned*
(:func:`nothing_learned`, :func:`~pefttune.analysis.findings._base.hold_back`).  The best
uniform configuration against the frozen and log-mel rows says what PEFT and the encoder add;
the hybrid against the best uniform is this study's own result (no claim of the paper rests on it).

Example::

    >>> from pefttune.analysis.intervals import Comparison
    >>> flat = {"uniform:lora": Comparison(0.004, -0.01, 0.012, 0.5, "t", 600, 3, 1)}
    >>> nothing_learned(flat, margin=0.01)
    True
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pefttune.analysis.findings._base import check_margin, comparison_summary
from pefttune.analysis.findings._inputs import Config, Scorer, best_config
from pefttune.analysis.intervals import Comparison
from pefttune.analysis.markdown import fmt
from pefttune.analysis.store import ResultsStore
from pefttune.schema import TrialKind

__all__ = ["REFERENCE_KINDS", "HybridRow", "References", "compare_references", "hybrid_row", "nothing_learned",
           "render"]

REFERENCE_KINDS = (TrialKind.FROZEN, TrialKind.LOG_MEL)


def nothing_learned(vs_reference: Mapping[str, Comparison], margin: float) -> bool:
    """True when no configuration beats its reference (frozen, log-mel, chance, all-blank) by
    more than the margin: no ``vs_reference[name]`` (configuration - reference, ``diff > 0``:
    better) has ``ci_low > margin``."""
    margin = check_margin(margin)
    if len(vs_reference) == 0:
        raise ValueError("vs_reference must hold at least one configuration-vs-reference comparison")
    return not any(c.lies_above(margin) for c in vs_reference.values())


@dataclass(frozen=True)
class References:
    """Each configuration minus the trivial reference (``vs_trivial``, the gate), the best uniform
    minus frozen and minus log-mel, and the hybrid minus the best uniform (None: not in the study)."""

    vs_trivial: Mapping[str, Comparison]
    uniform_vs_frozen: Comparison | None = None
    uniform_vs_log_mel: Comparison | None = None
    hybrid_vs_uniform: Comparison | None = None

    def summary(self) -> dict:
        out: dict = {"vs_trivial": {cid: comparison_summary(c) for cid, c in self.vs_trivial.items()}}
        for name, c in (("uniform_vs_frozen", self.uniform_vs_frozen), ("uniform_vs_log-mel", self.uniform_vs_log_mel),
                        ("hybrid_vs_uniform", self.hybrid_vs_uniform)):
            if c is not None:
                out[name] = comparison_summary(c)
        return out


def compare_references(experiment: ResultsStore, configs: dict[str, Config], scorer: Scorer, confidence: float,
                       draws: int) -> References:
    """Every configuration vs the trivial reference (the nothing-learned gate), and the best
    uniform configuration vs the frozen and log-mel rows, the hybrid vs the best uniform."""
    trivial = scorer.trivial()
    vs_trivial = {cid: scorer.compare(scorer.config(c), trivial, confidence, draws, c.seeds, fixed_b=True)
                  for cid, c in configs.items() if c.kind not in REFERENCE_KINDS}
    uniform = best_config(experiment, configs, TrialKind.UNIFORM)
    versus = {}
    for ref in REFERENCE_KINDS:
        config = configs.get(ref)
        if config is not None and uniform is not None:
            versus[ref] = scorer.compare_configs(uniform, config, confidence, draws)
    hybrid = configs.get(TrialKind.HYBRID)
    hybrid_vs = scorer.compare_configs(hybrid, uniform, confidence, draws) if hybrid and uniform else None
    return References(vs_trivial, versus.get(TrialKind.FROZEN), versus.get(TrialKind.LOG_MEL), hybrid_vs)


@dataclass(frozen=True)
class HybridRow:
    """This study's hybrid (methods merged in each layer) minus the best uniform configuration,
    with both parameter counts."""

    hybrid: str  # the hybrid's placement
    hybrid_params: int | None
    uniform: str  # the best uniform configuration's id
    uniform_params: int | None
    comparison: Comparison

    def summary(self) -> dict:
        return {"hybrid": self.hybrid, "hybrid_params": self.hybrid_params, "uniform": self.uniform,
                "uniform_params": self.uniform_params, **comparison_summary(self.comparison)}


def hybrid_row(experiment: ResultsStore, configs: dict[str, Config], references: References | None) -> HybridRow | None:
    """The hybrid against the best uniform configuration (None without either)."""
    hybrid, uniform = configs.get(TrialKind.HYBRID), best_config(experiment, configs, TrialKind.UNIFORM)
    if hybrid is None or uniform is None or references is None or references.hybrid_vs_uniform is None:
        return None
    return HybridRow(hybrid.placement_short, hybrid.trainable_params, uniform.config_id, uniform.trainable_params,
                     references.hybrid_vs_uniform)


def _with_supporting(c: Comparison) -> str:
    text = f"{c.diff:+.4f} [{c.ci_low:+.4f}, {c.ci_high:+.4f}] ({c.interval})"
    if c.caveat:
        text += f", {c.caveat}"
    s = c.supporting
    if s is not None:
        text += f"; supporting, {s.interval}: [{s.ci_low:+.4f}, {s.ci_high:+.4f}]"
    return text


def render(references: References | None, hybrid: HybridRow | None, metric: str) -> list[str]:
    """The report's "References" and "Hybrid" sections."""
    lines, ref_lines = [], []
    if references is not None:
        for c, label in ((references.uniform_vs_frozen, "best uniform minus frozen (what PEFT adds)"),
                         (references.uniform_vs_log_mel, "best uniform minus log-mel (what the SSL encoder adds)")):
            if c is not None:
                ref_lines.append(f"- {label}: {_with_supporting(c)}")
        if references.vs_trivial:
            ref_lines.append("- the nothing-learned check, each configuration minus the trivial reference (most "
                             "frequent label; CTC: all blank): " + "; ".join(
                                 f"`{cid}` {_with_supporting(c)}" for cid, c in references.vs_trivial.items()))
    if references is not None and references.uniform_vs_log_mel is not None:
        ref_lines.append("- `log-mel` is the study's head on log-mel frames: like every row's head it pools their "
                         "mean over time; a classifier on the mean and standard deviation of each band sees more "
                         "(benchmarks/README.md, \"References against converged probes\", compares both with "
                         "converged linear probes)")
    if ref_lines:
        lines += ["## References", ""] + ref_lines + [""]
    if hybrid is not None:
        c = hybrid.comparison
        lines += ["## Hybrid (merged in each layer) vs the best uniform", "",
                  f"This experiment's result, not a claim of the paper: the hybrid ({hybrid.hybrid}, "
                  f"{fmt(hybrid.hybrid_params)} trainable parameters) minus the best uniform configuration "
                  f"`{hybrid.uniform}` ({fmt(hybrid.uniform_params)} trainable parameters): test {metric} "
                  f"{_with_supporting(c)} ({c.confidence:.0%}; {c.method.split(';')[0]}).", ""]
    return lines
