"""Helpers shared by the Ray Tune trainables (discrete placements and DARTS).

- backbone shape without weights (:func:`backbone_info`), the trial's
  :class:`~pefttune.training.TrainConfig` (:func:`train_config`), device and threads;
- data: :func:`prepare_data` (driver: make sure the corpus/manifest exists through
  :mod:`pefttune.data`, check the splits, fix the vocabulary) and :func:`load_data` (trial:
  :class:`pefttune.data.dataset.SpeechDataset` loaders with an epoch-seeded sampler, so a
  resumed trial sees the same batches as an uninterrupted one);
- checkpoints: :func:`write_checkpoint` / :func:`read_checkpoint` and
  :func:`report` (writes a checkpoint into a temporary directory and hands it to
  ``tune.report`` through ``tune.Checkpoint.from_directory``);
- the end of a trial: :func:`final_evaluation` scores the best-dev weights on dev and test
  and returns per-example predictions, stored in the final checkpoint.

Checkpoint layout (nothing pickled; optimizer state via ``torch.load(weights_only=True)``)::

    state.json                 epoch, best score/epoch, finished, last reported metrics
    model/                     PeftSpeechModel.save: adapter.safetensors (PEFT + head
                               weights, current), placement.json, model.json
    best/                      the same for the best-dev weights (load_model_dir works)
    trainer_state.pt           optimizer, scheduler and torch RNG state (tensors only)
    predictions/dev.safetensors, predictions/test.safetensors   final checkpoint only
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from pefttune.backbones import SHIPPED, TINY_BACKBONES, BackboneInfo, shipped_dir, tiny_config
from pefttune.heads import Head, HeadConfig
from pefttune.model import MODEL_FILE, PLACEMENT_FILE, WEIGHTS_FILE, PeftSpeechModel
from pefttune.placement import Placement
from pefttune.metrics import METRICS
from pefttune.training import Evaluation, TrainConfig, evaluate, load_predictions, save_predictions

STATE_FILE = "state.json"
TRAINER_FILE = "trainer_state.pt"
MODEL_DIR = "model"
BEST_DIR = "best"
PREDICTIONS_DIR = "predictions"
DIVERGED_MARKER = "DIVERGED"

if TYPE_CHECKING:  # pydantic is not needed to train or to read checkpoints
    from pefttune.config import ExperimentConfig


# -- trial setup -------------------------------------------------------------------------------


def backbone_info(name: str) -> BackboneInfo:
    """Shape of a backbone from its config only (no weights loaded)."""
    from transformers import AutoConfig

    if name in TINY_BACKBONES:
        return BackboneInfo.from_config(tiny_config(TINY_BACKBONES[name]), name)
    if name in SHIPPED:
        source = shipped_dir(name)
        if not (source / "config.json").exists():
            raise FileNotFoundError(f"backbone: shipped weights for {name!r} are missing at {source}")
        return BackboneInfo.from_config(AutoConfig.from_pretrained(str(source)), name)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"backbone: {path} has no config.json (expected a save_pretrained directory)")
        return BackboneInfo.from_config(AutoConfig.from_pretrained(str(path)), str(path.resolve()))
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"backbone: local path {name} does not exist")
    try:
        return BackboneInfo.from_config(AutoConfig.from_pretrained(name), name)
    except OSError as err:
        raise ValueError(
            f"backbone: {name!r} is neither a built-in backbone, a local directory, "
            f"nor a Hugging Face id available offline ({err.__class__.__name__})"
        ) from err


def train_config(config: ExperimentConfig, **overrides) -> TrainConfig:
    """The training loop's settings for one trial of ``config`` (``overrides``: e.g. lr)."""
    train = config.train
    values = dict(
        epochs=train.epochs,
        lr=train.lr,
        head_lr=train.head_lr,
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


def metric_mode(metric: str) -> str:
    return METRICS[metric][1]


def worst_score(mode: str) -> float:
    """Score reported by a trial that never trained (over budget): 0 for max, inf for min."""
    return 0.0 if mode == "max" else math.inf


def trial_device(gpus: float, wait_s: float = 0.0, poll_s: float = 1.0) -> torch.device:
    """The trial's device. On a GPU, first wait (up to ``wait_s``) until the free memory
    reaches the trial's share ``min(gpus, 1) x total``, so a trial does not start while the
    previous occupant of its slot is still releasing memory."""
    if gpus > 0:
        if not torch.cuda.is_available():
            raise RuntimeError("resources.gpu > 0 but this trial sees no CUDA device")
        wait_for_gpu_memory(min(gpus, 1.0), wait_s, poll_s)
        return torch.device("cuda")
    return torch.device("cpu")


def wait_for_gpu_memory(share: float, wait_s: float, poll_s: float = 1.0) -> float:
    """Seconds waited until ``free >= share x total`` GPU memory (gives up after ``wait_s``)."""
    start = time.monotonic()
    while True:
        free, total = torch.cuda.mem_get_info()
        waited = time.monotonic() - start
        if free >= share * total or waited >= wait_s:
            if free < share * total:
                print(f"[pefttune] GPU memory still busy after {waited:.0f}s "
                      f"({free / 2**30:.1f} of {total / 2**30:.1f} GiB free); starting anyway", flush=True)
            return waited
        time.sleep(poll_s)


def set_threads(cpus: float) -> None:
    torch.set_num_threads(max(1, int(cpus)))


def head_parameters(info: BackboneInfo, head: HeadConfig) -> int:
    """Trainable parameters of the head (weighted layer sum + task head), without a backbone."""
    return sum(p.numel() for p in Head(info.num_layers + 1, info.hidden_size, head).parameters())


def placement_columns(placement: Placement) -> dict:
    """Result columns describing a placement: JSON, short form, one column per layer."""
    columns = {
        "placement": json.dumps(placement.to_dict(), separators=(",", ":")),
        "placement_short": placement.short(),
    }
    for index, label in enumerate(placement.layer_methods()):
        columns[f"layer_{index:02d}"] = label
    return columns


def parse_placement(value) -> Placement:
    """A placement from a trial config value: dict, JSON string or Placement."""
    if isinstance(value, Placement):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"trial config 'placement': not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"trial config 'placement': expected a placement mapping or JSON string, got {value!r}")
    return Placement.from_dict(value)


# -- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataRef:
    """What a trial needs to load its data: small and picklable, made once on the driver."""

    manifest: str  # absolute path of the manifest (parquet/csv/tsv)
    task_kind: str  # classification | ctc
    vocab: dict  # LabelVocab/TokenVocab.to_dict(), fixed from the train split

    def vocabulary(self):
        from pefttune.data.vocab import LabelVocab, TokenVocab

        if self.vocab["kind"] == "labels":
            return LabelVocab(tuple(self.vocab["labels"]))
        return TokenVocab(tuple(self.vocab["tokens"]), self.vocab.get("unit", "phoneme"))

    @property
    def num_outputs(self) -> int:
        return len(self.vocabulary())

    def head_config(self, experiment: ExperimentConfig) -> HeadConfig:
        return HeadConfig(self.task_kind, self.num_outputs, experiment.head.kind, experiment.head.hidden)


def _unit(config: ExperimentConfig) -> str:
    return "char" if config.data.task == "asr" else "phoneme"


def prepare_data(config: ExperimentConfig) -> DataRef:
    """Driver side, before Ray starts: make sure the data exist (synthesize the corpus or
    index the dataset folder once, :func:`pefttune.data.sources.manifest_for`), check every
    split and fix the vocabulary from train. Errors name ``data.path``/``data.source``."""
    from pefttune.data.dataset import SpeechDataset
    from pefttune.data.sources import manifest_for

    data = config.data
    where = f"data.path: {data.path}" if data.path else f"data.source: {data.source}"
    try:
        manifest = manifest_for(data.source, data.task, path=data.path, seed=data.seed, per_class=data.per_class)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{where}: {err}") from None
    task_kind = config.task_kind
    try:
        train = SpeechDataset(manifest, "train", task_kind, unit=_unit(config), on_error=data.on_error)
        for split in ("dev", "test"):
            SpeechDataset(manifest, split, task_kind, vocab=train.vocab, on_error=data.on_error)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"{where} (manifest {manifest}): {err}") from None
    return DataRef(str(Path(manifest).resolve()), task_kind, train.vocab.to_dict())


