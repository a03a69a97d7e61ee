"""Shared helpers of the search/trainable tests (no tests here): a tiny tone corpus written
through pefttune.data's manifest/audio API, and small experiment configs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pefttune.data.audio import write_flac
from pefttune.data.manifest import write_manifest
from pefttune.schema import TrialKind, metric_key

SPLITS = {"train": 8, "dev": 3, "test": 3}


def write_tone_manifest(root: Path, classes: int = 4, per_split: dict = SPLITS, seed: int = 0) -> Path:
    """Tones (one frequency per class) with noise, 0.4-0.5 s each, as FLAC + manifest.parquet."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, count in per_split.items():
        for label in range(classes):
            freq = 250.0 * 2**label
            for i in range(count):
                samples = int(16_000 * rng.uniform(0.4, 0.5))
                t = np.arange(samples) / 16_000
                wav = 0.5 * np.sin(2 * np.pi * freq * (1 + 0.02 * rng.standard_normal()) * t + rng.uniform(0, 6.3))
                wav += 0.05 * rng.standard_normal(samples)
                path = root / split / f"tone{label}_{i}.flac"
                write_flac(path, wav)
                rows.append({"path": str(path), "split": split, "label": f"tone{label}", "speaker": f"s{i}",
                             "duration": samples / 16_000})
    return write_manifest(pd.DataFrame(rows), root)


def search_config(manifest: Path, storage: Path, **sections) -> dict:
    """A small CPU search: tiny HuBERT, 3 steps per epoch."""
    config = {
        "name": "search-test",
        "backbone": "tiny-hubert",
        "data": {"source": "manifest", "task": "ks", "path": str(manifest), "batch_size": 8},
        "methods": {"lora": {"rank": [2, 4]}, "bitfit": {}, "sequential": {"bottleneck": [8, 32]}},
        "train": {"epochs": 2, "lr": 0.005, "max_steps_per_epoch": 3, "warmup_ratio": 0.0},
        "search": {"algorithm": "tpe", "num_samples": 2, "scheduler": "none", "max_concurrent": 2,
                   "max_failures": 1, "frozen_reference": False},
        "resources": {"cpu": 1},
        "analysis": {"logmel_reference": False},
        "storage": str(storage),
    }
    for key, value in sections.items():  # sections are merged, `methods` is replaced
        merge = key != "methods" and isinstance(value, dict) and isinstance(config.get(key), dict)
        config[key] = {**config[key], **value} if merge else value
    return config


def search_row(trial_id: str, kind: TrialKind, score: float, params: int, metric: str = "accuracy",
               status: str = "TERMINATED", over_budget: bool = False, stopped_early: bool = False, **extra) -> dict:
    """One row of a search's results frame (:func:`pefttune.runtime.study_dir.results_frame`): the
    columns the summaries and the replicates read, named by the schema."""
    return {"trial_id": trial_id, "status": status, "kind": kind.value, "over_budget": over_budget,
            "stopped_early": stopped_early, metric_key("dev", metric, best=True): score, "trainable_params": params,
            **extra}
