"""Everything `pefttune search` checks before Ray starts: the config (errors name the
field), the search space, the data and the experiment directory; and the CLI's exit codes.
Ray is never started here: `connect_ray` is replaced by a function that fails the test."""
from __future__ import annotations

import pytest
import yaml

from pefttune.cli import main
from pefttune.config import CONFIG_DIR, load_config, parse_config
from pefttune.search import run as search_run
from pefttune.search.run import build_search_plan, prepare_directory, run_search
from test_search_fixtures import search_config, write_tone_manifest


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray must not start for an invalid experiment")

    monkeypatch.setattr(search_run, "connect_ray", refuse)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_tone_manifest(tmp_path_factory.mktemp("tones"), per_split={"train": 2, "dev": 1, "test": 1})


def write(tmp_path, data: dict, name: str = "experiment.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"search": {"algorithmm": "tpe"}}, "search.algorithmm: unknown key; did you mean 'algorithm'?"),
        ({"search": {"algorithm": "bayes"}}, "search.algorithm: Input should be 'tpe', 'random', 'grid' or 'nsga2'"),
        ({"search": {"num_samples": -1}}, "search.num_samples: Input should be greater than or equal to 0"),
        ({"train": {"lr_range": [0.001, 0.01]}}, "train.lr_range: replaced by train.lr_grid"),
        ({"train": {"lr_grid": [0.01, -1]}}, "train.lr_grid: must be a non-empty list of rates > 0"),
        ({"methods": {"lora": {"rank": [4, "big"]}}}, "methods: lora.rank: expected an integer"),
        ({"methods": {"dora": {}}}, "unknown PEFT method 'dora'"),
        ({"resources": {"gpu": -1}}, "resources.gpu: Input should be greater than or equal to 0"),
        ({"budget": -5}, "budget: Input should be greater than or equal to 0"),
        ({"head": {"norm": "layer"}}, "head.norm: Input should be 'none' or 'batch'"),
    ],
)
def test_invalid_config_fails_before_ray_with_the_field(tmp_path, manifest, no_ray, change, message):
    data = search_config(manifest, tmp_path / "results")
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) and key != "methods" else value
    path = write(tmp_path, data)
    with pytest.raises(ValueError) as info:
        run_search(path)
    assert message in str(info.value) and str(path) in str(info.value)
    assert not (tmp_path / "results").exists()  # nothing written either


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"search": {"grace_period": 5, "scheduler": "asha"}}, ValueError, "search.grace_period: 5 is more than train.epochs (2)"),
        ({"backbone": "./no/such/model"}, FileNotFoundError, "backbone: local path"),
        ({"storage": "s3://bucket/results"}, ValueError, "search.optuna_storage: required when storage is a URI"),
    ],
)
def test_invalid_experiment_fails_before_ray(tmp_path, manifest, no_ray, change, error, message):
    data = search_config(manifest, tmp_path / "results")
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    with pytest.raises(error, match=None) as info:
        run_search(parse_config(data))
    assert message in str(info.value)


def test_bad_data_fails_before_ray(tmp_path, manifest, no_ray):
    data = search_config(tmp_path / "missing.parquet", tmp_path / "results")
    with pytest.raises(FileNotFoundError, match="data.path: .*missing.parquet: manifest not found"):
        run_search(parse_config(data))
    import pandas as pd

    frame = pd.read_parquet(manifest)
    frame.loc[frame["split"] == "test", "label"] = "unseen"
    bad = tmp_path / "bad" / "manifest.parquet"
    bad.parent.mkdir()
    frame.assign(path=[str(manifest.parent / p) for p in frame["path"]]).to_parquet(bad)
    with pytest.raises(ValueError, match="data.path: .*test has labels .*unseen"):
        run_search(parse_config(search_config(bad, tmp_path / "results2")))


def test_experiment_directory_rules(tmp_path, manifest):
    config = parse_config(search_config(manifest, tmp_path / "results"))
    experiment = build_search_plan(config)
    with pytest.raises(FileNotFoundError, match="--resume: no search to resume at .*search-test"):
        prepare_directory(experiment, resume=True)
    prepare_directory(experiment, resume=False)
    saved = tmp_path / "results" / "search-test" / "experiment.yaml"
    assert parse_config(yaml.safe_load(saved.read_text())) == config
    with pytest.raises(FileExistsError, match="search-test already holds a search; resume it"):
        prepare_directory(experiment, resume=False)
    (saved.parent / "tuner.pkl").write_bytes(b"")  # as if Ray had started
    prepare_directory(experiment, resume=True)
    changed = build_search_plan(config.model_copy(update={"budget": 10}))
    with pytest.raises(ValueError, match="config differs from .*experiment.yaml in budget"):
        prepare_directory(changed, resume=True)


def test_experiment_counts_fixed_points_and_grid(tmp_path, manifest):
    config = parse_config(search_config(manifest, tmp_path))
    experiment = build_search_plan(config)
    assert [p.label for p in experiment.points] == ["uniform:lora", "uniform:bitfit", "uniform:sequential", "hybrid"]
    assert experiment.num_samples == config.search.num_samples + 4
    assert experiment.metric == "best_dev_accuracy" and experiment.mode == "max"
    assert experiment.optuna_url == f"sqlite:///{tmp_path / 'search-test' / 'optuna.db'}"
    grid = parse_config(search_config(manifest, tmp_path, methods={"bitfit": {}},
                                      search={"algorithm": "grid", "num_samples": 0, "uniform_baselines": False,
                                                 "hybrid": False}))
    assert build_search_plan(grid).num_samples == 2**4  # every layer: none or bitfit