def _trial_dataset_class():
    from pefttune.data.dataset import SpeechDataset

    class TrialDataset(SpeechDataset):
        """A split of the manifest; ``frame`` is its manifest rows (labels for stratified splits)."""

        @property
        def frame(self):
            return self.rows

    return TrialDataset


@dataclass
class TaskData:
    """A trial's data loaders; ``train_sampler`` lets a resumed trial continue the order."""

    train: torch.utils.data.DataLoader
    dev: torch.utils.data.DataLoader
    test: torch.utils.data.DataLoader
    train_sampler: "EpochSampler"

    def steps_per_epoch(self, max_steps: int | None = None) -> int:
        steps = len(self.train)
        return max(1, min(steps, max_steps) if max_steps else steps)


def load_data(config: ExperimentConfig, ref: DataRef, seed: int = 0, num_workers: int = 0) -> TaskData:
    """Data loaders of the train/dev/test splits (trial side), batches as
    :func:`pefttune.data.dataset.collate_batch` makes them. Train is shuffled by an
    :class:`EpochSampler` and cropped to ``data.max_seconds``; dev/test keep manifest order."""
    from pefttune.data.dataset import collate_batch

    dataset = _trial_dataset_class()
    vocab = ref.vocabulary()
    data = config.data

    def split(name: str, max_seconds=None):
        return dataset(ref.manifest, name, ref.task_kind, vocab=vocab, unit=_unit(config), on_error=data.on_error,
                       max_seconds=max_seconds, validate=False)

    train = split("train", data.max_seconds)
    sampler = EpochSampler(len(train), seed)
    loader = dict(batch_size=data.batch_size, collate_fn=collate_batch, num_workers=num_workers)
    return TaskData(
        train=torch.utils.data.DataLoader(train, sampler=sampler, **loader),
        dev=torch.utils.data.DataLoader(split("dev"), shuffle=False, **loader),
        test=torch.utils.data.DataLoader(split("test"), shuffle=False, **loader),
        train_sampler=sampler,
    )


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles with seed ``(seed, epoch)``; each ``__iter__`` is the next epoch.

    A resumed trial calls :meth:`set_epoch` with the last finished epoch, so its next
    epoch sees the same order as in an uninterrupted run.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        self.epoch += 1
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def frozen_cache(experiment: ExperimentConfig, ref: DataRef, model: PeftSpeechModel):
    """The trial's :class:`~pefttune.cache.FrozenStateCache` (None when ``train.frozen_cache: off``).

    Keyed by the backbone's content hash, the manifest's bytes and the preprocessing, so a
    changed backbone, dataset or crop never reads stale states. On disk it lives under
    ``<pefttune cache>/frozen/`` and is shared by all trials on the node, up to
    ``train.frozen_cache_disk_gb`` for all of them together. Prints its size: for the
    manifest when it has durations, else per second of audio.
    """
    from pefttune.cache import FrozenStateCache, cache_key, estimate_bytes, format_bytes
    from pefttune.data.cache import cache_root

    mode = experiment.train.frozen_cache
    if mode == "off":
        return None
    preprocessing = {"sample_rate": 16000, "normalize": True, "max_seconds": experiment.data.max_seconds}
    key = cache_key(model.encoder.content_hash(), ref.manifest, preprocessing)
    directory = cache_root() / "frozen" if mode == "disk" else None
    k = model.placement.lowest_adapted_layer()
    states = (model.encoder.num_layers if k is None else k) + 1
    per_second = estimate_bytes(1, 49, states, model.encoder.config.hidden_size)
    memory_gb, disk_gb = experiment.train.frozen_cache_memory_gb, experiment.train.frozen_cache_disk_gb
    caps = f"memory cap {memory_gb:.1f} GiB" + (f", disk cap {disk_gb:.1f} GiB" if mode == "disk" else "")
    size = f"about {per_second / 2**10:.0f} KiB per second of audio ({caps})"
    try:  # the manifest's durations (train cropped to data.max_seconds); never fails the trial
        from pefttune.data.manifest import read_manifest

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


# -- checkpoints -------------------------------------------------------------------------------


@dataclass
class CheckpointState:
    """What a trial needs, besides weights, to resume or to be read afterwards."""

    epoch: int = 0  # last finished epoch
    best_score: float | None = None
    best_epoch: int = 0
    finished: bool = False  # final evaluation done, predictions stored
    metrics: dict = field(default_factory=dict)  # the metrics reported with this checkpoint

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=_json_default) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "CheckpointState":
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def trainable_state(model: PeftSpeechModel) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable (PEFT + head) weights."""
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in model.trainable_named_parameters().items()}


def load_trainable_state(model: PeftSpeechModel, state: dict[str, torch.Tensor]) -> None:
    own = model.trainable_named_parameters()
    if set(own) != set(state):
        raise ValueError(f"weights do not match the model: missing {sorted(set(own) - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - set(own))[:5]}")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def write_checkpoint(
    directory: str | Path,
    model: PeftSpeechModel,
    state: CheckpointState,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    best_weights: dict[str, torch.Tensor] | None = None,
    predictions: dict[str, Evaluation] | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write a checkpoint directory (layout in the module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / MODEL_DIR, metadata=metadata)
    if best_weights is not None:
        best = directory / BEST_DIR
        best.mkdir(exist_ok=True)
        save_file(best_weights, str(best / WEIGHTS_FILE))
        for name in (PLACEMENT_FILE, MODEL_FILE):
            shutil.copyfile(directory / MODEL_DIR / name, best / name)
    if optimizer is not None:
        trainer = {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
        if scheduler is not None:
            trainer["scheduler"] = scheduler.state_dict()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            trainer["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save(trainer, directory / TRAINER_FILE)
    if predictions:
        (directory / PREDICTIONS_DIR).mkdir(exist_ok=True)
        for split, evaluation in predictions.items():
            save_predictions(directory / PREDICTIONS_DIR / f"{split}.safetensors", evaluation)
    (directory / STATE_FILE).write_text(state.to_json())
    return directory


def read_state(directory: str | Path) -> CheckpointState:
    path = Path(directory) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {directory}: missing {STATE_FILE}")
    return CheckpointState.from_json(path.read_text())


def read_checkpoint(
    directory: str | Path,
    model: PeftSpeechModel | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
) -> tuple[CheckpointState, dict[str, torch.Tensor] | None]:
    """Restore what :func:`write_checkpoint` wrote into ``model``/``optimizer``/``scheduler``.

    Returns the state and the best-dev weights (None if the checkpoint has none).
    """
    directory = Path(directory)
    state = read_state(directory)
    if model is not None:
        model.load_weights(directory / MODEL_DIR / WEIGHTS_FILE)
    best = directory / BEST_DIR / WEIGHTS_FILE
    best_weights = load_file(str(best)) if best.exists() else None
    trainer_path = directory / TRAINER_FILE
    if optimizer is not None:
        if not trainer_path.exists():
            raise FileNotFoundError(f"checkpoint {directory}: missing {TRAINER_FILE}")
        trainer = torch.load(trainer_path, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(trainer["optimizer"])
        if scheduler is not None and "scheduler" in trainer:
            scheduler.load_state_dict(trainer["scheduler"])
        torch.set_rng_state(trainer["torch_rng"])
        if "cuda_rng" in trainer and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(trainer["cuda_rng"])
    return state, best_weights


def checkpoint_predictions(directory: str | Path, split: str) -> dict:
    """Per-example predictions stored in a final checkpoint (see training.evaluate)."""
    path = Path(directory) / PREDICTIONS_DIR / f"{split}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {directory}: no {split} predictions (not a final checkpoint?)")
    return load_predictions(path)


def report(metrics: dict, write: Callable[[Path], None] | None = None) -> None:
    """``tune.report`` the metrics, with a checkpoint written by ``write(dir)`` if given.

    The checkpoint is written to a temporary directory that Ray copies to the
    experiment's storage during the call; the temporary copy is removed afterwards.
    """
    from ray import tune

    if write is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="pefttune-ckpt-") as tmp:
        write(Path(tmp))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


# -- the end of a trial ----------------------------------------------------------------------------


def final_evaluation(
    model: PeftSpeechModel,
    best_weights: dict[str, torch.Tensor] | None,
    loaders: dict,
    config: TrainConfig,
    device=None,
    layer_fn=None,
    cache=None,
) -> dict[str, Evaluation]:
    """Load the best-dev weights into ``model`` and evaluate every split in ``loaders``."""
    if best_weights is not None:
        load_trainable_state(model, best_weights)
    return {
        split: evaluate(model, loader, config, device, layer_fn=layer_fn, cache=cache) for split, loader in loaders.items()
    }


# -- files in the experiment's storage --------------------------------------------------------------


def storage_filesystem(path: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI (s3://, gs://, ...)."""
    import pyarrow.fs

    if "://" not in path:
        return pyarrow.fs.LocalFileSystem(), path
    return pyarrow.fs.FileSystem.from_uri(path)


