"""The audio check run before Ray starts (pefttune.data.check): every bad file in one error."""
from __future__ import annotations

import csv
import io
import json
import os
import pickle
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from data_fixtures import write_wav
from pefttune.data import check as check_module
from pefttune.data.audio import AudioReadError, read_audio
from pefttune.data.check import AudioCheck, AudioCheckError, BadFile, check_audio, write_skipped
from pefttune.data.manifest import read_manifest, write_manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import audio_check as audio_check_bench  # noqa: E402

RNG = np.random.default_rng(0)
SPLITS = ["train", "dev", "test"]


def noise(seconds: float = 0.05, rate: int = 16000) -> np.ndarray:
    return 0.1 * RNG.standard_normal(int(seconds * rate))


def wav_bytes(seconds: float = 0.05) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, noise(seconds), 16000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def make_bad_files(audio: Path) -> dict[str, tuple[Path, str]]:
    """Six bad audio cases: name -> (path, expected reason)."""
    audio.mkdir(parents=True, exist_ok=True)
    (audio / "empty.wav").write_bytes(b"")
    (audio / "random.wav").write_bytes(RNG.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    whole = wav_bytes(0.1)  # 1,600 frames, 3,244 bytes
    (audio / "truncated.wav").write_bytes(whole[:44 + 1000])  # 500 frames survive
    (audio / "wrong_ext.mp3").write_bytes(wav_bytes())
    write_wav(audio / "zero_frames.wav", np.zeros(0, dtype=np.float32))
    return {
        "empty": (audio / "empty.wav", "empty file (0 bytes)"),
        "random": (audio / "random.wav", "not an audio file: Format not recognised."),
        "truncated": (audio / "truncated.wav", "truncated: header declares 1600 frames, file holds 500"),
        "wrong_ext": (audio / "wrong_ext.mp3", "extension .mp3 but content is WAV"),
        "missing": (audio / "missing.wav", "missing file"),
        "zero_frames": (audio / "zero_frames.wav", "0 frames"),
    }


def make_manifest(root: Path, good: int, bad: dict[str, tuple[Path, str]] | None = None) -> pd.DataFrame:
    """Write ``good`` good WAVs (plus a FLAC) and the bad files into a manifest; read it back."""
    audio = root / "audio"
    paths = [write_wav(audio / f"good{i:03d}.wav", noise()) for i in range(good)]
    flac = audio / "good.flac"
    sf.write(str(flac), noise(), 16000, format="FLAC")
    paths.append(flac)
    paths += [path for path, _ in (bad or {}).values()]
    rows = pd.DataFrame({
        "path": [str(p) for p in paths],
        "split": [SPLITS[i % 3] for i in range(len(paths))],
        "label": "x",
    })
    write_manifest(rows, root)
    return read_manifest(root / "manifest.parquet")


@pytest.fixture
def six_bad(tmp_path):
    bad = make_bad_files(tmp_path / "audio")
    return make_manifest(tmp_path, good=6, bad=bad), bad, tmp_path / "cache"


def test_every_bad_file_is_reported_in_one_error(six_bad):
    manifest, bad, cache = six_bad
    with pytest.raises(AudioCheckError) as caught:
        check_audio(manifest, cache_dir=cache)
    err = caught.value
    assert isinstance(err, ValueError)
    by_path = {b.path: b for b in err.bad}
    assert len(err.bad) == 6
    for name, (path, reason) in bad.items():
        row = manifest.index[manifest["path"] == str(path)][0]
        expected = BadFile(row, manifest.loc[row, "split"], str(path), reason)
        assert by_path[str(path)] == expected, name
    lines = str(err).splitlines()
    assert lines[0] == "6 of 13 audio files in the manifest are unreadable:"
    assert lines[1:] == ["  " + b.line() for b in err.bad]
    assert lines[1] == f"  row 7 (dev): {bad['empty'][0]}: empty file (0 bytes)"
    # Only good files are remembered, so a fixed file is checked again.
    cached = (cache / "passed.jsonl").read_text()
    assert all(str(path) not in cached for path, _ in bad.values())
    assert cached.count("good") == 7


def test_more_than_20_bad_files_list_20_and_a_count(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    bad = {f"e{i}": (audio / f"empty{i:02d}.wav", "empty file (0 bytes)") for i in range(25)}
    for path, _ in bad.values():
        path.write_bytes(b"")
    manifest = make_manifest(tmp_path, good=2, bad=bad)
    with pytest.raises(AudioCheckError) as caught:
        check_audio(manifest, cache_dir=tmp_path / "cache")
    lines = str(caught.value).splitlines()
    assert lines[0] == "25 of 28 audio files in the manifest are unreadable:"
    assert len([line for line in lines if line.startswith("  row ")]) == 20
    assert lines[-1] == "  ... and 5 more bad files"
    assert len(lines) == 22
    assert len(caught.value.bad) == 25  # callers get them all
    assert pickle.loads(pickle.dumps(caught.value)).bad == caught.value.bad


def test_skip_drops_exactly_the_bad_rows(six_bad, tmp_path):
    manifest, bad, cache = six_bad
    result = check_audio(manifest, on_error="skip", cache_dir=cache)
    assert isinstance(result, AudioCheck)
    bad_rows = {b.row for b in result.bad}
    assert len(result.bad) == 6 and result.checked == 13
    assert bad_rows == set(manifest.index[manifest["path"].isin([str(p) for p, _ in bad.values()])])
    assert list(result.kept.index) == [i for i in manifest.index if i not in bad_rows]
    assert result.kept.attrs["manifest_path"] == manifest.attrs["manifest_path"]
    assert "skipped 6 manifest rows" in result.summary()
    out = write_skipped(result.bad, tmp_path / "exp" / "skipped_audio.csv")
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["row"]), r["split"], r["path"], r["reason"]) for r in rows] == \
        [(b.row, b.split, b.path, b.reason) for b in result.bad]


