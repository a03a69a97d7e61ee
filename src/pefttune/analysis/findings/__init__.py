"""The paper's three findings, decided on intervals over seeds and test speakers, one module each.

1. :mod:`.darts_vs_uniform`: the best DARTS-derived configuration does not beat the best
   uniform one (inconclusive while the relaxation has not converged);
2. :mod:`.ensembles`: ensembles built per seed, particularly the majority vote, perform best;
3. :mod:`.error_diversity`: different PEFT methods make different errors (kappa and error
   overlap of each pair of uniform methods).

Each module holds its rule (``rule``, stated in full in its docstring), ``decide`` (a typed
:class:`Finding`: verdict, rule, intervals, evidence), ``text`` and ``render`` (its Markdown).
:mod:`.references` compares every configuration with the trivial reference (the nothing-learned
gate) and with the frozen and log-mel rows; :func:`decide` puts them together in a
:class:`Decision`; :mod:`.across_tasks` combines a suite's tasks.  The interval and test maths
are :mod:`pefttune.analysis.intervals`, :mod:`~pefttune.analysis.seeds_speakers` and
:mod:`~pefttune.analysis.sequential`.

Verdicts decide on intervals, never on p-values alone: "no better" needs the interval below a
margin delta; an interval that straddles its threshold gives "inconclusive"; a comparison among
models that learned nothing is "inconclusive: nothing learned"; an interval with a caveat (one
seed: training randomness not bounded) gives "inconclusive".  A rule over a *family* of
intervals ("some", "no" or "most" of m comparisons) requires simultaneous intervals, built at
``bonferroni_confidence(family_confidence, m)``.  An undecided finding says how many seeds per
configuration its observed variance implies (:func:`~pefttune.analysis.seeds_speakers.seeds_to_decide`).

Example::

    decision = decide(open_results("pefttune-results/embedded-ks"))
    for key, finding in decision.findings.items():
        print(key, finding.verdict, finding.interval.text() if finding.interval else "-")
"""
from pefttune.analysis.findings._base import Finding, FindingKey, Interval, ReportContext, Ruling, Verdict
from pefttune.analysis.findings._inputs import Config, Scorer, SequentialLook, configurations, sequential_look
from pefttune.analysis.findings.decision import MODULES, Decision, decide, render

__all__ = ["MODULES", "Config", "Decision", "Finding", "FindingKey", "Interval", "ReportContext", "Ruling", "Scorer",
           "SequentialLook", "Verdict", "configurations", "decide", "render", "sequential_look"]
