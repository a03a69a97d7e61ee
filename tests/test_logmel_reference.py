"""The `log-mel` reference: the same head on log-mel filterbank features, no SSL encoder.

It is one more backbone to the model, the trainable, the frozen cache and saved models:
zero layers, the empty placement, the head's parameters only.
"""
from __future__ import annotations

import pytest
import torch

from pefttune import backbones
from pefttune.backbones import LOG_MEL, LogMelConfig, LogMelEncoder, backbone_info, load_backbone
from pefttune.config import parse_config
from pefttune.data import loaders
from pefttune.heads import HeadConfig
from pefttune.log_mel import receptive_field
from pefttune.model import build_model, load_model_dir
from pefttune.placement import Placement
from pefttune.schema import CheckpointState
from pefttune.trainables import checkpoint as ckpt
from pefttune.trainables import setup as trial_setup
from pefttune.trainables.discrete import trial_backbone
from pefttune.training import evaluate, fit, frozen_step, setup_optimizer, setup_scheduler
from test_search_fixtures import search_config, write_tone_manifest

EMPTY = {"num_layers": 0, "layers": []}


def _padded_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 8000, generator=g)
    lengths = torch.tensor([8000, 5000, 3300])
    mask = (torch.arange(8000)[None, :] < lengths[:, None]).long()
    return x * mask, mask, lengths


def test_info_matches_the_loaded_encoder():
    encoder = load_backbone(LOG_MEL)
    info = backbone_info(LOG_MEL)
    assert isinstance(encoder, LogMelEncoder) and isinstance(encoder, backbones.SpeechEncoder)
    assert encoder.info == info
    assert (info.name, info.family, info.num_layers, info.hidden_size) == (LOG_MEL, "log-mel", 0, 40)
    assert encoder.num_layers == 0 and encoder.config.hidden_size == 40 and len(encoder.layers) == 0
    assert list(encoder.parameters()) == []  # no weights of its own, trainable or frozen


def test_frames_at_20_ms_aligned_with_the_tiny_backbones():
    encoder = load_backbone(LOG_MEL)
    settings = encoder.config
    assert (settings.window, settings.hop) == receptive_field((10, 3, 3, 3, 2), (5, 4, 4, 2, 2)) == (380, 320)
    tiny = load_backbone("tiny-hubert")
    lengths = torch.arange(380, 40_000, 97)
    torch.testing.assert_close(encoder.frame_lengths(lengths), tiny.frame_lengths(lengths))
    assert encoder.frame_lengths(torch.tensor([0, 379, 380, 16_000])).tolist() == [0, 0, 1, 49]  # 49 frames/s

    hidden, mask = encoder.embed(torch.randn(2, 16_000))
    assert hidden.shape == (2, 49, 40) and mask.shape == (2, 49) and bool(mask.all())
    states, mask = encoder(torch.randn(2, 16_000))
    assert len(states) == 1 and states[0].shape == (2, 49, 40)  # the features are the only hidden state


def test_padded_batches_mask_frames_and_match_each_utterance_alone():
    encoder = load_backbone(LOG_MEL)
    x, mask, lengths = _padded_batch()
    hidden, frames = encoder.embed(x, mask)
    expected = encoder.frame_lengths(lengths)
    assert frames.sum(1).tolist() == expected.tolist() == [24, 15, 10]
    assert bool((hidden[~frames] == 0).all())  # padded frames are zero
    for b, n in enumerate(lengths.tolist()):
        alone, alone_mask = encoder.embed(x[b : b + 1, :n])
        assert alone.shape[1] == expected[b]
        torch.testing.assert_close(alone[0], hidden[b, : expected[b]], atol=1e-5, rtol=1e-5)
        valid = hidden[b, : expected[b]]  # normalised per utterance over its valid frames and bands
        assert abs(float(valid.mean())) < 1e-4 and abs(float(valid.std(unbiased=False)) - 1) < 1e-3
    # shorter than one window: no valid frame, no error
    short, short_mask = encoder.embed(torch.randn(1, 200))
    assert short_mask.shape[1] == 1 and not bool(short_mask.any()) and bool((short == 0).all())


def test_content_hash_is_stable_and_names_the_settings():
    first, second = LogMelEncoder(), load_backbone(LOG_MEL)
    assert first.content_hash() == second.content_hash()
    assert LogMelEncoder(LogMelConfig(num_mels=20)).content_hash() != first.content_hash()
    assert first.content_hash() != load_backbone("tiny-hubert").content_hash()


