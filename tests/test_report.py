"""analyze() / `pefttune report` over real Ray experiment dirs with crafted predictions."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from pefttune.analysis.report import analyze, format_comparison
from pefttune.analysis.store import open_results
from test_analysis import by_name, classification_experiment, ctc_experiment


@pytest.fixture(scope="module")
def analysis(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return analyze(classification_experiment(), out), out


def test_analyze_returns_the_key_numbers(analysis):
    result, out = analysis
    exp = open_results(classification_experiment())
    t = by_name(exp)
    assert result["metric"] == "accuracy" and result["task"] == "classification" and result["n_trials"] == 10
    assert result["outcomes"] == {"completed": 7, "error": 1, "stopped_early": 1, "over_budget": 1}
    assert result["best"]["overall"]["trial_id"] == t["lora"].trial_id
    assert result["best"]["darts-derived"]["test"] == pytest.approx(0.7)
    assert list(result["uniform"]) == ["lora", "bitfit", "sequential"]
    f1, f2, f3 = (result["findings"][k] for k in ("1", "2", "3"))
    # one seed and 10 test examples: no configuration beats the most frequent label (0.4) by an
    # interval above the margin (lora 0.7: [-0.1, ...]), so nothing is judged; the rules' own
    # outcomes are kept next to it
    assert result["decision"]["learned"] is False
    assert all(f["verdict"] == "inconclusive: nothing learned" for f in (f1, f2, f3))
    # finding 1: darts-derived 0.7 vs uniform lora 0.7: difference 0, but the interval straddles +delta
    assert f1["own_verdict"] == "inconclusive" and f1["comparison"]["diff"] == 0.0
    assert f1["comparison"]["ci_low"] < 0 < 0.01 < f1["comparison"]["ci_high"]
    assert "[-0.3000, +0.3000]" in f1["rule"] and "delta = +0.0100" in f1["rule"]
    assert f1["mcnemar_by_seed"][0]["mcnemar_b"] == 1 and f1["mcnemar_by_seed"][0]["mcnemar_c"] == 1
    # finding 2: per-seed vote 1.0 vs the best member (lora, by dev) 0.7: the gain interval touches 0
    assert f2["own_verdict"] == "inconclusive" and f2["majority_strategy"] == "vote"
    assert f2["vote_gain"]["diff"] == pytest.approx(0.3) and f2["vote_gain"]["ci_low"] <= 0
    assert f2["per_seed"][0]["vote_test"] == 1.0 and f2["per_seed"][0]["best_member_test"] == pytest.approx(0.7)
    assert f2["per_seed"][0]["mcnemar_p"] == pytest.approx(0.25)
    # finding 3: disjoint errors between the three uniform methods: overlap 0 with any resample, but
    # one seed bounds no training randomness: its own rule is inconclusive too, and says why
    assert f3["own_verdict"] == "inconclusive" and len(f3["pairs"]) == 3
    assert f3["own_rule"].startswith("inconclusive: one seed: training randomness not bounded")
    assert all(r["error_overlap"] == 0.0 and r["overlap_ci_high"] == 0.0 for r in f3["pairs"])
    assert all(r["interval"] == "utterances only (one seed)" for r in f3["pairs"])
    # the config copy names the synthesized ks corpus, which is not in this cache: utterances are the units
    decision = result["decision"]
    assert decision["resampling_unit"] == "seeds x utterances" and decision["clusters"] == 10
    assert decision["test_speakers"] is None and "not in the cache" in decision["clusters_note"]
    names = [row["name"] for row in result["comparison"]]
    assert names[:3] == ["uniform:lora", "uniform:bitfit", "uniform:sequential"]
    assert "best darts-derived" in names and "ensemble per-method:vote" in names
    text = format_comparison(result)
    assert re.search(r"ensemble per-method:vote\s+3,300\s+1\.0000\s+1\.0000", text)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["findings"]["2"]["per_seed"][0]["vote_test"] == 1.0


def test_analyze_writes_report_tables_and_plots(analysis):
    result, out = analysis
    report = " ".join((out / "report.md").read_text().split())  # prose lines are wrapped
    for n in ("1", "2", "3"):
        assert f"### Finding {n}:" in report
    assert ("the finding's own rule said: inconclusive: one seed: training randomness not bounded: the 95% "
            "utterances only (one seed) CI of DARTS - best uniform [-0.3000, +0.3000]") in report
    assert "resampling unit **seeds x utterances**, 10 test utterances as units" in report
    assert "Supporting: the paired bootstrap over test examples (examples only: these trained models)" in report
    assert "**Nothing learned**" in report
    assert "b=1, c=1, p=1.000" in report  # finding 1's supporting McNemar
    assert "seed 0: 1.0000 vs 0.7000, b=3, c=0, p=0.250" in report  # finding 2's supporting McNemar
    assert "own rule said: inconclusive: one seed: training randomness not bounded: the pairs' intervals" in report
    assert "## Configurations (mean over seeds" in report and "| one seed: no interval |" in report
    assert ("Every configuration has the same head: a softmax-weighted sum of the hidden states, mean-pooled over "
            "valid frames, standardised (`head.norm: batch`") in report  # the classification default
    for png in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    assert {"placements", "pareto", "agreement", "ensembles_per-method", "ensembles_top-3"} <= set(
        result["files"]["plots"])
    assert len(result["files"]["plots"]["alpha"]) == 1
    pairwise = pd.read_csv(out / "tables" / "pairwise.csv")
    assert len(pairwise) == 3 and pairwise["error_overlap"].tolist() == [0.0, 0.0, 0.0]
    ensembles = json.loads((out / "ensembles.json").read_text())
    assert [run["members"] for run in ensembles["runs"]] == ["top-3", "per-method"]
    assert (out / "tables" / "trials.parquet").exists() and (out / "tables" / "predictions.csv").exists()


def test_report_handles_missing_parts_ctc(ray_session, tmp_path):
    """A CTC experiment without DARTS: finding 1 is 'not run', the others use ROVER / whole hypotheses."""
    result = analyze(ctc_experiment(), tmp_path)
    f1, f2, f3 = (result["findings"][k] for k in ("1", "2", "3"))
    assert f1["verdict"] == "not run" and "DARTS-derived" in f1["text"]
    # 4 utterances, one seed: PER 0 (ROVER) vs 1/6 for the best member, but the interval reaches 0
    assert f2["majority_strategy"] == "rover" and f2["per_seed"][0]["vote_test"] == 0.0
    assert f2["per_seed"][0]["best_member_test"] == pytest.approx(1 / 6) and f2["verdict"] == "inconclusive"
    assert f2["vote_gain"]["diff"] == pytest.approx(1 / 6) and f2["vote_gain"]["ci_low"] <= 0  # edits over lengths
    assert f3["verdict"] == "inconclusive" and all(r["error_overlap"] == 0.0 for r in f3["pairs"])
    report = " ".join((tmp_path / "report.md").read_text().split())
    # the supporting per-seed test on CTC: a sign test on edit counts (1 of 4 utterances better), not McNemar
    assert f2["per_seed"][0]["mcnemar_b"] == 1 and f2["per_seed"][0]["mcnemar_c"] == 0
    assert "majority vote vs its best member, sign test on per-utterance edit counts" in report
    assert "Finding 1: DARTS vs uniform placement -- not run" in report
    assert "Discrete against DARTS search: not run (no completed searched trial" in report
    costs = pd.read_parquet(tmp_path / "tables" / "costs.parquet")  # three uniform arms, then the ensembles
    assert set(costs.loc[costs["kind"] != "ensemble", "arm"]) == {"uniform:lora", "uniform:bitfit",
                                                                  "uniform:sequential"}
    assert costs.loc[costs["arm"] == "ensemble per-method:rover", "combine_ms_per_example"].iloc[0] > 0
    assert "No DARTS search trials: no alpha plot." in report
    assert "the same head: a softmax-weighted sum of the hidden states, then per frame a linear layer" in report
    assert result["files"]["plots"]["alpha"] == []
    assert pd.read_parquet(tmp_path / "tables" / "alpha.parquet").empty


def test_report_cli(ray_session, tmp_path, capsys):
    from pefttune.cli import main

    assert main(["report", str(classification_experiment()), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "finding 1" in out and "finding 2" in out and "finding 3" in out and "nothing learned" in out
    assert out.count("  rule: ") == 3 and "own rule said: inconclusive: one seed:" in " ".join(out.split())
    assert all(len(line) <= 120 for line in out.splitlines())
    assert (tmp_path / "report.md").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_with_nothing_to_compare(ray_session, tmp_path):
    """Only a DARTS search (no usable placements): every finding is 'not run', files still written."""
    result = analyze(classification_experiment() / "darts", tmp_path)
    assert {k: f["verdict"] for k, f in result["findings"].items()} == {"1": "not run", "2": "not run",
                                                                        "3": "not run"}
    assert "1 DARTS search trial(s) found" in result["findings"]["1"]["text"]
    assert result["ensembles"] == [] and result["comparison"] == []
    assert pd.read_parquet(tmp_path / "tables" / "ensembles.parquet").empty
    assert len(pd.read_parquet(tmp_path / "tables" / "alpha.parquet")) == 36
    report = " ".join((tmp_path / "report.md").read_text().split())
    assert report.count("-- not run") == 3 and "![alpha]" in report


def test_pairwise_trials_between_any_trials(ray_session):
    from pefttune.analysis.report import pairwise_trials

    exp = open_results(classification_experiment())
    t = by_name(exp)
    pairs, kappa = pairwise_trials(exp, [t["lora"], t["discrete"], t["derived"]])
    assert list(kappa.index) == [t["lora"].trial_id, t["discrete"].trial_id, t["derived"].trial_id]
    row = pairs.iloc[0]  # lora wrong {0,1,2}, discrete wrong {0,3,6,9}: both wrong on 0
    assert (row["mcnemar_b"], row["mcnemar_c"], row["both_wrong"]) == (3, 2, 1)
    assert row["error_overlap"] == pytest.approx(1 / 6)
    assert row["agreement"] == pytest.approx(0.5)  # same prediction on 4,5,7,8 + example 0 (both y+1)


def test_pairwise_trials_ctc_compares_aligned_phonemes(ray_session):
    """CTC pairs are compared phoneme by phoneme, not as whole sentences: 6 reference phonemes;
    lora substitutes phoneme 2 of utterance 0, sequential phoneme 2 of utterance 2, bitfit only
    inserts a token (no reference phoneme wrong)."""
    from pefttune.analysis.report import pairwise_trials

    exp = open_results(ctc_experiment())
    t = by_name(exp)
    pairs, _ = pairwise_trials(exp, {"lora": t["lora"], "bitfit": t["bitfit"], "sequential": t["sequential"]})
    rows = {(r["a"], r["b"]): r for _, r in pairs.iterrows()}
    lora_seq = rows[("lora", "sequential")]
    assert lora_seq["both_wrong"] == 0 and lora_seq["error_overlap"] == 0.0
    assert lora_seq["mcnemar_b"] + lora_seq["mcnemar_c"] == 2 and lora_seq["agreement"] == pytest.approx(4 / 6)
    lora_bitfit = rows[("lora", "bitfit")]
    assert lora_bitfit["mcnemar_b"] + lora_bitfit["mcnemar_c"] == 1  # as sentences bitfit's would be wrong too


def test_costs_table_gives_every_arm_and_the_head_to_head(analysis):
    """The costs table: one row per arm whose sums are the trials table's, the ensembles' members'
    training and a measured combination time; the report's discrete-against-DARTS rows."""
    result, out = analysis
    costs = pd.read_parquet(out / "tables" / "costs.parquet")
    trials = pd.read_parquet(out / "tables" / "trials.parquet")
    assert len(pd.read_csv(out / "tables" / "costs.csv")) == len(costs)
    arms = costs[costs["kind"] != "ensemble"].set_index("arm")
    assert set(arms.index) == {"uniform:lora", "uniform:bitfit", "uniform:sequential", "hybrid", "discrete search",
                               "darts search + retrain"}
    # every trial in exactly one arm: the sums are the trials table's
    assert arms["trials"].sum() == len(trials) == 10
    assert arms["epochs"].sum() == trials["epochs"].fillna(0).sum()
    assert arms["trial_seconds"].sum() == pytest.approx(trials["time_total_s"].fillna(0).sum())
    search = arms.loc["discrete search"]  # discrete, errored, early-stopped, over budget: all seed 0
    assert (search["trials"], search["completed"], search["search_trials"]) == (4, 1, 4)
    assert search["search_seconds"] == pytest.approx(search["trial_seconds"])
    assert (search["params_min"], search["params_max"], search["params"]) == (700, 99999, "700-99,999")
    darts = arms.loc["darts search + retrain"]
    supernet = trials.loc[trials["kind"] == "darts", "time_total_s"].sum()
    assert (darts["trials"], darts["search_trials"]) == (2, 1) and darts["search_seconds"] == pytest.approx(supernet)
    assert arms.loc["uniform:lora", "params"] == "1,000" and set(costs["slot"]) == {"1 CPU"}
    assert set(costs["device"]) == {"cpu"}
    vote = costs.set_index("arm").loc["ensemble per-method:vote"]
    members = trials[trials["kind"] == "uniform"]
    assert vote["trials"] == 3 and vote["params_min"] == 3300
    assert vote["trial_seconds"] == pytest.approx(members["time_total_s"].sum())
    assert vote["combine_ms_per_example"] > 0 and pd.isna(vote["members_ms_per_example_bound"])  # none reported
    assert "ensembles per seed 0:vote" in set(costs["arm"])  # finding 2's ensemble
    assert arms["combine_ms_per_example"].isna().all()
    report = (out / "report.md").read_text()
    assert "## Cost of each arm" in report and "| darts search + retrain | 2 | 2 |" in report
    assert "### Discrete against DARTS search (a reported comparison, not a finding: no rule, no verdict)" in report
    # the best searched placement (discrete, test 0.6) against the DARTS-derived one (0.7): one seed each
    assert re.search(r"\| replicated \| `discrete:[0-9a-f]+` \| `darts-derived[^`]*` \| 0\.6000 vs 0\.7000 \| "
                     r"-0\.1000 \[-0\.\d{4}, \+0\.\d{4}\] \|", report)
    flat = " ".join(report.split())
    assert re.search(r"- replicated: best searched placement, all its seeds; discrete `discrete:[0-9a-f]+` seeds \[0\] "
                     r"\(\d+ searched trial\(s\)\), DARTS `darts-derived[^`]*` seeds \[0\]; interval over utterances "
                     r"only \(one seed\)", flat)
    assert "| equal budget |" in report
    assert "- equal budget: best searched trial within the seed-0 DARTS search's trial-seconds" in flat
