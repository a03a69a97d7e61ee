"""Experiment tracking (``tracking:``): MLflow runs read back with MLflow's own client.

One run per trial (its config, its metrics per epoch, tags kind/config_id/seed) under one run of
the study holding the report, the tables and the plots; the same runs after ``--resume`` and
after ``Tuner.restore``; a tracker that cannot be reached is warned about once and the study
goes on.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pefttune.cli import main as cli_main
from pefttune.config import parse_config

DOWN = "http://127.0.0.1:9"  # nothing listens on the discard port: connection refused at once


# -- config ---------------------------------------------------------------------------------------


def test_tracking_is_off_by_default_and_takes_true_a_uri_or_a_mapping():
    assert parse_config({}).tracking is None
    assert parse_config({"tracking": {"mlflow": True}}).tracking.mlflow.uri is None
    assert parse_config({"tracking": {"mlflow": "http://mlflow:5000"}}).tracking.mlflow.uri == "http://mlflow:5000"
    section = parse_config({"tracking": {"mlflow": {"uri": "sqlite:////x/m.db", "experiment": "e"},
                                         "wandb": True}}).tracking
    assert (section.mlflow.experiment, section.wandb.mode) == ("e", "offline")
    assert parse_config({"tracking": {"mlflow": False}}).tracking.mlflow is None


@pytest.mark.parametrize("tracking, field", [
    ({"mlflw": True}, "tracking.mlflw"),
    ({"mlflow": {"url": "http://x"}}, "tracking.mlflow.url"),
    ({"wandb": {"mode": "cloud"}}, "tracking.wandb.mode"),
])
def test_unknown_tracking_keys_are_refused_naming_the_field(tracking, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        parse_config({"tracking": tracking})


def test_a_remote_storage_needs_an_explicit_tracking_uri():
    with pytest.raises(ValueError, match=r"tracking\.mlflow\.uri: required when storage is a URI"):
        parse_config({"tracking": {"mlflow": True}, "storage": "s3://bucket/results"})


def test_the_default_store_is_sqlite_in_the_study_folder():
    from pefttune.runtime.tracking import mlflow_target

    target = mlflow_target(parse_config({"name": "s", "tracking": {"mlflow": True}}), "/r/s")
    assert (target.uri, target.experiment, target.artifact_location) == (
        "sqlite:////r/s/mlflow.db", "s", "/r/s/mlflow-artifacts")


def test_mlflow_missing_is_a_clear_error_before_compute(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    config = {"name": "no-mlflow", "storage": str(tmp_path), "tracking": {"mlflow": True}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "tracking.mlflow: MLflow is not installed" in err and "pip install 'pefttune[tracking]'" in err
    assert not (tmp_path / "no-mlflow").exists()  # nothing made, nothing trained


def test_the_core_imports_the_trackers_only_when_tracking_is_on():
    """Only the callback modules (mlflow_trials, wandb_trials) import a tracker at their top; the
    rest imports them inside the functions that run when tracking is on."""
    import ast

    package = Path(__file__).resolve().parents[1] / "src" / "pefttune"
    trackers = ("mlflow", "wandb", "pefttune.runtime.mlflow_trials", "ray.air.integrations")
    eager = []
    for path in package.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == t or n.startswith(t + ".") for n in names for t in trackers):
                eager.append(f"{path.relative_to(package)}: {names}")
    assert sorted(eager) == ["runtime/mlflow_trials.py: ['ray.air.integrations.mlflow']",
                             "runtime/wandb_trials.py: ['ray.air.integrations.wandb']"], eager


# -- the trial callback on Ray's restore ---------------------------------------------------------------


def _make_trainable(marker: str):
    """A local function, so cloudpickle ships it by value to Ray's workers."""

    def _trainable(config):
        import os as _os

        from ray import tune

        for epoch in (1, 2):
            tune.report({"epoch": epoch, "dev_accuracy": 0.25 * epoch, "kind": "uniform",
                         "config_id": f"uniform:m{config['seed']}", "seed": config["seed"],
                         "alpha/L00/houlsby+lora": 0.5})
            if config["seed"] == 1 and not _os.path.exists(marker):
                open(marker, "w").close()
                raise RuntimeError("the first attempt fails")

    return _trainable


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_a_restored_experiment_logs_into_the_same_trial_runs(ray_session, tmp_path):
    from ray import tune

    from pefttune.runtime.study_dir import study_dir
    from pefttune.runtime.tracking import RunIds, mlflow_target
    from pefttune.runtime.tune_run import run_config

    config = parse_config({"name": "restore", "storage": str(tmp_path), "tracking": {"mlflow": True},
                           "search": {"max_failures": 0}})
    path = f"{study_dir(config)}/grid"
    trainable = tune.with_resources(_make_trainable(str(tmp_path / "failed-once")), {"cpu": 1})
    tuner = tune.Tuner(trainable, param_space={"seed": tune.grid_search([0, 1])},
                       tune_config=tune.TuneConfig(max_concurrent_trials=2),
                       run_config=run_config(config, path, verbose=0))
    first = tuner.fit()
    assert sorted(bool(r.error) for r in first) == [False, True]

    target = mlflow_target(config, study_dir(config))
    client = _client(target.uri)
    experiment = client.get_experiment_by_name("restore").experiment_id
    before = {r.data.tags["pefttune_run"]: r for r in client.search_runs([experiment])}
    assert len(before) == 2 and sorted(r.info.status for r in before.values()) == ["FAILED", "FINISHED"]

    # the callbacks come back from Ray's tuner.pkl; the errored trial runs again into its own run
    restored = tune.Tuner.restore(path, trainable=trainable, resume_errored=True).fit()
    assert not any(r.error for r in restored)
    after = {r.data.tags["pefttune_run"]: r for r in client.search_runs([experiment])}
    assert {k: r.info.run_id for k, r in after.items()} == {k: r.info.run_id for k, r in before.items()}
    assert {r.info.status for r in after.values()} == {"FINISHED"}
    ids = RunIds(target)
    for key, run in after.items():
        assert ids.get(key) == run.info.run_id and key.startswith("grid/")
        seed = int(run.data.tags["seed"])
        assert (run.data.tags["kind"], run.data.tags["config_id"]) == ("uniform", f"uniform:m{seed}")
        history = client.get_metric_history(run.info.run_id, "dev_accuracy")
        # seed 1: epoch 1 of the failed attempt, then epochs 1 and 2 of the retry, in one run
        assert sorted(m.step for m in history) == ([1, 2] if seed == 0 else [1, 1, 2])
        assert "alpha/L00/houlsby_lora" in run.data.metrics  # a name MLflow accepts
        assert run.data.params["seed"] == str(seed)


