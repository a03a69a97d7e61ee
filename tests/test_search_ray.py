"""The discrete search on Ray Tune, end to end on CPU (tiny HuBERT, a synthesized tone corpus).

One search (module fixture) runs 10 trials: 3 uniform baselines, the hybrid (over budget),
3 searched placements and 3 extra fixed points carrying faults: one raises once after
epoch 1 (retried from its checkpoint), one gets a NaN loss (ends as an error, the rest
go on), one barely learns (lr 1e-9, so ASHA stops it at its epoch-2 rung). The tests read
that one experiment. The resume test interrupts a search for real (a subprocess with its
own Ray, killed mid-run) and finishes it with ``resume=True``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from pefttune.config import parse_config
from pefttune.runtime.study_dir import load_results, results_frame
from pefttune.schema import STATE_FILE
from pefttune.search.run import load_study, run_search
from pefttune.search.summary import top_k
from pefttune.testing import Faults, fail_once_after, nan_at
from pefttune.search.space import FixedPoint
from pefttune.trainables.checkpoint import checkpoint_predictions, read_state
from test_search_fixtures import search_config, write_tone_manifest

EPOCHS = 3
BUDGET = 5000
FAIL_ONCE = {"num_layers": 4, "layers": ["lora", "none", "bitfit", "none"]}
NAN = {"num_layers": 4, "layers": ["none", "none", "none", "bitfit"]}
SLOW = {"num_layers": 4, "layers": ["none", "bitfit", "none", "none"]}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_tone_manifest(tmp_path_factory.mktemp("tones"))


@pytest.fixture(scope="module")
def search(ray_session, manifest, tmp_path_factory):
    storage = tmp_path_factory.mktemp("results")
    config = parse_config(
        search_config(
            manifest,
            storage,
            budget=BUDGET,
            train={"epochs": EPOCHS},
            search={"num_samples": 3, "scheduler": "asha", "grace_period": 2, "reduction_factor": 2},
        )
    )
    points = [
        FixedPoint("darts-derived", placement=FAIL_ONCE),
        FixedPoint("darts-derived", placement=NAN),
        FixedPoint("darts-derived", placement=SLOW, lr=1e-9),
    ]
    started = time.time()
    faults = Faults(after_epoch=fail_once_after(1, placements=[FAIL_ONCE]), before_step=nan_at(1, placements=[NAN]))
    results = run_search(config, extra_points=points, verbose=0, faults=faults)
    frame = results_frame(results, EPOCHS)
    return {"config": config, "results": results, "frame": frame, "seconds": time.time() - started,
            "path": Path(storage) / config.name}


def _placement_layers(row) -> list[str]:
    return [row[f"layer_{i:02d}"] for i in range(4)]



def test_search_runs_every_trial_with_placement_and_params(search):
    frame = search["frame"]
    assert len(frame) == 10 and frame["trial_id"].is_unique
    assert sorted(frame["kind"].value_counts().items()) == [
        ("darts-derived", 3), ("discrete", 3), ("hybrid", 1), ("uniform", 3),
    ]
    assert sorted(frame.loc[frame["kind"] == "uniform", "method"]) == ["bitfit", "lora", "sequential"]
    for _, row in frame.iterrows():
        placement = json.loads(row["placement"])
        assert len(placement["layers"]) == 4 and row["placement_short"].startswith("L0:")
        assert _placement_layers(row) == ["+".join(c["method"] for c in layer) or "none" for layer in placement["layers"]]
        assert row["trainable_params"] == row["peft_params"] + row["head_params"] > 0
    uniform = frame[frame["kind"] == "uniform"]
    for _, row in uniform.iterrows():
        assert _placement_layers(row) == [row["method"]] * 4
        assert row["status"] == "TERMINATED"
    finished = frame[(frame["status"] == "TERMINATED") & ~frame["over_budget"] & ~frame["stopped_early"]]
    assert len(finished) >= 2  # ASHA (reduction factor 2) stops about half at epoch 2
    assert finished["epoch"].eq(EPOCHS).all() and finished["test_accuracy"].between(0, 1).all()
    assert (finished["best_dev_accuracy"] >= finished["dev_accuracy"]).all()
    assert (finished["samples_per_s"] > 0).all()


def test_budget_is_respected(search):
    frame = search["frame"]
    over = frame[frame["peft_params"] > BUDGET]
    assert "hybrid" in set(over["kind"])  # 8736 PEFT parameters
    assert over["over_budget"].all() and over["epoch"].eq(0).all()
    assert (over["best_dev_accuracy"] == 0.0).all() and (over["checkpoint"] == "").all()
    trained = frame[frame["epoch"] > 0]
    assert (trained["peft_params"] <= BUDGET).all() and not trained["over_budget"].any()
    # Optuna knows them as infeasible
    study = load_study(search["path"])
    by_ray = {t.user_attrs["ray_trial_id"]: t for t in study.get_trials()}
    for trial_id in over["trial_id"]:
        assert by_ray[trial_id].constraints["budget"] > 0


def test_final_checkpoint_holds_weights_and_predictions(search):
    from pefttune.model import load_model_dir

    frame = search["frame"]
    row = top_k(frame, "best_dev_accuracy", "max", k=1).iloc[0]  # a trial that ran all epochs
    checkpoint = Path(row["checkpoint"])
    state = read_state(checkpoint)
    assert state.finished and state.epoch == EPOCHS and state.best_score == pytest.approx(row["best_dev_accuracy"])
    test = checkpoint_predictions(checkpoint, "test")
    dev = checkpoint_predictions(checkpoint, "dev")
    assert len(test["index"]) == 12 and len(dev["index"]) == 12  # 4 classes x 3
    assert np.mean(test["pred"] == test["label"]) == pytest.approx(row["test_accuracy"])
    assert np.mean(dev["pred"] == dev["label"]) == pytest.approx(row["best_dev_accuracy"])
    model = load_model_dir(checkpoint / "best")  # PEFT + head weights of the best dev epoch
    assert model.placement.layer_methods() == _placement_layers(row)
    assert {p.name for p in (checkpoint / "model").iterdir()} == {"adapter.safetensors", "placement.json", "model.json"}
    assert not list(checkpoint.rglob("*.pkl"))


def test_failed_trial_is_retried_from_its_checkpoint(search):
    frame = search["frame"]
    row = frame[frame["placement_short"].str.match(r"L0:lora\(r=\d\) L1:none L2:bitfit L3:none")].iloc[0]
    assert row["status"] == "TERMINATED" and row["epoch"] >= 2
    errors = (Path(row["path"]) / "error.txt").read_text()  # Ray's log of the trial's failures
    assert errors.count("Failure #") == 1 and "injected failure after epoch 1" in errors
    assert row["start_epoch"] == 2  # the retry restored the epoch-1 checkpoint, epoch 1 not re-run


def test_nan_trial_ends_as_error_and_the_rest_finish(search):
    frame = search["frame"]
    errors = frame[frame["status"] == "ERROR"]
    assert len(errors) == 1
    row = errors.iloc[0]
    assert row["placement_short"] == "L0:none L1:none L2:none L3:bitfit"
    assert "DivergedError" in row["error"] and "loss became nan at epoch 1" in row["error"]
    assert row["peft_params"] == 576 and row["kind"] == "darts-derived"  # filled from the trial config
    errors = (Path(row["path"]) / "error.txt").read_text()
    assert errors.count("Failure #") == 2  # max_failures=1: one retry, which did not train again
    assert "diverged in an earlier attempt; not retried" in errors
    assert (frame["status"] == "TERMINATED").sum() == 9


def test_early_stopped_trials_are_pruned_in_the_study(search):
    frame = search["frame"]
    stopped = frame[frame["stopped_early"]]
    assert "L0:none L1:bitfit L2:none L3:none" in set(stopped["placement_short"])  # lr 1e-9
    assert (stopped["epoch"] == 2).all()
    study = load_study(search["path"])
    by_ray = {t.user_attrs["ray_trial_id"]: t for t in study.get_trials()}
    assert len(by_ray) == 10
    for _, row in frame.iterrows():
        trial = by_ray[row["trial_id"]]
        if row["status"] == "ERROR":
            assert trial.state == TrialState.FAIL
        elif row["stopped_early"]:
            assert trial.state == TrialState.PRUNED, row["placement_short"]
            assert trial.value == pytest.approx(row["best_dev_accuracy"])  # last full-epoch value
        else:
            assert trial.state == TrialState.COMPLETE
            if not row["over_budget"]:
                assert trial.value == pytest.approx(row["best_dev_accuracy"])
                assert sorted(trial.intermediate_values) == list(range(1, EPOCHS + 1))


def test_top_k_and_saved_experiment(search):
    frame, config, path = search["frame"], search["config"], search["path"]
    best = top_k(frame, "best_dev_accuracy", "max", k=3)
    assert len(best) == 3 and best["best_dev_accuracy"].is_monotonic_decreasing
    assert not best["over_budget"].any() and (best["status"] == "TERMINATED").all()
    assert not best["stopped_early"].any()
    assert parse_config(yaml.safe_load((path / "experiment.yaml").read_text())) == config
    again = results_frame(load_results(path), EPOCHS)
    assert sorted(again["trial_id"]) == sorted(frame["trial_id"])
    with pytest.raises(FileExistsError, match=str(path)):
        run_search(config, verbose=0)  # never overwrite an experiment


# -- resume after a real interruption ---------------------------------------------------------------

DRIVER = textwrap.dedent(
    """
    import os, sys, tempfile, torch, ray
    torch.set_num_threads(1)
    # the experiment state written every second (Ray's "auto" period can outlast the slow trial
    # under load): the moment to kill, a checkpoint the state already refers to, then comes
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "1"
    from pefttune.config import load_config
    from pefttune.search.run import run_search
    from pefttune.search.space import FixedPoint
    from pefttune.testing import Faults, sleep_after
    temp = tempfile.mkdtemp(prefix="pefttune-resume-ray-")
    print("RAY_TEMP", temp, flush=True)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, configure_logging=False)
    placement = {"num_layers": 4, "layers": ["none", "lora", "none", "none"]}
    slow = FixedPoint("darts-derived", placement=placement)
    faults = Faults(after_epoch=sleep_after(2.0, placements=[placement]))
    run_search(load_config(sys.argv[1]), extra_points=[slow], verbose=0, faults=faults)
    print("SEARCH DONE", flush=True)
    """
)


def _checkpoints(path: Path) -> dict[str, dict]:
    """Per trial dir: its checkpoint dir names and the newest state (epoch, finished, mtime)."""
    out = {}
    for trial in path.glob("train_fn_*"):
        names = sorted(p.name for p in trial.glob("checkpoint_*"))
        info = {"names": names, "epoch": 0, "finished": False, "mtime": 0.0}
        for name in reversed(names):
            try:
                state = read_state(trial / name)
                info.update(epoch=state.epoch, finished=state.finished, mtime=(trial / name / STATE_FILE).stat().st_mtime)
                break
            except (FileNotFoundError, ValueError):  # being copied right now
                continue
        out[trial.name] = info
    return out


def _search_state(path: Path) -> dict[str, bytes] | None:
    """The search generator's and the searcher's saved state (both files, non-empty), or None."""
    state = {}
    for prefix in ("search_gen_state", "searcher-state"):
        files = sorted(path.glob(f"{prefix}-*"))
        content = files[-1].read_bytes() if files else b""
        if not content:
            return None
        state[prefix] = content
    return state


def _state_mtime(path: Path) -> float:
    return max((p.stat().st_mtime for p in path.glob("experiment_state-*.json")), default=0.0)


def _kill_leftovers(temp_dir: str) -> None:
    """Ray processes of the killed driver (they run with its private temp dir), by pid."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if temp_dir and any(temp_dir in part for part in proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def test_resume_after_interruption_finishes_remaining_trials(ray_session, manifest, tmp_path):
    config = search_config(
        manifest, tmp_path / "results", name="resume-test",
        train={"epochs": EPOCHS}, search={"num_samples": 1, "hybrid": False},
    )
    config_path = tmp_path / "experiment.yaml"
    config_path.write_text(yaml.safe_dump(config))
    path = tmp_path / "results" / "resume-test"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    temp_dir = ""
    stale = None  # the search state of Ray's first save, before the experiment held all its trials
    try:
        temp_dir = driver.stdout.readline().split()[-1]
        deadline = time.time() + 180
        while time.time() < deadline:
            if stale is None:
                stale = _search_state(path)
            # kill once a trial has finished and another one is mid-run with a checkpoint that
            # the experiment state already refers to (snapshot newer than the checkpoint)
            checkpoints = _checkpoints(path)
            snapshot = _state_mtime(path)
            finished = [k for k, c in checkpoints.items() if c["finished"]]
            midway = [k for k, c in checkpoints.items() if not c["finished"] and c["epoch"] >= 1 and c["mtime"] < snapshot - 0.05]
            if finished and midway:
                # the checkpoint epochs the experiment snapshot already knew when we killed it
                known_epoch = {k: checkpoints[k]["epoch"] for k in midway}
                break
            assert driver.poll() is None, "the search finished before it could be interrupted"
            time.sleep(0.05)
        else:
            pytest.fail("the interrupted search made no progress")
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and what it started, as a crash would
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        _kill_leftovers(temp_dir)
    before = _checkpoints(path)
    # (usually some trials have not started yet; under heavy load all 5 may have: either way
    # the resumed run must finish every one exactly once)

    results = run_search(parse_config(config), resume=True, verbose=0)
    frame = results_frame(results, EPOCHS).set_index("trial_id")
    assert len(frame) == 5  # 3 uniform + the slow point + 1 searched, none run twice
    assert (frame["status"] == "TERMINATED").all() and frame["epoch"].eq(EPOCHS).all()
    assert frame["test_accuracy"].notna().all()
    after = _checkpoints(path)
    for name in finished:  # finished trials were not run again: no new checkpoints (Ray may prune the
        # oldest on restore, keeping num_to_keep of them, so compare the newest and what is left)
        assert set(after[name]["names"]) <= set(before[name]["names"])
        assert max(after[name]["names"]) == max(before[name]["names"])
        assert frame.loc[name.removeprefix("train_fn_"), "start_epoch"] == 1
    for name in midway:  # unfinished trials went on from a checkpoint, not from scratch
        # (a checkpoint written between the snapshot and the kill may be newer than what Tune
        # resumes from, so compare with the epoch the snapshot already referred to)
        assert frame.loc[name.removeprefix("train_fn_"), "start_epoch"] >= known_epoch[name] + 1 >= 2
    study = optuna.load_study(study_name="resume-test", storage=f"sqlite:///{path / 'optuna.db'}")
    complete = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert sorted(t.user_attrs["ray_trial_id"] for t in complete) == sorted(frame.index)
    assert not [t for t in study.get_trials() if t.state == TrialState.RUNNING]

    # a kill between Ray's save of the experiment state and of the search state: the newest
    # search state is the first one, from before the experiment held its five trials
    import ray.cloudpickle

    assert stale is not None and ray.cloudpickle.loads(stale["search_gen_state"])["counter"] < 5
    for prefix, content in stale.items():
        max(path.glob(f"{prefix}-*")).write_bytes(content)
    again = results_frame(run_search(parse_config(config), resume=True, verbose=0), EPOCHS).set_index("trial_id")
    assert sorted(again.index) == sorted(frame.index)  # no place suggested twice
    assert again.loc[frame.index, "start_epoch"].tolist() == frame["start_epoch"].tolist()  # nothing trained again
    trials = optuna.load_study(study_name="resume-test", storage=f"sqlite:///{path / 'optuna.db'}").get_trials()
    assert sorted(t.user_attrs["ray_trial_id"] for t in trials if t.state == TrialState.COMPLETE) == sorted(frame.index)
    assert len(trials) == len(study.get_trials())
