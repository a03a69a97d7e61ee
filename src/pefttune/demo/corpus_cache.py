"""The corpus cache: synthesized corpora are built once and reused.

Corpora live in ``<cache>/corpora/<task>-seed<seed>-<key>/`` (``<cache>``:
:func:`pefttune.cache_dir.cache_root`), ``ensure_corpus("ks", seed=0)`` returns the manifest of
one, built on first use.  ``key`` hashes the task, seed, complete sizes, corpus format and the pefttune and espeakng-loader versions, so a
change in any of them builds a new corpus instead of reusing a stale one.

Concurrent callers (e.g. several Ray Tune trials starting at once) are safe: each
builds in its own hidden staging folder and the first finished one is renamed into
place; the others discard theirs and use it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from pefttune.cache_dir import cache_root
from pefttune.demo import synth

__all__ = ["corpus_key", "corpus_dir", "ensure_corpus"]


def corpus_key(task: str, seed: int, sizes: dict[str, int]) -> str:
    """A short hash identifying a corpus's content-determining settings."""
    payload = {
        "task": task,
        "seed": int(seed),
        "sizes": {k: int(v) for k, v in sorted(sizes.items())},
        "corpus_format": synth.CORPUS_FORMAT,
        "versions": synth._package_versions(),
    }
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def corpus_dir(task: str, seed: int = 0, root: str | Path | None = None, **size: int) -> Path:
    """Where :func:`ensure_corpus` keeps this corpus (whether or not it exists yet)."""
    sizes = synth.corpus_sizes(task, **size)
    return cache_root(root) / "corpora" / f"{task}-seed{int(seed)}-{corpus_key(task, seed, sizes)}"


def ensure_corpus(task: str, seed: int = 0, root: str | Path | None = None, **size: int) -> Path:
    """The manifest path of the cached synthetic ``task`` corpus, building it if needed.

    Args:
        task: ``"ks"``, ``"sid"`` or ``"pr"``.
        seed: generation seed.
        root: cache folder (default: :func:`pefttune.cache_dir.cache_root`).
        **size: size settings, see :data:`pefttune.demo.synth.DEFAULT_SIZES`.
    """
    sizes = synth.corpus_sizes(task, **size)
    target = corpus_dir(task, seed, root, **sizes)
    manifest = target / "manifest.parquet"
    if synth.is_corpus_dir(target) and manifest.is_file():
        return manifest
    if target.exists():
        raise FileExistsError(
            f"cache folder {target} exists but is not a complete pefttune corpus; "
            "delete it to rebuild"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = synth._staging_dir(target)
    staging.mkdir()
    try:
        synth._write_corpus(task, staging, seed, sizes)
        try:
            staging.rename(target)
        except OSError:
            if not synth.is_corpus_dir(target):
                raise
            # Another process finished the same corpus first: use theirs.
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest
