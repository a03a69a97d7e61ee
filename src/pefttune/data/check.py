"""Check every audio file a manifest names before any compute starts.

:func:`check_audio` reads the header of each distinct file in a thread pool: the file
exists and is not empty, its extension is an audio format soundfile reads and agrees
with the container libsndfile detects, the header decodes (libsndfile opens the file, as
``sf.info`` does, without building its long text) with a sample rate, channels and frames, and, for WAV/RF64/AIFF, the data size the header declares
fits in the file.  libsndfile does *not* fail on a truncated WAV or AIFF: it silently
reports the frames the file holds, so that check parses the chunk headers here.

Only headers are read.  A compressed file (FLAC, Ogg, MP3) whose header is fine but
whose samples do not decode (cut short, corrupted) passes; reading it at training
time raises :class:`~pefttune.data.audio.AudioReadError`, handled by ``data.on_error``.

Files that pass are remembered in ``<cache>/audio-check/passed.jsonl`` (JSON lines,
keyed by absolute path, size and mtime_ns, replaced atomically), so a second run over
the same files only stats them.
"""
from __future__ import annotations

import csv
import json
import math
import os
import stat
import struct
import sys
import time
import warnings
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import soundfile as sf
from tqdm.auto import tqdm  # a dependency of transformers

from pefttune.cache_dir import cache_root

__all__ = ["AUDIO_EXTENSIONS", "AudioCheck", "AudioCheckError", "BadFile", "check_audio", "write_skipped"]

_CACHE_HEADER = {"format": "pefttune-audio-check", "version": 1}
_CACHE_FILE = "passed.jsonl"
_MAX_LISTED = 20
_PROGRESS_ABOVE = 2000

#: File extension -> the libsndfile containers (``sf.info(...).format``) it may hold.
#: ``.wav`` also covers WAVEX, RF64, W64 and NIST SPHERE (TIMIT names those ``.WAV``).
AUDIO_EXTENSIONS = {ext: fmts for ext, fmts in {
    ".wav": ("WAV", "WAVEX", "RF64", "W64", "NIST"), ".wave": ("WAV", "WAVEX", "RF64", "W64"),
    ".flac": ("FLAC",), ".ogg": ("OGG",), ".oga": ("OGG",), ".opus": ("OGG",),
    ".mp3": ("MP3",), ".aif": ("AIFF",), ".aiff": ("AIFF",), ".aifc": ("AIFF",),
    ".au": ("AU",), ".snd": ("AU",), ".caf": ("CAF",), ".w64": ("W64",), ".rf64": ("RF64",),
    ".sph": ("NIST",), ".nist": ("NIST",), ".voc": ("VOC",), ".mat": ("MAT4", "MAT5"),
    ".htk": ("HTK",), ".sd2": ("SD2",), ".paf": ("PAF",), ".pvf": ("PVF",), ".xi": ("XI",),
    ".sds": ("SDS",), ".avr": ("AVR",), ".sf": ("IRCAM",), ".ircam": ("IRCAM",),
    ".wve": ("WVE",), ".svx": ("SVX",), ".8svx": ("SVX",), ".iff": ("SVX",),
}.items() if set(fmts) & set(sf.available_formats())}

# WAV format tags whose data is plain samples (frames = bytes // block_align).
_WAV_PCM_TAGS = {0x0001, 0x0003, 0x0006, 0x0007, 0xFFFE}
_CHUNKED = {"WAV", "WAVEX", "RF64", "AIFF"}  # containers whose data size _declared_data checks
_Info = namedtuple("_Info", "samplerate channels frames format")
_AIFC_PCM = {b"NONE", b"sowt", b"twos", b"raw ", b"in24", b"in32", b"fl32", b"FL32",
             b"fl64", b"FL64"}


@dataclass(frozen=True)
class BadFile:
    """One manifest row that names a bad audio file (``row`` is the manifest row id)."""

    row: object
    split: str | None
    path: str
    reason: str

    def line(self) -> str:
        where = f"row {self.row}" + (f" ({self.split})" if self.split else "")
        return f"{where}: {self.path}: {self.reason}"


