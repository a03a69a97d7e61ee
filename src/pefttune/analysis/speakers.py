"""Each test example's speaker, from the manifest the experiment was trained on.

Stored predictions carry an ``index``: the manifest row id of each example
(:mod:`pefttune.data.manifest`).  The experiment folder's config copy names the data
(``data.source``, ``data.path``, the synthesized corpus' seed and sizes), so the manifest is
found the way a trial found it (:func:`pefttune.data.sources.manifest_for`); a synthesized
corpus is only looked up in the cache, never built here.  The speakers become the clusters of
the seeds x speakers interval (:class:`~pefttune.analysis.seeds_speakers.Clusters`); without a
``speaker`` column, or when the manifest cannot be found or does not hold these test examples,
the clusters are the utterances and ``note`` says why.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pefttune.analysis.seeds_speakers import Clusters

__all__ = ["manifest_of", "speaker_clusters"]

_SIZES = ("per_class", "test_per_class", "sentences", "test_speakers")


def manifest_of(config: dict | None) -> tuple[Path | None, str]:
    """(manifest path, "") of an experiment's config copy, or (None, why not)."""
    data = (config or {}).get("data")
    if not isinstance(data, dict):
        return None, "the experiment folder holds no config copy naming its data"
    source, task = data.get("source", "synth"), data.get("task", "ks")
    try:
        if source == "synth":
            from pefttune.data.sources import synth_corpus_dir as corpus_dir

            size = {k: data[k] for k in _SIZES if data.get(k) is not None}
            path = corpus_dir(task, int(data.get("seed") or 0), **size) / "manifest.parquet"
            if not path.is_file():
                return None, f"the synthesized corpus is not in the cache ({path.parent})"
            return path, ""
        from pefttune.data.sources import manifest_for

        return Path(manifest_for(source, task, path=data.get("path"))), ""
    except (FileNotFoundError, ValueError, OSError) as err:
        return None, f"the manifest of data.source {source!r} was not found: {err}"


def speaker_clusters(config: dict | None, index: np.ndarray) -> Clusters:
    """The clusters of the aligned test examples ``index`` (manifest row ids): their speakers, or
    the utterances (with the reason in ``note``)."""
    from pefttune.data.manifest import read_manifest

    index = np.asarray(index, dtype=np.int64)
    path, why = manifest_of(config)
    if path is None:
        return Clusters.utterances(index.size, why)
    try:
        frame = read_manifest(path)
    except (FileNotFoundError, ValueError, OSError) as err:
        return Clusters.utterances(index.size, f"the manifest {path} could not be read: {err}")
    if "speaker" not in frame.columns:
        return Clusters.utterances(index.size, f"the manifest {path} has no speaker column")
    held = np.isin(index, frame.index.to_numpy())
    if not held.all() or ("split" in frame.columns and (frame.loc[index, "split"] != "test").any()):
        return Clusters.utterances(index.size, f"the manifest {path} does not hold these test examples "
                                               "(row ids outside its test split)")
    return Clusters.from_speakers(frame.loc[index, "speaker"].tolist())
