"""Manifests, validation, vocabularies, audio reading, the dataset, collate and the sampler."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from pefttune.data.audio import AudioReadError, read_audio, write_flac
from pefttune.data.dataset import (
    PAD_TARGET, LengthBucketSampler, SpeechDataset, collate_batch, length_buckets, make_dataloader,
    normalize_waveform,
)
from pefttune.data.manifest import ManifestError, normalize_split, read_manifest, validate_manifest, write_manifest
from pefttune.data.vocab import BLANK_ID, LabelVocab, TokenVocab, load_vocab


def tone(seconds: float, freq: float = 220.0, rate: int = 16000, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture
def small(tmp_path) -> Path:
    """A 3-class classification manifest (CSV) with 16 kHz FLAC clips of different lengths."""
    rows = []
    for split, n in (("train", 4), ("dev", 2), ("test", 2)):
        for label, freq in (("a", 200.0), ("b", 400.0), ("c", 800.0)):
            for k in range(n):
                rel = f"clips/{split}-{label}-{k}.flac"
                seconds = 0.25 + 0.1 * k
                write_flac(tmp_path / rel, tone(seconds, freq))
                rows.append({"path": rel, "split": split, "label": label, "speaker": f"s{k}",
                             "transcript": " ".join(label * (k + 1)), "duration": seconds})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path / "manifest.csv"


# --- manifests ---------------------------------------------------------------------------

def test_manifest_formats_and_relative_paths(small, tmp_path):
    df = read_manifest(small)
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["path"])
    assert list(df.index) == list(range(len(df)))
    tsv = tmp_path / "m.tsv"
    pd.read_csv(small).to_csv(tsv, sep="\t", index=False)
    assert read_manifest(tsv)["path"].tolist() == df["path"].tolist()
    out = tmp_path / "copy"
    parquet = write_manifest(df, out)
    back = read_manifest(parquet)
    assert back["path"].tolist() == df["path"].tolist()  # absolute outside the folder
    assert read_manifest(tmp_path)["path"].tolist() == df["path"].tolist()  # folder -> its manifest.csv
    with pytest.raises(ValueError, match="unsupported manifest format"):
        (tmp_path / "m.json").write_text("{}")
        read_manifest(tmp_path / "m.json")
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "none.csv")


def test_split_names_are_normalised():
    assert [normalize_split(s) for s in ("train", "valid", "Validation", "dev-clean", "test-other", "val")] == [
        "train", "dev", "dev", "dev", "test", "dev"]
    with pytest.raises(ManifestError, match="unknown split"):
        normalize_split("holdout")


def test_validate_manifest_catches_problems(small):
    df = read_manifest(small)
    validate_manifest(df, "classification")
    with pytest.raises(ManifestError, match="lacks column"):
        validate_manifest(df.drop(columns=["label"]), "classification")
    with pytest.raises(ManifestError, match="split 'dev' is empty"):
        validate_manifest(df[df["split"] != "dev"], "classification")
    unknown = df.copy()
    unknown.loc[unknown.index[-1], "label"] = "zebra"
    with pytest.raises(ManifestError, match=r"test has labels that never occur in train: \['zebra'\]"):
        validate_manifest(unknown, "classification")
    missing = df.copy()
    missing.loc[3, "path"] = "/nonexistent/clip.flac"
    with pytest.raises(FileNotFoundError, match="rows 3"):
        validate_manifest(missing, "classification")
    with pytest.raises(ManifestError, match="empty label"):
        blank = df.copy()
        blank.loc[0, "label"] = " "
        validate_manifest(blank, "classification")
    vocab = TokenVocab(("a", "b"))
    with pytest.raises(ManifestError, match=r"tokens not in the vocabulary: \['c'\]"):
        validate_manifest(df, "ctc", vocab=vocab)
    validate_manifest(df, "ctc", vocab=TokenVocab(("a", "b", "c")))
    window = df.copy()
    window["start"] = np.nan
    window.loc[0, "start"] = 0.1
    window.loc[0, "duration"] = np.nan
    with pytest.raises(ManifestError, match="need a 'duration'"):
        validate_manifest(window, "classification")


# --- vocabularies ------------------------------------------------------------------------

def test_label_vocab_is_sorted_and_persisted(tmp_path):
    vocab = LabelVocab.from_labels(["go", "yes", "_silence_", "go"])
    assert vocab.labels == ("_silence_", "go", "yes")
    assert vocab.encode("yes") == 2 and vocab.decode(1) == "go"
    assert load_vocab(vocab.save(tmp_path / "labels.json")) == vocab
    with pytest.raises(ValueError, match="not in the vocabulary"):
        vocab.encode("no")


def test_token_vocab_blank_is_zero(tmp_path):
    vocab = TokenVocab.from_transcripts(["h ə l oʊ", "w ɜː l d"], base=("l",))
    assert vocab.tokens[0] == "l" and vocab.ids["l"] == 1 and BLANK_ID == 0
    assert vocab.size == len(vocab.tokens) + 1
    ids = vocab.encode("h ə l oʊ")
    assert min(ids) >= 1
    assert vocab.decode([0, ids[0], ids[0], 0, ids[1], ids[2], 0, ids[3]], collapse=True) == "h ə l oʊ"
    chars = TokenVocab.from_transcripts(["HI THERE"], unit="char")
    assert chars.decode(chars.encode("HI THERE")) == "HI THERE" and "|" in chars.tokens
    assert load_vocab(chars.save(tmp_path / "v.json")) == chars
    (tmp_path / "bad.json").write_text('{"kind": "other"}')
    with pytest.raises(ValueError, match="not a pefttune vocabulary"):
        load_vocab(tmp_path / "bad.json")


# --- audio -------------------------------------------------------------------------------

def test_read_audio_resamples_and_downmixes(tmp_path):
    stereo = np.stack([tone(0.5, rate=44100), tone(0.5, rate=44100) * 0.0], axis=1)
    sf.write(str(tmp_path / "s.wav"), stereo, 44100)
    wav = read_audio(tmp_path / "s.wav")
    assert wav.dtype == np.float32 and wav.ndim == 1 and abs(wav.size - 8000) <= 1
    assert abs(np.abs(wav).max() - 0.15) < 0.01  # the mean of the two channels
    sf.write(str(tmp_path / "8k.wav"), tone(0.5, rate=8000), 8000)
    assert abs(read_audio(tmp_path / "8k.wav").size - 8000) <= 1
    write_flac(tmp_path / "w.flac", tone(2.0))
    part = read_audio(tmp_path / "w.flac", start=0.5, duration=1.0)
    assert part.size == 16000
    (tmp_path / "junk.wav").write_bytes(b"RIFF0000WAVEjunk" * 10)
    with pytest.raises(AudioReadError, match="junk.wav"):
        read_audio(tmp_path / "junk.wav")
    with pytest.raises(FileNotFoundError, match="gone.wav"):
        read_audio(tmp_path / "gone.wav")


# --- dataset -----------------------------------------------------------------------------

def test_dataset_items_and_shared_vocab(small):
    train = SpeechDataset(small, "train")
    assert len(train) == 12 and train.num_classes == 3
    item = train[0]
    assert item["input_values"].dtype == torch.float32
    assert abs(float(item["input_values"].mean())) < 1e-4 and abs(float(item["input_values"].std()) - 1) < 1e-2
    dev = SpeechDataset(small, "dev", vocab=train.vocab)
    assert dev.vocab == train.vocab
    raw = SpeechDataset(small, "dev", vocab=train.vocab, normalize=False)
    assert float(raw[0]["input_values"].abs().max()) == pytest.approx(0.3, abs=0.01)
    assert raw[0]["index"] == int(raw.rows.index[0])
    with pytest.raises(ValueError, match="split 'holdout' is empty"):
        SpeechDataset(small, "holdout", validate=False)
    cropped = SpeechDataset(small, "train", max_seconds=0.3)
    assert max(cropped[i]["input_values"].shape[0] for i in range(len(cropped))) == 4800


def test_missing_file_raises_or_is_skipped(small):
    df = read_manifest(small)
    gone = Path(df.loc[13, "path"])  # a dev clip
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=r"row 13: .*dev-"):
        SpeechDataset(df, "dev")
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = SpeechDataset(df, "dev", on_error="skip")
    assert len(ds) == 5 and ds.skipped[0][0] == 13


def test_corrupt_file_raises_with_row_or_is_skipped(small):
    df = read_manifest(small)
    Path(df.loc[14, "path"]).write_bytes(b"not audio at all" * 20)
    ds = SpeechDataset(df, "dev")  # the header is only read when loading
    position = list(ds.rows.index).index(14)
    with pytest.raises(AudioReadError, match=r"manifest row 14 \(split dev\)"):
        ds[position]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skipping = SpeechDataset(df, "dev", on_error="skip")
    assert len(skipping) == 5 and len(skipping.skipped) == 1 and caught
    # A file that breaks only at load time under "skip": its item is None and collate drops it.
    with pytest.warns(UserWarning, match="skipped 1"):
        lazy = SpeechDataset(df, "dev", on_error="skip", validate=False)
    lazy._paths[0] = str(Path(df.loc[14, "path"]))
    batch = collate_batch([lazy[0], lazy[1]])
    assert batch["input_values"].shape[0] == 1 and len(lazy.skipped) == 2


def test_unknown_dev_label_fails_before_training(small):
    df = read_manifest(small)
    df.loc[df.index[df["split"] == "dev"][0], "label"] = "zebra"
    with pytest.raises(ValueError, match="zebra"):
        SpeechDataset(df, "dev")


# --- collate and sampler ----------------------------------------------------------------

def test_collate_classification_shapes_and_masks(small):
    ds = SpeechDataset(small, "train", normalize=False)
    items = [ds[i] for i in range(3)]
    lengths = [x["input_values"].shape[0] for x in items]
    batch = collate_batch(items)
    assert set(batch) == {"input_values", "attention_mask", "labels", "index"}
    assert batch["input_values"].shape == (3, max(lengths)) and batch["input_values"].dtype == torch.float32
    assert batch["attention_mask"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for b, n in enumerate(lengths):
        assert torch.all(batch["input_values"][b, n:] == 0)
        assert torch.equal(batch["input_values"][b, :n], items[b]["input_values"])
    assert batch["labels"].tolist() == [x["label"] for x in items]
    assert batch["index"].tolist() == [x["index"] for x in items]


def test_collate_ctc_targets(small):
    ds = SpeechDataset(small, "train", task_kind="ctc")
    items = [ds[i] for i in (0, 1, 2)]
    batch = collate_batch(items)
    assert set(batch) == {"input_values", "attention_mask", "targets", "target_lengths", "index"}
    lens = batch["target_lengths"].tolist()
    assert lens == [x["target"].shape[0] for x in items] and lens == [1, 2, 3]
    assert batch["targets"].shape == (3, 3)
    assert batch["targets"][0, 1:].tolist() == [PAD_TARGET, PAD_TARGET]
    assert (batch["targets"][batch["targets"] != PAD_TARGET] >= 1).all()  # 0 is the blank
    # The batch feeds torch's CTC loss as is.
    log_probs = torch.randn(20, 3, ds.num_classes).log_softmax(-1)
    loss = torch.nn.functional.ctc_loss(log_probs, batch["targets"].clamp(min=0), torch.full((3,), 20),
                                        batch["target_lengths"], blank=0)
    assert torch.isfinite(loss)


def test_length_bucket_sampler():
    rng = np.random.default_rng(0)
    lengths = rng.uniform(0.5, 10.0, size=203)
    sampler = LengthBucketSampler(lengths, batch_size=8, shuffle=True, seed=1, pool_batches=5)
    batches = list(sampler)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(203)) and len(sampler) == len(batches) == 26
    # Within a batch lengths are close; random batches would spread far more.
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 2.0
    assert list(sampler) == batches  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != batches
    ordered = list(LengthBucketSampler(lengths, 8, shuffle=False))
    assert [i for b in ordered for i in b] == list(np.argsort(lengths, kind="stable"))
    assert all(len(b) == 8 for b in LengthBucketSampler(lengths, 8, drop_last=True))


def test_length_buckets_sort_each_pool_and_cut_batches():
    lengths = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 7.0, 8.0, 6.0, 0.5, 0.2])
    order = np.arange(11)[::-1]  # 10, 9, ..., 0
    batches = length_buckets(order, lengths, batch_size=2, pool_batches=2)
    # pools of 4 in the given order: {10, 9, 8, 7}, {6, 5, 4, 3}, {2, 1, 0}; each sorted by length
    assert [b.tolist() for b in batches] == [[10, 9], [8, 7], [3, 4], [6, 5], [1, 2], [0]]
    assert [len(b) for b in length_buckets(np.arange(11), lengths, 4, 1)] == [4, 4, 3]  # only the last is short


def test_dataloader_end_to_end(small):
    ds = SpeechDataset(small, "train")
    seen = []
    for batch in make_dataloader(ds, batch_size=5, shuffle=True, seed=3):
        assert batch["input_values"].shape[0] == batch["labels"].shape[0] <= 5
        seen.extend(batch["index"].tolist())
    assert sorted(seen) == sorted(int(i) for i in ds.rows.index)
    assert np.allclose(normalize_waveform(np.ones(10, dtype=np.float32)), 0.0)


def test_limit_rows_draws_per_split_and_keeps_every_train_label(small):
    from pefttune.data.manifest import limit_rows

    frame = read_manifest(small)  # 12 train (3 labels), 6 dev, 6 test
    limited = limit_rows(frame, 2, seed=0, label="label")
    counts = limited["split"].value_counts().to_dict()
    assert counts == {"train": 3, "dev": 2, "test": 2}  # train: one of each of the 3 labels (more than 2)
    assert set(limited[limited["split"] == "train"]["label"]) == {"a", "b", "c"}
    assert set(limited.index) <= set(frame.index) and limited.attrs == frame.attrs  # row ids kept
    assert limit_rows(frame, 2, seed=0, label="label").index.equals(limited.index)  # the seed fixes the draw
    assert not limit_rows(frame, 2, seed=1, label="label").index.equals(limited.index)
    assert limit_rows(frame, 100, seed=0).index.equals(frame.index)  # more than there is: every row
    assert limit_rows(frame, 5, seed=0)["split"].value_counts().to_dict() == {"train": 5, "dev": 5, "test": 5}


def test_max_utterances_limits_what_the_trials_see(small, tmp_path, monkeypatch):
    from pefttune.config import parse_config
    from pefttune.data.loaders import load_data, prepare_data

    monkeypatch.setenv("PEFTTUNE_CACHE", str(tmp_path / "cache"))
    config = parse_config({"backbone": "tiny-hubert", "data": {"source": "manifest", "task": "custom",
                                                               "path": str(small), "max_utterances": 4}})
    ref = prepare_data(config)
    assert ref.subset is not None and ref.rows()["split"].value_counts().to_dict() == {"train": 4, "dev": 4, "test": 4}
    data = load_data(config, ref)
    assert (len(data.train.dataset), len(data.dev.dataset), len(data.test.dataset)) == (4, 4, 4)
    assert ref.vocabulary().labels == ("a", "b", "c")
    everything = prepare_data(parse_config({**config.model_dump(mode="json"),
                                            "data": {**config.data.model_dump(), "max_utterances": None}}))
    assert everything.subset is None and len(everything.rows()) == 24
