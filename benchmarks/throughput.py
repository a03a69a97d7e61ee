"""Step throughput and peak memory: the pefttune step vs two reference loops, side by side.

Same model (LoRA r=8 on q,v), same data, same head (SUPERB weighted layer sum + linear),
measured in one run, for two placements:

  (a) uniform: LoRA in every layer;
  (b) upper:   LoRA in layers >= L/2 (lowest adapted layer L/2).

Loops:
  hf-default  transformers' model forward every step with output_hidden_states, LoRA
              injected by peft; no freeze_feature_encoder(): in training mode the feature
              encoder marks its input as requiring grad, so backward runs through the CNN;
  hf-careful  the same with freeze_feature_encoder() (what s3prl-style code does at best);
  pefttune    the trainable's step: frozen states h_0..h_k from the frozen-prefix cache
              (filled in a warm-up pass), then layers >= k, head, loss, backward;
  floor       forward + backward of the adapted layers and the head only, on states
              already in memory (a lower bound for any step).

Prints samples/s (the fastest of --repeats epochs), peak memory (CPU: resident memory of
the loop's own process, each loop runs in a fresh one; CUDA: peak allocated), both above
the level after model build and cache fill, the memory the cache holds, ratios, and the
max difference between the loss trajectories of the loops (all start from the same LoRA
weights).

  python benchmarks/throughput.py --config tiny            # seconds
  python benchmarks/throughput.py --config base --steps 6  # 12 layers x 768, random weights
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import threading
import time

import torch
from peft import LoraConfig, inject_adapter_in_model

from pefttune.backbones import SpeechEncoder, build_tiny_model
from pefttune.cache import FrozenStateCache
from pefttune.heads import Head, HeadConfig
from pefttune.model import PeftSpeechModel
from pefttune.placement import Placement
from pefttune.training import frozen_step

CONFIGS = {
    "tiny": dict(num_layers=4, hidden_size=64, num_heads=4, intermediate_size=128, conv_dim=64),
    "ssl": dict(num_layers=4, hidden_size=128, num_heads=4, intermediate_size=256, conv_dim=128),
    "base": dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072, conv_dim=512),
}


#: bf16 autocast on CUDA for every loop's step (set by --bf16)
AUTOCAST = {"enabled": False}


def autocast(device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=AUTOCAST["enabled"] and device.type == "cuda")


def make_batches(steps: int, batch: int, seconds: float, seed: int = 0, num_classes: int = 10):
    """Random 16 kHz audio and labels, with the utterance indices the frozen cache keys on."""
    g = torch.Generator().manual_seed(seed)
    n = int(16000 * seconds)
    return [
        {
            "input_values": torch.randn(batch, n, generator=g),
            "attention_mask": torch.ones(batch, n, dtype=torch.long),
            "labels": torch.randint(0, num_classes, (batch,), generator=g),
            "index": torch.arange(i * batch, (i + 1) * batch),
        }
        for i in range(steps)
    ]


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond (CPU)."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


class HFLoop:
    """transformers forward with output_hidden_states + peft LoRA + the same head."""

    def __init__(self, family: str, cfg: dict, layers: list[int], careful: bool, device):
        self.model = build_tiny_model(family, **cfg)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], layers_to_transform=layers,
                          layers_pattern="layers")
        inject_adapter_in_model(lora, self.model)
        for name, p in self.model.named_parameters():
            p.requires_grad_("lora_" in name)
        if careful:
            # what freeze_feature_encoder() does on the task models (HubertModel lacks the method)
            self.model.feature_extractor._freeze_parameters()
        self.model.to(device).train()
        torch.manual_seed(0)
        self.head = Head(cfg["num_layers"] + 1, cfg["hidden_size"], HeadConfig("classification", 10)).to(device)
        params = [p for p in self.model.parameters() if p.requires_grad] + list(self.head.parameters())
        self.opt = torch.optim.AdamW(params, lr=1e-3)

    def step(self, batch):
        with autocast(batch["input_values"].device):
            out = self.model(batch["input_values"], attention_mask=batch["attention_mask"], output_hidden_states=True)
            mask = torch.ones(out.last_hidden_state.shape[:2], dtype=torch.bool, device=out.last_hidden_state.device)
            loss = self.head.loss(self.head(list(out.hidden_states), mask), mask, batch)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()


class PefttuneLoop:
    def __init__(self, family: str, cfg: dict, placement: Placement, device, cached: bool):
        encoder = SpeechEncoder(build_tiny_model(family, **cfg), f"bench-{family}")
        self.model = PeftSpeechModel(encoder, placement, HeadConfig("classification", 10))
        torch.manual_seed(0)  # the same head init as the HF loops
        self.model.head = Head(cfg["num_layers"] + 1, cfg["hidden_size"], HeadConfig("classification", 10))
        self.model.to(device).train()
        self.cache = FrozenStateCache("bench", None) if cached else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-3)

    def warm(self, batches):
        for batch in batches:
            frozen_step(self.model, batch, self.cache)

    def step(self, batch):
        with autocast(batch["input_values"].device):
            states, mask = frozen_step(self.model, batch, self.cache)
            loss = self.model.loss(self.model.forward_from(states, mask), mask, batch)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()


class FloorLoop(PefttuneLoop):
    """Adapted layers + head only, on states already in memory."""

    def warm(self, batches):
        with torch.no_grad():
            self.states = {id(b): frozen_step(self.model, b) for b in batches}

    def step(self, batch):
        states, mask = self.states[id(batch)]
        with autocast(batch["input_values"].device):
            loss = self.model.loss(self.model.forward_from(states, mask), mask, batch)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()


def lora_weights(model) -> dict[str, torch.Tensor]:
    """LoRA tensors by their name in the transformers model (wrappers' prefixes removed)."""
    return {
        k.split("encoder.model.", 1)[-1].replace(".base_layer", ""): v
        for k, v in model.named_parameters() if "lora_" in k
    }


def set_lora(loop, weights: dict[str, torch.Tensor]) -> None:
    """Every loop starts from the same LoRA weights (same trajectories)."""
    with torch.no_grad():
        for name, param in lora_weights(loop.model).items():
            param.copy_(weights[name])


def time_loop(loop, batches, repeats: int) -> tuple[float, list[float]]:
    """(samples/s of the fastest of ``repeats`` epochs, every step's loss): the fastest
    epoch is the one least disturbed by other jobs on a shared machine."""
    losses, best = [], float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            losses.append(loop.step(batch))
        best = min(best, time.perf_counter() - start)
    return sum(b["input_values"].shape[0] for b in batches) / best, losses


LOOPS = ("hf-default", "hf-careful", "pefttune", "floor")


def build_loop(name: str, args, placement: Placement, layers: list[int], device):
    if name.startswith("hf-"):
        return HFLoop(args.family, CONFIGS[args.config], layers, careful=name == "hf-careful", device=device)
    cls = FloorLoop if name == "floor" else PefttuneLoop
    return cls(args.family, CONFIGS[args.config], placement, device, cached=name == "pefttune")


def run_loop(args, name: str, placement: Placement, layers: list[int], lora: dict) -> tuple:
    """One loop, timed: (samples/s, losses, peak MB above the pre-step level, cache MB).

    On CPU each loop runs in its own process, so its peak resident memory is its own."""
    torch.set_num_threads(args.threads)
    AUTOCAST["enabled"] = args.bf16
    device = torch.device(args.device)
    batches = [{k: v.to(device) for k, v in b.items()} for b in make_batches(args.steps, args.batch, args.seconds)]
    loop = build_loop(name, args, placement, layers, device)
    set_lora(loop, lora)
    if hasattr(loop, "warm"):
        loop.warm(batches)
    cache = getattr(loop, "cache", None)
    cache_mb = cache.memory_bytes / 2**20 if cache is not None else 0.0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        loop.step(batches[0])  # one untimed step (allocator, threads, optimizer state)
        speed, losses = time_loop(loop, batches, args.repeats)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - start_mem) / 2**20
    else:
        peak = rss.mb
    return speed, losses, peak, cache_mb


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--family", default="hubert", choices=["wav2vec2", "hubert", "wavlm"])
    parser.add_argument("--steps", type=int, default=8, help="distinct batches (an 'epoch')")
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed (the fastest counts)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = CONFIGS[args.config]
    num_layers = cfg["num_layers"]
    print(f"# throughput: config={args.config} family={args.family} layers={num_layers} hidden={cfg['hidden_size']} "
          f"batch={args.batch}x{args.seconds}s steps={args.steps}x{args.repeats} device={device} threads={args.threads} "
          f"bf16={args.bf16 and device.type == 'cuda'}")
    # CPU: a fresh process per loop (spawned one after another, so timings never overlap)
    pool = multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) if device.type == "cpu" else None
    rows = []
    for label, layers in (("a-uniform", list(range(num_layers))), ("b-upper", list(range(num_layers // 2, num_layers)))):
        placement = Placement.from_dict({"num_layers": num_layers, "layers": {str(i): "lora" for i in layers}})
        torch.manual_seed(0)
        lora = {k: v.detach().clone() for k, v in lora_weights(HFLoop(args.family, cfg, layers, False, "cpu").model).items()}
        result = {}
        for name in LOOPS:
            task = (args, name, placement, layers, lora)
            result[name] = pool.apply(run_loop, task) if pool is not None else run_loop(*task)
        ref = result["hf-careful"][1]
        for name, (speed, losses, mem, cache_mb) in result.items():
            drift = max(abs(a - b) for a, b in zip(losses, ref))
            rows.append((label, name, speed, speed / result["hf-careful"][0], speed / result["hf-default"][0],
                         result["floor"][0] / speed, drift, mem, cache_mb))
    if pool is not None:
        pool.close()
    memory = "peak MB: CUDA max allocated" if device.type == "cuda" else "peak MB: RSS in the loop's own process"
    print(f"# {memory}, above the level after model build and cache fill; cache MB: the frozen states held")
    print(f"{'placement':<10} {'loop':<11} {'samples/s':>10} {'vs careful':>11} {'vs default':>11} "
          f"{'floor/this':>11} {'max |dloss|':>12} {'peak MB':>8} {'cache MB':>9}")
    for label, name, speed, r_careful, r_default, floor_ratio, drift, mem, cache_mb in rows:
        print(f"{label:<10} {name:<11} {speed:>10.2f} {r_careful:>10.2f}x {r_default:>10.2f}x {floor_ratio:>10.2f}x "
              f"{drift:>12.2e} {mem:>8.0f} {cache_mb:>9.1f}")


if __name__ == "__main__":
    main()
