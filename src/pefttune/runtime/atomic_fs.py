"""A local (or mounted) storage folder whose files Ray writes atomically.

Ray keeps an experiment's state (``experiment_state-*.json``, ``tuner.pkl``, the searcher's
``search_gen_state-*.json`` and ``searcher-state-*.pkl``) in a staging folder of the driver and
copies it to the storage folder file by file, in the background. A plain copy truncates the
target first: a driver killed mid-copy leaves an empty or cut-off file, and ``Tuner.restore``
then fails to read it, logs "Failed to restore the run state" and starts the experiment afresh,
forgetting every trial it had (their folders stay on disk, unread). Measured: the discrete arm
lost its finished uniform baselines when the kill matrix ran beside another test process.

:func:`atomic_storage` is the same local filesystem, except that every file is written to a
hidden temporary beside its target and renamed over it when complete (``os.replace``): a reader
sees the old file or the new one, never a part. Used for every Ray experiment of a study whose
storage is a local path (``runtime.tune_run.run_config`` and each ``Tuner.restore``); a URI
(``s3://...``) keeps pyarrow's own filesystem, whose object stores write whole objects.
Whole files, not a whole set: the experiment state and the search state can still be a trial
apart after a kill; a restored search reconciles them
(:class:`pefttune.search.optuna_search.PefttuneSearchGenerator`).

>>> fs = atomic_storage()
>>> fs.type_name
'py::pefttune-atomic-local'
"""
from __future__ import annotations

import io
import os
import tempfile

import pyarrow
import pyarrow.fs

#: the ``type_name`` of :func:`atomic_storage` (a checkpoint in it is a local path)
ATOMIC_LOCAL = "py::pefttune-atomic-local"


class _AtomicFile(io.FileIO):
    """A file written under a temporary name, renamed to ``path`` on close."""

    def __init__(self, path: str):
        folder, name = os.path.split(path)
        fd, self._temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=folder or ".")
        os.close(fd)
        self._target = path
        super().__init__(self._temporary, "wb")

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        os.replace(self._temporary, self._target)


class AtomicLocalHandler(pyarrow.fs.FileSystemHandler):
    """pyarrow's LocalFileSystem with atomic writes (:func:`atomic_storage`)."""

    def __init__(self):
        self._local = pyarrow.fs.LocalFileSystem()

    def __eq__(self, other) -> bool:
        return isinstance(other, AtomicLocalHandler)

    def __ne__(self, other) -> bool:
        return not self == other

    def __reduce__(self):  # Ray sends the storage filesystem to every trial
        return AtomicLocalHandler, ()

    def get_type_name(self) -> str:
        return "pefttune-atomic-local"

    def normalize_path(self, path):
        return self._local.normalize_path(path)

    def get_file_info(self, paths):
        return self._local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self._local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self._local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self._local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("pefttune's storage never empties the root folder")

    def delete_file(self, path):
        self._local.delete_file(path)

    def move(self, src, dest):
        self._local.move(src, dest)

    def copy_file(self, src, dest):
        with self._local.open_input_stream(src) as source, self.open_output_stream(dest, None) as target:
            while block := source.read(1 << 24):
                target.write(block)

    def open_input_stream(self, path):
        return self._local.open_input_stream(path)

    def open_input_file(self, path):
        return self._local.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return pyarrow.PythonFile(_AtomicFile(path), mode="w")

    def open_append_stream(self, path, metadata):
        return self._local.open_append_stream(path)


def atomic_storage() -> pyarrow.fs.FileSystem:
    """The local filesystem with atomic writes, for ``RunConfig(storage_filesystem=...)`` and
    ``Tuner.restore(storage_filesystem=...)``."""
    return pyarrow.fs.PyFileSystem(AtomicLocalHandler())


def ray_storage_filesystem(storage_path: str) -> pyarrow.fs.FileSystem | None:
    """What a Ray experiment under ``storage_path`` writes through: :func:`atomic_storage` for a
    local path, None (Ray's choice from the URI) for a URI."""
    return None if "://" in storage_path else atomic_storage()


def restore_filesystem(path: str) -> pyarrow.fs.FileSystem | None:
    """The ``storage_filesystem`` of ``Tuner.restore(path, ...)``: the one the experiment at ``path``
    was run with (Ray replaces the saved one with what restore is given)."""
    return ray_storage_filesystem(path.rstrip("/").rsplit("/", 1)[0])


def restore_path(path: str) -> str:
    """``path`` as ``Tuner.restore`` takes it with :func:`restore_filesystem`: absolute when local."""
    return path if "://" in path else os.path.abspath(path)
