"""The findings decided on intervals over seeds, on crafted Ray experiments with replicates."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pefttune.analysis.findings import FindingKey, Verdict, configurations, decide
from pefttune.analysis.findings import darts_vs_uniform, ensembles
from pefttune.analysis.findings.darts_vs_uniform import Convergence, darts_convergence
from pefttune.analysis.report import analyze
from pefttune.analysis.store import open_results
from pefttune.analysis.tables import alpha_table, configs_table, trials_table
from test_analysis import _run, _spec

N = 300
SEEDS = (0, 1, 2)
METHODS = ("lora", "bitfit", "sequential")


def _wrong(slot: int, seed: int, share: int = 5) -> list[int]:
    """Examples a member gets wrong: a fifth of them, disjoint between slots, moved by the seed."""
    return [i for i in range(N) if (i + seed) % share == slot]


def _uniform(method: str, slot: int, seed: int, **extra) -> dict:
    return _spec(f"{method}-s{seed}", "uniform", [method] * 4, 1000 + slot, range(slot, 20, 5), _wrong(slot, seed),
                 0.7, method, seed=seed, config_id=f"uniform:{method}", n_test=N, **extra)


@functools.lru_cache(maxsize=None)
def replicated_experiment(learned: bool = True) -> Path:
    """3 uniform methods x 3 seeds with disjoint errors, a DARTS-derived placement that predicts
    exactly like uniform LoRA, a converged DARTS search, and the frozen reference."""
    base = Path(tempfile.mkdtemp(prefix="pefttune-findings-"))
    atexit.register(shutil.rmtree, base, True)
    root = base / "ks"
    if learned:
        main = [_uniform(m, k, s) for s in SEEDS for k, m in enumerate(METHODS)]
        main += [_spec(f"hybrid-s{s}", "hybrid", ["sequential+lora"] * 4, 2500, range(3, 20, 5), _wrong(3, s), 0.7,
                       seed=s, config_id="hybrid", n_test=N) for s in SEEDS]
        main += [_spec(f"frozen-s{s}", "frozen", ["none"] * 4, 10, range(10), [i for i in range(N) if i % 2 == 0],
                       0.5, seed=s, config_id="frozen", n_test=N) for s in SEEDS]
        retrain = [_spec(f"derived-s{s}", "darts-derived", ["lora", "bitfit", "lora", "none"], 900, range(0, 20, 5),
                         _wrong(0, s), 0.7, seed=s, config_id="darts-derived:abc", n_test=N) for s in SEEDS]
    else:  # every model right on a third of the examples: the most frequent label does as well
        main = [_spec(f"{m}-s{s}", "uniform", [m] * 4, 1000, range(20), [i for i in range(N) if i % 3 != 0], 0.4, m,
                      seed=s, config_id=f"uniform:{m}", n_test=N) for s in SEEDS for m in METHODS]
        retrain = []
    _run(main, base, "ks", "json")
    _run([_spec("darts", "darts", ["lora+bitfit"] * 4, 1400, [], [], 0.6, alpha=True, epochs=3, alpha_scale=3.0)],
         root, "darts", "csv")
    if retrain:
        _run(retrain, root, "darts-retrain", "json")
    _manifest_with_speakers(root)
    return root


SPEAKERS = 30


def _manifest_with_speakers(root: Path) -> None:
    """The config copy names a manifest whose test rows (ids 100..100+N-1, as the crafted
    predictions) have 30 speakers, drawn at random per clip, and one clip without a speaker."""
    rng = np.random.default_rng(0)
    rows = 100 + N
    split = np.where(np.arange(rows) >= 100, "test", np.where(np.arange(rows) < 20, "dev", "train"))
    speaker = np.array([f"spk{k}" for k in rng.integers(0, SPEAKERS, rows)], dtype=object)
    speaker[100 + N - 1] = None  # e.g. a silence clip: a cluster of its own
    pd.DataFrame({"path": [f"clip{i}.wav" for i in range(rows)], "split": split, "label": "yes",
                  "speaker": speaker}).to_csv(root / "manifest.csv", index=False)
    (root / "experiment.yaml").write_text(
        f"name: ks\nbackbone: tiny-hubert\ndata: {{source: manifest, task: ks, path: {root / 'manifest.csv'}}}\n"
        "ensemble_size: 3\ntrain: {epochs: 2}\n")


@pytest.fixture(scope="module")
def replicated(ray_session):
    return open_results(replicated_experiment())


def test_configurations_group_seeds_and_the_configs_table_aggregates(replicated):
    configs = configurations(replicated)
    assert set(configs) == {"uniform:lora", "uniform:bitfit", "uniform:sequential", "frozen", "hybrid",
                            "darts-derived:abc"}
    assert all(c.seeds == [0, 1, 2] for c in configs.values())
    table = configs_table(replicated).set_index("config_id")
    trials = trials_table(replicated)
    lora = trials[trials["config_id"] == "uniform:lora"]
    assert sorted(lora["seed"]) == [0, 1, 2] and table.loc["uniform:lora", "n_seeds"] == 3
    assert table.loc["uniform:lora", "test_mean"] == pytest.approx(lora["test_score"].mean())
    assert table.loc["uniform:lora", "test_mean"] == pytest.approx(0.8)
    assert table.loc["uniform:lora", "test_ci_low"] <= 0.8 <= table.loc["uniform:lora", "test_ci_high"]
    assert table.loc["frozen", "test_mean"] == pytest.approx(0.5)
    assert table.loc["uniform:lora", "seeds"] == "0,1,2" and table.loc["uniform:lora", "note"] == ""


def test_decisive_verdicts_on_clear_replicated_results(replicated):
    decided = decide(replicated, margin=0.01, confidence=0.95, draws=500, alpha=alpha_table(replicated))
    f1, f2, f3 = (decided.findings[k] for k in FindingKey)
    assert decided.learned is True
    # DARTS-derived predicts exactly like uniform LoRA: difference 0, interval [0, 0] below +delta
    assert f1.verdict is Verdict.REPRODUCED, f1.rule
    assert f1.interval.name == "DARTS - best uniform" and f1.interval.estimate == 0.0 and f1.interval.high < 0.01
    assert f1.evidence.comparison.diff == 0.0 and f1.evidence.convergence.converged
    assert f1.compares == ("darts-derived:abc", "uniform:lora") and not f1.open
    # another placement, equal predictions
    assert f1.evidence.derived_is_uniform is False and "itself" not in darts_vs_uniform.text(f1)
    assert [r.seed for r in f1.evidence.paired_tests] == [0, 1, 2]  # supporting McNemar per seed
    assert all(r.mcnemar_b == r.mcnemar_c == 0 for r in f1.evidence.paired_tests)
    # disjoint errors: the vote is right everywhere, each member wrong on a fifth
    assert f2.verdict is Verdict.REPRODUCED, f2.rule
    assert f2.interval.name == "vote gain" and f2.interval.estimate == pytest.approx(0.2) and f2.interval.low > 0
    assert len(f2.evidence.per_seed) == 3 and all(r.mcnemar_p < 0.05 for r in f2.evidence.per_seed)
    assert f3.verdict is Verdict.REPRODUCED, f3.rule
    assert all(p.overlap == 0.0 and p.kappa_ci_high < 0.8 for p in f3.evidence.pairs)
    assert [iv.name for iv in f3.intervals[:2]] == ["uniform:bitfit/uniform:lora kappa",
                                                    "uniform:bitfit/uniform:lora overlap"]
    for f in (f1, f2, f3):
        assert "CI" in f.rule or "kappa" in f.rule  # the rule is stated with its numbers
        assert f.seeds_needed is None  # decided: no seeds to add
    refs = decided.references
    assert refs.uniform_vs_frozen.diff == pytest.approx(0.3) and refs.uniform_vs_frozen.ci_low > 0
    # summary.json holds the same numbers as plain dicts, keyed "1", "2", "3"
    summary = decided.summary()
    assert summary["findings"]["2"]["vote_gain"]["diff"] == pytest.approx(0.2)
    assert summary["findings"]["3"]["pairs"] == summary["pairs"] and len(summary["pairs"]) == 3


def test_default_intervals_are_over_seeds_and_speakers_with_examples_supporting(replicated):
    decided = decide(replicated, draws=400).summary()
    manifest = pd.read_csv(Path(replicated.uri) / "manifest.csv")
    speakers = manifest.loc[manifest["split"] == "test", "speaker"].dropna().nunique()
    assert decided["interval"] == "seeds-speakers" and decided["resampling_unit"] == "seeds x speakers"
    assert decided["test_speakers"] == speakers == SPEAKERS and decided["clusters"] == speakers + 1
    refs = decided["references"]
    hybrid = refs["hybrid_vs_uniform"]
    assert hybrid["interval"] == "seeds x speakers" and hybrid["caveat"] == ""
    assert hybrid["spread"]["pairing"] == "paired" and hybrid["spread"]["n_seeds"] == 3
    assert hybrid["spread"]["n_clusters"] == speakers + 1 and hybrid["spread"]["df"] == 2
    # hybrid and LoRA are right on 0.8 of the clips on every seed: no seed variance, the speakers' only
    assert hybrid["diff"] == pytest.approx(0.0) and hybrid["spread"]["seed_var"] == pytest.approx(0.0)
    se = hybrid["spread"]["speaker_var"] ** 0.5
    assert se > 0 and hybrid["ci_high"] == pytest.approx(stats.t.ppf(0.975, 2) * se)
    support = hybrid["supporting"]
    assert support["interval"] == "examples only: these trained models" and support["diff"] == pytest.approx(0.0)
    assert hybrid["ci_high"] - hybrid["ci_low"] > 1.5 * (support["ci_high"] - support["ci_low"])
    # the nothing-learned check pairs every seed with the one deterministic trivial reference
    assert all(c["spread"]["pairing"] == "fixed reference" for c in refs["vs_trivial"].values())
    f1, f2 = decided["findings"]["1"], decided["findings"]["2"]
    assert f1["comparison"]["interval"] == "seeds x speakers" and f1["comparison"]["supporting"] is not None
    assert "95% seeds x speakers CI of DARTS - best uniform" in f1["rule"]
    assert "supporting, examples only: these trained models" in f1["text"]
    assert f2["vote_gain"]["spread"]["pairing"] == "paired"  # the ensembles are built per seed
    assert all(c["spread"]["pairing"] == "paired" for c in f2["vote_vs_others"].values())
    assert all(r["interval"] == "seeds x speakers" and "supporting_kappa_ci" in r for r in decided["findings"]["3"]["pairs"])
    # analysis.interval: examples decides on the paired bootstrap over test examples
    examples = decide(replicated, draws=400, interval="examples").summary()
    assert examples["resampling_unit"] == "examples" and examples["test_speakers"] is None
    other = examples["references"]["hybrid_vs_uniform"]
    assert other["interval"] == "examples only: these trained models" and other["supporting"] is None
    assert other["ci_low"] == pytest.approx(support["ci_low"]) and other["ci_high"] == pytest.approx(support["ci_high"])
    with pytest.raises(ValueError, match="analysis.interval"):
        decide(replicated, draws=400, interval="seeds")


def test_one_seed_makes_every_verdict_inconclusive_with_the_reason(replicated, monkeypatch):
    """The same trials, seeds 1 and 2 left out: the intervals cover speakers only."""
    from pefttune.analysis.findings import decision

    def first_seed_only(experiment):
        configs = configurations(experiment)
        for c in configs.values():
            c.trials = c.trials[:1]
        return configs

    monkeypatch.setattr(decision, "configurations", first_seed_only)
    decided = decide(replicated, draws=300, alpha=alpha_table(replicated))
    assert decided.learned is True
    for f in decided.findings.values():
        assert f.verdict is Verdict.INCONCLUSIVE and f.open, f.rule
        assert f.rule.startswith("inconclusive: one seed: training randomness not bounded"), f.rule
        assert f.interval.caveat == "one seed: training randomness not bounded"
    f1 = decided.findings[FindingKey.DARTS_VS_UNIFORM]
    assert f1.interval.covers == "speakers only (one seed)"
    assert f1.seeds_needed.n is None and "one seed" in f1.seeds_needed.intervals[0].reason
    # the more-seeds stage trains a seed of what the open findings compare
    from pefttune.more_seeds import open_findings, round_configs

    assert open_findings(decided) == ["1", "2", "3"]
    assert round_configs(decided, ["1"]) == (["uniform:lora"], True)  # DARTS-derived: from a new search
    uniform = ["uniform:bitfit", "uniform:lora", "uniform:sequential"]
    assert round_configs(decided, ["2", "3"]) == (uniform, False)


def test_unconverged_darts_makes_finding_1_inconclusive(replicated):
    alpha = pd.DataFrame({"trial_id": "t", "epoch": 5, "layer": [0, 0, 0], "method": ["none", "lora", "bitfit"],
                          "prob": [0.34, 0.33, 0.33]})
    assert not darts_convergence(alpha).converged
    f1 = decide(replicated, draws=300, alpha=alpha).findings[FindingKey.DARTS_VS_UNIFORM]
    assert f1.verdict is Verdict.INCONCLUSIVE and "converge" in f1.rule
    assert not f1.open and "did not converge" in f1.beyond_seeds  # more seeds would not decide it


def test_nothing_learned_makes_every_finding_inconclusive(ray_session):
    experiment = open_results(replicated_experiment(learned=False))
    decided = decide(experiment, draws=300)
    assert decided.learned is False
    for key in (FindingKey.ENSEMBLES, FindingKey.ERROR_DIVERSITY):
        finding = decided.findings[key]
        assert finding.verdict is Verdict.NOTHING_LEARNED, finding
        assert finding.held_back is not None and "nothing learned" in finding.rule
        stored = decided.summary()["findings"][str(key)]
        assert stored["own_verdict"] == finding.held_back.verdict and stored["verdict"] == "inconclusive: nothing learned"


def test_report_prints_rules_intervals_and_references(replicated, tmp_path):
    result = analyze(replicated.uri, tmp_path)
    report = (tmp_path / "report.md").read_text()
    flat = " ".join(report.split())  # report.md wraps its prose lines
    assert "| 1 |" in flat and "Rule: reproduced:" in flat
    assert "## Configurations (mean over seeds, 95% t-interval; test split: " in flat
    assert "uniform:lora" in flat and "frozen" in flat and "± " in flat
    assert "best uniform minus frozen (what PEFT adds)" in flat
    assert "DARTS convergence" in flat and "-> converged" in flat
    configs = pd.read_csv(tmp_path / "tables" / "configs.csv")
    assert len(configs) == 6 and set(configs["n_seeds"]) == {3}
    # the hybrid row: same accuracy as the best uniform (0.8), different errors: difference 0 with an interval
    assert "## Hybrid (merged in each layer) vs the best uniform" in flat and "not a claim of the paper" in flat
    hybrid = result["decision"]["hybrid"]
    assert hybrid["diff"] == pytest.approx(0.0) and hybrid["ci_low"] < 0 < hybrid["ci_high"]
    assert hybrid["hybrid_params"] == 2500 and hybrid["uniform_params"] in (1000, 1001, 1002)
    assert result["findings"]["2"]["verdict"] == "reproduced"
    # finding 2's per-seed table: every seed, each strategy's score and its difference from the vote
    f2 = result["findings"]["2"]
    assert "Per seed, test accuracy of each strategy, with its advantage over the vote in brackets" in flat
    lines = report.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| seed | best member | vote |"))
    names = [c.strip() for c in lines[at].split("|")[4:-1]]
    assert names and "vote" not in names
    table = lines[at + 2:at + 2 + len(f2["per_seed"])]
    for row, line in zip(f2["per_seed"], table):
        assert line.startswith(f"| {row['seed']} | ")
        vote = row["strategies"]["vote"]["test"]
        for name in names:
            score = row["strategies"][name]["test"]
            assert f"({score - vote:+.4f})" in line


def test_finding1_says_when_darts_derived_the_uniform_placement_itself():
    """The same placement trained with the same seeds gives a difference of exactly 0: the text
    says that the comparison is of one configuration with itself."""
    from types import SimpleNamespace

    from pefttune.analysis.findings import Config
    from pefttune.analysis.intervals import Comparison

    experiment = SimpleNamespace(mode="max", metric="accuracy", trials=[])
    same = "L0:lora(r=8) L1:lora(r=8) L2:lora(r=8) L3:lora(r=8)"
    configs = {"uniform:lora": Config("uniform:lora", "uniform", "lora", same, 100, dev_mean=0.7),
               "darts-derived:x": Config("darts-derived:x", "darts-derived", None, same, 100, dev_mean=0.7)}
    scorer = SimpleNamespace(
        compare_configs=lambda a, b, conf, draws: Comparison(0.0, 0.0, 0.0, 1.0, "bootstrap", 600, 3, 3))
    out = darts_vs_uniform.decide(experiment, configs, scorer, Convergence(True), 0.01, 0.95, 100)
    assert out.verdict is Verdict.REPRODUCED and out.evidence.derived_is_uniform is True
    assert "compares one configuration with itself" in darts_vs_uniform.text(out)
    configs["darts-derived:x"].placement_short = "L0:lora(r=8) L1:none L2:lora(r=8) L3:lora(r=8)"
    out = darts_vs_uniform.decide(experiment, configs, scorer, Convergence(True), 0.01, 0.95, 100)
    assert out.evidence.derived_is_uniform is False and "itself" not in darts_vs_uniform.text(out)


def test_finding2_members_go_best_by_dev_first_whatever_the_trial_order(replicated):
    """ROVER takes its first member as the skeleton, so the member order changes its output; the
    order must come from dev (the most trusted first), not from the trials' (random) ids."""
    configs = configurations(replicated)
    backwards = dict(reversed(list(configs.items())))
    assert list(backwards) != list(configs)
    by_seed = ensembles.uniform_by_seed(replicated, configs)
    assert by_seed == ensembles.uniform_by_seed(replicated, backwards) and len(by_seed) == 3
    for members in by_seed.values():
        keys = [(-replicated.score(t, "dev"), t.config_id) for t in members]
        assert keys == sorted(keys) and len({t.config_id for t in members}) == len(members)


