"""Forward cost per clip of a base-size encoder against the shipped one, side by side.

A random-init HuBERT of base size (12 layers x 768, HubertConfig's defaults: the cost of HuBERT
base or wav2vec 2.0 base, without their weights) against the shipped ``tiny-hubert-ssl`` (4 x
128): one frozen forward pass (what evaluation and the frozen cache run on every clip) over the
same batch, the two encoders alternating round by round; the median ratio over rounds. The
profiles' wall times were measured with the shipped encoder: this ratio says how much more a
base-size encoder costs per clip on the same CPU.

  python benchmarks/encoder_cost.py                     # batch 8 x 1 s, 1 thread, 5 rounds
  python benchmarks/encoder_cost.py --threads 2 --rounds 9
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> float:
    """Print each round and the median ratio; returns the median."""
    from transformers import HubertConfig, HubertModel

    from pefttune.backbones import SpeechEncoder, load_backbone

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoders = {"tiny-hubert-ssl": load_backbone("tiny-hubert-ssl"),
                "base-size": SpeechEncoder(HubertModel(HubertConfig()), name="base-size")}
    batch = torch.randn(args.batch, int(16000 * args.seconds))
    ratios = []
    for round_ in range(args.rounds):
        seconds = {}
        for name, encoder in encoders.items():
            start = time.perf_counter()
            with torch.no_grad():
                encoder(batch)
            seconds[name] = time.perf_counter() - start
        ratios.append(seconds["base-size"] / seconds["tiny-hubert-ssl"])
        print(f"round {round_}: " + ", ".join(f"{k} {v / args.batch * 1000:.0f} ms/clip" for k, v in seconds.items())
              + f", ratio {ratios[-1]:.1f}", flush=True)
    print(f"base-size / tiny-hubert-ssl forward per clip: median {statistics.median(ratios):.1f}x "
          f"[{min(ratios):.1f}-{max(ratios):.1f}] over {args.rounds} rounds "
          f"(batch {args.batch} x {args.seconds:g} s, {args.threads} thread(s))")
    return statistics.median(ratios)


if __name__ == "__main__":
    main()
