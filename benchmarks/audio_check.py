"""Cost of the audio check (`pefttune.data.check.check_audio`) on many short files.

Writes N short synthetic 16-bit WAVs (0.1 s at 16 kHz by default) into a temp folder,
then checks them twice: cold (empty cache: every header is read) and warm (the second
run, from the cache: each file is only stat'ed).  Prints files/s and the per-file cost
of both.  The files are written from in-memory buffers (no fsync), so the page cache is
hot in the cold run: it measures the check's own cost, not the disk's.

    python benchmarks/audio_check.py                 # 100,000 files
    python benchmarks/audio_check.py --files 200     # smoke run
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

from pefttune.data.check import check_audio

_PER_FOLDER = 1000


def wav_variants(count: int, seconds: float, sample_rate: int = 16000) -> list[bytes]:
    """``count`` distinct short WAV files as bytes (noise at -20 dB)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        wav = 0.1 * rng.standard_normal(int(seconds * sample_rate))
        sf.write(buffer, wav, sample_rate, format="WAV", subtype="PCM_16")
        out.append(buffer.getvalue())
    return out


def write_files(root: Path, files: int, seconds: float) -> pd.DataFrame:
    """Write ``files`` WAVs under ``root`` (1,000 per folder); return a manifest of them."""
    variants = wav_variants(16, seconds)
    paths = []
    for i in range(files):
        folder = root / f"{i // _PER_FOLDER:04d}"
        if i % _PER_FOLDER == 0:
            folder.mkdir(parents=True)
        path = str(folder / f"clip{i:06d}.wav")
        with open(path, "wb") as f:
            f.write(variants[i % len(variants)])
        paths.append(path)
    splits = np.array(["train", "dev", "test"])[np.arange(files) % 10 // 8 + np.arange(files) % 10 // 9]
    return pd.DataFrame({"path": paths, "split": splits, "label": "noise"})


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000, help="number of files (default 100,000)")
    parser.add_argument("--seconds", type=float, default=0.1, help="length of each file")
    parser.add_argument("--workers", type=int, nargs="+", default=[None],
                        help="thread counts to compare, each cold then warm (default: check_audio's)")
    parser.add_argument("--dir", default=None, help="folder for the files (default: a temp folder, removed)")
    args = parser.parse_args(argv)

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="pefttune-audio-check-"))
    try:
        began = time.perf_counter()
        manifest = write_files(root / "audio", args.files, args.seconds)
        written = time.perf_counter() - began
        print(f"# {args.files} WAVs of {args.seconds} s written in {written:.1f} s; {os.cpu_count()} CPUs")
        print(f"{'run':<6} {'threads':>7} {'files':>8} {'cached':>8} {'seconds':>8} {'files/s':>10} {'us/file':>8}")
        results = {}
        for workers in args.workers:
            workers = workers or min(16, 4 * (os.cpu_count() or 1))  # check_audio's default
            cache_dir = root / f"cache-{workers}"
            for run in ("cold", "warm"):
                check = check_audio(manifest, cache_dir=cache_dir, workers=workers, progress=False)
                assert not check.bad, check.bad[:3]
                results[run, workers] = check.seconds
                print(f"{run:<6} {workers:>7} {check.checked:>8} {check.cached:>8} {check.seconds:>8.2f} "
                      f"{check.checked / check.seconds:>10,.0f} {1e6 * check.seconds / check.checked:>8.1f}")
            size = (cache_dir / "passed.jsonl").stat().st_size / 1e6
            print(f"# {workers} threads: warm / cold = "
                  f"{results['warm', workers] / results['cold', workers]:.3f}; cache file {size:.1f} MB")
        return results
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
