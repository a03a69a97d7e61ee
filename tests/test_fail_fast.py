"""Bad audio is refused before Ray starts (exit 2, every bad file named), or dropped and recorded."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import yaml

from pefttune.config import parse_config
from test_search_fixtures import search_config, write_tone_manifest


def _break_files(manifest: Path) -> dict[str, str]:
    """Six kinds of bad audio, written over train/dev files of a good manifest; name -> path."""
    frame = pd.read_parquet(manifest)
    root = manifest.parent
    train = frame.index[frame["split"] == "train"]
    bad = {}

    def put(i, name, suffix, writer):
        path = root / f"bad_{name}{suffix}"
        writer(path)
        frame.loc[i, "path"] = str(path)
        bad[name] = str(path)

    put(train[0], "empty", ".wav", lambda p: p.write_bytes(b""))
    put(train[1], "random", ".wav", lambda p: p.write_bytes(np.random.default_rng(0).bytes(4000)))

    def truncated(p):
        sf.write(str(p), np.zeros(16000, dtype=np.float32), 16000, subtype="PCM_16")
        p.write_bytes(p.read_bytes()[:8000])

    put(train[2], "truncated", ".wav", truncated)
    put(train[3], "wrong_extension", ".txt", lambda p: sf.write(str(p), np.zeros(800), 16000, format="WAV"))
    frame.loc[train[4], "path"] = str(root / "missing.wav")
    bad["missing"] = str(root / "missing.wav")
    put(train[5], "zero_frames", ".wav", lambda p: sf.write(str(p), np.zeros(0), 16000, format="WAV"))
    frame.to_parquet(manifest)
    return bad


def test_search_refuses_bad_audio_before_ray_starts(tmp_path):
    manifest = write_tone_manifest(tmp_path / "tones")
    bad = _break_files(manifest)
    config = search_config(manifest, tmp_path / "results")
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ADDRESS": "", "PEFTTUNE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "pefttune", "search", str(path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "6 of" in done.stderr and "unreadable" in done.stderr
    for name, file in bad.items():
        assert file in done.stderr, name
    assert "row " in done.stderr and "(train)" in done.stderr
    assert "Ray" not in done.stdout and not (tmp_path / "results" / "search-test").exists()  # nothing started


def test_on_error_skip_drops_the_bad_files_and_records_them(tmp_path, monkeypatch):
    from pefttune.data.loaders import load_data
    from pefttune.trainables.setup import SKIPPED_AUDIO, make_setup

    monkeypatch.setenv("PEFTTUNE_CACHE", str(tmp_path / "cache"))
    manifest = write_tone_manifest(tmp_path / "tones")
    bad = _break_files(manifest)
    config = parse_config(search_config(manifest, tmp_path / "results", data={"on_error": "skip"}))
    setup = make_setup(config, str(tmp_path / "results" / "search-test"))
    assert len(setup.data.skipped) == 6
    recorded = pd.read_csv(tmp_path / "results" / "search-test" / SKIPPED_AUDIO)
    assert sorted(recorded["path"]) == sorted(bad.values()) and set(recorded["split"]) == {"train"}
    data = load_data(config, setup.data)
    good_train = int((pd.read_parquet(manifest)["split"] == "train").sum()) - 6
    assert len(data.train.dataset) == good_train