def test_finding2_per_seed_table_orients_differences_as_the_rule_does():
    from pefttune.analysis.findings.ensembles import SeedEnsembles, StrategyScore, strategies_by_seed

    per_seed = [SeedEnsembles(0, ("a", "b"), "a", 0.30, 0.32, 1, 2, 0.5,
                              {"rover": StrategyScore(None, 0.30), "frame_vote": StrategyScore(None, 0.42)})]
    per = "\n".join(strategies_by_seed(per_seed, "rover", "per", "min"))  # an error rate: lower is better
    assert "| 0 | 0.3200 | 0.3000 | 0.4200 (-0.1200) |" in per
    acc = "\n".join(strategies_by_seed(per_seed, "rover", "accuracy", "max"))
    assert "0.4200 (+0.1200)" in acc
    assert strategies_by_seed(per_seed, "vote", "per", "min") == []


def test_an_undecided_finding_says_how_many_seeds_would_decide_it():
    """Finding 1 straddles +delta: per seed DARTS - uniform +0.005, -0.064, +0.030 (as measured on the
    embedded study), no speaker variance; the seeds needed put the t half-width inside the distance
    from the mean to +delta."""
    from types import SimpleNamespace

    from pefttune.analysis.findings import Config
    from pefttune.analysis.findings._base import render_section
    from pefttune.analysis.intervals import Comparison
    from pefttune.analysis.seeds_speakers import Spread, seeds_to_decide

    d = np.array([0.005, -0.064, 0.030])
    spread = Spread("paired", 3, float(d.var(ddof=1)), float(d.var(ddof=1)) / 3, 0.0, 2.0, 40)
    half = stats.t.ppf(0.975, 2) * (d.var(ddof=1) / 3) ** 0.5
    cmp = Comparison(d.mean(), d.mean() - half, d.mean() + half, 0.5, "t", 600, 3, 3, interval="seeds x speakers",
                     spread=spread)
    experiment = SimpleNamespace(mode="max", metric="accuracy", trials=[])
    configs = {"uniform:lora": Config("uniform:lora", "uniform", "lora", "L0:lora", 100, dev_mean=0.7),
               "darts-derived:x": Config("darts-derived:x", "darts-derived", None, "L0:none", 90, dev_mean=0.7)}
    out = darts_vs_uniform.decide(experiment, configs, SimpleNamespace(compare_configs=lambda *args: cmp),
                                  Convergence(True), 0.01, 0.95, 100)
    assert out.verdict is Verdict.INCONCLUSIVE and out.open
    need = out.seeds_needed
    gap = 0.01 - d.mean()  # the mean lies below +delta: the interval must come below it
    assert need.intervals[0].gap == pytest.approx(gap) and need.intervals[0].interval == "DARTS - best uniform"
    n = need.n
    assert n == seeds_to_decide(d.mean(), spread, 0.95, 0.0, 0.01).n
    assert stats.t.ppf(0.975, n - 1) * (d.var(ddof=1) / n) ** 0.5 < gap
    assert stats.t.ppf(0.975, n - 2) * (d.var(ddof=1) / (n - 1)) ** 0.5 >= gap
    line = "\n".join(render_section(out, "DARTS vs uniform placement", darts_vs_uniform.text(out)))
    assert f"**{n} seeds per configuration**" in line and "true difference is the observed mean" in line


