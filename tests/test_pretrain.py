"""Self-supervised pretraining (pefttune.demo.pretraining) and the shipped tiny-hubert-ssl backbone."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from pefttune.backbones import build_tiny_model, load_backbone, shipped_dir
from pefttune.cli import main as cli_main
from pefttune.data.layouts import KS_COMMANDS, KS_UNKNOWN_WORDS
from pefttune.demo.pretraining import (
    SHIPPED_SHA256,
    CorpusRecipe,
    PretrainConfig,
    build_corpus,
    check_alignment,
    file_sha256,
    fit_kmeans,
    pretrain,
    span_mask,
)
from pefttune.demo.pretraining.corpus import check_excluded
from pefttune.demo.pretraining.train import load_schedule
from pefttune.log_mel import LogMel

KS_WORDS = set(KS_COMMANDS) | set(KS_UNKNOWN_WORDS)
TINY_RECIPE = dict(utterances=40, seconds=1.0, seed=3)
TINY_MODEL = dict(hidden_size=32, num_layers=2, intermediate_size=64, num_heads=4, num_clusters=12,
                  batch_size=8, eval_utterances=8, lr=2e-3, warmup_steps=5, log_every_s=1e9)


# -- targets and masking ------------------------------------------------------------------
def test_log_mel_frames_match_encoder_frames_exactly():
    model = build_tiny_model("hubert", hidden_size=32, num_layers=1)
    log_mel = LogMel.for_config(model.config)
    assert (log_mel.window, log_mel.hop) == (380, 320)  # receptive field, 20 ms stride
    check_alignment(model, log_mel)  # lengths 380..40000 (step 37): same frame counts
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in (380, 699, 700, 16_000, 32_000):
            wav = torch.randn(1, n, generator=gen)
            assert model.feature_extractor(wav).shape[-1] == log_mel(wav).shape[1] == log_mel.frames(n)
        # frame t covers exactly samples [320 t, 320 t + 380), in both the log-mel and the CNN
        wav = torch.randn(1, 16_000, generator=gen)
        t, start, end = 10, 3200, 3580
        assert torch.allclose(log_mel(wav)[0, t], log_mel(wav[:, start:end])[0, 0], atol=1e-4)
        cnn = model.feature_extractor(wav)[0, :, t]
        outside = wav.clone()
        outside[:, :start] += 1.0
        outside[:, end:] += 1.0
        assert torch.allclose(model.feature_extractor(outside)[0, :, t], cnn, atol=1e-5)
        for edge in (start, end - 1):
            inside = wav.clone()
            inside[:, edge] += 1.0
            assert not torch.allclose(model.feature_extractor(inside)[0, :, t], cnn, atol=1e-5)
        for near_edge in (start + 40, end - 40):  # the Hann taper is ~0 at the very edges
            inside = wav.clone()
            inside[:, near_edge] += 1.0
            assert not torch.allclose(log_mel(inside)[0, t], log_mel(wav)[0, t], atol=1e-4)
            assert torch.allclose(log_mel(inside)[0, t - 2], log_mel(wav)[0, t - 2])
    with pytest.raises(ValueError, match="receptive field"):
        check_alignment(model, LogMel(window=400, hop=320))


def test_span_mask_covers_expected_fraction_and_is_seeded():
    gen = torch.Generator().manual_seed(0)
    mask = span_mask(64, 99, 0.08, 10, gen)
    assert mask.shape == (64, 99) and mask.any(1).all()
    assert 0.45 < mask.float().mean() < 0.65  # about 1 - 0.92 ** 10 = 0.57
    again = span_mask(64, 99, 0.08, 10, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    rare = span_mask(16, 20, 1e-6, 5, gen)  # no span drawn: one is forced per row
    assert (rare.sum(1) == 5).all()


def test_kmeans_recovers_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.3 * torch.randn(200, 2, generator=gen) for c in centers])
    km = fit_kmeans(points, 3, seed=1)
    labels = km.assign(points)
    for block in labels.view(3, 200):
        assert (block == block[0]).all()
    assert len(set(labels.view(3, 200)[:, 0].tolist())) == 3
    assert torch.equal(fit_kmeans(points, 3, seed=1).centroids, km.centroids)
    with pytest.raises(ValueError, match="fewer than num_clusters"):
        fit_kmeans(points[:2], 3, seed=0)


# -- corpus ----------------------------------------------------------------------------------
def test_corpus_excludes_keyword_words_and_is_reproducible():
    recipe = CorpusRecipe(utterances=6, seconds=1.0, seed=5)
    assert KS_WORDS <= set(recipe.excluded_words)
    assert {"to", "know", "for"} <= set(recipe.excluded_words)  # homophones of two, no, four
    assert not {w.lower() for w in recipe.vocabulary()} & set(recipe.excluded_words)
    first, second = build_corpus(recipe), build_corpus(recipe)
    assert first.waveforms.shape == (6, 16_000) and first.waveforms.dtype == np.float32
    assert np.array_equal(first.waveforms, second.waveforms) and first.texts == second.texts
    assert np.abs(first.waveforms).max() > 0.01
    for text in first.texts:
        assert not set(text.split()) & KS_WORDS
    with pytest.raises(ValueError, match="excluded word"):
        check_excluded(["garden yes"], recipe.excluded_words)


def test_augmented_corpus_still_excludes_keyword_words_and_is_reproducible():
    """Speed perturbation, reverberation, other noises and every voice variant change the audio,
    never the words: no keyword-spotting word (or homophone) is ever drawn."""
    from pefttune.demo.pretraining.corpus import all_variants

    recipe = CorpusRecipe(utterances=300, seconds=1.0, seed=11, variants=all_variants(), speed=(0.85, 1.15),
                          reverb_prob=0.5, noise_kinds=("white", "pink", "brown", "hum"), snr_db=(0.0, 30.0))
    excluded = set(recipe.excluded_words)
    assert KS_WORDS | {"to", "too", "for", "know", "write", "won", "ate"} <= excluded
    texts = [r.text for r in __import__("pefttune.demo.pretraining.corpus", fromlist=["_draw_requests"])._draw_requests(
        recipe, np.random.default_rng(recipe.seed))]
    assert len(texts) == 300
    for text in texts:
        assert not {w.lower() for w in text.split()} & excluded, text
    small = dataclasses.replace(recipe, utterances=8)
    first, second = build_corpus(small), build_corpus(small)
    assert np.array_equal(first.waveforms, second.waveforms)
    plain = build_corpus(dataclasses.replace(small, speed=(1.0, 1.0), reverb_prob=0.0))
    assert first.texts == plain.texts and not np.array_equal(first.waveforms, plain.waveforms)
    for text in first.texts:
        assert not {w.lower() for w in text.split()} & excluded
    with pytest.raises(ValueError, match="corpus.noise_kinds"):
        CorpusRecipe(noise_kinds=("thunder",))
    with pytest.raises(ValueError, match="corpus.speed"):
        CorpusRecipe(speed=(1.2, 0.9))


def test_mfcc39_targets_are_frame_aligned():
    from pefttune.demo.pretraining.targets import MFCC39, deltas, target_features

    model = build_tiny_model("hubert", hidden_size=32, num_layers=1)
    mfcc = target_features("mfcc39", model.config)
    assert isinstance(mfcc, MFCC39) and (mfcc.window, mfcc.hop, mfcc.dims) == (380, 320, 39)
    wav = torch.randn(2, 16_000, generator=torch.Generator().manual_seed(0))
    out = mfcc(wav)
    assert out.shape == (2, model.feature_extractor(wav).shape[-1], 39) and torch.isfinite(out).all()
    ramp = torch.arange(10.0)[None, :, None].expand(1, 10, 3)
    assert torch.allclose(deltas(ramp)[0, 2:-2], torch.ones(6, 3))  # slope 1 inside, edges replicated
    with pytest.raises(ValueError, match="targets"):
        target_features("plp", model.config)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="budget"):
        PretrainConfig()
    with pytest.raises(ValueError, match="objective"):
        PretrainConfig(objective="bert", steps=1)
    with pytest.raises(ValueError, match="corpus.seconds"):
        CorpusRecipe(seconds=0.1)
    with pytest.raises(ValueError, match="eval_utterances"):
        PretrainConfig(steps=1, eval_utterances=10, corpus=CorpusRecipe(utterances=10))


# -- a short run -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_corpus():
    return build_corpus(CorpusRecipe(**TINY_RECIPE))


def test_short_pretraining_lowers_masked_loss_and_writes_a_loadable_backbone(tmp_path, tiny_corpus):
    config = PretrainConfig(steps=40, seed=7, corpus=tiny_corpus.recipe, **TINY_MODEL)
    result = pretrain(config, tmp_path / "ssl", corpus=tiny_corpus, log=lambda line: None)
    prov = json.loads((tmp_path / "ssl" / "provenance.json").read_text())
    clusters = TINY_MODEL["num_clusters"]
    # held-out masked loss: from worse than uniform guessing (random init) to clearly better
    assert prov["initial"]["heldout_loss"] > math.log(clusters) > prov["final"]["heldout_loss"] + 0.1
    assert prov["final"]["heldout_loss"] < prov["initial"]["heldout_loss"] - 0.3
    assert prov["final"]["train_masked_accuracy"] > 1.5 / clusters
    assert prov["final"]["train_loss"] == result.final_loss
    assert prov["steps"]["completed"] == 40 and prov["steps"]["schedule"] == "by steps"
    assert prov["seed"] == 7 and prov["command"].startswith("pefttune backbone pretrain --out ")
    assert "--steps 40" in prov["command"] and "--seed 7" in prov["command"] and "--hidden-size 32" in prov["command"]
    assert KS_WORDS <= set(prov["corpus"]["excluded_words"])
    assert prov["wall_time_s"]["total_s"] > 0
    assert prov["versions"]["torch"] == torch.__version__ and "pefttune" in prov["versions"]
    assert prov["weights_sha256"] == file_sha256(tmp_path / "ssl" / "model.safetensors")

    encoder = load_backbone(tmp_path / "ssl")
    assert encoder.family == "hubert" and encoder.num_layers == 2 and encoder.config.hidden_size == 32
    states, mask = encoder(torch.randn(2, 16_000))
    assert len(states) == 3 and states[-1].shape == (2, 49, 32) and mask.all()


def test_time_bounded_run_replays_bit_for_bit(tmp_path, tiny_corpus):
    timed = PretrainConfig(minutes=0.04, seed=1, corpus=tiny_corpus.recipe, **TINY_MODEL)
    first = pretrain(timed, tmp_path / "timed", corpus=tiny_corpus, log=lambda line: None)
    assert first.provenance["steps"]["schedule"] == "by time"
    schedule = load_schedule(tmp_path / "timed")
    assert len(schedule) == first.provenance["steps"]["completed"] >= 1
    replay = dataclasses.replace(timed, minutes=None, schedule=schedule)
    second = pretrain(replay, tmp_path / "replay", corpus=tiny_corpus, log=lambda line: None)
    assert second.provenance["steps"]["schedule"] == "replayed"
    assert second.provenance["weights_sha256"] == first.provenance["weights_sha256"]
    assert "--replay-schedule" in second.provenance["command"]
    with pytest.raises(ValueError, match="schedule"):
        dataclasses.replace(replay, schedule=(0.5, 0.2))


def test_mfcc_codebooks_iteration2_and_prefix_check(tmp_path, tiny_corpus):
    """Two iteration-1 codebooks, a switch to iteration 2; a run stopped early with --stop-after
    matches the full run's recorded weight hash at that step bit for bit."""
    extra = dict(targets=("mfcc39", "logmel"), iter2_at=0.5, iter2_layer=1, iter2_clusters=10, hash_every=5,
                 mask_prob=0.2, mask_length=4)
    config = PretrainConfig(steps=20, seed=2, corpus=tiny_corpus.recipe, **TINY_MODEL, **extra)
    full = pretrain(config, tmp_path / "full", corpus=tiny_corpus, log=lambda line: None)
    prov = full.provenance
    assert [b["features"].split()[0] for b in prov["targets"]["codebooks"]] == ["mfcc39", "logmel", "layer"]
    assert prov["steps"]["iteration2_from_step"] == 10 and prov["targets"]["codebooks"][2]["from_step"] == 10
    assert sorted(map(int, prov["steps"]["state_sha256"])) == [5, 10, 15, 20]
    for flag in ("--targets mfcc39,logmel", "--iter2-at 0.5", "--iter2-layer 1", "--iter2-clusters 10",
                 "--mask-prob 0.2", "--mask-length 4"):
        assert flag in prov["command"]
    prefix = pretrain(dataclasses.replace(config, stop_after=15), tmp_path / "prefix", corpus=tiny_corpus,
                      log=lambda line: None)
    assert prefix.provenance["steps"]["completed"] == 15 and "--stop-after 15" in prefix.provenance["command"]
    assert prefix.provenance["steps"]["state_sha256"]["15"] == prov["steps"]["state_sha256"]["15"]
    assert prefix.provenance["steps"]["state_sha256"]["15"] != prov["steps"]["state_sha256"]["20"]


