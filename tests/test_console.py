"""The console while a run goes, how a run ends (grouped errors, exit status), and `pefttune status`."""
from __future__ import annotations

import io
import json
import logging
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pefttune.analysis.status import experiment_status, format_status
from pefttune.runtime.console import WIDTH, Console, failure_summary, format_table
from pefttune.schema import TrialReport

LONG = " ".join(f"L{i}:sequential(b=32)+lora(r=8)" for i in range(12))


def test_trial_lines_fit_and_carry_the_scores(tmp_path):
    out = io.StringIO()
    console = Console("discrete arm", "accuracy", "max", total=3, study_dir=str(tmp_path), stream=out)
    console.trial_started("a1")
    done = TrialReport("accuracy", {"placement_short": LONG}, 3, best_dev=0.51234, final={"test_accuracy": 0.4})
    console.trial_finished("a1", {"kind": "uniform"}, {**done.row(), "time_total_s": 90})
    rejected = TrialReport("accuracy", {"placement_short": "L0:lora"}, 0, best_dev=0.0, over_budget=True)
    console.trial_finished("b2", {"kind": "discrete"}, rejected.row())
    console.trial_failed("c3", {"kind": "hybrid", "placement": "{}"},
                         "Traceback (most recent call last):\n  File x\nAudioReadError: cannot decode /data/bad.wav")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and all(len(line) <= WIDTH for line in lines)
    assert lines[0].startswith("a1") and "uniform" in lines[0] and "dev 0.512 test 0.400" in lines[0]
    assert "1.5 min" in lines[0] and "..." in lines[0]  # the long placement is clipped
    assert "over budget" in lines[1]
    assert "failed: AudioReadError: cannot decode /data/bad.wav" in lines[2] and "Traceback" not in out.getvalue()
    log = (tmp_path / "errors.log").read_text()
    assert "Traceback (most recent call last)" in log and "trial c3" in log  # the full traceback goes to the log
    assert console.done == 2 and console.errored == 1 and console.best == pytest.approx(0.51234)


def test_progress_line_counts_and_eta():
    out = io.StringIO()
    console = Console("DARTS search", "per", "min", total=4, stream=out, interval=3600)
    for trial in ("a", "b", "c"):
        console.trial_started(trial)
    console.result(TrialReport("per", {}, 1, best_dev=0.7).row())
    console.trial_finished("a", {"kind": "darts"}, {**TrialReport("per", {}, 2, best_dev=0.6).row(), "time_total_s": 10})
    console.progress()  # the first call prints; the next one within the interval does not
    console.progress()
    lines = out.getvalue().splitlines()
    progress = [line for line in lines if line.startswith("[DARTS search]")]
    assert len(progress) == 1
    assert "trials 1/4 done, 2 running, 0 errored, best dev per 0.600" in progress[0]
    assert "ETA" in progress[0] and "ETA -" not in progress[0]


def _frame(rows):
    return pd.DataFrame(rows, columns=["trial_id", "status", "kind", "error"])


def test_failure_summary_groups_errors_and_sets_the_exit_status():
    bad = "AudioReadError: cannot decode /data/x.wav"
    some = _frame([("a", "TERMINATED", "uniform", ""), ("b", "ERROR", "uniform", f"Traceback...\n{bad}"),
                   ("c", "ERROR", "discrete", bad), ("d", "TERMINATED", "discrete", "")])
    outcome = failure_summary(some)
    assert outcome.exit_code == 0 and outcome.lines == [f"2 trials failed: {bad}"]

    kind_lost = _frame([("a", "TERMINATED", "uniform", ""), ("b", "ERROR", "hybrid", "ValueError: x")])
    outcome = failure_summary(kind_lost)
    assert outcome.exit_code == 1 and "every hybrid trial failed (1)" in outcome.lines

    nothing = _frame([("a", "ERROR", "uniform", bad), ("b", "ERROR", "uniform", bad)])
    outcome = failure_summary(nothing)
    assert outcome.exit_code == 1 and "no trial finished" in outcome.lines and f"2 trials failed: {bad}" in outcome.lines
    assert failure_summary(_frame([])).exit_code == 1


