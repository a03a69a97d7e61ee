"""`pefttune data ...` subcommands."""
from __future__ import annotations

import argparse

import pandas as pd
import pytest

import data_fixtures as fx
from pefttune.cli import data as data_cli
from pefttune.data.manifest import read_manifest


def run(argv: list[str]) -> int:
    """Parse with a parser holding only the data subcommand, then run it."""
    parser = argparse.ArgumentParser(prog="pefttune")
    sub = parser.add_subparsers(dest="command")
    data_cli.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_synth_writes_a_corpus_and_refuses_foreign_folders(tmp_path, capsys):
    out = tmp_path / "ks"
    assert run(["data", "synth", "--task", "ks", "--out", str(out), "--per-class", "2",
                "--eval-per-class", "1", "--speakers", "6", "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    assert "manifest.parquet" in printed and "train 24" in printed
    df = read_manifest(out)
    assert len(df) == 12 * 4
    # Running again replaces the old corpus.
    assert run(["data", "synth", "--task", "ks", "--out", str(out), "--per-class", "3",
                "--eval-per-class", "1", "--speakers", "6"]) == 0
    assert len(read_manifest(out)) == 12 * 5
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.wav").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not a pefttune corpus"):
        run(["data", "synth", "--task", "pr", "--out", str(foreign), "--sentences", "10"])
    with pytest.raises(ValueError, match="--sentences"):
        run(["data", "synth", "--task", "ks", "--out", str(tmp_path / "x"), "--sentences", "3"])


def test_prepare_validate_and_ensure(tmp_path, capsys, monkeypatch):
    root = fx.make_voxceleb1(tmp_path / "VoxCeleb1")
    before = fx.tree_digest(root)
    out = tmp_path / "manifests" / "vox"
    assert run(["data", "prepare", "--layout", "voxceleb1", "--root", str(root), "--out", str(out)]) == 0
    assert "train 4, dev 2, test 2" in capsys.readouterr().out
    assert fx.tree_digest(root) == before
    assert run(["data", "validate", str(out / "manifest.parquet")]) == 0
    assert ": ok" in capsys.readouterr().out
    with pytest.raises(ValueError, match="inside the dataset folder"):
        run(["data", "prepare", "--layout", "voxceleb1", "--root", str(root), "--out", str(root / "m")])
    broken = pd.read_csv(out / "manifest.csv")
    broken.loc[broken["split"] == "dev", "label"] = "id99999"
    broken.to_csv(tmp_path / "broken.csv", index=False)
    with pytest.raises(ValueError, match="id99999"):
        run(["data", "validate", str(tmp_path / "broken.csv")])
    monkeypatch.setenv("PEFTTUNE_CACHE", str(tmp_path / "cache"))
    assert run(["data", "ensure", "--task", "sid", "--speakers", "3", "--per-speaker", "3"]) == 0
    path = capsys.readouterr().out.strip()
    assert path.startswith(str(tmp_path / "cache")) and path.endswith("manifest.parquet")


def test_registered_in_the_pefttune_command(tmp_path, capsys):
    from pefttune.cli import main

    assert main(["data", "voices"]) == 0
    assert "en-us" in capsys.readouterr().out
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["data", "synth", "--task", "ks", "--out", str(foreign)]) == 2
    assert "not a pefttune corpus" in capsys.readouterr().err
