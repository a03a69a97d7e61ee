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

Each loop runs in its own process (built and warmed in parallel); then rounds interleave
them: round r times one epoch of every loop, one loop at a time, in an order rotated by r.
Ratios are medians over rounds of epochs timed seconds apart, so a slow spell of a shared
machine falls on all loops alike; [min-max] shows the spread. Also printed: samples/s
(median epoch), peak memory (CPU: resident memory of the loop's own process; CUDA: peak
allocated), both above the level after model build and cache fill, the memory the cache
holds, and the max difference between the loss trajectories of the loops (all start from
the same LoRA weights). At the reference shape (base, batch 2 x 1 s, CPU) the medians are
checked against its hand-measured figures.

  python benchmarks/throughput.py --config tiny            # seconds
  python benchmarks/throughput.py --config base --steps 6 --repeats 9  # 12 layers x 768, random weights
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import threading
import time
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model

from pefttune.backbones import SpeechEncoder, build_tiny_model
from pefttune.frozen_cache import FrozenStateCache
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
    """Peak resident memory above a fixed base level, sampled every millisecond while running.

    ``start()``/``stop()`` bracket the timed work only, so a loop's process does not sample
    (and steal CPU) while another loop's epoch is being timed."""

    def __init__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def stop(self):
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


LOOPS = ("hf-default", "hf-careful", "pefttune", "floor")

#: figures measured by hand (CPU, base config, batch 2 x 1 s, 2 threads):
#: pefttune's speed-up over each reference must be at least these; floor/pefttune at most 1.1
TARGETS = {
    "a-uniform": {"hf-careful": 1.24, "hf-default": 2.05},
    "b-upper": {"hf-careful": 2.07, "hf-default": 3.4},
}
FLOOR_TARGET = 1.1


def build_loop(name: str, args, placement: Placement, layers: list[int], device):
    if name.startswith("hf-"):
        return HFLoop(args.family, CONFIGS[args.config], layers, careful=name == "hf-careful", device=device)
    cls = FloorLoop if name == "floor" else PefttuneLoop
    return cls(args.family, CONFIGS[args.config], placement, device, cached=name == "pefttune")


def serve_loop(conn, args, name: str, placement: Placement, layers: list[int], lora: dict) -> None:
    """One loop in its own process: build, warm, then time one epoch per ``"epoch"`` request.

    Replies ``("ready", cache MB)``, then ``(seconds, losses)`` per epoch, then on ``"stop"``
    the peak memory in MB above the level after model build and cache fill (CPU: resident
    memory of this process; CUDA: max allocated). Errors come back as ``("error", text)``."""
    try:
        torch.set_num_threads(args.threads)
        AUTOCAST["enabled"] = args.bf16
        device = torch.device(args.device)
        batches = [{k: v.to(device) for k, v in b.items()}
                   for b in make_batches(args.steps, args.batch, args.seconds)]
        loop = build_loop(name, args, placement, layers, device)
        set_lora(loop, lora)
        if hasattr(loop, "warm"):
            loop.warm(batches)
        cache = getattr(loop, "cache", None)
        rss = PeakRSS()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start_mem = torch.cuda.memory_allocated()
        rss.start()
        losses = [loop.step(batches[0])]  # one untimed step (allocator, threads, optimizer state)
        rss.stop()
        conn.send(("ready", cache.memory_bytes / 2**20 if cache is not None else 0.0))
        while conn.recv() == "epoch":
            rss.start()
            start = time.perf_counter()
            losses = [loop.step(batch) for batch in batches]  # .item() syncs CUDA every step
            elapsed = time.perf_counter() - start
            rss.stop()
            conn.send((elapsed, losses))
        peak = (torch.cuda.max_memory_allocated() - start_mem) / 2**20 if device.type == "cuda" else rss.mb
        conn.send(peak)
    except Exception:  # noqa: BLE001 - the parent re-raises with the worker's traceback
        import traceback

        conn.send(("error", traceback.format_exc()))


@dataclass
class LoopResult:
    seconds: list[float]  # one timed epoch per round
    losses: list[float]  # every timed step's loss, in order
    peak_mb: float
    cache_mb: float


def _receive(conn, name: str):
    reply = conn.recv()
    if isinstance(reply, tuple) and reply[0] == "error":
        raise RuntimeError(f"throughput loop {name!r} failed:\n{reply[1]}")
    return reply


