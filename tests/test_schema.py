"""The trial schema: kinds stored as plain strings, metric keys, the checkpoint names and the one
ranking of trials (ties by trial id)."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from pefttune.analysis.store import infer_kind
from pefttune.schema import TrialKind, metric_key, predictions_file, rank_trials
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
