"""One entry point from "where the data is" to a manifest file.

:func:`manifest_for` turns a data source into the path of a manifest that
:func:`~pefttune.data.manifest.read_manifest` and
:class:`~pefttune.data.dataset.SpeechDataset` read:

- ``"synth"``: the demo's cached synthesized corpus (:func:`synth_manifest`);
- ``"manifest"``: the given manifest file (or a folder holding ``manifest.parquet``);
- a layout name (``speech_commands``, ``fluent`` / ``fluent_commands``, ``voxceleb1``,
  ``librispeech``, ``iemocap``): the dataset folder is read by its loader
  (:mod:`pefttune.data.layouts`) and the manifest is written into the pefttune cache,
  never into the dataset folder.  It is rebuilt when the options change.

The data source ``synth`` is the core's one door to :mod:`pefttune.demo`: :func:`synth_manifest`
and :func:`synth_corpus_dir` import the demo's corpus cache when called, never before, so the
core runs without the demo's tooling loaded and ``tests/test_layout.py`` holds every other core
module to not importing it.  ``pefttune run`` with no argument reaches the demo corpus this way.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pefttune.cache_dir import cache_root
from pefttune.data.layouts import LAYOUTS, load_layout
from pefttune.data.manifest import write_manifest

__all__ = ["SOURCES", "LAYOUT_ALIASES", "manifest_for", "layout_manifest", "synth_corpus_dir", "synth_manifest"]

LAYOUT_ALIASES = {"fluent": "fluent_commands", "fsc": "fluent_commands", "speechcommands": "speech_commands"}
SOURCES = ("synth", "manifest", *LAYOUTS, *LAYOUT_ALIASES)


def synth_manifest(task: str, seed: int = 0, cache: str | Path | None = None, **size: int) -> Path:
    """The manifest of the demo's synthesized ``task`` corpus, built (offline, with eSpeak NG) into
    the cache on first use (:func:`pefttune.demo.corpus_cache.ensure_corpus`)."""
    from pefttune.demo.corpus_cache import ensure_corpus  # the door to the demo: imported on use

    return ensure_corpus(task, seed=seed, root=cache, **size)


def synth_corpus_dir(task: str, seed: int = 0, cache: str | Path | None = None, **size: int) -> Path:
    """Where :func:`synth_manifest` keeps that corpus, whether or not it was built."""
    from pefttune.demo.corpus_cache import corpus_dir  # the door to the demo: imported on use

    return corpus_dir(task, seed, cache, **size)


def layout_manifest(layout: str, root: str | Path, cache: str | Path | None = None, **options) -> Path:
    """Load ``root`` with the ``layout`` loader and save its manifest in the cache.

    The cached manifest is keyed by layout, the resolved root and the options, and is
    reused while the dataset folder's listing files are unchanged (it is rebuilt when
    the options change; delete ``<cache>/manifests`` to force a rebuild).
    """
    layout = LAYOUT_ALIASES.get(layout, layout)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown dataset layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    key = hashlib.sha256(json.dumps(
        {"layout": layout, "root": str(root), "options": {k: str(v) for k, v in sorted(options.items())}},
        sort_keys=True,
    ).encode()).hexdigest()[:16]
    out_dir = cache_root(cache) / "manifests" / f"{layout}-{key}"
    manifest = out_dir / "manifest.parquet"
    if manifest.is_file():
        return manifest
    if out_dir.resolve().is_relative_to(root):
        raise ValueError(f"the pefttune cache {out_dir} lies inside the dataset folder {root}; "
                         "set PEFTTUNE_CACHE elsewhere (pefttune never writes into a dataset folder)")
    df = load_layout(layout, root, **options)
    return write_manifest(df, out_dir)


def manifest_for(
    source: str,
    task: str,
    path: str | Path | None = None,
    seed: int = 0,
    per_class: int | None = None,
    cache: str | Path | None = None,
    **options,
) -> Path:
    """The manifest path for a data source (see the module docstring).

    Args:
        source: ``"synth"``, ``"manifest"`` or a layout name.
        task: the task (``ks``, ``sid``, ``pr``, ``ic``, ``asr``, ``er``, ...).  For
            ``librispeech`` it picks the transcript: ``pr`` phonemes, otherwise characters.
        path: the manifest or dataset folder (not used for ``synth``).
        seed, per_class: synthesized corpus settings (``per_class`` is the KS clips per
            class and the SID utterances per speaker).
        cache: cache folder (default: :func:`~pefttune.cache_dir.cache_root`).
        **options: more corpus sizes (synth) or loader options (layouts).
    """
    if source == "synth":
        size = dict(options)
        if per_class is not None:
            if task == "pr":
                raise ValueError("the pr corpus has no classes: set its size with sentences=... instead of per_class")
            size["per_class"] = per_class
        return synth_manifest(task, seed=seed, cache=cache, **size)
    if path is None:
        raise ValueError(f"data source {source!r} needs a path (manifest file or dataset folder)")
    if source == "manifest":
        path = Path(path).expanduser()
        if path.is_dir():
            for name in ("manifest.parquet", "manifest.csv", "manifest.tsv"):
                if (path / name).is_file():
                    return (path / name).resolve()
            raise FileNotFoundError(f"no manifest.parquet/.csv/.tsv in folder {path}")
        if not path.is_file():
            raise FileNotFoundError(f"manifest not found: {path}")
        return path.resolve()
    layout = LAYOUT_ALIASES.get(source, source)
    if layout == "librispeech" and "target" not in options:
        options["target"] = "phonemes" if task == "pr" else "chars"
    return layout_manifest(layout, path, cache=cache, **options)
