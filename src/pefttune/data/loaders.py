"""A trial's data: what the driver fixes once, and the loaders each trial builds from it.

- :func:`prepare_data` (driver, before Ray starts): make sure the corpus/manifest exists
  through :mod:`pefttune.data.sources`, check every audio file it names
  (:func:`pefttune.data.check.check_audio`: all bad files in one error, or dropped under
  ``data.on_error: skip``), check the splits, fix the vocabulary from train; returns a small
  picklable :class:`DataRef`;
- :func:`load_data` (trial): :class:`~pefttune.data.dataset.SpeechDataset` loaders with an
  :class:`EpochSampler`, so a resumed trial sees the same batches as an uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from pefttune.data.check import check_audio
from pefttune.data.dataset import SpeechDataset, collate_batch, length_buckets
from pefttune.data.manifest import ManifestError, limit_rows, missing_columns_message, read_manifest
from pefttune.data.sources import manifest_for
from pefttune.data.vocab import LabelVocab, TokenVocab
from pefttune.heads import HeadConfig

if TYPE_CHECKING:  # pydantic is not needed to train
    from pefttune.config import StudyConfig


@dataclass(frozen=True)
class DataRef:
    """What a trial needs to load its data: small and picklable, made once on the driver."""

    manifest: str  # absolute path of the manifest (parquet/csv/tsv)
    task_kind: str  # classification | ctc
    vocab: dict  # LabelVocab/TokenVocab.to_dict(), fixed from the train split
    skipped: tuple = ()  # (row, split, path, reason) of rows dropped by the audio check (on_error: skip)
    subset: tuple[int, ...] | None = None  # the row ids data.max_utterances drew (None: every row)

    def rows(self):
        """The manifest's rows in use: those data.max_utterances drew, without those the audio check dropped."""
        frame = read_manifest(self.manifest)
        if self.subset is not None:
            frame = frame.loc[list(self.subset)]
        if self.skipped:
            frame = frame.drop(index=[row for row, *_ in self.skipped], errors="ignore")
        return frame

    def vocabulary(self):
        if self.vocab["kind"] == "labels":
            return LabelVocab(tuple(self.vocab["labels"]))
        return TokenVocab(tuple(self.vocab["tokens"]), self.vocab.get("unit", "phoneme"))

    @property
    def num_outputs(self) -> int:
        return len(self.vocabulary())

    def head_config(self, experiment: StudyConfig) -> HeadConfig:
        return HeadConfig(self.task_kind, self.num_outputs, experiment.head.kind, experiment.head.hidden,
                          experiment.head.resolved_norm(self.task_kind))


def _unit(config: StudyConfig) -> str:
    return "char" if config.data.task == "asr" else "phoneme"