class _Trial:
    """What the callback reads of a Ray trial."""

    def __init__(self, trial_id: str, point: int):
        self.trial_id, self.config = trial_id, {"point": point, "seed": 0, "kind": "uniform"}

    def __str__(self) -> str:
        return f"train_fn_{self.trial_id}"


def test_a_trial_made_again_under_a_new_ray_id_keeps_its_run(tmp_path):
    """Ray restores a grid from a snapshot older than its trials by making them again, with new
    ids: each keeps the run of its trial config; a run whose trial is gone ends KILLED."""
    import pickle

    from pefttune.runtime.mlflow_trials import MlflowTrials
    from pefttune.runtime.tracking import RunIds, mlflow_target

    config = parse_config({"name": "again", "storage": str(tmp_path), "tracking": {"mlflow": True}})
    target = mlflow_target(config, str(tmp_path / "again"))
    first = MlflowTrials(target, "replicates")
    first.setup()
    old = [_Trial(f"aaaaa_0000{i}", i) for i in range(3)]
    for trial in old:
        first.on_trial_start(0, old, trial)
        first.log_trial_result(1, trial, {"epoch": 1, "dev_accuracy": 0.5})
    # killed; the restored experiment holds points 0 and 1 under new ids (point 2 is gone)
    second = pickle.loads(pickle.dumps(first))
    second.setup()
    new = [_Trial(f"bbbbb_0000{i}", i) for i in range(2)]
    for trial in new:
        second.on_trial_start(0, new, trial)
        second.log_trial_result(1, trial, {"epoch": 1, "dev_accuracy": 0.75})
        second.log_trial_end(trial)
    second.on_experiment_end(new)

    client = _client(target.uri)
    runs = {r.data.tags["pefttune_run"]: r for r in client.search_runs([second.experiment_id])}
    assert sorted(runs) == ["replicates/aaaaa_00002", "replicates/bbbbb_00000", "replicates/bbbbb_00001"]
    assert {k: r.info.status for k, r in runs.items()} == {
        "replicates/aaaaa_00002": "KILLED", "replicates/bbbbb_00000": "FINISHED", "replicates/bbbbb_00001": "FINISHED"}
    for key in ("replicates/bbbbb_00000", "replicates/bbbbb_00001"):
        history = client.get_metric_history(runs[key].info.run_id, "dev_accuracy")
        assert sorted(m.value for m in history) == [0.5, 0.75]  # both attempts, one run
    ids = RunIds(target)
    assert ids.get("replicates/bbbbb_00000") == runs["replicates/bbbbb_00000"].info.run_id
    assert ids.get("replicates/aaaaa_00000") is None  # the id moved with the run


