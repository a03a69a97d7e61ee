"""A study killed (SIGKILL of the driver's process group) in the middle of each stage, then resumed.

One small study on a tone corpus is run through the CLI in a subprocess and killed once inside
every trial stage and inside the analysis, each moment found through the results store (a
trial of that stage has reported, the stage has not finished), never by sleeping (the
further-seeds round of ``analysis.max_seeds`` included); after each
kill ``pefttune run --resume`` goes on until the next. The finished study is compared with an
uninterrupted one of the same config and seeds: the same configurations and seeds, one
completed trial each, the same scores and verdicts; and, in its MLflow store, one run per trial. The
learning-rate protocol's tuning (``tune-lr``) is killed too, and resumes to the uninterrupted rungs
and choices; the DARTS-derived configuration's tuning, the same grid experiment
(:func:`pefttune.tuning.tune_rates`), runs uninterrupted in both studies and is compared too.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pefttune.config import parse_config
from pefttune.data.loaders import prepare_data
from pefttune.schema import STOP_EPOCH
from pefttune.trainables.setup import prefill_frozen_cache
from helpers import run_until_killed
from test_search_fixtures import search_config, write_tone_manifest

pytestmark = pytest.mark.slow

SEEDS = [0, 1]


def _config(manifest: Path, storage: Path, name: str, tracking: dict | None = None) -> dict:
    config = search_config(
        manifest, storage, name=name,
        methods={"lora": {"rank": 2}, "bitfit": {}},
        # the learning-rate protocol: each fixed configuration (and the DARTS-derived one) tuned at a rung of 2 epochs
        train={"epochs": 3, "max_steps_per_epoch": 3, "seeds": SEEDS, "lr_grid": [0.003, 0.03], "lr_rung": 0.5},
        search={"num_samples": 1, "scheduler": "none", "max_failures": 1, "hybrid": False, "replicate_top": 1,
                "frozen_reference": True},
        darts={"warmup_epochs": 0, "converged_entropy": 1.0},  # one search per seed; "converged": finding 1 can be open
        analysis={"logmel_reference": False, "max_seeds": 3},  # a round of seed 2 where a finding is open
        tracking=tracking,
    )
    return config


def _reported(folder: Path) -> bool:
    """A trial of the Ray experiment in ``folder`` has reported (the stage is under way): a checkpoint
    in its folder (written when the trial reports) or a result (which the driver copies there later)."""
    return any(folder.glob("*/checkpoint_*")) or any(p.stat().st_size > 0 for p in folder.glob("*/result.json"))


def _trials_done(folder: Path) -> bool:
    """Every trial of the experiment in ``folder`` wrote its final checkpoint (the stage is over); a rung
    of the learning-rate protocol ends with its ``stop_epoch``."""
    from pefttune.trainables.checkpoint import read_state

    trials = [t for t in folder.glob("train_fn_*") if t.is_dir()] + [t for t in folder.glob("darts_fn_*") if t.is_dir()]
    finished = 0
    for trial in trials:
        params = trial / "params.json"
        stop = json.loads(params.read_text()).get(STOP_EPOCH) if params.is_file() else None
        for ckpt in sorted(trial.glob("checkpoint_*"), reverse=True):
            try:
                state = read_state(ckpt)
                finished += state.finished or (stop is not None and state.epoch >= stop)
                break
            except (FileNotFoundError, ValueError):
                continue
    plan = folder / "plan.json"
    planned = len(json.loads(plan.read_text())["trials"]) if plan.is_file() else None
    return bool(trials) and finished == (planned or len(trials))


#: stage -> (folder of its results under the study, "under way" test on that folder)
MOMENTS = {
    "tune-lr": ("tune-lr", _reported),
    "discrete": ("", _reported),
    "replicates": ("replicates", _reported),
    "darts-search": ("darts", _reported),
    "darts-retrain": ("darts-retrain", _reported),
    "more-seeds": ("seeds-2/trainings", _reported),
    "analysis": ("analysis", lambda f: (f / "tables" / "trials.parquet").is_file()),
}


def _run_until(config_path: Path, study: Path, stage: str, resume: bool, log: Path, env: dict) -> dict:
    """Start ``pefttune run`` and SIGKILL it once ``stage`` is under way; what was seen then."""
    sub, under_way = MOMENTS[stage]
    folder = study / sub if sub else study

    def moment():
        if not (folder.is_dir() and under_way(folder)):
            return None
        if stage == "analysis":
            return {"finished_before_kill": (folder / "summary.json").is_file()}
        return {"finished_before_kill": _trials_done(folder)}

    return run_until_killed(["run", str(config_path)] + (["--resume"] if resume else []), moment, log, env=env,
                            poll_s=0.05, notes=[study / "errors.log"])


TUNINGS = ["tune-lr", "tune-lr-darts"]  # the learning-rate protocol's rungs (stopped by design)


def _table(study: Path) -> pd.DataFrame:
    """The trained configurations' trials: no DARTS search, no rung of a rate."""
    trials = pd.read_parquet(study / "analysis" / "tables" / "trials.parquet")
    return trials[(trials["kind"] != "darts") & ~trials["experiment"].isin(TUNINGS)]