def prepare_data(config: StudyConfig, progress: bool | None = None) -> DataRef:
    """Driver side, before Ray starts: make sure the data exist (synthesize the corpus or
    index the dataset folder once, :func:`pefttune.data.sources.manifest_for`), check every
    audio file (one error naming every bad file; under ``data.on_error: skip`` they are
    dropped and listed in the DataRef), check every split and fix the vocabulary from train.
    With ``data.max_utterances`` only the drawn rows are checked and used (``DataRef.subset``).
    Errors name ``data.path``/``data.source``."""
    data = config.data
    where = f"data.path: {data.path}" if data.path else f"data.source: {data.source}"
    same = data.source == "manifest" and data.path is not None
    try:
        sizes = {k: v for k, v in (("test_per_class", data.test_per_class), ("sentences", data.sentences),
                                   ("test_speakers", data.test_speakers)) if v is not None}
        manifest = manifest_for(data.source, data.task, path=data.path, seed=data.seed, per_class=data.per_class,
                                **sizes)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{where}: {err}") from None
    task_kind = config.task_kind
    if not (same and Path(data.path).expanduser().resolve() == Path(manifest).resolve()):
        where = f"{where} (manifest {manifest})"
    try:
        frame = read_manifest(manifest)
        missing = [c for c in ("split", "label" if task_kind == "classification" else "transcript")
                   if c not in frame.columns]
        if missing:  # before the audio check reads every header
            raise ManifestError(missing_columns_message(missing, frame.columns, task_kind))
        if data.max_utterances is not None:
            frame = limit_rows(frame, data.max_utterances, data.seed,
                               "label" if task_kind == "classification" else None)
        checked = check_audio(frame, on_error=data.on_error, progress=progress)
    except ValueError as err:  # AudioCheckError: every bad file, before any compute
        raise ValueError(f"{where}: {str(err).removeprefix(f'{manifest}: ')}") from None
    if checked.bad:
        print(f"[pefttune] {checked.summary()} (data.on_error: skip)", flush=True)
    rows = checked.kept
    try:
        train = SpeechDataset(rows, "train", task_kind, unit=_unit(config), on_error=data.on_error)
        for split in ("dev", "test"):
            SpeechDataset(rows, split, task_kind, vocab=train.vocab, on_error=data.on_error)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"{where}: {err}") from None
    skipped = tuple((int(b.row), b.split, b.path, b.reason) for b in checked.bad)
    subset = tuple(int(i) for i in frame.index) if data.max_utterances is not None else None
    return DataRef(str(Path(manifest).resolve()), task_kind, train.vocab.to_dict(), skipped, subset)


class TrialDataset(SpeechDataset):
    """A split of the manifest; ``frame`` is its manifest rows (labels for stratified splits)."""

    @property
    def frame(self):
        return self.rows


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


def load_data(config: StudyConfig, ref: DataRef, seed: int = 0, num_workers: int = 0) -> TaskData:
    """Data loaders of the train/dev/test splits (trial side), batches as
    :func:`pefttune.data.dataset.collate_batch` makes them. Train is shuffled by an
    :class:`EpochSampler` and cropped to ``data.max_seconds``; dev/test keep manifest order."""
    dataset = TrialDataset
    vocab = ref.vocabulary()
    data = config.data

    rows = ref.rows()

    def split(name: str, max_seconds=None):
        return dataset(rows, name, ref.task_kind, vocab=vocab, unit=_unit(config), on_error=data.on_error,
                       max_seconds=max_seconds, validate=False)

    train = split("train", data.max_seconds)
    buckets = ref.task_kind == "ctc" if data.length_buckets is None else data.length_buckets
    sampler = EpochSampler(len(train), seed, lengths=train.lengths if buckets else None, batch_size=data.batch_size)
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

    With ``lengths`` (and the loader's ``batch_size``) the order is length-bucketed: the
    shuffled indices are cut into pools of ``pool_batches`` batches, each pool is sorted by
    length and cut into batches, and the batches are shuffled, the one short batch (if any)
    kept last, so that the loader's consecutive ``batch_size`` chunks are those batches.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, lengths=None, batch_size: int | None = None,
                 pool_batches: int = 50):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch = 0
        if lengths is not None and (len(lengths) != size or not batch_size):
            raise ValueError(f"EpochSampler: lengths needs one length per example ({size}) and a batch_size")
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=float)
        self.batch_size, self.pool_batches = batch_size, max(1, pool_batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        self.epoch += 1
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).numpy()
        if self.lengths is None:
            return iter(order.tolist())
        return iter(self._bucketed(order, generator))

    def _bucketed(self, order: np.ndarray, generator: torch.Generator) -> list[int]:
        size = self.batch_size
        batches = length_buckets(order, self.lengths, size, self.pool_batches)
        short = [b for b in batches if len(b) < size]  # at most one: only the last pool can be short
        full = [b for b in batches if len(b) == size]
        shuffled = [full[k] for k in torch.randperm(len(full), generator=generator).tolist()]
        return [int(i) for b in shuffled + short for i in b]
