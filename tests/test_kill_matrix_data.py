"""The kill matrix's remaining moments: the corpus build and the frozen-cache prefill (a suite's
task boundary: ``tests/test_suite.py``).

Each case runs ``python -m pefttune run CONFIG`` in a subprocess (its own Ray, a private
TMPDIR whose prefix finds Ray's leftovers, and where the case needs a cold cache its own
PEFTTUNE_CACHE), SIGKILLs its process group at a moment found through files on disk (never
by sleeping), runs ``--resume`` and checks that it exits 0 with a finished, correct result.
The studies are tiny: one uniform trial of one epoch, no search, no DARTS.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import kill_ray_leftovers, run_until_killed
from test_search_fixtures import search_config, write_tone_manifest

pytestmark = pytest.mark.slow

CORPUS_SIZE = {"per_class": 12, "test_per_class": 2}  # 12 labels x (12 train + 3 dev + 2 test) clips


def _config(storage: Path, name: str, manifest: Path | None = None, **sections) -> dict:
    config = search_config(
        manifest, storage, name=name, methods={"lora": {"rank": 2}},
        train={"epochs": 1, "max_steps_per_epoch": 2, "seeds": [0]},
        search={"num_samples": 0, "hybrid": False, "replicate_top": 0},
        darts={"enabled": False},
    )
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    return config


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def _env(cache: Path | None) -> tuple[dict, str]:
    temp_root = tempfile.mkdtemp(prefix="pk-")
    env = {**os.environ, "TMPDIR": temp_root}
    if cache is not None:
        env["PEFTTUNE_CACHE"] = str(cache)
    return env, temp_root


def _run_until(config_path: Path, moment, log: Path, cache: Path | None = None, resume: bool = False,
               timeout: float = 240):
    """Start ``pefttune run`` and SIGKILL its process group once ``moment()`` returns something
    true; returns that value (what was seen at the kill)."""
    env = {**os.environ, **({"PEFTTUNE_CACHE": str(cache)} if cache is not None else {})}
    return run_until_killed(["run", str(config_path)] + (["--resume"] if resume else []), moment, log, env=env,
                            timeout=timeout, poll_s=0.005)


def _resume(config_path: Path, cache: Path | None = None) -> subprocess.CompletedProcess:
    env, temp_root = _env(cache)
    try:
        return subprocess.run([sys.executable, "-m", "pefttune", "run", str(config_path), "--resume"],
                              capture_output=True, text=True, env=env, timeout=400)
    finally:
        kill_ray_leftovers(temp_root)


def _finished(study: Path) -> pd.DataFrame:
    """The finished study's trials table (the report was written)."""
    assert (study / "analysis" / "report.md").is_file()
    trials = pd.read_parquet(study / "analysis" / "tables" / "trials.parquet")
    assert len(trials) and (trials["outcome"] == "completed").all(), trials[["kind", "outcome"]]
    assert trials["test_score"].between(0, 1).all()
    return trials


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_kill_while_the_corpus_is_written(tmp_path):
    from pefttune.demo.corpus_cache import ensure_corpus

    cache = tmp_path / "cache"
    corpora = cache / "corpora"
    config = _write(tmp_path / "corpus.yaml", _config(
        tmp_path / "results", "corpus", data={"source": "synth", "task": "ks", "path": None, **CORPUS_SIZE},
        train={"frozen_cache": "memory"}))  # no prefill: not this case's moment

    def half_written():  # a staging folder with some audio, no corpus marker, nothing in place yet
        for staging in corpora.glob(".ks-*.partial-*") if corpora.is_dir() else []:
            audio = list(staging.glob("audio/*/*/*.flac"))
            if len(audio) >= 3 and not (staging / "pefttune_corpus.json").exists():
                return {"staging": staging, "audio": len(audio)}
        return None

    seen = _run_until(config, half_written, tmp_path / "corpus.log", cache=cache)
    assert seen["staging"].is_dir() and not (seen["staging"] / "pefttune_corpus.json").exists()
    assert not [p for p in corpora.iterdir() if not p.name.startswith(".")]  # no corpus in place

    _ok(_resume(config, cache=cache))
    (corpus,) = [p for p in corpora.iterdir()]  # the corpus, and the killed build's staging folder is gone
    assert not corpus.name.startswith(".") and (corpus / "pefttune_corpus.json").is_file()
    reference = ensure_corpus("ks", seed=0, root=tmp_path / "uninterrupted", **CORPUS_SIZE).parent
    assert reference.name == corpus.name
    built, expected = _digests(corpus), _digests(reference)
    assert 0 < seen["audio"] < len([k for k in expected if k.endswith(".flac")]) == 12 * 17  # killed mid-build
    assert built == expected  # every audio file, the manifest and the marker, byte for byte
    trials = _finished(tmp_path / "results" / "corpus")
    manifest = pd.read_parquet(corpus / "manifest.parquet")
    assert len(manifest) == 12 * 17 and trials["kind"].tolist() == ["uniform"]


def test_kill_during_the_prefill(tmp_path, monkeypatch):
    from pefttune.config import load_config
    from pefttune.data.loaders import prepare_data
    from pefttune.trainables.setup import prefill_frozen_cache

    manifest = write_tone_manifest(tmp_path / "data", classes=3, per_split={"train": 40, "dev": 10, "test": 10})
    utterances = 3 * 60
    cache = tmp_path / "cache"
    study = tmp_path / "results" / "prefill"
    config = _write(tmp_path / "prefill.yaml", _config(tmp_path / "results", "prefill", manifest,
                                                       train={"frozen_cache": "disk"}))

    def npy():
        return list((cache / "frozen").glob("*/*.npy")) if (cache / "frozen").is_dir() else []

    def some_cached_no_trial():
        found = npy()
        if found and not list(study.glob("train_fn_*")) and not list(study.glob("experiment_state-*")):
            return {"npy": len(found)}
        return None

    seen = _run_until(config, some_cached_no_trial, tmp_path / "prefill.log", cache=cache)
    assert 0 < seen["npy"] < utterances, seen  # mid-prefill
    (key,) = list((cache / "frozen").iterdir())
    # a writer killed mid-file leaves a temporary: plant one with garbage, it must never be read
    (key / "tmp0killed.tmp").write_bytes(b"\x93NUMPY garbage of a file cut off")

    _ok(_resume(config, cache=cache))
    _finished(study)
    names = sorted(p.name for p in key.glob("*.npy"))
    assert len(names) == utterances == len(set(names))  # every utterance, once
    # the same states as a prefill that was never stopped (in another cache folder)
    experiment = load_config(config)
    monkeypatch.setenv("PEFTTUNE_CACHE", str(tmp_path / "uninterrupted"))
    assert prefill_frozen_cache(experiment, prepare_data(experiment), workers=1) == utterances
    reference = tmp_path / "uninterrupted" / "frozen" / key.name
    assert sorted(p.name for p in reference.glob("*.npy")) == names
    for name in names:
        np.testing.assert_allclose(np.load(key / name), np.load(reference / name), rtol=0, atol=1e-6)
