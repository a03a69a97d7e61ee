"""The suite: one study per task, `suite.md` shaped like the paper's table, the
`suite` table, findings per task and over all tasks, `--resume` of the whole suite."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pefttune.cli import main as cli_main
from pefttune.config import parse_config, task_configs
from pefttune.analysis.findings import across_tasks
from pefttune.analysis.findings.across_tasks import overall_verdict
from pefttune.suite import task_rows, write_suite


def _fake_study(root, task, metric, mode, scores, vote, strategies, verdicts):
    """A finished study's analysis: configs + trials tables and summary.json (the files the suite reads)."""
    tables = root / task / "analysis" / "tables"
    tables.mkdir(parents=True)
    configs, trials = [], []
    for (config_id, kind, method), (dev, test) in scores.items():
        ids = [f"{task}-{config_id}-{s}" for s in range(3)]
        configs.append({"config_id": config_id, "kind": kind, "method": method, "dev_mean": sum(dev) / 3,
                        "trial_ids": ",".join(ids)})
        trials += [{"trial_id": i, "seed": s, "test_score": test[s]} for s, i in enumerate(ids)]
    pd.DataFrame(configs).to_parquet(tables / "configs.parquet")
    pd.DataFrame(trials).to_parquet(tables / "trials.parquet")
    per_seed = [{"seed": s, "vote_test": vote[s],
                 "strategies": {k: {"dev": v[0][s], "test": v[1][s]} for k, v in strategies.items()}}
                for s in range(3)]
    findings = {str(k): {"claim": f"claim {k}", "verdict": v, "rule": f"rule of {k} on {task}"}
                for k, v in verdicts.items()}
    findings["2"].update({"majority_strategy": "vote", "per_seed": per_seed})
    (root / task / "analysis" / "summary.json").write_text(json.dumps(
        {"metric": metric, "mode": mode, "findings": findings}))
    return str(root / task)


def test_suite_table_rows_cells_findings_and_parquet(tmp_path):
    ks_scores = {
        ("frozen", "frozen", None): ([0.5] * 3, [0.50, 0.52, 0.54]),
        ("log-mel", "log-mel", None): ([0.3] * 3, [0.30, 0.30, 0.30]),
        ("uniform:lora", "uniform", "lora"): ([0.8] * 3, [0.85, 0.86, 0.87]),
        ("uniform:bitfit", "uniform", "bitfit"): ([0.7] * 3, [0.75, 0.76, 0.77]),
        ("hybrid", "hybrid", None): ([0.79] * 3, [0.84, 0.85, 0.86]),
        ("discrete:a", "discrete", None): ([0.81] * 3, [0.80, 0.80, 0.80]),  # best by dev, worse on test
        ("discrete:b", "discrete", None): ([0.78] * 3, [0.90, 0.90, 0.90]),
        ("darts-derived:c", "darts-derived", None): ([0.8] * 3, [0.83, 0.84, 0.85]),
    }
    strategies = {"vote": ([0.8] * 3, [0.88, 0.88, 0.88]), "soft": ([0.82] * 3, [0.87, 0.87, 0.87])}
    ks = _fake_study(tmp_path, "ks", "accuracy", "max", ks_scores, [0.88] * 3, strategies,
                     {1: "reproduced", 2: "reproduced", 3: "inconclusive"})
    pr_scores = {("uniform:lora", "uniform", "lora"): ([0.5] * 3, [0.40, 0.42, 0.44]),
                 ("discrete:a", "discrete", None): ([0.45] * 3, [0.50, 0.50, 0.50]),  # lower PER is better
                 ("discrete:b", "discrete", None): ([0.55] * 3, [0.30, 0.30, 0.30])}
    pr_strategies = {"rover": ([0.5] * 3, [0.41, 0.41, 0.41]), "best-path": ([0.4] * 3, [0.45, 0.45, 0.45])}
    pr = _fake_study(tmp_path, "pr", "per", "min", pr_scores, [0.41] * 3, pr_strategies,
                     {1: "inconclusive", 2: "reproduced", 3: "inconclusive"})

    rows = task_rows("ks", ks)
    assert set(rows.columns) == {"task", "row", "config_id", "seed", "metric", "score"}
    assert rows.groupby("row").size().eq(3).all()  # every row has its three seeds
    picked = rows.groupby("row")["config_id"].first()
    assert picked["best discrete (by dev)"] == "discrete:a"  # chosen by dev, not by test
    assert picked["best ensemble (by dev)"] == "ensemble:soft"
    assert set(task_rows("pr", pr).query("row == 'best discrete (by dev)'")["config_id"]) == {"discrete:a"}
    assert set(task_rows("pr", pr).query("row == 'best ensemble (by dev)'")["config_id"]) == {"ensemble:best-path"}

    files = write_suite(str(tmp_path), {"ks": ks, "pr": pr})
    table = pd.read_parquet(files["table"])
    assert list(table.columns) == ["task", "row", "config_id", "seed", "metric", "score"]
    assert set(table["task"]) == {"ks", "pr"} and set(table["metric"]) == {"accuracy", "per"}
    text = (tmp_path / "suite.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| configuration"))
    assert header == "| configuration | ks (accuracy) | pr (per) |"
    body = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| configuration")]
    labels = [line.split(" | ")[0][2:] for line in body]
    assert labels == ["frozen (head only)", "log-mel (no encoder)", "uniform bitfit", "uniform lora",
                      "hybrid (merged in each layer)", "best discrete (by dev)", "DARTS-derived (by dev)",
                      "majority vote", "best ensemble (by dev)"]
    lora = next(line for line in body if line.startswith("| uniform lora"))
    assert "0.860 [0.835, 0.885] (n=3)" in lora and "0.420 [0.370, 0.470] (n=3)" in lora
    assert next(line for line in body if line.startswith("| frozen")).endswith("| - |")  # no pr frozen row
    assert "over all tasks: **reproduced**" in text  # finding 2: both tasks
    assert "over all tasks: **differs by task: ks reproduced, pr inconclusive**" in text  # finding 1
    assert "- pr: **inconclusive**: rule of 1 on pr" in text


