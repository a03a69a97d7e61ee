"""DARTS on Ray Tune end to end (CPU): search trials on a synthesized keyword-spotting
corpus, alpha reports and checkpoints, derivation, retraining by the discrete trainable.

One run (module fixture): tiny HuBERT, candidates none/lora/bitfit/sequential, 2 epochs, two
variants (softmax + gated, GDAS + exact) of seed 0, each failing once after epoch 1 and
resumed from its checkpoint; then the derived placements are retrained.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pefttune.config import parse_config
from pefttune.data.audio import write_flac
from pefttune.data.espeak import SynthRequest, synthesize_many
from pefttune.data.manifest import write_manifest
from pefttune.darts.run import RETRAIN_DIR, SEARCH_DIR, canonical, load_darts, run_darts
from pefttune.placement import Placement
from pefttune.runtime.study_dir import load_results, results_frame
from pefttune.schema import PREDICTIONS_DIR, predictions_file
from pefttune.backbones import backbone_info
from pefttune.testing import Faults, fail_once_after
from pefttune.trainables.darts import ALPHA_FILE, ARCH_FILE, read_alpha

WORDS = ("yes", "no", "up", "down")
VOICES = {"train": ("m1", "f2", "m3", "f4", "klatt", "m5"), "dev": ("f1", "m2"), "test": ("f3", "m4")}
CANDIDATES = ("none", "lora", "bitfit", "sequential")
EPOCHS = 2
BUDGET = 2000  # PEFT parameters: lora r2 512, bitfit 576, sequential b8 1096 per layer


@pytest.fixture(scope="module")
def ks_manifest(tmp_path_factory) -> Path:
    """Keyword clips synthesized with eSpeak NG (one voice variant per clip), 0.5 s each."""
    root = tmp_path_factory.mktemp("ks")
    requests = [(split, word, v) for split, variants in VOICES.items() for word in WORDS for v in variants]
    waves = synthesize_many([SynthRequest(word, variant=v, rate=200) for _, word, v in requests])
    rows = []
    for (split, word, variant), wav in zip(requests, waves):
        clip = np.zeros(8000, dtype=np.float32)
        wav = wav[:8000]
        start = (8000 - len(wav)) // 2
        clip[start : start + len(wav)] = wav
        path = root / split / f"{word}_{variant}.flac"
        write_flac(path, clip)
        rows.append({"path": str(path), "split": split, "label": word, "speaker": variant, "duration": 0.5})
    return write_manifest(pd.DataFrame(rows), root)


def darts_config(manifest: Path, storage: Path) -> dict:
    return {
        "name": "darts-test",
        "backbone": "tiny-hubert",
        "data": {"source": "manifest", "task": "ks", "path": str(manifest), "batch_size": 4},
        "methods": {"lora": {"rank": 2}, "bitfit": {}, "sequential": {"bottleneck": 8}},
        "budget": BUDGET,
        "train": {"epochs": EPOCHS, "lr": 0.005, "warmup_ratio": 0.0},
        "search": {"max_concurrent": 2, "max_failures": 1},
        "darts": {
            "warmup_epochs": 0,
            "arch_lr": 0.05,
            "budget_penalty": 1.0,
            "retrain": "every-seed",  # each distinct placement a configuration (per-seed: tests/test_kill_matrix.py)
            "seeds": [0],
            "variants": [{}, {"mix": "exact", "relaxation": "gumbel", "hard": True, "temperature": 5.0,
                              "final_temperature": 0.5}],
        },
        "resources": {"cpu": 1},
        "storage": str(storage),
    }


@pytest.fixture(scope="module")
def darts_run(ray_session, ks_manifest, tmp_path_factory):
    storage = tmp_path_factory.mktemp("results")
    config = parse_config(darts_config(ks_manifest, storage))
    run = run_darts(config, verbose=0, faults=Faults(after_epoch=fail_once_after(1)))
    return {"config": config, "run": run, "path": Path(storage) / config.name, "storage": storage}


def history(result) -> list[dict]:
    lines = (Path(result.path) / "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_search_trials_report_alpha_every_epoch_and_resume_from_checkpoints(darts_run):
    run = darts_run["run"]
    results = list(run.search)
    assert len(results) == 2 and not any(r.error for r in results)
    assert sorted(r.metrics["variant"] for r in results) == [
        "base", "final_temperature=0.5,hard=True,mix=exact,relaxation=gumbel,temperature=5.0"
    ]
    for result in results:
        rows = history(result)
        assert [r["epoch"] for r in rows] == [1, 2]
        assert rows[1]["start_epoch"] == 2  # the injected failure: epoch 2 ran in a restored trial
        steps_per_epoch = 3  # 12 of the 24 training clips for the weights, batch 4
        assert [r["arch_steps"] for r in rows] == [steps_per_epoch, 2 * steps_per_epoch]  # restored architect
        for row in rows:
            assert row["kind"] == "darts" and row["seed"] == 0
            for layer in range(4):
                probs = [row[f"alpha/L{layer:02d}/{name}"] for name in CANDIDATES]
                assert sum(probs) == pytest.approx(1.0, abs=1e-5) and min(probs) > 0
                assert 0 <= row[f"entropy/L{layer:02d}"] <= np.log(4) + 1e-6
            for key in ("train_loss", "dev_loss", "dev_accuracy", "arch_loss", "entropy_mean", "none_share",
                        "expected_params", "best_dev_accuracy"):
                assert np.isfinite(row[key]), key
        assert rows[0]["alpha/L00/lora"] != rows[1]["alpha/L00/lora"]

        # the final checkpoint holds alpha (whose probabilities are the last report) and the arch state
        checkpoint = Path(result.checkpoint.path)
        alpha, names = read_alpha(checkpoint)
        assert names == list(CANDIDATES) and alpha.shape == (4, 4)
        probs = torch.softmax(alpha, -1)  # softmax at T=1 (base), or the Gumbel sampling distribution
        assert probs[2, 1].item() == pytest.approx(rows[1]["alpha/L02/lora"], abs=1e-6)
        arch = torch.load(checkpoint / ARCH_FILE, weights_only=True)
        assert arch["steps"] == 2 * steps_per_epoch and (checkpoint / ALPHA_FILE).exists()
        assert (checkpoint / "model" / "adapter.safetensors").exists()


def test_final_result_holds_a_valid_derived_placement_within_budget(darts_run):
    run, config = darts_run["run"], darts_run["config"]
    keys = set()
    for result in run.search:
        final = result.metrics
        placement = Placement.from_json(final["derived_placement"])
        assert placement.num_layers == 4 and set(placement.layer_methods()) <= set(CANDIDATES)
        assert all(len(layer) <= 1 for layer in placement.layers)
        assert final["derived_params"] == placement.trainable_parameters(backbone_info("tiny-hubert")) <= BUDGET
        assert 0 <= final["derived_dev_accuracy"] <= 1 and np.isfinite(final["derived_dev_loss"])
        stored = Placement.load(Path(result.checkpoint.path) / "derived_placement.json")
        assert canonical(stored) == canonical(placement)
        keys.add(canonical(placement))
    assert {d.key for d in run.derived} == keys
    assert sum(len(d.trials) for d in run.derived) == 2


def test_derived_placements_are_retrained_like_uniform_baselines(darts_run):
    run, config, path = darts_run["run"], darts_run["config"], darts_run["path"]
    assert (path / SEARCH_DIR).is_dir() and (path / RETRAIN_DIR).is_dir()
    frame = results_frame(run.retrain, EPOCHS)
    assert len(frame) == len(run.derived)
    assert (frame["kind"] == "darts-derived").all() and (frame["status"] == "TERMINATED").all()
    assert (frame["epoch"] == config.train.epochs).all() and frame["test_accuracy"].between(0, 1).all()
    by_key = {d.key: d for d in run.derived}
    for result in run.retrain:
        key = canonical(Placement.from_json(result.config["placement"]))
        assert result.config["derived_from"] == by_key[key].trials
        assert result.config["lr"] == config.train.lr
        assert (Path(result.checkpoint.path) / PREDICTIONS_DIR / predictions_file("test")).exists()

    table = load_darts(path)  # read back from storage
    assert len(table) == 2 and table["retrain_test_accuracy"].between(0, 1).all()
    assert (table["retrain_epoch"] == EPOCHS).all()


def test_analysis_store_sees_both_darts_experiments(darts_run):
    from pefttune.analysis.store import open_results
    from pefttune.analysis.tables import alpha_table

    experiment = open_results(darts_run["path"])
    kinds = sorted(t.kind for t in experiment.trials)
    assert kinds.count("darts") == 2 and kinds.count("darts-derived") == len(darts_run["run"].derived)
    alpha = alpha_table(experiment)
    assert set(alpha["method"]) == set(CANDIDATES) and set(alpha["layer"]) == {0, 1, 2, 3}


def test_cli_refuses_a_second_run_and_resumes_a_finished_one(darts_run, tmp_path, capsys):
    from pefttune.cli import main

    config_file = tmp_path / "darts.yaml"
    config_file.write_text(yaml.safe_dump(darts_config(Path(darts_run["config"].data.path), darts_run["storage"])))
    assert main(["darts", str(config_file), "--quiet"]) == 2
    assert "already holds a DARTS search" in capsys.readouterr().err
    before = {r.path: r.metrics["derived_placement"] for r in darts_run["run"].search}
    assert main(["darts", str(config_file), "--resume", "--quiet"]) == 0  # nothing left to run
    out = capsys.readouterr().out
    assert "2 search trial(s)" in out
    after = load_darts(darts_run["path"])
    assert sorted(after["derived_placement"]) == sorted(before.values())
    assert len(results_frame(load_results(darts_run["path"] / RETRAIN_DIR))) == len(darts_run["run"].derived)
