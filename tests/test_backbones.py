"""Frozen backbones: loading (built-in, local dir, errors), equivalence with transformers,
two-step forward, frame masks and content hashes."""
from __future__ import annotations

import socket

import pytest
import torch

from helpers import BACKBONES, FAMILY, SHORT, audio_batch, fresh_encoder, max_diff_valid, transformers_states
from pefttune import backbones
from pefttune.backbones import (
    _MODEL_CLASSES,
    BackboneInfo,
    SpeechEncoder,
    build_tiny_model,
    family_of,
    load_backbone,
    tiny_config,
)
from pefttune.placement import Placement, apply_placement


@pytest.fixture
def offline(monkeypatch):
    """No network at all: any connection attempt fails, and the HF hub is in offline mode."""
    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# -- built-in tiny backbones ----------------------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
def test_tiny_backbone_shape_frozen_and_deterministic(backbone):
    state = torch.random.get_rng_state()
    a, b = load_backbone(backbone), load_backbone(backbone)
    assert torch.equal(state, torch.random.get_rng_state()), "building a tiny backbone must not touch the global RNG"
    assert a.info == BackboneInfo(backbone, FAMILY[backbone], 4, 64, 128, 4)
    assert a.family == FAMILY[backbone] and a.num_layers == 4 and a.name == backbone
    assert all(not p.requires_grad for p in a.parameters())
    assert not a.model.training
    for (name, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), name
    assert a.content_hash() == b.content_hash()
    other = SpeechEncoder(build_tiny_model(FAMILY[backbone], seed=99), name=backbone)
    assert other.content_hash() != a.content_hash()


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("garbage", [False, True], ids=["zero-pad", "garbage-pad"])
def test_hidden_states_match_transformers(backbone, garbage):
    """pefttune's attention and two-step forward reproduce transformers on valid frames."""
    encoder = fresh_encoder(backbone)
    x, mask = audio_batch(garbage_padding=garbage)
    with torch.no_grad():
        states, frames = encoder(x, mask)
    reference = transformers_states(backbone)  # from the zero-padded batch
    assert len(states) == len(reference) == 5
    assert frames.shape == (2, 24) and frames.sum(1).tolist() == [24, 17]
    assert max_diff_valid(states, list(reference), frames) < 1e-5
    # and without an attention mask, on the unpadded first utterance
    with torch.no_grad():
        alone, alone_frames = encoder(x[:1])
        ref_alone = build_tiny_model(FAMILY[backbone]).eval()(x[:1], output_hidden_states=True).hidden_states
    assert alone_frames.all()
    assert max_diff_valid(alone, list(ref_alone), alone_frames) < 1e-5


@pytest.mark.parametrize("family", ["wav2vec2", "hubert", "wavlm"])
def test_stable_layer_norm_variant_matches_transformers(family):
    """Pre-LN encoders (the large checkpoints): no layer norm before the layers, the
    encoder's final layer norm on the last output (= transformers' last_hidden_state)."""
    config = tiny_config(family)
    config.do_stable_layer_norm = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        reference = _MODEL_CLASSES[family](config).eval()
        torch.manual_seed(3)
        encoder = SpeechEncoder(_MODEL_CLASSES[family](config), name="stable")
    assert encoder.stable_layer_norm
    x, mask = audio_batch()
    with torch.no_grad():
        states, frames = encoder(x, mask)
        out = reference(x, attention_mask=mask, output_hidden_states=True)
    # transformers 5 records the last layer's output before the final norm in hidden_states
    assert max_diff_valid(states[:-1], list(out.hidden_states[:-1]), frames) < 1e-5
    assert max_diff_valid(states[-1:], [out.last_hidden_state], frames) < 1e-5
    # stopping early does not apply the final norm
    hidden0, frames = encoder.embed(x, mask)
    partial = encoder.run_layers(hidden0, frames, stop=2)
    assert max_diff_valid(partial, list(out.hidden_states[1:3]), frames) < 1e-5


