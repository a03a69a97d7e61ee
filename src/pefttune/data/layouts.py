"""Loaders for the standard layouts of real speech datasets.

Each loader reads a dataset folder as distributed (nothing is written into it) and
returns a manifest DataFrame (see :mod:`pefttune.data.manifest`) with absolute paths.

======================  ====  ===================================================================
loader                  task  layout
======================  ====  ===================================================================
``speech_commands``     ks    Speech Commands v1: ``<word>/<speaker>_nohash_<n>.wav``,
                              ``_background_noise_/*.wav``, ``validation_list.txt``,
                              ``testing_list.txt``.  SUPERB's 12 classes: the ten
                              :data:`KS_COMMANDS`, ``_unknown_`` for every
                              other word, ``_silence_`` as 1 s windows of the background noise
                              files (rows with ``start``; no files are cut or written).
``fluent_commands``     ic    Fluent Speech Commands: ``data/{train,valid,test}_data.csv``
                              (``path, speakerId, transcription, action, object, location``).
                              ``label`` is ``action|object|location``; the three slots are
                              kept as columns too.
``voxceleb1``           sid   VoxCeleb1: ``wav/<speaker>/<video>/<n>.wav`` (e.g. ``id10001/1zcIwhmdeo4/00001.wav``) and ``iden_split.txt``
                              (``1``/``2``/``3`` = train/dev/test).
``librispeech``         asr   LibriSpeech: ``<subset>/<spk>/<chapter>/<spk>-<chapter>-<n>.flac``
                        /pr   with ``<spk>-<chapter>.trans.txt``; subsets ``train-*``,
                              ``dev-*``, ``test-*`` give the split.  ``target="chars"``: the
                              transcript text; ``target="phonemes"``: eSpeak IPA phonemes of it.
``iemocap``             er    IEMOCAP: ``Session<n>/dialog/EmoEvaluation/*.txt`` and
                              ``Session<n>/sentences/wav/<dialog>/<utt>.wav``; four classes
                              ``neu``, ``hap`` (with ``exc``), ``ang``, ``sad``; the test split is
                              one session (fold), dev a fixed 10% of the other sessions.
======================  ====  ===================================================================
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from pefttune.data import espeak
from pefttune.data.audio import AudioReadError, audio_duration

__all__ = [
    "KS_COMMANDS", "KS_UNKNOWN_WORDS", "KS_UNKNOWN_LABEL", "KS_SILENCE_LABEL", "KS_LABELS",
    "LAYOUTS",
    "LAYOUT_TASKS",
    "load_layout",
    "load_speech_commands",
    "load_fluent_commands",
    "load_voxceleb1",
    "load_librispeech",
    "load_iemocap",
]

#: SUPERB's ten Speech Commands keywords.
KS_COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
#: Speech Commands v1's auxiliary words: the ``_unknown_`` class.
KS_UNKNOWN_WORDS = (
    "bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house", "marvin",
    "nine", "one", "seven", "sheila", "six", "three", "tree", "two", "wow", "zero",
)
KS_UNKNOWN_LABEL = "_unknown_"
KS_SILENCE_LABEL = "_silence_"
#: The twelve KS classes (SUPERB's; the demo's synthesized corpus uses the same names).
KS_LABELS = KS_COMMANDS + (KS_UNKNOWN_LABEL, KS_SILENCE_LABEL)

_AUDIO_SUFFIXES = {".wav", ".flac"}


def _require_dir(root: str | Path, what: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {root}")
    return root.resolve()


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _durations(paths: list[str], on_error: str) -> list[float]:
    """Header durations; unreadable files raise, or give NaN with ``on_error="skip"``."""
    out = []
    for p in paths:
        try:
            out.append(audio_duration(p))
        except (FileNotFoundError, AudioReadError):
            if on_error != "skip":
                raise
            out.append(float("nan"))
    return out


def _finish(rows: list[dict], root: Path, with_durations: bool, on_error: str) -> pd.DataFrame:
    if not rows:
        raise ValueError(f"no utterances found under {root}")
    df = pd.DataFrame(rows)
    if with_durations:
        need = df["duration"].isna() if "duration" in df.columns else pd.Series(True, index=df.index)
        if "duration" not in df.columns:
            df["duration"] = np.nan
        idx = np.flatnonzero(need.to_numpy())
        values = _durations([df["path"].iloc[i] for i in idx], on_error)
        durations = df["duration"].to_numpy(dtype=float, copy=True)
        durations[idx] = values
        df["duration"] = durations
    df = df.reset_index(drop=True)
    df.attrs["root"] = str(root)
    return df


# --------------------------------------------------------------------------------------
# Speech Commands v1 (KS)
# --------------------------------------------------------------------------------------

def _read_list(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {line.strip().replace("\\", "/") for line in path.read_text().splitlines() if line.strip()}


def load_speech_commands(
    root: str | Path,
    test_root: str | Path | None = None,
    silence_seconds: float = 1.0,
    silence_split: tuple[float, float] = (0.8, 0.1),
    with_durations: bool = True,
    on_error: str = "raise",
) -> pd.DataFrame:
    """Speech Commands v1 in SUPERB's 12-class setup.

    Args:
        root: the extracted ``speech_commands_v0.01`` folder.
        test_root: optional extracted ``speech_commands_test_set_v0.01`` folder (folders
            named after the 12 classes).  When given, the test split comes from it (as in
            SUPERB); otherwise from ``testing_list.txt``.
        silence_seconds: length of the ``_silence_`` windows.
        silence_split: fractions of each background-noise file (from its start) whose
            windows go to train and dev; the rest goes to test (when ``test_root`` is
            given, to train and dev only, in the same proportion).
    """
    root = _require_dir(root, "Speech Commands")
    dev_list = _read_list(root / "validation_list.txt")
    test_list = _read_list(root / "testing_list.txt")
    if not dev_list and not test_list:
        raise FileNotFoundError(
            f"{root} has neither validation_list.txt nor testing_list.txt: not a Speech Commands folder"
        )
    rows = []
    for word_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        word = word_dir.name
        label = word if word in KS_COMMANDS else KS_UNKNOWN_LABEL
        for wav in sorted(word_dir.glob("*.wav")):
            rel = f"{word}/{wav.name}"
            if rel in dev_list:
                split = "dev"
            elif rel in test_list:
                if test_root is not None:
                    continue  # the separate test set replaces the test list
                split = "test"
            else:
                split = "train"
            rows.append({"path": str(wav), "split": split, "label": label,
                         "speaker": wav.name.split("_nohash_")[0], "word": word})
    if test_root is not None:
        test_root = _require_dir(test_root, "Speech Commands test set")
        for label_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
            for wav in sorted(label_dir.glob("*.wav")):
                rows.append({"path": str(wav), "split": "test", "label": label_dir.name,
                             "speaker": wav.name.split("_nohash_")[0], "word": label_dir.name})
    noise_dir = root / "_background_noise_"
    has_test_silence = test_root is not None
    for noise in sorted(noise_dir.glob("*.wav")) if noise_dir.is_dir() else []:
        try:
            total = audio_duration(noise)
        except AudioReadError:
            if on_error == "skip":
                continue
            raise
        windows = int(total // silence_seconds)
        train_frac, dev_frac = silence_split
        if has_test_silence:
            scale = train_frac + dev_frac
            train_frac, dev_frac = train_frac / scale, dev_frac / scale
        n_train = int(round(windows * train_frac))
        n_dev = int(round(windows * dev_frac))
        for k in range(windows):
            split = "train" if k < n_train else "dev" if k < n_train + n_dev else "test"
            rows.append({"path": str(noise), "split": split, "label": KS_SILENCE_LABEL,
                         "speaker": None, "word": KS_SILENCE_LABEL,
                         "start": k * silence_seconds, "duration": silence_seconds})
    df = _finish(rows, root, with_durations, on_error)
    if "start" not in df.columns:
        df["start"] = np.nan
    return df


# --------------------------------------------------------------------------------------
# Fluent Speech Commands (IC)
# --------------------------------------------------------------------------------------

def load_fluent_commands(root: str | Path, with_durations: bool = True, on_error: str = "raise") -> pd.DataFrame:
    """Fluent Speech Commands: one row per utterance, ``label = "action|object|location"``."""
    root = _require_dir(root, "Fluent Speech Commands")
    rows = []
    for split, name in (("train", "train_data.csv"), ("dev", "valid_data.csv"), ("test", "test_data.csv")):
        table = pd.read_csv(_require_file(root / "data" / name, "Fluent Speech Commands split file"))
        missing = {"path", "speakerId", "transcription", "action", "object", "location"} - set(table.columns)
        if missing:
            raise ValueError(f"{root / 'data' / name} lacks columns {sorted(missing)}")
        for rec in table.itertuples(index=False):
            slots = (str(rec.action), str(rec.object), str(rec.location))
            rows.append({
                "path": str(root / str(rec.path)), "split": split, "label": "|".join(slots),
                "speaker": str(rec.speakerId), "text": str(rec.transcription),
                "action": slots[0], "object": slots[1], "location": slots[2],
            })
    return _finish(rows, root, with_durations, on_error)


# --------------------------------------------------------------------------------------
# VoxCeleb1 (SID)
# --------------------------------------------------------------------------------------

def load_voxceleb1(root: str | Path, split_file: str | Path | None = None,
                   with_durations: bool = True, on_error: str = "raise") -> pd.DataFrame:
    """VoxCeleb1 identification: ``iden_split.txt`` lines ``<1|2|3> <speaker>/<video>/<n>.wav`` (e.g. ``1 id10001/1zcIwhmdeo4/00001.wav``); the label is the speaker id."""
    root = _require_dir(root, "VoxCeleb1")
    if split_file is None:
        candidates = [root / "iden_split.txt", root / "meta" / "iden_split.txt"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"iden_split.txt not found in {root} or {root / 'meta'} (pass split_file=...)")
        split_file = found[0]
    split_file = _require_file(Path(split_file), "VoxCeleb1 split file")
    wav_root = root / "wav" if (root / "wav").is_dir() else root
    names = {"1": "train", "2": "dev", "3": "test"}
    rows = []
    for number, line in enumerate(split_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in names:
            raise ValueError(f"{split_file}:{number}: expected '<1|2|3> <id>/<video>/<file>.wav', got {line!r}")
        rel = parts[1].replace("\\", "/")
        speaker = rel.split("/", 1)[0]
        rows.append({"path": str(wav_root / rel), "split": names[parts[0]], "label": speaker, "speaker": speaker})
    return _finish(rows, root, with_durations, on_error)


# --------------------------------------------------------------------------------------
# LibriSpeech (ASR / PR)
# --------------------------------------------------------------------------------------

def load_librispeech(
    root: str | Path,
    target: str = "chars",
    subsets: dict[str, str] | None = None,
    with_durations: bool = True,
    on_error: str = "raise",
) -> pd.DataFrame:
    """LibriSpeech subsets as one manifest.

    Args:
        root: the ``LibriSpeech`` folder holding subset folders.
        target: ``"chars"`` (transcript = the text, upper case as distributed) or
            ``"phonemes"`` (space-separated eSpeak ``en-us`` IPA phonemes of the text,
            see :func:`pefttune.data.espeak.phonemize`); the text is kept in ``text``.
        subsets: subset folder -> split; default: every ``train-*``, ``dev-*``, ``test-*``
            folder by its prefix.
    """
    if target not in ("chars", "phonemes"):
        raise ValueError(f"target must be 'chars' or 'phonemes', got {target!r}")
    root = _require_dir(root, "LibriSpeech")
    if subsets is None:
        subsets = {}
        for sub in sorted(p.name for p in root.iterdir() if p.is_dir()):
            head = sub.split("-", 1)[0]
            if head in ("train", "dev", "test"):
                subsets[sub] = head
        if not subsets:
            raise FileNotFoundError(f"no train-*/dev-*/test-* subset folders in {root}")
    phonemize: Callable[[str], str] | None = None
    if target == "phonemes":
        phonemize = lambda text: " ".join(espeak.phonemize(text.lower(), "en-us"))  # noqa: E731
    rows = []
    for sub, split in subsets.items():
        sub_dir = _require_dir(root / sub, f"LibriSpeech subset {sub}")
        for trans in sorted(sub_dir.glob("*/*/*.trans.txt")):
            for line in trans.read_text().splitlines():
                if not line.strip():
                    continue
                utt, _, text = line.strip().partition(" ")
                audio = next((trans.parent / f"{utt}{s}" for s in (".flac", ".wav")
                              if (trans.parent / f"{utt}{s}").is_file()), trans.parent / f"{utt}.flac")
                rows.append({
                    "path": str(audio), "split": split,
                    "transcript": phonemize(text) if phonemize else text,
                    "text": text, "speaker": utt.split("-", 1)[0], "subset": sub, "id": utt,
                })
    return _finish(rows, root, with_durations, on_error)


# --------------------------------------------------------------------------------------
# IEMOCAP (ER)
# --------------------------------------------------------------------------------------

_IEMOCAP_LINE = re.compile(r"^\[[\d.]+\s*-\s*[\d.]+\]\s+(\S+)\s+(\S+)\s+\[")
_IEMOCAP_MAP = {"neu": "neu", "hap": "hap", "exc": "hap", "ang": "ang", "sad": "sad"}


def load_iemocap(root: str | Path, test_session: int = 1, dev_fraction: float = 0.1,
                 with_durations: bool = True, on_error: str = "raise") -> pd.DataFrame:
    """IEMOCAP emotion recognition, four classes, one session held out as test.

    ``test_session`` (1-5) is the fold; ``dev_fraction`` of the other sessions'
    utterances (a fixed, seeded choice) form dev.  Speakers are ``Ses0<n><F|M>``.
    """
    if test_session not in range(1, 6):
        raise ValueError(f"test_session must be 1..5, got {test_session}")
    root = _require_dir(root, "IEMOCAP")
    rows = []
    for session in range(1, 6):
        base = root / f"Session{session}"
        evaluation = base / "dialog" / "EmoEvaluation"
        if not evaluation.is_dir():
            raise FileNotFoundError(f"IEMOCAP folder {evaluation} not found")
        for txt in sorted(evaluation.glob("*.txt")):
            dialog = txt.stem
            for line in txt.read_text(errors="replace").splitlines():
                match = _IEMOCAP_LINE.match(line.strip())
                if not match:
                    continue
                utt, emotion = match.groups()
                if emotion not in _IEMOCAP_MAP:
                    continue
                gender = utt.rsplit("_", 1)[-1][:1]
                rows.append({
                    "path": str(base / "sentences" / "wav" / dialog / f"{utt}.wav"),
                    "split": "test" if session == test_session else "train",
                    "label": _IEMOCAP_MAP[emotion], "speaker": f"Ses{session:02d}{gender}",
                    "session": session, "id": utt, "emotion": emotion,
                })
    if rows:
        rng = np.random.default_rng(0)
        train_ids = sorted(r["id"] for r in rows if r["split"] == "train")
        n_dev = int(round(len(train_ids) * dev_fraction))
        dev_ids = set(rng.choice(train_ids, size=n_dev, replace=False).tolist()) if n_dev else set()
        for r in rows:
            if r["id"] in dev_ids:
                r["split"] = "dev"
    return _finish(rows, root, with_durations, on_error)


# --------------------------------------------------------------------------------------

LAYOUTS: dict[str, Callable[..., pd.DataFrame]] = {
    "speech_commands": load_speech_commands,
    "fluent_commands": load_fluent_commands,
    "voxceleb1": load_voxceleb1,
    "librispeech": load_librispeech,
    "iemocap": load_iemocap,
}
#: The SUPERB task each layout serves by default.
LAYOUT_TASKS = {
    "speech_commands": "ks", "fluent_commands": "ic", "voxceleb1": "sid",
    "librispeech": "asr", "iemocap": "er",
}


def load_layout(layout: str, root: str | Path, **options) -> pd.DataFrame:
    """Load ``root`` with the loader named ``layout`` (a key of :data:`LAYOUTS`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown dataset layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout](root, **options)
