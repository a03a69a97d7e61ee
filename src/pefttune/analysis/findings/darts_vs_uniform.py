"""Finding 1: "DARTS over per-layer placement does not beat uniform placement".

The best DARTS-derived configuration against the best uniform one, both chosen by their mean
dev score over seeds, compared on test (:func:`rule`); inconclusive while the relaxation has not
converged (final mean normalised entropy of alpha above ``darts.converged_entropy``, default
0.7, for any search: :func:`darts_convergence`).  Supporting: each DARTS search's derived
placement (:func:`darts_searches`), how far the seeds' placements agree
(:func:`placement_agreement`), and an exact paired test per seed (McNemar; CTC: the sign test
on per-utterance edit counts).

Example::

    >>> from pefttune.analysis.intervals import Comparison
    >>> ruling = rule(Comparison(-0.01, -0.03, 0.005, 0.4, "t", 600, 3, 3), margin=0.01, converged=True)
    >>> str(ruling.verdict), ruling.rule.endswith("[-0.0300, +0.0050] (diff -0.0100) lies below +delta = +0.0100")
    ('reproduced', True)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from pefttune.analysis.ensemble_runner import errors, gain, load_members, score
from pefttune.analysis.findings._base import (
    Finding, FindingKey, Interval, ReportContext, Ruling, Verdict, check_margin, ci_name, comparison_summary,
    not_run, not_run_text, render_section, seeds_needed, supporting_text,
)
from pefttune.analysis.findings._inputs import Config, Scorer, best_config
from pefttune.analysis.intervals import Comparison, sign_test
from pefttune.analysis.markdown import fmt, fmt_p, md_table
from pefttune.analysis.store import MissingPredictionsError, ResultsStore, TrialRecord
from pefttune.placement import Placement
from pefttune.schema import TrialKind

__all__ = ["CLAIM", "Convergence", "DartsEvidence", "DartsSearch", "KEY", "PairedTest", "PlacementAgreement",
           "SearchConvergence", "TITLE", "darts_convergence", "darts_searches", "decide", "placement_agreement",
           "render", "rule", "suite_note", "summary", "text"]

KEY = FindingKey.DARTS_VS_UNIFORM
CLAIM = "DARTS over per-layer placement does not beat uniform placement"
TITLE = "DARTS vs uniform placement"
UNCONVERGED = "the DARTS relaxation did not converge: more retrains do not make it converge"


def rule(comparison: Comparison, margin: float, converged: bool) -> Ruling:
    """Finding 1, "the DARTS-derived placement does not beat the best uniform".

    ``comparison`` = DARTS - best uniform (``diff > 0``: DARTS better); delta = ``margin``.  In order:
    * relaxation not converged -> "inconclusive" (the derived placement is an argmax over noise);
    * the interval has a caveat (one seed) -> "inconclusive", the caveat stated;
    * ``ci_low > 0`` -> "not reproduced" (DARTS better; also when ``ci_high < +delta``: a
      significant gain is reported as one even when it is smaller than delta);
    * ``ci_high < +delta`` -> "reproduced" (DARTS is not better by delta or more);
    * otherwise "inconclusive" (the interval straddles 0 or +delta).
    """
    margin, c = check_margin(margin), comparison
    dm = f"+{margin:.4f}"
    details = {"diff": c.diff, "ci_low": c.ci_low, "ci_high": c.ci_high, "margin": margin,
               "confidence": c.confidence, "converged": bool(converged), "p_value": c.p_value}
    head = f"the {ci_name(c)} of DARTS - best uniform {c.ci_text()} (diff {c.diff:+.4f})"
    if not converged:
        return Ruling(Verdict.INCONCLUSIVE, f"inconclusive: the DARTS relaxation did not converge, so the derived "
                      f"placement is not a search result; {head} is not used (delta = {dm})", details)
    if c.caveat:
        return Ruling(Verdict.INCONCLUSIVE, f"inconclusive: {c.caveat}: {head} covers test sampling only "
                      f"(delta = {dm})", {**details, "caveat": c.caveat})
    if c.lies_above(0.0):
        extra = f", though by less than delta = {dm}" if c.lies_below(margin) else ""
        return Ruling(Verdict.NOT_REPRODUCED, f"not reproduced: {head} lies above 0: DARTS is better{extra}", details)
    if c.lies_below(margin):
        return Ruling(Verdict.REPRODUCED, f"reproduced: {head} lies below +delta = {dm}", details)
    return Ruling(Verdict.INCONCLUSIVE, f"inconclusive: {head} is neither below +delta = {dm} nor above 0", details)


# --------------------------------------------------------------------------- evidence
@dataclass(frozen=True)
class SearchConvergence:
    """One DARTS search's final epoch: mean normalised entropy H/ln K over layers, the smallest
    top-2 margin, each layer's H/ln K, and the layers above the threshold."""

    entropy_norm_mean: float
    margin_min: float
    epoch: int
    entropy_norm: Mapping[int, float]
    unconverged_layers: tuple[int, ...]

    def summary(self) -> dict:
        return {"entropy_norm_mean": self.entropy_norm_mean, "margin_min": self.margin_min, "epoch": self.epoch,
                "entropy_norm": dict(self.entropy_norm), "unconverged_layers": list(self.unconverged_layers)}