@dataclass
class AudioCheck:
    """The result of :func:`check_audio`.

    ``checked``: distinct files checked; ``cached``: how many of them passed from the
    cache without reading; ``bad``: one :class:`BadFile` per manifest row naming a bad
    file; ``kept``: the manifest without those rows; ``seconds``: wall time.
    """

    checked: int
    cached: int
    bad: list[BadFile]
    seconds: float
    kept: pd.DataFrame = field(repr=False)

    def summary(self) -> str:
        text = (f"checked {self.checked} audio files in {self.seconds:.1f} s "
                f"({self.cached} from the cache)")
        return text + (f"; skipped {len(self.bad)} manifest rows with bad audio" if self.bad else "")


class AudioCheckError(ValueError):
    """Some audio files of a manifest are unreadable; the message lists them, ``.bad`` holds all."""

    def __init__(self, bad: list[BadFile], total_files: int):
        self.bad = list(bad)
        self.total_files = total_files
        files = len({b.path for b in bad})
        rows = "" if files == len(bad) else f" ({len(bad)} manifest rows)"
        lines = [f"{files} of {total_files} audio files in the manifest are unreadable{rows}:"]
        lines += ["  " + b.line() for b in self.bad[:_MAX_LISTED]]
        if len(bad) > _MAX_LISTED:
            noun = "files" if files == len(bad) else "rows"
            lines.append(f"  ... and {len(bad) - _MAX_LISTED} more bad {noun}")
        super().__init__("\n".join(lines))

    def __reduce__(self):
        return type(self), (self.bad, self.total_files)


def _declared_data(path: str, size: int):
    """For WAV/RF64/AIFF: (declared frames or bytes, held, unit); None when not applicable.

    Walks the chunk headers (usually all in the first 4 KiB) to find the format and the
    audio data chunk, and compares the data size the header declares with the file size.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.pread(fd, 4096, 0)

        def read(pos: int, n: int) -> bytes:
            return head[pos:pos + n] if pos + n <= len(head) else os.pread(fd, n, pos)

        magic, kind = head[:4], head[8:12]
        if magic in (b"RIFF", b"RIFX", b"RF64") and kind == b"WAVE":
            end = "<" if magic != b"RIFX" else ">"
        elif magic == b"FORM" and kind in (b"AIFF", b"AIFC"):
            end = ">"
        else:
            return None
        pos, fmt, ds64 = 12, None, None
        for _ in range(1000):
            chunk = read(pos, 8)
            if len(chunk) < 8:
                return None
            cid, csize = chunk[:4], struct.unpack(end + "I", chunk[4:])[0]
            if cid in (b"fmt ", b"COMM", b"ds64"):
                body = read(pos + 8, min(csize, 64))
                if cid == b"ds64" and len(body) >= 16:
                    ds64 = struct.unpack("<Q", body[8:16])[0]
                elif cid == b"fmt " and len(body) >= 16:
                    tag, _, _, _, align = struct.unpack(end + "HHIIH", body[:14])
                    fmt = (tag in _WAV_PCM_TAGS, align, None)
                elif cid == b"COMM" and len(body) >= 8:
                    channels, frames, bits = struct.unpack(">hIh", body[:8])
                    pcm = kind == b"AIFF" or body[18:22] in _AIFC_PCM
                    fmt = (pcm, max(channels, 0) * ((bits + 7) // 8), frames)
            elif cid in (b"data", b"SSND"):
                start, declared = pos + 8, csize
                if cid == b"data" and magic == b"RF64" and csize == 0xFFFFFFFF:
                    declared = ds64
                elif cid == b"data" and csize in (0, 0xFFFFFFFF):
                    return None  # a streamed WAV: the size was never filled in
                if cid == b"SSND":
                    offset = struct.unpack(">I", read(pos + 8, 4).ljust(4, b"\0"))[0]
                    start, declared = pos + 16 + offset, csize - 8 - offset
                if fmt is None or declared is None:
                    return None
                held = max(size - start, 0)
                pcm, align, frames = fmt
                if pcm and align > 0:
                    declared_frames = frames if frames is not None else declared // align
                    return declared_frames, min(held // align, declared_frames), "frames"
                return declared, min(held, declared), "bytes of audio data"
            pos += 8 + csize + (csize & 1)
        return None
    finally:
        os.close(fd)


def _check_file(path: str):
    """(stat key, info tuple) for a good file, or (stat key, reason) for a bad one."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, "missing file"
    except OSError as err:
        return None, f"cannot stat the file: {err.strerror or err}"
    key = (st.st_size, st.st_mtime_ns)
    if not stat.S_ISREG(st.st_mode):
        return key, "not a regular file"
    if st.st_size == 0:
        return key, "empty file (0 bytes)"
    ext = os.path.splitext(path)[1].lower()
    try:  # what sf.info does, without building its extra_info text (~30 % faster)
        with sf.SoundFile(path) as f:
            info = _Info(f.samplerate, f.channels, f.frames, f.format)
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        if ext not in AUDIO_EXTENSIONS:
            return key, f"extension {ext or '(none)'} is not an audio format soundfile reads"
        message = getattr(err, "error_string", "") or str(err)
        return key, f"not an audio file: {message.strip()}"
    if ext not in AUDIO_EXTENSIONS:
        what = f"extension {ext}" if ext else "no file extension"
        return key, f"{what} is not an audio format soundfile reads (content is {info.format})"
    if info.format not in AUDIO_EXTENSIONS[ext]:
        return key, f"extension {ext} but content is {info.format}"
    if info.samplerate <= 0 or info.channels <= 0:
        return key, f"sample rate {info.samplerate}, {info.channels} channels"
    try:
        declared = _declared_data(path, st.st_size) if info.format in _CHUNKED else None
    except OSError as err:
        return key, f"cannot read the file: {err.strerror or err}"
    if declared is not None and declared[1] < declared[0]:
        return key, "truncated: header declares {0} {2}, file holds {1}".format(*declared)
    if info.frames <= 0:
        return key, "0 frames"
    return key, tuple(info)


def _check_chunk(chunk: list[str], cache: dict) -> list[tuple]:
    """(path, stat key, outcome, from cache) per path; a cache hit needs the same size and mtime."""
    out = []
    for p in chunk:
        hit = cache.get(p)
        try:
            st = os.stat(p) if hit is not None else None
        except OSError:
            st = None
        if st is not None and st.st_size == hit[1] and st.st_mtime_ns == hit[2]:
            out.append((p, None, tuple(hit[3:]), True))
        else:
            out.append((p, *_check_file(p), False))
    return out


def _load_cache(file: Path) -> dict:
    """path -> [path, size, mtime_ns, rate, channels, frames, format]; {} when absent or unknown."""
    try:
        with open(file, encoding="utf-8") as f:
            if json.loads(f.readline() or "null") != _CACHE_HEADER:
                return {}
            lines = [line for line in f.read().splitlines() if line]
    except (OSError, ValueError):
        return {}
    try:
        rows = json.loads("[" + ",".join(lines) + "]")  # one parse: fast on 100k lines
    except ValueError:
        rows = []
        for line in lines:  # a damaged line only costs a re-check of that file
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return {row[0]: row for row in rows if isinstance(row, list) and len(row) == 7}


def _save_cache(file: Path, entries: dict) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(_CACHE_HEADER) + "\n")
            f.writelines(json.dumps(row) + "\n" for row in entries.values())
        os.replace(tmp, file)  # atomic: readers see the old or the new file, never a part
    finally:
        if tmp.exists():
            tmp.unlink()


