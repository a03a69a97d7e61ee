"""Files in an experiment's storage: a local path or any URI pyarrow understands.

- :func:`storage_filesystem`, :func:`read_storage_text`, :func:`write_storage_text`,
  :func:`storage_exists`: small text files (config copies, markers) in local or remote storage;
- :func:`atomic_output`, :func:`atomic_write_text`: local outputs that never leave a
  half-written file behind (tables, plots, reports);
- per-trial markers: a file in the trial's folder of the experiment storage, the same for
  every attempt of the trial (retries, resumes). ``DIVERGED`` makes divergence sticky.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

DIVERGED_MARKER = "DIVERGED"


def storage_filesystem(path: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI (s3://, gs://, ...)."""
    import pyarrow.fs

    if "://" not in path:
        return pyarrow.fs.LocalFileSystem(), path
    return pyarrow.fs.FileSystem.from_uri(path)


def storage_exists(path: str) -> bool:
    import pyarrow.fs

    fs, inner = storage_filesystem(path)
    return fs.get_file_info(inner).type != pyarrow.fs.FileType.NotFound


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


# -- atomic local outputs -------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces ``path``.

    The folder is created if needed; on an exception the temporary file is removed and
    ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# -- per-trial markers ------------------------------------------------------------------------------


def trial_storage_dir(ray_dir: str | None) -> str | None:
    """This trial's folder in the experiment's storage, ``<experiment>/<trial name>``.

    It is the same for every attempt of the trial (retries, resumes), unlike the local
    working directory; the tuners name trial folders after the trial (trial_dirname_creator).
    None outside a Tune session or without an experiment path.
    """
    if not ray_dir:
        return None
    try:
        from ray import tune  # Ray on use: the analysis reads results without it

        name = tune.get_context().get_trial_name()
    except Exception:  # noqa: BLE001 - not inside a Tune session
        return None
    return f"{ray_dir.rstrip('/')}/{name}"


def read_marker(trial_dir: str | None, name: str) -> str | None:
    return read_storage_text(f"{trial_dir}/{name}") if trial_dir else None


def write_marker(trial_dir: str | None, name: str, text: str) -> None:
    if trial_dir:
        write_storage_text(f"{trial_dir}/{name}", text)


def trial_dir(ray_dir: str | None = None) -> str | Path | None:
    """Where this trial keeps its markers: the stable storage folder when the experiment
    path is known (:func:`trial_storage_dir`), else Ray's local working directory (which a
    retried trial may not get back). None outside Ray Tune."""
    stable = trial_storage_dir(ray_dir)
    if stable is not None:
        return stable
    try:
        from ray import tune  # Ray on use: the analysis reads results without it

        return Path(tune.get_context().get_trial_dir())
    except Exception:  # noqa: BLE001 - not inside a Tune session
        return None


def diverged_message(directory: str | Path | None) -> str | None:
    """The message of an earlier divergence of this trial, if any (divergence is sticky)."""
    return read_marker(str(directory), DIVERGED_MARKER) if directory else None


def mark_diverged(directory: str | Path | None, message: str) -> None:
    write_marker(str(directory) if directory else None, DIVERGED_MARKER, message)
