"""PeftSpeechModel: two-step forward, parameter counts, save/load round trips and
tampered model directories."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import MATRIX, MATRIX_IDS, Case, audio_batch, fresh_encoder, make_model, perturb, uniform
from pefttune.backbones import SpeechEncoder, build_tiny_model
from pefttune.heads import HeadConfig
from pefttune.model import MODEL_FILE, PLACEMENT_FILE, WEIGHTS_FILE, build_model, load_model_dir
from pefttune.placement import Placement


def _outputs(model, seed: int = 1):
    model.eval()
    x, mask = audio_batch(seed)
    with torch.no_grad():
        states, frames = model.encoder(x, mask)
        out = model.head(states, frames)
    return out, frames, states


def _saved(tmp_path, backbone="tiny-hubert", case=Case("houlsby+lora", uniform(["houlsby", "lora"]))):
    model = make_model(backbone, case)
    perturb(model, seed=3)
    return model, model.save(tmp_path / "model")


# -- round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backbone", "case"), MATRIX, ids=MATRIX_IDS)
def test_save_load_round_trip_is_exact(backbone, case, tmp_path):
    model = make_model(backbone, case)
    perturb(model, seed=1)
    directory = model.save(tmp_path / "m", metadata={"note": "round trip"})
    assert sorted(p.name for p in directory.iterdir()) == sorted([WEIGHTS_FILE, PLACEMENT_FILE, MODEL_FILE])

    tensors = load_file(str(directory / WEIGHTS_FILE))
    assert set(tensors) == set(model.trainable_named_parameters())  # PEFT + head only, nothing frozen
    assert sum(t.numel() for t in tensors.values()) == model.count_parameters()["trainable"]
    description = json.loads((directory / MODEL_FILE).read_text())
    assert description["backbone"] == backbone and description["note"] == "round trip"
    assert description["backbone_hash"] == fresh_encoder(backbone).content_hash()
    assert Placement.load(directory / PLACEMENT_FILE) == model.placement

    loaded = load_model_dir(directory)
    assert loaded.placement == model.placement and loaded.head_config == model.head_config
    out, frames, states = _outputs(model)
    out2, frames2, states2 = _outputs(loaded)
    assert torch.equal(out, out2) and torch.equal(frames, frames2)
    assert all(torch.equal(a, b) for a, b in zip(states, states2))
    # (the head was perturbed too: equal outputs mean the saved weights were loaded, not re-initialised)


def test_a_normed_heads_running_statistics_are_saved_loaded_and_checkpointed(tmp_path):
    from pefttune.trainables.checkpoint import load_trainable_state, trainable_state

    model = build_model(fresh_encoder("tiny-hubert"), Placement.from_dict({"num_layers": 4, "layers": {"1": "lora"}}),
                        HeadConfig("classification", 3, norm="batch"))
    model.train()
    x, mask = audio_batch(2)
    with torch.no_grad():
        model(x * 30 + 1, mask)  # training-mode batches move the running statistics off (0, 1)
    perturb(model, seed=4)
    buffers = {"head.head.norm.running_mean", "head.head.norm.running_var", "head.head.norm.num_batches_tracked"}
    assert buffers <= set(model.trained_tensors()) and not buffers & set(model.trainable_named_parameters())
    directory = model.save(tmp_path / "m")
    tensors = load_file(str(directory / WEIGHTS_FILE))
    assert set(tensors) == set(model.trainable_named_parameters()) | buffers
    assert not torch.equal(tensors["head.head.norm.running_var"], torch.ones_like(tensors["head.head.norm.running_var"]))
    loaded = load_model_dir(directory)
    assert loaded.head_config.norm == "batch"
    for name in buffers:
        assert torch.equal(dict(loaded.named_buffers())[name], dict(model.named_buffers())[name])
    assert torch.equal(_outputs(model)[0], _outputs(loaded)[0])  # eval mode: the running statistics decide
    # a trial's in-memory copy (best weights, the discrete trainable's swap) carries them too
    state = trainable_state(model)
    fresh = build_model(fresh_encoder("tiny-hubert"), model.placement, HeadConfig("classification", 3, norm="batch"))
    load_trainable_state(fresh, state)
    assert torch.equal(_outputs(fresh)[0], _outputs(model)[0])
    # weights saved without the statistics (or for the plain head) do not load into a normed head
    save_file({k: v for k, v in tensors.items() if "norm" not in k}, str(directory / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="missing.*running_mean"):
        load_model_dir(directory)


def test_round_trip_ctc_bilstm_and_backbone_override(tmp_path):
    """A CTC/BiLSTM head, and loading onto the same weights found at another path."""
    head = HeadConfig("ctc", 7, kind="bilstm", hidden=16)
    model = build_model(fresh_encoder("tiny-wavlm"), Placement.uniform(["sequential", "parallel", "lora"], 4), head)
    perturb(model)
    model.save(tmp_path / "ctc")
    local = tmp_path / "wavlm-copy"
    build_tiny_model("wavlm").save_pretrained(str(local))
    for loaded in (load_model_dir(tmp_path / "ctc"), load_model_dir(tmp_path / "ctc", backbone=str(local))):
        assert loaded.head_config == head
        out, _, _ = _outputs(model)
        out2, _, _ = _outputs(loaded)
        assert out.shape == (2, 24, 7)
        torch.testing.assert_close(out, out2, atol=1e-6, rtol=0)


# -- tampered directories -----------------------------------------------------------------------------


def test_tampered_missing_tensor(tmp_path):
    _, directory = _saved(tmp_path)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    dropped = sorted(k for k in tensors if "lora_B" in k)[0]
    del tensors[dropped]
    save_file(tensors, str(directory / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"missing \[.*lora_B") as err:
        load_model_dir(directory)
    assert dropped in str(err.value) and WEIGHTS_FILE in str(err.value)


def test_tampered_extra_tensor(tmp_path):
    _, directory = _saved(tmp_path)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    tensors["encoder.model.encoder.layers.0.pefttune.intruder"] = torch.zeros(3)
    save_file(tensors, str(directory / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"unexpected \[.*intruder"):
        load_model_dir(directory)


def test_tampered_wrong_shape(tmp_path):
    _, directory = _saved(tmp_path)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    name = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    save_file(tensors, str(directory / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="has shape") as err:
        load_model_dir(directory)
    assert name in str(err.value)


def test_tampered_placement_changes_shapes(tmp_path):
    """A placement edited after saving (rank 8 -> 4) no longer fits the weights."""
    _, directory = _saved(tmp_path)
    data = json.loads((directory / PLACEMENT_FILE).read_text())
    for layer in data["layers"]:
        for entry in layer:
            if entry["method"] == "lora":
                entry["rank"] = 4
    (directory / PLACEMENT_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="has shape"):
        load_model_dir(directory)
    data["layers"][1][1]["rank"] = -4
    (directory / PLACEMENT_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"placement.json: placement\.layers\[1\]\[1\]\.lora\.rank"):
        load_model_dir(directory)


def test_other_backbone_hash_is_refused(tmp_path):
    model, directory = _saved(tmp_path)
    description = json.loads((directory / MODEL_FILE).read_text())
    # the same architecture, other weights: recorded reference changed to another backbone
    description["backbone"] = "tiny-wav2vec2"
    (directory / MODEL_FILE).write_text(json.dumps(description))
    with pytest.raises(ValueError, match="does not match the recorded hash"):
        load_model_dir(directory)
    # an explicit backbone override with other weights (same shapes)
    other = SpeechEncoder(build_tiny_model("hubert", seed=5), name="tiny-hubert")
    with pytest.raises(ValueError, match="does not match the recorded hash"):
        load_model_dir(directory, backbone=other)
    # with the check off it loads (onto the wrong weights), and the outputs differ
    loaded = load_model_dir(directory, backbone=SpeechEncoder(build_tiny_model("hubert", seed=5)), check_hash=False)
    assert not torch.equal(_outputs(loaded)[0], _outputs(model)[0])
    # a tampered hash with the right backbone is refused too
    description["backbone"] = "tiny-hubert"
    description["backbone_hash"] = "0" * 64
    (directory / MODEL_FILE).write_text(json.dumps(description))
    with pytest.raises(ValueError, match="does not match the recorded hash"):
        load_model_dir(directory)


@pytest.mark.parametrize("missing", [WEIGHTS_FILE, PLACEMENT_FILE, MODEL_FILE])
def test_missing_file_is_named(tmp_path, missing):
    _, directory = _saved(tmp_path)
    (directory / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing {missing}"):
        load_model_dir(directory)


def test_load_weights_missing_file(tmp_path):
    model = make_model("tiny-hubert", Placement.uniform("bitfit", 4))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.load_weights(tmp_path / "nope.safetensors")


# -- two-step forward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["tiny-hubert", "tiny-wavlm"])
def test_frozen_states_and_forward_from(backbone):
    placement = Placement.from_dict({"num_layers": 4, "layers": {"2": ["lora", "houlsby"], "3": "prefix"}})
    model = make_model(backbone, placement)
    perturb(model)
    model.eval()
    x, mask = audio_batch()
    with torch.no_grad():
        full, frames = model(x, mask)
    hidden0, frames0 = model.embed(x, mask)
    upto = placement.lowest_adapted_layer()
    states = model.frozen_states(hidden0, frames0, upto)
    assert len(states) == upto + 1 and not any(s.requires_grad for s in states)
    out = model.forward_from(states, frames0)
    torch.testing.assert_close(out, full, atol=1e-6, rtol=0)
    assert out.requires_grad  # the adapted layers and the head are in the graph
    out.sum().backward()
    assert all(p.grad is not None for p in model.trainable_named_parameters().values())
    with pytest.raises(ValueError, match="adapted"):
        model.frozen_states(hidden0, frames0, 3)
    assert len(model.frozen_states(hidden0, frames0, 0)) == 1


def test_count_parameters_parts():
    model = make_model("tiny-hubert", Placement.uniform("lora", 4, rank=2))
    counts = model.count_parameters()
    assert counts == {"peft": 4 * 2 * 2 * (64 + 64), "head": 5 + 64 * 3 + 3, "trainable": 4 * 2 * 2 * 128 + 200}
    ctc = build_model(fresh_encoder("tiny-hubert"), Placement.uniform("none", 4), HeadConfig("ctc", 6, "bilstm", 8))
    lstm = 2 * (4 * 8 * (64 + 8) + 2 * 4 * 8)
    assert ctc.count_parameters() == {"peft": 0, "head": 5 + lstm + 16 * 6 + 6, "trainable": 5 + lstm + 16 * 6 + 6}