def test_several_rows_of_one_bad_file_and_start_past_the_end(tmp_path):
    audio = tmp_path / "audio"
    good = write_wav(audio / "long.wav", noise(1.0))
    (audio / "empty.wav").parent.mkdir(exist_ok=True)
    (audio / "empty.wav").write_bytes(b"")
    manifest = pd.DataFrame({
        "path": [str(good), str(good), str(audio / "empty.wav"), str(audio / "empty.wav")],
        "split": ["train", "dev", "train", "test"],
        "start": [0.5, 1.5, np.nan, np.nan],
        "duration": [0.2, 0.2, np.nan, np.nan],
    }, index=[10, 11, 12, 13])
    result = check_audio(manifest, on_error="skip", cache_dir=tmp_path / "cache")
    assert result.checked == 2
    assert [(b.row, b.reason) for b in result.bad] == [
        (11, "start 1.500 s is outside the file (1.000 s)"),
        (12, "empty file (0 bytes)"), (13, "empty file (0 bytes)")]
    assert list(result.kept.index) == [10]
    with pytest.raises(AudioCheckError, match=r"2 of 2 audio files .* \(3 manifest rows\):"):
        check_audio(manifest, cache_dir=tmp_path / "cache")


def test_second_run_reads_everything_from_the_cache(tmp_path, monkeypatch):
    manifest = make_manifest(tmp_path, good=300)
    cache = tmp_path / "cache"
    began = time.perf_counter()
    cold = check_audio(manifest, cache_dir=cache, workers=2)
    cold_s = time.perf_counter() - began
    assert (cold.checked, cold.cached, cold.bad) == (301, 0, [])
    header, *entries = (cache / "passed.jsonl").read_text().splitlines()
    assert json.loads(header)["format"] == "pefttune-audio-check"
    assert len(entries) == 301 and all(len(json.loads(e)) == 7 for e in entries)

    opened = []
    real = sf.SoundFile
    monkeypatch.setattr(check_module.sf, "SoundFile", lambda p, *a, **k: opened.append(p) or real(p, *a, **k))
    warm_s = []
    for _ in range(3):
        began = time.perf_counter()
        warm = check_audio(manifest, cache_dir=cache, workers=2)
        warm_s.append(time.perf_counter() - began)
        assert (warm.checked, warm.cached, warm.bad) == (301, 301, [])
    assert opened == []  # no header was read again
    assert min(warm_s) < cold_s


def test_a_changed_file_is_checked_again(tmp_path, monkeypatch):
    manifest = make_manifest(tmp_path, good=5)
    cache = tmp_path / "cache"
    check_audio(manifest, cache_dir=cache)
    touched, shortened = manifest["path"].iloc[1], manifest["path"].iloc[3]
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same size, new mtime
    data = Path(shortened).read_bytes()
    Path(shortened).write_bytes(data[:-200])  # truncated after it passed
    os.utime(shortened, ns=(os.stat(shortened).st_atime_ns, os.stat(touched).st_mtime_ns))

    opened = []
    real = sf.SoundFile
    monkeypatch.setattr(check_module.sf, "SoundFile", lambda p, *a, **k: opened.append(p) or real(p, *a, **k))
    result = check_audio(manifest, on_error="skip", cache_dir=cache)
    assert sorted(opened) == sorted([touched, shortened])
    assert (result.checked, result.cached) == (6, 4)
    assert [(b.path, b.reason) for b in result.bad] == [
        (shortened, "truncated: header declares 800 frames, file holds 700")]
    # The touched file passed again under its new mtime; the bad one left the cache.
    opened.clear()
    again = check_audio(manifest, on_error="skip", cache_dir=cache)
    assert opened == [shortened] and again.cached == 5


