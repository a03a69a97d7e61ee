"""Does self-supervised pretraining help? Random-init vs shipped SSL backbone on synthesized KS.

Trains, on the synthesized keyword-spotting corpus (12 classes: ten commands,
``_unknown_``, ``_silence_``; speakers disjoint across splits), SUPERB's weighted-sum +
mean-pool + linear head on four frozen backbones of the same shape (HuBERT, hidden 128,
4 layers, FFN 256):

- ``random``: random init (the same seed every run), head only;
- ``random + lora``: the same with LoRA r=8 on q, v in every layer;
- ``ssl``: the shipped ``tiny-hubert-ssl`` (or ``--backbone DIR``), head only;
- ``ssl + lora``: the same with LoRA;
- a reference without any encoder: per-clip mean and std of log-mel bands, linear classifier.

The last lines check the shipped encoder's targets: SSL head only >= the log-mel baseline of the same
run, and SSL + LoRA >= 0.80 test accuracy.

Each condition trains with AdamW (head lr 1e-2, LoRA lr 2e-3, batch 32) for a fixed number
of epochs (head only 100, LoRA 20; ``--quick``: 60 and 10); the reported test accuracy is
that of the epoch with the best dev accuracy. Everything is seeded: a rerun on the same
corpus and weights prints the same numbers. The frozen parts are computed
once: head-only conditions cache each layer's mean-pooled hidden state (exact, since
the weighted sum and mean pooling are linear), LoRA conditions cache the frozen front end
(hidden state 0) and run the adapted layers each step.

Usage::

    python benchmarks/ssl_backbone.py            # default KS corpus (3600 clips), ~10 min on 2 idle CPUs
    python benchmarks/ssl_backbone.py --quick    # smaller corpus, fewer epochs, a few minutes
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pefttune.backbones import SpeechEncoder, build_tiny_model, load_backbone
from pefttune.demo.corpus_cache import ensure_corpus
from pefttune.data.dataset import SpeechDataset, collate_batch
from pefttune.heads import HeadConfig
from pefttune.model import PeftSpeechModel, build_model
from pefttune.placement import Placement
from pefttune.log_mel import LogMel


@dataclass
class Split:
    input_values: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


@dataclass
class Row:
    backbone: str
    method: str
    trainable: int
    dev: float
    test: float
    best_epoch: int
    seconds: float


def load_split(manifest: Path, split: str, vocab=None) -> tuple[Split, object]:
    dataset = SpeechDataset(manifest, split, task_kind="classification", vocab=vocab)
    batch = collate_batch([dataset[i] for i in range(len(dataset))])
    return Split(batch["input_values"], batch["attention_mask"], batch["labels"]), dataset.vocab


def random_backbone(like: SpeechEncoder) -> SpeechEncoder:
    """A fresh random-init HuBERT of the same shape as ``like`` (the same fixed seed every call)."""
    c = like.config
    model = build_tiny_model(
        "hubert", num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
        num_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        conv_dim=c.conv_dim[0],
    )
    return SpeechEncoder(model, name="random-init")


@torch.no_grad()
def front_end(encoder: SpeechEncoder, split: Split, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen front end (CNN, projection, positional conv): hidden state 0 (N, T, D) and frame mask."""
    outs = [encoder.embed(split.input_values[i:i + batch], split.attention_mask[i:i + batch])
            for i in range(0, len(split.labels), batch)]
    return torch.cat([h for h, _ in outs]), torch.cat([m for _, m in outs])