def test_format_table_fits_the_width():
    frame = pd.DataFrame({"trial_id": ["abc"], "placement_short": [LONG], "best_dev_accuracy": [0.5], "epoch": [5]})
    text = format_table(frame, ["trial_id", "placement_short", "best_dev_accuracy", "epoch"], 120)
    assert all(len(line) <= 120 for line in text.splitlines()) and "0.500" in text and "..." in text


# -- a real search: console lines, grouped errors, exit status, status -----------------------------------


@pytest.fixture(scope="module")
def failing_search(ray_session, tmp_path_factory):
    """Two uniform methods diverge (NaN), the hybrid and one searched trial train."""
    from pefttune.config import parse_config
    from pefttune.search.run import run_search
    from pefttune.testing import Faults, nan_at
    from test_search_fixtures import search_config, write_tone_manifest

    manifest = write_tone_manifest(tmp_path_factory.mktemp("tones"))
    storage = tmp_path_factory.mktemp("results")
    config = parse_config(search_config(
        manifest, storage, methods={"lora": {"rank": [2]}, "bitfit": {}},
        train={"epochs": 1, "max_steps_per_epoch": 2}, search={"num_samples": 1, "max_failures": 0},
    ))
    import contextlib
    import io as _io

    out = _io.StringIO()
    with contextlib.redirect_stdout(out):
        results = run_search(config, verbose=1, faults=Faults(before_step=nan_at(1, kinds=["uniform"])))
    return {"results": results, "out": out.getvalue(), "path": Path(storage) / config.name, "config": config}


def test_console_of_a_real_search(failing_search):
    from pefttune.runtime.study_dir import results_frame

    out = failing_search["out"]
    assert "Checkpoint successfully created" not in out and "Trial status" not in out  # no Ray stream
    assert "Traceback" not in out
    finished = [line for line in out.splitlines() if " dev " in line and " test " in line and " min" in line]
    assert len(finished) == 2  # the hybrid and the searched trial
    failed = [line for line in out.splitlines() if re.match(r"^\w+\s+uniform\s+failed: .*DivergedError", line)]
    assert len(failed) == 2
    assert all(len(line) <= 120 for line in out.splitlines())
    log = (failing_search["path"] / "errors.log").read_text()
    assert log.count("=== ") == 2 and 'File "' in log and "in train_fn" in log  # full tracebacks, in the log
    outcome = failure_summary(results_frame(failing_search["results"]))
    assert outcome.exit_code == 1  # every uniform trial failed
    assert any(line.startswith("2 trials failed: ") and "DivergedError" in line for line in outcome.lines)
    assert "every uniform trial failed (2)" in outcome.lines


def test_status_of_a_finished_search(failing_search, capsys):
    from pefttune.cli import main

    status = experiment_status(failing_search["path"])
    kinds = {k.kind: k for k in status.kinds}
    assert status.state == "finished"
    assert kinds["uniform"].errored == 2 and kinds["uniform"].done == 0
    assert kinds["hybrid"].done == 1 and kinds["discrete"].done == 1 and kinds["hybrid"].best is not None
    assert main(["status", str(failing_search["path"])]) == 0
    text = capsys.readouterr().out
    assert "finished" in text and "uniform" in text and all(len(line) <= 120 for line in text.splitlines())


def _running_copy(tmp_path) -> Path:
    """The crafted classification experiment with its first trial still RUNNING in Ray's state."""
    from test_analysis import classification_experiment

    root = tmp_path / "ks"
    shutil.copytree(classification_experiment(), root)
    state_file = sorted(root.glob("experiment_state-*.json"))[-1]
    data = json.loads(state_file.read_text())
    state = json.loads(data["trial_data"][0][0])
    state["status"] = "RUNNING"
    data["trial_data"][0][0] = json.dumps(state)
    state_file.write_text(json.dumps(data))
    return root


