"""Use the results: export-model -> load_model -> predict reproduces stored predictions."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from pefttune.cli import main as cli_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def experiment(ray_session, tmp_path_factory):
    from pefttune.config import parse_config
    from pefttune.search.run import run_search
    from test_search_fixtures import search_config, write_tone_manifest

    root = tmp_path_factory.mktemp("predictor")
    manifest = write_tone_manifest(root / "data", classes=3, per_split={"train": 4, "dev": 3, "test": 3})
    config = search_config(
        manifest, root / "storage", name="predict-real",
        train={"epochs": 1, "max_steps_per_epoch": 2},
        search={"num_samples": 0, "hybrid": False, "max_failures": 0},
    )
    config["methods"] = {"lora": {"rank": 2}, "bitfit": {}, "sequential": {"bottleneck": 8}}
    run_search(parse_config(config), verbose=0)
    return root / "storage" / "predict-real", manifest


def _test_split(manifest):
    frame = pd.read_parquet(manifest)
    frame = frame[frame["split"] == "test"].reset_index(drop=True)
    return [str(manifest.parent / p) if not str(p).startswith("/") else str(p) for p in frame["path"]], frame


def _stored(exp, trial_id):
    arrays = exp.predictions(trial_id, "test")
    order = np.argsort(arrays["index"])
    return arrays["probs"][order]


def test_single_model_export_reproduces_stored_predictions(experiment, tmp_path):
    from pefttune.analysis.selection import top_k
    from pefttune.analysis.store import open_results
    from pefttune.predictor import load_model

    path, manifest = experiment
    exp = open_results(path)
    best = top_k(exp, 1)[0]
    out = tmp_path / "best"
    assert cli_main(["export-model", str(path), "--best", "--out", str(out)]) == 0
    for name in ("backbone.json", "vocab.json", "preprocessing.json", "adapter.safetensors", "placement.json",
                 "model.json", "README.md"):
        assert (out / name).exists(), name
    card = (out / "README.md").read_text()
    assert best.trial_id in card and "| layer | methods |" in card
    predictor = load_model(out)
    paths, frame = _test_split(manifest)
    predictions = predictor.predict(paths)
    probs = np.stack([[p.probabilities[label] for label in predictor.vocab.labels] for p in predictions])
    stored = _stored(exp, best.trial_id)
    # the same model on the same audio: the trial's stored test probabilities, one by one
    assert np.allclose(probs, stored, atol=1e-4)
    assert [p.label for p in predictions] == [predictor.vocab.decode(int(i)) for i in stored.argmax(1)]


def test_vote_ensemble_export_reproduces_stored_vote(experiment, tmp_path):
    from pefttune.analysis.ensembles import majority_vote
    from pefttune.analysis.store import open_results
    from pefttune.predictor import EnsemblePredictor, load_model

    path, manifest = experiment
    exp = open_results(path)
    out = tmp_path / "ensemble"
    assert cli_main(["export-model", str(path), "--ensemble", "per-method", "--out", str(out)]) == 0
    spec = json.loads((out / "ensemble.json").read_text())
    assert spec["strategy"] == "vote" and len(spec["members"]) == 3
    predictor = load_model(out)
    assert isinstance(predictor, EnsemblePredictor)
    paths, _ = _test_split(manifest)
    labels = [p.label for p in predictor.predict(paths)]
    stored = np.stack([_stored(exp, m["trial_id"]) for m in spec["members"]])
    expected = [predictor.vocab.decode(int(i)) for i in majority_vote(stored)]
    assert labels == expected


def test_predict_cli_keeps_good_results_next_to_corrupt_files(experiment, tmp_path, capsys):
    path, manifest = experiment
    out = tmp_path / "model"
    cli_main(["export-model", str(path), "--best", "--out", str(out)])
    paths, _ = _test_split(manifest)
    stereo = tmp_path / "stereo_44k.wav"  # any rate, stereo: resampled and downmixed
    wav, rate = sf.read(paths[0])
    from scipy.signal import resample_poly

    up = resample_poly(wav, 441, 160)
    sf.write(stereo, np.stack([up, up], axis=1), 44_100)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"not audio at all")
    missing = tmp_path / "missing.flac"
    csv_path = tmp_path / "predictions.csv"
    code = cli_main(["predict", str(out), paths[0], str(corrupt), str(stereo), str(missing), "--out", str(csv_path)])
    assert code == 0
    table = pd.read_csv(csv_path, keep_default_na=False)
    assert table["input"].tolist() == [paths[0], str(corrupt), str(stereo), str(missing)]
    assert table.loc[0, "prediction"] and table.loc[2, "prediction"] == table.loc[0, "prediction"]
    assert table.loc[1, "error"] and table.loc[3, "error"] and not table.loc[0, "error"]
    assert "2 of 4 inputs could not be read" in capsys.readouterr().err
    # never overwrite a user's file
    assert cli_main(["predict", str(out), paths[0], "--out", str(csv_path)]) == 2
    assert len(pd.read_csv(csv_path)) == 4


def test_tampered_directories_fail_clearly(experiment, tmp_path):
    from safetensors.torch import load_file, save_file

    from pefttune.predictor import load_model

    path, _ = experiment
    good = tmp_path / "good"
    cli_main(["export-model", str(path), "--best", "--out", str(good)])

    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    tensors = load_file(str(missing / "adapter.safetensors"))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(missing / "adapter.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        load_model(missing)

    shape = tmp_path / "shape"
    shutil.copytree(good, shape)
    tensors = load_file(str(shape / "adapter.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(tuple(s + 1 for s in tensors[name].shape))
    save_file(tensors, str(shape / "adapter.safetensors"))
    with pytest.raises(ValueError, match="shape"):
        load_model(shape)

    other = tmp_path / "other-backbone"
    shutil.copytree(good, other)
    with pytest.raises(ValueError, match="hash"):
        load_model(other, backbone="tiny-wav2vec2")  # other weights than recorded

    no_vocab = tmp_path / "no-vocab"
    shutil.copytree(good, no_vocab)
    (no_vocab / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_model(no_vocab)

    # an existing, non-empty output directory is never overwritten
    before = sorted(p.name for p in good.iterdir())
    assert cli_main(["export-model", str(path), "--best", "--out", str(good)]) == 2
    from pefttune.predictor import export_model

    with pytest.raises(FileExistsError, match="not empty"):
        export_model(path, good, best=True)
    assert sorted(p.name for p in good.iterdir()) == before


def test_lora_only_export_loads_with_peft(experiment, tmp_path):
    from peft import PeftModel

    from pefttune.analysis.store import open_results
    from pefttune.backbones import build_tiny_model
    from pefttune.model import load_model_dir

    path, _ = experiment
    exp = open_results(path)
    lora = next(t for t in exp.trials if t.method == "lora")
    out = tmp_path / "lora"
    cli_main(["export-model", str(path), "--trial", lora.trial_id, "--out", str(out)])
    assert (out / "peft_adapter" / "adapter_config.json").exists()
    ours = load_model_dir(out).eval()
    hf = PeftModel.from_pretrained(build_tiny_model("hubert"), str(out / "peft_adapter")).eval()
    x = torch.randn(2, 8000)
    with torch.no_grad():
        expected = hf(x, output_hidden_states=True).last_hidden_state
        states, _ = ours.encoder(x)
    assert torch.allclose(states[-1], expected, atol=1e-5)
    # and the adapter is not a no-op: LoRA B was trained away from zero
    base = build_tiny_model("hubert").eval()
    with torch.no_grad():
        plain = base(x).last_hidden_state
    assert not torch.allclose(plain, expected, atol=1e-6)
    config = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-hubert"  # built in memory: its pefttune name
    assert config["auto_mapping"] == {"base_model_class": "HubertModel",
                                      "parent_library": "transformers.models.hubert.modeling_hubert"}


def test_merged_export_is_a_transformers_model_that_predicts_like_the_trial(experiment, tmp_path, capsys):
    from transformers import AutoModel

    from pefttune.analysis.store import open_results
    from pefttune.model import load_model_dir
    from pefttune.predictor import load_model

    path, manifest = experiment
    exp = open_results(path)
    trials = {t.method: t for t in exp.trials if t.method}
    refused = tmp_path / "refused"
    assert cli_main(["export-model", str(path), "--trial", trials["sequential"].trial_id, "--merged",
                     "--out", str(refused)]) == 2
    message = capsys.readouterr().err
    assert "layer 0: sequential; layer 1: sequential; layer 2: sequential; layer 3: sequential" in message
    assert trials["sequential"].trial_id in message
    assert cli_main(["export-model", str(path), "--ensemble", "per-method", "--merged", "--out", str(refused)]) == 2
    assert not refused.exists() and not list(tmp_path.glob("refused*"))  # nothing written
    paths, _ = _test_split(manifest)
    x = torch.randn(2, 8000)
    for method in ("lora", "bitfit"):
        merged, plain = tmp_path / method, tmp_path / f"{method}-plain"
        assert cli_main(["export-model", str(path), "--trial", trials[method].trial_id, "--merged",
                         "--out", str(merged)]) == 0
        assert cli_main(["export-model", str(path), "--trial", trials[method].trial_id, "--out", str(plain)]) == 0
        assert sorted(p.name for p in merged.iterdir()) == [
            "README.md", "config.json", "head.json", "head.safetensors", "merged_from.json", "model.safetensors",
            "preprocessing.json", "vocab.json"]
        card = (merged / "README.md").read_text()
        assert "## Merged model" in card and "AutoModel.from_pretrained(directory)" in card
        hf = AutoModel.from_pretrained(str(merged)).eval()
        assert type(hf).__name__ == "HubertModel"
        with torch.no_grad():
            expected = load_model_dir(plain).eval().encoder(x)[0]
            states = hf(x, output_hidden_states=True).hidden_states
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(states, expected))
        ours = [p.probabilities for p in load_model(merged).predict(paths)]
        reference = [p.probabilities for p in load_model(plain).predict(paths)]
        for a, b in zip(ours, reference):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