def measure(args, placement: Placement, layers: list[int], lora: dict) -> dict[str, LoopResult]:
    """Every loop in its own process; rounds interleave one epoch of each loop.

    Only one loop computes at a time. Round r runs the loops in an order rotated by r, so
    a slow spell of a shared machine falls on all loops alike and ratios are taken between
    epochs run seconds apart."""
    context = multiprocessing.get_context("spawn")
    workers = {}
    for name in LOOPS:
        parent, child = context.Pipe()
        process = context.Process(target=serve_loop, args=(child, args, name, placement, layers, lora), daemon=True)
        process.start()
        workers[name] = (parent, process)
    try:
        results = {}
        for name, (conn, _) in workers.items():  # model build and cache fill happen in parallel
            results[name] = LoopResult([], [], 0.0, _receive(conn, name)[1])
        for round_ in range(args.repeats):
            shift = round_ % len(LOOPS)
            for name in LOOPS[shift:] + LOOPS[:shift]:
                conn = workers[name][0]
                conn.send("epoch")
                seconds, losses = _receive(conn, name)
                results[name].seconds.append(seconds)
                results[name].losses += losses
        for name, (conn, _) in workers.items():
            conn.send("stop")
            results[name].peak_mb = _receive(conn, name)
        return results
    finally:
        for conn, process in workers.values():
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
            conn.close()


def ratio(results: dict[str, LoopResult], faster: str, slower: str) -> tuple[float, float, float]:
    """Speed of ``faster`` over ``slower``: (median, min, max) over rounds, each round's
    epochs timed side by side."""
    ratios = [b / a for a, b in zip(results[faster].seconds, results[slower].seconds)]
    return statistics.median(ratios), min(ratios), max(ratios)


def format_ratio(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.2f}x [{r[1]:.2f}-{r[2]:.2f}]"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--family", default="hubert", choices=["wav2vec2", "hubert", "wavlm"])
    parser.add_argument("--steps", type=int, default=8, help="distinct batches (an 'epoch')")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each times one epoch of every loop")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cfg = CONFIGS[args.config]
    num_layers = cfg["num_layers"]
    print(f"# throughput: config={args.config} family={args.family} layers={num_layers} hidden={cfg['hidden_size']} "
          f"batch={args.batch}x{args.seconds}s steps={args.steps} rounds={args.repeats} device={device} "
          f"threads={args.threads} bf16={args.bf16 and device.type == 'cuda'}")
    rows, checks = [], []
    for label, layers in (("a-uniform", list(range(num_layers))), ("b-upper", list(range(num_layers // 2, num_layers)))):
        placement = Placement.from_dict({"num_layers": num_layers, "layers": {str(i): "lora" for i in layers}})
        torch.manual_seed(0)
        lora = {k: v.detach().clone() for k, v in lora_weights(HFLoop(args.family, cfg, layers, False, "cpu").model).items()}
        results = measure(args, placement, layers, lora)
        samples = args.steps * args.batch
        reference = results["hf-careful"].losses
        for name, result in results.items():
            drift = max(abs(a - b) for a, b in zip(result.losses, reference))
            speed = samples / statistics.median(result.seconds)
            rows.append((label, name, speed, ratio(results, name, "hf-careful"), ratio(results, name, "hf-default"),
                         ratio(results, "floor", name), drift, result.peak_mb, result.cache_mb))
        for reference_loop, target in TARGETS[label].items():
            checks.append((label, f"pefttune vs {reference_loop}", ratio(results, "pefttune", reference_loop)[0],
                           ">=", target))
        checks.append((label, "floor / pefttune", ratio(results, "floor", "pefttune")[0], "<=", FLOOR_TARGET))
    memory = "peak MB: CUDA max allocated" if device.type == "cuda" else "peak MB: RSS in the loop's own process"
    print(f"# samples/s: median epoch; ratios: median over rounds [min-max], epochs timed side by side")
    print(f"# {memory}, above the level after model build and cache fill; cache MB: the frozen states held")
    print(f"{'placement':<10} {'loop':<11} {'samples/s':>10} {'vs careful':>20} {'vs default':>20} "
          f"{'floor/this':>20} {'max |dloss|':>12} {'peak MB':>8} {'cache MB':>9}")
    for label, name, speed, r_careful, r_default, floor_ratio, drift, mem, cache_mb in rows:
        print(f"{label:<10} {name:<11} {speed:>10.2f} {format_ratio(r_careful):>20} {format_ratio(r_default):>20} "
              f"{format_ratio(floor_ratio):>20} {drift:>12.2e} {mem:>8.0f} {cache_mb:>9.1f}")
    if (args.config, args.batch, args.seconds, device.type) == ("base", 2, 1.0, "cpu"):
        print("# the hand-measured reference figures (this shape, CPU), medians against them:")
        for label, what, value, op, target in checks:
            met = value >= target if op == ">=" else value <= target
            print(f"{label:<10} {what:<24} {value:.2f}x {op} {target:.2f}x  {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
