"""Bad input, named: each gets one clear error from `pefttune run` before Ray starts (exit 2), naming
the field, the file and the fix. Ray is never started here: ``connect_ray`` fails the test."""
from __future__ import annotations

import pandas as pd
import pytest
import yaml

from pefttune.cli import main as cli_main
from test_search_fixtures import search_config, write_tone_manifest


@pytest.fixture
def no_ray(monkeypatch):
    from pefttune.runtime import cluster

    def refuse(*args, **kwargs):
        raise AssertionError("Ray must not start for bad input")

    monkeypatch.setattr(cluster, "connect_ray", refuse)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_tone_manifest(tmp_path_factory.mktemp("tones"), classes=3, per_split={"train": 2, "dev": 1, "test": 1})


def _run(tmp_path, capsys, config: dict) -> tuple[int, str]:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    code = cli_main(["run", str(path)])
    return code, capsys.readouterr().err


def _one_line_error(err: str) -> None:
    """One error: its first line says so, and no traceback follows."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("pefttune run: error: "), err
    assert "Traceback" not in err and "the study failed in stage" not in err


def test_manifest_with_wrong_columns(tmp_path, capsys, manifest, no_ray):
    frame = pd.read_parquet(manifest).rename(columns={"label": "class"})
    bad = tmp_path / "manifest.csv"
    frame.assign(path=[str(manifest.parent / p) for p in frame["path"]]).to_csv(bad, index=False)
    code, err = _run(tmp_path, capsys, search_config(bad, tmp_path / "results"))
    assert code == 2, err
    _one_line_error(err)
    assert str(bad) in err and "data.path" in err  # the file and the field of the config
    assert "'label'" in err and "rename the column 'class' to 'label'" in err  # the column and the fix
    assert not (tmp_path / "results" / "search-test" / "trials").exists()


def test_label_in_dev_or_test_but_not_in_train(tmp_path, capsys, manifest, no_ray):
    frame = pd.read_parquet(manifest)
    frame.loc[frame.index[frame["split"] == "test"][0], "label"] = "zebra"
    bad = tmp_path / "manifest.csv"
    frame.assign(path=[str(manifest.parent / p) for p in frame["path"]]).to_csv(bad, index=False)
    code, err = _run(tmp_path, capsys, search_config(bad, tmp_path / "results"))
    assert code == 2, err
    _one_line_error(err)
    assert str(bad) in err and "data.path" in err
    assert "'zebra'" in err and "test" in err and "never occur in train" in err
    assert "add train rows" in err  # the fix


def test_backbone_directory_without_weights(tmp_path, capsys, manifest, no_ray):
    from pefttune.backbones import build_tiny_model

    model_dir = tmp_path / "my-encoder"
    build_tiny_model("hubert").config.save_pretrained(str(model_dir))  # config.json only
    code, err = _run(tmp_path, capsys, search_config(manifest, tmp_path / "results", backbone=str(model_dir)))
    assert code == 2, err
    _one_line_error(err)
    assert "backbone:" in err and str(model_dir) in err and "model.safetensors" in err
    assert "save_pretrained" in err  # the fix
    assert not (tmp_path / "results").exists()  # refused before anything was written


def test_backbone_directory_with_pickled_weights_only(tmp_path, capsys, manifest, no_ray):
    from pefttune.backbones import build_tiny_model

    model_dir = tmp_path / "my-encoder"
    build_tiny_model("hubert").config.save_pretrained(str(model_dir))
    (model_dir / "pytorch_model.bin").write_bytes(b"not read")
    code, err = _run(tmp_path, capsys, search_config(manifest, tmp_path / "results", backbone=str(model_dir)))
    assert code == 2, err
    _one_line_error(err)
    assert "pytorch_model.bin" in err and "safetensors" in err and "save_pretrained" in err


def test_hub_id_without_network(tmp_path, capsys, manifest, no_ray, monkeypatch):
    import socket

    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = search_config(manifest, tmp_path / "results", backbone="someone/hubert-for-tests")
    code, err = _run(tmp_path, capsys, config)
    assert code == 2, err
    _one_line_error(err)
    assert "backbone: 'someone/hubert-for-tests'" in err
    assert "cannot be fetched offline" in err and "HF_HUB_OFFLINE" in err
    assert "local directory" in err and "save_pretrained" in err  # the fix
    assert not (tmp_path / "results").exists()


def test_misspelt_config_key_suggests_the_closest(tmp_path, capsys, manifest, no_ray):
    config = search_config(manifest, tmp_path / "results")
    config["train"]["epohcs"] = config["train"].pop("epochs")
    config["bakcbone"] = config.pop("backbone")
    code, err = _run(tmp_path, capsys, config)
    assert code == 2, err
    _one_line_error(err)
    assert str(tmp_path / "study.yaml") in err
    assert "train.epohcs: unknown key; did you mean 'epochs'?" in err
    assert "bakcbone: unknown key; did you mean 'backbone'?" in err
    assert not (tmp_path / "results").exists()


def test_hub_id_when_the_hub_cannot_be_reached(tmp_path, capsys, manifest, no_ray, monkeypatch):
    """No HF_HUB_OFFLINE, but no network: transformers' own error after its retries (simulated here,
    the retries take half a minute) becomes the same advice."""
    import huggingface_hub.constants

    from pefttune import backbones

    def unreachable(name, *args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
                      "in the cached files.")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(backbones.AutoConfig, "from_pretrained", unreachable)
    code, err = _run(tmp_path, capsys, search_config(manifest, tmp_path / "results", backbone="someone/hubert"))
    assert code == 2, err
    _one_line_error(err)
    assert "cannot be fetched offline (no network" in err and "set backbone: DIR (a local directory)" in err


def test_data_validate_names_the_file_and_the_fix(tmp_path, capsys, manifest):
    frame = pd.read_parquet(manifest).rename(columns={"split": "subset"})
    bad = tmp_path / "manifest.csv"
    frame.assign(path=[str(manifest.parent / p) for p in frame["path"]]).to_csv(bad, index=False)
    assert cli_main(["data", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pefttune data: error: {bad}: manifest lacks column(s) ['split']")
    assert "rename the column 'subset' to 'split'" in err
