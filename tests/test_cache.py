"""Frozen-prefix cache: exact losses with and without it, shared on disk, keyed by content."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from pefttune.frozen_cache import FrozenStateCache, cache_key
from pefttune.config import parse_config
from pefttune.data.manifest import read_manifest
from pefttune.heads import HeadConfig
from pefttune.model import build_model
from pefttune.placement import Placement
from pefttune.data import loaders
from pefttune.trainables import setup as trial_setup
from pefttune.training import TrainConfig, fit
from test_search_fixtures import search_config, write_tone_manifest


def _batches(n: int, seed: int, offset: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(8000) / 16000
    out = []
    for b in range(n):
        y = torch.randint(0, 2, (3,), generator=g)
        x = torch.stack([torch.sin(2 * torch.pi * (300 + 500 * v) * t) for v in y]) + 0.3 * torch.randn(3, 8000, generator=g)
        mask = torch.ones(3, 8000, dtype=torch.long)
        mask[0, 6000:] = 0  # one padded utterance per batch
        x[0, 6000:] = 0
        out.append({"input_values": x, "attention_mask": mask, "labels": y, "index": torch.arange(offset + 3 * b, offset + 3 * b + 3)})
    return out


def _train(placement: Placement, cache):
    torch.manual_seed(0)
    model = build_model("tiny-hubert", placement, HeadConfig("classification", 2))
    results = fit(model, _batches(4, 0, 0), _batches(1, 1, 100), TrainConfig(epochs=2, lr=3e-3), cache=cache)
    return [r.train_loss for r in results], [r.dev.loss for r in results]


def test_cached_training_gives_the_same_losses(tmp_path):
    placement = Placement.from_dict({"num_layers": 4, "layers": {"2": "lora", "3": "sequential"}})
    plain = _train(placement, None)
    cache = FrozenStateCache("test", tmp_path)
    cached = _train(placement, cache)
    for a, b in zip(plain, cached):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5), (a, b)
    # first epoch computed (train + dev), second epoch served from the cache
    assert cache.misses == 12 + 3 and cache.hits == 12 + 3
    # h_0..h_2 per utterance on disk: 3 states, frames, hidden 64
    stored = sorted(p.name for p in (tmp_path / "test").glob("*.npy"))
    assert len(stored) == 15
    arr = np.load(tmp_path / "test" / "0.npy", allow_pickle=False)
    assert arr.shape[0] == 3 and arr.shape[2] == 64
    assert arr.shape[1] < np.load(tmp_path / "test" / "1.npy").shape[1]  # the padded one is shorter


def test_disk_cache_is_shared_between_trials(tmp_path):
    placement = Placement.uniform("lora", 4)
    first = FrozenStateCache("shared", tmp_path)
    _train(placement, first)
    second = FrozenStateCache("shared", tmp_path)  # a new trial on the same node
    _train(placement, second)
    assert second.misses == 0 and second.hits > 0


def test_a_deeper_trial_recomputes_missing_states(tmp_path):
    cache = FrozenStateCache("k", tmp_path)
    _train(Placement.uniform("lora", 4), cache)  # stores h_0 only
    misses = cache.misses
    _train(Placement.from_dict({"num_layers": 4, "layers": {"3": "lora"}}), cache)  # needs h_0..h_3
    assert cache.misses > misses


def test_cache_key_changes_with_backbone_data_and_preprocessing(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,split,label\na.flac,train,yes\n")
    base = cache_key("hash-a", manifest, {"normalize": True})
    assert cache_key("hash-b", manifest, {"normalize": True}) != base
    assert cache_key("hash-a", manifest, {"normalize": False}) != base
    manifest.write_text("path,split,label\na.flac,train,no\n")
    assert cache_key("hash-a", manifest, {"normalize": True}) != base


def test_memory_cap_is_respected(tmp_path):
    cache = FrozenStateCache("cap", None, max_memory_bytes=1000)
    cache.store(0, torch.zeros(1, 10, 10))  # 400 bytes
    cache.store(1, torch.zeros(1, 10, 10))  # 800
    cache.store(2, torch.zeros(1, 10, 10))  # would exceed: not kept
    assert cache.memory_bytes == 800 and 2 not in cache.memory
    assert cache.lookup(2, 1) is None and cache.lookup(0, 1) is not None


NPY = 10 * 10 * 4 + 128  # one (1, 10, 10) float32 state as .npy, header included


def test_disk_cap_stops_writes_and_lookups_stay_exact(tmp_path, capsys):
    cache = FrozenStateCache("cap", tmp_path, max_memory_bytes=400, max_disk_bytes=NPY + 100)
    first, second, third = (torch.randn(1, 10, 10) for _ in range(3))
    cache.store(0, first)  # on disk and in memory
    cache.store(1, second)  # over the disk cap: memory only (the memory is full now)
    cache.store(2, third)  # neither: recomputed when needed
    assert sorted(p.name for p in (tmp_path / "cap").iterdir()) == ["0.npy"]
    assert cache.disk_bytes_written == NPY and cache.disk_skipped == 2
    out = capsys.readouterr().out
    assert out.count("disk cap") == 1 and "further states stay in memory or are recomputed" in out
    cache.memory.clear()
    cache.memory_bytes = 0
    cache.store(1, second)
    assert torch.equal(cache.lookup(1, 1), second)  # from memory
    assert torch.equal(cache.lookup(0, 1), first)  # from disk
    assert cache.lookup(2, 1) is None


def test_disk_cap_counts_the_files_of_other_keys(tmp_path):
    (tmp_path / "other").mkdir()
    np.save(tmp_path / "other" / "0.npy", np.zeros((1, 10, 10), np.float32))
    full = FrozenStateCache("mine", tmp_path, max_disk_bytes=2 * NPY - 1)
    assert full.disk_used_before == NPY
    full.store(0, torch.zeros(1, 10, 10))
    assert full.disk_skipped == 1 and not (tmp_path / "mine" / "0.npy").exists()
    roomy = FrozenStateCache("mine", tmp_path, max_disk_bytes=10 * NPY)
    for index in range(5):
        roomy.store(index, torch.zeros(1, 10, 10))
    roomy.store(0, torch.zeros(1, 10, 10))  # replacing a file adds nothing
    assert roomy.disk_skipped == 0 and len(list((tmp_path / "mine").glob("*.npy"))) == 5
    assert roomy.disk_bytes_written == 5 * NPY
    assert (tmp_path / "other" / "0.npy").exists()  # never deleted


def test_training_under_a_tiny_disk_cap_gives_the_same_losses(tmp_path):
    placement = Placement.from_dict({"num_layers": 4, "layers": {"2": "lora", "3": "sequential"}})
    plain = _train(placement, None)
    cache = FrozenStateCache("tiny", tmp_path, max_memory_bytes=1, max_disk_bytes=50_000)
    cached = _train(placement, cache)
    for a, b in zip(plain, cached):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5), (a, b)
    stored = list((tmp_path / "tiny").glob("*.npy"))
    assert 0 < len(stored) < 15 and cache.disk_skipped > 0
    assert sum(p.stat().st_size for p in stored) == cache.disk_bytes_written <= 50_000


@pytest.mark.parametrize("field", ["frozen_cache_disk_gb", "frozen_cache_memory_gb"])
@pytest.mark.parametrize("value", [0, -1])
def test_invalid_cache_caps_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"train.{field}: Input should be greater than 0"):
        parse_config({"train": {field: value}})


def test_frozen_cache_prints_the_size_for_the_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PEFTTUNE_CACHE", str(tmp_path / "cache"))
    manifest = write_tone_manifest(tmp_path / "tones", per_split={"train": 2, "dev": 1, "test": 1})
    config = parse_config(search_config(manifest, tmp_path / "results", train={"frozen_cache_disk_gb": 0.5}))
    model = build_model("tiny-hubert", Placement.from_dict({"num_layers": 4, "layers": {"2": "lora"}}),
                        HeadConfig("classification", 4))
    ref = loaders.DataRef(str(manifest), "classification", {"kind": "labels", "labels": []})
    cache = trial_setup.frozen_cache(config, ref, model)
    out = capsys.readouterr().out
    kib = read_manifest(manifest)["duration"].sum() * 49 * 3 * 64 * 4 / 2**10  # seconds x frames x h_0..h_2 x D x 4
    assert (f"3 hidden state(s) per utterance, about {kib:.0f} KiB for 16 utterances "
            "(memory cap 2.0 GiB, disk cap 0.5 GiB)\n") in out
    assert cache.max_disk_bytes == 2**29 and cache.root == tmp_path / "cache" / "frozen"
    # without durations: per second of audio; memory mode has no disk cap
    plain = tmp_path / "plain.csv"
    plain.write_text("path,split,label\na.flac,train,yes\n")
    config = parse_config(search_config(plain, tmp_path / "results", train={"frozen_cache": "memory"}))
    cache = trial_setup.frozen_cache(config, loaders.DataRef(str(plain), "classification", {}), model)
    assert "KiB per second of audio (memory cap 2.0 GiB)" in capsys.readouterr().out
    assert cache.directory is None and cache.max_disk_bytes is None


def test_disk_cap_rescans_and_sees_files_written_by_another_trial(tmp_path):
    """Two trials on one node share the cap: a rescan counts the other trial's new files."""
    first = FrozenStateCache("a", tmp_path, max_disk_bytes=3 * NPY)
    second = FrozenStateCache("b", tmp_path, max_disk_bytes=3 * NPY)
    first.store(0, torch.zeros(1, 10, 10))
    first.store(1, torch.zeros(1, 10, 10))
    second.rescan_s = float("inf")  # without a rescan it only knows its own writes ...
    second.store(0, torch.zeros(1, 10, 10))
    assert second.disk_skipped == 0  # ... and the folder now holds 3 files, at the cap
    second.rescan_s = 0.0
    second.store(1, torch.zeros(1, 10, 10))
    assert second.disk_skipped == 1 and second.disk_used_before == 3 * NPY
    assert len(list(tmp_path.glob("*/*.npy"))) == 3