@dataclass(frozen=True)
class Convergence:
    """Whether every DARTS search converged (``reason``: why nothing could be said)."""

    converged: bool
    threshold: float | None = None
    worst_entropy_norm_mean: float | None = None
    trials: Mapping[str, SearchConvergence] = field(default_factory=dict)
    reason: str = ""

    def summary(self) -> dict:
        if self.reason:
            return {"converged": self.converged, "reason": self.reason, "trials": {}}
        return {"converged": self.converged, "threshold": self.threshold,
                "worst_entropy_norm_mean": self.worst_entropy_norm_mean,
                "trials": {t: v.summary() for t, v in self.trials.items()}}


def darts_convergence(alpha: Any, threshold: float = 0.7) -> Convergence:
    """Convergence of every DARTS search trial from the alpha table (``trial_id``, ``epoch``,
    ``layer``, ``method``, ``prob``): the final epoch's normalised entropy H/ln K per layer,
    averaged over layers, and the smallest top-2 margin. Converged when every trial's final
    mean normalised entropy is at most ``threshold``. A layer whose own final H/ln K is above
    ``threshold`` is listed in the trial's ``unconverged_layers``: its argmax is close to a coin
    flip, whatever the average says."""
    if alpha is None or len(alpha) == 0:
        return Convergence(False, reason="no alpha history")
    trials = {}
    for trial_id, rows in alpha.groupby("trial_id"):
        last = rows[rows["epoch"] == rows["epoch"].max()]
        entropies, margins = {}, []
        for layer, probs in last.groupby("layer"):
            p = probs["prob"].to_numpy(dtype=np.float64)
            p = p / p.sum() if p.sum() > 0 else p
            k = len(p)
            nz = p[p > 0]
            entropies[int(layer)] = float(-(nz * np.log(nz)).sum() / math.log(k)) if k > 1 else 0.0
            top = np.sort(p)[::-1]
            margins.append(float(top[0] - top[1]) if k > 1 else 1.0)
        trials[str(trial_id)] = SearchConvergence(
            float(np.mean(list(entropies.values()))), float(np.min(margins)), int(last["epoch"].iloc[0]), entropies,
            tuple(k for k, h in sorted(entropies.items()) if h > threshold))
    converged = all(t.entropy_norm_mean <= threshold for t in trials.values())
    worst = max(t.entropy_norm_mean for t in trials.values())
    return Convergence(converged, threshold, worst, trials)


@dataclass(frozen=True)
class DartsSearch:
    """One finished DARTS search: its seed, derived placement (``placement`` marks a layer whose
    relaxation did not converge with ``?``), and the test score of its retrain with its seed."""

    trial_id: str
    seed: int | None
    variant: str
    layers: tuple[str, ...]
    placement: str
    entropy_norm_mean: float | None
    unconverged_layers: tuple[int, ...]
    retrain_test: float | None

    def summary(self) -> dict:
        return {**asdict(self), "layers": list(self.layers), "unconverged_layers": list(self.unconverged_layers)}


