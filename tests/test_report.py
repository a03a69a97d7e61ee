"""analyze() / `pefttune report` over real Ray experiment dirs with crafted predictions."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from pefttune.analysis.report import analyze, format_comparison
from pefttune.analysis.store import open_experiment
from test_analysis import by_name, classification_experiment, ctc_experiment


@pytest.fixture(scope="module")
def analysis(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return analyze(classification_experiment(), out), out


def test_analyze_returns_the_key_numbers(analysis):
    result, out = analysis
    exp = open_experiment(classification_experiment())
    t = by_name(exp)
    assert result["metric"] == "accuracy" and result["task"] == "classification" and result["n_trials"] == 10
    assert result["outcomes"] == {"completed": 7, "error": 1, "stopped_early": 1, "over_budget": 1}
    assert result["best"]["overall"]["trial_id"] == t["lora"].trial_id
    assert result["best"]["darts-derived"]["test"] == pytest.approx(0.7)
    assert list(result["uniform"]) == ["lora", "bitfit", "sequential"]
    f1, f2, f3 = (result["findings"][k] for k in ("1", "2", "3"))
    # finding 1: darts-derived 0.7 vs uniform lora 0.7, b = c = 1
    assert f1["verdict"] == "reproduced"
    assert (f1["comparison"]["mcnemar_b"], f1["comparison"]["mcnemar_c"], f1["comparison"]["mcnemar_p"]) == (1, 1, 1.0)
    # finding 2: per-method majority vote 1.0 vs the best member (lora, by dev) 0.7, p = 0.25
    assert f2["verdict"] == "reproduced" and f2["members"] == "per-method"
    assert f2["vote_test"] == 1.0 and f2["best_member_test"] == pytest.approx(0.7)
    assert f2["mcnemar_p"] == pytest.approx(0.25) and f2["best_strategy"] == "vote"
    # finding 3: disjoint errors between the three uniform methods
    assert f3["verdict"] == "reproduced" and f3["pairs"] == 3
    assert f3["mean_error_overlap"] == 0.0 and f3["share_mcnemar_significant"] == 0.0
    assert f3["mean_agreement"] == pytest.approx(0.4)
    names = [row["name"] for row in result["comparison"]]
    assert names[:3] == ["uniform:lora", "uniform:bitfit", "uniform:sequential"]
    assert "best darts-derived" in names and "ensemble per-method:vote" in names
    text = format_comparison(result)
    assert re.search(r"ensemble per-method:vote\s+3,300\s+1\.0000\s+1\.0000", text)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["findings"]["2"]["vote_test"] == 1.0


def test_analyze_writes_report_tables_and_plots(analysis):
    result, out = analysis
    report = (out / "report.md").read_text()
    for n in ("1", "2", "3"):
        assert f"### Finding {n}:" in report
    assert "DARTS does not significantly beat uniform placement" in report
    assert "McNemar b=1, c=1, p=1.000" in report  # finding 1's numbers
    assert "test accuracy 1.0000 vs 0.7000" in report and "p=0.250" in report  # finding 2
    assert "mean error overlap (Jaccard) 0.0000" in report and "0/3 pairs" in report  # finding 3
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
    assert f1["verdict"] == "not run" and "darts-derived" in f1["text"]
    assert f2["majority_strategy"] == "rover" and f2["vote_test"] == 0.0 and f2["verdict"] == "reproduced"
    assert f2["best_member_test"] == pytest.approx(1 / 6)
    assert f3["verdict"] == "reproduced" and f3["mean_error_overlap"] == 0.0
    report = (tmp_path / "report.md").read_text()
    assert "Finding 1: DARTS vs uniform placement -- not run" in report
    assert "No DARTS search trials: no alpha plot." in report
    assert result["files"]["plots"]["alpha"] == []
    assert pd.read_parquet(tmp_path / "tables" / "alpha.parquet").empty


def test_report_cli(ray_session, tmp_path, capsys):
    from pefttune.cli import main

    assert main(["report", str(classification_experiment()), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "finding 1" in out and "finding 2" in out and "finding 3" in out and "reproduced" in out
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
    report = (tmp_path / "report.md").read_text()
    assert report.count("-- not run") == 3 and "![alpha]" in report


def test_pairwise_trials_between_any_trials(ray_session):
    from pefttune.analysis.report import pairwise_trials

    exp = open_experiment(classification_experiment())
    t = by_name(exp)
    pairs, kappa = pairwise_trials(exp, [t["lora"], t["discrete"], t["derived"]])
    assert list(kappa.index) == [t["lora"].trial_id, t["discrete"].trial_id, t["derived"].trial_id]
    row = pairs.iloc[0]  # lora wrong {0,1,2}, discrete wrong {0,3,6,9}: both wrong on 0
    assert (row["mcnemar_b"], row["mcnemar_c"], row["both_wrong"]) == (3, 2, 1)
    assert row["error_overlap"] == pytest.approx(1 / 6)
    assert row["agreement"] == pytest.approx(0.5)  # same prediction on 4,5,7,8 + example 0 (both y+1)
