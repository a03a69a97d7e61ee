"""The paper's three findings, decided on intervals over seeds and test examples.

A *configuration* (``config_id``) is trained once per seed of ``train.seeds``; its seeds'
per-example test results are compared with another configuration's by the paired bootstrap
of :func:`pefttune.analysis.intervals.paired_bootstrap` (one resample of test examples
shared by both and all their seeds, the per-seed metric averaged over seeds; CTC: edit counts
over reference lengths). Every verdict names its rule (:mod:`pefttune.analysis.intervals`)
and the numbers it used; an interval that straddles its threshold gives *inconclusive*.

1. **DARTS vs uniform**: the best DARTS-derived configuration vs the best uniform one (both by
   mean dev over seeds): :func:`~pefttune.analysis.intervals.finding1_verdict`; inconclusive
   when the relaxation did not converge (final mean normalised entropy of alpha above
   ``darts.converged_entropy``, default 0.7).
2. **Majority vote**: ensembles built per seed (the seed-k uniform trials, one per method,
   vote together); gains over the seed's best member by dev, vote vs the other strategies:
   :func:`~pefttune.analysis.intervals.finding2_verdict` (the other strategies' intervals are
   simultaneous, Bonferroni over the family). McNemar per seed stays as a supporting number.
3. **Different errors**: kappa and error overlap of each pair of uniform methods, paired by
   seed, with simultaneous bootstrap intervals:
   :func:`~pefttune.analysis.intervals.finding3_verdict`.

Before any verdict stands, the *nothing learned* rule: when no configuration beats the
trivial reference (classification: always the most frequent dev label; CTC: an all-blank
output, PER 1) by more than the margin, every finding is *inconclusive: nothing learned*.
Classification intervals are on accuracy (the per-example mean) whatever the task metric.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from pefttune.analysis.ensemble_runner import (
    contributions, errors, load_members, majority_strategy, run_ensembles, strategies_for,
)
from pefttune.analysis.intervals import (
    Comparison,
    Verdict,
    agreement_by_seed,
    ctc_agreement_by_seed,
    bonferroni_confidence,
    finding1_verdict,
    finding2_verdict,
    finding3_verdict,
    paired_bootstrap,
    unless_nothing_learned,
)
from pefttune.analysis.store import Experiment, MissingPredictionsError, TrialRecord

NOT_RUN = "not run"
REFERENCE_KINDS = ("frozen", "log-mel")


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


def configurations(experiment: Experiment) -> dict[str, Config]:
    """Completed trials with test predictions grouped by ``config_id`` (DARTS supernets left out)."""
    out: dict[str, Config] = {}
    for trial in experiment.trials:
        if not trial.usable or trial.kind == "darts" or not trial.config_id:
            continue
        config = out.setdefault(trial.config_id, Config(trial.config_id, trial.kind, trial.method,
                                                        trial.placement_short, trial.trainable_params))
        config.trials.append(trial)
    for config in out.values():
        config.trials.sort(key=lambda t: (t.seed is None, t.seed, t.trial_id))
        devs = [experiment.score(t, "dev") for t in config.trials]
        devs = [d for d in devs if d is not None]
        config.dev_mean = float(np.mean(devs)) if devs else math.nan
    return out


def best_config(experiment: Experiment, configs: dict[str, Config], kind: str) -> Config | None:
    """The configuration of ``kind`` with the best mean dev score over its seeds."""
    pool = [c for c in configs.values() if c.kind == kind and not math.isnan(c.dev_mean)]
    if not pool:
        return None
    sign = 1.0 if experiment.mode == "max" else -1.0
    return max(pool, key=lambda c: (sign * c.dev_mean, -(c.trainable_params or 0)))


class Scorer:
    """Per-example test results of trials and ensembles, aligned on the example index."""

    def __init__(self, experiment: Experiment, resample_seeds: bool = False):
        self.experiment = experiment
        self.resample_seeds = resample_seeds  # comparisons: two-level bootstrap (seeds and examples)
        self.ctc = experiment.task != "classification"
        self.higher_is_better = experiment.mode == "max"
        self._cache: dict[str, Any] = {}
        self.index: np.ndarray | None = None
        self.ref: Any = None

    def _align(self, index: np.ndarray, ref) -> None:
        if self.index is None:
            self.index, self.ref = index, ref
        elif not np.array_equal(self.index, index):
            raise ValueError("trials were evaluated on different test examples; no paired comparison")

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

    def compare(self, a: list, b: list, confidence: float, draws: int, seed: int = 0,
                paired: bool = False, resample_seeds: bool | None = None) -> Comparison:
        """A - B; ``paired``: entry k of A and of B come from the same training seed (with
        ``resample_seeds``, one seed resample then serves both).  ``resample_seeds`` None: the
        scorer's setting."""
        resample = self.resample_seeds if resample_seeds is None else resample_seeds
        return paired_bootstrap(a, b, draws=draws, confidence=confidence, seed=seed,
                                higher_is_better=self.higher_is_better, resample_seeds=resample,
                                paired_seeds=paired and len(a) == len(b))

    def compare_configs(self, a: Config, b: Config, confidence: float, draws: int,
                        resample_seeds: bool | None = None) -> Comparison:
        """Configuration A - B over all their seeds, paired by seed when both have the same seeds."""
        return self.compare(self.config(a), self.config(b), confidence, draws, paired=a.seeds == b.seeds,
                            resample_seeds=resample_seeds)