def test_shipped_configs_are_valid():
    superb = load_config(CONFIG_DIR / "superb-ks-hubert-base.yaml")
    assert superb.backbone == "facebook/hubert-base-ls960" and superb.data.source == "speech_commands"
    assert superb.resources.gpu == 0.25 and superb.train.bf16 and superb.data.task == "ks"
    embedded = load_config()
    assert embedded.search.algorithm == "tpe" and embedded.search.scheduler == "asha"
    pr = load_config(CONFIG_DIR / "embedded-pr.yaml")  # the embedded study, on phoneme recognition
    assert (pr.data.task, pr.data.sentences, pr.train.epochs, pr.metric) == ("pr", 3000, 6, "per")
    assert pr.methods == embedded.methods and pr.budget == embedded.budget
    assert pr.darts.search_cpu == 2 and embedded.darts.search_cpu is None  # the PR search on both cores
    assert pr.darts.model_copy(update={"search_cpu": None}) == embedded.darts
    suite = load_config(CONFIG_DIR / "embedded-suite.yaml")
    assert list(suite.tasks) == ["ks", "sid", "pr"] and suite.methods == embedded.methods
    from pefttune.config import task_configs

    tasks = task_configs(suite)
    # the suite's pr: embedded-pr.yaml's settings at 0.4 of its sentence-epochs (1800 x 4 of 3000 x 6)
    assert (tasks["pr"].data.sentences, tasks["pr"].train.epochs) == (1800, 4)
    assert tasks["pr"].data.sentences * tasks["pr"].train.epochs == 0.4 * pr.data.sentences * pr.train.epochs
    assert tasks["pr"].darts == pr.darts and tasks["pr"].train.head_lr == pr.train.head_lr
    assert tasks["pr"].data.batch_size == pr.data.batch_size
    ks = tasks["ks"].model_dump(exclude={"name", "storage"})
    assert ks["data"].pop("test_per_class") == 200 and embedded.data.test_per_class is None  # 2400 test clips, not 4800
    ks["data"]["test_per_class"] = None
    assert ks == embedded.model_dump(exclude={"name", "storage"})


def test_cli_reports_errors_with_exit_code_2(tmp_path, manifest, no_ray, capsys):
    data = search_config(manifest, tmp_path / "results")
    data["search"]["reduction_factor"] = 1
    assert main(["search", str(write(tmp_path, data))]) == 2
    err = capsys.readouterr().err
    assert "pefttune search: error:" in err and "search.reduction_factor" in err
    assert main(["search", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
    good = write(tmp_path, search_config(manifest, tmp_path / "results"), "good.yaml")
    assert main(["search", str(good), "--resume", "--name", "other"]) == 2
    err = capsys.readouterr().err
    assert "--resume: no search to resume at" in err and "results/other" in err
    assert main(["search", str(good), "--name", "bad/name"]) == 2
    assert "--name: invalid experiment config\n  name: must be a plain folder name" in capsys.readouterr().err


def test_every_run_resolves_its_config_one_way(tmp_path, manifest):
    """resolve_config: a path is loaded, a config kept, --name replaces the name and is validated
    again with the config's own error format; run_study, run_search and run_darts start there."""
    import inspect

    from pefttune.config import StudyConfig, resolve_config
    from pefttune.darts.run import run_darts
    from pefttune.study import run_study

    path = write(tmp_path, search_config(manifest, tmp_path / "results"))
    loaded = resolve_config(path)
    assert isinstance(loaded, StudyConfig) and loaded.name == "search-test"
    assert resolve_config(loaded) is loaded
    renamed = resolve_config(str(path), name="other")
    assert renamed.name == "other" and renamed.model_dump(exclude={"name"}) == loaded.model_dump(exclude={"name"})
    assert resolve_config(None).name == load_config().name  # the embedded study
    with pytest.raises(ValueError, match=r"--name: invalid experiment config\n  name: must be a plain folder name"):
        resolve_config(loaded, name="a/b")
    for run in (run_study, run_search, run_darts):
        assert "resolve_config(config, name)" in inspect.getsource(run)


def test_the_heads_norm_defaults_by_task_and_is_refused_on_ctc():
    from pefttune.data.loaders import DataRef

    assert parse_config({}).head.resolved_norm("classification") == "batch"
    assert parse_config({"data": {"task": "pr"}}).head.resolved_norm("ctc") == "none"
    assert parse_config({"head": {"norm": "none"}}).head.resolved_norm("classification") == "none"
    with pytest.raises(ValueError, match="head.norm: 'batch' standardises pooled features, for classification tasks "
                                         "only; data.task 'pr' is a CTC task"):
        parse_config({"data": {"task": "pr"}, "head": {"norm": "batch"}})
    ref = DataRef("unused.parquet", "classification", {"kind": "labels", "labels": ["a", "b", "c"]})  # a trial's
    assert ref.head_config(parse_config({})).norm == "batch"
    assert ref.head_config(parse_config({"head": {"norm": "none"}})).norm == "none"