def test_status_of_a_running_and_of_a_crashed_experiment(ray_session, tmp_path):
    """A trial still RUNNING in Ray's state: running while the state is fresh, interrupted once stale."""
    root = _running_copy(tmp_path)
    status = experiment_status(root)
    assert status.state == "running" and status.totals.running == 1
    assert status.eta_s is not None and status.elapsed_s is not None
    assert "running" in format_status(status)
    assert experiment_status(root, stale_after=-1).state == "interrupted"


def _write_heartbeat(root: Path, pid: int, **fields) -> None:
    import os
    import socket
    import time

    now = time.time()
    record = {"pid": pid, "host": socket.gethostname(), "started": now - 300, "updated": now, "stage": "discrete",
              "stage_started": now - 200, "stages": [{"name": "data", "started": now - 300, "ended": now - 200}],
              "state": "running", "pid_start": None, **fields}
    (root / "heartbeat.json").write_text(json.dumps(record))
    assert os.path.getsize(root / "heartbeat.json")


def test_the_heartbeat_decides_the_state_and_the_eta_covers_the_stages_to_come(ray_session, tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    import pefttune.analysis.status as status_module
    from pefttune.analysis.store import open_results

    root = _running_copy(tmp_path)
    # a study of 3 candidates, 8 searched trials, 3 seeds: the replicates have not started
    (root / "experiment.yaml").write_text(
        "name: ks\nbackbone: tiny-hubert\ndata: {source: synth, task: ks}\nensemble_size: 3\n"
        "methods: {lora: {}, bitfit: {}, sequential: {}}\n"
        "search: {num_samples: 8, replicate_top: 2, max_concurrent: 2}\ntrain: {epochs: 2, seeds: [0, 1, 2]}\n")
    _write_heartbeat(root, os.getpid())  # the driver is this very process: alive
    status = experiment_status(root, stale_after=-1)  # Ray's state counts as stale: the heartbeat wins
    assert status.state == "running" and status.stage == "discrete"
    assert status.elapsed_s == pytest.approx(300, abs=5)
    # fixed points 3 uniform + hybrid = 4, x 2 other seeds; frozen and log-mel x 3 seeds; top 2 x 2 other seeds
    assert status.upcoming == {"replicates": 4 * 2 + 3 + 3 + 2 * 2}
    text = format_status(status)
    assert "stage discrete" in text and "replicates 18" in text and all(len(line) <= 120 for line in text.splitlines())

    experiment = open_results(root)
    durations = [t.wall_time_s for t in experiment.trials if t.outcome in status_module.DONE and t.wall_time_s]
    mean = sum(durations) / len(durations)
    monkeypatch.setattr(status_module, "upcoming_stages", lambda *a: {})
    this_stage = experiment_status(root).eta_s
    assert status.eta_s == pytest.approx(this_stage + mean * 18 / 2)  # at the mean trial time, 2 at a time
    monkeypatch.undo()

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _write_heartbeat(root, gone.pid)  # fresh heartbeat and fresh Ray state, but the driver's process is gone
    status = experiment_status(root)
    assert status.state == "interrupted" and status.eta_s is None and status.upcoming == {}
    assert status.elapsed_s == pytest.approx(300, abs=5)
    assert "interrupted" in format_status(status) and "is gone" in format_status(status)

    _write_heartbeat(root, gone.pid, state="finished", stage=None)
    assert experiment_status(root).state == "finished"  # although a trial shows RUNNING


def test_the_stages_to_come_are_estimated_from_the_config():
    from pefttune.analysis.status import expected_replicates, upcoming_stages

    config = {"methods": {"lora": {}, "bitfit": {}}, "search": {"num_samples": 1, "replicate_top": 2},
              "train": {"seeds": [0, 1]}, "darts": {"seeds": [0, 1], "variants": [{}, {"mix": "exact"}, {}]}}
    # fixed: 2 uniform + hybrid, x 1 other seed; frozen, log-mel x 2 seeds; top min(2, 1 searched) x 1
    assert expected_replicates(config) == 3 + 2 + 2 + 1
    assert upcoming_stages(None, config) == {"replicates": 8, "DARTS search": 6, "DARTS retrain": 6}  # per seed
    every = {**config, "darts": {**config["darts"], "retrain": "every-seed"}}
    assert upcoming_stages(None, every)["DARTS retrain"] == 12  # each search's placement x 2 seeds
    assert upcoming_stages(None, {**config, "darts": {}})["DARTS search"] == 2  # default: one per train seed
    off = {**config, "darts": {"enabled": False}, "search": {"frozen_reference": False, "hybrid": False},
           "analysis": {"logmel_reference": False}, "train": {"seed": 0}}
    assert upcoming_stages(None, off) == {}  # one seed and no references: no replicates, no DARTS arm
    assert upcoming_stages(None, None) == {}
    tuned = {**config, "train": {"seeds": [0, 1], "lr_grid": [0.003, 0.01, 0.03]}}
    # the learning-rate protocol: (2 uniform + hybrid + frozen + log-mel) x 3 rates; each of 3 variants x 3 rates
    assert upcoming_stages(None, tuned) == {"tune-lr": 15, "replicates": 8, "DARTS search": 6,
                                            "DARTS tune-lr": 9, "DARTS retrain": 6}
    own = {**config, "train": {**tuned["train"], "reference_lr_grid": [0.01, 0.03, 0.1, 0.3]}}
    assert upcoming_stages(None, own)["tune-lr"] == 3 * 3 + 2 * 4  # the references train their own grid


# -- robust console, and grouped failures of a resumed run --------------------------------------------


def test_the_console_callback_survives_values_of_any_type(tmp_path):
    from types import SimpleNamespace

    out = io.StringIO()
    console = Console("replicates", "accuracy", "max", total=2, study_dir=str(tmp_path), stream=out)
    odd = {"time_total_s": (12.0, 3.0), "best_dev_accuracy": (0.5,), "test_accuracy": "n/a",
           "placement_short": ("L0:lora", "L1:none"), "over_budget": False}
    console.trial_finished(7, {"kind": ("uniform", "lora"), "seed": [1]}, odd)
    console.trial_failed(("t", 2), {"kind": None, "placement": {"layers": 2}}, RuntimeError("boom\nValueError: bad"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and all(len(line) <= WIDTH for line in lines)
    assert lines[0].startswith("7 ") and "('uniform', 'lora') s[1]" in lines[0] and "dev - test -   0.0 min" in lines[0]
    assert "('t', 2)" in lines[1] and "failed: ValueError: bad" in lines[1]
    assert "ValueError: bad" in (tmp_path / "errors.log").read_text()
    assert console.done == 1 and console.errored == 1 and console.best is None

    callback = console.callback()  # the Ray hooks: one with a broken console shows a line, never raises
    trial = SimpleNamespace(trial_id="x1", config={"kind": 3}, last_result={"time_total_s": [1, 2]},
                            error_file=None, get_error=lambda: None)
    callback.on_trial_complete(0, [], trial)
    assert out.getvalue().splitlines()[-1].startswith("x1         3 ")
    console.trial_finished = None  # not callable: the hook fails inside
    callback.on_trial_complete(0, [], trial)
    assert out.getvalue().splitlines()[-1].startswith("(console: on_trial_complete: TypeError")


def test_failure_summary_takes_any_value():
    frame = pd.DataFrame({"trial_id": ["a", "b", "c", "d"], "status": ["ERROR", "ERROR", "TERMINATED", "ERROR"],
                          "kind": [None, float("nan"), "uniform", ("darts", 0)],
                          "error": [ValueError("x\nDivergedError: nan loss"), float("nan"), "", None]})
    outcome = failure_summary(frame)
    assert "1 trial failed: DivergedError: nan loss" in outcome.lines
    assert "2 trials failed: unknown error" in outcome.lines
    assert "every ? trial failed (2)" in outcome.lines and "every ('darts', 0) trial failed (1)" in outcome.lines
    assert outcome.exit_code == 1


def test_failure_lines_of_a_resumed_run_are_those_of_the_first(failing_search):
    """A resumed run reads the trials of the earlier run back from the folder: the same grouped lines."""
    from pefttune.runtime.study_dir import load_results, results_frame

    first = failure_summary(results_frame(failing_search["results"]))
    restored = results_frame(load_results(failing_search["path"]))
    assert sorted(restored["status"]) == sorted(results_frame(failing_search["results"])["status"])
    again = failure_summary(restored)
    assert again.lines == first.lines and again.exit_code == first.exit_code == 1


# -- library noise: off by default, back with -v ---------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("verbose", [1, 2])
def test_optunas_study_line_only_with_v(verbose):
    """Optuna's console handler sits on its "optuna" logger (which does not propagate): a record
    that logger does not make never shows."""
    import optuna

    from pefttune.runtime.console import quiet_ray_loggers

    records = _Records()
    logger = logging.getLogger("optuna")
    logger.addHandler(records)
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)  # Optuna's default; an earlier test may have changed it
    try:
        with quiet_ray_loggers(verbose):
            optuna.create_study(study_name=f"quiet-{verbose}")
            optuna.logging.get_logger("optuna.study").warning("a warning still shows")
    finally:
        logger.removeHandler(records)
        optuna.logging.set_verbosity(before)
    created = [line for line in records.lines if "A new study created" in line]
    assert len(created) == (verbose == 2) and "a warning still shows" in records.lines


@pytest.mark.parametrize("verbose", [1, 2])
def test_rays_slow_search_space_note_only_with_v(verbose):
    import warnings

    from pefttune.runtime.console import quiet_ray_loggers

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_ray_loggers(verbose):
            warnings.warn("Define-by-run function passed in the `space` argument took 1.48 seconds to run. "
                          "Ensure that actual computation, training takes place inside Tune's train functions "
                          "and not inside the search space.", UserWarning)
            warnings.warn("another warning", UserWarning)  # every other warning still shows
    messages = [str(w.message) for w in caught]
    assert "another warning" in messages and len(messages) == (1 if verbose == 1 else 2)


@pytest.mark.parametrize("log_to_driver", [False, True])
def test_rays_token_notice_only_with_v(caplog, monkeypatch, tmp_path, log_to_driver):
    """connect_ray around Ray's own notice (Ray's function, called where ray.init calls it); Ray's
    console handler sits on the "ray" logger, so a record that is never made never shows."""
    import ray
    from ray._private.authentication import authentication_token_setup

    from pefttune.runtime import cluster

    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: started.append(kwargs) or
                        authentication_token_setup._warn_token_auth_enabled())
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # connect_ray sets it: restored after the test
    monkeypatch.setattr(cluster.tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    caplog.clear()
    assert cluster.connect_ray(None, log_to_driver=log_to_driver) is True
    assert started and started[0]["log_to_driver"] is log_to_driver
    notices = [r for r in caplog.records if "Token authentication is enabled" in r.getMessage()]
    assert len(notices) == int(log_to_driver)


@pytest.fixture
def progress_bars():
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_progress_bar()  # as in a fresh process
    yield
    transformers_logging.enable_progress_bar()  # the CLI turned them off for this process


def test_no_weight_loading_bars_without_v(capfd, progress_bars):
    from pefttune.cli import main as cli_main

    capfd.readouterr()
    assert cli_main(["info", "--backbone", "tiny-hubert-ssl"]) == 0  # loads the weights with from_pretrained
    out = capfd.readouterr()
    assert "tiny-hubert-ssl" in out.out and "Loading weights" not in out.err + out.out