def test_a_partly_cached_batch_computes_only_the_missing_utterances(tmp_path):
    """Cached and missing utterances in one batch: only the missing ones go through the frozen
    encoder, and the states equal the uncached ones on every real frame."""
    model = build_model("tiny-hubert", Placement.from_dict({"num_layers": 4, "layers": {"2": "lora"}}),
                        HeadConfig("classification", 2)).eval()
    batch = _batches(1, 0, 0)[0]
    with torch.no_grad():
        reference, ref_mask = FrozenStateCache("ref", None).frozen_step(model, batch, 3)
        cache = FrozenStateCache("part", tmp_path)
        cache.frozen_step(model, {k: v[1:2] for k, v in batch.items()}, 3)  # utterance 1 cached alone
        calls = []
        embed = model.embed
        model.embed = lambda x, m=None: (calls.append(x.shape[0]), embed(x, m))[1]
        states, mask = cache.frozen_step(model, batch, 3)
    assert calls == [1, 1] and cache.hits == 1 and cache.misses == 1 + 2  # utterances 0 and 2, each alone
    assert torch.equal(mask, ref_mask)
    for a, b in zip(states, reference):
        assert torch.allclose(a[mask], b[ref_mask], atol=1e-5)


def test_cached_states_do_not_depend_on_the_batch_that_computed_them(tmp_path):
    """The same utterance first met in different batches (another trial, another epoch) is
    cached bit for bit the same: cold and warm runs give the same numbers."""
    model = build_model("tiny-hubert", Placement.from_dict({"num_layers": 4, "layers": {"2": "lora"}}),
                        HeadConfig("classification", 2)).eval()
    batch = _batches(1, 0, 0)[0]
    assert int(batch["attention_mask"].sum(1).min()) < batch["attention_mask"].shape[1]  # padding in the batch
    with torch.no_grad():
        whole = FrozenStateCache("whole", tmp_path / "a")
        whole.frozen_step(model, batch, 3)
        alone = FrozenStateCache("alone", tmp_path / "b")
        for b in reversed(range(batch["index"].shape[0])):
            alone.frozen_step(model, {k: v[b:b + 1] for k, v in batch.items()}, 3)
    for index in batch["index"].tolist():
        assert torch.equal(whole.lookup(index, 3), alone.lookup(index, 3))


