"""The learning-rate protocol: the rule, the choices reaching every trial config and the tables, the
old key refused, and a tuning that resumes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from pefttune.config import parse_config
from pefttune.schema import CONTINUES, STOP_EPOCH, TrialKind
from pefttune.tuning import (LrChoice, LrChoices, LrProtocol, choices_from_frame, choose_rate, protocol_lines,
                             rung_trials, trial_epochs)
from test_search_fixtures import search_config, search_row, write_tone_manifest

GRID = [0.003, 0.01, 0.03]


def _dev(rate: float) -> float:
    """A fake scorer: dev accuracy peaks at lr 0.01 (log-scale parabola)."""
    return 0.8 - 0.1 * (math.log10(rate) + 2) ** 2


def test_the_best_dev_rate_is_chosen_ties_to_the_smaller_failed_rates_left_out():
    assert choose_rate({r: _dev(r) for r in GRID}) == 0.01
    assert choose_rate({0.003: 0.5, 0.01: 0.7, 0.03: 0.7}) == 0.01  # a tie: the smaller rate
    assert choose_rate({0.003: 0.5, 0.01: None, 0.03: float("nan")}) == 0.003  # failed: left out
    assert choose_rate({0.003: None}) is None
    assert choose_rate({0.003: 0.30, 0.01: 0.25, 0.03: 0.40}, mode="min") == 0.01  # error rates: lower is better


def test_rung_trials_stop_at_the_share_of_each_trials_epochs_and_a_reference_tunes_its_head():
    protocol = LrProtocol(tuple(GRID), rung=0.2)
    assert [protocol.rung_epochs(e) for e in (1, 2, 5, 6, 30)] == [1, 1, 1, 2, 6]
    candidates = [{"config_id": "uniform:lora", "kind": "uniform", "epochs": 5, "lr": 0.01, "head_lr": None},
                  {"config_id": "log-mel", "kind": "log-mel", "epochs": 30, "lr": 0.01, "head_lr": None}]
    trials = rung_trials(protocol, candidates)
    assert [(t["config_id"], t["lr"], t[STOP_EPOCH]) for t in trials] == [
        ("uniform:lora", r, 1) for r in GRID] + [("log-mel", r, 6) for r in GRID]
    assert [t["head_lr"] for t in trials] == [None] * 3 + GRID  # the head alone trains: the rate is its head's
    assert len({tuple(sorted(t)) for t in trials}) == 1  # the same keys in every trial (a grid plan)
    # the references' own grid (the head alone takes larger rates): theirs only, the rest keep the grid
    own = LrProtocol(tuple(GRID), rung=0.2, reference_grid=(0.01, 0.03, 0.1))
    trials = rung_trials(own, candidates)
    assert [(t["config_id"], t["lr"], t["head_lr"]) for t in trials] == [
        ("uniform:lora", r, None) for r in GRID] + [("log-mel", r, r) for r in (0.01, 0.03, 0.1)]
    assert own.grid_of("frozen") == (0.01, 0.03, 0.1) and own.grid_of("uniform") == tuple(GRID)
    assert "the references, which train the head alone: [0.01, 0.03, 0.1]" in own.rule(5, 30)
    late = LrProtocol(tuple(GRID), rung=0.2, reference_grid=(0.01, 0.1), reference_rung=0.9)  # the references' rung
    assert [t[STOP_EPOCH] for t in rung_trials(late, candidates)] == [1, 1, 1, 27, 27]
    assert late.rung_epochs(30, "log-mel") == 27 and late.rung_epochs(30, "uniform") == 6
    assert "the first 1 of its 5 epochs (the references: 27 of 30)" in late.rule(5, 30)
    assert "the references, which train" not in protocol.rule(5, 30)


def test_choices_from_a_rung_with_a_fake_scorer():
    rows = []
    for cid in ("uniform:lora", "frozen"):
        for rate in GRID:
            best = _dev(rate) + (0.05 if cid == "frozen" and rate == 0.03 else 0.0)
            rows.append(search_row(f"{cid}-{rate}", TrialKind.UNIFORM, best, 10, config_id=cid, lr=rate,
                                   **{STOP_EPOCH: 1}))
    rows.append(search_row("over", TrialKind.UNIFORM, 0.0, 10, config_id="uniform:big", lr=0.01, over_budget=True,
                           **{STOP_EPOCH: 1}))
    rows.append(search_row("err", TrialKind.UNIFORM, float("nan"), 10, config_id="uniform:big", lr=0.03,
                           status="ERROR", **{STOP_EPOCH: 1}))
    choices = choices_from_frame(pd.DataFrame(rows), LrProtocol(tuple(GRID)), "accuracy", "max", default=0.02)
    assert choices.lr("uniform:lora", 0.02) == 0.01 and choices.lr("frozen", 0.02) == 0.03
    assert choices.choices["uniform:lora"].scores == [(r, pytest.approx(_dev(r))) for r in GRID]
    big = choices.choices["uniform:big"]
    assert big.lr == 0.02 and "no rate of the grid trained" in big.note and big.scores == [(0.01, None), (0.03, None)]
    assert choices.lr("not-tuned", 0.02) == 0.02
    assert LrChoices.from_json(choices.to_json()) == choices


def test_the_old_key_is_refused_and_the_grid_validated():
    with pytest.raises(ValueError, match="train.lr_range: replaced by train.lr_grid"):
        parse_config({"train": {"lr_range": [0.001, 0.01]}})
    with pytest.raises(ValueError, match="train.lr_grid: must be a non-empty list of rates > 0"):
        parse_config({"train": {"lr_grid": [0.01, 0]}})
    with pytest.raises(ValueError, match="train.lr_grid: rates must be distinct"):
        parse_config({"train": {"lr_grid": [0.01, 0.01]}})
    with pytest.raises(ValueError, match="train.lr_rung"):
        parse_config({"train": {"lr_grid": GRID, "lr_rung": 1.0}})
    config = parse_config({"train": {"lr_grid": [0.03, 0.003, 0.01], "epochs": 5, "reference_epochs": 20}})
    assert config.train.lr_grid == GRID and "lr_range" not in config.model_dump()["train"]
    assert trial_epochs(config, "log-mel") == 20 and trial_epochs(config, "uniform") == 5
    assert LrProtocol.of(parse_config({})) is None
    references = parse_config({"train": {"lr_grid": GRID, "reference_lr_grid": [0.1, 0.03]}})
    assert LrProtocol.of(references).reference_grid == (0.03, 0.1) and LrProtocol.of(config).reference_grid is None
    with pytest.raises(ValueError, match="train.reference_lr_grid: used by the learning-rate protocol"):
        parse_config({"train": {"reference_lr_grid": [0.1]}})
    with pytest.raises(ValueError, match="train.reference_lr_rung: used by the learning-rate protocol"):
        parse_config({"train": {"reference_lr_rung": 0.9}})
    assert LrProtocol.of(parse_config({"train": {"lr_grid": GRID, "reference_lr_rung": 0.9}})).reference_rung == 0.9
    with pytest.raises(ValueError, match="train.reference_lr_grid: must be a non-empty list"):
        parse_config({"train": {"lr_grid": GRID, "reference_lr_grid": []}})


def test_the_chosen_rates_reach_every_trial_config(tmp_path):
    from pefttune.backbones import backbone_info
    from pefttune.darts.run import retrain_plan
    from pefttune.search.replicates import plan_replicates
    from pefttune.search.space import fixed_points, validate_space, with_rates

    config = parse_config(search_config(
        tmp_path / "m.parquet", tmp_path, methods={"lora": {"rank": 2}, "bitfit": {}},
        train={"epochs": 2, "seeds": [0, 1], "lr_grid": GRID, "reference_epochs": 6},
        search={"replicate_top": 1, "frozen_reference": True, "hybrid": False}, analysis={"logmel_reference": True}))
    choices = LrChoices({cid: LrChoice(cid, rate, [], 1, checkpoint=f"/rungs/{cid}", seed=0) for cid, rate in
                         (("uniform:lora", 0.003), ("uniform:bitfit", 0.03), ("frozen", 0.01), ("log-mel", 0.03),
                          ("darts-derived", 0.03))})
    searched = '{"num_layers": 4, "layers": ["lora", "none", "none", "none"]}'
    search = pd.DataFrame([search_row("a", TrialKind.DISCRETE, 0.9, 10, placement=searched, lr=0.01)])
    trials = {(r.config_id, r.seed): r.trial_config() for r in plan_replicates(config, search, choices)}
    assert trials["uniform:lora", 1]["lr"] == 0.003 and trials["uniform:bitfit", 1]["lr"] == 0.03
    assert trials["uniform:lora", 1]["head_lr"] is None and trials["uniform:lora", 1]["epochs"] == 2
    for seed in (0, 1):  # the references: every seed, their head at the chosen rate, their own epochs
        assert (trials["frozen", seed]["lr"], trials["frozen", seed]["head_lr"], trials["frozen", seed]["epochs"]) \
            == (0.01, 0.01, 6)
        assert trials["log-mel", seed]["head_lr"] == 0.03
    discrete = next(t for (cid, _), t in trials.items() if cid.startswith("discrete:"))
    assert discrete["lr"] == 0.01  # a searched placement keeps the rate its search drew
    # the first seed continues the chosen rate's rung; every other trial starts from scratch
    assert {key: t[CONTINUES] for key, t in trials.items() if t[CONTINUES]} == {
        ("frozen", 0): "/rungs/frozen", ("log-mel", 0): "/rungs/log-mel"}

    points = with_rates(fixed_points(config), choices)  # the first seed, in the search
    assert {p.extra["config_id"]: p.lr for p in points} == {"uniform:lora": 0.003, "uniform:bitfit": 0.03}
    assert {p.extra["config_id"]: p.extra[CONTINUES] for p in points} == {
        "uniform:lora": "/rungs/uniform:lora", "uniform:bitfit": "/rungs/uniform:bitfit"}
    assert choices.continues("uniform:lora", 1) is None  # another seed (a further-seeds round): from scratch
    space = validate_space(config, backbone_info(config.backbone))
    assert "lr" in space.grid() and space.grid()["lr"] == GRID  # the search draws its rate from the same grid

    class Result:  # one finished DARTS search trial, as retrain_plan reads it
        error = None
        metrics = {"derived_placement": searched, "derived_dev_loss": 1.0, "seed": 0, "variant": "base",
                   "trial_id": "d0"}
    plan = retrain_plan(config, [Result()], choices)
    assert [(t["lr"], t[CONTINUES]) for t in plan.trials] == [(0.03, "/rungs/darts-derived")]


def test_the_searched_trials_draw_their_rate_from_the_grid(tmp_path):
    from test_search_space import make_config, make_search
    from pefttune.backbones import backbone_info

    info = backbone_info("tiny-hubert")
    config = make_config(train={"lr_grid": GRID}, search={"uniform_baselines": False, "hybrid": False})
    search = make_search(tmp_path, config, info)
    lrs = [search.suggest(f"t{i}")["lr"] for i in range(8)]
    assert set(lrs) <= set(GRID) and len(set(lrs)) > 1


# -- Ray: a tuning in a study folder, its resume, and the chosen rates in the tables ----------------------


@pytest.fixture(scope="module")
def tuned_search(ray_session, tmp_path_factory):
    from pefttune.search.run import run_search

    manifest = write_tone_manifest(tmp_path_factory.mktemp("tones"), classes=2,
                                   per_split={"train": 6, "dev": 3, "test": 3})
    storage = tmp_path_factory.mktemp("results")
    config = parse_config(search_config(
        manifest, storage, name="tuned", methods={"lora": {"rank": 2}},
        train={"epochs": 2, "max_steps_per_epoch": 2, "seeds": [0, 1], "lr_grid": [0.001, 0.05], "lr_rung": 0.5,
               "reference_lr_grid": [0.05, 0.2], "reference_lr_rung": 0.75, "reference_epochs": 4},
        search={"num_samples": 1, "hybrid": False, "replicate_top": 0, "frozen_reference": True}))
    run_search(config, verbose=0)
    return config, Path(storage) / config.name


def test_a_tuning_chooses_on_the_rung_and_every_seed_trains_at_the_choice(tuned_search):
    from pefttune.analysis.store import open_results
    from pefttune.analysis.tables import configs_table, trials_table

    config, path = tuned_search
    choices = LrChoices.from_json((path / "tune-lr" / "lr_choices.json").read_text())
    assert set(choices.choices) == {"uniform:lora", "frozen"}
    trials = trials_table(open_results(path))
    rungs = trials[trials["experiment"] == "tune-lr"]
    assert len(rungs) == 4 and (rungs["outcome"] == "stopped_early").all()  # never a configuration's result
    assert rungs.set_index("config_id")["epochs"].to_dict() == {"uniform:lora": 1, "frozen": 3}  # 0.5 of 2, 0.75 of 4
    assert sorted(rungs[rungs["config_id"] == "frozen"]["lr"]) == [0.05, 0.2]  # the references' own grid
    assert rungs["test_score"].isna().all()  # a rung never scores test
    for cid, choice in choices.choices.items():
        scores = dict(choice.scores)
        ranked = rungs[rungs["config_id"] == cid].set_index("lr")["best_dev_score"]
        assert scores == pytest.approx(ranked.to_dict())
        assert choice.lr == choose_rate(scores)
    done = trials[trials["outcome"] == "completed"]
    assert not done.duplicated(["config_id", "seed"]).any()
    assert sorted(done[done["config_id"] == "uniform:lora"]["seed"]) == [0, 1]
    for cid, choice in choices.choices.items():
        assert set(done[done["config_id"] == cid]["lr"]) == {choice.lr}
    assert set(done[done["config_id"] == "frozen"]["epochs"]) == {4}
    first = done[(done["config_id"] == "uniform:lora") & (done["seed"] == 0)].iloc[0]
    assert first[f"config/{CONTINUES}"] == choices.choices["uniform:lora"].checkpoint  # it continued its rung
    assert first["start_epoch"] == 2 and done[done["seed"] == 1]["start_epoch"].eq(1).all()
    configs = configs_table(open_results(path)).set_index("config_id")
    assert configs.loc["uniform:lora", "lr"] == choices.lr("uniform:lora", -1)
    assert configs.loc["frozen", "lr"] == choices.lr("frozen", -1)
    lines = "\n".join(protocol_lines(json.loads(json.dumps(config.model_dump(mode="json"))), trials, "accuracy"))
    assert "[0.001, 0.05; the references, which train the head alone: [0.05, 0.2]]" in lines
    assert "first 1 of its 2 epochs (the references: 3 of 4)" in lines
    assert f"| uniform:lora | 1 |" in lines and f"| {choices.lr('uniform:lora', -1):g} |" in lines
    assert "| dev accuracy at 0.001 | dev accuracy at 0.05 | dev accuracy at 0.2 |" in lines
    frozen = next(line for line in lines.splitlines() if line.startswith("| frozen |")).split(" | ")
    assert frozen[1] == "3" and frozen[2] == "-" and frozen[3] != "-" and frozen[4] != "-"  # not in its grid: -


def test_continuing_the_rung_gives_the_numbers_of_training_from_the_start(tuned_search):
    from pefttune.analysis.store import open_results
    from pefttune.analysis.tables import trials_table
    from pefttune.runtime.cluster import grid_tune_config
    from pefttune.runtime.plan import GridPlan, grid_tuner
    from pefttune.runtime.tune_run import run_config
    from pefttune.trainables.discrete import train_fn
    from pefttune.trainables.trial import make_trainable
    from pefttune.trainables.setup import make_setup

    config, path = tuned_search
    store = open_results(path)
    trials = trials_table(store)
    continued = trials[(trials["experiment"] == ".") & (trials["config_id"] == "uniform:lora")].iloc[0]
    record = next(t for t in store.trials if t.trial_id == continued["trial_id"])
    trial = {k: record.config[k] for k in ("config_id", "kind", "method", "placement", "lr", "seed", "budget_exempt")}
    scratch = str(path / "from-scratch")
    tuner = grid_tuner(make_trainable(train_fn, make_setup(config, scratch)), scratch, GridPlan([{**trial, CONTINUES: None}]),
                       grid_tune_config(1, False), run_config(config, f"{path}/from-scratch", verbose=0))
    result = tuner.fit()[0].metrics
    assert result["start_epoch"] == 1 and continued["start_epoch"] == 2
    assert result["best_dev_accuracy"] == pytest.approx(continued["best_dev_score"], abs=1e-6)
    assert result["test_accuracy"] == pytest.approx(continued["test_score"], abs=1e-6)
    assert result["test_loss"] == pytest.approx(continued["test_loss"], abs=1e-5)


def test_a_tuning_resumes_and_refuses_another_grid(tuned_search):
    from pefttune.search.tune_lr import run_tune_lr

    config, path = tuned_search
    before = sorted(p.name for p in (path / "tune-lr").iterdir() if p.name.startswith("train_fn"))
    again = run_tune_lr(config, resume=True, verbose=0)  # finished: restored, nothing trained again
    assert again == LrChoices.from_json((path / "tune-lr" / "lr_choices.json").read_text())
    assert sorted(p.name for p in (path / "tune-lr").iterdir() if p.name.startswith("train_fn")) == before
    other = config.model_copy(update={"train": config.train.model_copy(update={"lr_grid": [0.001, 0.01]})})
    with pytest.raises(ValueError, match="planned with other values of train.lr_grid"):
        run_tune_lr(other, resume=True, verbose=0)
    with pytest.raises(FileExistsError, match="already holds a learning-rate tuning"):
        run_tune_lr(config, resume=False, verbose=0)
