"""The one training loop behind every trainable (discrete placements and DARTS).

Torchtune-style: small setup functions (`setup_optimizer`, `setup_scheduler`), one
visible loop (`fit`), and an evaluation function that also returns per-example
predictions (so ensembles never need re-training). Trainers customise the loop through
:class:`Hooks` instead of copying it.

Each step has two separate parts:

1. :func:`frozen_step`: the frozen front end and the frozen layers below the lowest
   adapted layer, under ``no_grad`` (cacheable: it depends only on backbone and audio);
2. the trainable part: layers from the lowest adapted one, the head, the loss.

Batches are dicts with ``input_values`` (B, T) float, ``attention_mask`` (B, T),
``index`` (B,) example ids, and ``labels`` (B,) for classification or ``targets``
(B, S) + ``target_lengths`` (B,) for CTC (token ids from 1; 0 is the blank).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy

from pefttune.metrics import METRICS, accuracy, ctc_greedy_decode, error_rate, macro_f1
from pefttune.model import PeftSpeechModel


@dataclass
class TrainConfig:
    """Optimisation settings of one trial."""

    epochs: int = 4
    lr: float = 1e-3
    head_lr: float | None = None  # defaults to lr
    method_lr: dict = field(default_factory=dict)  # method name -> lr of that method's parameters
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # share of all steps with linear warm-up
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool = False  # autocast on CUDA only
    metric: str = "accuracy"  # accuracy | macro_f1 for classification; per | wer | cer for CTC
    max_steps_per_epoch: int | None = None

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"train.epochs: must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"train.lr: must be > 0, got {self.lr}")
        if self.metric not in METRICS:
            raise ValueError(f"train.metric: unknown metric {self.metric!r}; known: {sorted(METRICS)}")

    @property
    def mode(self) -> str:
        return METRICS[self.metric][1]

    def to_dict(self) -> dict:
        return asdict(self)


class DivergedError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class Hooks:
    """Ways a trainer customises :func:`fit` without copying it.

    - ``before_step(step, epoch)``: e.g. a DARTS architecture step;
    - ``layer_fn``: replaces how an encoder layer runs (DARTS mixed layers);
    - ``epoch_metrics(epoch)``: extra metrics merged into each epoch's report;
    - ``extra_parameters``: more parameters the weight optimizer must *not* train are
      excluded by the trainer; this list adds parameters it must train.
    """

    before_step: Callable[[int, int], None] | None = None
    layer_fn: Callable | None = None
    epoch_metrics: Callable[[int], dict] | None = None
    exclude_parameters: list[torch.nn.Parameter] = field(default_factory=list)


# -- setup --------------------------------------------------------------------------------


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def weight_parameters(model: PeftSpeechModel, hooks: Hooks | None = None) -> tuple[list, list]:
    """(PEFT parameters, head parameters) the weight optimizer trains."""
    excluded = {id(p) for p in (hooks.exclude_parameters if hooks else [])}
    head = [p for p in model.head.parameters() if p.requires_grad and id(p) not in excluded]
    head_ids = {id(p) for p in head}
    peft = [
        p for p in model.parameters() if p.requires_grad and id(p) not in head_ids and id(p) not in excluded
    ]
    return peft, head


def parameter_methods(model: torch.nn.Module) -> dict[int, str]:
    """id(parameter) -> the PEFT method that owns it.  Placements register each layer's methods
    as ``layer.pefttune[<method>]`` (a DARTS supernet's repeats as ``<method>@<candidate>``);
    a method's parameters may live elsewhere (LoRA's in the wrapped projection), so they are
    taken from ``trainable_parameters()``."""
    owner: dict[int, str] = {}
    for module in model.modules():
        methods = getattr(module, "pefttune", None)
        if isinstance(methods, torch.nn.ModuleDict):
            for key, method in methods.items():
                for param in method.trainable_parameters():
                    owner[id(param)] = key.split("@")[0]
    return owner


def setup_optimizer(model: PeftSpeechModel, config: TrainConfig, hooks: Hooks | None = None) -> torch.optim.AdamW:
    """AdamW with a group for the head (``head_lr``), one for each method of ``method_lr`` and
    one for the other PEFT parameters (``lr``)."""
    peft, head = weight_parameters(model, hooks)
    groups = [{"params": head, "lr": config.head_lr or config.lr, "name": "head"}]
    owner = parameter_methods(model) if config.method_lr else {}
    by_method: dict[str, list] = {}
    for param in peft:
        method = owner.get(id(param))
        by_method.setdefault(method if method in config.method_lr else "", []).append(param)
    for method in sorted(m for m in by_method if m):
        groups.insert(0, {"params": by_method[method], "lr": config.method_lr[method], "name": f"peft:{method}"})
    if by_method.get(""):
        groups.insert(0, {"params": by_method[""], "lr": config.lr, "name": "peft"})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def setup_scheduler(optimizer, total_steps: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base lr, then cosine decay to 0."""
    warmup = max(1, int(round(total_steps * warmup_ratio)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- the two parts of a step ---------------------------------------------------------------------


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def num_frozen_states(model: PeftSpeechModel) -> int:
    """How many hidden states h_0..h_k a step takes from the frozen encoder: k = the lowest
    adapted layer (every layer for a placement without PEFT)."""
    k = model.placement.lowest_adapted_layer()
    return (model.encoder.num_layers if k is None else k) + 1


def frozen_step(model: PeftSpeechModel, batch: dict, cache=None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Frozen hidden states h_0..h_k (k = lowest adapted layer) and the frame mask.

    With a :class:`~pefttune.frozen_cache.FrozenStateCache` they come from the cache when present.
    """
    states = num_frozen_states(model)
    if cache is not None:
        return cache.frozen_step(model, batch, states)
    hidden0, mask = model.embed(batch["input_values"], batch.get("attention_mask"))
    return model.frozen_states(hidden0, mask, states - 1), mask


def skip_cached_audio(cache, model: PeftSpeechModel, *loaders) -> None:
    """Let the loaders' datasets leave out the audio of utterances whose h_0 ``cache`` holds
    (deeper frozen states are computed from h_0): a step then reads no audio it would not use.
    Only for loaders without worker processes (the predicate reads the cache of this process)."""
    if cache is None:
        return
    for loader in loaders:
        dataset = getattr(loader.dataset, "dataset", loader.dataset)  # a Subset's dataset
        if loader.num_workers == 0 and hasattr(dataset, "skip_audio"):
            dataset.skip_audio = cache.has(1)


def autocast(config: TrainConfig, device: torch.device):
    enabled = config.bf16 and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


# -- evaluation ----------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Scores and per-example predictions on one split."""

    metric: str
    score: float
    loss: float
    arrays: dict[str, np.ndarray]  # see `predictions_arrays`

    def metrics(self, prefix: str) -> dict:
        return {f"{prefix}_{self.metric}": self.score, f"{prefix}_loss": self.loss}


def _pack_sequences(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    flat = np.array([t for s in seqs for t in s], dtype=np.int64)
    return flat, lengths


def unpack_sequences(flat: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    out, start = [], 0
    for n in lengths.tolist():
        out.append(flat[start : start + n].tolist())
        start += n
    return out


@torch.no_grad()
def evaluate(
    model: PeftSpeechModel, loader: Iterable[dict], config: TrainConfig, device=None, layer_fn=None, cache=None
) -> Evaluation:
    """Score a split and collect per-example predictions.

    Classification arrays: ``index``, ``label``, ``pred``, ``probs`` (N, C).
    CTC arrays: ``index``, ``log_probs`` (N, T_max, V) zero-padded, ``frames`` (N,),
    ``hyp_flat``/``hyp_len`` and ``ref_flat``/``ref_len`` (token sequences packed).
    """
    device = device or next(model.parameters()).device
    model.eval()
    task = model.head_config.task
    losses, weights = [], []
    idx, labels, probs = [], [], []
    log_probs, frames, hyps, refs = [], [], [], []
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(config, device):
            states, mask = frozen_step(model, batch, cache)
            out = model.forward_from(states, mask, layer_fn=layer_fn)
            loss = model.loss(out, mask, batch)
        n = batch["input_values"].shape[0]
        losses.append(float(loss) * n)
        weights.append(n)
        idx.append(batch["index"].cpu().numpy())
        out = out.float()
        if task == "classification":
            probs.append(torch.softmax(out, -1).cpu().numpy())
            labels.append(batch["labels"].cpu().numpy())
        else:
            lengths = mask.sum(1).cpu()
            log_probs.extend(lp[: int(t)].cpu().numpy() for lp, t in zip(out, lengths))
            frames.append(lengths.numpy())
            hyps += ctc_greedy_decode(out.cpu(), lengths)
            for target, length in zip(batch["targets"].cpu(), batch["target_lengths"].cpu()):
                refs.append(target[: int(length)].tolist())
    loss = float(sum(losses) / max(1, sum(weights)))
    arrays: dict[str, np.ndarray] = {"index": np.concatenate(idx).astype(np.int64)}
    if task == "classification":
        arrays["probs"] = np.concatenate(probs).astype(np.float32)
        arrays["label"] = np.concatenate(labels).astype(np.int64)
        arrays["pred"] = arrays["probs"].argmax(-1).astype(np.int64)
        if config.metric == "macro_f1":
            score = macro_f1(arrays["pred"], arrays["label"])
        else:
            score = accuracy(arrays["pred"], arrays["label"])
    else:
        t_max = max(lp.shape[0] for lp in log_probs)
        padded = np.zeros((len(log_probs), t_max, log_probs[0].shape[1]), dtype=np.float32)
        for i, lp in enumerate(log_probs):
            padded[i, : lp.shape[0]] = lp
        arrays["log_probs"] = padded
        arrays["frames"] = np.concatenate(frames).astype(np.int64)
        arrays["hyp_flat"], arrays["hyp_len"] = _pack_sequences(hyps)
        arrays["ref_flat"], arrays["ref_len"] = _pack_sequences(refs)
        score = error_rate(hyps, refs)
    return Evaluation(config.metric, float(score), loss, arrays)


def save_predictions(path: str | Path, evaluation: Evaluation) -> None:
    """Per-example predictions as safetensors (numbers only, nothing pickled)."""
    save_numpy({k: np.ascontiguousarray(v) for k, v in evaluation.arrays.items()}, str(path))


def load_predictions(path: str | Path) -> dict[str, np.ndarray]:
    return load_numpy(str(path))


# -- the loop --------------------------------------------------------------------------------------


@dataclass
class EpochResult:
    epoch: int  # 1-based
    train_loss: float
    dev: Evaluation
    samples_per_s: float
    seconds: float
    extra: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        return {
            "epoch": self.epoch,
            "train_loss": self.train_loss,
            **self.dev.metrics("dev"),
            "samples_per_s": self.samples_per_s,
            "epoch_seconds": self.seconds,
            **self.extra,
        }


def train_epoch(
    model: PeftSpeechModel,
    loader: Iterable[dict],
    optimizer,
    scheduler,
    config: TrainConfig,
    epoch: int,
    hooks: Hooks | None = None,
    device=None,
    cache=None,
) -> tuple[float, int, float]:
    """One pass over ``loader``: (mean train loss, samples seen, seconds)."""
    device = device or next(model.parameters()).device
    hooks = hooks or Hooks()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()
    total, seen, start = 0.0, 0, time.perf_counter()
    for step, batch in enumerate(loader):
        if config.max_steps_per_epoch is not None and step >= config.max_steps_per_epoch:
            break
        batch = to_device(batch, device)
        if hooks.before_step is not None:
            hooks.before_step(step, epoch)
            if not model.training:  # a hook that switched to eval (train() walks every module)
                model.train()
        with autocast(config, device):
            states, mask = frozen_step(model, batch, cache)
            out = model.forward_from(states, mask, layer_fn=hooks.layer_fn)
            loss = model.loss(out, mask, batch)
        if not torch.isfinite(loss):
            raise DivergedError(f"loss became {float(loss)} at epoch {epoch}, step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        n = batch["input_values"].shape[0]
        total += loss.item() * n
        seen += n
    return total / max(1, seen), seen, time.perf_counter() - start


def fit(
    model: PeftSpeechModel,
    train_loader,
    dev_loader,
    config: TrainConfig,
    *,
    optimizer=None,
    scheduler=None,
    start_epoch: int = 1,
    end_epoch: int | None = None,
    hooks: Hooks | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
    device=None,
    cache=None,
) -> list[EpochResult]:
    """Train epochs ``start_epoch..end_epoch`` (default ``config.epochs``) of the schedule of
    ``config.epochs`` epochs; evaluate on dev after each.

    ``on_epoch`` receives each :class:`EpochResult` (the Ray trainable reports and
    checkpoints there). ``cache`` (a :class:`~pefttune.frozen_cache.FrozenStateCache`) serves the
    frozen part of each step. Raises :class:`DivergedError` on a NaN/inf loss.
    """
    hooks = hooks or Hooks()
    device = device or next(model.parameters()).device
    if optimizer is None:
        optimizer = setup_optimizer(model, config, hooks)
    if scheduler is None:
        steps = config.epochs * _steps_per_epoch(train_loader, config)
        scheduler = setup_scheduler(optimizer, steps, config.warmup_ratio)
    results = []
    for epoch in range(start_epoch, min(end_epoch or config.epochs, config.epochs) + 1):
        train_loss, seen, seconds = train_epoch(
            model, train_loader, optimizer, scheduler, config, epoch, hooks, device, cache
        )
        dev = evaluate(model, dev_loader, config, device, layer_fn=hooks.layer_fn, cache=cache)
        extra = hooks.epoch_metrics(epoch) if hooks.epoch_metrics else {}
        result = EpochResult(epoch, train_loss, dev, seen / max(seconds, 1e-9), seconds, extra)
        results.append(result)
        if on_epoch is not None:
            on_epoch(result)
    return results


def _steps_per_epoch(loader, config: TrainConfig) -> int:
    steps = len(loader)
    if config.max_steps_per_epoch is not None:
        steps = min(steps, config.max_steps_per_epoch)
    return max(1, steps)


def is_better(score: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return score > best if mode == "max" else score < best