def _cmp_dict(c: Comparison | None) -> dict | None:
    if c is None:
        return None
    return {"diff": c.diff, "ci_low": c.ci_low, "ci_high": c.ci_high, "p_value": c.p_value, "confidence": c.confidence,
            "mean_a": c.mean_a, "mean_b": c.mean_b, "seeds_a": c.seeds_a, "seeds_b": c.seeds_b,
            "n_examples": c.n_examples, "method": c.method}


def _verdict_dict(v: Verdict) -> dict:
    return {"verdict": v.label, "rule": v.rule}


def _not_run(finding: int, claim: str, reason: str) -> dict:
    return {"finding": finding, "claim": claim, "verdict": NOT_RUN, "rule": f"not run: {reason}", "text": reason}


def darts_convergence(alpha: "Any", threshold: float = 0.7) -> dict:
    """Convergence of every DARTS search trial from the alpha table (``trial_id``, ``epoch``,
    ``layer``, ``method``, ``prob``): the final epoch's normalised entropy H/ln K per layer,
    averaged over layers, and the smallest top-2 margin. Converged when every trial's final
    mean normalised entropy is at most ``threshold``."""
    if alpha is None or len(alpha) == 0:
        return {"converged": False, "reason": "no alpha history", "trials": {}}
    trials = {}
    for trial_id, rows in alpha.groupby("trial_id"):
        last = rows[rows["epoch"] == rows["epoch"].max()]
        entropies, margins = [], []
        for _, layer in last.groupby("layer"):
            p = layer["prob"].to_numpy(dtype=np.float64)
            p = p / p.sum() if p.sum() > 0 else p
            k = len(p)
            nz = p[p > 0]
            entropies.append(float(-(nz * np.log(nz)).sum() / math.log(k)) if k > 1 else 0.0)
            top = np.sort(p)[::-1]
            margins.append(float(top[0] - top[1]) if k > 1 else 1.0)
        trials[str(trial_id)] = {"entropy_norm_mean": float(np.mean(entropies)), "margin_min": float(np.min(margins)),
                                 "epoch": int(last["epoch"].iloc[0])}
    converged = all(t["entropy_norm_mean"] <= threshold for t in trials.values())
    worst = max(t["entropy_norm_mean"] for t in trials.values())
    return {"converged": converged, "threshold": threshold, "worst_entropy_norm_mean": worst, "trials": trials}