def test_wav2vec2_objective_runs_and_saves_a_wav2vec2_encoder(tmp_path, tiny_corpus):
    config = PretrainConfig(objective="wav2vec2", steps=4, corpus=tiny_corpus.recipe, **TINY_MODEL)
    result = pretrain(config, tmp_path / "w2v", corpus=tiny_corpus, log=lambda line: None)
    assert 0.0 <= result.final_accuracy <= 1.0 and np.isfinite(result.final_loss)
    assert load_backbone(tmp_path / "w2v").family == "wav2vec2"


def test_cli_pretrain_time_bounded_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["backbone", "pretrain", "--out", str(out), "--minutes", "0.05", "--utterances", "20",
            "--seconds", "1", "--hidden-size", "16", "--layers", "1", "--intermediate-size", "32",
            "--clusters", "8", "--eval-utterances", "4", "--log-every", "1000"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "[pretrain] finished" in printed and "command: pefttune backbone pretrain" in printed
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["command"].startswith("pefttune backbone pretrain --out") and "--minutes 0.05" in prov["command"]
    assert prov["steps"]["completed"] >= 1 and prov["steps"]["schedule"] == "by time"
    assert len(load_schedule(out)) == prov["steps"]["completed"]
    assert prov["wall_time_s"]["train_s"] < 0.05 * 60 + 5
    assert cli_main(args) == 2  # --out not empty
    assert "exists and is not empty" in capsys.readouterr().err


# -- the shipped backbone ------------------------------------------------------------------------
def test_shipped_backbone_shapes_hash_and_provenance():
    directory = shipped_dir("tiny-hubert-ssl")
    assert file_sha256(directory / "model.safetensors") == SHIPPED_SHA256["tiny-hubert-ssl"]
    prov = json.loads((directory / "provenance.json").read_text())
    assert prov["weights_sha256"] == SHIPPED_SHA256["tiny-hubert-ssl"]
    assert KS_WORDS <= set(prov["corpus"]["excluded_words"]) and prov["objective"] == "hubert"
    encoder = load_backbone("tiny-hubert-ssl")
    info = encoder.info
    assert (info.family, info.num_layers, info.hidden_size, info.intermediate_size, info.num_heads) == (
        "hubert", 4, 128, 256, 4
    )
    params = sum(p.numel() for p in encoder.parameters())
    assert params == prov["model"]["parameters"] and 750_000 < params < 850_000
    assert not any(p.requires_grad for p in encoder.parameters())
    assert (directory / "model.safetensors").stat().st_size < 4_000_000
    # the replay that reproduces the weights bit for bit: its schedule ships alongside, one entry a step
    schedule = load_schedule(directory / "schedule.json")
    assert len(schedule) == prov["steps"]["completed"] and list(schedule) == sorted(schedule)
    reproduce = prov["reproduce"]["command"]
    assert "--replay-schedule src/pefttune/assets/tiny-hubert-ssl/schedule.json" in reproduce
    assert "--minutes" not in reproduce and "--seed 0" in reproduce
    # every option that shaped the weights is spelled out in the replay command
    for flag in ("--targets mfcc39", "--unmasked-weight 1", "--mask-prob 0.08", "--mask-length 10", "--threads 1"):
        assert flag in reproduce and flag in prov["command"]
    assert prov["config"]["targets"] == ["mfcc39"] and prov["config"]["unmasked_weight"] == 1.0
    # the run's last recorded state hash is that of the shipped weights' run; what the replay verified
    completed = prov["steps"]["completed"]
    assert str(completed) in prov["steps"]["state_sha256"]
    # what the replays verified: the whole run, bit for bit (and, first, a prefix)
    full = prov["reproduce"]["verified_full"]
    assert full["steps"] == full["of_steps"] == completed and full["matches"] and full["state_sha256_all_match"]
    assert full["model_sha256"] == prov["weights_sha256"] == SHIPPED_SHA256["tiny-hubert-ssl"] and full["final_matches"]
    assert full["command"] == reproduce.replace("--out DIR", "--out /tmp/replay")
    assert full["model_sha256"] in prov["reproduce"]["verified"]
    checked = prov["reproduce"]["verified_prefix"]
    assert 1 <= checked["steps"] <= completed and checked["matches"] is True
    assert checked["state_sha256"] == prov["steps"]["state_sha256"][str(checked["steps"])]
    assert checked["command"] == reproduce + f" --stop-after {checked['steps']}"
    assert checked["state_sha256"] == prov["steps"]["state_sha256"]["200"]


def _pooled(encoder, wav: np.ndarray) -> torch.Tensor:
    from pefttune.data.dataset import normalize_waveform

    x = torch.from_numpy(normalize_waveform(wav))[None]
    with torch.no_grad():
        states, mask = encoder(x)
    return states[-1][0][mask[0]].mean(0)


def test_shipped_backbone_gives_word_dependent_embeddings():
    from pefttune.data.espeak import synthesize

    encoder = load_backbone("tiny-hubert-ssl")
    c = encoder.config
    random_init = _random_like(c)
    yes, house = synthesize("yes"), synthesize("house")
    a, a_again, b = _pooled(encoder, yes), _pooled(encoder, yes.copy()), _pooled(encoder, house)
    assert torch.allclose(a, a_again, atol=1e-5)
    relative = float((a - b).norm() / a.norm())
    assert relative > 0.3, f"pooled embeddings of 'yes' and 'house' differ by only {relative:.3f}"
    # ... and far more than through a random-init encoder of the same shape (shipped: 1.1 vs 0.4)
    ra, rb = _pooled(random_init, yes), _pooled(random_init, house)
    assert relative > 1.5 * float((ra - rb).norm() / ra.norm())


def _random_like(config):
    from pefttune.backbones import SpeechEncoder

    model = build_tiny_model("hubert", num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                             num_heads=config.num_attention_heads, intermediate_size=config.intermediate_size)
    return SpeechEncoder(model, name="random-init")