def darts_searches(experiment: ResultsStore, convergence: Convergence) -> tuple[DartsSearch, ...]:
    """One row per finished DARTS search, by variant and seed."""
    retrained = {}
    for t in experiment.trials:
        if t.kind == TrialKind.DARTS_DERIVED and t.usable:
            for source in t.config.get("derived_from") or []:
                retrained[str(source).split()[0]] = t
    rows = []
    for t in experiment.trials:
        text = t.value("derived_placement")
        if t.kind != TrialKind.DARTS or not text:
            continue
        conv = convergence.trials.get(t.trial_id)
        layers = Placement.from_json(text).layer_methods()
        flagged = set(conv.unconverged_layers) if conv is not None else set()
        retrain = retrained.get(t.trial_id)
        rows.append(DartsSearch(
            t.trial_id, t.seed, t.value("variant") or "", tuple(layers),
            " ".join(f"L{i}:{m}" + ("?" if i in flagged else "") for i, m in enumerate(layers)),
            conv.entropy_norm_mean if conv is not None else None, tuple(sorted(flagged)),
            experiment.score(retrain, "test") if retrain is not None else None))
    return tuple(sorted(rows, key=lambda r: (str(r.variant), r.seed if r.seed is not None else -1)))


@dataclass(frozen=True)
class PlacementAgreement:
    """How far the seeds' derived placements agree: the mean share of layers two searches give the
    same method, and the layers whose method is the same in every search."""

    searches: int
    pairwise_same_layers_mean: float
    layers_in_common: tuple[int, ...]
    num_layers: int

    def summary(self) -> dict:
        return {**asdict(self), "layers_in_common": list(self.layers_in_common)}


def placement_agreement(layers: Sequence[Sequence[str]]) -> PlacementAgreement | None:
    """:class:`PlacementAgreement` of the searches' per-layer methods; None for fewer than two
    searches or placements of different depths."""
    layers = [list(x) for x in layers if x]
    if len(layers) < 2 or len({len(x) for x in layers}) != 1:
        return None
    pairs = [(a, b) for i, a in enumerate(layers) for b in layers[i + 1:]]
    shares = [float(np.mean([x == y for x, y in zip(a, b)])) for a, b in pairs]
    common = tuple(i for i in range(len(layers[0])) if len({x[i] for x in layers}) == 1)
    return PlacementAgreement(len(layers), float(np.mean(shares)), common, len(layers[0]))


@dataclass(frozen=True)
class PairedTest:
    """Supporting, per seed: the DARTS-derived trial ``a`` against the uniform trial ``b`` on
    their common test examples, with the exact paired test (McNemar; CTC: the sign test on
    per-utterance edit counts: ``mcnemar_b`` utterances with fewer edits, ``mcnemar_c`` more)."""

    seed: int | None
    a: str
    b: str
    a_test: float
    b_test: float
    mcnemar_b: int
    mcnemar_c: int
    mcnemar_p: float
    n: int
    gain: float


def _test_eval(experiment: ResultsStore, trial: TrialRecord) -> tuple[float, np.ndarray, np.ndarray] | None:
    """(test score, example index, per-example errors) from stored predictions (None if missing)."""
    try:
        data = load_members(experiment, [trial], "test")
    except MissingPredictionsError:
        return None
    ref = data.labels if experiment.task == "classification" else data.refs
    preds = data.preds(0)
    return score(experiment, preds, ref), data.index, errors(experiment.task, preds, ref)