def test_verdict_stability_redecides_a_run_with_the_other_intervals(replicated, monkeypatch):
    """benchmarks/verdict_stability.py prints each run's verdicts with the other interval setting
    too: the same trials, decided with ``analysis.interval`` flipped."""
    import sys

    import pefttune.runtime.study_dir as runtime_study_dir

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import verdict_stability

    monkeypatch.setattr(runtime_study_dir, "study_dir", lambda config: replicated.uri)
    out = verdict_stability.other_intervals(None, {"train_seeds": [0, 1, 2]})
    assert out["interval"] == "examples" and out["train_seeds"] == [0, 1, 2]  # the saved config: seeds x speakers
    expected = decide(replicated, interval="examples", alpha=alpha_table(replicated)).findings
    assert {k: f["verdict"] for k, f in out["findings"].items()} == {str(k): f.verdict for k, f in expected.items()}
    rows = [line for line in verdict_stability.table({"0": out}).splitlines() if line.startswith("| ") and "seed" not in line]
    assert [r.split("|")[2].strip() for r in rows] == [out["findings"][k]["verdict"] for k in ("1", "2", "3")]


def test_verdict_stability_flags_only_contradicting_verdicts():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import verdict_stability

    assert verdict_stability.contradicts(["reproduced", "not reproduced", "inconclusive"])
    assert verdict_stability.contradicts(["partly reproduced: ...", "not reproduced"])
    assert not verdict_stability.contradicts(["reproduced", "inconclusive", "inconclusive: one seed"])


def test_the_references_section_says_what_the_log_mel_head_pools(replicated):
    import dataclasses

    from pefttune.analysis.findings import references

    decided = decide(replicated, margin=0.01, confidence=0.95, draws=200, alpha=alpha_table(replicated))
    without = " ".join(references.render(decided.references, None, "accuracy"))
    assert "log-mel frames" not in without  # no log-mel row in this study: nothing said of it
    refs = dataclasses.replace(decided.references, uniform_vs_log_mel=decided.references.uniform_vs_frozen)
    text = " ".join(references.render(refs, None, "accuracy"))
    assert "best uniform minus log-mel (what the SSL encoder adds)" in text
    assert "pools their mean over time" in text and "References against converged probes" in text