# --------------------------------------------------------------------------- the findings
def finding_darts(experiment: Experiment, configs: dict[str, Config], scorer: Scorer, convergence: dict,
                  margin: float, confidence: float, draws: int) -> dict:
    claim = "DARTS over per-layer placement does not beat uniform placement"
    uniform, darts = best_config(experiment, configs, "uniform"), best_config(experiment, configs, "darts-derived")
    if uniform is None or darts is None:
        missing = "uniform baselines" if uniform is None else "DARTS-derived (retrained) placements"
        searches = sum(t.kind == "darts" for t in experiment.trials)
        extra = f" ({searches} DARTS search trial(s) found, but no retrained placement)" if searches and darts is None else ""
        return _not_run(1, claim, f"this experiment has no completed {missing}{extra}")
    cmp = scorer.compare_configs(darts, uniform, confidence, draws)
    verdict = finding1_verdict(cmp, margin, bool(convergence.get("converged")))
    out = {"finding": 1, "claim": claim, **_verdict_dict(verdict), "comparison": _cmp_dict(cmp),
           "darts_config": darts.config_id, "uniform_config": uniform.config_id, "convergence": convergence}
    discrete = best_config(experiment, configs, "discrete")
    if discrete is not None:
        out["discrete_config"] = discrete.config_id
        out["discrete_vs_uniform"] = _cmp_dict(
            scorer.compare_configs(discrete, uniform, confidence, draws))
    out["text"] = (f"Best DARTS-derived `{darts.config_id}` ({darts.placement_short}, seeds {darts.seeds}) minus "
                   f"best uniform `{uniform.config_id}` (seeds {uniform.seeds}): {cmp.ci_text()} "
                   f"(test {experiment.metric} {cmp.mean_a:.4f} vs {cmp.mean_b:.4f}).")
    if scorer.resample_seeds and len(darts.seeds) > 1:  # supporting: these trained models
        fixed = scorer.compare_configs(darts, uniform, confidence, draws, resample_seeds=False)
        out["comparison_these_seeds"] = _cmp_dict(fixed)
        out["text"] += (f" For these trained seeds alone (test examples resampled, seeds fixed, so not what "
                        f"another set of seeds would give): {fixed.ci_text()}.")
    out["derived_is_uniform"] = darts.placement_short == uniform.placement_short
    if out["derived_is_uniform"]:  # the same placement trained with the same seeds: the difference is 0 by design
        out["text"] += (" DARTS derived the best uniform placement itself, so this compares one configuration with "
                        "itself: DARTS found nothing better than uniform, and the interval says no more than that.")
    return out


def _uniform_by_seed(experiment: Experiment, configs: dict[str, Config]) -> dict[int, list[TrialRecord]]:
    """Each seed's uniform trials, the best by dev first (ties by config id).  The order is the
    ensemble's member order, which ROVER depends on (the first member is its skeleton): by dev
    it is the most trusted first, and the same in every run (trial ids are random)."""
    sign = -1.0 if experiment.mode == "max" else 1.0

    def rank(trial: TrialRecord) -> tuple[float, str]:
        dev = experiment.score(trial, "dev")
        return (math.inf if dev is None else sign * dev, trial.config_id)

    by_seed: dict[int, list[TrialRecord]] = {}
    uniform = [c for c in configs.values() if c.kind == "uniform"]
    seeds = set.intersection(*(set(c.seeds) for c in uniform)) if uniform else set()
    for seed in sorted(s for s in seeds if s is not None):
        by_seed[seed] = sorted((next(t for t in c.trials if t.seed == seed) for c in uniform), key=rank)
    return by_seed


