"""Frozen-prefix cache: exact losses with and without it, shared on disk, keyed by content."""
from __future__ import annotations

import torch

from pefttune.cache import FrozenStateCache, cache_key
from pefttune.heads import HeadConfig
from pefttune.model import build_model
from pefttune.placement import Placement
from pefttune.training import TrainConfig, fit


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
    import numpy as np

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
