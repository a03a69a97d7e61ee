"""What the findings are decided on: a study's configurations and their seeds, the per-example
test results of trials and ensembles, and the comparisons on the interval ``analysis.interval``
names.

A *configuration* (``config_id``) is trained once per seed of ``train.seeds``; its seeds'
per-example test results are compared with another configuration's on the interval that
``analysis.interval`` names: by default ``seeds-speakers``
(:func:`pefttune.analysis.intervals.seeds_speakers_bootstrap`: Student-t over training seeds,
paired where both share seeds, plus the variance of a cluster bootstrap over the test speakers
of the manifest, :mod:`pefttune.analysis.speakers`; utterances when it names none); or
``examples``, the paired bootstrap over test examples for the seeds that were trained, which is
also kept next to every default interval as a supporting number ("examples only: these trained
models").  CTC: edit counts over reference lengths.  Classification intervals are on accuracy
(the per-example mean) whatever the task metric.

Example::

    configs = configurations(open_results("pefttune-results/embedded-ks"))
    scorer = Scorer(store)
    comparison = scorer.compare_configs(configs["uniform:lora"], configs["uniform:bitfit"], 0.95, 2000)
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from pefttune.analysis.ensemble_runner import contributions, errors, load_members
from pefttune.analysis.intervals import (
    INTERVALS, Comparison, PairAgreement, agreement_by_seed, agreement_seeds_speakers, ctc_phoneme_examples,
    paired_bootstrap, seeds_speakers_bootstrap,
)
from pefttune.analysis.seeds_speakers import Clusters
from pefttune.analysis.sequential import SequentialDesign
from pefttune.analysis.speakers import speaker_clusters
from pefttune.analysis.store import MissingPredictionsError, ResultsStore, TrialRecord
from pefttune.analysis.tables import VARIES_BY_SEED
from pefttune.schema import TrialKind

__all__ = ["Config", "Scorer", "SequentialLook", "Units", "best_config", "configurations", "sequential_look", "units"]


@dataclass
class Config:
    """One configuration and its completed seeds (trials sorted by seed)."""

    config_id: str
    kind: str
    method: str | None
    placement_short: str
    trainable_params: int | None
    trials: list[TrialRecord] = field(default_factory=list)
    dev_mean: float = math.nan

    @property
    def seeds(self) -> list[int]:
        return [t.seed for t in self.trials]

    def label(self) -> str:
        return self.config_id


def configurations(experiment: ResultsStore) -> dict[str, Config]:
    """Completed trials with test predictions grouped by ``config_id`` (DARTS supernets left out)."""
    out: dict[str, Config] = {}
    for trial in experiment.trials:
        if not trial.usable or trial.kind == TrialKind.DARTS or not trial.config_id:
            continue
        config = out.setdefault(trial.config_id, Config(trial.config_id, trial.kind, trial.method,
                                                        trial.placement_short, trial.trainable_params))
        config.trials.append(trial)
    for config in out.values():
        config.trials.sort(key=lambda t: (t.seed is None, t.seed, t.trial_id))
        if len({t.placement_short for t in config.trials}) > 1:  # DARTS as a method: each seed derived its own
            config.placement_short = VARIES_BY_SEED
        devs = [experiment.score(t, "dev") for t in config.trials]
        devs = [d for d in devs if d is not None]
        config.dev_mean = float(np.mean(devs)) if devs else math.nan
    return out


def best_config(experiment: ResultsStore, configs: dict[str, Config], kind: str) -> Config | None:
    """The configuration of ``kind`` with the best mean dev score over its seeds."""
    pool = [c for c in configs.values() if c.kind == kind and not math.isnan(c.dev_mean)]
    if not pool:
        return None
    sign = 1.0 if experiment.mode == "max" else -1.0
    return max(pool, key=lambda c: (sign * c.dev_mean, -(c.trainable_params or 0)))


class Scorer:
    """Per-example test results of trials and ensembles, aligned on the example index, and the
    comparisons of the interval ``analysis.interval`` names (``seeds-speakers`` or ``examples``)."""

    def __init__(self, experiment: ResultsStore, interval: str = "seeds-speakers"):
        if interval not in INTERVALS:
            raise ValueError(f"analysis.interval must be one of {', '.join(INTERVALS)}, got {interval!r}")
        self.experiment = experiment
        self.interval = interval
        self.ctc = experiment.task != "classification"
        self.higher_is_better = experiment.mode == "max"
        self._cache: dict[str, Any] = {}
        self._clusters: Clusters | None = None
        self.index: np.ndarray | None = None
        self.ref: Any = None

    def align(self, index: np.ndarray, ref) -> None:
        if self.index is None:
            self.index, self.ref = index, ref
        elif not np.array_equal(self.index, index):
            raise ValueError("trials were evaluated on different test examples; no paired comparison")

    @property
    def clusters(self) -> Clusters:
        """The test examples' speakers (utterances when the manifest names none)."""
        if self.index is None:
            raise ValueError("no trial scored yet")
        if self._clusters is None:
            self._clusters = speaker_clusters(self.experiment.config, self.index)
        return self._clusters

    def contributions(self, preds) -> Any:
        """Per-example correctness (classification) or (edits, reference lengths) (CTC)."""
        task = "ctc" if self.ctc else "classification"
        return contributions(task, errors(task, preds, self.ref), self.ref)

    def trial(self, trial: TrialRecord) -> Any:
        if trial.trial_id not in self._cache:
            data = load_members(self.experiment, [trial], "test")
            self.align(data.index, data.labels if not self.ctc else data.refs)
            self._cache[trial.trial_id] = self.contributions(data.preds(0))
        return self._cache[trial.trial_id]

    def preds(self, trial: TrialRecord):
        data = load_members(self.experiment, [trial], "test")
        self.align(data.index, data.labels if not self.ctc else data.refs)
        return data.preds(0)

    def config(self, config: Config) -> list:
        return [self.trial(t) for t in config.trials]

    def trivial(self) -> list:
        """The trivial reference: the most frequent dev label (classification), all blank (CTC)."""
        if self.ref is None:
            raise ValueError("no trial scored yet")
        if self.ctc:
            return [self.contributions([[] for _ in self.ref])]
        return [(np.asarray(self.ref) == self._majority_label()).astype(np.float64)]

    def _majority_label(self):
        counts: Counter = Counter()
        for trial in self.experiment.trials:
            if trial.usable:
                try:
                    labels = self.experiment.predictions(trial, "dev")["label"]
                except (MissingPredictionsError, KeyError):
                    continue
                counts.update(np.asarray(labels).tolist())
                break
        if not counts:  # no dev labels stored: the most frequent test label (an upper bound of chance)
            counts.update(np.asarray(self.ref).tolist())
        # ties go to the smallest label, so the reference does not depend on the trials' order
        return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[0][0]

    def compare(self, a: list, b: list, confidence: float, draws: int, seeds_a: list | None = None,
                seeds_b: list | None = None, fixed_b: bool = False) -> Comparison:
        """A - B on the scorer's interval; ``seeds_a``/``seeds_b``: each entry's training seed
        (shared seeds are paired); ``fixed_b``: B is a deterministic reference.  A seeds x
        speakers comparison carries the examples-only one as ``supporting``."""
        examples = paired_bootstrap(a, b, draws=draws, confidence=confidence, higher_is_better=self.higher_is_better)
        if self.interval == "examples":
            return examples
        main = seeds_speakers_bootstrap(a, b, clusters=self.clusters, seeds_a=seeds_a, seeds_b=seeds_b,
                                        fixed_b=fixed_b, draws=draws, confidence=confidence,
                                        higher_is_better=self.higher_is_better)
        return replace(main, supporting=examples)

    def compare_configs(self, a: Config, b: Config, confidence: float, draws: int) -> Comparison:
        """Configuration A - B over all their seeds, paired on the seeds both have."""
        return self.compare(self.config(a), self.config(b), confidence, draws, a.seeds, b.seeds)

    def agreement(self, pa: list, pb: list, names: tuple[str, str], confidence: float, draws: int) -> PairAgreement:
        """Kappa and error overlap of seed-paired predictions on the scorer's interval (the
        examples-only one as ``supporting``); CTC: over aligned reference phonemes."""
        labels, groups, units = self.ref, None, np.arange(len(self.ref))
        if self.ctc:
            pa, pb, labels, units = ctc_phoneme_examples(pa, pb, self.ref)
            groups = units  # the examples-only bootstrap resamples utterances, each with its phonemes
        examples = agreement_by_seed(pa, pb, labels, names=names, draws=draws, confidence=confidence, groups=groups)
        if self.interval == "examples":
            return examples
        main = agreement_seeds_speakers(pa, pb, labels, clusters=self.clusters.ids[units], unit=self.clusters.unit,
                                        names=names, draws=draws, confidence=confidence)
        return replace(main, supporting=examples)