def test_wandb_offline_writes_one_run_per_trial_resumed_by_its_trial_id(ray_session, tmp_path):
    pytest.importorskip("wandb")
    from ray import tune

    from pefttune.runtime.study_dir import study_dir
    from pefttune.runtime.tune_run import run_config

    config = parse_config({"name": "wb", "storage": str(tmp_path), "tracking": {"wandb": True},
                           "search": {"max_failures": 0}})
    path = f"{study_dir(config)}/grid"
    trainable = tune.with_resources(_make_trainable(str(tmp_path / "failed-once")), {"cpu": 1})
    first = tune.Tuner(trainable, param_space={"seed": tune.grid_search([0, 1])},
                       tune_config=tune.TuneConfig(max_concurrent_trials=2),
                       run_config=run_config(config, path, verbose=0)).fit()
    restored = tune.Tuner.restore(path, trainable=trainable, resume_errored=True).fit()
    assert not any(r.error for r in restored)
    trial_ids = sorted(r.metrics["trial_id"] for r in first)
    runs = sorted((tmp_path / "wb" / "wandb" / "wandb").glob("offline-run-*"))
    # one W&B run id per trial (the Ray trial id): the retried trial writes its second part under the same id
    assert sorted({r.name.rsplit("-", 1)[-1] for r in runs}) == trial_ids and len(runs) == 3
    assert all(any(r.glob("run-*.wandb")) for r in runs)


def test_an_unreachable_server_is_warned_about_once_and_nothing_fails(tmp_path, capsys, monkeypatch):
    from pefttune.runtime import tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once, no backoff
    from pefttune.runtime.mlflow_trials import MlflowTrials

    config = parse_config({"name": "down", "storage": str(tmp_path), "tracking": {"mlflow": DOWN}})
    target = tracking.mlflow_target(config, str(tmp_path / "down"))
    tracking._OFF.pop(target.label, None)
    assert tracking.start_study(config, target.study_path, resume=False) is None

    class Trial:
        trial_id, config = "t1", {"seed": 0}

    callback = MlflowTrials(target, ".")
    callback.setup()
    callback.log_trial_start(Trial)
    callback.log_trial_result(1, Trial, {"epoch": 1, "dev_accuracy": 0.5})
    callback.log_trial_end(Trial)
    tracking.log_study(config, target.study_path, [])
    tracking.end_study(config, target.study_path)
    err = capsys.readouterr().err
    assert err.count("tracking: MLflow at http://127.0.0.1:9 failed") == 1, err
    assert "the study goes on without it" in err


# -- a study ----------------------------------------------------------------------------------------


def _study_config(manifest: Path, storage: Path, name: str, tracking: dict) -> dict:
    from test_search_fixtures import search_config

    return search_config(
        manifest, storage, name=name,
        methods={"lora": {"rank": 2}, "bitfit": {}},
        train={"epochs": 2, "max_steps_per_epoch": 2},
        search={"num_samples": 1, "scheduler": "none", "max_failures": 0, "hybrid": False, "replicate_top": 0},
        darts={"enabled": False},
        tracking=tracking,
    )


def _runs(study: Path, name: str) -> pd.DataFrame:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{study}/mlflow.db")
    return mlflow.search_runs(experiment_names=[name])


@pytest.fixture(scope="module")
def tracked(ray_session, tmp_path_factory):
    from test_search_fixtures import write_tone_manifest

    root = tmp_path_factory.mktemp("tracked")
    manifest = write_tone_manifest(root / "data", classes=3, per_split={"train": 6, "dev": 3, "test": 3})
    path = root / "tracked.yaml"
    path.write_text(yaml.safe_dump(_study_config(manifest, root / "results", "tracked", {"mlflow": True})))
    assert cli_main(["run", str(path)]) == 0
    study = root / "results" / "tracked"
    return {"root": root, "manifest": manifest, "study": study, "runs": _runs(study, "tracked")}


def test_a_study_is_one_run_per_trial_under_the_study_run(tracked):
    runs = tracked["runs"]
    trials = pd.read_parquet(tracked["study"] / "analysis" / "tables" / "trials.parquet")
    study = runs[runs["tags.pefttune_run"].str.startswith("study:")]
    assert len(study) == 1 and len(runs) == len(trials) + 1
    assert not runs["tags.pefttune_run"].duplicated().any()
    trial_runs = runs[~runs.index.isin(study.index)]
    assert (trial_runs["tags.mlflow.parentRunId"] == study["run_id"].iloc[0]).all()
    ids = json.loads((tracked["study"] / "tracking" / "mlflow-runs.json").read_text())["mlflow"]["runs"]
    assert ids == {"study": study["run_id"].iloc[0], **dict(zip(trial_runs["tags.pefttune_run"], trial_runs["run_id"]))}
    assert (trial_runs["status"] == "FINISHED").all()
    logged = sorted(zip(trial_runs["tags.kind"], trial_runs["tags.config_id"], trial_runs["tags.seed"].astype(int)))
    assert logged == sorted(zip(trials["kind"], trials["config_id"], trials["seed"].astype(int)))
    # its config as parameters, its metrics per epoch
    client = _client(f"sqlite:///{tracked['study']}/mlflow.db")
    for run_id, placement in zip(trial_runs["run_id"], trial_runs["params.placement"]):
        assert json.loads(placement)["num_layers"] == 4
        history = client.get_metric_history(run_id, "dev_accuracy")
        assert sorted({m.step for m in history}) == [1, 2]