def paired_tests(experiment: ResultsStore, a: list[TrialRecord], b: list[TrialRecord]) -> tuple[PairedTest, ...]:
    """:class:`PairedTest` of ``a`` against ``b`` for every seed both have stored predictions of."""
    by_seed = {t.seed: t for t in b}
    rows = []
    for trial in a:
        other = by_seed.get(trial.seed)
        ea, eb = (_test_eval(experiment, t) for t in (trial, other)) if other is not None else (None, None)
        if ea is None or eb is None:
            continue
        common, ia, ib = np.intersect1d(ea[1], eb[1], return_indices=True)
        mb, mc, p = sign_test(ea[2][ia], eb[2][ib])
        rows.append(PairedTest(trial.seed, trial.trial_id, other.trial_id, ea[0], eb[0], mb, mc, p,
                               int(common.shape[0]), gain(ea[0], eb[0], experiment.mode)))
    return tuple(rows)


@dataclass(frozen=True)
class DartsEvidence:
    """The numbers behind finding 1: DARTS - best uniform (``comparison``), which configurations,
    the relaxation's convergence, the searches, and the supporting per-seed tests."""

    comparison: Comparison
    darts_config: str
    darts_placement: str
    darts_seeds: tuple
    uniform_config: str
    uniform_seeds: tuple
    convergence: Convergence
    metric: str
    discrete_config: str | None = None
    discrete_vs_uniform: Comparison | None = None
    searches: tuple[DartsSearch, ...] = ()
    agreement: PlacementAgreement | None = None
    derived_is_uniform: bool = False
    paired_tests: tuple[PairedTest, ...] = ()


# --------------------------------------------------------------------------- decide
def decide(experiment: ResultsStore, configs: dict[str, Config], scorer: Scorer, convergence: Convergence,
           margin: float, confidence: float, draws: int) -> Finding[DartsEvidence]:
    """Finding 1 on this study: not run without a uniform and a DARTS-derived configuration."""
    uniform = best_config(experiment, configs, TrialKind.UNIFORM)
    darts = best_config(experiment, configs, TrialKind.DARTS_DERIVED)
    if uniform is None or darts is None:
        missing = "uniform baselines" if uniform is None else "DARTS-derived (retrained) placements"
        searches = sum(t.kind == TrialKind.DARTS for t in experiment.trials)
        extra = (f" ({searches} DARTS search trial(s) found, but no retrained placement)"
                 if searches and darts is None else "")
        return not_run(KEY, CLAIM, f"this experiment has no completed {missing}{extra}")
    cmp = scorer.compare_configs(darts, uniform, confidence, draws)
    ruling = rule(cmp, margin, convergence.converged)
    discrete = best_config(experiment, configs, TrialKind.DISCRETE)
    searches = darts_searches(experiment, convergence)
    evidence = DartsEvidence(
        cmp, darts.config_id, darts.placement_short, tuple(darts.seeds), uniform.config_id, tuple(uniform.seeds),
        convergence, experiment.metric, discrete.config_id if discrete is not None else None,
        scorer.compare_configs(discrete, uniform, confidence, draws) if discrete is not None else None,
        searches, placement_agreement([s.layers for s in searches]),
        darts.placement_short == uniform.placement_short,  # the same placement with the same seeds: diff 0
        paired_tests(experiment, darts.trials, uniform.trials))
    interval = Interval.of("DARTS - best uniform", cmp)
    need = None
    if ruling.verdict is Verdict.INCONCLUSIVE and convergence.converged:
        need = seeds_needed([(interval, 0.0, margin)])
    return Finding(KEY, CLAIM, ruling.verdict, ruling.rule, (interval,), evidence, need,
                   (darts.config_id, uniform.config_id), "" if convergence.converged else UNCONVERGED)


# --------------------------------------------------------------------------- render
def text(finding: Finding[DartsEvidence]) -> str:
    """The finding's paragraph: what was compared and the interval of the difference."""
    ev = finding.evidence
    if ev is None:
        return not_run_text(finding)
    c = ev.comparison
    out = (f"Best DARTS-derived `{ev.darts_config}` ({ev.darts_placement}, seeds {list(ev.darts_seeds)}) minus "
           f"best uniform `{ev.uniform_config}` (seeds {list(ev.uniform_seeds)}): {c.ci_text()} ({c.interval}; "
           f"test {ev.metric} {c.mean_a:.4f} vs {c.mean_b:.4f}){supporting_text(c)}.")
    if ev.derived_is_uniform:
        out += (" DARTS derived the best uniform placement itself, so this compares one configuration with "
                "itself: DARTS found nothing better than uniform, and the interval says no more than that.")
    return out


