"""Is the study's head trained to convergence on fixed features? The frozen reference's head, outside Ray.

Reads a finished study (``pefttune run``'s folder), pools the frozen encoder's hidden states
h_0 .. h_L of every clip once (:func:`reference_probes.pooled_features`: the study's own corpus,
cache and loaders), then trains the study's classification head on them (a softmax layer
weighting, mean-pooled features, one linear layer) with pefttune's optimiser (AdamW, weight
decay ``train.weight_decay``), schedule (linear warm-up, cosine decay), gradient clipping and
batch size, for each rate and epoch count given, in three variants of the head's input:

- ``plain``: the study's head;
- ``standardised``: the pooled features standardised with the train split's mean and std (what
  a scikit-learn probe does before its fit);
- ``batchnorm``: a batch norm without affine parameters before the linear layer.

Each row: the best dev accuracy over the epochs, the test accuracy of that epoch's weights and
the epoch. Nothing is chosen by a test score. Pooling the states before the layer weighting
equals the head's weighting before pooling (both are linear).

    python benchmarks/head_convergence.py --study pefttune-results/embedded-ks --epochs 40 150
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

VARIANTS = ("plain", "standardised", "batchnorm")


def fit_head(features: dict, *, lr: float, epochs: int, variant: str = "plain", batch: int = 32,
             weight_decay: float = 0.01, warmup_ratio: float = 0.1, grad_clip: float = 1.0, seed: int = 0,
             rung: int | None = None) -> dict:
    """Train the head on ``features`` (per split: ``mean`` (N, S, D) pooled states, ``labels`` (N,));
    returns the best dev accuracy, the test accuracy at that epoch and the epoch; with ``rung``, also
    the best dev accuracy of the first ``rung`` epochs (``rung_dev``: what the learning-rate
    protocol's rung sees of this rate)."""
    import torch

    if variant not in VARIANTS:
        raise ValueError(f"variant: one of {VARIANTS}, got {variant!r}")
    torch.manual_seed(seed)
    x = {n: torch.tensor(np.asarray(f["mean"]), dtype=torch.float32) for n, f in features.items()}
    y = {n: torch.tensor(np.asarray(f["labels"]), dtype=torch.long) for n, f in features.items()}
    if variant == "standardised":
        mean, std = x["train"].mean(0, keepdim=True), x["train"].std(0, keepdim=True) + 1e-6
        x = {n: (v - mean) / std for n, v in x.items()}
    states, dim = x["train"].shape[1:]
    classes = int(max(int(v.max()) for v in y.values())) + 1
    weights = torch.nn.Parameter(torch.zeros(states))
    linear = torch.nn.Linear(dim, classes)
    norm = torch.nn.BatchNorm1d(dim, affine=False) if variant == "batchnorm" else torch.nn.Identity()
    params = [weights, *linear.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n = len(y["train"])
    total = epochs * math.ceil(n / batch)
    warmup = max(1, round(total * warmup_ratio))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else
                                                  0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total - warmup)))))

    def logits(v):
        return linear(norm(torch.einsum("l,nld->nd", torch.softmax(weights, 0), v)))

    generator = torch.Generator().manual_seed(seed)
    best = {"dev": -1.0, "test": float("nan"), "epoch": 0}
    for epoch in range(1, epochs + 1):
        norm.train()
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            loss = torch.nn.functional.cross_entropy(logits(x["train"][idx]), y["train"][idx])
            optimizer.zero_grad()
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            scheduler.step()
        norm.eval()
        with torch.no_grad():
            dev = float((logits(x["dev"]).argmax(1) == y["dev"]).float().mean())
            if dev > best["dev"]:
                best = {**best, "dev": dev, "test": float((logits(x["test"]).argmax(1) == y["test"]).float().mean()),
                        "epoch": epoch}
            if rung is not None and epoch == rung:
                best["rung_dev"] = best["dev"]
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", required=True, type=Path, help="A finished study's folder (pefttune run).")
    parser.add_argument("--epochs", type=int, nargs="+", default=[40, 150])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rung", type=int, default=None,
                        help="Also print the best dev of the first RUNG epochs (what the protocol's rung sees).")
    args = parser.parse_args(argv)
    import torch
    import yaml

    from pefttune.config import parse_config
    from reference_probes import pooled_features

    torch.set_num_threads(args.threads)
    config = parse_config(yaml.safe_load((args.study / "experiment.yaml").read_text()), str(args.study))
    started = time.perf_counter()
    features = pooled_features(config, config.backbone)
    print(f"pooled frozen features of {config.backbone}: {time.perf_counter() - started:.0f} s", flush=True)
    rung = f" dev by epoch {args.rung} |" if args.rung else ""
    print(f"| head input | epochs | lr | seed |{rung} best dev | test at that epoch | epoch |")
    print("|---|---:|---:|---:|" + ("---:|" if args.rung else "") + "---:|---:|---:|")
    for variant in args.variants:
        for epochs in args.epochs:
            for lr in args.rates:
                for seed in args.seeds:
                    r = fit_head(features, lr=lr, epochs=epochs, variant=variant, batch=config.data.batch_size,
                                 weight_decay=config.train.weight_decay, warmup_ratio=config.train.warmup_ratio,
                                 grad_clip=config.train.grad_clip, seed=seed, rung=args.rung)
                    at_rung = f" {r['rung_dev']:.3f} |" if args.rung else ""
                    print(f"| {variant} | {epochs} | {lr:g} | {seed} |{at_rung} {r['dev']:.3f} | {r['test']:.3f} | "
                          f"{r['epoch']} |", flush=True)
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