@pytest.fixture(scope="module")
def killed_and_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    manifest = write_tone_manifest(root / "data", classes=3, per_split={"train": 8, "dev": 4, "test": 4})
    cache = root / "cache"
    # the frozen cache filled once, so neither study's kill lands in a prefill (its own case:
    # test_kill_matrix_data.py) and the two studies never compute the same states at once
    env = {**os.environ, "PEFTTUNE_CACHE": str(cache)}
    reference_cfg = root / "reference.yaml"
    reference_cfg.write_text(yaml.safe_dump(_config(manifest, root / "results", "reference")))
    experiment = parse_config(yaml.safe_load(reference_cfg.read_text()), str(reference_cfg))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PEFTTUNE_CACHE", str(cache))
        prefill_frozen_cache(experiment, prepare_data(experiment), workers=1)
    # the uninterrupted study runs beside the killed one (its own driver, Ray and temp folder):
    # one CPU thread per trial, so contention changes no number
    reference_log = root / "reference.log"
    with reference_log.open("w") as out:
        reference = subprocess.Popen([sys.executable, "-m", "pefttune", "run", str(reference_cfg)], stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**env, "TMPDIR": tempfile.mkdtemp(prefix="pk-")})
    try:
        killed_cfg = root / "killed.yaml"
        # the killed study logs to MLflow (sqlite in its folder): every resume finds its runs again
        killed_cfg.write_text(yaml.safe_dump(_config(manifest, root / "results", "killed", {"mlflow": True})))
        study = root / "results" / "killed"
        log = root / "killed.log"
        seen = {}
        for k, stage in enumerate(MOMENTS):
            seen[stage] = _run_until(killed_cfg, study, stage, resume=k > 0, log=log, env=env)
        final = subprocess.run([sys.executable, "-m", "pefttune", "run", str(killed_cfg), "--resume"],
                               capture_output=True, text=True,
                               env={**env, "TMPDIR": tempfile.mkdtemp(prefix="pk-")}, timeout=600)
        assert reference.wait(timeout=600) == 0, reference_log.read_text()[-3000:]
    finally:
        if reference.poll() is None:
            os.killpg(reference.pid, signal.SIGKILL)
    return {"root": root, "reference": root / "results" / "reference", "killed": study, "seen": seen,
            "final": final, "log": log}


@pytest.mark.parametrize("stage", list(MOMENTS))
def test_kill_lands_mid_stage_and_the_resume_finishes(killed_and_reference, stage):
    run = killed_and_reference
    assert not run["seen"][stage]["finished_before_kill"], f"the kill in {stage} came after the stage finished"
    assert run["final"].returncode == 0, run["final"].stdout[-3000:] + run["final"].stderr[-3000:]
    assert (run["killed"] / "analysis" / "report.md").is_file()


