"""Torch dataset, collate function and length-bucketed batch sampler.

Batches (from :func:`collate_batch`):

- classification: ``{"input_values": float32 (B, T), "attention_mask": long (B, T),
  "labels": long (B,), "index": long (B,)}``
- CTC: ``{"input_values", "attention_mask", "targets": long (B, S), "target_lengths":
  long (B,), "index"}``.  Target ids start at 1; **0 is the CTC blank**; positions past
  a target's length are padded with ``-100`` (ignored by ``torch.nn.functional.ctc_loss``
  through ``target_lengths``, and by Hugging Face CTC heads).

``attention_mask`` is 1 on real samples and 0 on padding (waveforms are zero-padded at
the end).  ``index`` is the manifest row id of each example, so predictions can be
stored per example.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pefttune.data.audio import SAMPLE_RATE, AudioReadError, audio_duration, read_audio
from pefttune.data.manifest import TASK_KINDS, read_manifest, validate_manifest
from pefttune.data.vocab import LabelVocab, TokenVocab, load_vocab

__all__ = [
    "PAD_TARGET",
    "SpeechDataset",
    "collate_batch",
    "LengthBucketSampler",
    "length_buckets",
    "make_dataloader",
    "normalize_waveform",
]

#: Padding value of ``targets`` in CTC batches.
PAD_TARGET = -100


def normalize_waveform(wav: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Zero mean, unit variance (what wav2vec2/HuBERT/WavLM feature extractors do)."""
    wav = wav.astype(np.float32, copy=False)
    return ((wav - wav.mean()) / np.sqrt(wav.var() + eps)).astype(np.float32)


