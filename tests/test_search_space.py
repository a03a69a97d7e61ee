"""The discrete search space, fixed points, samplers and the Optuna searcher's bookkeeping
(PRUNED for early-stopped trials, full-epoch reports, budget constraints, orphans), with a
real sqlite Optuna storage and Ray's searcher API called the way Tune calls it."""
from __future__ import annotations

import json
import pickle

import optuna
import pytest
from optuna.trial import TrialState

from pefttune.config import parse_config
from pefttune.placement import Placement
from pefttune.schema import TrialReport, metric_key
from pefttune.search.optuna_search import (
    Objective,
    PefttuneSearch,
    PefttuneSearchGenerator,
    classify_result,
    experiment_trial_ids,
    make_sampler,
    make_storage,
)
from pefttune.search.space import FixedPoint, fixed_points, layer_param, validate_space
from pefttune.backbones import backbone_info

optuna.logging.set_verbosity(optuna.logging.WARNING)

BEST = metric_key("dev", "accuracy", best=True)
METHODS = {"lora": {"rank": [4, 8]}, "sequential": {"bottleneck": [8, 32]}, "bitfit": {}}


def make_config(**overrides):
    data = {"backbone": "tiny-hubert", "methods": METHODS, "train": {"epochs": 3}}
    for key, value in overrides.items():
        if key in ("train", "search") and key in data:
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data)


@pytest.fixture
def info():
    return backbone_info("tiny-hubert")


def make_search(tmp_path, config, info, multi=False):
    space = validate_space(config, info)
    objective = Objective(BEST, "max", config.train.epochs, multi_objective=multi)
    return PefttuneSearch(
        space,
        objective,
        sampler=make_sampler(config, space),
        storage=make_storage(f"sqlite:///{tmp_path / 'optuna.db'}"),
        study_name="test",
        points=fixed_points(config),
    )


def test_space_covers_every_layer_and_conditional_hparams(tmp_path, info):
    config = make_config(search={"algorithm": "random"})
    search = make_search(tmp_path, config, info)
    seen_params = set()
    for i in range(20):
        out = search.suggest(f"t{i}")
        placement = Placement.from_json(out["placement"])
        assert placement.num_layers == info.num_layers
        assert out["peft_params"] == placement.trainable_parameters(info)
        if out["kind"] != "discrete":
            continue
        layers = [out[layer_param(i)] for i in range(info.num_layers)]
        assert placement.layer_methods() == layers
        # a method's hyper-parameter is a parameter only when a layer uses the method
        assert ("lora.rank" in out) == ("lora" in layers)
        assert ("sequential.bottleneck" in out) == ("sequential" in layers)
        for layer in placement.layers:
            for choice in layer:
                if choice.method == "lora":
                    assert choice.hparams["rank"] == out["lora.rank"]
        seen_params.update(layers)
    assert seen_params == {"none", "lora", "sequential", "bitfit"}


def test_fixed_points_come_first_tagged_and_in_the_study(tmp_path, info):
    config = make_config()
    search = make_search(tmp_path, config, info)
    outs = [search.suggest(f"t{i}") for i in range(5)]
    assert [(o["kind"], o["method"]) for o in outs[:4]] == [
        ("uniform", "lora"), ("uniform", "sequential"), ("uniform", "bitfit"), ("hybrid", None),
    ]
    assert outs[4]["kind"] == "discrete"
    for out in outs[:3]:
        placement = Placement.from_json(out["placement"])
        assert placement.layer_methods() == [out["method"]] * info.num_layers
        assert out["lr"] == config.train.lr
    hybrid = Placement.from_json(outs[3]["placement"])
    # search.hybrid: true is the study's mix, whatever the candidates
    assert hybrid.layer_methods() == ["sequential+parallel+lora"] * info.num_layers
    assert [c.hparams[h] for c, h in zip(hybrid.layers[0], ("bottleneck", "bottleneck", "rank"))] == [10, 10, 2]
    trials = search.study.get_trials()
    assert [t.user_attrs["kind"] for t in trials] == ["uniform"] * 3 + ["hybrid", "discrete"]
    assert trials[0].params[layer_param(0)] == "lora"


