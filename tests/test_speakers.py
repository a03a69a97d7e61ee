"""Each test example's speaker from the manifest named by the experiment's config copy."""
from __future__ import annotations

import numpy as np
import pandas as pd

from pefttune.analysis.speakers import manifest_of
from pefttune.analysis.speakers import speaker_clusters as clusters_of


def _manifest(tmp_path, speakers=True) -> dict:
    frame = pd.DataFrame({"path": [f"c{i}.wav" for i in range(8)],
                          "split": ["train", "train", "dev", "test", "test", "test", "test", "test"],
                          "label": "yes"})
    if speakers:
        frame["speaker"] = ["a", "a", "b", "c", "d", "c", None, "d"]
    path = tmp_path / "manifest.csv"
    frame.to_csv(path, index=False)
    return {"data": {"source": "manifest", "task": "ks", "path": str(path)}}


def test_speakers_of_the_test_rows(tmp_path):
    config = _manifest(tmp_path)
    assert manifest_of(config) == (tmp_path / "manifest.csv", "")
    clusters = clusters_of(config, np.array([3, 4, 5, 6, 7]))
    assert clusters.unit == "speakers" and clusters.n_speakers == 2 and clusters.count == 3
    ids = clusters.ids
    assert ids[0] == ids[2] and ids[1] == ids[4] and ids[3] not in (ids[0], ids[1])  # row 6 has no speaker


def test_utterances_and_why_when_speakers_are_unknown(tmp_path, monkeypatch):
    plain = clusters_of(_manifest(tmp_path, speakers=False), np.array([3, 4, 5]))
    assert plain.unit == "utterances" and plain.count == 3 and "no speaker column" in plain.note
    outside = clusters_of(_manifest(tmp_path), np.array([1, 3, 4]))  # row 1 is a train clip
    assert outside.unit == "utterances" and "does not hold these test examples" in outside.note
    missing = clusters_of(_manifest(tmp_path), np.array([3, 40]))
    assert missing.unit == "utterances" and "does not hold these test examples" in missing.note
    assert "no config copy" in clusters_of(None, np.array([0, 1])).note
    monkeypatch.setenv("PEFTTUNE_CACHE", str(tmp_path / "empty-cache"))
    synth = clusters_of({"data": {"source": "synth", "task": "ks", "per_class": 4}}, np.array([0, 1]))
    assert synth.unit == "utterances" and "not in the cache" in synth.note  # never built here
    assert not (tmp_path / "empty-cache").exists()
    gone = clusters_of({"data": {"source": "manifest", "task": "ks", "path": str(tmp_path / "nope.csv")}},
                         np.array([0]))
    assert gone.unit == "utterances" and "was not found" in gone.note