def summary(finding: Finding[DartsEvidence]) -> dict:
    """Finding 1 as ``summary.json`` holds it."""
    ev = finding.evidence
    if ev is None:
        return finding.summary({"text": text(finding)})
    fields: dict = {"comparison": comparison_summary(ev.comparison), "darts_config": ev.darts_config,
                    "uniform_config": ev.uniform_config, "convergence": ev.convergence.summary()}
    if ev.discrete_config is not None:
        fields["discrete_config"] = ev.discrete_config
        fields["discrete_vs_uniform"] = comparison_summary(ev.discrete_vs_uniform)
    fields["text"] = text(finding)
    if finding.seeds_needed is not None:
        fields["seeds_needed"] = finding.seeds_needed.summary()
    fields.update({"by_seed": [s.summary() for s in ev.searches],
                   "agreement": ev.agreement.summary() if ev.agreement is not None else None,
                   "derived_is_uniform": ev.derived_is_uniform})
    return finding.summary(fields, {"mcnemar_by_seed": [asdict(r) for r in ev.paired_tests]})


def render(finding: Finding[DartsEvidence], context: ReportContext) -> list[str]:
    """The report's section of finding 1."""
    lines = render_section(finding, TITLE, text(finding))
    ev = finding.evidence
    if ev is None:
        return lines
    conv = ev.convergence
    if conv.trials:
        lines += [f"DARTS convergence (final mean normalised entropy H/ln K of alpha, threshold "
                  f"{conv.threshold}): " + ", ".join(
                      f"`{t}` {v.entropy_norm_mean:.3f} (min top-2 margin {v.margin_min:.3f})"
                      for t, v in conv.trials.items())
                  + f" -> {'converged' if conv.converged else 'not converged'}.", ""]
    if ev.searches:
        lines += _searches_lines(ev, context.metric)
    if ev.paired_tests:
        lines += [f"Supporting, per seed (DARTS-derived vs uniform, {context.paired_test}): " + "; ".join(
            f"seed {r.seed}: {fmt(r.a_test)} vs {fmt(r.b_test)}, b={r.mcnemar_b}, c={r.mcnemar_c}, "
            f"p={fmt_p(r.mcnemar_p)}" for r in ev.paired_tests), ""]
    return lines


def _searches_lines(ev: DartsEvidence, metric: str) -> list[str]:
    """The DARTS searches, one row each, and how far their derived placements agree."""
    threshold = ev.convergence.threshold if ev.convergence.threshold is not None else 0.7
    rows = [{**s.summary(), "h": fmt(s.entropy_norm_mean) if s.entropy_norm_mean is not None else "-",
             "flag": ", ".join(f"L{i}" for i in s.unconverged_layers) or "none",
             "test": fmt(s.retrain_test) if s.retrain_test is not None else "-"} for s in ev.searches]
    lines = [f"DARTS searches (one per seed; `?` marks a layer whose own final H/ln K is above {threshold}: its "
             "argmax is close to a coin flip):", "",
             md_table(rows, ["seed", "variant", "placement", "h", "flag", "test"],
                      ["seed", "variant", "derived placement", "mean H/ln K", "layers not converged",
                       f"retrained test {metric}"]), ""]
    agreement = ev.agreement
    if agreement:
        common = ", ".join(f"L{i}" for i in agreement.layers_in_common) or "none"
        lines += [f"Agreement of the {agreement.searches} derived placements: on average "
                  f"{agreement.pairwise_same_layers_mean:.0%} of the {agreement.num_layers} layers get the same "
                  f"method in two searches; the same in every search: {common}.", ""]
    return lines


def suite_note(stored: Mapping) -> str:
    """What the suite says next to this finding's verdict on a task (``stored``: its
    ``summary.json`` entry): whether DARTS derived the best uniform placement itself."""
    if stored.get("derived_is_uniform"):
        return " (DARTS derived the best uniform placement itself: one configuration compared with itself)"
    return ""
