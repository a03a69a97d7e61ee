"""What every trial of an experiment shares, built once on the driver.

- :class:`TrialSetup` (passed to the trainables through ``tune.with_parameters``) and
  :func:`make_setup`;
- :class:`Faults`: the test seam; tests fill it to inject failures, NaNs or delays into
  trials; production runs pass none;
- the trial's :class:`~pefttune.training.TrainConfig` (:func:`train_config`), the head's
  parameter count, and the frozen-prefix cache (:func:`frozen_cache`).
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from pefttune.backbones import BackboneInfo, backbone_info
from pefttune.cache_dir import cache_root
from pefttune.data.loaders import DataRef, load_data, prepare_data
from pefttune.data.manifest import read_manifest
from pefttune.frozen_cache import FrozenStateCache, cache_key, estimate_bytes, format_bytes
from pefttune.heads import Head, HeadConfig
from pefttune.model import PeftSpeechModel, build_model
from pefttune.placement import Placement
from pefttune.runtime.cluster import set_threads
from pefttune.runtime.study_dir import study_dir
from pefttune.runtime.storage import write_storage_text
from pefttune.training import TrainConfig, num_frozen_states

if TYPE_CHECKING:  # pydantic is not needed to train or to read checkpoints
    from pefttune.config import StudyConfig


@dataclass
class Faults:
    """Faults a test injects into trials (a test seam: production passes ``None``).

    Each hook receives the trial's config, so one hook object can target some trials only.

    - ``before_step(trial_config, model, step, epoch)``: runs before every training step;
    - ``after_epoch(trial_config, epoch, trial_dir)``: runs after each epoch's report (and
      checkpoint); ``trial_dir`` is the trial's folder in the experiment storage (stable
      across retries), where a hook can leave markers.
    """

    before_step: Callable | None = None
    after_epoch: Callable | None = None


@dataclass
class TrialSetup:
    """What every trial shares (passed once through ``tune.with_parameters``)."""

    experiment: StudyConfig
    data: DataRef
    ray_dir: str | None = None  # the Ray experiment's folder: per-trial markers live there
    faults: Faults | None = None

    @property
    def head(self) -> HeadConfig:
        return self.data.head_config(self.experiment)

    def before_step(self, trial_config: dict, model):
        """A ``Hooks.before_step`` callback for this trial, or None."""
        hook = self.faults.before_step if self.faults else None
        if hook is None:
            return None
        return lambda step, epoch: hook(trial_config, model, step, epoch)

    def after_epoch(self, trial_config: dict, epoch: int, trial_dir) -> None:
        if self.faults and self.faults.after_epoch:
            self.faults.after_epoch(trial_config, epoch, None if trial_dir is None else str(trial_dir))


def make_setup(config: StudyConfig, ray_dir: str, faults: Faults | None = None) -> TrialSetup:
    """The trials' shared setup; a local backbone path is made absolute (trials run in
    their own working directories)."""
    backbone = Path(config.backbone).expanduser()
    if config.backbone.startswith((".", "/", "~")) or backbone.exists():
        config = config.model_copy(update={"backbone": str(backbone.resolve())})
    data = prepare_data(config)
    if data.skipped:  # recorded in the experiment folder (and so in the report)
        write_skipped_audio(data, study_dir(config))
    return TrialSetup(experiment=config, data=data, ray_dir=ray_dir, faults=faults)


SKIPPED_AUDIO = "skipped_audio.csv"


def write_skipped_audio(data: DataRef, root: str) -> None:
    """``<experiment>/skipped_audio.csv``: the manifest rows the audio check dropped."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", "split", "path", "reason"])
    writer.writerows(data.skipped)
    write_storage_text(f"{root}/{SKIPPED_AUDIO}", buffer.getvalue())


def train_config(config: StudyConfig, **overrides) -> TrainConfig:
    """The training loop's settings for one trial of ``config`` (``overrides``: e.g. lr)."""
    train = config.train
    values = dict(
        epochs=train.epochs,
        lr=train.lr,
        head_lr=train.head_lr,
        method_lr=dict(train.method_lr),
        weight_decay=train.weight_decay,
        warmup_ratio=train.warmup_ratio,
        grad_clip=train.grad_clip,
        seed=train.seed,
        bf16=train.bf16,
        metric=config.metric,
        max_steps_per_epoch=train.max_steps_per_epoch,
    )
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


def head_parameters(info: BackboneInfo, head: HeadConfig) -> int:
    """Trainable parameters of the head (weighted layer sum + task head), without a backbone."""
    return sum(p.numel() for p in Head(info.num_layers + 1, info.hidden_size, head).parameters())


