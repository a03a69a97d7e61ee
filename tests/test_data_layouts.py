"""Real-dataset layout loaders, each on a miniature fixture tree of its layout."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import data_fixtures as fx
from pefttune.data import layouts
from pefttune.data.dataset import SpeechDataset, collate_batch
from pefttune.data.manifest import read_manifest, validate_manifest
from pefttune.data.sources import manifest_for


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    return {
        "speech_commands": fx.make_speech_commands(base / "speech_commands_v0.01"),
        "speech_commands_test": fx.make_speech_commands_test_set(base / "speech_commands_test_set_v0.01"),
        "fluent_commands": fx.make_fluent_commands(base / "fluent_speech_commands_dataset"),
        "voxceleb1": fx.make_voxceleb1(base / "VoxCeleb1"),
        "librispeech": fx.make_librispeech(base / "LibriSpeech"),
        "iemocap": fx.make_iemocap(base / "IEMOCAP_full_release"),
    }


def test_speech_commands_superb_12_class_setup(trees):
    root = trees["speech_commands"]
    df = layouts.load_speech_commands(root)
    validate_manifest(df, "classification")
    words = df[df["label"] != "_silence_"]
    # Commands keep their names; other words become _unknown_.
    assert set(words[words["word"].isin(["yes", "no", "stop"])]["label"]) == {"yes", "no", "stop"}
    assert set(words[words["word"].isin(["bed", "marvin"])]["label"]) == {"_unknown_"}
    # Splits from validation_list.txt / testing_list.txt.
    listed_dev = {l.strip() for l in (root / "validation_list.txt").read_text().splitlines() if l.strip()}
    got_dev = {f"{Path(p).parent.name}/{Path(p).name}" for p in words[words["split"] == "dev"]["path"]}
    assert got_dev == listed_dev
    assert set(words["speaker"]) == {"0a7c2a8d", "1b4c9b89", "2c9e8f11"}
    # _silence_: 1 s windows of the two 10 s noise files, 8/1/1 per file, no files written.
    silence = df[df["label"] == "_silence_"]
    assert silence.groupby("split").size().to_dict() == {"train": 16, "dev": 2, "test": 2}
    assert (silence["duration"] == 1.0).all() and set(silence["start"]) == set(float(k) for k in range(10))
    ds = SpeechDataset(df, "dev", normalize=False)
    lengths = [ds[i]["input_values"].shape[0] for i in range(len(ds))]
    assert all(n == 16000 for n, lab in zip(lengths, ds.rows["label"]) if lab == "_silence_")


def test_speech_commands_with_separate_test_set(trees):
    df = layouts.load_speech_commands(trees["speech_commands"], test_root=trees["speech_commands_test"])
    test = df[df["split"] == "test"]
    assert set(test["label"]) == {"yes", "_unknown_", "_silence_"}
    assert all("test_set" in p for p in test["path"])
    assert not (df[df["label"] == "_silence_"]["split"] == "test").any() or len(test[test["label"] == "_silence_"]) == 1


def test_fluent_speech_commands(trees):
    df = layouts.load_fluent_commands(trees["fluent_commands"])
    validate_manifest(df, "classification")
    assert df["split"].value_counts().to_dict() == {"train": 6, "dev": 6, "test": 6}
    row = df[df["text"] == "Turn up the heat in the kitchen"].iloc[0]
    assert row["label"] == "increase|heat|kitchen"
    assert (row["action"], row["object"], row["location"]) == ("increase", "heat", "kitchen")
    assert df["speaker"].nunique() == 2 and (df["duration"] > 0.3).all()


def test_voxceleb1_identification_split(trees):
    df = layouts.load_voxceleb1(trees["voxceleb1"])
    validate_manifest(df, "classification")
    assert df.groupby("split").size().to_dict() == {"train": 4, "dev": 2, "test": 2}
    assert set(df["label"]) == {"id10001", "id10002"} and (df["label"] == df["speaker"]).all()
    # The stereo 44.1 kHz file reads as mono 16 kHz of the same duration.
    row = df[df["path"].str.endswith("id10002/vid10/00001.wav")].iloc[0]
    ds = SpeechDataset(df, "train", normalize=False)
    item = ds[int(np.flatnonzero(ds.rows.index == row.name)[0])]
    assert item["input_values"].ndim == 1
    assert abs(item["input_values"].shape[0] / 16000 - row["duration"]) < 0.01


def test_librispeech_characters_and_phonemes(trees):
    chars = layouts.load_librispeech(trees["librispeech"])
    # In this tiny tree dev/test use letters train never has: caught before training.
    with pytest.raises(ValueError, match=r"tokens not in train: \['G', 'I'"):
        validate_manifest(chars, "ctc", unit="char")
    assert chars.groupby("split").size().to_dict() == {"train": 2, "dev": 1, "test": 1}
    assert set(chars["transcript"]) == {"HELLO WORLD", "THE CAT SAT", "GOOD MORNING", "SEE YOU LATER"}
    assert set(chars["speaker"]) == {"19", "84", "1089"}
    ds = SpeechDataset(chars, "train", task_kind="ctc", unit="char")
    assert ds.vocab.unit == "char" and "|" in ds.vocab.tokens
    item = ds[0]
    assert ds.vocab.decode(item["target"].tolist()) in {"HELLO WORLD", "THE CAT SAT"}
    phones = layouts.load_librispeech(trees["librispeech"], target="phonemes")
    hello = phones[phones["text"] == "HELLO WORLD"].iloc[0]
    assert hello["transcript"] == "h ə l oʊ w ɜː l d"


def test_iemocap_four_classes_and_session_fold(trees):
    df = layouts.load_iemocap(trees["iemocap"], test_session=3)
    # fru and xxx are dropped; exc merges into hap.
    assert set(df["label"]) == {"neu", "hap", "ang", "sad"}
    assert len(df) == 5 * 5
    assert (df[df["emotion"] == "exc"]["label"] == "hap").all()
    assert set(df[df["split"] == "test"]["session"]) == {3}
    assert 3 not in set(df[df["split"] != "test"]["session"])
    assert set(df["speaker"]) == {f"Ses0{s}{g}" for s in range(1, 6) for g in "FM"}
    assert (df["split"] == "dev").sum() == round(20 * 0.1)
    with pytest.raises(ValueError, match="test_session"):
        layouts.load_iemocap(trees["iemocap"], test_session=6)


def test_loaders_never_write_into_the_dataset(trees, tmp_path, monkeypatch):
    before = {name: fx.tree_digest(root) for name, root in trees.items()}
    monkeypatch.setenv("PEFTTUNE_CACHE", str(tmp_path / "cache"))
    manifest = manifest_for("speech_commands", "ks", path=trees["speech_commands"])
    assert str(manifest).startswith(str(tmp_path / "cache"))
    df = read_manifest(manifest)
    assert len(df) == len(layouts.load_speech_commands(trees["speech_commands"]))
    assert manifest_for("speech_commands", "ks", path=trees["speech_commands"]) == manifest
    pr = read_manifest(manifest_for("librispeech", "pr", path=trees["librispeech"]))
    assert "ɜː" in " ".join(pr["transcript"])
    manifest_for("fluent", "ic", path=trees["fluent_commands"])
    after = {name: fx.tree_digest(root) for name, root in trees.items()}
    assert before == after


def test_missing_layout_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        layouts.load_voxceleb1(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="iden_split.txt"):
        layouts.load_voxceleb1(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="validation_list"):
        layouts.load_speech_commands(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="train_data.csv"):
        layouts.load_fluent_commands(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown dataset layout"):
        layouts.load_layout("timit", tmp_path)


def test_layout_batches_collate(trees):
    df = layouts.load_fluent_commands(trees["fluent_commands"])
    ds = SpeechDataset(df, "test")
    batch = collate_batch([ds[i] for i in range(4)])
    assert batch["input_values"].shape[0] == 4 and batch["labels"].max() < ds.num_classes
