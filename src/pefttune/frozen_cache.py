"""Cache of the frozen part of the forward pass, per utterance.

The backbone is frozen, so everything below the lowest adapted layer k (CNN feature
encoder, feature projection, positional convolution, and layers 0..k-1 when they hold
no PEFT module) gives the same hidden states h_0..h_k for an utterance in every epoch
and every trial. :class:`FrozenStateCache` keeps those states per utterance:

- in memory (up to ``max_memory_bytes``), and
- optionally on disk under ``directory/<key>/`` as one ``.npy`` file per utterance
  (written atomically, read with ``allow_pickle=False``, memory-mapped), so every
  trial on a node shares them. ``max_disk_bytes`` caps the ``.npy`` files under the whole
  ``directory`` (all keys): the bytes already there are measured at construction and
  again every ``rescan_s`` seconds (so trials sharing the node see each other's files);
  past the cap states are not written (they stay in memory if there is room, else they
  are recomputed; results are the same). Nothing is ever deleted.

The key must change whenever the states could: :func:`cache_key` hashes the backbone's
weights, the dataset manifest and the preprocessing settings. A trial whose
lowest adapted layer is k reads h_0..h_k from the cache and runs only layers >= k.

With dropout off in the frozen part (always: :class:`~pefttune.backbones.SpeechEncoder`
keeps it in eval mode), cached and uncached training give the same losses up to float
rounding (batched vs per-utterance matmuls).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pefttune.model import PeftSpeechModel


def cache_key(backbone_hash: str, manifest: str | Path, preprocessing: dict) -> str:
    """Content hash naming one cache: backbone weights x manifest x preprocessing.

    Utterances are keyed by their manifest row index, unique across splits.
    """
    digest = hashlib.sha256()
    digest.update(backbone_hash.encode())
    digest.update(Path(manifest).read_bytes())
    digest.update(json.dumps(preprocessing, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def estimate_bytes(num_utterances: int, frames: int, num_states: int, hidden: int, itemsize: int = 4) -> int:
    return num_utterances * frames * num_states * hidden * itemsize


def format_bytes(size: float) -> str:
    if size >= 2**30:
        return f"{size / 2**30:.1f} GiB"
    return f"{size / 2**20:.0f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"


def disk_usage(root: str | Path) -> int:
    """Bytes of the ``.npy`` files under ``root``, all subfolders (keys) included."""
    total = 0
    with os.scandir(root) as entries:
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    total += disk_usage(entry.path)
                elif entry.name.endswith(".npy"):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:  # removed meanwhile by another process
                pass
    return total


class FrozenStateCache:
    """Frozen hidden states h_0..h_k per utterance index, in memory and optionally on disk."""

    def __init__(self, key: str, directory: str | Path | None = None, max_memory_bytes: int = 2 * 2**30,
                 max_disk_bytes: int | None = None):
        self.key = key
        self.root = Path(directory) if directory is not None else None
        self.directory = self.root / key if self.root is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.max_memory_bytes = max_memory_bytes
        self.max_disk_bytes = max_disk_bytes
        # bytes under the root at the last scan (all trials and keys), + the net bytes added since;
        # rescanned every `rescan_s` so concurrent trials on the node see each other's files
        self.rescan_s = 30.0
        self.disk_used_before = disk_usage(self.root) if self.root is not None and max_disk_bytes is not None else 0
        self._scanned_at = time.monotonic()
        self._written_since_scan = 0
        self.disk_bytes_written = 0
        self.disk_skipped = 0
        self.memory: dict[int, torch.Tensor] = {}
        self.memory_bytes = 0
        self.hits = 0
        self.misses = 0

    # -- per utterance -------------------------------------------------------------------
    def _path(self, index: int) -> Path:
        assert self.directory is not None
        return self.directory / f"{index}.npy"

    def lookup(self, index: int, num_states: int) -> torch.Tensor | None:
        """States (>= num_states, T, D) of utterance ``index``, or None."""
        states = self.memory.get(index)
        if states is None and self.directory is not None and self._path(index).exists():
            states = torch.from_numpy(np.load(self._path(index), mmap_mode="r", allow_pickle=False).copy())
            self._remember(index, states)
        if states is None or states.shape[0] < num_states:
            return None
        return states[:num_states]

    def _remember(self, index: int, states: torch.Tensor) -> None:
        size = states.numel() * states.element_size()
        old = self.memory.get(index)
        if old is not None:
            self.memory_bytes -= old.numel() * old.element_size()
        if self.memory_bytes + size <= self.max_memory_bytes:
            self.memory[index] = states
            self.memory_bytes += size

    def store(self, index: int, states: torch.Tensor) -> None:
        states = states.detach().to("cpu", torch.float32).contiguous()
        self._remember(index, states)
        if self.directory is None:
            return
        path = self._path(index)
        try:
            old = path.stat().st_size  # replacing a file frees its bytes
        except FileNotFoundError:
            old = 0
        if self.max_disk_bytes is not None:
            if time.monotonic() - self._scanned_at > self.rescan_s:
                self.disk_used_before, self._written_since_scan = disk_usage(self.root), 0
                self._scanned_at = time.monotonic()
            used = self.disk_used_before + self._written_since_scan
            if used + states.numel() * 4 + 128 - old > self.max_disk_bytes:  # + .npy header
                if not self.disk_skipped:
                    print(f"[pefttune] frozen cache: disk cap {format_bytes(self.max_disk_bytes)} reached "
                          f"({format_bytes(used)} used under {self.root}); further states stay in memory "
                          "or are recomputed", flush=True)
                self.disk_skipped += 1
                return
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, states.numpy(), allow_pickle=False)
        added = os.path.getsize(tmp) - old
        self.disk_bytes_written += added
        self._written_since_scan += added
        os.replace(tmp, path)

    def has(self, num_states: int = 1):
        """A predicate ``index -> bool``: are ``num_states`` states of utterance ``index`` cached?
        ``has(1)`` (h_0: deeper states are computed from it) is a dataset's ``skip_audio``, so
        cached utterances are not read from disk."""
        return lambda index: self.lookup(index, num_states) is not None

    def on_disk(self, index: int) -> bool:
        """Whether utterance ``index`` has states on disk (at least h_0)."""
        return self.directory is not None and self._path(index).exists()

    def _compute(self, model: PeftSpeechModel, batch: dict, b: int, num_states: int) -> torch.Tensor:
        """States (num_states, T, D) of the batch's utterance ``b``, computed alone and unpadded; stored.
        Deeper states start from a cached h_0 when there is one (the prefill stores h_0 of every
        utterance): the same numbers as from the audio, which then need not be read."""
        index = int(batch["index"][b])
        device = batch["input_values"].device
        h0 = self.lookup(index, 1)
        if h0 is not None:
            hidden0 = h0.to(device)
            mask = torch.ones(hidden0.shape[:2], dtype=torch.bool, device=device)
        else:
            length = _length(batch, b)
            if length == 0:
                raise RuntimeError("frozen cache: an utterance whose audio was skipped is no longer cached")
            mask_in = batch.get("attention_mask")
            inputs = batch["input_values"][b:b + 1, :length]
            hidden0, mask = model.embed(inputs, None if mask_in is None else mask_in[b:b + 1, :length])
        states = torch.stack(model.frozen_states(hidden0, mask, num_states - 1))[:, 0, : int(mask.sum())]
        states = states.to("cpu", torch.float32)
        self.store(index, states)
        return states

    def fill(self, model: PeftSpeechModel, batch: dict, num_states: int = 1) -> int:
        """Compute and store the batch's utterances that have audio and no states on disk
        (:func:`pefttune.trainables.setup.prefill_frozen_cache`); returns how many."""
        done = 0
        for b, index in enumerate(batch["index"].tolist()):
            if _length(batch, b) > 0 and not self.on_disk(index):
                self._compute(model, batch, b, num_states)
                done += 1
        return done

    # -- per batch -----------------------------------------------------------------------
    def frozen_step(self, model: PeftSpeechModel, batch: dict, num_states: int):
        """Like :func:`pefttune.training.frozen_step`, served from the cache when possible.

        Each missing utterance goes through the frozen encoder alone, without padding, so what
        is cached does not depend on the batch (the trial, the epoch, the other utterances)
        that first needed it: a run on a cold cache gives the numbers of a run on a warm one.
        (Batched, the same utterance came out up to ~5e-6 apart, enough to send a DARTS
        relaxation elsewhere.)  An utterance whose audio the dataset skipped must have h_0 cached."""
        indices = batch["index"].tolist()
        found = [self.lookup(i, num_states) for i in indices]
        device = batch["input_values"].device
        missing = [b for b, f in enumerate(found) if f is None]
        self.hits += len(indices) - len(missing)
        self.misses += len(missing)
        for b in missing:
            found[b] = self._compute(model, batch, b, num_states)
        lengths = torch.tensor([f.shape[1] for f in found])
        frames = int(lengths.max())
        padded = torch.zeros(num_states, len(found), frames, found[0].shape[-1])
        for b, f in enumerate(found):
            padded[:, b, : f.shape[1]] = f
        mask = torch.arange(frames)[None, :] < lengths[:, None]
        return [s.to(device) for s in padded.unbind(0)], mask.to(device)


def _length(batch: dict, b: int) -> int:
    """Samples of the batch's utterance ``b`` (0: its audio was skipped)."""
    mask = batch.get("attention_mask")
    return int(batch["input_values"].shape[-1]) if mask is None else int(mask[b].sum())
