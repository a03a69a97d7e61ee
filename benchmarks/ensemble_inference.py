"""Ensemble inference: K members on one shared backbone vs K separate models vs one model.

An exported ensemble (the ``export-model --ensemble`` layout, written to a scratch folder)
of K members with uniform placements (one method in every layer, so only the front end is
shared: the least an ensemble can share), default LoRA, IA3, BitFit and a sequential
adapter, random PEFT and head weights. Three variants, each in its own process:

  shared    ``pefttune.predictor.load_model(DIR)``: one frozen backbone, its frozen part run
            once per batch, each member's layers and head on it;
  separate  each member loaded as a model of its own (``load_model_dir``: a backbone each),
            run one after another (how an exported ensemble ran before it shared a backbone);
  one       the first member alone.

Each variant predicts the same clips (random 16 kHz noise, 0.8-1.2 s, batches of 8; the
members' class probabilities, ``outputs``). Rounds interleave the variants, one pass over
the clips each, in an order rotated per round, so ratios are medians over passes timed
seconds apart ([min-max] over rounds); the same for the process's CPU time in those passes,
which a machine shared with other work disturbs less than wall time. Memory, per process:
the weights it holds (distinct tensor storages) and its peak resident memory above the level
after imports, sampled while the models load and during one untimed pass over the clips. The shared ensemble's probabilities are compared with the
separate models' (max |difference|, and the members' argmax labels).

  python benchmarks/ensemble_inference.py --config ssl             # the shipped tiny encoder
  python benchmarks/ensemble_inference.py --config base --clips 16  # HuBERT base shape, random weights
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

#: Backbones: the shipped self-supervised tiny encoder, a random tiny one (tests), and a
#: random model of HuBERT base's shape (transformers' HubertConfig defaults: 7-layer CNN,
#: 12 layers x 768, 3072 FFN), built here (no download).
CONFIGS = ("ssl", "tiny", "base")
METHODS = ("lora", "ia3", "bitfit", "sequential")
VARIANTS = ("shared", "separate", "one")
LABELS = ("a", "b", "c", "d", "e")


def backbone_reference(config: str, scratch: Path) -> str:
    """A backbone ``load_backbone`` resolves; ``base`` is saved to ``scratch`` first."""
    if config == "ssl":
        return "tiny-hubert-ssl"
    if config == "tiny":
        return "tiny-hubert"
    from transformers import HubertConfig, HubertModel

    base = HubertConfig(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                        layerdrop=0.0, mask_time_prob=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = HubertModel(base)
    directory = scratch / "hubert-base-random"
    model.save_pretrained(str(directory))
    return str(directory)


def write_ensemble(root: Path, backbone: str, methods=METHODS, seed: int = 0) -> Path:
    """An export-model ensemble directory with one uniform placement per method in ``methods``."""
    from pefttune.backbones import load_backbone
    from pefttune.heads import HeadConfig
    from pefttune.model import build_model
    from pefttune.placement import Placement
    from pefttune.shared_backbone import share_encoder

    trunk = load_backbone(backbone)
    torch.manual_seed(seed)
    entries = []
    for i, method in enumerate(methods):
        model = build_model(share_encoder(trunk), Placement.uniform(method, trunk.num_layers),
                            HeadConfig("classification", len(LABELS)))
        for layer in model.methods:
            for module in layer:
                module.perturb_(0.05)
        with torch.no_grad():
            for param in model.head.parameters():
                param.add_(torch.randn_like(param) * 0.5)
        model.save(root / "members" / f"m{i}")
        entries.append({"dir": f"members/m{i}", "trial_id": f"m{i}", "kind": "uniform", "method": method})
    (root / "backbone.json").write_text(json.dumps({"reference": trunk.name, "content_hash": trunk.content_hash()}))
    (root / "vocab.json").write_text(json.dumps({"kind": "labels", "labels": list(LABELS)}))
    (root / "preprocessing.json").write_text(json.dumps({"sample_rate": 16000, "normalize": True}))
    (root / "ensemble.json").write_text(json.dumps({"strategy": "vote", "members": entries, "weights": None}))
    return root


def make_clips(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(int(rng.uniform(0.8, 1.2) * 16000)).astype(np.float32) for _ in range(count)]


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory of this process above the level at construction, sampled every ms."""

    def __init__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return (self.peak - self.base) / 2**20


def weights_mb(modules) -> float:
    """MB of the distinct tensor storages the modules hold (shared tensors counted once)."""
    seen = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values()) / 2**20


def build_variant(name: str, directory: Path):
    """(run(clips) -> [member][clip] probabilities, modules held) for one variant."""
    from pefttune.model import load_model_dir
    from pefttune.predictor import Predictor, load_model, vocab_from_dict

    if name == "shared":
        predictor = load_model(directory)
        return predictor.outputs, [predictor.ensemble]
    vocab = vocab_from_dict(json.loads((directory / "vocab.json").read_text()))
    members = json.loads((directory / "ensemble.json").read_text())["members"]
    if name == "one":
        members = members[:1]
    predictors = [Predictor(load_model_dir(directory / m["dir"]), vocab) for m in members]
    return (lambda clips: [p.outputs(clips) for p in predictors]), [p.model for p in predictors]


def serve(conn, name: str, directory: Path, clips: list[np.ndarray], threads: int) -> None:
    """One variant in its own process: load and one untimed pass (memory sampled), then one
    timed pass per ``"pass"`` request (nothing sampled).

    Replies ``"ready"``, then (wall seconds, CPU seconds of the process) per pass; on
    ``"stop"`` (weights MB, peak MB, the last pass's outputs). Errors come back as
    ``("error", text)``."""
    try:
        torch.set_num_threads(threads)
        import pefttune.predictor  # noqa: F401 - imports (transformers, peft, ...) before the base level
        rss = PeakRSS()
        run, modules = build_variant(name, directory)
        outputs = run(clips)  # untimed: allocator, threads, and the peak of a pass
        peak = rss.stop()
        conn.send("ready")
        while conn.recv() == "pass":
            wall, cpu = time.perf_counter(), time.process_time()
            outputs = run(clips)
            conn.send((time.perf_counter() - wall, time.process_time() - cpu))
        conn.send((weights_mb(modules), peak, outputs))
    except Exception:  # noqa: BLE001 - the parent re-raises with the worker's traceback
        import traceback

        conn.send(("error", traceback.format_exc()))


@dataclass
class VariantResult:
    seconds: list[float] = field(default_factory=list)  # one timed pass over the clips per round
    cpu_seconds: list[float] = field(default_factory=list)  # the process's CPU time in the same passes
    weights_mb: float = 0.0
    peak_mb: float = 0.0
    outputs: list = field(default_factory=list)  # [member][clip] probabilities


def _receive(conn, name: str):
    reply = conn.recv()
    if isinstance(reply, tuple) and reply[0] == "error":
        raise RuntimeError(f"ensemble inference variant {name!r} failed:\n{reply[1]}")
    return reply


def measure(directory: Path, clips: list[np.ndarray], rounds: int, threads: int) -> dict[str, VariantResult]:
    """Every variant in its own process (started together: each measures its own memory);
    rounds interleave one pass of each, in an order rotated per round."""
    context = multiprocessing.get_context("spawn")
    workers, results = {}, {}
    try:
        for name in VARIANTS:
            parent, child = context.Pipe()
            process = context.Process(target=serve, args=(child, name, directory, clips, threads), daemon=True)
            process.start()
            workers[name] = (parent, process)
        for name, (conn, _) in workers.items():
            _receive(conn, name)
            results[name] = VariantResult()
        for round_ in range(rounds):
            shift = round_ % len(VARIANTS)
            for name in VARIANTS[shift:] + VARIANTS[:shift]:
                conn = workers[name][0]
                conn.send("pass")
                wall, cpu = _receive(conn, name)
                results[name].seconds.append(wall)
                results[name].cpu_seconds.append(cpu)
        for name, (conn, _) in workers.items():
            conn.send("stop")
            result = results[name]
            result.weights_mb, result.peak_mb, result.outputs = _receive(conn, name)
        return results
    finally:
        for conn, process in workers.values():
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
            conn.close()