def finding_ensembles(experiment: Experiment, configs: dict[str, Config], scorer: Scorer, margin: float,
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
    # entry k of every list is seed k's ensemble or best member: paired by seed
    vote_gain = scorer.compare(ens[vote], best, confidence, draws, paired=True)
    other_gains = {s: scorer.compare(ens[s], best, family, draws, paired=True) for s in others}
    vote_vs_others = {s: scorer.compare(ens[s], ens[vote], family, draws, paired=True) for s in others}
    verdict = finding2_verdict(vote_gain, other_gains, vote_vs_others, margin, family_confidence=confidence)
    text = (f"Per seed ({len(by_seed)} seeds), the {len(next(iter(by_seed.values())))} uniform trials vote together; "
            f"majority vote ({vote}) minus its best member by dev: {vote_gain.ci_text()}. "
            "Other strategies (gain over the best member; simultaneous intervals): "
            + ", ".join(f"{s} {c.ci_text()}" for s, c in other_gains.items()) + ".")
    return {"finding": 2, "claim": claim, **_verdict_dict(verdict), "majority_strategy": vote, "text": text,
            "vote_gain": _cmp_dict(vote_gain), "other_gains": {s: _cmp_dict(c) for s, c in other_gains.items()},
            "vote_vs_others": {s: _cmp_dict(c) for s, c in vote_vs_others.items()}, "per_seed": per_seed,
            "family_confidence": family}


def finding_errors(experiment: Experiment, configs: dict[str, Config], scorer: Scorer, confidence: float,
                   draws: int) -> tuple[dict, list[dict]]:
    claim = "different PEFT methods make different errors"
    uniform = sorted((c for c in configs.values() if c.kind == "uniform"), key=lambda c: c.config_id)
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
        agreement = ctc_agreement_by_seed if scorer.ctc else agreement_by_seed
        pair = agreement(pa, pb, scorer.ref, names=(a.config_id, b.config_id), draws=draws, confidence=family,
                         resample_seeds=scorer.resample_seeds)
        pairs.append(pair)
        rows.append({"a": a.config_id, "b": b.config_id, "seeds": len(seeds), "kappa": pair.kappa,
                     "kappa_ci_low": pair.kappa_ci_low, "kappa_ci_high": pair.kappa_ci_high,
                     "error_overlap": pair.overlap, "overlap_ci_low": pair.overlap_ci_low,
                     "overlap_ci_high": pair.overlap_ci_high, "confidence": family})
    if not pairs:
        return _not_run(3, claim, "no pair of uniform methods shares a seed"), []
    verdict = finding3_verdict(pairs, family_confidence=confidence)
    units = ("reference phonemes (each hypothesis aligned to its reference by Levenshtein; a phoneme is an error "
             "when substituted or deleted, insertions are not counted; utterances resampled)" if scorer.ctc
             else "test examples")
    text = (f"{len(pairs)} pairs of uniform methods, paired by seed; kappa and error overlap (Jaccard of the error "
            f"sets) over {units}, with simultaneous {family:.1%} intervals: "
            + "; ".join(f"{r['a']}/{r['b']} kappa {r['kappa']:.3f} [{r['kappa_ci_low']:.3f}, {r['kappa_ci_high']:.3f}], "
                        f"overlap {r['error_overlap']:.3f} [{r['overlap_ci_low']:.3f}, {r['overlap_ci_high']:.3f}]"
                        for r in rows) + ".")
    return {"finding": 3, "claim": claim, **_verdict_dict(verdict), "text": text, "pairs": rows}, rows


def references(experiment: Experiment, configs: dict[str, Config], scorer: Scorer, confidence: float,
               draws: int) -> dict:
    """What PEFT and the SSL encoder add: every configuration vs the trivial reference (the
    nothing-learned gate), and the best uniform configuration vs the frozen and log-mel rows."""
    trivial = scorer.trivial()
    vs_trivial = {cid: scorer.compare(scorer.config(c), trivial, confidence, draws)
                  for cid, c in configs.items() if c.kind not in REFERENCE_KINDS}
    out = {"vs_trivial": vs_trivial}
    uniform = best_config(experiment, configs, "uniform")
    for ref in REFERENCE_KINDS:
        config = configs.get(ref)
        if config is not None and uniform is not None:
            out[f"uniform_vs_{ref}"] = scorer.compare_configs(uniform, config, confidence, draws)
    hybrid = configs.get("hybrid")
    if hybrid is not None and uniform is not None:
        out["hybrid_vs_uniform"] = scorer.compare_configs(hybrid, uniform, confidence, draws)
    return out


def hybrid_row(experiment: Experiment, configs: dict[str, Config], comparison: dict | None) -> dict | None:
    """This experiment's result for the hybrid (methods merged in each layer) against the best
    uniform configuration, with both parameter counts (no claim of the paper rests on it)."""
    hybrid, uniform = configs.get("hybrid"), best_config(experiment, configs, "uniform")
    if hybrid is None or uniform is None or comparison is None:
        return None
    return {"hybrid": hybrid.placement_short, "hybrid_params": hybrid.trainable_params,
            "uniform": uniform.config_id, "uniform_params": uniform.trainable_params, **comparison}


def decide(experiment: Experiment, margin: float = 0.01, confidence: float = 0.95, draws: int = 2000,
           converged_entropy: float = 0.7, alpha=None, resample_seeds: bool = False) -> dict:
    """All three findings with their rules, the reference comparisons and the nothing-learned gate.
    ``resample_seeds``: every comparison resamples seeds as well as test examples."""
    configs = configurations(experiment)
    scorer = Scorer(experiment, resample_seeds)
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
        "resample_seeds": resample_seeds,
        "pairs": pairs,
        "references": refs_out,
        "configs": {cid: {"kind": c.kind, "seeds": c.seeds, "dev_mean": c.dev_mean, "trials": [t.trial_id for t in c.trials]}
                    for cid, c in configs.items()},
    }
