"""The analysis layer over a REAL `run_search` experiment (2 uniform trials, 1 epoch)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pefttune.analysis import ensembles as E
from pefttune.analysis.ensemble_runner import load_members, run_ensembles
from pefttune.analysis.report import analyze
from pefttune.analysis.store import open_results
from pefttune.analysis.tables import trials_table

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def search_dir(ray_session, tmp_path_factory):
    from pefttune.config import parse_config
    from pefttune.search.run import run_search
    from test_search_fixtures import search_config, write_tone_manifest

    root = tmp_path_factory.mktemp("real-search")
    manifest = write_tone_manifest(root / "data", classes=3, per_split={"train": 4, "dev": 3, "test": 3})
    config = search_config(
        manifest, root / "storage", name="analysis-real",
        train={"epochs": 1, "max_steps_per_epoch": 2},
        search={"num_samples": 0, "hybrid": False, "max_failures": 0},
    )
    config["methods"] = {"lora": {"rank": 2}, "bitfit": {}}
    run_search(parse_config(config), verbose=0)
    return root / "storage" / "analysis-real"


def test_store_reads_a_real_search(search_dir):
    exp = open_results(search_dir)
    assert exp.ray_experiments == ["."] and exp.metric == "accuracy" and exp.name == "analysis-real"
    assert sorted((t.kind, t.method, t.outcome) for t in exp.trials) == [
        ("uniform", "bitfit", "completed"), ("uniform", "lora", "completed")]
    for trial in exp.trials:
        assert trial.layers == [trial.method] * 4 and trial.usable
        assert trial.trainable_params == trial.last_result["peft_params"] + trial.last_result["head_params"]
        arrays = exp.predictions(trial, "test")
        assert arrays["probs"].shape == (9, 3)
        # the reported test score is the one of the stored predictions
        assert float(np.mean(arrays["pred"] == arrays["label"])) == pytest.approx(exp.score(trial, "test"))
    frame = trials_table(exp)
    assert frame["layer_00"].tolist() == [t.method for t in exp.trials]


def test_ensemble_and_report_over_a_real_search(search_dir, tmp_path):
    exp = open_results(search_dir)
    run = run_ensembles(exp, "per-method", ["vote", "soft"])
    data = load_members(exp, run.trials, "test")
    assert run.result("vote").test_pred == E.majority_vote(data.probs).tolist()
    assert run.result("soft").test_score == pytest.approx(float(np.mean(E.soft_vote(data.probs)[0] == data.labels)))
    result = analyze(exp, tmp_path)
    assert result["findings"]["1"]["verdict"] == "not run"
    assert result["findings"]["2"]["verdict"] != "not run" and len(result["findings"]["3"]["pairs"]) == 1
    assert len(pd.read_parquet(tmp_path / "tables" / "predictions.parquet")) == 2 * (9 + 9)
    assert "### Finding 2:" in (tmp_path / "report.md").read_text()
