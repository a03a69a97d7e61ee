"""DARTS epoch cost: exact vs gated mix vs a uniform-placement epoch, side by side.

Every loop sees the same training set of N utterances per epoch:

  uniform   N samples of weight steps through a uniform placement, once per candidate
            (sequential, parallel, LoRA, BitFit in every layer);
  gated     DARTS' split: N/2 samples for weight steps, N/2 for architecture steps, one
            pass per layer with every candidate's contribution scaled by softmax(alpha)
            (the weight step treats the mixing weights as constants);
  exact     the same split, every layer run once per candidate (the paper's mix).

The frozen front end is served by the frozen-prefix cache in every loop (filled in a
warm-up pass), so the ratios compare the trainable parts. Warm-up (weight-only) epochs are
timed separately from search epochs (arch step + weight step). Each loop's epoch time is
the fastest of --repeats epochs; 'x uniform' divides by the mean of the uniform epochs.

  python benchmarks/darts_cost.py                 # tiny-hubert-ssl's shape, batch 32, first order
  python benchmarks/darts_cost.py --order second
"""
from __future__ import annotations

import argparse
import time

import torch

from pefttune.backbones import SpeechEncoder, build_tiny_model
from pefttune.frozen_cache import FrozenStateCache
from pefttune.darts import Relaxation, build_supernet, make_architect, search_hooks
from pefttune.heads import HeadConfig
from pefttune.model import PeftSpeechModel
from pefttune.placement import Placement
from pefttune.training import TrainConfig, frozen_step, train_epoch
from throughput import CONFIGS, make_batches  # this folder: the same shapes and data

CANDIDATES = {"sequential": {"bottleneck": 32}, "parallel": {"bottleneck": 32}, "lora": {"rank": 8}, "bitfit": {}}


def encoder(cfg: dict) -> SpeechEncoder:
    return SpeechEncoder(build_tiny_model("hubert", **cfg), "bench")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(repeats: int, epoch) -> float:
    """Fastest of ``repeats`` epochs (numbered 0..): the least disturbed by other jobs."""
    return min(timed(lambda: epoch(n)) for n in range(repeats))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="ssl",
                        help="backbone shape (default ssl: the shipped tiny-hubert-ssl's)")
    parser.add_argument("--steps", type=int, default=16, help="batches in the training set (N = steps x batch)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32, the embedded study's)")
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per loop (the fastest counts)")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--order", choices=["first", "second"], default="first")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]
    head = HeadConfig("classification", 12)
    train = make_batches(args.steps, args.batch, args.seconds, num_classes=12)
    half = args.steps // 2
    weight_half, arch_half = train[:half], train[half:]
    config = TrainConfig(epochs=4, lr=1e-3, warmup_ratio=0.0)

    rows = {}
    # uniform: each candidate in every layer, a full pass over the N utterances
    for method, hparams in CANDIDATES.items():
        torch.manual_seed(0)
        model = PeftSpeechModel(encoder(cfg), Placement.uniform(method, cfg["num_layers"], **hparams), head)
        cache = FrozenStateCache(f"uniform-{method}", None)
        for b in train:
            frozen_step(model, b, cache)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        train_epoch(model, train, opt, sched, config, 1, cache=cache)  # untimed warm-up

        def uniform_epoch(number: int):
            train_epoch(model, train, opt, sched, config, number + 2, cache=cache)

        rows[f"uniform {method}"] = (best_of(args.repeats, uniform_epoch), None)

    for mix in ("gated", "exact"):
        torch.manual_seed(0)
        supernet = build_supernet(encoder(cfg), CANDIDATES, head, mix=mix, relaxation=Relaxation())
        supernet.cache = FrozenStateCache(mix, None)
        for b in train:
            frozen_step(supernet.model, b, supernet.cache)
        opt, sched, recording, architect = make_architect(
            supernet, weight_half, arch_half, config, order=args.order, warmup_epochs=1
        )
        hooks = search_hooks(supernet, architect)

        def epoch(number: int):
            train_epoch(supernet.model, recording, opt, sched, config, number, hooks, cache=supernet.cache)

        warm = timed(lambda: epoch(1))  # warm-up epoch: weight steps only
        search = best_of(args.repeats, lambda n: epoch(2 + n))  # arch step + weight step
        rows[mix] = (search, warm)

    uniform = [search for name, (search, _) in rows.items() if name.startswith("uniform")]
    base = sum(uniform) / len(uniform)
    print(f"# DARTS epoch cost: config={args.config} N={args.steps * args.batch} utterances x {args.seconds}s, "
          f"order={args.order}, threads={args.threads}, candidates none+{'+'.join(CANDIDATES)}")
    print(f"# 'x uniform' = epoch time / mean uniform epoch ({base:.3f} s); best of {args.repeats} epochs each")
    print(f"{'loop':<20} {'search epoch s':>15} {'x uniform':>10} {'x lora':>8} {'warm-up epoch s':>16} {'x uniform':>10}")
    lora = rows["uniform lora"][0]
    for name, (search, warm) in rows.items():
        warm_s = f"{warm:>16.3f} {warm / base:>9.2f}x" if warm is not None else f"{'-':>16} {'-':>10}"
        print(f"{name:<20} {search:>15.3f} {search / base:>9.2f}x {search / lora:>7.2f}x {warm_s}")


if __name__ == "__main__":
    main()
