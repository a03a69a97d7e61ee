"""The trainable's GPU path (skipped without CUDA): bf16 autocast training through
training.fit, checkpoints written from CUDA tensors and restored onto the GPU (optimizer,
scheduler, CUDA RNG), and the final evaluation's predictions. Data are in-memory tones in
the batch format of pefttune.data, shuffled by the trainables' epoch sampler, so neither
audio files nor an audio library are needed (the GPU image has no soundfile).

Runs under pytest, or as a script on a GPU machine: ``python tests/test_trainable_gpu.py``.
"""
from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _loaders(seed: int = 0):
    from pefttune.data.loaders import EpochSampler

    def collate_batch(items):
        longest = max(len(x["input_values"]) for x in items)
        batch = {"input_values": torch.zeros(len(items), longest), "attention_mask": torch.zeros(len(items), longest, dtype=torch.long)}
        for b, x in enumerate(items):
            batch["input_values"][b, : len(x["input_values"])] = x["input_values"]
            batch["attention_mask"][b, : len(x["input_values"])] = 1
        batch["index"] = torch.tensor([x["index"] for x in items])
        batch["labels"] = torch.tensor([x["label"] for x in items])
        return batch

    gen = torch.Generator().manual_seed(seed)
    items = []
    for index in range(48):
        label = index % 3
        n = 7000 + int(torch.randint(0, 1000, (1,), generator=gen))
        t = torch.arange(n) / 16_000
        wav = 0.5 * torch.sin(2 * math.pi * 300 * 2**label * t) + 0.05 * torch.randn(n, generator=gen)
        items.append({"input_values": wav, "index": index, "label": label})
    train, dev = items[:36], items[36:]
    sampler = EpochSampler(len(train), seed)
    train_loader = torch.utils.data.DataLoader(train, batch_size=6, sampler=sampler, collate_fn=collate_batch)
    dev_loader = torch.utils.data.DataLoader(dev, batch_size=6, collate_fn=collate_batch)
    return train_loader, dev_loader, sampler


def _trial(device):
    from pefttune.heads import HeadConfig
    from pefttune.model import build_model
    from pefttune.placement import Placement
    from pefttune.training import TrainConfig, setup_optimizer, setup_scheduler

    train = TrainConfig(epochs=2, lr=0.01, bf16=True, max_steps_per_epoch=4, seed=0)
    torch.manual_seed(0)
    placement = Placement.from_dict({"num_layers": 4, "layers": ["lora", "parallel", "none", ["bitfit", "prefix"]]})
    model = build_model("tiny-hubert", placement, HeadConfig("classification", 3)).to(device)
    optimizer = setup_optimizer(model, train)
    scheduler = setup_scheduler(optimizer, 8, 0.25)
    return model, optimizer, scheduler, train


def test_bf16_training_checkpoint_resume_on_gpu(tmp_path=None):
    from pefttune.schema import CheckpointState
    from pefttune.trainables import checkpoint as ckpt
    from pefttune.runtime import cluster
    from pefttune.training import fit

    tmp_path = Path(tmp_path or tempfile.mkdtemp())
    device = cluster.trial_device(0.25)
    assert device.type == "cuda"

    model, optimizer, scheduler, train = _trial(device)
    train_loader, dev_loader, _ = _loaders()
    results = fit(model, train_loader, dev_loader, train, optimizer=optimizer, scheduler=scheduler, device=device)
    assert all(math.isfinite(r.train_loss) and r.samples_per_s > 0 for r in results)
    straight = ckpt.trainable_state(model)

    model, optimizer, scheduler, train = _trial(device)
    train_loader, dev_loader, _ = _loaders()
    state = CheckpointState()

    def stop(result):
        state.epoch, state.best_score, state.best_epoch = result.epoch, result.dev.score, result.epoch
        ckpt.write_checkpoint(tmp_path / "ckpt", model, state, optimizer=optimizer, scheduler=scheduler,
                                best_weights=ckpt.trainable_state(model))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(model, train_loader, dev_loader, train, optimizer=optimizer, scheduler=scheduler, on_epoch=stop,
            device=device)
    torch.manual_seed(99)
    torch.cuda.manual_seed_all(99)

    model, optimizer, scheduler, train = _trial(device)
    train_loader, dev_loader, sampler = _loaders()
    restored, best = ckpt.read_checkpoint(tmp_path / "ckpt", model, optimizer=optimizer, scheduler=scheduler)
    assert all(v.device.type == "cuda" for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    sampler.set_epoch(restored.epoch)
    fit(model, train_loader, dev_loader, train, optimizer=optimizer, scheduler=scheduler, start_epoch=2, device=device)
    resumed = ckpt.trainable_state(model)
    worst = max(float((resumed[k] - straight[k]).abs().max()) for k in straight)
    assert worst < 1e-3, f"resumed weights differ from the uninterrupted run by {worst}"

    evaluations = ckpt.final_evaluation(model, best, {"dev": dev_loader}, train, device)
    probs = evaluations["dev"].arrays["probs"]
    assert probs.dtype.name == "float32" and probs.shape == (12, 3) and abs(probs.sum(1) - 1).max() < 1e-3
    ckpt.write_checkpoint(tmp_path / "final", model, restored, best_weights=best, predictions=evaluations)
    assert ckpt.checkpoint_predictions(tmp_path / "final", "dev")["pred"].shape == (12,)
    print(f"GPU OK: {torch.cuda.get_device_name()}, max resume difference {worst:.2e}, "
          f"dev accuracy {evaluations['dev'].score:.3f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    test_bf16_training_checkpoint_resume_on_gpu()