def test_deeper_states_start_from_a_cached_h0_with_the_numbers_of_the_audio(tmp_path):
    """A trial that needs h_0..h_2 where only h_0 is cached (the prefill's) computes h_1, h_2
    from it, bit for bit what the audio gives, and needs no audio for it."""
    model = build_model("tiny-hubert", Placement.from_dict({"num_layers": 4, "layers": {"2": "lora"}}),
                        HeadConfig("classification", 2)).eval()
    batch = _batches(1, 0, 0)[0]
    with torch.no_grad():
        audio = FrozenStateCache("audio", tmp_path / "a")
        audio.frozen_step(model, batch, 3)
        cache = FrozenStateCache("h0", tmp_path / "b")
        cache.frozen_step(model, batch, 1)  # h_0 only, as the prefill leaves it
        skipped = {**batch, "input_values": torch.zeros(3, 0), "attention_mask": torch.zeros(3, 0, dtype=torch.long)}
        calls = []
        model.embed = lambda *a: calls.append(1)
        states, mask = cache.frozen_step(model, skipped, 3)  # no audio in the batch
    assert calls == [] and cache.misses == 3 + 3
    for index in batch["index"].tolist():
        assert torch.equal(cache.lookup(index, 3), audio.lookup(index, 3))
    assert FrozenStateCache("h0", tmp_path / "b").lookup(0, 3) is not None  # stored on disk, all three states
    assert cache.has(1)(0) and not FrozenStateCache("none", tmp_path / "c").has(1)(0)
    with pytest.raises(RuntimeError, match="no longer cached"):
        FrozenStateCache("none", tmp_path / "c").frozen_step(model, skipped, 3)


