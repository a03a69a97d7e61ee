"""The trial schema: kinds stored as plain strings, metric keys, what a trial reports, the
checkpoint names and state, and the one ranking of trials (ties by trial id)."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from pefttune.analysis.store import infer_kind
from pefttune.schema import (FILES_KEY, CheckpointState, TrialKind, TrialReport, listed_files, metric_key,
                             predictions_file, rank_trials, state_json)
from pefttune.search.replicates import Replicate
from pefttune.search.summary import top_k

STORED = ["uniform", "hybrid", "discrete", "frozen", "log-mel", "darts", "darts-derived"]


def test_kinds_are_the_stored_strings():
    assert [k.value for k in TrialKind] == STORED
    for kind, text in zip(TrialKind, STORED):
        assert kind == text and hash(kind) == hash(text) and TrialKind(text) is kind
        assert str(kind) == f"{kind}" == text


def test_kinds_round_trip_through_a_trial_config():
    for kind in TrialKind:
        config = Replicate("cid", kind.value, "", '{"num_layers": 0, "layers": []}', 0, lr=0.01).trial_config()
        assert json.dumps(config) == json.dumps({**config, "kind": str(kind)})
        assert TrialKind(json.loads(json.dumps(config))["kind"]) is kind
    log_mel = Replicate("log-mel", TrialKind.LOG_MEL.value, "", "{}", 0, lr=0.01).trial_config()
    assert log_mel["backbone"] == "log-mel"
    assert json.dumps({"kind": TrialKind.DARTS_DERIVED}) == '{"kind": "darts-derived"}'


def test_kinds_round_trip_through_the_trials_table(tmp_path):
    table = pd.DataFrame({"trial_id": [f"t{i}" for i in range(len(STORED))], "kind": [k.value for k in TrialKind]})
    table.to_parquet(tmp_path / "trials.parquet")
    back = pd.read_parquet(tmp_path / "trials.parquet")
    assert [TrialKind(k) for k in back["kind"]] == list(TrialKind)
    assert back["kind"].isin([TrialKind.UNIFORM, TrialKind.HYBRID]).tolist() == [True, True] + [False] * 5
    assert (back["kind"] != TrialKind.DARTS).sum() == len(STORED) - 1
    assert infer_kind(["lora"] * 4) == TrialKind.UNIFORM and type(infer_kind(["lora"] * 4)) is str
    assert infer_kind(["lora+bitfit"] * 2) == TrialKind.HYBRID and infer_kind(["lora", "none"]) == TrialKind.DISCRETE


def test_metric_key():
    assert metric_key("dev", "accuracy") == "dev_accuracy"
    assert metric_key("test", "accuracy") == "test_accuracy"
    assert metric_key("dev", "accuracy", best=True) == "best_dev_accuracy"
    assert metric_key("dev", "per", best=True) == "best_dev_per"
    assert predictions_file("test") == "test.safetensors"


def test_rank_trials_ties_by_trial_id():
    trials = [("b", 0.8), ("a", 0.8), ("c", 0.9), ("d", math.nan), ("e", None), ("f", 0.1)]
    score, ident = (lambda t: t[1]), (lambda t: t[0])
    assert [t[0] for t in rank_trials(trials, score, ident, "max")] == ["c", "a", "b", "f"]
    assert [t[0] for t in rank_trials(trials, score, ident, "min")] == ["f", "a", "b", "c"]
    with pytest.raises(ValueError, match="mode"):
        rank_trials(trials, score, ident, "best")


def test_search_top_k_breaks_ties_as_the_analysis_does():
    frame = pd.DataFrame({
        "trial_id": ["t2", "t1", "t0"], "kind": ["discrete"] * 3, "status": ["TERMINATED"] * 3,
        "over_budget": [False] * 3, "stopped_early": [False] * 3,
        "best_dev_accuracy": [0.8, 0.8, 0.7], "trainable_params": [100, 900, 10],
    })
    best = top_k(frame, metric_key("dev", "accuracy", best=True), "max", kinds=[TrialKind.DISCRETE])
    assert list(best["trial_id"]) == ["t1", "t2", "t0"]  # not the fewer parameters of t2


COLUMNS = {"placement_short": "L0:lora", "kind": "uniform", "method": "lora", "seed": 1, "trainable_params": 130}


def test_a_trained_epoch_reports_its_row_in_the_trainables_order():
    scores = {"train_loss": 0.9, "dev_accuracy": 0.5, "dev_loss": 1.1, "samples_per_s": 30.0, "epoch_seconds": 2.0}
    report = TrialReport("accuracy", COLUMNS, 2, scores, best_dev=0.6, best_epoch=1, over_budget=False,
                         start_epoch=1)
    row = report.row()
    assert list(row) == [*COLUMNS, "epoch", *scores, "best_dev_accuracy", "best_epoch", "over_budget", "start_epoch"]
    assert row["best_dev_accuracy"] == 0.6 and row["epoch"] == 2 and row["over_budget"] is False
    final = TrialReport("accuracy", COLUMNS, 3, scores, best_dev=0.6, best_epoch=1, over_budget=False, start_epoch=1,
                        final={"test_accuracy": 0.55, "test_loss": 1.2}).row()
    assert list(final)[-2:] == ["test_accuracy", "test_loss"]
    search = TrialReport("per", {"kind": TrialKind.DARTS.value}, 1, {"dev_per": 0.4}, best_dev=0.4, best_epoch=1,
                         start_epoch=1, extra={"derived_placement_short": "L0:none"}, final={"derived_dev_per": 0.5})
    assert list(search.row()) == ["kind", "epoch", "dev_per", "best_dev_per", "best_epoch", "start_epoch",
                                  "derived_placement_short", "derived_dev_per"]  # no over_budget: not reported


def test_a_rejected_trial_reports_one_row_that_says_so_first():
    row = TrialReport("accuracy", COLUMNS, 0, {"dev_accuracy": 0.0}, best_dev=0.0, best_epoch=0, over_budget=True,
                      extra={"budget": 100}).row()
    assert list(row) == [*COLUMNS, "over_budget", "epoch", "dev_accuracy", "best_dev_accuracy", "best_epoch", "budget"]
    assert TrialReport.from_row(row, "accuracy").rejected


def test_a_row_reads_back_through_the_schema():
    report = TrialReport("accuracy", COLUMNS, 3, {"train_loss": 0.2, "dev_accuracy": 0.7}, best_dev=0.75,
                         best_epoch=2, over_budget=False, start_epoch=2, final={"test_accuracy": 0.6})
    ray_row = {**report.row(), "training_iteration": 3, "time_total_s": 12.5, "trial_id": "abc", "done": True}
    back = TrialReport.from_row(ray_row, "accuracy")
    assert back.row() == report.row()  # the same items
    assert back.ray == {"training_iteration": 3, "time_total_s": 12.5, "trial_id": "abc", "done": True}
    assert back.kind == TrialKind.UNIFORM and back.dev_score == 0.7 and back.test_score == 0.6
    assert back.best_dev == 0.75 and back.epoch == 3 and not back.rejected
    unfinished = TrialReport.from_row({"kind": "darts", "epoch": 1, "best_dev_accuracy": 0.4}, "accuracy")
    assert unfinished.test_score is None and unfinished.kind == "darts" and unfinished.best_epoch is None
    assert TrialReport.from_row({}, "accuracy").kind is None


def test_checkpoint_state_and_its_file_list_round_trip():
    state = CheckpointState(epoch=2, best_score=0.5, best_epoch=1, finished=True, metrics={"test_accuracy": 0.5})
    text = state_json(state, {"model/adapter.safetensors": (12, "ab" * 32)})
    assert CheckpointState.from_json(text) == state
    assert listed_files(text) == {"model/adapter.safetensors": (12, "ab" * 32)}
    assert listed_files(state_json(state)) is None  # an older state without a file list
    assert json.loads(text)[FILES_KEY] == {"model/adapter.safetensors": [12, "ab" * 32]}
    with pytest.raises(ValueError, match="not valid JSON"):
        listed_files(text[:-10])
    with pytest.raises(ValueError, match="malformed"):
        listed_files(json.dumps({FILES_KEY: {"a": 3}}))