def test_a_study_analysis_dir(tmp_path, monkeypatch):
    from pefttune.analysis.store import analysis_dir

    monkeypatch.chdir(tmp_path)
    assert analysis_dir("ks") == tmp_path / "ks" / "analysis"
    assert analysis_dir(f"file://{tmp_path}/ks") == tmp_path / "ks" / "analysis"
    assert str(analysis_dir("s3://bucket/studies/ks/")) == "pefttune-analysis/ks"  # remote: written locally


def test_a_suite_writes_beside_its_studies_or_locally_for_remote_storage(tmp_path, monkeypatch):
    from pefttune.analysis.store import local_output_dir

    monkeypatch.chdir(tmp_path)
    assert local_output_dir("suite") == tmp_path / "suite"  # the suite folder itself
    assert local_output_dir(f"file://{tmp_path}/suite") == tmp_path / "suite"
    assert str(local_output_dir("s3://bucket/suites/embedded/")) == "pefttune-analysis/embedded"
    files = write_suite("gs://bucket/suites/embedded", {})  # no task folders: an empty table, written locally
    assert Path(files["table"]).resolve().parent == tmp_path / "pefttune-analysis" / "embedded"
    assert (tmp_path / "pefttune-analysis" / "embedded" / "suite.md").is_file()


def test_overall_verdict_rule():
    assert overall_verdict({"ks": "reproduced", "sid": "reproduced"}) == "reproduced"
    assert overall_verdict({"ks": "reproduced", "sid": "inconclusive"}).startswith("differs by task")
    assert overall_verdict({"ks": "reproduced", "sid": "missing"}).startswith("incomplete")


def test_findings_across_tasks_quote_each_task_and_say_when_darts_derived_uniform():
    same = {"claim": "DARTS does not beat uniform", "verdict": "reproduced", "rule": "reproduced: [-0.01, 0]",
            "derived_is_uniform": True}
    lines, overall = across_tasks.render({"ks": {"findings": {"1": same}}, "sid": {}})
    text = "\n".join(lines)
    assert "### Finding 1: DARTS does not beat uniform" in text and "### Finding 3: " in text
    assert ("- ks: **reproduced**: reproduced: [-0.01, 0] (DARTS derived the best uniform placement itself: one "
            "configuration compared with itself)") in text
    assert "- sid: **missing**: no study" in text
    assert overall == {"1": "incomplete: ks reproduced, sid missing", "2": "incomplete: ks missing, sid missing",
                       "3": "incomplete: ks missing, sid missing"}


def test_task_configs_merge_overrides_and_name_bad_fields():
    config = parse_config({"name": "suite", "storage": "/tmp/x", "train": {"epochs": 3},
                           "tasks": {"ks": None, "pr": {"train": {"epochs": 9}}}})
    tasks = task_configs(config)
    assert {t: (c.data.task, c.train.epochs, c.storage, c.name, c.tasks) for t, c in tasks.items()} == {
        "ks": ("ks", 3, "/tmp/x/suite", "ks", None), "pr": ("pr", 9, "/tmp/x/suite", "pr", None)}
    with pytest.raises(ValueError, match=r"tasks\.pr\.train\.epochs: Input should be greater than or equal to 1"):
        parse_config({"tasks": {"pr": {"train": {"epochs": 0}}}})
    with pytest.raises(ValueError, match="tasks: a task is listed twice"):
        parse_config({"tasks": ["ks", "ks"]})