def test_cached_utterances_are_not_read_from_disk(tmp_path, monkeypatch):
    """With skip_audio, the second epoch reads no audio file: its states are all cached; the
    losses are those of a run that reads every file."""
    from pefttune.data import dataset as ds
    from pefttune.training import skip_cached_audio

    monkeypatch.setenv("PEFTTUNE_CACHE", str(tmp_path / "cache"))
    manifest = write_tone_manifest(tmp_path / "tones", per_split={"train": 4, "dev": 2, "test": 2})
    config = parse_config(search_config(manifest, tmp_path / "results"))
    ref = loaders.prepare_data(config, progress=False)
    reads = []
    real = ds.read_audio
    monkeypatch.setattr(ds, "read_audio", lambda path, *a, **k: (reads.append(path), real(path, *a, **k))[1])

    def run(skip: bool, key: str):
        torch.manual_seed(0)
        data = loaders.load_data(config, ref, seed=0)
        model = build_model("tiny-hubert", Placement.uniform("lora", 4), ref.head_config(config))
        cache = FrozenStateCache(key, tmp_path / "states")
        if skip:
            skip_cached_audio(cache, model, data.train, data.dev, data.test)
        reads.clear()
        per_epoch = []
        results = fit(model, data.train, data.dev, TrainConfig(epochs=2, lr=3e-3), cache=cache,
                      on_epoch=lambda r: per_epoch.append(len(reads)))
        return [r.train_loss for r in results], per_epoch

    plain, plain_reads = run(False, "plain")
    skipped, skipped_reads = run(True, "skip")
    assert plain_reads[1] - plain_reads[0] == 16 + 8  # every train and dev clip read again in epoch 2
    assert skipped_reads[0] == plain_reads[0] and skipped_reads[1] == skipped_reads[0]  # none in epoch 2
    assert np.allclose(plain, skipped, atol=1e-5)