def test_the_empty_placement_is_the_only_one():
    placement = Placement.from_dict(EMPTY)
    assert placement.num_layers == 0 and placement.to_dict() == EMPTY
    assert Placement.from_dict(placement.to_dict()) == placement and placement.short() == ""
    placement.validate_for(backbone_info(LOG_MEL))
    assert placement.trainable_parameters(backbone_info(LOG_MEL)) == 0
    with pytest.raises(ValueError, match="placement.num_layers"):
        placement.validate_for(backbone_info("tiny-hubert"))
    with pytest.raises(ValueError, match="num_layers is 0"):
        Placement.from_dict({"num_layers": 0, "layers": ["lora"]})
    with pytest.raises(ValueError, match="non-empty"):  # an empty list still needs num_layers: 0
        Placement.from_dict({"layers": []})
    with pytest.raises(ValueError, match="placement.num_layers"):
        build_model(LOG_MEL, Placement.uniform("lora", 4), HeadConfig("classification", 2))


def test_trial_backbone_override():
    experiment = parse_config({"backbone": "tiny-hubert"})
    assert trial_backbone({"backbone": LOG_MEL, "placement": EMPTY}, experiment) == LOG_MEL
    assert trial_backbone({"placement": EMPTY}, experiment) == "tiny-hubert"
    assert trial_backbone({"backbone": None}, experiment) == "tiny-hubert"


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    manifest = write_tone_manifest(tmp_path_factory.mktemp("tones"), classes=2,
                                   per_split={"train": 8, "dev": 4, "test": 4})
    config = parse_config(search_config(manifest, tmp_path_factory.mktemp("results"),
                                        data={"batch_size": 4},
                                        train={"epochs": 4, "lr": 0.05, "max_steps_per_epoch": None,
                                               "warmup_ratio": 0.0, "frozen_cache": "memory"}))
    return config, loaders.prepare_data(config)


def test_a_reference_trial_trains_the_head_only_and_beats_chance(tones, tmp_path):
    """The trainable's steps for a trial config with ``backbone: log-mel`` (as train_fn runs them)."""
    config, ref = tones
    trial = {"backbone": LOG_MEL, "placement": EMPTY, "kind": "log-mel", "config_id": "log-mel"}
    backbone = trial_backbone(trial, config)
    assert config.backbone == "tiny-hubert" and backbone == LOG_MEL
    info = backbone_info(backbone)
    placement = Placement.from_dict(trial["placement"])
    placement.validate_for(info)
    head = ref.head_config(config)
    train = trial_setup.train_config(config)
    torch.manual_seed(train.seed)
    data = loaders.load_data(config, ref, seed=train.seed)
    model = build_model(backbone, placement, head)

    # trainable parameters: the head's, nothing else
    counts = model.count_parameters()
    assert counts["peft"] == 0 and counts["trainable"] == counts["head"] == trial_setup.head_parameters(info, head)
    assert all(name.startswith("head.") for name in model.trainable_named_parameters())
    assert sum(p.numel() for p in model.trainable_named_parameters().values()) == counts["trainable"]

    # the frozen cache: one state per utterance (the features), keyed apart from the SSL backbone's
    cache = trial_setup.frozen_cache(config, ref, model)
    ssl = build_model("tiny-hubert", Placement.from_dict({"num_layers": 4, "layers": ["none"] * 4}), head)
    assert cache.key != trial_setup.frozen_cache(config, ref, ssl).key
    assert cache.key == trial_setup.frozen_cache(config, ref, build_model(LOG_MEL, placement, head)).key
    batch = next(iter(data.dev))
    states, mask = frozen_step(model, batch)
    assert len(states) == 1 and states[0].shape[-1] == 40

    before = evaluate(model, data.test, train)
    optimizer = setup_optimizer(model, train)
    assert [g["name"] for g in optimizer.param_groups] == ["head"]
    scheduler = setup_scheduler(optimizer, train.epochs * data.steps_per_epoch(train.max_steps_per_epoch), 0.0)
    results = fit(model, data.train, data.dev, train, optimizer=optimizer, scheduler=scheduler, cache=cache)
    assert cache.hits > 0  # epochs after the first read the features from the cache
    assert results[-1].train_loss < results[0].train_loss
    after = evaluate(model, data.test, train, cache=cache)
    assert after.score >= 0.875 > 0.5 and after.loss < before.loss  # two classes: chance is 0.5
    assert results[-1].dev.score >= 0.875

    # the same checkpoint / prediction format as every other trial
    predictions = ckpt.final_evaluation(model, ckpt.trainable_state(model), {"dev": data.dev, "test": data.test},
                                        train, cache=cache)
    state = CheckpointState(epoch=train.epochs, best_score=after.score, best_epoch=train.epochs, finished=True)
    ckpt.write_checkpoint(tmp_path, model, state, best_weights=ckpt.trainable_state(model), predictions=predictions)
    stored = ckpt.checkpoint_predictions(tmp_path, "test")
    assert set(stored) == {"index", "probs", "label", "pred"} and len(stored["pred"]) == 8
    reloaded = load_model_dir(tmp_path / "best")
    assert reloaded.encoder.name == LOG_MEL and reloaded.placement == placement
    x, sample_mask, _ = _padded_batch(1)
    model.eval()
    torch.testing.assert_close(reloaded(x, sample_mask)[0], model(x, sample_mask)[0])