def test_resumed_study_loses_and_duplicates_no_trial(killed_and_reference):
    killed = _table(killed_and_reference["killed"])
    reference = _table(killed_and_reference["reference"])
    done = killed[killed["outcome"] == "completed"]
    assert not done.duplicated(["config_id", "seed"]).any()
    assert len(killed) == len(done), killed[killed["outcome"] != "completed"][["config_id", "seed", "outcome"]]
    key = lambda t: sorted(zip(t["config_id"], t["seed"]))  # noqa: E731
    assert key(done) == key(reference[reference["outcome"] == "completed"])
    assert {"uniform", "discrete", "frozen", "darts-derived"} <= set(done["kind"])


def test_resumed_rungs_choose_the_uninterrupted_rates(killed_and_reference):
    tables = {k: pd.read_parquet(killed_and_reference[k] / "analysis" / "tables" / "trials.parquet")
              for k in ("killed", "reference")}
    rungs = {k: t[t["experiment"].isin(TUNINGS)].set_index(["config_id", "lr"]).sort_index()
             for k, t in tables.items()}
    assert len(rungs["killed"]) == len(rungs["reference"]) == 2 * 4  # 2 rates x (2 uniform, frozen, darts-derived)
    assert (rungs["killed"]["outcome"] == "stopped_early").all()
    pd.testing.assert_series_equal(rungs["killed"]["best_dev_score"], rungs["reference"]["best_dev_score"],
                                   check_exact=False, atol=1e-6)
    for folder in TUNINGS:
        choices = [json.loads((killed_and_reference[k] / folder / "lr_choices.json").read_text())["choices"]
                   for k in ("killed", "reference")]
        for choice in choices[0] + choices[1]:  # the rung continued: the same grid point, in each study's own folder
            trial, checkpoint = Path(choice.pop("checkpoint")).parts[-2:]
            choice["checkpoint"] = (trial.rsplit("_", 1)[1], checkpoint)
        assert choices[0] == choices[1]


def test_resumed_study_gives_the_uninterrupted_scores_and_verdicts(killed_and_reference):
    killed = _table(killed_and_reference["killed"]).set_index(["config_id", "seed"]).sort_index()
    reference = _table(killed_and_reference["reference"]).set_index(["config_id", "seed"]).sort_index()
    # a trial killed mid-epoch resumes from its last checkpoint with its optimizer and RNG state:
    # the same numbers as a trial that was never stopped
    pd.testing.assert_series_equal(killed["test_score"], reference["test_score"], check_exact=False, atol=1e-6)
    pd.testing.assert_series_equal(killed["best_dev_score"], reference["best_dev_score"], check_exact=False, atol=1e-6)
    verdicts = [json.loads((killed_and_reference[k] / "analysis" / "summary.json").read_text())["findings"]
                for k in ("killed", "reference")]
    assert {k: v["verdict"] for k, v in verdicts[0].items()} == {k: v["verdict"] for k, v in verdicts[1].items()}


def test_resumed_study_keeps_one_tracking_run_per_trial(killed_and_reference):
    import mlflow

    study = killed_and_reference["killed"]
    mlflow.set_tracking_uri(f"sqlite:///{study}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["killed"])
    trials = pd.read_parquet(study / "analysis" / "tables" / "trials.parquet")  # every Ray trial, DARTS included
    assert not runs["tags.pefttune_run"].duplicated().any()
    # a trial Ray dropped when it restored (made again by the searcher with another config) keeps
    # its run, KILLED; every other run is one of the study's trials, or the study's own
    kept = runs[runs["status"] != "KILLED"]
    keys = set(trials["experiment"] + "/" + trials["trial_id"])
    assert not keys & set(runs.loc[runs["status"] == "KILLED", "tags.pefttune_run"])
    assert len(kept) == len(trials) + 1 and set(kept["status"]) == {"FINISHED"}
    # every run's id is kept, those made after a restore included (Ray writes back the top-level
    # .json files of an experiment folder that it copied when it restored)
    ids = json.loads((study / "tracking" / "mlflow-runs.json").read_text())["mlflow"]["runs"]
    trial_runs = runs[~runs["tags.pefttune_run"].str.startswith("study:")]
    assert ids == {"study": runs.loc[runs["tags.pefttune_run"].str.startswith("study:"), "run_id"].iloc[0],
                   **dict(zip(trial_runs["tags.pefttune_run"], trial_runs["run_id"]))}
