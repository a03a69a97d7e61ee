"""Grid experiments store their trial configs as data; a resume rebuilds Ray's param_space from them."""
from __future__ import annotations

import pandas as pd
import pytest
import yaml

from pefttune.config import parse_config
from pefttune.runtime.study_dir import changed_fields, check_same_config, config_yaml
from pefttune.runtime.plan import POINT, GridPlan, check_plan, grid_space, read_plan, write_plan
from pefttune.search.replicates import replicates_plan

BASE = {"name": "p", "backbone": "tiny-hubert", "methods": {"lora": {"rank": 2}, "bitfit": {}},
        "data": {"source": "synth", "task": "ks"}, "train": {"seeds": [0, 1, 2]}}


def test_a_plan_is_stored_as_data_and_read_back(tmp_path):
    plan = GridPlan([{"seed": 1, "placement": '{"a": 1}'}, {"seed": 2, "placement": '{"a": 2}'}], {"train.seeds": [0, 1]})
    write_plan(str(tmp_path), plan)
    assert read_plan(str(tmp_path)) == plan and read_plan(str(tmp_path / "none")) is None
    assert "__fn_ph" not in (tmp_path / "plan.json").read_text()


def test_the_param_space_resolves_every_key_from_the_plan_by_point():
    trials = [{"seed": 1, "placement": "x"}, {"seed": 2, "placement": "y"}]
    space = grid_space(trials)
    assert space[POINT] == {"grid_search": [0, 1]}
    assert [space["placement"].func({POINT: i}) for i in (0, 1)] == ["x", "y"]
    assert [space["seed"].func({POINT: i}) for i in (0, 1)] == [1, 2]


def test_a_resume_that_would_plan_otherwise_is_refused_naming_the_field(tmp_path):
    config = parse_config(BASE)
    stored = replicates_plan(config, pd.DataFrame())
    write_plan(str(tmp_path), stored)
    check_plan(str(tmp_path), replicates_plan(config, pd.DataFrame()))  # the same: resumes
    more = parse_config({**BASE, "train": {"seeds": [0, 1, 2, 3]}})
    with pytest.raises(ValueError, match="planned with other values of train.seeds"):
        check_plan(str(tmp_path), replicates_plan(more, pd.DataFrame()))
    same_inputs = GridPlan(stored.trials[:-1], stored.inputs)
    with pytest.raises(ValueError, match="1 planned trial\\(s\\) no longer given"):
        check_plan(str(tmp_path), same_inputs)


def test_a_changed_config_is_named_by_its_dotted_fields(tmp_path):
    saved = parse_config(BASE)
    (tmp_path / "experiment.yaml").write_text(config_yaml(saved))
    changed = parse_config({**BASE, "train": {"seeds": [0, 1]}, "budget": 1000})
    with pytest.raises(ValueError, match="differs from .* in budget, train.seeds"):
        check_same_config(changed, str(tmp_path / "experiment.yaml"))
    assert changed_fields({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"b": 1, "c": 3}, "d": 1}) == ["a.c"]
    assert yaml.safe_load(config_yaml(saved))["train"]["seeds"] == [0, 1, 2]