@pytest.mark.slow
def test_suite_runs_each_task_writes_the_table_and_resumes(ray_session, tmp_path, capsys):
    """A one-task suite runs; a second task added is refused without ``--resume``; a ``--resume``
    killed (SIGKILL of its process group) while the second task's trials run is resumed again,
    keeping the first task's study as it was, and the suite's table holds both tasks."""
    from helpers import run_until_killed
    from test_search_fixtures import search_config, write_tone_manifest

    manifest = write_tone_manifest(tmp_path / "data", classes=3, per_split={"train": 6, "dev": 3, "test": 3})
    config = search_config(manifest, tmp_path / "results", name="suite",
                           train={"epochs": 1, "max_steps_per_epoch": 2, "seeds": [0, 1]},
                           search={"num_samples": 1, "scheduler": "none", "max_failures": 0, "replicate_top": 1},
                           darts={"enabled": False})
    config["methods"] = {"lora": {"rank": 2}, "bitfit": {}}
    config["tasks"] = {"ks": None}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["run", str(path)]) == 0
    root = tmp_path / "results" / "suite"
    assert (root / "ks" / "analysis" / "report.md").is_file()
    # a second task added: --resume keeps the finished ks study and runs only sid
    config["tasks"] = {"ks": None, "sid": None}
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["run", str(path)]) == 2  # without --resume an existing suite is refused
    capsys.readouterr()
    ks_files, table_before = _trial_files(root / "ks"), (root / "suite.md").read_text()
    def second_task_running():  # a trial of sid has reported
        if any(p.stat().st_size > 0 for p in (root / "sid").glob("train_fn_*/result.json")):
            return {"sid_done": (root / "sid" / "analysis" / "report.md").exists()}
        return None

    seen = run_until_killed(["run", str(path), "--resume"], second_task_running, tmp_path / "killed.log")
    assert not seen["sid_done"] and (root / "suite.md").read_text() == table_before  # ks alone, as before
    assert cli_main(["run", str(path), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "suite task ks: finished before, kept" in out and "suite task sid (2 of 2)" in out
    assert _trial_files(root / "ks") == ks_files  # the first task was not run again
    trials = pd.read_parquet(root / "sid" / "analysis" / "tables" / "trials.parquet")
    assert len(trials) and (trials["outcome"] == "completed").all()
    assert not trials.duplicated(["config_id", "seed"]).any()  # the killed trials were not run twice
    table = pd.read_parquet(root / "suite.parquet")
    assert set(table["task"]) == {"ks", "sid"}
    assert set(table[table["row"] == "uniform lora"]["seed"]) == {0, 1}
    text = (root / "suite.md").read_text()
    assert "| configuration | ks (accuracy) | sid (accuracy) |" in text
    for finding in ("Finding 1", "Finding 2", "Finding 3"):
        assert finding in text


def _trial_files(study: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file of the study's trials (and its summary)."""
    return {p.relative_to(study).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(study.rglob("*")) if p.is_file() and ("train_fn_" in p.as_posix() or p.name == "summary.json")}


def test_a_config_extends_another_and_replaces_its_methods(tmp_path):
    from pefttune.config import CONFIG_DIR, load_config

    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "name": "base", "train": {"epochs": 3, "lr": 0.02}, "methods": {"lora": {"rank": 4}, "bitfit": {}}}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({
        "extends": "base.yaml", "name": "child", "train": {"epochs": 7}, "methods": {"bitfit": {}}}))
    child = load_config(tmp_path / "child.yaml")
    assert (child.name, child.train.epochs, child.train.lr, list(child.methods)) == ("child", 7, 0.02, ["bitfit"])
    (tmp_path / "shipped.yaml").write_text("extends: embedded.yaml\nname: mine\n")
    mine, embedded = load_config(tmp_path / "shipped.yaml"), load_config(CONFIG_DIR / "embedded.yaml")
    assert mine.model_dump(exclude={"name"}) == embedded.model_dump(exclude={"name"})
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ValueError, match="a cycle"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match="extends: nowhere.yaml is neither beside it nor a shipped config"):
        load_config(tmp_path / "missing.yaml")