def test_a_damaged_cache_is_ignored_not_trusted(tmp_path):
    manifest = make_manifest(tmp_path, good=3)
    cache = tmp_path / "cache"
    check_audio(manifest, cache_dir=cache)
    file = cache / "passed.jsonl"
    lines = file.read_text().splitlines()
    assert len(lines) == 5  # header + 4 files
    file.write_text("\n".join(lines[:2] + ["{not json", lines[2][:10]] + lines[3:]) + "\n")
    assert check_audio(manifest, cache_dir=cache).cached == 3  # the damaged file is re-checked
    file.write_text(json.dumps({"format": "other", "version": 9}) + "\n" + "\n".join(lines[1:]))
    assert check_audio(manifest, cache_dir=cache).cached == 0


def test_header_ok_but_samples_undecodable_passes_here_and_fails_at_read(tmp_path):
    """Only headers are checked: a FLAC with garbage after its first frame passes, and
    read_audio (training time) raises AudioReadError for it, handled by data.on_error."""
    good = tmp_path / "good.flac"
    sf.write(str(good), noise(1.0), 16000, format="FLAC")
    data = bytearray(good.read_bytes())
    data[2000:] = np.random.default_rng(1).integers(0, 256, len(data) - 2000, dtype=np.uint8).tobytes()
    corrupt = tmp_path / "corrupt.flac"
    corrupt.write_bytes(bytes(data))
    manifest = pd.DataFrame({"path": [str(corrupt)], "split": ["train"]})
    result = check_audio(manifest, cache_dir=tmp_path / "cache")
    assert result.bad == [] and result.checked == 1
    with pytest.raises(AudioReadError):
        read_audio(corrupt)


@pytest.mark.parametrize("name, make, reason", [
    ("flac.wav", lambda p: sf.write(str(p), noise(), 16000, format="FLAC"), "extension .wav but content is FLAC"),
    ("clip.txt", lambda p: p.write_bytes(wav_bytes()),
     "extension .txt is not an audio format soundfile reads (content is WAV)"),
    ("noext", lambda p: p.write_bytes(b"hello"), "extension (none) is not an audio format soundfile reads"),
    ("cut.aiff", lambda p: p.write_bytes(_aiff_bytes()[:-400]), "truncated: header declares 800 frames, file holds 600"),
    ("head.wav", lambda p: p.write_bytes(wav_bytes()[:30]), "not an audio file: Error in WAV file. No 'data' chunk marker."),
    ("folder.wav", lambda p: p.mkdir(), "not a regular file"),
    ("streamed.wav", lambda p: p.write_bytes(_streamed_wav()), None),
    ("CAPS.WAV", lambda p: p.write_bytes(wav_bytes()), None),
])
def test_reasons(tmp_path, name, make, reason):
    make(tmp_path / name)
    result = check_audio(pd.DataFrame({"path": [str(tmp_path / name)]}), on_error="skip",
                         cache_dir=tmp_path / "cache")
    assert [b.reason for b in result.bad] == ([reason] if reason else [])
    assert result.bad == [] or result.bad[0].split is None


def _aiff_bytes() -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, noise(), 16000, format="AIFF", subtype="PCM_16")
    return buffer.getvalue()


def _streamed_wav() -> bytes:
    """A WAV written to a pipe: data size 0xFFFFFFFF (never filled in); libsndfile reads it."""
    data = wav_bytes()
    return data[:40] + struct.pack("<I", 0xFFFFFFFF) + data[44:]


def test_progress_bar_on_request(tmp_path, capsys):
    manifest = make_manifest(tmp_path, good=3)
    check_audio(manifest, cache_dir=tmp_path / "cache")
    assert "checking audio" not in capsys.readouterr().err  # small sets: quiet
    check_audio(manifest, cache_dir=tmp_path / "cache", progress=True)
    assert "checking audio" in capsys.readouterr().err


def test_bad_on_error_value(tmp_path):
    with pytest.raises(ValueError, match="on_error"):
        check_audio(pd.DataFrame({"path": []}), on_error="ignore", cache_dir=tmp_path)


def test_benchmark_smoke(capsys):
    results = audio_check_bench.main(["--files", "200", "--workers", "2", "1"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("cold", "warm"))]
    assert [row[:4] for row in rows] == [
        ["cold", "2", "200", "0"], ["warm", "2", "200", "200"],
        ["cold", "1", "200", "0"], ["warm", "1", "200", "200"]]
    assert set(results) == {(run, w) for run in ("cold", "warm") for w in (2, 1)}
    assert all(s > 0 for s in results.values())
    assert "# 2 threads: warm / cold = " in out


def test_an_unwritable_cache_warns_and_the_check_still_runs(tmp_path):
    manifest = make_manifest(tmp_path, good=2)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.warns(UserWarning, match="could not write the audio-check cache"):
        result = check_audio(manifest, cache_dir=not_a_folder / "cache")
    assert (result.checked, result.cached, result.bad) == (3, 0, [])