def test_prefill_computes_each_utterance_once_as_a_trial_would(tmp_path, monkeypatch):
    """The driver's prefill (2 processes) stores h_0 of every utterance; a second prefill
    computes nothing; a trial then finds every utterance cached, with the states it would
    have computed itself."""
    monkeypatch.setenv("PEFTTUNE_CACHE", str(tmp_path / "cache"))
    manifest = write_tone_manifest(tmp_path / "tones", per_split={"train": 4, "dev": 2, "test": 2})
    config = parse_config(search_config(manifest, tmp_path / "results"))
    ref = loaders.prepare_data(config, progress=False)
    rows = len(read_manifest(manifest))
    assert trial_setup.uncached_utterances(config, ref) == rows
    assert trial_setup.prefill_frozen_cache(config, ref, workers=2) == rows
    assert trial_setup.uncached_utterances(config, ref) == 0

    def no_process(*args, **kwargs):
        raise AssertionError("a warm cache needs no prefill process")

    monkeypatch.setattr(trial_setup, "ProcessPoolExecutor", no_process)
    assert trial_setup.prefill_frozen_cache(config, ref, workers=2) == 0  # warm: checked here, nothing started
    cache_dir = next((tmp_path / "cache" / "frozen").iterdir())
    first = sorted(cache_dir.glob("*.npy"))[0]
    first.unlink()  # one utterance lost: the check counts it
    assert trial_setup.uncached_utterances(config, ref) == 1
    monkeypatch.undo()
    monkeypatch.setenv("PEFTTUNE_CACHE", str(tmp_path / "cache"))
    assert trial_setup.prefill_frozen_cache(config, ref, workers=2) == 1
    model = build_model(config.backbone, Placement.uniform("lora", 4), ref.head_config(config)).eval()
    cache = trial_setup.frozen_cache(config, ref, model)
    data = loaders.load_data(config, ref, seed=0)
    alone = FrozenStateCache("alone", None)
    with torch.no_grad():
        for batch in data.test:
            states, mask = cache.frozen_step(model, batch, 1)
            again, again_mask = alone.frozen_step(model, batch, 1)
            assert torch.equal(mask, again_mask) and torch.equal(states[0], again[0])
    assert cache.misses == 0 and cache.hits == 2 * 4  # test clips: 2 per class, 4 classes
    off = search_config(manifest, tmp_path / "results")
    off["train"] = {**off.get("train", {}), "frozen_cache": "memory"}
    off = parse_config(off)
    assert trial_setup.prefill_frozen_cache(off, ref) == 0  # nothing to share between trials


def test_local_runs_of_run_search_and_darts_prefill_once(tmp_path, monkeypatch, capsys):
    """``prefill_local`` fills a local run's cache and says so, does nothing for a cluster
    address or a warm cache; ``pefttune search`` and ``pefttune darts`` ask for it."""
    from pefttune.cli import main

    monkeypatch.setenv("PEFTTUNE_CACHE", str(tmp_path / "cache"))
    manifest = write_tone_manifest(tmp_path / "tones", per_split={"train": 2, "dev": 1, "test": 1})
    config = parse_config(search_config(manifest, tmp_path / "results"))
    ref = loaders.prepare_data(config, progress=False)
    assert trial_setup.prefill_local(config, ref, "ray://head:10001") is None  # a cluster: nothing here
    assert capsys.readouterr().out == ""
    assert trial_setup.prefill_local(config, ref, None) > 0
    assert f"the front end's states of {len(read_manifest(manifest))} utterances computed" in capsys.readouterr().out
    assert trial_setup.prefill_local(config, ref, None) is None  # warm: nothing computed, nothing said

    asked = {}

    class Stop(Exception):
        pass

    def fake(name):
        def run(*args, **kwargs):
            asked[name] = kwargs.get("prefill")
            raise Stop
        return run

    import pefttune.darts.run as darts_experiment
    import pefttune.search.run as search_experiment

    monkeypatch.setattr(search_experiment, "run_search", fake("search"))
    monkeypatch.setattr(darts_experiment, "run_darts", fake("darts"))
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(search_config(manifest, tmp_path / "results")))
    for command in ("search", "darts"):
        with pytest.raises(Stop):
            main([command, str(config_file)])
    assert asked == {"search": True, "darts": True}