def frozen_cache(experiment: StudyConfig, ref: DataRef, model: PeftSpeechModel):
    """The trial's :class:`~pefttune.frozen_cache.FrozenStateCache` (None when ``train.frozen_cache: off``).

    Keyed by the backbone's content hash, the manifest's bytes and the preprocessing, so a
    changed backbone, dataset or crop never reads stale states. On disk it lives under
    ``<pefttune cache>/frozen/`` and is shared by all trials on the node, up to
    ``train.frozen_cache_disk_gb`` for all of them together. Prints its size: for the
    manifest when it has durations, else per second of audio.
    """
    mode = experiment.train.frozen_cache
    if mode == "off":
        return None
    preprocessing = {"sample_rate": 16000, "normalize": True, "max_seconds": experiment.data.max_seconds}
    key = cache_key(model.encoder.content_hash(), ref.manifest, preprocessing)
    directory = cache_root() / "frozen" if mode == "disk" else None
    states = num_frozen_states(model)
    per_second = estimate_bytes(1, 49, states, model.encoder.config.hidden_size)
    memory_gb, disk_gb = experiment.train.frozen_cache_memory_gb, experiment.train.frozen_cache_disk_gb
    caps = f"memory cap {memory_gb:.1f} GiB" + (f", disk cap {disk_gb:.1f} GiB" if mode == "disk" else "")
    size = f"about {per_second / 2**10:.0f} KiB per second of audio ({caps})"
    try:  # the manifest's durations (train cropped to data.max_seconds); never fails the trial
        rows = read_manifest(ref.manifest)
        seconds = rows["duration"].astype(float)
        if experiment.data.max_seconds:
            seconds = seconds.where(rows["split"] != "train", seconds.clip(upper=experiment.data.max_seconds))
        total = float(seconds.sum(skipna=False)) * per_second
        if math.isfinite(total):
            cap = disk_gb if mode == "disk" else memory_gb
            size = (f"about {format_bytes(total)} for {len(rows)} utterances ({caps})"
                    + (f"; above the {mode} cap" if total > cap * 2**30 else ""))
    except Exception:
        pass
    print(f"[pefttune] frozen cache {mode} key {key}: {states} hidden state(s) per utterance, {size}", flush=True)
    max_disk = int(disk_gb * 2**30) if mode == "disk" else None
    return FrozenStateCache(key, directory, max_memory_bytes=int(memory_gb * 2**30), max_disk_bytes=max_disk)


def prefill_frozen_cache(experiment: StudyConfig, ref: DataRef, workers: int | None = None) -> int:
    """Compute h_0 (the frozen front end's output) of every utterance the disk cache lacks,
    before any trial starts; returns how many were computed.

    Without it, the first trials of a cold run each compute the states of every utterance they
    meet, the same utterances at the same time.  Here each is computed once, by ``workers``
    processes (default: one per trial slot, ``search.max_concurrent``, as far as the machine's
    CPUs hold them) with the trials' own thread
    count (``resources.cpu``) and the cache's own per-utterance computation, so the numbers
    are those a trial would have cached.  Trials whose lowest adapted layer is above 0 (and
    the ``frozen`` reference) compute their deeper states from these h_0, reading no audio.
    Nothing to do when the cache is not on disk or trials run on GPUs."""
    if experiment.train.frozen_cache != "disk" or experiment.resources.gpu > 0:
        return 0
    if not uncached_utterances(experiment, ref):  # a warm cache (a resume, a second study): no process started
        return 0
    threads = max(1, int(experiment.resources.cpu))
    workers = workers or max(1, min((os.cpu_count() or 1) // threads, experiment.search.max_concurrent))
    if workers == 1:
        return _prefill_share(experiment, ref, 0, 1)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return sum(pool.map(_prefill_share, [experiment] * workers, [ref] * workers, range(workers),
                            [workers] * workers))


def prefill_local(experiment: StudyConfig, ref: DataRef, address: str | None) -> float | None:
    """:func:`prefill_frozen_cache` for a local run (``address`` None: the trials share this
    machine's cache), with one line on what it did; returns its seconds, None when it computed
    nothing.  Used by ``pefttune run``, ``search`` and ``darts`` alike, always with the
    experiment's own ``resources``, so each caches the numbers the others would."""
    if address is not None:
        return None
    start = time.perf_counter()
    filled = prefill_frozen_cache(experiment, ref)
    if not filled:
        return None
    seconds = time.perf_counter() - start
    print(f"frozen cache: the front end's states of {filled} utterances computed before the trials "
          f"({seconds:.0f} s)", flush=True)
    return seconds


def _frozen_model_and_cache(experiment: StudyConfig, ref: DataRef) -> tuple[PeftSpeechModel, FrozenStateCache]:
    """The frozen encoder (no PEFT) and the experiment's disk cache, built quietly: the weights'
    loading bars and the cache's size line are the trials' to print."""
    info = backbone_info(experiment.backbone)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        model = build_model(experiment.backbone, Placement.from_dict({"num_layers": info.num_layers, "layers": {}}),
                            ref.head_config(experiment)).eval()
        cache = frozen_cache(experiment, ref, model)
    cache.max_memory_bytes = 0  # nothing kept in this process
    return model, cache


def uncached_utterances(experiment: StudyConfig, ref: DataRef) -> int:
    """How many utterances of the experiment's splits have no states in the disk cache (0 when
    the cache is off or not on disk: nothing a prefill could add). Reads no audio."""
    if experiment.train.frozen_cache != "disk":
        return 0
    _, cache = _frozen_model_and_cache(experiment, ref)
    data = load_data(experiment, ref)
    return sum(not cache.on_disk(row) for loader in (data.train, data.dev, data.test)
               for row in loader.dataset.row_ids)


def _prefill_share(experiment: StudyConfig, ref: DataRef, share: int, shares: int) -> int:
    """Utterances ``index % shares == share`` of :func:`prefill_frozen_cache`, in one process."""
    set_threads(experiment.resources.cpu)
    model, cache = _frozen_model_and_cache(experiment, ref)
    data = load_data(experiment, ref)
    done = 0
    with torch.no_grad():
        for loader in (data.train, data.dev, data.test):
            loader.dataset.skip_audio = lambda index: index % shares != share or cache.on_disk(index)
            for batch in loader:
                done += cache.fill(model, batch, 1)
    return done