@torch.no_grad()
def pooled_states(model: PeftSpeechModel, hidden0: torch.Tensor, mask: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Each frozen layer's mean-pooled output, (N, L+1, 1, D): all a head-only model needs."""
    outs = []
    for i in range(0, len(hidden0), batch):
        states = model.frozen_states(hidden0[i:i + batch], mask[i:i + batch], model.encoder.num_layers)
        m = mask[i:i + batch, :, None].float()
        outs.append(torch.stack([(s * m).sum(1) / m.sum(1) for s in states], 1)[:, :, None])
    return torch.cat(outs)


def run_condition(encoder: SpeechEncoder, method: str, data: dict[str, Split], front: dict, num_classes: int,
                  epochs: int, head_lr: float, lora_lr: float, batch_size: int, seed: int) -> Row:
    """Train one head (+ LoRA) on a fresh ``encoder``; test accuracy at the best dev epoch.

    ``front`` holds each split's cached front-end output (:func:`front_end`).
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    layers = encoder.num_layers
    placement = Placement.uniform("none", layers) if method == "head only" else Placement.uniform("lora", layers, rank=8)
    model = build_model(encoder, placement, HeadConfig("classification", num_classes))
    pooled = method == "head only"
    cached = {name: (pooled_states(model, *front[name]), None) if pooled else front[name] for name in data}

    def logits(name: str, idx: torch.Tensor) -> torch.Tensor:
        feats, mask = cached[name]
        if pooled:  # states of length 1: the head's pooling is the identity
            states = list(feats[idx].unbind(1))
            return model.head(states, torch.ones(len(idx), 1, dtype=torch.bool))
        return model.forward_from([feats[idx]], mask[idx])

    @torch.no_grad()
    def accuracy(name: str) -> float:
        model.eval()
        labels = data[name].labels
        preds = torch.cat([logits(name, idx).argmax(-1) for idx in torch.arange(len(labels)).split(256)])
        model.train()
        return float((preds == labels).float().mean())

    params = [p for p in model.parameters() if p.requires_grad]
    head = list(model.head.parameters())
    peft = [p for p in params if all(p is not h for h in head)]
    optimizer = torch.optim.AdamW([{"params": head, "lr": head_lr}, {"params": peft, "lr": lora_lr}], weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    train_labels = data["train"].labels
    best = (-1.0, 0.0, 0)
    model.train()
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(train_labels), generator=gen).split(batch_size):
            loss = F.cross_entropy(logits("train", idx), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        dev = accuracy("dev")
        if dev > best[0]:
            best = (dev, accuracy("test"), epoch)
    return Row(
        backbone=encoder.name, method=method, trainable=sum(p.numel() for p in params),
        dev=round(best[0], 4), test=round(best[1], 4), best_epoch=best[2],
        seconds=round(time.perf_counter() - started, 1),
    )


def log_mel_reference(data: dict[str, Split], num_classes: int, epochs: int, lr: float, seed: int) -> Row:
    """No encoder: per-clip mean and std of 40 log-mel bands (standardised), linear classifier."""
    started = time.perf_counter()
    log_mel = LogMel(40)
    feats = {}
    for name, split in data.items():
        with torch.no_grad():
            z = log_mel(split.input_values)
        feats[name] = torch.cat([z.mean(1), z.std(1)], 1)
    mean, std = feats["train"].mean(0), feats["train"].std(0).clamp_min(1e-5)
    feats = {name: (x - mean) / std for name, x in feats.items()}
    torch.manual_seed(seed)
    linear = torch.nn.Linear(feats["train"].shape[1], num_classes)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    labels = data["train"].labels
    best = (-1.0, 0.0, 0)
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(labels), generator=gen).split(32):
            loss = F.cross_entropy(linear(feats["train"][idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            acc = {n: float((linear(feats[n]).argmax(-1) == data[n].labels).float().mean()) for n in ("dev", "test")}
        if acc["dev"] > best[0]:
            best = (acc["dev"], acc["test"], epoch)
    return Row(backbone="log-mel (no encoder)", method="linear", trainable=sum(p.numel() for p in linear.parameters()),
               dev=round(best[0], 4), test=round(best[1], 4), best_epoch=best[2],
               seconds=round(time.perf_counter() - started, 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", nargs="+", default=["tiny-hubert-ssl"],
                        help="SSL backbone(s): shipped name or model dir (default tiny-hubert-ssl).")
    parser.add_argument("--quick", action="store_true", help="Smaller corpus (100 clips/class) and fewer epochs.")
    parser.add_argument("--corpus-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="Head/LoRA init and batch order.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--head-lr", type=float, default=1e-2, help="Head learning rate (default 1e-2).")
    parser.add_argument("--lora-lr", type=float, default=2e-3, help="LoRA learning rate (default 2e-3).")
    parser.add_argument("--head-epochs", type=int, help="Head-only epochs (default 100, --quick 60).")
    parser.add_argument("--lora-epochs", type=int, help="LoRA epochs (default 20, --quick 10).")
    parser.add_argument("--skip-random", action="store_true",
                        help="Leave out the random-init rows (log-mel baseline and SSL rows only; the encoder's target check).")
    parser.add_argument("--json", help="Also write the rows to this JSON file.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    sizes = {"per_class": 100, "speakers": 40} if args.quick else {}
    head_epochs = args.head_epochs or (60 if args.quick else 100)
    lora_epochs = args.lora_epochs or (10 if args.quick else 20)
    t0 = time.perf_counter()
    manifest = ensure_corpus("ks", seed=args.corpus_seed, **sizes)
    train, vocab = load_split(manifest, "train")
    data = {"train": train, "dev": load_split(manifest, "dev", vocab)[0], "test": load_split(manifest, "test", vocab)[0]}
    num_classes = len(vocab.labels)
    print(f"KS corpus {manifest.parent.name}: {num_classes} classes, "
          f"train/dev/test {len(train.labels)}/{len(data['dev'].labels)}/{len(data['test'].labels)} clips "
          f"(chance {1 / num_classes:.3f}); loaded in {time.perf_counter() - t0:.0f} s", flush=True)

    def ssl_backbone(name: str) -> SpeechEncoder:
        encoder = load_backbone(name)
        encoder.name = name
        return encoder

    def random_init() -> SpeechEncoder:
        return random_backbone(ssl_backbone(args.backbone[0]))

    factories = ([] if args.skip_random else [random_init]) + [lambda name=name: ssl_backbone(name) for name in args.backbone]

    rows = [log_mel_reference(data, num_classes, head_epochs, args.head_lr, args.seed)]
    print(f"  {'log-mel (no encoder)':<20} dev {rows[0].dev:.3f} test {rows[0].test:.3f}", flush=True)
    for fresh in factories:  # a placement needs a fresh (unadapted) backbone
        t0 = time.perf_counter()
        front = {name: front_end(fresh(), split) for name, split in data.items()}
        front_s = time.perf_counter() - t0
        for method, epochs in (("head only", head_epochs), ("lora r=8 q,v", lora_epochs)):
            row = run_condition(fresh(), method, data, front, num_classes, epochs, args.head_lr, args.lora_lr,
                                batch_size=32, seed=args.seed)
            row.seconds = round(row.seconds + front_s, 1)
            rows.append(row)
            print(f"  {row.backbone:<16} {row.method:<13} dev {row.dev:.3f} test {row.test:.3f} "
                  f"(epoch {row.best_epoch}, {row.seconds:.0f} s)", flush=True)

    print("\n| backbone | method | trainable params | dev acc | test acc |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r.backbone} | {r.method} | {r.trainable:,} | {r.dev:.3f} | {r.test:.3f} |")
    by = {(r.backbone, r.method): r for r in rows}
    for name in args.backbone:
        gain = by[(name, "lora r=8 q,v")].test - by[(name, "head only")].test
        if not args.skip_random:
            ratio = by[(name, "head only")].test / max(by[("random-init", "head only")].test, 1e-9)
            print(f"{name}: SSL / random (head only, test) {ratio:.2f}x; LoRA over head only (test) {gain:+.3f}")
        head, lora, mel = by[(name, "head only")].test, by[(name, "lora r=8 q,v")].test, rows[0].test
        print(f"{name}: head only {head:.3f} vs log-mel linear {mel:.3f} (target >= baseline: "
              f"{'met' if head >= mel else 'not met'}); LoRA {lora:.3f} (target >= 0.80: "
              f"{'met' if lora >= 0.80 else 'not met'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"corpus": str(manifest), "quick": args.quick,
                                               "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