class SpeechDataset(Dataset):
    """One split of a manifest as a map-style dataset of waveforms and targets.

    Args:
        manifest: a manifest path (parquet/csv/tsv, or a folder holding one) or a DataFrame
            as returned by :func:`~pefttune.data.manifest.read_manifest` or a loader.
        split: ``"train"``, ``"dev"`` or ``"test"``.
        task_kind: ``"classification"`` (``label`` column) or ``"ctc"`` (``transcript``).
        vocab: a :class:`LabelVocab` / :class:`TokenVocab`, or a path to a saved one.
            Default: built from the train split (for CTC, ``vocab.json`` next to the
            manifest is used when present).  Pass the train dataset's ``vocab`` to the
            dev/test datasets, or save it with ``vocab.save(...)`` and reuse it.
        unit: for a CTC vocabulary built here: ``"phoneme"`` or ``"char"``.
        normalize: zero-mean unit-variance per utterance.
        on_error: ``"raise"`` (default): a missing or undecodable file raises an error that
            names the file and manifest row.  ``"skip"``: such rows are dropped (missing or
            unreadable headers up front, decoding failures at load time) and counted in
            :attr:`skipped`; a warning reports the count.
        max_seconds: crop longer utterances to their first ``max_seconds``.
        validate: check the manifest (columns, splits, labels/tokens vs. train) first.
    """

    def __init__(
        self,
        manifest: str | Path | pd.DataFrame,
        split: str,
        task_kind: str = "classification",
        vocab: LabelVocab | TokenVocab | str | Path | None = None,
        unit: str = "phoneme",
        normalize: bool = True,
        on_error: str = "raise",
        max_seconds: float | None = None,
        sample_rate: int = SAMPLE_RATE,
        validate: bool = True,
    ) -> None:
        if task_kind not in TASK_KINDS:
            raise ValueError(f"task_kind must be one of {TASK_KINDS}, got {task_kind!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        manifest_path = None
        if isinstance(manifest, pd.DataFrame):
            df = manifest
            manifest_path = df.attrs.get("manifest_path")
        else:
            df = read_manifest(manifest)
            manifest_path = df.attrs.get("manifest_path")
        self.task_kind = task_kind
        self.split = split
        self.normalize = normalize
        self.on_error = on_error
        self.max_seconds = max_seconds
        self.sample_rate = sample_rate
        self.target_column = "label" if task_kind == "classification" else "transcript"
        self.vocab = self._resolve_vocab(df, vocab, unit, manifest_path)
        if validate:
            # Check the rows this dataset uses (and train, which defines the labels).
            needed = tuple(dict.fromkeys(("train", split))) if vocab is None else (split,)
            if "split" not in df.columns:
                from pefttune.data.manifest import ManifestError, missing_columns_message

                raise ManifestError(missing_columns_message(["split"], df.columns, task_kind))
            used = df[df["split"].isin(needed)] if task_kind == "ctc" else df[df["split"].isin(("train", split))]
            validate_manifest(used, task_kind, vocab=self.vocab if task_kind == "ctc" else None,
                              splits=needed, check_files=False)
        rows = df[df["split"] == split]
        if rows.empty:
            raise ValueError(f"split {split!r} is empty: no manifest rows have split == {split!r}")
        self.skipped: list[tuple[int, str, str]] = []
        #: row id -> True when the model will not need this utterance's audio (its frozen
        #: states are cached): the item then carries no samples (see pefttune.frozen_cache).
        self.skip_audio = None
        rows = self._check_files(rows)
        if task_kind == "classification":
            unknown = sorted(set(rows["label"].astype(str)) - set(self.vocab.labels))
            if unknown:
                raise ValueError(
                    f"{split} has labels not in the vocabulary (built from train): {unknown[:10]}"
                )
            self._targets = [self.vocab.encode(x) for x in rows["label"]]
        else:
            self._targets = []
            for row_id, text in zip(rows.index, rows["transcript"].astype(str)):
                try:
                    self._targets.append(self.vocab.encode(text))
                except ValueError as err:
                    raise ValueError(f"manifest row {row_id}: {err}") from None
        self.rows = rows
        self._paths = rows["path"].astype(str).tolist()
        self._row_ids = [int(i) for i in rows.index]
        self._starts = (rows["start"].fillna(0.0).astype(float).tolist()
                        if "start" in rows.columns else [0.0] * len(rows))
        has_window = "start" in rows.columns
        self._windows = ([float(d) if not pd.isna(s) else None for s, d in zip(rows["start"], rows["duration"])]
                         if has_window else [None] * len(rows))
        if self.skipped:
            warnings.warn(
                f"{split}: skipped {len(self.skipped)} unreadable or missing audio file(s); "
                f"first: {self.skipped[0][1]} ({self.skipped[0][2]})",
                stacklevel=2,
            )

    # --- construction helpers -------------------------------------------------------
    def _resolve_vocab(self, df, vocab, unit, manifest_path):
        if isinstance(vocab, (str, Path)):
            vocab = load_vocab(vocab)
        if vocab is not None:
            expected = LabelVocab if self.task_kind == "classification" else TokenVocab
            if not isinstance(vocab, expected):
                raise ValueError(f"a {self.task_kind} dataset needs a {expected.__name__}, got {type(vocab).__name__}")
            return vocab
        if self.target_column not in df.columns:
            from pefttune.data.manifest import ManifestError, missing_columns_message

            raise ManifestError(missing_columns_message([self.target_column], df.columns, self.task_kind))
        train = df[df["split"] == "train"]
        if train.empty:
            raise ValueError("cannot build a vocabulary: the train split is empty (pass vocab=...)")
        if self.task_kind == "classification":
            return LabelVocab.from_labels(train["label"].astype(str))
        if manifest_path is not None:
            beside = Path(manifest_path).parent / "vocab.json"
            if beside.is_file():
                return load_vocab(beside)
        return TokenVocab.from_transcripts(train["transcript"].astype(str), unit=unit)

    def _check_files(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Missing files: raise (naming rows), or drop them under ``on_error="skip"``."""
        keep = []
        for row_id, path in zip(rows.index, rows["path"].astype(str)):
            reason = None
            if not Path(path).is_file():
                reason = "file not found"
            elif self.on_error == "skip":
                try:
                    audio_duration(path)
                except AudioReadError as err:
                    reason = str(err)
            if reason is None:
                keep.append(True)
                continue
            if self.on_error == "raise":
                missing = [(i, p) for i, p in zip(rows.index, rows["path"].astype(str)) if not Path(p).is_file()]
                listed = "; ".join(f"row {i}: {p}" for i, p in missing[:5])
                raise FileNotFoundError(
                    f"{len(missing)} audio file(s) of split {self.split!r} not found ({listed}"
                    f"{' ...' if len(missing) > 5 else ''}); pass on_error='skip' to leave them out"
                )
            self.skipped.append((int(row_id), path, reason))
            keep.append(False)
        return rows[np.array(keep, dtype=bool)]

    # --- properties -------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Output width: number of labels, or CTC tokens + blank."""
        return len(self.vocab)

    @property
    def lengths(self) -> list[float]:
        """Durations in seconds (from the manifest, or file headers where missing)."""
        if "duration" in self.rows.columns and not self.rows["duration"].isna().any():
            durations = self.rows["duration"].astype(float).tolist()
        else:
            durations = [audio_duration(p) for p in self._paths]
        if self.max_seconds is not None:
            durations = [min(d, self.max_seconds) for d in durations]
        return durations

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def row_ids(self) -> tuple[int, ...]:
        """The manifest row ids of this split's utterances (what batches report as ``"index"``)."""
        return tuple(self._row_ids)

    def __getitem__(self, i: int) -> dict | None:
        path, row_id = self._paths[i], self._row_ids[i]
        if self.skip_audio is not None and self.skip_audio(row_id):
            return self._item(torch.zeros(0), row_id, i)
        duration = self._windows[i]
        if self.max_seconds is not None:
            duration = self.max_seconds if duration is None else min(duration, self.max_seconds)
        try:
            wav = read_audio(path, self.sample_rate, start=self._starts[i], duration=duration)
            if wav.size == 0:
                raise AudioReadError(f"audio file {path} holds no samples")
        except (FileNotFoundError, AudioReadError) as err:
            if self.on_error == "skip":
                self.skipped.append((row_id, path, str(err)))
                return None
            raise type(err)(f"manifest row {row_id} (split {self.split}): {err}") from err
        if self.normalize:
            wav = normalize_waveform(wav)
        return self._item(torch.from_numpy(np.ascontiguousarray(wav)), row_id, i)

    def _item(self, samples: torch.Tensor, row_id: int, i: int) -> dict:
        item = {"input_values": samples, "index": row_id}
        if self.task_kind == "classification":
            item["label"] = self._targets[i]
        else:
            item["target"] = torch.tensor(self._targets[i], dtype=torch.long)
        return item


def collate_batch(items: Sequence[dict | None]) -> dict[str, torch.Tensor]:
    """Pad a list of :class:`SpeechDataset` items into a batch (see the module docstring).

    ``None`` items (files skipped under ``on_error="skip"``) are left out; a batch whose
    items were all skipped has batch size 0.
    """
    items = [x for x in items if x is not None]
    ctc = bool(items) and "target" in items[0]
    lengths = [int(x["input_values"].shape[0]) for x in items]
    longest = max(lengths, default=0)
    inputs = torch.zeros(len(items), longest, dtype=torch.float32)
    mask = torch.zeros(len(items), longest, dtype=torch.long)
    for b, (x, n) in enumerate(zip(items, lengths)):
        inputs[b, :n] = x["input_values"]
        mask[b, :n] = 1
    batch = {
        "input_values": inputs,
        "attention_mask": mask,
        "index": torch.tensor([int(x["index"]) for x in items], dtype=torch.long),
    }
    if ctc:
        target_lengths = [int(x["target"].shape[0]) for x in items]
        targets = torch.full((len(items), max(target_lengths, default=0)), PAD_TARGET, dtype=torch.long)
        for b, (x, n) in enumerate(zip(items, target_lengths)):
            targets[b, :n] = x["target"]
        batch["targets"] = targets
        batch["target_lengths"] = torch.tensor(target_lengths, dtype=torch.long)
    else:
        batch["labels"] = torch.tensor([int(x["label"]) for x in items], dtype=torch.long)
    return batch


def length_buckets(order: Sequence[int], lengths: np.ndarray, batch_size: int, pool_batches: int) -> list[np.ndarray]:
    """Cut ``order`` into pools of ``batch_size * pool_batches`` indices, sort each pool by
    ``lengths`` (stably) and cut it into batches of ``batch_size``: the batches, in pool order.
    Only the last pool can end in a short batch. The samplers shuffle the batches themselves."""
    order = np.asarray(order)
    pool = batch_size * max(1, pool_batches)
    batches = []
    for start in range(0, len(order), pool):
        part = order[start:start + pool]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return batches


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of similar-length examples, to waste little compute on padding.

    Indices are shuffled, cut into pools of ``batch_size * pool_batches``, each pool is
    sorted by length and cut into batches, and the batch order is shuffled.  Without
    ``shuffle`` the batches simply follow sorted length.  Call :meth:`set_epoch` each
    epoch for a new (reproducible) order.
    """

    def __init__(self, lengths: Sequence[float], batch_size: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, pool_batches: int = 50) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.lengths = np.asarray(lengths, dtype=float)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.pool_batches = max(1, pool_batches)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        n = len(self.lengths)
        if not self.shuffle:  # one pool: the batches follow sorted length
            order, pool_batches = np.arange(n), -(-n // self.batch_size)
        else:
            order, pool_batches = np.random.default_rng((self.seed, self.epoch)).permutation(n), self.pool_batches
        batches = [[int(j) for j in b] for b in length_buckets(order, self.lengths, self.batch_size, pool_batches)
                   if len(b) == self.batch_size or not self.drop_last]
        if self.shuffle:
            rng = np.random.default_rng((self.seed, self.epoch, 1))
            batches = [batches[int(k)] for k in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def make_dataloader(dataset: SpeechDataset, batch_size: int, shuffle: bool = False,
                    bucket: bool = True, seed: int = 0, num_workers: int = 0,
                    drop_last: bool = False) -> DataLoader:
    """A DataLoader over ``dataset`` with :func:`collate_batch` and, by default, length buckets."""
    if bucket:
        sampler = LengthBucketSampler(dataset.lengths, batch_size, shuffle=shuffle, seed=seed,
                                      drop_last=drop_last)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch, num_workers=num_workers)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      collate_fn=collate_batch, num_workers=num_workers, generator=generator)
