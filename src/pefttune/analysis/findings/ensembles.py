"""Finding 2: "ensembles, particularly majority voting, perform best".

Ensembles are built per seed: the seed-k uniform trials, one per method, vote together, so
ensembles and their best members are paired by seed.  The rule (:func:`rule`) reads the
majority vote's gain over its best member by dev, the other strategies' gains, and each
strategy against the vote (the other strategies' intervals simultaneous, Bonferroni over the
family).  McNemar per seed (CTC: the sign test on edit counts) stays as a supporting number.

Example::

    >>> from pefttune.analysis.intervals import Comparison
    >>> gain = Comparison(0.03, 0.01, 0.05, 0.01, "t", 600, 3, 3)
    >>> flat = {"soft": Comparison(-0.01, -0.02, 0.005, 0.5, "t", 600, 3, 3)}
    >>> str(rule(gain, flat, flat, margin=0.01).verdict)
    'reproduced'
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from pefttune.analysis.ensemble_runner import gain, majority_strategy, run_ensembles, strategies_for
from pefttune.analysis.findings._base import (
    Finding, FindingKey, Interval, ReportContext, Ruling, Verdict, check_margin, ci_name, comparison_summary,
    first_caveat, not_run, not_run_text, render_section, seeds_needed, supporting_text,
)
from pefttune.analysis.findings._inputs import Config, Scorer
from pefttune.analysis.intervals import Comparison, bonferroni_confidence, check_simultaneous, holm
from pefttune.analysis.markdown import fmt, fmt_p
from pefttune.analysis.store import MissingPredictionsError, ResultsStore, TrialRecord
from pefttune.schema import TrialKind

__all__ = ["CLAIM", "EnsembleEvidence", "KEY", "SeedEnsembles", "StrategyScore", "TITLE", "decide", "render", "rule",
           "strategies_by_seed", "suite_note", "suite_records", "summary", "text", "uniform_by_seed"]

KEY = FindingKey.ENSEMBLES
CLAIM = "ensembles, particularly majority voting, perform best"
TITLE = "Ensembles and majority voting"


def _cis(d: Mapping[str, Comparison], names: Sequence[str] | None = None) -> str:
    return ", ".join(f"{s} {d[s].ci_text()}" for s in (d if names is None else names)) or "none"


def rule(vote_gain: Comparison, other_gains: Mapping[str, Comparison], vote_vs_others: Mapping[str, Comparison],
         margin: float, *, family_confidence: float = 0.95) -> Ruling:
    """Finding 2, "majority vote beats its best member, and no other strategy beats the vote".

    ``vote_gain`` = vote - its best member; ``other_gains[s]`` = strategy s - its best member;
    ``vote_vs_others[s]`` = strategy s - vote (``diff > 0``: s better).  ``other_gains`` and
    ``vote_vs_others`` must each hold simultaneous intervals, built at
    ``bonferroni_confidence(family_confidence, len(family))`` (ValueError otherwise); the
    Holm-adjusted p-values of ``vote_vs_others`` are reported in ``details``, not used.

    A strategy *beats* the vote when its strategy - vote interval lies above 0 (significantly
    better).  "No strategy beats the vote" is also a claim of *no
    better*, which needs the margin (a non-significant difference is not evidence of none), so
    "reproduced" asks for both.  In order (delta = ``margin``):
    * an interval with a caveat (one seed) -> "inconclusive", the caveat stated;
    * vote ``ci_low > 0``, no strategy - vote ``ci_low > 0`` and every strategy - vote
      ``ci_high < +delta`` -> "reproduced";
    * vote ``ci_low > 0`` and some strategy beats the vote -> "partly reproduced" (ensembles
      gain, but the vote is not the best of them; the rule says by how much: by less than delta
      when that strategy's interval also lies below +delta);
    * some other gain with ``ci_low > 0`` (the vote's not) -> "partly reproduced";
    * every gain (vote and others) with ``ci_high < +delta`` -> "not reproduced";
    * otherwise "inconclusive": a gain interval straddles 0 or +delta, or the vote gains, no
      strategy beats it, but a strategy - vote interval straddles +delta.
    """
    margin, v = check_margin(margin), vote_gain
    check_simultaneous(list(other_gains.values()), family_confidence, "other_gains")
    check_simultaneous(list(vote_vs_others.values()), family_confidence, "vote_vs_others")
    dm = f"+{margin:.4f}"
    beat = [s for s, c in vote_vs_others.items() if c.lies_above(0.0)]
    not_within = [s for s, c in vote_vs_others.items() if not c.lies_below(margin)]
    helped = [s for s, c in other_gains.items() if c.lies_above(0.0)]
    triples = {k: {s: (c.diff, c.ci_low, c.ci_high) for s, c in d.items()}
               for k, d in (("other_gains", other_gains), ("vote_vs_others", vote_vs_others))}
    holm_p = holm([c.p_value for c in vote_vs_others.values()])
    details = {"vote_gain": (v.diff, v.ci_low, v.ci_high), "margin": margin, "beats_vote": beat,
               "not_within_margin_of_vote": not_within, "gain_above_0": helped, **triples,
               "vote_vs_others_holm_p": dict(zip(vote_vs_others, holm_p))}
    vtext = f"the vote's {ci_name(v)} of its gain over its best member {v.ci_text()}"
    caveat = first_caveat([v, *other_gains.values(), *vote_vs_others.values()])
    if caveat:
        return Ruling(Verdict.INCONCLUSIVE, f"inconclusive: {caveat}: {vtext} and the strategies' intervals "
                      f"(strategy - vote: {_cis(vote_vs_others)}) cover test sampling only",
                      {**details, "caveat": caveat})
    if v.lies_above(0.0) and not beat and not not_within:
        return Ruling(Verdict.REPRODUCED, f"reproduced: {vtext} lies above 0 and no strategy beats the vote, nor "
                      f"is better than it by delta = {dm} or more (strategy - vote CIs, simultaneous, none above 0, "
                      f"all below {dm}: {_cis(vote_vs_others)})", details)
    if v.lies_above(0.0) and beat:
        return Ruling(Verdict.PARTLY_REPRODUCED, _beaten(vtext, vote_vs_others, beat, not_within, dm), details)
    if v.lies_above(0.0):
        return Ruling(Verdict.INCONCLUSIVE, f"inconclusive: {vtext} lies above 0 and no strategy beats the vote, "
                      f"but the strategy - vote CI of {_cis(vote_vs_others, not_within)} straddles +delta = {dm}: "
                      "no strategy is shown to be no better than the vote", details)
    if helped:
        return Ruling(Verdict.PARTLY_REPRODUCED, f"partly reproduced: {vtext} does not lie above 0, but the gain "
                      f"CI of {_cis(other_gains, helped)} does", details)
    if all(c.lies_below(margin) for c in (v, *other_gains.values())):
        return Ruling(Verdict.NOT_REPRODUCED, f"not reproduced: every gain CI lies below +delta = {dm} "
                      f"({vtext}; others: {_cis(other_gains)})", details)
    return Ruling(Verdict.INCONCLUSIVE, f"inconclusive: no gain CI lies above 0 and not all lie below +delta = "
                  f"{dm} ({vtext}; others: {_cis(other_gains)})", details)


def _beaten(vtext: str, vote_vs_others: Mapping[str, Comparison], beat: list[str], not_within: list[str],
            dm: str) -> str:
    """The rule's text when ensembles gain but some strategy beats the vote, and by how much."""
    small = [s for s in beat if s not in not_within]
    how = (f"; {', '.join(small)} {'beats' if len(small) == 1 else 'beat'} it by less than delta = {dm} "
           f"(CI below {dm})" if small else "")
    unsure = [s for s in beat if s in not_within]
    how += (f"; {', '.join(unsure)} not shown to be within delta = {dm} of it (CI not below {dm})"
            if unsure else "")
    return (f"partly reproduced: {vtext} lies above 0 (ensembles gain), but {_cis(vote_vs_others, beat)} "
            f"beat{'s' if len(beat) == 1 else ''} the vote (strategy - vote CI above 0), so majority voting is not "
            f"the best strategy{how}")


# --------------------------------------------------------------------------- evidence
@dataclass(frozen=True)
class StrategyScore:
    """One strategy's ensemble of one seed: its dev and test score."""

    dev: float | None
    test: float | None


@dataclass(frozen=True)
class SeedEnsembles:
    """One seed's ensembles: its members (best by dev first), the vote against its best member
    with the exact paired test (McNemar; CTC: the sign test on edit counts), every strategy's score."""

    seed: int
    members: tuple[str, ...]
    best_member: str
    vote_test: float
    best_member_test: float
    mcnemar_b: int
    mcnemar_c: int
    mcnemar_p: float
    strategies: Mapping[str, StrategyScore]

    def summary(self) -> dict:
        return {"seed": self.seed, "members": list(self.members), "best_member": self.best_member,
                "vote_test": self.vote_test, "best_member_test": self.best_member_test, "mcnemar_b": self.mcnemar_b,
                "mcnemar_c": self.mcnemar_c, "mcnemar_p": self.mcnemar_p,
                "strategies": {s: {"dev": x.dev, "test": x.test} for s, x in self.strategies.items()}}


@dataclass(frozen=True)
class EnsembleEvidence:
    """The numbers behind finding 2: the vote's gain over its best member, the other strategies'
    gains and each strategy against the vote (at ``family_confidence``), per seed."""

    vote: str
    n_members: int
    vote_gain: Comparison
    other_gains: Mapping[str, Comparison]
    vote_vs_others: Mapping[str, Comparison]
    per_seed: tuple[SeedEnsembles, ...]
    family_confidence: float


def uniform_by_seed(experiment: ResultsStore, configs: dict[str, Config]) -> dict[int, list[TrialRecord]]:
    """Each seed's uniform trials, the best by dev first (ties by config id).  The order is the
    ensemble's member order, which ROVER depends on (the first member is its skeleton): by dev
    it is the most trusted first, and the same in every run (trial ids are random)."""
    sign = -1.0 if experiment.mode == "max" else 1.0

    def rank(trial: TrialRecord) -> tuple[float, str]:
        dev = experiment.score(trial, "dev")
        return (math.inf if dev is None else sign * dev, trial.config_id)

    by_seed: dict[int, list[TrialRecord]] = {}
    uniform = [c for c in configs.values() if c.kind == TrialKind.UNIFORM]
    seeds = set.intersection(*(set(c.seeds) for c in uniform)) if uniform else set()
    for seed in sorted(s for s in seeds if s is not None):
        by_seed[seed] = sorted((next(t for t in c.trials if t.seed == seed) for c in uniform), key=rank)
    return by_seed


def _ensembles_per_seed(experiment: ResultsStore, by_seed: dict[int, list[TrialRecord]], scorer: Scorer, vote: str):
    """(each strategy's per-seed test contributions, the best members', the per-seed rows)."""
    ens: dict[str, list] = {}
    best, per_seed = [], []
    for seed, members in by_seed.items():
        try:
            run = run_ensembles(experiment, members)
        except (MissingPredictionsError, ValueError):  # no dev predictions or no usable dev weights:
            # the strategies that need test predictions only
            strategies = [s for s in strategies_for(experiment.task) if s not in ("weighted", "caruana")]
            run = run_ensembles(experiment, members, strategies)
        scorer.align(np.asarray(run.index), run.test_ref)
        best_id = run.results[0].best_member_id
        best.append(scorer.contributions(run.member_test_preds[best_id]))
        for result in run.results:
            ens.setdefault(result.strategy, []).append(scorer.contributions(result.test_pred))
        v = run.result(vote) if vote in ens else run.results[0]
        per_seed.append(SeedEnsembles(
            seed, tuple(t.trial_id for t in members), best_id, v.test_score, v.best_member_test, v.mcnemar_b,
            v.mcnemar_c, v.mcnemar_p, {r.strategy: StrategyScore(r.dev_score, r.test_score) for r in run.results}))
    return ens, best, tuple(per_seed)


def decide(experiment: ResultsStore, configs: dict[str, Config], scorer: Scorer, margin: float, confidence: float,
           draws: int, note: str = "") -> Finding[EnsembleEvidence]:
    """Finding 2 on this study; ``note``: why the study's other ensembles failed, said with a
    finding that could not be run."""
    by_seed = uniform_by_seed(experiment, configs)
    if not by_seed or len(next(iter(by_seed.values()))) < 2:
        return not_run(KEY, CLAIM, "fewer than 2 uniform methods with a common seed", note)
    vote = majority_strategy(experiment.task)
    ens, best, per_seed = _ensembles_per_seed(experiment, by_seed, scorer, vote)
    if vote not in ens:
        return not_run(KEY, CLAIM, f"the majority vote ({vote}) was not computed", note)
    others = [s for s in ens if s != vote]
    family = bonferroni_confidence(confidence, max(1, len(others)))
    seeds = list(by_seed)  # entry k of every list is seed k's ensemble or best member: paired by seed

    def compare(a: list, b: list, level: float) -> Comparison:
        return scorer.compare(a, b, level, draws, seeds, seeds)

    vote_gain = compare(ens[vote], best, confidence)
    other_gains = {s: compare(ens[s], best, family) for s in others}
    vote_vs_others = {s: compare(ens[s], ens[vote], family) for s in others}
    ruling = rule(vote_gain, other_gains, vote_vs_others, margin, family_confidence=confidence)
    gains = {"vote gain": Interval.of("vote gain", vote_gain),
             **{s: Interval.of(f"{s} gain", c) for s, c in other_gains.items()}}
    against = {s: Interval.of(f"{s} - vote", c) for s, c in vote_vs_others.items()}
    need = None
    if ruling.verdict is Verdict.INCONCLUSIVE:
        # the other gains matter while the vote's does not lie above 0
        items = [gains["vote gain"], *([] if vote_gain.lies_above(0.0) else [gains[s] for s in others]),
                 *against.values()]
        need = seeds_needed([(iv, 0.0, margin) for iv in items if not (iv.lies_above(0.0) or iv.lies_below(margin))])
    evidence = EnsembleEvidence(vote, len(next(iter(by_seed.values()))), vote_gain, other_gains, vote_vs_others,
                                per_seed, family)
    uniform = tuple(sorted(c.config_id for c in configs.values() if c.kind == TrialKind.UNIFORM))
    return Finding(KEY, CLAIM, ruling.verdict, ruling.rule, (*gains.values(), *against.values()), evidence, need,
                   uniform)


# --------------------------------------------------------------------------- render
def text(finding: Finding[EnsembleEvidence]) -> str:
    """The finding's paragraph: the vote's gain and the other strategies' gains."""
    ev = finding.evidence
    if ev is None:
        return not_run_text(finding)
    v = ev.vote_gain
    return (f"Per seed ({len(ev.per_seed)} seeds), the {ev.n_members} uniform trials vote together; majority vote "
            f"({ev.vote}) minus its best member by dev: {v.ci_text()} ({v.interval}){supporting_text(v)}. Other "
            "strategies (gain over the best member; simultaneous intervals): "
            + ", ".join(f"{s} {c.ci_text()}{supporting_text(c)}" for s, c in ev.other_gains.items()) + ".")


def summary(finding: Finding[EnsembleEvidence]) -> dict:
    """Finding 2 as ``summary.json`` holds it."""
    ev = finding.evidence
    if ev is None:
        return finding.summary({"text": text(finding)})
    fields = {"majority_strategy": ev.vote, "text": text(finding), "vote_gain": comparison_summary(ev.vote_gain),
              "other_gains": {s: comparison_summary(c) for s, c in ev.other_gains.items()},
              "vote_vs_others": {s: comparison_summary(c) for s, c in ev.vote_vs_others.items()},
              "per_seed": [r.summary() for r in ev.per_seed], "family_confidence": ev.family_confidence}
    if finding.seeds_needed is not None:
        fields["seeds_needed"] = finding.seeds_needed.summary()
    return finding.summary(fields)


def render(finding: Finding[EnsembleEvidence], context: ReportContext) -> list[str]:
    """The report's section of finding 2."""
    lines = render_section(finding, TITLE, text(finding))
    ev = finding.evidence
    if ev is None or not ev.per_seed:
        return lines
    lines += [f"Supporting, per seed (majority vote vs its best member, {context.paired_test}): " + "; ".join(
        f"seed {r.seed}: {fmt(r.vote_test)} vs {fmt(r.best_member_test)}, b={r.mcnemar_b}, "
        f"c={r.mcnemar_c}, p={fmt_p(r.mcnemar_p)}" for r in ev.per_seed), ""]
    return lines + strategies_by_seed(ev.per_seed, ev.vote, context.metric, context.mode)


def strategies_by_seed(per_seed: Sequence[SeedEnsembles], vote: str | None, metric: str,
                       mode: str = "max") -> list[str]:
    """Each strategy's test score per seed and its difference from the vote, so a reader sees
    whether one seed or every seed carries the verdict."""
    rows = [r for r in per_seed if r.strategies]
    if not rows or vote is None or any(vote not in r.strategies for r in rows):
        return []
    names = [vote] + [s for s in rows[0].strategies if s != vote]
    lines = [f"Per seed, test {metric} of each strategy, with its advantage over the vote in brackets (positive: "
             "better than the vote, as in the rule's strategy - vote); each is one trained seed's ensemble on the test "
             "set, so it has no interval of its own (the intervals above resample its examples):",
             "", "| seed | best member | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]

    def cell(score, v) -> str:  # the strategy's advantage over the vote, as ensemble_runner.gain orients it
        return fmt(score) if score is None or v is None else f"{fmt(score)} ({gain(score, v, mode):+.4f})"

    for r in rows:
        v = r.strategies[vote].test
        cells = [fmt(v)] + [cell(r.strategies[s].test, v) if s in r.strategies else "-" for s in names[1:]]
        lines.append(f"| {r.seed} | {fmt(r.best_member_test)} | " + " | ".join(cells) + " |")
    return lines + [""]


def suite_records(task: str, stored: Mapping, metric: str, mode: str) -> list[dict]:
    """The suite table's rows of this finding from a study's ``summary.json`` entry: the majority
    vote and the best strategy by mean dev, per seed."""
    per_seed = stored.get("per_seed") or []
    vote = stored.get("majority_strategy")
    if not per_seed or not vote:
        return []
    records = [{"task": task, "row": "majority vote", "config_id": f"ensemble:{vote}", "seed": s["seed"],
                "metric": metric, "score": float(s["vote_test"])} for s in per_seed]
    strategies = list(per_seed[0].get("strategies", {}))
    if strategies:
        def mean_dev(strategy):
            return sum(s["strategies"][strategy]["dev"] for s in per_seed) / len(per_seed)
        best = max(strategies, key=mean_dev) if mode == "max" else min(strategies, key=mean_dev)
        records += [{"task": task, "row": "best ensemble (by dev)", "config_id": f"ensemble:{best}",
                     "seed": s["seed"], "metric": metric, "score": float(s["strategies"][best]["test"])}
                    for s in per_seed]
    return records


def suite_note(stored: Mapping) -> str:
    """What the suite says next to this finding's verdict on a task: nothing more."""
    return ""
