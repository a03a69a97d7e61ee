"""The manifest: one table that describes any dataset pefttune trains on.

A manifest is a table (``manifest.parquet``, ``.csv`` or ``.tsv``) with one row per
utterance and these columns:

=============  ========  ==================================================================
column         required  meaning
=============  ========  ==================================================================
``path``       yes       audio file, relative to the manifest's folder or absolute
``split``      yes       ``train``, ``dev`` or ``test`` (``valid``/``validation``/``val``
                         and ``dev-*``/``test-*`` style names are normalised on read)
``label``      classif.  class name (KS, SID, IC, ER)
``transcript`` CTC       text for ``unit="char"``, or space-separated phoneme tokens
``speaker``    no        speaker id (used to check speaker-disjoint splits)
``duration``   no        seconds; computed from the file header if missing
``start``      no        seconds into the file where the clip starts (default 0); when set,
                         ``duration`` seconds are read from there (e.g. ``_silence_`` clips
                         cut from Speech Commands' background noise without writing files)
=============  ========  ==================================================================

In memory (after :func:`read_manifest` or a layout loader) ``path`` holds absolute
paths and the DataFrame index is the row id that batches report as ``"index"``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from pefttune.data.audio import AudioReadError, audio_duration
from pefttune.data.vocab import TokenVocab

__all__ = [
    "SPLITS",
    "TASK_KINDS",
    "TASK_KIND_OF",
    "ManifestError",
    "read_manifest",
    "write_manifest",
    "normalize_split",
    "validate_manifest",
    "fill_durations",
    "missing_columns_message",
    "limit_rows",
]

SPLITS = ("train", "dev", "test")
TASK_KINDS = ("classification", "ctc")
#: Which task kind each SUPERB-style task is.
TASK_KIND_OF = {
    "ks": "classification",
    "sid": "classification",
    "ic": "classification",
    "er": "classification",
    "pr": "ctc",
    "asr": "ctc",
}

_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "dev": "dev", "valid": "dev", "validation": "dev", "val": "dev", "development": "dev",
    "test": "test", "testing": "test", "eval": "test", "evaluation": "test",
}
_MAX_LISTED = 5


class ManifestError(ValueError):
    """A manifest that cannot be used as it is (the message says why and where)."""


def normalize_split(name: str) -> str:
    """Map a split name to ``train``/``dev``/``test`` (``valid`` -> ``dev``, ``dev-clean`` -> ``dev``)."""
    key = str(name).strip().lower()
    if key in _SPLIT_ALIASES:
        return _SPLIT_ALIASES[key]
    head = key.replace("_", "-").split("-", 1)[0]
    if head in _SPLIT_ALIASES:
        return _SPLIT_ALIASES[head]
    raise ManifestError(f"unknown split name {name!r}; use one of {', '.join(SPLITS)}")


#: Column -> what else people call it; a manifest with one of these gets "rename the column".
_COLUMN_SYNONYMS = {
    "path": ("file", "filename", "file_name", "filepath", "file_path", "audio", "audio_path", "audio_file", "wav",
             "wav_path", "audio_filepath"),
    "split": ("set", "subset", "partition", "fold", "dataset", "part"),
    "label": ("class", "classes", "category", "word", "keyword", "command", "target", "labels", "intent",
              "emotion", "class_name", "label_name"),
    "transcript": ("text", "sentence", "transcription", "phonemes", "phones", "normalized_text", "words"),
}
_COLUMN_MEANING = {
    "path": "the audio file, relative to the manifest's folder or absolute",
    "split": "train, dev or test",
    "label": "the class name of each clip",
    "transcript": "space-separated phonemes (data.task: pr) or text (data.task: asr)",
}


def missing_columns_message(missing: list[str], columns, task_kind: str | None = None) -> str:
    """What a manifest lacking ``missing`` columns is told: the columns it has, and for each
    missing one the fix (rename the column that looks like it, or add it).

    Example::

        >>> missing_columns_message(["label"], ["path", "split", "class"], "classification")
        "manifest lacks column(s) ['label'] needed for classification (it has ['path', 'split', 'class']); fix: rename the column 'class' to 'label'"
    """
    import difflib

    columns = [str(c) for c in columns]
    spare = [c for c in columns if c not in _COLUMN_MEANING]
    fixes = []
    for name in missing:
        lowered = {c.lower(): c for c in spare}
        candidates = [lowered[c] for c in (name, *_COLUMN_SYNONYMS.get(name, ())) if c in lowered]
        candidates += difflib.get_close_matches(name, spare, n=1, cutoff=0.75)
        if candidates:
            fixes.append(f"rename the column {candidates[0]!r} to {name!r}")
            spare.remove(candidates[0])
        else:
            fixes.append(f"add a {name!r} column ({_COLUMN_MEANING.get(name, name)})")
    if task_kind == "classification" and "label" in missing and "transcript" in columns:
        fixes.append("or, for the 'transcript' column, set data.task to pr (phonemes) or asr (characters)")
    if task_kind == "ctc" and "transcript" in missing and "label" in columns:
        fixes.append("or, for the 'label' column, set data.task to a classification task (ks, sid, ic, er, custom)")
    needed = f" needed for {task_kind}" if task_kind else ""
    return f"manifest lacks column(s) {missing}{needed} (it has {columns}); fix: " + "; ".join(fixes)


def _rows(df: pd.DataFrame, mask: Iterable[bool]) -> str:
    index = list(df.index[np.asarray(mask, dtype=bool)])
    shown = ", ".join(str(i) for i in index[:_MAX_LISTED])
    more = f" and {len(index) - _MAX_LISTED} more" if len(index) > _MAX_LISTED else ""
    return f"rows {shown}{more}"


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest (parquet, CSV or TSV) and resolve its paths.

    Relative ``path`` entries are taken relative to the manifest's folder and made
    absolute; ``split`` names are normalised.  The index is reset to 0..n-1 (row ids).
    Only tables are read (never pickles).
    """
    path = Path(path)
    if path.is_dir():
        for name in ("manifest.parquet", "manifest.csv", "manifest.tsv"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"no manifest.parquet/.csv/.tsv in folder {path}")
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        df = pd.read_parquet(path)
    elif suffix == ".csv":
        df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    elif suffix == ".tsv":
        df = pd.read_csv(path, sep="\t", keep_default_na=False, na_values=[""])
    else:
        raise ValueError(f"unsupported manifest format {suffix!r} ({path}); use .parquet, .csv or .tsv")
    if "path" not in df.columns:
        raise ManifestError(f"{path}: {missing_columns_message(['path'], df.columns)}")
    root = path.parent.resolve()
    df = df.reset_index(drop=True)
    df["path"] = [str(p) if Path(str(p)).is_absolute() else str(root / str(p)) for p in df["path"]]
    if "split" in df.columns:
        df["split"] = [normalize_split(s) for s in df["split"]]
    for column in ("label", "transcript", "speaker"):
        if column in df.columns:
            df[column] = df[column].map(lambda v: v if pd.isna(v) else str(v))
    df.attrs["manifest_path"] = str(path.resolve())
    return df


