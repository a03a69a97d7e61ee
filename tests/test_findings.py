"""The findings decided on intervals over seeds, on crafted Ray experiments with replicates."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from pefttune.analysis.findings import configurations, darts_convergence, decide
from pefttune.analysis.report import analyze
from pefttune.analysis.store import open_experiment
from pefttune.analysis.tables import alpha_table, configs_table, trials_table
from test_analysis import _experiment_yaml, _run, _spec

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
    _experiment_yaml(root, "ks", "ks")
    return root


@pytest.fixture(scope="module")
def replicated(ray_session):
    return open_experiment(replicated_experiment())


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
    f1, f2, f3 = (decided["findings"][k] for k in ("1", "2", "3"))
    assert decided["learned"] is True
    # DARTS-derived predicts exactly like uniform LoRA: difference 0, interval [0, 0] below +delta
    assert f1["verdict"] == "reproduced", f1["rule"]
    assert f1["comparison"]["diff"] == 0.0 and f1["comparison"]["ci_high"] < 0.01 and f1["convergence"]["converged"]
    assert f1["derived_is_uniform"] is False and "itself" not in f1["text"]  # another placement, equal predictions
    # disjoint errors: the vote is right everywhere, each member wrong on a fifth
    assert f2["verdict"] == "reproduced", f2["rule"]
    assert f2["vote_gain"]["diff"] == pytest.approx(0.2) and f2["vote_gain"]["ci_low"] > 0
    assert len(f2["per_seed"]) == 3 and all(r["mcnemar_p"] < 0.05 for r in f2["per_seed"])
    assert f3["verdict"] == "reproduced", f3["rule"]
    assert all(r["error_overlap"] == 0.0 and r["kappa_ci_high"] < 0.8 for r in f3["pairs"])
    for f in (f1, f2, f3):
        assert "CI" in f["rule"] or "kappa" in f["rule"]  # the rule is stated with its numbers
    refs = decided["references"]
    assert refs["uniform_vs_frozen"]["diff"] == pytest.approx(0.3) and refs["uniform_vs_frozen"]["ci_low"] > 0


def test_resample_seeds_makes_every_comparison_two_level(replicated):
    plain = decide(replicated, draws=400)
    one = plain["references"]["hybrid_vs_uniform"]
    two = decide(replicated, draws=400, resample_seeds=True)
    assert two["resample_seeds"] is True
    both = two["references"]["hybrid_vs_uniform"]
    assert "two-level" in both["method"] and "two-level" not in one["method"]
    assert both["diff"] == pytest.approx(one["diff"])  # the point estimate does not change
    # each seed errs on other examples, so resampling the seeds adds spread
    assert both["ci_high"] - both["ci_low"] > one["ci_high"] - one["ci_low"]
    assert "two-level" in two["findings"]["1"]["comparison"]["method"]
    these = two["findings"]["1"]["comparison_these_seeds"]  # supporting: the seeds as trained
    assert "two-level" not in these["method"] and these["diff"] == pytest.approx(two["findings"]["1"]["comparison"]["diff"])
    assert "For these trained seeds alone" in two["findings"]["1"]["text"]
    assert "comparison_these_seeds" not in plain["findings"]["1"]
    # the configurations share their training seeds, and finding 2's lists are per seed: seeds are paired
    assert "paired seeds" in both["method"]
    f2 = two["findings"]["2"]
    assert "paired seeds" in f2["vote_gain"]["method"], f2
    assert all("paired seeds" in c["method"] for c in f2["vote_vs_others"].values())
    # finding 3's agreement intervals resample the seed pairs too: never narrower, wider somewhere
    width = [[p["kappa_ci_high"] - p["kappa_ci_low"] for p in d["findings"]["3"]["pairs"]] for d in (plain, two)]
    assert all(w2 >= 0.9 * w1 for w1, w2 in zip(*width)) and any(w2 > 1.2 * w1 for w1, w2 in zip(*width))


def test_unconverged_darts_makes_finding_1_inconclusive(replicated):
    alpha = pd.DataFrame({"trial_id": "t", "epoch": 5, "layer": [0, 0, 0], "method": ["none", "lora", "bitfit"],
                          "prob": [0.34, 0.33, 0.33]})
    assert not darts_convergence(alpha)["converged"]
    decided = decide(replicated, draws=300, alpha=alpha)
    assert decided["findings"]["1"]["verdict"] == "inconclusive"
    assert "converge" in decided["findings"]["1"]["rule"]


def test_nothing_learned_makes_every_finding_inconclusive(ray_session):
    experiment = open_experiment(replicated_experiment(learned=False))
    decided = decide(experiment, draws=300)
    assert decided["learned"] is False
    for key in ("2", "3"):
        finding = decided["findings"][key]
        assert finding["verdict"] == "inconclusive: nothing learned", finding
        assert "own_verdict" in finding and "nothing learned" in finding["rule"]


def test_report_prints_rules_intervals_and_references(replicated, tmp_path):
    result = analyze(replicated.uri, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| 1 |" in report and "Rule: reproduced:" in report
    assert "## Configurations (mean over seeds, 95% t-interval)" in report
    assert "uniform:lora" in report and "frozen" in report and "± " in report
    assert "best uniform minus frozen (what PEFT adds)" in report
    assert "DARTS convergence" in report and "-> converged" in report
    configs = pd.read_csv(tmp_path / "tables" / "configs.csv")
    assert len(configs) == 6 and set(configs["n_seeds"]) == {3}
    # the hybrid row: same accuracy as the best uniform (0.8), different errors: difference 0 with an interval
    assert "## Hybrid (merged in each layer) vs the best uniform" in report and "not a claim of the paper" in report
    hybrid = result["decision"]["hybrid"]
    assert hybrid["diff"] == pytest.approx(0.0) and hybrid["ci_low"] < 0 < hybrid["ci_high"]
    assert hybrid["hybrid_params"] == 2500 and hybrid["uniform_params"] in (1000, 1001, 1002)
    assert result["findings"]["2"]["verdict"] == "reproduced"
    # finding 2's per-seed table: every seed, each strategy's score and its difference from the vote
    f2 = result["findings"]["2"]
    assert "Per seed, test accuracy of each strategy, with its advantage over the vote in brackets" in report
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

    from pefttune.analysis.findings import Config, finding_darts
    from pefttune.analysis.intervals import Comparison

    experiment = SimpleNamespace(mode="max", metric="accuracy", trials=[])
    same = "L0:lora(r=8) L1:lora(r=8) L2:lora(r=8) L3:lora(r=8)"
    configs = {"uniform:lora": Config("uniform:lora", "uniform", "lora", same, 100, dev_mean=0.7),
               "darts-derived:x": Config("darts-derived:x", "darts-derived", None, same, 100, dev_mean=0.7)}
    scorer = SimpleNamespace(
        resample_seeds=False,
        compare_configs=lambda a, b, conf, draws: Comparison(0.0, 0.0, 0.0, 1.0, "bootstrap", 600, 3, 3))
    out = finding_darts(experiment, configs, scorer, {"converged": True}, 0.01, 0.95, 100)
    assert out["verdict"] == "reproduced" and out["derived_is_uniform"] is True
    assert "compares one configuration with itself" in out["text"]
    configs["darts-derived:x"].placement_short = "L0:lora(r=8) L1:none L2:lora(r=8) L3:lora(r=8)"
    out = finding_darts(experiment, configs, scorer, {"converged": True}, 0.01, 0.95, 100)
    assert out["derived_is_uniform"] is False and "itself" not in out["text"]


def test_verdict_stability_redecides_a_run_with_the_other_intervals(replicated, monkeypatch):
    """benchmarks/verdict_stability.py prints each run's verdicts with the other interval setting
    too: the same trials, decided with ``analysis.resample_seeds`` flipped."""
    import sys

    import pefttune.runtime.experiment as runtime_experiment

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import verdict_stability

    monkeypatch.setattr(runtime_experiment, "experiment_path", lambda config: replicated.uri)
    out = verdict_stability.other_intervals(None, {"train_seeds": [0, 1, 2]})
    assert out["resample_seeds"] is True and out["train_seeds"] == [0, 1, 2]  # the saved config: examples only
    expected = decide(replicated, resample_seeds=True, alpha=alpha_table(replicated))["findings"]
    assert {k: f["verdict"] for k, f in out["findings"].items()} == {k: f["verdict"] for k, f in expected.items()}
    rows = [line for line in verdict_stability.table({0: out}).splitlines() if line.startswith("| ") and "seed" not in line]
    assert [r.split("|")[2].strip() for r in rows] == [out["findings"][k]["verdict"] for k in ("1", "2", "3")]


def test_finding2_members_go_best_by_dev_first_whatever_the_trial_order(replicated):
    """ROVER takes its first member as the skeleton, so the member order changes its output; the
    order must come from dev (the most trusted first), not from the trials' (random) ids."""
    from pefttune.analysis.findings import _uniform_by_seed

    configs = configurations(replicated)
    backwards = dict(reversed(list(configs.items())))
    assert list(backwards) != list(configs)
    by_seed = _uniform_by_seed(replicated, configs)
    assert by_seed == _uniform_by_seed(replicated, backwards) and len(by_seed) == 3
    for members in by_seed.values():
        keys = [(-replicated.score(t, "dev"), t.config_id) for t in members]
        assert keys == sorted(keys) and len({t.config_id for t in members}) == len(members)


def test_finding2_per_seed_table_orients_differences_as_the_rule_does():
    from pefttune.analysis.report import _strategies_by_seed

    finding = {"majority_strategy": "rover", "per_seed": [
        {"seed": 0, "best_member_test": 0.32, "strategies": {"rover": {"test": 0.30}, "frame_vote": {"test": 0.42}}}]}
    per = "\n".join(_strategies_by_seed(finding, "per", "min"))  # an error rate: lower is better
    assert "| 0 | 0.3200 | 0.3000 | 0.4200 (-0.1200) |" in per
    acc = "\n".join(_strategies_by_seed({**finding, "majority_strategy": "rover"}, "accuracy", "max"))
    assert "0.4200 (+0.1200)" in acc
    assert _strategies_by_seed({"majority_strategy": "vote", "per_seed": finding["per_seed"]}, "per", "min") == []