def read_storage_text(path: str) -> str | None:
    """Text of a file in storage, or None if it does not exist."""
    import pyarrow.fs

    fs, inner = storage_filesystem(path)
    if fs.get_file_info(inner).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(inner) as stream:
        return stream.read().decode()


def write_storage_text(path: str, text: str) -> None:
    fs, inner = storage_filesystem(path)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(inner) as stream:
        stream.write(text.encode())


# -- divergence and other per-trial markers ------------------------------------------------------------


def trial_storage_dir(experiment_path: str | None) -> str | None:
    """This trial's folder in the experiment's storage, ``<experiment>/<trial name>``.

    It is the same for every attempt of the trial (retries, resumes), unlike the local
    working directory; the search names trial folders after the trial (trial_dirname_creator).
    None outside a Tune session or without an experiment path.
    """
    if not experiment_path:
        return None
    try:
        from ray import tune

        name = tune.get_context().get_trial_name()
    except Exception:  # noqa: BLE001 - not inside a Tune session
        return None
    return f"{experiment_path.rstrip('/')}/{name}"


def read_marker(trial_dir: str | None, name: str) -> str | None:
    return read_storage_text(f"{trial_dir}/{name}") if trial_dir else None


def write_marker(trial_dir: str | None, name: str, text: str) -> None:
    if trial_dir:
        write_storage_text(f"{trial_dir}/{name}", text)


def trial_dir(experiment_path: str | None = None) -> str | Path | None:
    """Where this trial keeps its markers: the stable storage folder when the experiment
    path is known (:func:`trial_storage_dir`), else Ray's local working directory (which a
    retried trial may not get back). None outside Ray Tune."""
    stable = trial_storage_dir(experiment_path)
    if stable is not None:
        return stable
    try:
        from ray import tune

        return Path(tune.get_context().get_trial_dir())
    except Exception:  # noqa: BLE001 - not inside a Tune session
        return None


def diverged_message(directory: str | Path | None) -> str | None:
    """The message of an earlier divergence of this trial, if any (divergence is sticky)."""
    return read_marker(str(directory), DIVERGED_MARKER) if directory else None


def mark_diverged(directory: str | Path | None, message: str) -> None:
    write_marker(str(directory) if directory else None, DIVERGED_MARKER, message)