@dataclass(frozen=True)
class Units:
    """What the intervals resample: ``resampling_unit`` ("seeds x speakers", "seeds x utterances"
    or "examples"), the number of test speakers and clusters, and why the unit is utterances."""

    resampling_unit: str | None = None
    test_speakers: int | None = None
    clusters: int | None = None
    clusters_note: str = ""


def units(scorer: Scorer) -> Units:
    """The :class:`Units` of the scorer's intervals (nothing scored: all None)."""
    if scorer.index is None:
        return Units()
    if scorer.interval == "examples":
        return Units("examples", None, int(scorer.index.size), "")
    c = scorer.clusters
    return Units(c.label, c.n_speakers if c.unit == "speakers" else None, c.count, c.note)


@dataclass(frozen=True)
class SequentialLook:
    """One look of a group-sequential design (:mod:`pefttune.analysis.sequential`): at ``look``
    seeds, every interval is taken at ``confidence``."""

    design: str  # the design, as one sentence for the report
    look: int
    confidence: float
    n_planned: int
    n_max: int


def sequential_look(design: SequentialDesign, configs: dict[str, Config]) -> SequentialLook:
    """This look of ``design``: the look at the number of seeds that every uniform configuration
    has (clamped to the design's looks), and the level the design spends there."""
    seeds = [len(c.seeds) for c in configs.values() if c.kind == TrialKind.UNIFORM]
    n = min(max(min(seeds, default=design.n_planned), design.n_planned), design.n_max)
    return SequentialLook(design.describe(), n, design.confidence_at(n), design.n_planned, design.n_max)
