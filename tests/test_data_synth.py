"""Synthesized corpora: determinism, balance, disjoint splits, vocabularies, cache, overwrite rules."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from data_fixtures import tree_digest
from pefttune.data import layouts
from pefttune.demo import synth
from pefttune.demo.corpus_cache import corpus_dir, ensure_corpus
from pefttune.data.manifest import read_manifest, validate_manifest
from pefttune.data.vocab import load_vocab

KS_SMALL = {"per_class": 4, "eval_per_class": 2, "speakers": 9}
SID_SMALL = {"speakers": 5, "per_speaker": 6}
PR_SMALL = {"sentences": 40, "speakers": 8}


@pytest.fixture(scope="module")
def ks_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ks") / "corpus"
    synth.build_corpus("ks", out, seed=7, **KS_SMALL)
    return out


@pytest.fixture(scope="module")
def sid_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sid") / "corpus"
    synth.build_corpus("sid", out, seed=1, **SID_SMALL)
    return out


@pytest.fixture(scope="module")
def pr_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pr") / "corpus"
    synth.build_corpus("pr", out, seed=2, **PR_SMALL)
    return out


def test_word_lists_are_superbs():
    assert layouts.KS_COMMANDS == ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
    assert len(layouts.KS_UNKNOWN_WORDS) == 20 and "marvin" in layouts.KS_UNKNOWN_WORDS
    assert len(layouts.KS_LABELS) == 12
    ks_words = set(layouts.KS_COMMANDS) | set(layouts.KS_UNKNOWN_WORDS)
    for words in synth.SENTENCE_WORDS.values():
        assert not ks_words & set(words)
    sentences = synth.make_sentences(np.random.default_rng(0), 200, exclude=["the", "found"])
    assert len(set(sentences)) == 200
    used = {w for s in sentences for w in s.split()}
    assert not used & (ks_words | {"the", "found"})


def test_same_seed_same_bytes_other_seed_differs(ks_dir, tmp_path):
    again = tmp_path / "again"
    synth.build_corpus("ks", again, seed=7, **KS_SMALL)
    assert tree_digest(ks_dir) == tree_digest(again)
    other = tmp_path / "other"
    synth.build_corpus("ks", other, seed=8, **KS_SMALL)
    a, b = tree_digest(ks_dir), tree_digest(other)
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a if k.endswith(".flac")) > 0.9 * sum(k.endswith(".flac") for k in a)


def test_ks_manifest_balance_and_disjoint_speakers(ks_dir):
    df = read_manifest(ks_dir / "manifest.parquet")
    validate_manifest(df, "classification")
    counts = df.groupby(["split", "label"]).size().unstack()
    assert set(counts.columns) == set(layouts.KS_LABELS)
    assert (counts.loc["train"] == 4).all() and (counts.loc["dev"] == 2).all() and (counts.loc["test"] == 2).all()
    speakers = {s: set(df[(df["split"] == s) & df["speaker"].notna()]["speaker"]) for s in ("train", "dev", "test")}
    assert speakers["train"] and speakers["dev"] and speakers["test"]
    assert not speakers["train"] & speakers["dev"]
    assert not speakers["train"] & speakers["test"]
    assert not speakers["dev"] & speakers["test"]
    # Unknown clips say auxiliary words; silence clips are noise only.
    assert set(df[df["label"] == "_unknown_"]["text"]) <= set(layouts.KS_UNKNOWN_WORDS)
    assert df[df["label"] == "_silence_"]["speaker"].isna().all()
    assert (df["duration"] == 1.0).all()
    # Word onsets vary inside the 1 s window.
    assert df["onset"].dropna().std() > 0.05


def test_a_larger_ks_test_split_leaves_train_and_dev_as_they_were(ks_dir, tmp_path):
    bigger = tmp_path / "bigger"
    synth.build_corpus("ks", bigger, seed=7, **KS_SMALL, test_per_class=5)
    df = read_manifest(bigger / "manifest.parquet")
    assert (df[df["split"] == "test"].groupby("label").size() == 5).all()
    a, b = tree_digest(ks_dir), tree_digest(bigger)
    kept = [k for k in a if "/test/" not in k and k.endswith(".flac")]
    assert kept and all(a[k] == b[k] for k in kept)  # same train and dev audio, byte for byte


def test_ks_files_csv_and_marker(ks_dir):
    parquet = pd.read_parquet(ks_dir / "manifest.parquet")
    csv = pd.read_csv(ks_dir / "manifest.csv")
    assert list(parquet["path"]) == list(csv["path"])
    assert not any(p.startswith("/") for p in parquet["path"])  # relative to the manifest
    info = sf.info(str(ks_dir / parquet["path"][0]))
    assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC")
    assert info.frames == 16000
    marker = json.loads((ks_dir / synth.CORPUS_MARKER).read_text())
    assert marker["task"] == "ks" and marker["seed"] == 7 and marker["sizes"]["per_class"] == 4
    audio = sf.read(str(ks_dir / parquet["path"][0]))[0]
    assert np.abs(audio).max() > 0.01


def test_sid_every_speaker_in_every_split(sid_dir):
    df = read_manifest(sid_dir)
    validate_manifest(df, "classification")
    assert (df["label"] == df["speaker"]).all()
    per_split = df.groupby(["speaker", "split"]).size().unstack()
    assert (per_split["train"] == 4).all() and (per_split["dev"] == 1).all() and (per_split["test"] == 1).all()
    assert df["text"].nunique() == len(df)  # different sentences
    profiles = df.groupby("speaker")[["voice", "variant"]].first()
    assert len(profiles.drop_duplicates()) == SID_SMALL["speakers"]
    assert (df["duration"] > 0.8).all()


def test_pr_vocab_covers_transcripts_and_splits_are_disjoint(pr_dir):
    df = read_manifest(pr_dir)
    vocab = load_vocab(pr_dir / "vocab.json")
    assert vocab.unit == "phoneme"
    assert vocab.tokens[: len(synth.EN_US_PHONEMES)] == synth.EN_US_PHONEMES
    for transcript in df["transcript"]:
        assert vocab.unknown_tokens(transcript) == []
        assert len(vocab.encode(transcript)) >= 5
    validate_manifest(df, "ctc", vocab=vocab)
    validate_manifest(df, "ctc")  # dev/test phonemes all occur in train
    by_split = {s: df[df["split"] == s] for s in ("train", "dev", "test")}
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not set(by_split[a]["text"]) & set(by_split[b]["text"])
        assert not set(by_split[a]["speaker"]) & set(by_split[b]["speaker"])
    # The transcript is the eSpeak phonemization of the sentence that was spoken.
    from pefttune.data.espeak import phonemize

    row = df.iloc[0]
    assert row["transcript"] == " ".join(phonemize(row["text"], "en-us"))


def test_refuses_foreign_folder_and_replaces_own_corpus(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my data")
    with pytest.raises(FileExistsError, match="not a pefttune corpus"):
        synth.build_corpus("ks", foreign, seed=0, **KS_SMALL)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind

    out = tmp_path / "corpus"
    synth.build_corpus("sid", out, seed=0, speakers=3, per_speaker=3)
    first = set(read_manifest(out)["path"])
    synth.build_corpus("sid", out, seed=1, speakers=4, per_speaker=3)
    second = read_manifest(out)
    assert len(second) == 12 and set(second["path"]) != first
    assert all(p.exists() for p in map(__import__("pathlib").Path, second["path"]))
    assert synth.read_corpus_info(out)["seed"] == 1


def test_size_validation():
    with pytest.raises(ValueError, match="unknown size"):
        synth.corpus_sizes("ks", sentences=3)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        synth.corpus_sizes("asr")
    assert synth.corpus_sizes("ks", per_class=40)["eval_per_class"] == 10
    assert synth.corpus_sizes("ks", per_class=40)["test_per_class"] == 10  # a sized-down corpus: test like dev
    assert synth.corpus_sizes("ks", per_class=40, eval_per_class=3)["test_per_class"] == 3
    assert synth.corpus_sizes("ks")["test_per_class"] == 400 == 8 * synth.corpus_sizes("ks")["eval_per_class"]
    assert synth.corpus_sizes("sid", per_class=9)["per_speaker"] == 9


def test_ensure_corpus_caches_under_pefttune_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTTUNE_CACHE", str(tmp_path / "cache"))
    manifest = ensure_corpus("ks", seed=3, **KS_SMALL)
    assert manifest.is_file() and str(manifest).startswith(str(tmp_path / "cache"))
    assert manifest.parent == corpus_dir("ks", seed=3, **KS_SMALL)
    stamp = manifest.stat().st_mtime_ns
    assert ensure_corpus("ks", seed=3, **KS_SMALL) == manifest
    assert manifest.stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = corpus_dir("ks", seed=3, per_class=5, eval_per_class=2, speakers=9)
    assert other != manifest.parent
    assert corpus_dir("ks", seed=4, **KS_SMALL) != manifest.parent


def test_noise_and_snr_helpers():
    rng = np.random.default_rng(0)
    for kind in synth.NOISE_KINDS:
        noise, got = synth.make_noise(rng, 16000, kind)
        assert got == kind and noise.dtype == np.float32
        assert abs(np.sqrt(np.mean(noise.astype(float) ** 2)) - 1.0) < 1e-3
    t = np.arange(16000) / 16000
    speech = np.zeros(16000, dtype=np.float32)
    speech[4000:12000] = 0.5 * np.sin(2 * np.pi * 440 * t[4000:12000])
    noise, _ = synth.make_noise(rng, 16000, "white")
    mixed = synth.mix_at_snr(speech, noise, 10.0)
    added = mixed - speech
    active_rms = np.sqrt(np.mean(speech[4000:12000].astype(float) ** 2))
    snr = 20 * np.log10(active_rms / np.sqrt(np.mean(added.astype(float) ** 2)))
    assert abs(snr - 10.0) < 0.1
    trimmed = synth.trim_silence(speech)
    assert 7900 <= trimmed.size <= 8000


def test_data_test_per_class_is_for_the_synthesized_ks_corpus_only():
    from pefttune.config import parse_config

    assert parse_config({"data": {"source": "synth", "task": "ks", "test_per_class": 9}}).data.test_per_class == 9
    with pytest.raises(ValueError, match="data.test_per_class: applies to the synthesized ks corpus only"):
        parse_config({"data": {"source": "synth", "task": "pr", "test_per_class": 9}})


def test_data_sentences_is_for_the_synthesized_pr_corpus_only():
    from pefttune.config import parse_config

    assert parse_config({"data": {"source": "synth", "task": "pr", "sentences": 90}}).data.sentences == 90
    with pytest.raises(ValueError, match="data.sentences: applies to the synthesized pr corpus only"):
        parse_config({"data": {"source": "synth", "task": "ks", "sentences": 90}})


def _speakers_by_split(df):
    return {s: set(df[(df["split"] == s) & df["speaker"].notna()]["speaker"]) for s in ("train", "dev", "test")}


def test_default_ks_plan_has_enough_test_speakers_and_the_same_clip_counts():
    sizes = synth.corpus_sizes("ks")
    assert sizes["test_speakers"] == 50 and sizes["speakers"] == 120
    df = synth.corpus_plan("ks", seed=0)
    counts = df.groupby(["split", "label"]).size().unstack()
    assert set(counts.columns) == set(layouts.KS_LABELS)
    assert (counts.loc["train"] == 200).all() and (counts.loc["dev"] == 50).all() and (counts.loc["test"] == 400).all()
    speakers = _speakers_by_split(df)
    assert {s: len(v) for s, v in speakers.items()} == {"train": 52, "dev": 18, "test": 50}
    assert len(speakers["train"]) >= 42  # no fewer train speakers than the 60-speaker pool had
    assert not speakers["train"] & speakers["dev"]
    assert not speakers["train"] & speakers["test"]
    assert not speakers["dev"] & speakers["test"]
    # Every test speaker says 8 clips of each spoken class; silence has no speaker.
    spoken = df[(df["split"] == "test") & (df["label"] != layouts.KS_SILENCE_LABEL)]
    assert (spoken.groupby(["speaker", "label"]).size() == 8).all()
    assert df[df["label"] == layouts.KS_SILENCE_LABEL]["speaker"].isna().all()
    assert df[df["label"] != layouts.KS_SILENCE_LABEL]["speaker"].notna().all()
    # Distinct (voice, variant) pairs: every speaker sounds different.
    profiles = df.dropna(subset=["speaker"]).groupby("speaker")[["voice", "variant"]].first()
    assert len(profiles.drop_duplicates()) == 120


def test_default_pr_plan_spreads_the_same_sentences_over_30_test_speakers():
    assert synth.corpus_sizes("pr") == {"sentences": 600, "speakers": 80, "test_speakers": 30}
    df = synth.corpus_plan("pr", seed=0)
    assert len(df) == df["text"].nunique() == 600
    assert df.groupby("split").size().to_dict() == {"train": 420, "dev": 90, "test": 90}
    speakers = _speakers_by_split(df)
    assert {s: len(v) for s, v in speakers.items()} == {"train": 38, "dev": 12, "test": 30}
    assert not speakers["train"] & speakers["dev"]
    assert not speakers["train"] & speakers["test"]
    assert not speakers["dev"] & speakers["test"]
    assert (df[df["split"] == "test"].groupby("speaker").size() == 3).all()
    # The embedded PR study's 3000 sentences: 15 test sentences per test speaker.
    assert synth.corpus_sizes("pr", sentences=3000)["test_speakers"] == 30


def test_plan_is_what_build_corpus_writes(ks_dir):
    written = read_manifest(ks_dir / "manifest.parquet")
    planned = synth.corpus_plan("ks", seed=7, **KS_SMALL)
    columns = ["id", "split", "label", "text", "speaker", "voice", "variant"]
    assert planned[columns].astype(object).where(planned[columns].notna(), None).values.tolist() == \
        written[columns].astype(object).where(written[columns].notna(), None).values.tolist()
    assert [str(ks_dir / p) for p in planned["path"]] == [str(p) for p in written["path"]]


def test_test_speakers_override_and_validation():
    df = synth.corpus_plan("ks", seed=1, per_class=14, eval_per_class=4, test_per_class=12, speakers=30,
                           test_speakers=12)
    speakers = _speakers_by_split(df)
    assert {s: len(v) for s, v in speakers.items()} == {"train": 14, "dev": 4, "test": 12}
    # A pool given without test_speakers splits 70/15/15, as a sized-down corpus always did.
    assert synth.corpus_sizes("ks", speakers=9)["test_speakers"] == 1
    assert synth.corpus_sizes("pr", speakers=40)["test_speakers"] == 6
    assert synth.corpus_sizes("ks", test_speakers=40)["speakers"] == 120
    with pytest.raises(ValueError, match="test_speakers must be at least 1"):
        synth.corpus_sizes("ks", test_speakers=0)
    with pytest.raises(ValueError, match=r"test_speakers: 103 of 120 leaves no train speaker"):
        synth.corpus_sizes("ks", test_speakers=103)
    with pytest.raises(ValueError, match="test_speakers: 9 of 10"):
        synth.corpus_sizes("pr", speakers=10, test_speakers=9)
    with pytest.raises(ValueError, match="unknown size"):
        synth.corpus_sizes("sid", test_speakers=5)
    # Different test speakers, different cached corpus.
    assert corpus_dir("ks", seed=0, test_speakers=40) != corpus_dir("ks", seed=0)
    assert synth.CORPUS_FORMAT >= 2


def test_config_test_speakers_reaches_the_corpus_plan_and_is_refused_elsewhere():
    from pefttune.config import parse_config

    base = {"name": "t", "backbone": "tiny-hubert", "methods": {"lora": {"rank": 2}}}
    config = parse_config({**base, "data": {"source": "synth", "task": "pr", "test_speakers": 12}})
    assert config.data.test_speakers == 12
    with pytest.raises(ValueError, match="data.test_speakers: applies to the synthesized ks and pr"):
        parse_config({**base, "data": {"source": "synth", "task": "sid", "test_speakers": 12}})
    with pytest.raises(ValueError, match="data.test_speakers"):
        parse_config({**base, "data": {"source": "synth", "task": "ks", "test_speakers": 0}})