def test_lr_is_drawn_from_the_grid_and_the_grid_sampler_enumerates_it(tmp_path, info):
    config = make_config(train={"lr_grid": [1e-3, 1e-2]}, search={"uniform_baselines": False, "hybrid": False})
    search = make_search(tmp_path, config, info)
    lrs = [search.suggest(f"t{i}")["lr"] for i in range(6)]
    assert set(lrs) <= {1e-3, 1e-2}
    grid = make_config(methods={"bitfit": {}}, train={"lr_grid": [1e-3, 1e-2]},
                       search={"algorithm": "grid", "uniform_baselines": False, "hybrid": False})
    space = validate_space(grid, info)
    assert space.grid()["lr"] == [1e-3, 1e-2] and space.grid_size() == 2 * 2**info.num_layers


def test_grid_enumerates_distinct_points(tmp_path, info):
    config = make_config(methods={"bitfit": {}}, search={"algorithm": "grid", "uniform_baselines": False, "hybrid": False})
    search = make_search(tmp_path, config, info)
    size = search._space.grid_size()
    assert size == 2**info.num_layers  # none or bitfit in every layer
    seen = {search.suggest(f"t{i}")["placement"] for i in range(size)}
    assert len(seen) == size


def test_budget_constraint_is_recorded(tmp_path, info):
    config = make_config(budget=3000)
    search = make_search(tmp_path, config, info)
    outs = [search.suggest(f"t{i}") for i in range(8)]
    for trial, out in zip(search.study.get_trials(), outs):
        assert trial.user_attrs["peft_params"] == out["peft_params"]
        assert trial.constraints["budget"] == out["peft_params"] - 3000
    exempt = make_config(budget=3000, search={"budget_exempt_fixed": True})
    (tmp_path / "x").mkdir()
    search = make_search(tmp_path / "x", exempt, info)
    out = search.suggest("u")
    assert out["budget_exempt"] is True and search.study.get_trials()[0].constraints["budget"] == 0.0


def row(epoch: int, best: float, **fields) -> dict:
    """A trial's reported row as the searcher receives it (the schema's, not built by hand)."""
    return TrialReport("accuracy", {}, epoch, best_dev=best, **fields).row()


def test_classify_result():
    objective = Objective(BEST, "max", max_epochs=3)
    full = row(3, 0.5)
    assert classify_result(objective, full, error=False) == (TrialState.COMPLETE, [0.5])
    assert classify_result(objective, {**full, "epoch": 1}, error=False) == (TrialState.PRUNED, None)
    assert classify_result(objective, full, error=True) == (TrialState.FAIL, None)
    assert classify_result(objective, None, error=False) == (TrialState.PRUNED, None)
    over = row(0, 0.0, over_budget=True)
    assert classify_result(objective, over, error=False) == (TrialState.COMPLETE, [0.0])
    assert classify_result(objective, row(3, float("nan")), False)[0] == TrialState.FAIL
    multi = Objective(BEST, "max", 3, multi_objective=True)
    with_params = TrialReport("accuracy", {"trainable_params": 100}, 3, best_dev=0.5).row()
    assert classify_result(multi, with_params, False) == (TrialState.COMPLETE, [0.5, 100.0])


def test_searcher_prunes_early_stopped_trials(tmp_path, info):
    """Ray calls on_trial_result per epoch and on_trial_complete with the last result, also
    when ASHA stops a trial: such a trial must be PRUNED in the study, not COMPLETE."""
    config = make_config(search={"uniform_baselines": False, "hybrid": False})
    search = make_search(tmp_path, config, info)
    for trial_id in ("full", "stopped", "error", "over"):
        search.suggest(trial_id)
    search.on_trial_result("over", row(0, 0.0, over_budget=True))
    search.on_trial_complete("over", row(0, 0.0, over_budget=True))
    for epoch, score in [(1, 0.3), (2, 0.4)]:
        search.on_trial_result("full", row(epoch, score))
    search.on_trial_result("full", row(2, 0.4))  # re-reported after a restore
    search.on_trial_complete("full", row(3, 0.6))  # stopped at max_t
    search.on_trial_result("stopped", row(1, 0.2))
    # the result on which ASHA stops a trial reaches the searcher only through on_trial_complete
    search.on_trial_complete("stopped", row(2, 0.25))
    search.on_trial_complete("error", error=True)
    search.on_trial_complete("error", error=True)  # twice: ignored
    # a driver killed after Optuna was told of a trial, before Ray saved that it had ended: after the
    # resume Ray runs it again from its checkpoint and reports an epoch Optuna never saw
    search._reported_steps.pop("stopped")
    search._completed_trials.discard("stopped")
    search.on_trial_result("stopped", row(3, 0.3))  # no error: the finished trial is left as it is
    search.on_trial_complete("stopped", row(3, 0.3))
    trials = search.study.get_trials()
    states = [t.state for t in trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].value == 0.6 and trials[0].intermediate_values == {1: 0.3, 2: 0.4, 3: 0.6}
    assert trials[1].value == 0.25  # a pruned trial keeps its last full-epoch value
    assert trials[1].intermediate_values == {1: 0.2, 2: 0.25}
    assert trials[3].intermediate_values == {}  # the zero-epoch row is not a full-epoch metric
    # Ray's own OptunaSearch would have told the early-stopped trial COMPLETE
    from ray.tune.search.optuna import OptunaSearch

    plain = OptunaSearch(space=search._space, metric=BEST, mode="max",
                         storage=make_storage(f"sqlite:///{tmp_path / 'plain.db'}"), study_name="plain")
    plain.suggest("stopped")
    plain.on_trial_result("stopped", {**row(1, 0.2), "training_iteration": 1})
    plain.on_trial_complete("stopped", row(1, 0.2))
    assert plain._ot_study.get_trials()[0].state == TrialState.COMPLETE