@pytest.mark.parametrize("backbone", BACKBONES)
def test_run_layers_in_pieces(backbone):
    """embed + run_layers(start, stop) compose: layers 0..1 then 2..3 equal the full run."""
    encoder = fresh_encoder(backbone)
    x, mask = audio_batch()
    with torch.no_grad():
        full, frames = encoder(x, mask)
        hidden0, frames2 = encoder.embed(x, mask)
        first = encoder.run_layers(hidden0, frames2, start=0, stop=2)
        rest = encoder.run_layers(first[-1], frames2, start=2)
    assert torch.equal(frames, frames2)
    assert len(first) == 2 and len(rest) == 2
    for a, b in zip(full, [hidden0, *first, *rest]):
        assert torch.equal(a, b)
    # a custom layer function replaces run_layer
    calls = []

    def layer_fn(index, hidden, mask_, bias):
        calls.append((index, bias is not None))
        return encoder.run_layer(index, hidden, mask_, bias)

    with torch.no_grad():
        custom = encoder.run_layers(first[0], frames2, start=1, layer_fn=layer_fn)
    assert [i for i, _ in calls] == [1, 2, 3]
    assert all(has_bias == (FAMILY[backbone] == "wavlm") for _, has_bias in calls)
    assert torch.equal(custom[-1], full[-1])


def test_embed_is_gradient_free():
    encoder = fresh_encoder("tiny-hubert")
    apply_placement(encoder, Placement.uniform("lora", 4))
    x, mask = audio_batch()
    x.requires_grad_(True)
    hidden0, frames = encoder.embed(x, mask)
    assert not hidden0.requires_grad and frames.dtype == torch.bool
    states = encoder.run_layers(hidden0, frames)
    assert states[-1].requires_grad


def test_frame_lengths_and_mask():
    encoder = fresh_encoder("tiny-wav2vec2")
    lengths = encoder.frame_lengths(torch.tensor([16_000, 8_000, SHORT, 400, 720]))
    assert lengths.tolist() == [49, 24, 17, 1, 2]  # 20 ms frames (stride 320, receptive field 400)
    mask = encoder.frame_mask(torch.tensor([[1] * 8_000, [1] * SHORT + [0] * (8_000 - SHORT)]), 24, 2)
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [24, 17]
    assert mask[1, :17].all() and not mask[1, 17:].any()
    assert encoder.frame_mask(None, 7, 3).shape == (3, 7)


# -- content hash ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
def test_content_hash_ignores_peft_and_sees_weights(backbone):
    encoder = fresh_encoder(backbone)
    bare = encoder.content_hash()
    placement = Placement.from_dict(
        {"num_layers": 4, "layers": [["lora", "bitfit"], ["ia3", "houlsby"], ["prefix", "adapterbias"], ["parallel", "sequential"]]}
    )
    apply_placement(encoder, placement)
    assert encoder.content_hash() == bare
    with torch.no_grad():
        encoder.layers[1].attention.k_proj.base_layer.weight[0, 0] += 1e-3
    assert encoder.content_hash() != bare


# -- local directories ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
def test_load_local_save_pretrained_dir_offline(backbone, tmp_path, offline):
    directory = tmp_path / FAMILY[backbone]
    build_tiny_model(FAMILY[backbone]).save_pretrained(str(directory))
    local = load_backbone(directory)
    builtin = fresh_encoder(backbone)
    assert local.family == FAMILY[backbone]
    assert local.name == str(directory.resolve())
    assert local.info == BackboneInfo(local.name, FAMILY[backbone], 4, 64, 128, 4)
    assert all(not p.requires_grad for p in local.parameters())
    x, mask = audio_batch(garbage_padding=True)
    with torch.no_grad():
        a, frames_a = local(x, mask)
        b, frames_b = builtin(x, mask)
    assert torch.equal(frames_a, frames_b)
    for s, t in zip(a, b):
        torch.testing.assert_close(s, t, atol=1e-6, rtol=0)
    # the same weights are the same backbone, whatever path or name they were loaded by
    assert local.content_hash() == builtin.content_hash()
    # a str path works as well as a Path
    assert load_backbone(str(directory)).content_hash() == builtin.content_hash()


def test_missing_local_path_errors_clearly(tmp_path, offline, monkeypatch):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(missing)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone("./no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_backbone(tmp_path / "empty")
    # neither built-in, nor local, nor cached on the hub: a ValueError that says so
    with pytest.raises(ValueError, match="neither a built-in backbone"):
        load_backbone("nobody/not-a-speech-model")


def test_missing_shipped_backbone_errors_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "shipped_dir", lambda name: tmp_path / name)
    with pytest.raises(FileNotFoundError, match="shipped weights for 'tiny-hubert-ssl' are missing"):
        load_backbone("tiny-hubert-ssl")


def test_unsupported_configs_are_rejected():
    from transformers import BertConfig

    with pytest.raises(ValueError, match="not a supported speech SSL family"):
        family_of(BertConfig())
    with pytest.raises(ValueError, match="family"):
        tiny_config("whisper")
    with pytest.raises(ValueError, match="divisible"):
        tiny_config("hubert", hidden_size=30, num_heads=4)