def write_manifest(df: pd.DataFrame, out_dir: str | Path, name: str = "manifest") -> Path:
    """Write ``df`` as ``<name>.parquet`` and ``<name>.csv`` in ``out_dir``; returns the parquet path.

    Paths inside ``out_dir`` are stored relative to it (so the folder can move); other
    paths stay absolute.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = out_dir.resolve()
    table = df.copy()
    stored = []
    for p in table["path"]:
        p = Path(str(p))
        if p.is_absolute():
            try:
                p = p.resolve().relative_to(root)
            except ValueError:
                pass
        stored.append(p.as_posix())
    table["path"] = stored
    table = table.reset_index(drop=True)
    parquet = out_dir / f"{name}.parquet"
    table.to_parquet(parquet, index=False)
    table.to_csv(out_dir / f"{name}.csv", index=False)
    return parquet


def fill_durations(df: pd.DataFrame, on_error: str = "raise") -> pd.DataFrame:
    """Return ``df`` with a ``duration`` column, read from file headers where missing.

    With ``on_error="skip"`` unreadable files get NaN instead of raising.
    """
    df = df.copy()
    if "duration" not in df.columns:
        df["duration"] = np.nan
    missing = df["duration"].isna()
    durations = df["duration"].to_numpy(dtype=float, copy=True)
    for pos in np.flatnonzero(missing.to_numpy()):
        try:
            durations[pos] = audio_duration(df["path"].iloc[pos])
        except (FileNotFoundError, AudioReadError) as err:
            if on_error != "skip":
                raise type(err)(f"manifest row {df.index[pos]}: {err}") from err
    df["duration"] = durations
    return df


def validate_manifest(
    df: pd.DataFrame,
    task_kind: str,
    vocab=None,
    splits: Iterable[str] = SPLITS,
    check_files: bool = True,
    unit: str = "phoneme",
) -> None:
    """Check a manifest before any training starts; raise with a clear message if unusable.

    Checks: the required columns for ``task_kind``; split names; that each split in
    ``splits`` has rows; no empty labels/transcripts; (``check_files``) that every
    path exists; for classification, that dev/test labels all occur in train; for CTC,
    that every transcript token is in ``vocab`` (a :class:`~pefttune.data.vocab.TokenVocab`;
    without one, that dev/test tokens occur in train, tokenised by ``unit``:
    ``"phoneme"`` = whitespace-separated, ``"char"`` = characters).

    Raises:
        ManifestError: bad columns, splits, labels or tokens.
        FileNotFoundError: audio files listed but missing.
    """
    if task_kind not in TASK_KINDS:
        raise ValueError(f"task_kind must be one of {TASK_KINDS}, got {task_kind!r}")
    target = "label" if task_kind == "classification" else "transcript"
    missing_columns = [c for c in ("path", "split", target) if c not in df.columns]
    if missing_columns:
        raise ManifestError(missing_columns_message(missing_columns, df.columns, task_kind))
    split_values = df["split"].astype(str)
    _check_splits(df, split_values, splits)
    values = df[target]
    empty = values.isna() | (values.astype(str).str.strip() == "")
    if empty.any():
        raise ManifestError(f"empty {target} in {_rows(df, empty)}")
    _check_windows(df)
    if check_files:
        exists = np.array([Path(p).is_file() for p in df["path"]])
        if not exists.all():
            first = df["path"][~exists].iloc[0]
            raise FileNotFoundError(
                f"{int((~exists).sum())} audio file(s) listed in the manifest do not exist, "
                f"{_rows(df, ~exists)}; first: {first}"
            )
    train = split_values == "train"
    if task_kind == "classification" and train.any():
        _check_labels_in_train(df, split_values, values)
    else:
        _check_tokens(df, values, train, vocab, unit)


def _check_splits(df: pd.DataFrame, split_values: pd.Series, splits: Iterable[str]) -> None:
    """Known split names only, and rows in each of ``splits``."""
    bad = ~split_values.isin(SPLITS)
    if bad.any():
        raise ManifestError(
            f"unknown split names {sorted(set(split_values[bad]))} in {_rows(df, bad)}; "
            f"use {', '.join(SPLITS)}"
        )
    for split in splits:
        if not (split_values == split).any():
            raise ManifestError(f"split {split!r} is empty: the manifest has no {split} rows")


def _check_windows(df: pd.DataFrame) -> None:
    """Positive durations; a ``start`` only with a ``duration``, never negative."""
    if "duration" in df.columns:
        nonpositive = pd.to_numeric(df["duration"], errors="coerce") <= 0
        if nonpositive.any():
            raise ManifestError(f"non-positive duration in {_rows(df, nonpositive)}")
    if "start" in df.columns:
        starts = pd.to_numeric(df["start"], errors="coerce")
        no_window = starts.notna() & (
            pd.to_numeric(df["duration"], errors="coerce").isna() if "duration" in df.columns else True
        )
        if np.any(no_window):
            raise ManifestError(f"rows with a 'start' need a 'duration' too: {_rows(df, no_window)}")
        if (starts < 0).any():
            raise ManifestError(f"negative start in {_rows(df, starts < 0)}")


def _check_labels_in_train(df: pd.DataFrame, split_values: pd.Series, values: pd.Series) -> None:
    """Classification: every dev/test label occurs in train."""
    known = set(values[split_values == "train"].astype(str))
    for split in ("dev", "test"):
        mask = (split_values == split) & ~values.astype(str).isin(known)
        if mask.any():
            raise ManifestError(
                f"{split} has labels that never occur in train: "
                f"{sorted(set(values[mask].astype(str)))[:10]} ({_rows(df, mask)}); a model cannot learn a class "
                f"it never trains on. Fix: add train rows of these labels, or drop their {split} rows"
            )


def _check_tokens(df: pd.DataFrame, values: pd.Series, train: pd.Series, vocab, unit: str) -> None:
    """CTC: every transcript token is in ``vocab``, or without one every dev/test token in train."""
    if vocab is None and not train.any():
        return
    if vocab is None:
        vocab = TokenVocab.from_transcripts(values[train].astype(str), unit=unit)
        checked = ~train
        where = "train"
    else:
        checked = np.ones(len(df), dtype=bool)
        where = "the vocabulary"
    unknown_rows = []
    unknown_tokens: set[str] = set()
    for pos in np.flatnonzero(np.asarray(checked)):
        extra = vocab.unknown_tokens(str(values.iloc[pos]))
        if extra:
            unknown_rows.append(pos)
            unknown_tokens.update(extra)
    if unknown_rows:
        mask = np.zeros(len(df), dtype=bool)
        mask[unknown_rows] = True
        raise ManifestError(
            f"transcripts use tokens not in {where}: {sorted(unknown_tokens)[:10]} "
            f"({_rows(df, mask)})"
        )


def limit_rows(df: pd.DataFrame, per_split: int, seed: int = 0, label: str | None = None) -> pd.DataFrame:
    """At most ``per_split`` rows of each split, drawn with ``seed``; row ids (the index) are kept.

    With ``label`` (a classification column), the train draw first takes one row of every label
    (so train may hold a few more than ``per_split`` when there are more labels): every label
    dev/test may use is still trained on.

    Example::

        >>> small = limit_rows(read_manifest("data/manifest.csv"), 50, seed=0, label="label")
    """
    rng = np.random.default_rng(seed)
    kept = []
    for split in SPLITS:
        rows = df[df["split"] == split]
        order = rows.index.to_numpy()[rng.permutation(len(rows))]
        chosen = order[:per_split]
        if label is not None and split == "train":
            labels = rows.loc[order, label].astype(str).to_numpy()
            _, first = np.unique(labels, return_index=True)  # one row of every label, then the rest in order
            rest = np.setdiff1d(np.arange(len(order)), first, assume_unique=True)
            chosen = np.concatenate([order[np.sort(first)], order[rest]])[:max(per_split, len(first))]
        kept.extend(chosen.tolist())
    out = df.loc[sorted(kept)]
    out.attrs = dict(df.attrs)
    return out