def test_searcher_state_round_trip_fails_orphans(tmp_path, info):
    config = make_config()
    search = make_search(tmp_path, config, info)
    search.suggest("a")
    search.save(str(tmp_path / "searcher.pkl"))
    search.suggest("b")  # asked after the last save: Ray will not know it after a crash
    restored = pickle.loads(pickle.dumps(search))  # what Tuner.restore does with tuner.pkl
    restored.restore(str(tmp_path / "searcher.pkl"))
    states = [t.state for t in restored.study.get_trials()]
    assert states[:2] == [TrialState.RUNNING, TrialState.FAIL]
    assert set(states[2:]) == {TrialState.WAITING}  # fixed points not asked yet
    restored.on_trial_complete("a", row(3, 0.7))
    assert restored.study.get_trials()[0].state == TrialState.COMPLETE
    # the fixed points are not enqueued a second time by a new searcher on the same study
    again = make_search(tmp_path, config, info)
    waiting = [t for t in again.study.get_trials() if t.state == TrialState.WAITING]
    assert len(waiting) == len(fixed_points(config)) - 2


def write_experiment_state(directory, trial_ids, session="2026-12-08_00-00-00"):
    """An experiment state file as Ray's TuneController writes it (the trials' JSON inside JSON)."""
    trial_data = [[json.dumps({"trial_id": t, "status": "RUNNING"}), "{}"] for t in trial_ids]
    path = directory / f"experiment_state-{session}.json"
    path.write_text(json.dumps({"trial_data": trial_data, "runner_data": {}, "stats": {}}))
    return path


def test_restored_searcher_follows_the_experiment_state(tmp_path, info):
    """A kill between Ray's save of the experiment state and of the searcher's leaves them a
    trial apart, either way round: the restored links are the experiment's."""
    config = make_config()
    state = tmp_path / "state"
    state.mkdir()
    # the experiment state saved, the searcher's not: the experiment holds "b", the searcher forgot it
    search = make_search(tmp_path, config, info)
    search.suggest("a")
    search.save_to_dir(str(state), "s1")
    search.suggest("b")
    write_experiment_state(state, ["a", "b"])
    restored = pickle.loads(pickle.dumps(search))
    restored.restore_from_dir(str(state))
    assert set(restored._ot_trials) == {"a", "b"}
    assert [t.state for t in restored.study.get_trials()[:2]] == [TrialState.RUNNING, TrialState.RUNNING]
    restored.on_trial_complete("b", row(3, 0.7))  # told to its own Optuna trial, not lost
    assert restored.study.get_trials()[1].state == TrialState.COMPLETE
    # the searcher's state saved, the experiment's not: the searcher links "c", the experiment lacks it
    search.suggest("c")
    search.save_to_dir(str(state), "s2")
    write_experiment_state(state, ["a", "b"], session="2026-12-08_00-00-01")  # the newer file wins
    again = pickle.loads(pickle.dumps(search))
    again.restore_from_dir(str(state))
    assert set(again._ot_trials) == {"a", "b"}
    assert again.study.get_trials()[2].state == TrialState.FAIL  # asked, never run: its place is free
    assert experiment_trial_ids(str(state)) == {"a", "b"}
    assert experiment_trial_ids(str(tmp_path)) is None  # no experiment state: Ray's restore as it was