def check_audio(
    manifest: pd.DataFrame,
    *,
    on_error: str = "raise",
    cache_dir: Path | None = None,
    workers: int | None = None,
    progress: bool | None = None,
) -> AudioCheck:
    """Check every audio file ``manifest`` names (see the module docstring for what).

    Args:
        manifest: as :func:`~pefttune.data.manifest.read_manifest` returns it (absolute
            ``path``, ``split``, index = row id; rows with a ``start`` past the end of
            their file are bad too, as reading them would fail).
        on_error: ``"raise"``: raise :class:`AudioCheckError` listing every bad file;
            ``"skip"``: return, with the bad rows left out of ``kept``.
        cache_dir: where files that passed are remembered (default
            ``cache_root() / "audio-check"``).
        workers: threads reading headers (default ``min(16, 4 * cpus)``).
        progress: show a progress bar on stderr (default: above 2,000 files).

    Raises:
        AudioCheckError: ``on_error="raise"`` and some file is bad.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    began = time.perf_counter()
    cache_file = Path(cache_dir if cache_dir is not None else cache_root() / "audio-check") / _CACHE_FILE
    rows_paths = [p if os.path.isabs(p) else os.path.abspath(p)
                  for p in map(str, manifest["path"].tolist())]
    paths = list(dict.fromkeys(rows_paths))
    results, cached = _check_files(paths, cache_file, workers, progress)
    bad, mask = _bad_rows(manifest, rows_paths, results)
    if bad and on_error == "raise":
        raise AudioCheckError(bad, len(paths))
    kept = manifest.loc[[not m for m in mask]]
    kept.attrs = dict(manifest.attrs)
    return AudioCheck(checked=len(paths), cached=cached, bad=bad,
                      seconds=time.perf_counter() - began, kept=kept)


def _check_files(paths: list[str], cache_file: Path, workers: int | None, progress: bool | None):
    """(path -> header facts or the reason it is bad, how many came from the cache): every file
    read by a pool of threads, the ones that passed remembered in ``cache_file``."""
    cache = _load_cache(cache_file)
    results: dict[str, object] = {}
    cached, new_entries, stale = 0, {}, []
    workers = workers or min(16, 4 * (os.cpu_count() or 1))
    size = max(1, min(256, math.ceil(len(paths) / (workers * 4))))
    chunks = [paths[i:i + size] for i in range(0, len(paths), size)]
    show = len(paths) > _PROGRESS_ABOVE if progress is None else progress
    bar = tqdm(total=len(paths), unit="file", desc="checking audio", file=sys.stderr,
               leave=False, disable=not show)
    with bar, ThreadPoolExecutor(workers, thread_name_prefix="audio-check") as pool:
        for future in as_completed([pool.submit(_check_chunk, c, cache) for c in chunks]):
            done = future.result()
            for p, key, outcome, from_cache in done:
                results[p] = outcome
                cached += from_cache
                if not from_cache and not isinstance(outcome, str):
                    new_entries[p] = [p, *key, *outcome]
                elif isinstance(outcome, str) and p in cache:
                    stale.append(p)
            bar.update(len(done))
    if new_entries or stale:
        for p in stale:
            del cache[p]
        cache.update(new_entries)
        try:
            _save_cache(cache_file, cache)
        except OSError as err:  # a read-only or full cache only costs the next run time
            warnings.warn(f"could not write the audio-check cache {cache_file}: {err}", stacklevel=3)
    return results, cached


def _bad_rows(manifest: pd.DataFrame, rows_paths: list[str], results: dict) -> tuple[list[BadFile], list[bool]]:
    """The manifest's bad rows (a bad file, or a ``start`` outside its file) and a per-row mask."""

    def column(name):
        return manifest[name].tolist() if name in manifest.columns else [None] * len(manifest)

    bad, mask = [], []
    for row, split, p, start in zip(manifest.index, column("split"), rows_paths, column("start")):
        outcome = results[p]
        if not isinstance(outcome, str) and start is not None and not pd.isna(start):
            rate, _, frames, _ = outcome
            first = int(round(float(start) * rate))
            if first < 0 or (first > 0 and first >= frames):
                outcome = f"start {float(start):.3f} s is outside the file ({frames / rate:.3f} s)"
        is_bad = isinstance(outcome, str)
        mask.append(is_bad)
        if is_bad:
            row = row.item() if hasattr(row, "item") else row
            split = None if split is None or pd.isna(split) else str(split)
            bad.append(BadFile(row, split, p, outcome))
    return bad, mask


def write_skipped(bad: list[BadFile], path: str | Path) -> Path:
    """Write the rows dropped by ``on_error="skip"`` as CSV (row, split, path, reason)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "split", "path", "reason"])
        writer.writerows([b.row, b.split or "", b.path, b.reason] for b in bad)
    return path
