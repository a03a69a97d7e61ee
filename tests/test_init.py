"""`pefttune init` and the profiles: the starter config for a user's data and model, checked first."""
from __future__ import annotations

import pandas as pd
import pytest
import yaml

from pefttune.cli import main as cli_main
from pefttune.config import CONFIG_DIR, load_config
from pefttune.profiles import PROFILES, Starter, StarterError, default_budget, profile, write_starter
from test_search_fixtures import write_tone_manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_tone_manifest(tmp_path_factory.mktemp("tones"), classes=3, per_split={"train": 2, "dev": 1, "test": 1})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from pefttune.backbones import build_tiny_model

    directory = tmp_path_factory.mktemp("models") / "my-hubert"
    build_tiny_model("hubert").save_pretrained(str(directory))
    return directory


def _sections(config, names):
    return {name: getattr(config, name).model_dump() if hasattr(getattr(config, name), "model_dump")
            else getattr(config, name) for name in names}


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_is_a_valid_config_that_states_its_wall_time_and_sources(name):
    chosen = profile(name)
    config = load_config(chosen.path)
    assert chosen.summary and chosen.wall_time and "benchmarks/README.md" in chosen.path.read_text()
    assert "Expected wall time:" in chosen.path.read_text()
    raw = yaml.safe_load(chosen.path.read_text())
    assert not {"name", "backbone", "storage", "budget"} & set(raw)  # those are the user's
    assert set(raw.get("data", {})) <= {"batch_size", "max_utterances", "max_seconds"}
    assert config.train.seeds


def test_the_laptop_profile_is_the_embedded_study_and_the_cluster_profile_the_superb_example():
    laptop, embedded = load_config(profile("laptop").path), load_config(CONFIG_DIR / "embedded.yaml")
    sections = ["methods", "train", "search", "darts", "analysis", "resources", "head"]
    assert _sections(laptop, sections) == _sections(embedded, sections)
    assert laptop.data.batch_size == embedded.data.batch_size
    cluster, superb = load_config(profile("cluster").path), load_config(CONFIG_DIR / "superb-ks-hubert-base.yaml")
    assert _sections(cluster, sections) == _sections(superb, sections)
    gpu = load_config(profile("gpu").path)
    assert gpu.resources.gpu == 0.25 and gpu.search.max_concurrent == 4  # 4 trials share the one GPU
    assert _sections(gpu, ["methods", "train", "darts", "head"]) == _sections(superb, ["methods", "train", "darts",
                                                                                       "head"])


def test_the_budget_rule_gives_the_shipped_budgets():
    from transformers import HubertConfig

    from pefttune.backbones import BackboneInfo, backbone_info

    superb = load_config(CONFIG_DIR / "superb-ks-hubert-base.yaml")
    budget, note = default_budget(superb, BackboneInfo.from_config(HubertConfig(), "base"))
    assert budget == superb.budget == 1_200_000 and "houlsby bottleneck=32 in all 12 layers: 1,198,848" in note
    budget, note = default_budget(load_config(profile("laptop").path), backbone_info("tiny-hubert-ssl"))
    assert budget == 34_000 and "33,408" in note


def test_init_writes_a_config_that_runs_the_profile_on_the_data_and_model(tmp_path, manifest, model_dir, capsys):
    from pefttune.search.run import build_search_plan

    out = tmp_path / "my-study.yaml"
    code = cli_main(["init", "--manifest", str(manifest), "--backbone", str(model_dir), "--profile", "laptop",
                     "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"next: pefttune run {out}" in printed and "expected wall time: 881 s" in printed
    text = out.read_text()
    assert text.startswith("# A pefttune study") and "extends: profiles/laptop.yaml" in text
    config = load_config(out)
    assert config.name == "my-study" and config.backbone == str(model_dir)
    assert (config.data.source, config.data.path, config.data.task) == ("manifest", str(manifest), "custom")
    assert config.budget == 17_000  # sequential b=32 on the 64-wide test model: 4 x 4,192 = 16,768, rounded up
    laptop = load_config(profile("laptop").path)
    assert config.train == laptop.train and config.methods == laptop.methods
    build_search_plan(config)  # every check that needs no Ray passes
    frame = pd.read_parquet(manifest)
    assert f"train {int((frame['split'] == 'train').sum())}" in text and "3 labels" in text


def test_init_never_overwrites_without_force(tmp_path, manifest, model_dir, capsys):
    out = tmp_path / "study.yaml"
    out.write_text("name: mine\n")
    args = ["init", "--manifest", str(manifest), "--backbone", str(model_dir), "--profile", "smoke", "--out", str(out)]
    assert cli_main(args) == 2
    assert "pass --force" in capsys.readouterr().err and out.read_text() == "name: mine\n"
    assert cli_main([*args, "--force"]) == 0
    assert "extends: profiles/smoke.yaml" in out.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["study.yaml"]  # no temporary file left


def test_init_names_every_problem_and_writes_nothing(tmp_path, manifest, capsys):
    bad_manifest = tmp_path / "manifest.csv"
    frame = pd.read_parquet(manifest).rename(columns={"label": "word"})
    frame.assign(path=[str(manifest.parent / p) for p in frame["path"]]).to_csv(bad_manifest, index=False)
    empty_model = tmp_path / "model"
    empty_model.mkdir()
    (empty_model / "config.json").write_text("{}")
    out = tmp_path / "study.yaml"
    code = cli_main(["init", "--manifest", str(bad_manifest), "--backbone", str(empty_model), "--profile", "gpu",
                     "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "nothing written" in err
    assert f"data.path: {bad_manifest}" in err and "rename the column 'word' to 'label'" in err
    assert f"backbone: {empty_model} has config.json but no weights" in err


def test_init_asks_for_the_task_of_a_transcript_manifest(tmp_path, manifest, model_dir):
    frame = pd.read_parquet(manifest).drop(columns=["label"]).assign(transcript="t o n e")
    ctc = tmp_path / "manifest.csv"
    frame.assign(path=[str(manifest.parent / p) for p in frame["path"]]).to_csv(ctc, index=False)
    starter = Starter(backbone=str(model_dir), out=tmp_path / "pr.yaml", profile="smoke", manifest=ctc)
    with pytest.raises(StarterError, match="data.task: the manifest has a 'transcript' column: pass --task pr"):
        write_starter(starter)
    starter.task = "pr"
    written = write_starter(starter)
    assert load_config(written.path).data.task == "pr" and written.data.task_kind == "ctc"


def test_init_from_a_dataset_layout(tmp_path, model_dir, monkeypatch):
    from data_fixtures import make_speech_commands

    monkeypatch.setenv("PEFTTUNE_CACHE", str(tmp_path / "cache"))
    root = make_speech_commands(tmp_path / "speech_commands")
    written = write_starter(Starter(backbone=str(model_dir), out=tmp_path / "sc.yaml", profile="smoke",
                                    layout="speech_commands", root=root))
    config = load_config(written.path)
    assert (config.data.source, config.data.path, config.data.task) == ("speech_commands", str(root), "ks")
