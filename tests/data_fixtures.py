"""Builders of miniature dataset trees for the data tests.

Each ``make_*`` function writes a tiny copy of a real dataset's layout (folders,
metadata files, a few clips of eSpeak speech) under a temp folder and returns its root.
Audio is synthesized in-process (bit-exactness does not matter here); clips are kept
short to stay fast.  Some files are deliberately written at other sample rates or in
stereo, as real datasets are.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import soundfile as sf

from pefttune.data.espeak import synthesize
from pefttune.demo.synth import make_noise


def speech(text: str, variant: str | None = None, sample_rate: int = 16000) -> np.ndarray:
    return synthesize(text, variant=variant, rate=220, sample_rate=sample_rate)


def write_wav(path: Path, wav: np.ndarray, sample_rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wav, sample_rate, subtype="PCM_16")
    return path


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> content hash of every file under ``root`` (to prove nothing was written)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def make_speech_commands(root: Path) -> Path:
    """``speech_commands_v0.01``: 3 command words, 2 other words, background noise, lists."""
    root.mkdir(parents=True, exist_ok=True)
    speakers = ["0a7c2a8d", "1b4c9b89", "2c9e8f11"]
    validation, testing = [], []
    for word in ("yes", "no", "stop", "bed", "marvin"):
        for k, spk in enumerate(speakers):
            rel = f"{word}/{spk}_nohash_0.wav"
            write_wav(root / rel, speech(word, variant=["m1", "f2", "m3"][k]))
            if k == 1:
                validation.append(rel)
            elif k == 2:
                testing.append(rel)
    rng = np.random.default_rng(0)
    noise_dir = root / "_background_noise_"
    write_wav(noise_dir / "white_noise.wav", 0.1 * make_noise(rng, 16000 * 10, "white")[0])
    # A background file at 22.05 kHz, as some real files are not at 16 kHz.
    write_wav(noise_dir / "pink_noise.wav", 0.1 * make_noise(rng, 22050 * 10, "pink", 22050)[0], 22050)
    (noise_dir / "README.md").write_text("background noise\n")
    (root / "validation_list.txt").write_text("\n".join(validation) + "\n")
    (root / "testing_list.txt").write_text("\n".join(testing) + "\n")
    return root


def make_speech_commands_test_set(root: Path) -> Path:
    """``speech_commands_test_set_v0.01``: folders named after the 12 classes."""
    for label, text in (("yes", "yes"), ("_unknown_", "house")):
        write_wav(root / label / f"9f9f9f9f_nohash_{label.strip('_')}.wav", speech(text))
    rng = np.random.default_rng(1)
    write_wav(root / "_silence_" / "silence_0.wav", 0.05 * make_noise(rng, 16000, "brown")[0])
    return root


def make_fluent_commands(root: Path) -> Path:
    """Fluent Speech Commands: ``data/*_data.csv`` and ``wavs/speakers/<id>/<uuid>.wav``."""
    commands = [
        ("Turn on the lights", "activate", "lights", "none"),
        ("Turn up the heat in the kitchen", "increase", "heat", "kitchen"),
        ("Switch off the lamp", "deactivate", "lamp", "none"),
    ]
    speakers = ["2BqVo8kVB2Skwgyb", "4aGjX3AG5xcxeL7a"]
    for split in ("train", "valid", "test"):
        lines = [",path,speakerId,transcription,action,object,location"]
        for s, spk in enumerate(speakers):
            for c, (text, action, obj, location) in enumerate(commands):
                rel = f"wavs/speakers/{spk}/{split}-{s}-{c}.wav"
                write_wav(root / rel, speech(text.lower(), variant=["m2", "f1"][s]))
                lines.append(f"{len(lines) - 1},{rel},{spk},{text},{action},{obj},{location}")
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "data" / f"{split}_data.csv").write_text("\n".join(lines) + "\n")
    return root


def make_voxceleb1(root: Path) -> Path:
    """VoxCeleb1: ``wav/idXXXXX/<video>/<n>.wav`` and ``iden_split.txt``."""
    lines = []
    for s, (spk, variant) in enumerate((("id10001", "m1"), ("id10002", "f3"))):
        for n, split in enumerate(("1", "1", "2", "3")):
            rel = f"{spk}/vid{s}{n % 2}/{n + 1:05d}.wav"
            wav = speech(f"speaker {s} says number {n}", variant=variant)
            if s == 1 and n == 0:
                # A stereo file at 44.1 kHz: must be downmixed and resampled.
                wav44 = speech(f"speaker {s} says number {n}", variant=variant, sample_rate=44100)
                write_wav(root / "wav" / rel, np.stack([wav44, 0.5 * wav44], axis=1), 44100)
            else:
                write_wav(root / "wav" / rel, wav)
            lines.append(f"{split} {rel}")
    (root / "iden_split.txt").write_text("\n".join(lines) + "\n")
    return root


def make_librispeech(root: Path) -> Path:
    """LibriSpeech: ``<subset>/<spk>/<chapter>/<spk>-<chapter>-<n>.flac`` + ``.trans.txt``."""
    texts = {
        "train-clean-100": ("19", "198", ["HELLO WORLD", "THE CAT SAT"]),
        "dev-clean": ("84", "121123", ["GOOD MORNING"]),
        "test-clean": ("1089", "134686", ["SEE YOU LATER"]),
    }
    for subset, (spk, chapter, sentences) in texts.items():
        folder = root / subset / spk / chapter
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for n, text in enumerate(sentences):
            utt = f"{spk}-{chapter}-{n:04d}"
            sf.write(str(folder / f"{utt}.flac"), speech(text.lower()), 16000, format="FLAC")
            lines.append(f"{utt} {text}")
        (folder / f"{spk}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return root


def make_iemocap(root: Path) -> Path:
    """IEMOCAP: five sessions, ``dialog/EmoEvaluation/*.txt`` and ``sentences/wav``."""
    emotions = ["neu", "hap", "exc", "ang", "sad", "fru", "xxx"]
    for session in range(1, 6):
        dialog = f"Ses{session:02d}F_impro01"
        lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        for k, emotion in enumerate(emotions):
            gender = "F" if k % 2 == 0 else "M"
            utt = f"{dialog}_{gender}{k:03d}"
            write_wav(root / f"Session{session}" / "sentences" / "wav" / dialog / f"{utt}.wav",
                      speech("i feel fine", variant="f1" if gender == "F" else "m1")[:8000])
            lines.append(f"[{k}.0000 - {k}.5000]\t{utt}\t{emotion}\t[2.5000, 2.5000, 2.5000]")
            lines.append(f"C-E1:\t{emotion};\t()")
            lines.append("")
        folder = root / f"Session{session}" / "dialog" / "EmoEvaluation"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{dialog}.txt").write_text("\n".join(lines))
    return root


#: The words of :func:`make_own_data` and the eSpeak NG variants that speak them (one per speaker).
OWN_WORDS = ("up", "down", "left", "right")
OWN_SPEAKERS = {"train": ("m1", "f2", "m3", "f4"), "dev": ("m5", "f1"), "test": ("m2", "f3")}


def make_own_data(root: Path, repeats: int = 2) -> Path:
    """A user's own keyword data, unlike the synthesized corpus: four words spoken by eight eSpeak
    voices (speakers disjoint across splits), each take with its own tempo and a little noise,
    written as 22.05 kHz stereo 16-bit WAV (pefttune downmixes and resamples), and a CSV manifest
    with relative paths and a ``speaker`` column: ``root/data/manifest.csv``."""
    rng = np.random.default_rng(7)
    rows = ["path,split,label,speaker"]
    for split, variants in OWN_SPEAKERS.items():
        for variant in variants:
            for word in OWN_WORDS:
                for take in range(repeats):
                    wav = synthesize(word, variant=variant, rate=int(rng.integers(150, 260)), sample_rate=22050)
                    wav = np.pad(wav, (int(rng.integers(500, 3000)), int(rng.integers(500, 3000))))
                    wav = wav + 0.003 * rng.standard_normal(wav.size).astype(np.float32)
                    stereo = np.stack([wav, 0.8 * wav], axis=1)
                    rel = f"clips/{split}/{word}-{variant}-{take}.wav"
                    write_wav(root / "data" / rel, stereo, 22050)
                    rows.append(f"{rel},{split},{word},spk-{variant}")
    (root / "data" / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "data" / "manifest.csv"