def test_restored_search_generator_counts_the_experiments_trials(tmp_path, info):
    from ray.tune.experiment import Experiment

    config = make_config()
    state = tmp_path / "state"
    state.mkdir()
    generator = PefttuneSearchGenerator(make_search(tmp_path, config, info))
    generator.add_configurations(Experiment("grid", lambda config: None, num_samples=5))
    generator._counter = 2  # two trials created when the search state was saved
    generator.save_to_dir(str(state), "s1")
    write_experiment_state(state, ["a", "b", "c"])  # a third created before the kill, in the experiment state
    restored = PefttuneSearchGenerator(make_search(tmp_path, config, info))  # what Tuner.restore builds
    restored.restore_from_dir(str(state))
    assert restored._counter == 3 and not restored.is_finished()
    write_experiment_state(state, ["a"], session="2026-12-08_00-00-01")  # saved before the second was created
    restored.restore_from_dir(str(state))
    assert restored._counter == 1  # the lost place is suggested again


def test_multi_objective_samplers(tmp_path, info):
    for algorithm in ("tpe", "nsga2", "random"):
        config = make_config(search={"algorithm": algorithm, "multi_objective": True, "uniform_baselines": False, "hybrid": False})
        (tmp_path / algorithm).mkdir()
        search = make_search(tmp_path / algorithm, config, info, multi=True)
        assert search.study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
        for i in range(4):
            out = search.suggest(f"t{i}")
            search.on_trial_complete(f"t{i}", TrialReport("accuracy", {"trainable_params": out["peft_params"]}, 3,
                                                           best_dev=0.1 * i).row())
        assert all(t.state == TrialState.COMPLETE for t in search.study.get_trials())
        assert search.study.best_trials


def test_fixed_point_validation(info):
    with pytest.raises(ValueError, match="needs a method"):
        FixedPoint("uniform")
    with pytest.raises(ValueError, match="explicit placement"):
        FixedPoint("darts-derived")
    config = make_config()
    space = validate_space(config, info)
    with pytest.raises(ValueError, match="not a candidate"):
        space.fixed_placement(FixedPoint("uniform", method="prefix"))
    derived = FixedPoint("darts-derived", placement={"num_layers": 4, "layers": ["lora", "none", "bitfit", "none"]})
    assert space.fixed_placement(derived).layer_methods() == ["lora", "none", "bitfit", "none"]
    assert json.dumps(derived.to_attr())  # stored as an Optuna user attribute


def test_asha_never_stops_uniform_baselines_or_the_hybrid(tmp_path):
    """ASHA prunes bad searched trials, but fixed points always run to the last epoch."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from pefttune.config import parse_config
    from pefttune.search.run import build_search_plan, build_scheduler
    from test_search_fixtures import search_config

    config = parse_config(search_config(tmp_path / "m.parquet", tmp_path / "out",
                                        train={"epochs": 4},
                                        search={"scheduler": "asha", "grace_period": 1, "reduction_factor": 2}))
    scheduler = build_scheduler(build_search_plan(config))
    metric = scheduler._metric
    trials = {name: SimpleNamespace(trial_id=name, config={"kind": kind})
              for name, kind in [("good1", "discrete"), ("good2", "discrete"), ("bad", "discrete"),
                                 ("base", "uniform"), ("mix", "hybrid")]}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)
    scores = {"good1": 0.9, "good2": 0.8, "bad": 0.1, "base": 0.05, "mix": 0.05}
    decisions = {name: scheduler.on_trial_result(None, trials[name], {"epoch": 1, metric: scores[name]})
                 for name in ["good1", "good2", "bad", "base", "mix"]}
    assert decisions["bad"] == TrialScheduler.STOP  # a bad searched trial is pruned
    assert decisions["base"] == TrialScheduler.CONTINUE and decisions["mix"] == TrialScheduler.CONTINUE
    # the fixed points enter no rung: a searched trial is ranked against the searched ones only (they continue
    # their learning-rate rung, so their first report comes from a later epoch, at a rate chosen for them)
    late = SimpleNamespace(trial_id="late", config={"kind": "discrete"})
    scheduler.on_trial_add(None, late)
    for name in ("base", "mix"):
        scheduler.on_trial_result(None, trials[name], {"epoch": 3, metric: 0.99})
        scheduler.on_trial_complete(None, trials[name], {"epoch": 4, metric: 0.99})
    milestone, recorded = scheduler._trial_info["late"]._rungs[-1]
    assert milestone == 1 and set(recorded) == {"good1", "good2", "bad"}
    assert scheduler.on_trial_result(None, late, {"epoch": 1, metric: 0.85}) == TrialScheduler.CONTINUE
