"""Replicates: the fixed points, the references and the best searched placements once per seed."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pefttune.analysis.store import open_results
from pefttune.analysis.tables import configs_table, trials_table
from pefttune.config import parse_config
from pefttune.schema import TrialKind
from pefttune.search.replicates import plan_replicates
from test_search_fixtures import search_config, search_row, write_tone_manifest


def _config(manifest, storage, **search):
    return parse_config(search_config(
        manifest, storage, methods={"lora": {"rank": [2]}, "bitfit": {}},
        train={"epochs": 1, "max_steps_per_epoch": 2, "seeds": [0, 1]},
        search={"num_samples": 2, "replicate_top": 1, "frozen_reference": True, **search},
        analysis={"logmel_reference": True},
    ))


def test_plan_covers_every_configuration_and_seed(tmp_path):
    config = _config(tmp_path / "m.parquet", tmp_path)
    search = pd.DataFrame([
        search_row("a", TrialKind.DISCRETE, 0.9, 10,
                   placement='{"num_layers": 4, "layers": ["lora", "none", "none", "none"]}'),
        search_row("b", TrialKind.DISCRETE, 0.5, 10,
                   placement='{"num_layers": 4, "layers": ["bitfit", "none", "none", "none"]}'),
    ])
    plan = plan_replicates(config, search)
    by_config = {}
    for r in plan:
        by_config.setdefault(r.config_id, []).append(r.seed)
    discrete = [cid for cid in by_config if cid.startswith("discrete:")]
    assert by_config["uniform:lora"] == [1] and by_config["uniform:bitfit"] == [1] and by_config["hybrid"] == [1]
    assert by_config["frozen"] == [0, 1] and by_config["log-mel"] == [0, 1]
    assert len(discrete) == 1 and by_config[discrete[0]] == [1]  # replicate_top 1: the best by dev only
    log_mel = next(r for r in plan if r.kind == "log-mel").trial_config()
    assert log_mel["backbone"] == "log-mel" and log_mel["placement"] == '{"num_layers":0,"layers":[]}'


@pytest.fixture(scope="module")
def replicated_search(ray_session, tmp_path_factory):
    from pefttune.search.run import run_search

    manifest = write_tone_manifest(tmp_path_factory.mktemp("tones"))
    storage = tmp_path_factory.mktemp("results")
    config = _config(manifest, storage)
    run_search(config, verbose=0)
    return config, Path(storage) / config.name


def test_replicate_trials_carry_seeds_and_config_ids(replicated_search):
    config, path = replicated_search
    trials = trials_table(open_results(path))
    done = trials[trials["outcome"] == "completed"]
    seeds = done.groupby("config_id")["seed"].apply(sorted).to_dict()
    assert seeds["uniform:lora"] == [0, 1] and seeds["uniform:bitfit"] == [0, 1] and seeds["hybrid"] == [0, 1]
    assert seeds["frozen"] == [0, 1] and seeds["log-mel"] == [0, 1]
    assert sum(cid.startswith("discrete:") and s == [0, 1] for cid, s in seeds.items()) == 1
    frozen = set(done[done["config_id"] == "frozen"]["trainable_params"])
    log_mel = set(done[done["config_id"] == "log-mel"]["trainable_params"])
    assert len(frozen) == 1 and len(log_mel) == 1 and frozen != log_mel  # head only; their inputs differ in width
    configs = configs_table(open_results(path)).set_index("config_id")
    assert configs.loc["uniform:lora", "n_seeds"] == 2 and configs.loc["uniform:lora", "seeds"] == "0,1"
    assert configs.loc["log-mel", "note"] == "" and configs.loc["frozen", "n_seeds"] == 2


def test_replicates_survive_resume(replicated_search):
    from pefttune.search.run import run_search

    config, path = replicated_search
    before = set(trials_table(open_results(path))["trial_id"])
    run_search(config, resume=True, verbose=0)  # nothing left: restores, trains nothing new
    after = trials_table(open_results(path))
    assert set(after["trial_id"]) == before
    assert (after[after["experiment"] == "replicates"]["outcome"] == "completed").all()
