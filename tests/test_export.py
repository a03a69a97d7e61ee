"""Export tables over a real Ray experiment dir (see test_analysis for the crafted trials)."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from pefttune.analysis.export import export_experiment
from pefttune.analysis.tables import (
    ALPHA_COLUMNS,
    ENSEMBLE_COLUMNS,
    TABLES,
    alpha_table,
    history_table,
    predictions_table,
    trials_table,
)
from pefttune.analysis.store import open_results
from test_analysis import by_name, classification_experiment, ctc_experiment


@pytest.fixture(scope="module")
def exp(ray_session):
    return open_results(classification_experiment())


@pytest.fixture(scope="module")
def exported(exp, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    files = export_experiment(exp, out)
    return out, files


def test_export_writes_every_table_as_parquet_and_csv(exported):
    out, files = exported
    assert set(files) == {f"{t}.{f}" for t in TABLES for f in ("parquet", "csv")}
    for name, path in files.items():
        assert path.parent == out and path.stat().st_size > 0, name
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # atomic: no temporary files left
    for table in TABLES:  # CSV and parquet hold the same rows and columns
        parquet = pd.read_parquet(out / f"{table}.parquet")
        csv = pd.read_csv(out / f"{table}.csv")
        assert list(parquet.columns) == list(csv.columns) and len(parquet) == len(csv), table


def test_trials_table_schema(exp, exported):
    out, _ = exported
    frame = pd.read_parquet(out / "trials.parquet")
    assert len(frame) == 10
    fixed = ["trial_id", "experiment", "trial_name", "status", "outcome", "usable", "kind", "method", "config_id",
             "seed", "metric",
             "dev_score", "best_dev_score", "test_score", "trainable_params", "epochs", "time_total_s",
             "wall_time_s", "start_time", "num_failures", "placement", "placement_short", "num_layers",
             "layer_00", "layer_01", "layer_02", "layer_03", "derived_placement", "error", "checkpoint",
             "has_predictions"]
    assert list(frame.columns[: len(fixed)]) == fixed
    for col in ("trial_id", "kind", "outcome", "layer_00", "placement", "config_id"):
        assert pd.api.types.is_string_dtype(frame[col]), col
    assert frame["seed"].dropna().astype(int).tolist() == [0] * int(frame["seed"].notna().sum())  # train.seed
    for col in ("dev_score", "best_dev_score", "test_score", "time_total_s", "wall_time_s"):
        assert frame[col].dtype == np.float64, col
    assert str(frame["trainable_params"].dtype) == "Int64" and str(frame["epochs"].dtype) == "Int64"
    assert frame["usable"].dtype == bool and frame["has_predictions"].dtype == bool
    # reported keys and the flattened config follow
    assert {"dev_accuracy", "test_accuracy", "lr", "over_budget", "config/trial/name"} <= set(frame.columns)
    rows = frame.set_index("config/trial/name")
    assert rows.loc["discrete", ["layer_00", "layer_01", "layer_02", "layer_03"]].tolist() == [
        "lora", "none", "bitfit", "lora"]
    assert rows.loc["hybrid", "layer_02"] == "sequential+lora"
    assert rows.loc["lora", "test_score"] == pytest.approx(0.7) and rows.loc["lora", "best_dev_score"] == 0.9
    assert rows.loc["lora", "trainable_params"] == 1000
    assert rows.loc["errored", "status"] == "ERROR" and "injected failure" in rows.loc["errored", "error"]
    assert pd.isna(rows.loc["early", "test_score"]) and rows.loc["early", "outcome"] == "stopped_early"
    assert rows.loc["darts", "kind"] == "darts" and '"lora"' in rows.loc["darts", "derived_placement"]
    assert rows.loc["derived", "experiment"] == "darts-retrain"
    assert rows["usable"].sum() == 6


def test_history_table(exp):
    frame = history_table(exp)
    assert list(frame.columns[:8]) == ["trial_id", "experiment", "kind", "method", "training_iteration", "epoch",
                                        "time_total_s", "time_this_iter_s"]
    assert not [c for c in frame.columns if c.startswith(("alpha/", "config/"))]
    assert str(frame["epoch"].dtype) == "Int64" and frame["dev_accuracy"].dtype == np.float64
    t = by_name(exp)
    per_trial = frame.groupby("trial_id")["epoch"].apply(list)
    assert per_trial[t["lora"].trial_id] == [1, 2]
    assert per_trial[t["darts"].trial_id] == [1, 2, 3]  # from progress.csv
    assert per_trial[t["early"].trial_id] == [1]
    lora = frame[frame["trial_id"] == t["lora"].trial_id]
    assert lora["dev_accuracy"].tolist() == pytest.approx([0.85, 0.9])


def test_alpha_table(exp, ctc_dir_exp):
    frame = alpha_table(exp)
    assert list(frame.columns) == ALPHA_COLUMNS
    assert len(frame) == 3 * 4 * 3  # epochs x layers x candidates
    assert frame["prob"].dtype == np.float64 and str(frame["layer"].dtype) == "Int64"
    sums = frame.groupby(["epoch", "layer"])["prob"].sum()
    assert np.allclose(sums, 1.0)  # the reported probabilities, not re-normalised
    last = frame[(frame["epoch"] == 3) & (frame["layer"] == 3)].set_index("method")["prob"]
    logits = np.array([0.0, 3 * 4 * 0.3, -3 * 0.2])
    assert last[["none", "lora", "bitfit"]].tolist() == pytest.approx((np.exp(logits) / np.exp(logits).sum()).tolist())
    empty = alpha_table(ctc_dir_exp)  # no DARTS: empty, with the columns
    assert empty.empty and list(empty.columns) == ALPHA_COLUMNS


@pytest.fixture(scope="module")
def ctc_dir_exp(ray_session):
    return open_results(ctc_experiment())


def test_predictions_table_classification(exp):
    frame = predictions_table(exp)
    assert list(frame.columns) == ["trial_id", "experiment", "kind", "method", "split", "index", "correct", "label",
                                   "pred", "prob_pred", "prob_0", "prob_1", "prob_2"]
    assert frame["index"].dtype == np.int64 and frame["correct"].dtype == bool and frame["prob_0"].dtype == np.float64
    t = by_name(exp)
    bitfit = frame[(frame["trial_id"] == t["bitfit"].trial_id) & (frame["split"] == "test")]
    assert sorted(bitfit.loc[~bitfit["correct"], "index"]) == [103, 104, 105]
    assert bitfit["prob_pred"].tolist() == pytest.approx([0.6] * 10)
    # 7 trials store test predictions (incl. the errored one), the early-stopped one dev only
    assert frame[frame["split"] == "test"]["trial_id"].nunique() == 7
    assert set(frame.loc[frame["trial_id"] == t["early"].trial_id, "split"]) == {"dev"}
    assert len(frame) == 7 * (10 + 20) + 20


def test_predictions_table_ctc(ctc_dir_exp):
    frame = predictions_table(ctc_dir_exp, splits=("test",))
    assert list(frame.columns) == ["trial_id", "experiment", "kind", "method", "split", "index", "correct", "ref",
                                   "hyp", "ref_len", "hyp_len", "edits", "frames"]
    lora = frame[frame["method"] == "lora"].sort_values("index")
    assert lora["ref"].tolist() == ["1 2", "3", "1 3", "2"]
    assert lora["hyp"].tolist() == ["1 3", "3", "1 3", "2"]
    assert lora["edits"].tolist() == [1, 0, 0, 0] and lora["correct"].tolist() == [False, True, True, True]
    assert lora["frames"].tolist() == [4, 4, 4, 3] and frame["edits"].dtype == np.int64


def test_ensembles_table_and_cli(exp, tmp_path, capsys):
    from pefttune.cli import main

    out = tmp_path / "cli"
    assert main(["export", str(classification_experiment()), "--out", str(out), "--format", "csv",
                 "--tables", "trials,ensembles"]) == 0
    assert sorted(os.listdir(out)) == ["ensembles.csv", "trials.csv"]
    assert "wrote" in capsys.readouterr().out
    table = pd.read_csv(out / "ensembles.csv")
    assert list(table.columns) == ENSEMBLE_COLUMNS
    assert table["ensemble_id"].tolist() == [f"{m}:{s}" for m in ("top-3", "per-method")
                                             for s in ("vote", "weighted", "soft", "caruana")]
    vote = table.set_index("ensemble_id").loc["per-method:vote"]
    assert vote["test_score"] == 1.0 and vote["n_members"] == 3 and vote["mcnemar_p"] == pytest.approx(0.25)
    assert main(["export", str(classification_experiment()), "--out", str(out), "--tables", "bogus"]) == 2
    assert trials_table(exp).equals(trials_table(exp))