def ratio(results: dict[str, VariantResult], numerator: str, denominator: str,
          clock: str = "seconds") -> tuple[float, float, float]:
    """Time of ``numerator`` over ``denominator`` (``clock``: ``seconds`` wall or
    ``cpu_seconds``): (median, min, max) over rounds."""
    pairs = zip(getattr(results[numerator], clock), getattr(results[denominator], clock))
    ratios = [a / b for a, b in pairs]
    return statistics.median(ratios), min(ratios), max(ratios)


def format_ratio(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.2f}x [{r[1]:.2f}-{r[2]:.2f}]"


def agreement(results: dict[str, VariantResult]) -> tuple[float, bool]:
    """(max |shared - separate| over all probabilities, whether every member's labels agree)."""
    shared = np.array(results["shared"].outputs)
    separate = np.array(results["separate"].outputs)
    return float(np.abs(shared - separate).max()), bool((shared.argmax(-1) == separate.argmax(-1)).all())


def report(results: dict[str, VariantResult], clips: int, members: int) -> str:
    lines = ["| variant | ms per example | time vs separate | time vs one | CPU time vs separate "
             "| weights MB | peak MB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in VARIANTS:
        result = results[name]
        per_example = 1000 * statistics.median(result.seconds) / clips
        vs_separate, vs_one = (format_ratio(ratio(results, name, other)) for other in ("separate", "one"))
        cpu = format_ratio(ratio(results, name, "separate", "cpu_seconds"))
        lines.append(f"| {name} | {per_example:.2f} | {vs_separate} | {vs_one} | {cpu} | {result.weights_mb:.1f} "
                     f"| {result.peak_mb:.0f} |")
    difference, same = agreement(results)
    lines.append(f"\n{members} members; shared vs separate: max |probability difference| {difference:.2e}, "
                 f"labels {'identical' if same else 'DIFFER'}")
    return "\n".join(lines)


def front_end_share(backbone: str, repeats: int = 3) -> tuple[float, float]:
    """(CPU seconds of the front end, of the layers) per batch of 8 x 1 s, 1 thread, in this
    process: the front end runs once in a shared ensemble, the layers once per member, so a
    K-member uniform ensemble costs at least (front + K layers) / (K (front + layers)) of
    K separate models."""
    from pefttune.backbones import load_backbone

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encoder = load_backbone(backbone)
        values = torch.randn(8, 16000, generator=torch.Generator().manual_seed(0))
        front = layers = 0.0
        with torch.no_grad():
            encoder(values)  # warm
            for _ in range(repeats):
                start = time.process_time()
                hidden, mask = encoder.embed(values)
                middle = time.process_time()
                encoder.run_layers(hidden, mask)
                front, layers = front + middle - start, layers + time.process_time() - middle
        return front / repeats, layers / repeats
    finally:
        torch.set_num_threads(threads)


def bound(front: float, layers: float, members: int) -> float:
    """The least time ratio shared / separate of a uniform ensemble (the encoder's compute only)."""
    return (front + members * layers) / (members * (front + layers))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=CONFIGS, default="ssl")
    parser.add_argument("--methods", default=",".join(METHODS), help="One uniform member per method (comma-separated).")
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="ensemble-inference-") as scratch:
        scratch = Path(scratch)
        directory = write_ensemble(scratch / "ensemble", backbone_reference(args.config, scratch), methods)
        clips = make_clips(args.clips)
        results = measure(directory, clips, args.rounds, args.threads)
        front, layers = front_end_share(json.loads((directory / "backbone.json").read_text())["reference"])
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    print(f"# {args.config}: {len(methods)}-member uniform ensemble ({', '.join(methods)}), {args.clips} clips "
          f"of 0.8-1.2 s, batch 8, {args.rounds} rounds, {threads}; ratios of time, median [min-max]")
    print(report(results, args.clips, len(methods)))
    print(f"front end {1000 * front:.0f} ms, layers {1000 * layers:.0f} ms of CPU time per batch of 8 x 1 s "
          f"(1 thread): {front / (front + layers):.0%} of the encoder; a uniform {len(methods)}-member ensemble "
          f"needs at least {bound(front, layers, len(methods)):.2f}x the time of separate models")


if __name__ == "__main__":
    main()
