"""The paper's three findings, decided on intervals over seeds and test speakers.

A *configuration* (``config_id``) is trained once per seed of ``train.seeds``; its seeds'
per-example test results are compared with another configuration's on the interval that
``analysis.interval`` names: by default ``seeds-speakers``
(:func:`pefttune.analysis.intervals.seeds_speakers_bootstrap`: Student-t over training seeds,
paired where both share seeds, plus the variance of a cluster bootstrap over the test speakers
of the manifest, :mod:`pefttune.analysis.speakers`; utterances when it names none); or
``examples``, the paired bootstrap over test examples for the seeds that were trained, which is
also kept next to every default interval as a supporting number ("examples only: these trained
models").  CTC: edit counts over reference lengths.  Every verdict names its rule
(:mod:`pefttune.analysis.intervals`) and the numbers it used; an interval that straddles its
threshold gives *inconclusive*, and so does one seed ("training randomness not bounded"); an
undecided finding says how many seeds per configuration its observed variance implies
(:func:`pefttune.analysis.seeds_speakers.seeds_to_decide`).

1. **DARTS vs uniform**: the best DARTS-derived configuration vs the best uniform one (both by
   mean dev over seeds): :func:`~pefttune.analysis.intervals.finding1_verdict`; inconclusive
   when the relaxation did not converge (final mean normalised entropy of alpha above
   ``darts.converged_entropy``, default 0.7).
2. **Majority vote**: ensembles built per seed (the seed-k uniform trials, one per method,
   vote together), so they are paired by seed; gains over the seed's best member by dev, vote
   vs the other strategies: :func:`~pefttune.analysis.intervals.finding2_verdict` (the other
   strategies' intervals are simultaneous, Bonferroni over the family). McNemar per seed stays
   as a supporting number.
3. **Different errors**: kappa and error overlap of each pair of uniform methods, per seed
   pair, with simultaneous intervals over seed pairs and speakers:
   :func:`~pefttune.analysis.intervals.finding3_verdict`.

Before any verdict stands, the *nothing learned* rule: when no configuration beats the
trivial reference (classification: always the most frequent dev label; CTC: an all-blank
output, PER 1) by more than the margin, every finding is *inconclusive: nothing learned*.
Classification intervals are on accuracy (the per-example mean) whatever the task metric.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from itertools import combinations
from typing import Any

import numpy as np

from pefttune.analysis.ensemble_runner import (
    contributions, errors, load_members, majority_strategy, run_ensembles, strategies_for,
)
from pefttune.analysis.intervals import (
    INTERVALS,
    Comparison,
    PairAgreement,
    Verdict,
    agreement_by_seed,
    agreement_seeds_speakers,
    bonferroni_confidence,
    ctc_phoneme_examples,
    finding1_verdict,
    finding2_verdict,
    finding3_verdict,
    paired_bootstrap,
    seeds_speakers_bootstrap,
    unless_nothing_learned,
)
from pefttune.placement import Placement
from pefttune.analysis.sequential import SequentialDesign
from pefttune.analysis.seeds_speakers import Clusters, seeds_to_decide
from pefttune.analysis.speakers import speaker_clusters
from pefttune.analysis.tables import VARIES_BY_SEED
from pefttune.analysis.store import ResultsStore, MissingPredictionsError, TrialRecord
from pefttune.schema import TrialKind

NOT_RUN = "not run"
REFERENCE_KINDS = (TrialKind.FROZEN, TrialKind.LOG_MEL)


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

    def _align(self, index: np.ndarray, ref) -> None:
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
            self._align(data.index, data.labels if not self.ctc else data.refs)
            self._cache[trial.trial_id] = self.contributions(data.preds(0))
        return self._cache[trial.trial_id]

    def preds(self, trial: TrialRecord):
        data = load_members(self.experiment, [trial], "test")
        self._align(data.index, data.labels if not self.ctc else data.refs)
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


def _cmp_dict(c: Comparison | None) -> dict | None:
    if c is None:
        return None
    return {"diff": c.diff, "ci_low": c.ci_low, "ci_high": c.ci_high, "p_value": c.p_value, "confidence": c.confidence,
            "mean_a": c.mean_a, "mean_b": c.mean_b, "seeds_a": c.seeds_a, "seeds_b": c.seeds_b,
            "n_examples": c.n_examples, "method": c.method, "interval": c.interval, "caveat": c.caveat,
            "spread": asdict(c.spread) if c.spread is not None else None, "supporting": _cmp_dict(c.supporting)}


def _supporting_text(c: Comparison) -> str:
    s = c.supporting
    return f" (supporting, {s.interval}: {s.ci_text()})" if s is not None else ""


ASSUMPTION = ("assuming the true difference is the observed mean and the seed and speaker variances stay as "
              "measured: the smallest n seeds per configuration with t_{n-1} x sqrt(seed variance / n + speaker "
              "variance) below the distance from the mean to the threshold the interval must clear")


def seeds_needed(items: list[tuple[str, float, Any, float, float, float]]) -> dict:
    """Seeds per configuration to decide a finding: for each undecided interval ``(name,
    estimate, spread, confidence, low, high)`` (deciding = lying above ``low`` or below
    ``high``), :func:`~pefttune.analysis.seeds_speakers.seeds_to_decide`; the finding needs the
    largest n (every such interval cleared), None when one of them cannot be decided by seeds."""
    rows = []
    for name, estimate, spread, confidence, low, high in items:
        need = seeds_to_decide(estimate, spread, confidence, low, high)
        rows.append({"interval": name, "n": need.n, "gap": need.gap, "reason": need.reason})
    ns = [r["n"] for r in rows]
    n = max(ns) if rows and all(x is not None for x in ns) else None
    return {"n": n, "intervals": rows, "assumption": ASSUMPTION}


def _undecided(c: Comparison, low: float, high: float) -> bool:
    return not (c.lies_above(low) or c.lies_below(high))


def _verdict_dict(v: Verdict) -> dict:
    return {"verdict": v.label, "rule": v.rule}


def _not_run(finding: int, claim: str, reason: str) -> dict:
    return {"finding": finding, "claim": claim, "verdict": NOT_RUN, "rule": f"not run: {reason}", "text": reason}


def darts_convergence(alpha: "Any", threshold: float = 0.7) -> dict:
    """Convergence of every DARTS search trial from the alpha table (``trial_id``, ``epoch``,
    ``layer``, ``method``, ``prob``): the final epoch's normalised entropy H/ln K per layer,
    averaged over layers, and the smallest top-2 margin. Converged when every trial's final
    mean normalised entropy is at most ``threshold``. A layer whose own final H/ln K is above
    ``threshold`` is listed in the trial's ``unconverged_layers``: its argmax is close to a coin
    flip, whatever the average says."""
    if alpha is None or len(alpha) == 0:
        return {"converged": False, "reason": "no alpha history", "trials": {}}
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
        trials[str(trial_id)] = {"entropy_norm_mean": float(np.mean(list(entropies.values()))),
                                 "margin_min": float(np.min(margins)), "epoch": int(last["epoch"].iloc[0]),
                                 "entropy_norm": entropies,
                                 "unconverged_layers": [k for k, h in sorted(entropies.items()) if h > threshold]}
    converged = all(t["entropy_norm_mean"] <= threshold for t in trials.values())
    worst = max(t["entropy_norm_mean"] for t in trials.values())
    return {"converged": converged, "threshold": threshold, "worst_entropy_norm_mean": worst, "trials": trials}


def darts_by_seed(experiment: ResultsStore, convergence: dict) -> list[dict]:
    """One row per finished DARTS search: its seed, derived placement (a layer whose relaxation
    did not converge marked ``?``), convergence, and the test score of its retrain with its seed."""
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
        conv = convergence.get("trials", {}).get(t.trial_id, {})
        layers = Placement.from_json(text).layer_methods()
        flagged = set(conv.get("unconverged_layers", []))
        retrain = retrained.get(t.trial_id)
        rows.append({"trial_id": t.trial_id, "seed": t.seed, "variant": t.value("variant") or "",
                     "layers": layers,
                     "placement": " ".join(f"L{i}:{m}" + ("?" if i in flagged else "") for i, m in enumerate(layers)),
                     "entropy_norm_mean": conv.get("entropy_norm_mean"),
                     "unconverged_layers": sorted(flagged),
                     "retrain_test": experiment.score(retrain, "test") if retrain is not None else None})
    return sorted(rows, key=lambda r: (str(r["variant"]), r["seed"] if r["seed"] is not None else -1))


def placement_agreement(rows: list[dict]) -> dict | None:
    """How far the seeds' derived placements agree: per pair of searches, the share of layers given
    the same method (mean over pairs), and the layers whose method is the same in every search."""
    layers = [r["layers"] for r in rows if r.get("layers")]
    if len(layers) < 2 or len({len(x) for x in layers}) != 1:
        return None
    pairs = [(a, b) for i, a in enumerate(layers) for b in layers[i + 1:]]
    shares = [float(np.mean([x == y for x, y in zip(a, b)])) for a, b in pairs]
    common = [i for i in range(len(layers[0])) if len({x[i] for x in layers}) == 1]
    return {"searches": len(layers), "pairwise_same_layers_mean": float(np.mean(shares)),
            "layers_in_common": common, "num_layers": len(layers[0])}


# --------------------------------------------------------------------------- the findings
def finding_darts(experiment: ResultsStore, configs: dict[str, Config], scorer: Scorer, convergence: dict,
                  margin: float, confidence: float, draws: int) -> dict:
    claim = "DARTS over per-layer placement does not beat uniform placement"
    uniform = best_config(experiment, configs, TrialKind.UNIFORM)
    darts = best_config(experiment, configs, TrialKind.DARTS_DERIVED)
    if uniform is None or darts is None:
        missing = "uniform baselines" if uniform is None else "DARTS-derived (retrained) placements"
        searches = sum(t.kind == TrialKind.DARTS for t in experiment.trials)
        extra = f" ({searches} DARTS search trial(s) found, but no retrained placement)" if searches and darts is None else ""
        return _not_run(1, claim, f"this experiment has no completed {missing}{extra}")
    cmp = scorer.compare_configs(darts, uniform, confidence, draws)
    verdict = finding1_verdict(cmp, margin, bool(convergence.get("converged")))
    out = {"finding": 1, "claim": claim, **_verdict_dict(verdict), "comparison": _cmp_dict(cmp),
           "darts_config": darts.config_id, "uniform_config": uniform.config_id, "convergence": convergence}
    discrete = best_config(experiment, configs, TrialKind.DISCRETE)
    if discrete is not None:
        out["discrete_config"] = discrete.config_id
        out["discrete_vs_uniform"] = _cmp_dict(
            scorer.compare_configs(discrete, uniform, confidence, draws))
    out["text"] = (f"Best DARTS-derived `{darts.config_id}` ({darts.placement_short}, seeds {darts.seeds}) minus "
                   f"best uniform `{uniform.config_id}` (seeds {uniform.seeds}): {cmp.ci_text()} ({cmp.interval}; "
                   f"test {experiment.metric} {cmp.mean_a:.4f} vs {cmp.mean_b:.4f}){_supporting_text(cmp)}.")
    if verdict.label == "inconclusive" and convergence.get("converged"):
        out["seeds_needed"] = seeds_needed([("DARTS - best uniform", cmp.diff, cmp.spread, cmp.confidence, 0.0,
                                             margin)])
    out["by_seed"] = darts_by_seed(experiment, convergence)
    out["agreement"] = placement_agreement(out["by_seed"])
    out["derived_is_uniform"] = darts.placement_short == uniform.placement_short
    if out["derived_is_uniform"]:  # the same placement trained with the same seeds: the difference is 0 by design
        out["text"] += (" DARTS derived the best uniform placement itself, so this compares one configuration with "
                        "itself: DARTS found nothing better than uniform, and the interval says no more than that.")
    return out


def _uniform_by_seed(experiment: ResultsStore, configs: dict[str, Config]) -> dict[int, list[TrialRecord]]:
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


def finding_ensembles(experiment: ResultsStore, configs: dict[str, Config], scorer: Scorer, margin: float,
                      confidence: float, draws: int) -> dict:
    claim = "ensembles, particularly majority voting, perform best"
    by_seed = _uniform_by_seed(experiment, configs)
    if not by_seed or len(next(iter(by_seed.values()))) < 2:
        return _not_run(2, claim, "fewer than 2 uniform methods with a common seed")
    vote = majority_strategy(experiment.task)
    ens: dict[str, list] = {}
    best: list = []
    per_seed = []
    for seed, members in by_seed.items():
        try:
            run = run_ensembles(experiment, members)
        except (MissingPredictionsError, ValueError):  # no dev predictions or no usable dev weights:
            # the strategies that need test predictions only
            strategies = [s for s in strategies_for(experiment.task) if s not in ("weighted", "caruana")]
            run = run_ensembles(experiment, members, strategies)
        scorer._align(np.asarray(run.index), run.test_ref)
        best_id = run.results[0].best_member_id
        best.append(scorer.contributions(run.member_test_preds[best_id]))
        for result in run.results:
            ens.setdefault(result.strategy, []).append(scorer.contributions(result.test_pred))
        v = run.result(vote) if vote in ens else run.results[0]
        per_seed.append({"seed": seed, "members": [t.trial_id for t in members], "best_member": best_id,
                         "vote_test": v.test_score, "best_member_test": v.best_member_test,
                         "mcnemar_b": v.mcnemar_b, "mcnemar_c": v.mcnemar_c, "mcnemar_p": v.mcnemar_p,
                         "strategies": {r.strategy: {"dev": r.dev_score, "test": r.test_score} for r in run.results}})
    if vote not in ens:
        return _not_run(2, claim, f"the majority vote ({vote}) was not computed")
    others = [s for s in ens if s != vote]
    family = bonferroni_confidence(confidence, max(1, len(others)))
    seeds = list(by_seed)  # entry k of every list is seed k's ensemble or best member: paired by seed

    def compare(a: list, b: list, level: float) -> Comparison:
        return scorer.compare(a, b, level, draws, seeds, seeds)

    vote_gain = compare(ens[vote], best, confidence)
    other_gains = {s: compare(ens[s], best, family) for s in others}
    vote_vs_others = {s: compare(ens[s], ens[vote], family) for s in others}
    verdict = finding2_verdict(vote_gain, other_gains, vote_vs_others, margin, family_confidence=confidence)
    text = (f"Per seed ({len(by_seed)} seeds), the {len(next(iter(by_seed.values())))} uniform trials vote together; "
            f"majority vote ({vote}) minus its best member by dev: {vote_gain.ci_text()} ({vote_gain.interval})"
            f"{_supporting_text(vote_gain)}. Other strategies (gain over the best member; simultaneous intervals): "
            + ", ".join(f"{s} {c.ci_text()}{_supporting_text(c)}" for s, c in other_gains.items()) + ".")
    out = {"finding": 2, "claim": claim, **_verdict_dict(verdict), "majority_strategy": vote, "text": text,
           "vote_gain": _cmp_dict(vote_gain), "other_gains": {s: _cmp_dict(c) for s, c in other_gains.items()},
           "vote_vs_others": {s: _cmp_dict(c) for s, c in vote_vs_others.items()}, "per_seed": per_seed,
           "family_confidence": family}
    if verdict.label == "inconclusive":
        family_items = {**({} if vote_gain.lies_above(0.0) else {f"{s} gain": c for s, c in other_gains.items()}),
                        **{f"{s} - vote": c for s, c in vote_vs_others.items()}}
        items = {"vote gain": vote_gain, **family_items}
        out["seeds_needed"] = seeds_needed([(name, c.diff, c.spread, c.confidence, 0.0, margin)
                                            for name, c in items.items() if _undecided(c, 0.0, margin)])
    return out


def finding_errors(experiment: ResultsStore, configs: dict[str, Config], scorer: Scorer, confidence: float,
                   draws: int) -> tuple[dict, list[dict]]:
    claim = "different PEFT methods make different errors"
    uniform = sorted((c for c in configs.values() if c.kind == TrialKind.UNIFORM), key=lambda c: c.config_id)
    pairs_in = list(combinations(uniform, 2))
    if not pairs_in:
        return _not_run(3, claim, "fewer than 2 uniform methods"), []
    family = bonferroni_confidence(confidence, len(pairs_in))
    pairs, rows = [], []
    for a, b in pairs_in:
        seeds = sorted(set(a.seeds) & set(b.seeds), key=lambda s: (s is None, s))
        if not seeds:
            continue
        pa = [scorer.preds(next(t for t in a.trials if t.seed == s)) for s in seeds]
        pb = [scorer.preds(next(t for t in b.trials if t.seed == s)) for s in seeds]
        pair = scorer.agreement(pa, pb, (a.config_id, b.config_id), family, draws)
        pairs.append(pair)
        rows.append(_pair_row(pair, family))
    if not pairs:
        return _not_run(3, claim, "no pair of uniform methods shares a seed"), []
    verdict = finding3_verdict(pairs, family_confidence=confidence)
    units = ("reference phonemes (each hypothesis aligned to its reference by Levenshtein; a phoneme is an error "
             "when substituted or deleted, insertions are not counted)" if scorer.ctc else "test examples")
    text = (f"{len(pairs)} pairs of uniform methods, paired by seed; kappa and error overlap (Jaccard of the error "
            f"sets) over {units}, with simultaneous {family:.1%} {pairs[0].interval} intervals: "
            + "; ".join(f"{r['a']}/{r['b']} kappa {r['kappa']:.3f} [{r['kappa_ci_low']:.3f}, {r['kappa_ci_high']:.3f}], "
                        f"overlap {r['error_overlap']:.3f} [{r['overlap_ci_low']:.3f}, {r['overlap_ci_high']:.3f}]"
                        + _pair_supporting(r) for r in rows) + ".")
    out = {"finding": 3, "claim": claim, **_verdict_dict(verdict), "text": text, "pairs": rows}
    if verdict.label == "inconclusive":
        out["seeds_needed"] = seeds_needed(_pair_items(pairs))
    return out, rows


def _pair_row(pair: PairAgreement, family: float) -> dict:
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


def _pair_supporting(row: dict) -> str:
    if "supporting_interval" not in row:
        return ""
    k, o = row["supporting_kappa_ci"], row["supporting_overlap_ci"]
    return f" (supporting, {row['supporting_interval']}: kappa [{k[0]:.3f}, {k[1]:.3f}], overlap [{o[0]:.3f}, {o[1]:.3f}])"


def _pair_items(pairs: list[PairAgreement], threshold: float = 0.8) -> list[tuple]:
    """The undecided kappa and overlap intervals of finding 3 (threshold 0.8 on both)."""
    items = []
    for p in pairs:
        for stat, est, low, high, spread in (("kappa", p.kappa, p.kappa_ci_low, p.kappa_ci_high, p.kappa_spread),
                                             ("overlap", p.overlap, p.overlap_ci_low, p.overlap_ci_high,
                                              p.overlap_spread)):
            if not (high < threshold or low >= threshold):
                items.append((f"{p.a}/{p.b} {stat}", est, spread, p.confidence, threshold, threshold))
    return items


def references(experiment: ResultsStore, configs: dict[str, Config], scorer: Scorer, confidence: float,
               draws: int) -> dict:
    """What PEFT and the SSL encoder add: every configuration vs the trivial reference (the
    nothing-learned gate), and the best uniform configuration vs the frozen and log-mel rows."""
    trivial = scorer.trivial()
    vs_trivial = {cid: scorer.compare(scorer.config(c), trivial, confidence, draws, c.seeds, fixed_b=True)
                  for cid, c in configs.items() if c.kind not in REFERENCE_KINDS}
    out = {"vs_trivial": vs_trivial}
    uniform = best_config(experiment, configs, TrialKind.UNIFORM)
    for ref in REFERENCE_KINDS:
        config = configs.get(ref)
        if config is not None and uniform is not None:
            out[f"uniform_vs_{ref}"] = scorer.compare_configs(uniform, config, confidence, draws)
    hybrid = configs.get(TrialKind.HYBRID)
    if hybrid is not None and uniform is not None:
        out["hybrid_vs_uniform"] = scorer.compare_configs(hybrid, uniform, confidence, draws)
    return out


def hybrid_row(experiment: ResultsStore, configs: dict[str, Config], comparison: dict | None) -> dict | None:
    """This experiment's result for the hybrid (methods merged in each layer) against the best
    uniform configuration, with both parameter counts (no claim of the paper rests on it)."""
    hybrid, uniform = configs.get(TrialKind.HYBRID), best_config(experiment, configs, TrialKind.UNIFORM)
    if hybrid is None or uniform is None or comparison is None:
        return None
    return {"hybrid": hybrid.placement_short, "hybrid_params": hybrid.trainable_params,
            "uniform": uniform.config_id, "uniform_params": uniform.trainable_params, **comparison}


def _units(scorer: Scorer) -> dict:
    """What the intervals resample: ``resampling_unit`` ("seeds x speakers", "seeds x utterances"
    or "examples"), the number of test speakers and clusters, and why the unit is utterances."""
    if scorer.index is None:
        return {"resampling_unit": None, "test_speakers": None, "clusters": None, "clusters_note": ""}
    if scorer.interval == "examples":
        return {"resampling_unit": "examples", "test_speakers": None, "clusters": int(scorer.index.size),
                "clusters_note": ""}
    c = scorer.clusters
    return {"resampling_unit": c.label, "test_speakers": c.n_speakers if c.unit == "speakers" else None,
            "clusters": c.count, "clusters_note": c.note}


def sequential_look(design: SequentialDesign, configs: dict[str, Config]) -> tuple[float, dict]:
    """The confidence of this look of ``design``: the look at the number of seeds that every
    uniform configuration has (clamped to the design's looks), and a record of it."""
    seeds = [len(c.seeds) for c in configs.values() if c.kind == TrialKind.UNIFORM]
    n = min(max(min(seeds, default=design.n_planned), design.n_planned), design.n_max)
    confidence = design.confidence_at(n)
    return confidence, {"design": design.describe(), "look": n, "confidence": confidence,
                        "n_planned": design.n_planned, "n_max": design.n_max}


def decide(experiment: ResultsStore, margin: float = 0.01, confidence: float = 0.95, draws: int = 2000,
           converged_entropy: float = 0.7, alpha=None, interval: str = "seeds-speakers",
           design: SequentialDesign | None = None) -> dict:
    """All three findings with their rules, the reference comparisons and the nothing-learned gate.
    ``interval`` (``analysis.interval``): ``seeds-speakers`` (default) or ``examples``. With a
    ``design`` (``analysis.max_seeds``: seeds added while a finding is open), every interval is
    taken at the level the design spends at this look (the seeds every uniform method has)."""
    configs = configurations(experiment)
    sequential = None
    if design is not None:
        confidence, sequential = sequential_look(design, configs)
    scorer = Scorer(experiment, interval)
    convergence = darts_convergence(alpha, converged_entropy)
    findings = {
        "1": finding_darts(experiment, configs, scorer, convergence, margin, confidence, draws),
        "2": finding_ensembles(experiment, configs, scorer, margin, confidence, draws),
    }
    findings["3"], pairs = finding_errors(experiment, configs, scorer, confidence, draws)
    refs: dict = {}
    learned = True
    if configs and scorer.ref is not None:
        refs = references(experiment, configs, scorer, confidence, draws)
        if refs["vs_trivial"]:
            probe = Verdict("x", "x", {})
            learned = unless_nothing_learned(probe, refs["vs_trivial"], margin) is probe
    if not learned:
        for finding in findings.values():
            if finding["verdict"] != NOT_RUN:
                finding["own_verdict"], finding["own_rule"] = finding["verdict"], finding["rule"]
                finding["verdict"] = "inconclusive: nothing learned"
                finding["rule"] = (f"inconclusive: nothing learned: no configuration beats the trivial reference "
                                   f"by more than delta = +{margin:.4f}; the finding's own rule said: "
                                   f"{finding['own_rule']}")
    refs_out = {k: ({cid: _cmp_dict(c) for cid, c in v.items()} if isinstance(v, dict) else _cmp_dict(v))
                for k, v in refs.items()}
    return {
        "findings": findings,
        "learned": learned,
        "hybrid": hybrid_row(experiment, configs, refs_out.get("hybrid_vs_uniform")),
        "margin": margin,
        "confidence": confidence,
        "draws": draws,
        "interval": interval,
        "sequential": sequential,
        **_units(scorer),
        "pairs": pairs,
        "references": refs_out,
        "configs": {cid: {"kind": c.kind, "seeds": c.seeds, "dev_mean": c.dev_mean, "trials": [t.trial_id for t in c.trials]}
                    for cid, c in configs.items()},
    }