def test_the_study_run_holds_the_report_tables_plots_and_provenance(tracked):
    runs = tracked["runs"]
    study = runs[runs["tags.pefttune_run"].str.startswith("study:")].iloc[0]
    assert study["status"] == "FINISHED"
    client = _client(f"sqlite:///{tracked['study']}/mlflow.db")
    names = {a.path for a in client.list_artifacts(study["run_id"])}
    assert {"report.md", "summary.json", "experiment.yaml", "tables", "plots"} <= names
    tables = {a.path for a in client.list_artifacts(study["run_id"], "tables")}
    assert {"tables/trials.parquet", "tables/configs.parquet", "tables/history.parquet"} <= tables
    assert any(a.path.endswith(".png") for a in client.list_artifacts(study["run_id"], "plots"))
    local = Path(client.download_artifacts(study["run_id"], "report.md", str(tracked["root"] / "dl")))
    assert local.read_text() == (tracked["study"] / "analysis" / "report.md").read_text()
    summary = json.loads((tracked["study"] / "analysis" / "summary.json").read_text())
    assert study["tags.provenance.config_hash"] == summary["provenance"]["config_hash"]


def test_trials_go_on_when_the_tracking_server_is_down(ray_session, tmp_path, capsys, monkeypatch):
    """A Ray experiment with the study's run config and an unreachable server: every trial
    finishes, one warning (the study's own run: the unit test above)."""
    from ray import tune

    from pefttune.runtime import tracking
    from pefttune.runtime.study_dir import study_dir
    from pefttune.runtime.tune_run import run_config

    tracking._OFF.pop(f"MLflow at {DOWN}", None)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    (tmp_path / "failed-once").touch()  # no trial fails
    config = parse_config({"name": "down", "storage": str(tmp_path), "tracking": {"mlflow": DOWN}})
    results = tune.Tuner(tune.with_resources(_make_trainable(str(tmp_path / "failed-once")), {"cpu": 1}),
                         param_space={"seed": tune.grid_search([0, 1])},
                         tune_config=tune.TuneConfig(max_concurrent_trials=2),
                         run_config=run_config(config, f"{study_dir(config)}/grid", verbose=0)).fit()
    assert not any(r.error for r in results) and [r.metrics["epoch"] for r in results] == [2, 2]
    err = capsys.readouterr().err
    assert err.count(f"tracking: MLflow at {DOWN} failed") == 1, err


# -- provenance ---------------------------------------------------------------------------------------


def test_provenance_is_in_the_report_summary_tables_and_model_card(tracked, tmp_path):
    import pyarrow.parquet as pq

    from pefttune.runtime.provenance import PARQUET_KEY, config_hash

    analysis = tracked["study"] / "analysis"
    saved = yaml.safe_load((tracked["study"] / "experiment.yaml").read_text())
    summary = json.loads((analysis / "summary.json").read_text())["provenance"]
    assert summary["config_hash"] == config_hash(saved) and len(summary["config_hash"]) == 16
    for field in ("pefttune", "git_commit", "python", "torch", "transformers", "peft", "ray", "optuna", "numpy",
                  "cpu", "cpu_threads", "gpu", "gpu_count"):
        assert summary[field] not in (None, ""), field
    import torch
    assert summary["torch"].split("+")[0] == torch.__version__.split("+")[0]
    report = (analysis / "report.md").read_text()
    assert "## Provenance" in report and summary["config_hash"] in report and summary["git_commit"][:12] in report
    for table in ("trials", "configs", "history", "predictions", "ensembles", "pairwise"):
        meta = pq.read_schema(analysis / "tables" / f"{table}.parquet").metadata
        assert json.loads(meta[PARQUET_KEY])["config_hash"] == summary["config_hash"], table
        assert b"pandas" in meta  # the pandas schema is kept

    out = tmp_path / "model"
    assert cli_main(["export-model", str(tracked["study"]), "--best", "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "## Provenance" in card and summary["config_hash"] in card and f"torch {summary['torch']}" in card
    rows = [line.split("|") for line in card.splitlines() if line.startswith("| ") and "trial" not in line
            and line.count("|") == 7]
    assert rows
    for cells in rows:  # dev and test rounded to 3 decimals
        for cell in (cells[4].strip(), cells[5].strip()):
            assert len(cell.split(".")[-1]) <= 3, card
