"""DARTS as a method: one search per seed, the seed-k placement retrained with seed k, per-layer convergence."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest

from pefttune.analysis.findings.darts_vs_uniform import darts_convergence, placement_agreement
from pefttune.config import parse_config
from pefttune.darts.run import retrain_plan
from pefttune.placement import Placement

BASE = {"name": "d", "backbone": "tiny-hubert", "methods": {"lora": {"rank": 2}, "bitfit": {}},
        "data": {"source": "synth", "task": "ks"}}


def _placement(*layers: str) -> str:
    return json.dumps({"num_layers": len(layers), "layers": list(layers)})


def _search(*outcomes):
    """Fake Ray results of finished DARTS search trials: (trial_id, seed, placement JSON)."""
    return [SimpleNamespace(error=None, metrics={"trial_id": tid, "seed": seed, "variant": "base",
                                                 "derived_placement": text, "derived_dev_loss": 1.0})
            for tid, seed, text in outcomes]


def test_searches_default_to_the_training_seeds_and_another_list_is_refused():
    config = parse_config({**BASE, "train": {"seeds": [0, 1, 2]}})
    assert config.darts.retrain == "per-seed" and config.darts_seeds == [0, 1, 2]
    with pytest.raises(ValueError, match="darts.seeds: \\[0\\], but with darts.retrain 'per-seed'"):
        parse_config({**BASE, "train": {"seeds": [0, 1, 2]}, "darts": {"seeds": [0]}})
    old = parse_config({**BASE, "train": {"seeds": [0, 1, 2]}, "darts": {"retrain": "every-seed"}})
    assert old.darts_seeds == [0]


def test_per_seed_retrains_pair_each_placement_with_its_own_seed_under_one_configuration():
    config = parse_config({**BASE, "train": {"seeds": [0, 1, 2]}})
    a, b = _placement("lora", "none"), _placement("bitfit", "lora")
    plan = retrain_plan(config, _search(("t2", 2, a), ("t0", 0, a), ("t1", 1, b)))
    methods = [(t["seed"], Placement.from_json(t["placement"]).layer_methods()) for t in plan.trials]
    assert methods == [(0, ["lora", "none"]), (1, ["bitfit", "lora"]), (2, ["lora", "none"])]
    assert {t["config_id"] for t in plan.trials} == {"darts-derived"}
    assert [t["derived_from"] for t in plan.trials] == [["t0 seed=0 variant=base"], ["t1 seed=1 variant=base"],
                                                        ["t2 seed=2 variant=base"]]
    every = parse_config({**BASE, "train": {"seeds": [0, 1, 2]}, "darts": {"retrain": "every-seed", "seeds": [0, 1]}})
    plan = retrain_plan(every, _search(("t0", 0, a), ("t1", 1, b)))
    assert len(plan.trials) == 6 and len({t["config_id"] for t in plan.trials}) == 2  # 2 placements x 3 seeds


def test_a_layer_that_did_not_converge_is_flagged_even_when_the_mean_converged():
    rows = []
    for layer, probs in enumerate([[0.97, 0.01, 0.01, 0.01], [0.4, 0.3, 0.2, 0.1], [0.97, 0.01, 0.01, 0.01]]):
        for method, p in zip("abcd", probs):
            rows.append({"trial_id": "t0", "epoch": 3, "layer": layer, "method": method, "prob": p})
            rows.append({"trial_id": "t0", "epoch": 2, "layer": layer, "method": method, "prob": 0.25})
    conv = darts_convergence(pd.DataFrame(rows), threshold=0.7)
    trial = conv.trials["t0"]
    assert conv.converged and trial.entropy_norm_mean < 0.7
    assert trial.unconverged_layers == (1,) and trial.entropy_norm[1] == pytest.approx(0.923, abs=1e-3)
    assert conv.summary()["trials"]["t0"]["unconverged_layers"] == [1]


def test_placement_agreement_counts_layers_in_common():
    rows = [["lora", "none", "bitfit"], ["lora", "bitfit", "bitfit"], ["lora", "none", "none"]]
    agreement = placement_agreement(rows)
    assert agreement.layers_in_common == (0,) and agreement.searches == 3
    assert agreement.pairwise_same_layers_mean == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)
    assert placement_agreement(rows[:1]) is None


def test_the_retrain_plan_does_not_depend_on_the_order_ray_returns_the_searches_in(tmp_path):
    from pefttune.runtime.plan import check_plan, write_plan

    config = parse_config({**BASE, "train": {"seeds": [0, 1]}, "darts": {"retrain": "every-seed", "seeds": [0, 1]}})
    a = _placement("lora", "none")
    searches = [("t0", 0, a), ("t1", 1, a)]  # both derive the same placement: one configuration, two sources
    first = retrain_plan(config, _search(*searches))
    write_plan(str(tmp_path), first)
    again = retrain_plan(config, _search(*reversed(searches)))  # a restored experiment's order
    assert again.trials == first.trials
    assert first.trials[0]["derived_from"] == ["t0 seed=0 variant=base", "t1 seed=1 variant=base"]
    check_plan(str(tmp_path), type(first)(list(reversed(first.trials)), first.inputs))  # order alone: resumes
