"""Synthesized speech corpora: the embedded, offline default datasets (the demo's; the core
reads them as manifests, through the data source ``synth`` of :mod:`pefttune.data.sources`).

Three SUPERB-like tasks, spoken by eSpeak NG "speakers" (a language voice, a voice
variant and a pitch/rate profile) over generated background noise:

- ``ks``  keyword spotting like Speech Commands v1 / SUPERB KS: the ten
  :data:`~pefttune.data.layouts.KS_COMMANDS`, ``_unknown_`` (words from
  :data:`~pefttune.data.layouts.KS_UNKNOWN_WORDS`) and
  ``_silence_`` (noise only).  1 s clips, random word onset, random SNR; the
  train/dev/test splits have disjoint speakers (``test_speakers`` of them in test, so
  an interval that resamples speakers has enough of them); every class has the same
  count per split.
- ``sid`` speaker identification like VoxCeleb1: ``speakers`` speakers, each saying
  ``per_speaker`` different sentences, split by utterance.
- ``pr``  phoneme recognition like SUPERB PR: sentences with IPA phoneme transcripts
  from :func:`pefttune.data.espeak.phonemize`; splits with disjoint sentences and
  speakers (``test_speakers`` in test); ``vocab.json`` (a :class:`~pefttune.data.vocab.TokenVocab`) next to the data.

One concept, one module (about 680 lines): the three tasks share speakers, noise, splits and
the corpus folder format, so their plans sit beside one renderer and one writer.

A corpus folder holds ``audio/<split>/<label or speaker>/<id>.flac`` (16 kHz, 16-bit),
``manifest.parquet`` + ``manifest.csv`` (see :mod:`pefttune.data.manifest`), a marker
``pefttune_corpus.json`` and, for ``pr``, ``vocab.json``.  The same task, seed and sizes
give the same bytes: every random choice comes from ``numpy.random.default_rng(seed)``
(one sub-seed per clip), and eSpeak runs its requests in a fixed order in a fresh
process (:func:`pefttune.data.espeak.synthesize_stream`).  A corpus is written into a hidden
staging folder beside its target (``.<name>.partial-<host>-<pid>-<random>``), marker last,
and renamed into place only when complete; a build killed half-way leaves only its staging
folder, which the next build of that corpus on the host removes (its process being gone)
before it starts again: nothing half-written is ever used.

Helpers for other corpora (e.g. self-supervised pretraining audio): :class:`Speaker`,
:func:`make_speakers`, :func:`make_sentences` (its words exclude all KS words),
:func:`make_noise`, :func:`mix_at_snr`, :func:`trim_silence`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from pefttune.data import espeak
from pefttune.data.audio import SAMPLE_RATE, write_flac
from pefttune.data.layouts import KS_LABELS, KS_SILENCE_LABEL, KS_UNKNOWN_LABEL, KS_UNKNOWN_WORDS
from pefttune.data.manifest import write_manifest
from pefttune.data.vocab import TokenVocab

__all__ = [
    "ENGLISH_VOICES", "SENTENCE_WORDS", "EN_US_PHONEMES", "NOISE_KINDS", "TASKS",
    "DEFAULT_SIZES", "CORPUS_MARKER", "CORPUS_FORMAT",
    "Speaker", "make_speakers", "make_sentences", "make_noise", "mix_at_snr", "trim_silence",
    "corpus_sizes", "corpus_plan", "build_corpus", "is_corpus_dir", "read_corpus_info",
]

#: English eSpeak voices used for synthetic speakers (accents).
ENGLISH_VOICES = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
    "en-gb-x-gbcwmd", "en-029", "en-us-nyc",
)
#: Voices for the ``pr`` corpus: one accent, so one consistent phoneme inventory.
PR_VOICES = ("en-us",)

#: Word classes for :func:`make_sentences`; none of them is a KS word.
SENTENCE_WORDS: dict[str, tuple[str, ...]] = {
    "det": ("the", "a", "my", "your", "this", "that", "every", "some", "her", "his", "our", "their"),
    "adj": (
        "big", "small", "old", "new", "red", "blue", "green", "bright", "quiet", "warm",
        "cold", "long", "short", "soft", "heavy", "young", "clean", "dark", "busy", "early",
        "late", "strange", "simple", "tired", "gentle", "famous", "empty", "narrow",
    ),
    "noun": (
        "man", "woman", "child", "teacher", "farmer", "doctor", "cook", "driver", "friend",
        "boat", "car", "garden", "river", "window", "table", "letter", "city", "mountain",
        "apple", "bread", "coffee", "music", "story", "morning", "evening", "winter",
        "summer", "kitchen", "school", "market", "paper", "picture", "song", "road", "ship",
        "horse", "fish", "flower", "lamp", "chair", "book", "clock", "bottle", "ticket",
        "island", "forest", "street", "bridge", "village", "pencil", "basket", "candle",
    ),
    "verb": (
        "found", "took", "saw", "made", "brought", "carried", "painted", "opened", "closed",
        "cleaned", "watched", "bought", "sold", "moved", "washed", "read", "wrote", "kept",
        "needed", "wanted", "liked", "visited", "called", "followed", "remembered", "showed",
    ),
    "prep": ("near", "under", "behind", "beside", "across", "inside", "after", "before", "with", "from", "at"),
}
_SENTENCE_TEMPLATES = (
    ("det", "adj", "noun", "verb", "det", "noun"),
    ("det", "noun", "verb", "det", "adj", "noun"),
    ("det", "noun", "verb", "det", "noun", "prep", "det", "noun"),
    ("det", "adj", "noun", "verb", "det", "noun", "prep", "det", "adj", "noun"),
    ("det", "noun", "prep", "det", "noun", "verb", "det", "adj", "noun"),
)

#: IPA phonemes eSpeak NG's ``en-us`` voice uses for ordinary English words (tokens of
#: :func:`pefttune.data.espeak.phonemize`).  ``pr`` corpora number these first, in
#: this order; a token outside it (another eSpeak release) is appended after them.
EN_US_PHONEMES = (
    "aɪ", "aɪə", "aɪɚ", "aʊ", "b", "d", "dʒ", "eɪ", "f", "h", "i", "iə", "iː", "j", "k",
    "l", "m", "n", "n̩", "oʊ", "p", "s", "t", "tʃ", "uː", "v", "w", "z", "æ", "ð", "ŋ",
    "ɐ", "ɑː", "ɑːɹ", "ɔ", "ɔɪ", "ɔː", "ɔːɹ", "ə", "əl", "ɚ", "ɛ", "ɛɹ", "ɜː", "ɡ", "ɪ",
    "ɪɹ", "ɹ", "ɾ", "ʃ", "ʊ", "ʊɹ", "ʌ", "ʒ", "ʔ", "θ", "ᵻ",
)

NOISE_KINDS = ("white", "pink", "brown", "hum")
TASKS = ("ks", "sid", "pr")
#: Default sizes per task (keyword arguments of :func:`build_corpus`).
DEFAULT_SIZES: dict[str, dict[str, int]] = {
    # 12 classes x (200 train + 50 dev + 400 test) = 7800 one-second clips. The test split is
    # sized for paired comparisons at a margin of delta = 0.01 accuracy. A verdict "no better
    # than +delta" needs the interval's upper end below +delta; for a true difference of 0 it has
    # 80% power only when the 95% half-width is <= 0.7 delta ((1.96 / (1.96 + 0.84)) delta). The
    # half-width between two trained configurations (3 seeds) was +-0.018 with 50 test clips per
    # class and +-0.009-0.011 with 200 (a coin flip at a true difference of 0); 400 per class
    # brings it to ~+-0.007 (benchmarks/README.md, "A test split sized for the margin").
    # 120 speakers: 52 train, 18 dev (15%), 50 test. Test clips come from 50 speakers (8 per
    # class each), enough for an interval that resamples speakers as clusters.
    "ks": {"per_class": 200, "eval_per_class": 50, "test_per_class": 400, "speakers": 120,
           "test_speakers": 50},
    # 40 speakers x 12 sentences (8 train, 2 dev, 2 test) = 480 clips of ~2 s.
    "sid": {"speakers": 40, "per_speaker": 12},
    # 600 sentences, each said once, split 70/15/15; 80 speakers: 38 train, 12 dev, 30 test
    # (3 test sentences each; 15 each with 3000 sentences).
    "pr": {"sentences": 600, "speakers": 80, "test_speakers": 30},
}
CORPUS_MARKER = "pefttune_corpus.json"
#: Bump when the generated bytes change for the same inputs (part of the cache key).
CORPUS_FORMAT = 2

_SPLIT_FRACTIONS = (("train", 0.70), ("dev", 0.15), ("test", 0.15))
_OWNED_ENTRIES = ("audio", "manifest.parquet", "manifest.csv", "vocab.json", CORPUS_MARKER)


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Speaker:
    """A synthetic speaker: an eSpeak voice + variant with a pitch/rate profile."""

    id: str
    voice: str
    variant: str | None
    pitch: int
    rate: int
    pitch_range: int

    def request(self, text: str, rng: np.random.Generator | None = None,
                rate_jitter: float = 0.0, pitch_jitter: int = 0) -> espeak.SynthRequest:
        """A synthesis request for ``text`` in this voice, optionally jittered by ``rng``.

        With an ``rng``, eSpeak's noise seed is drawn from it too.
        """
        rate, pitch = self.rate, self.pitch
        if rng is not None and rate_jitter:
            rate = int(round(rate * rng.uniform(1 - rate_jitter, 1 + rate_jitter)))
        if rng is not None and pitch_jitter:
            pitch = pitch + int(rng.integers(-pitch_jitter, pitch_jitter + 1))
        return espeak.SynthRequest(
            text=text, voice=self.voice, variant=self.variant,
            rate=int(np.clip(rate, 80, 450)), pitch=int(np.clip(pitch, 0, 100)),
            pitch_range=self.pitch_range,
            seed=0 if rng is None else int(rng.integers(2**31)),
        )


def make_speakers(
    rng: np.random.Generator,
    n: int,
    voices: Sequence[str] = ENGLISH_VOICES,
    variants: Sequence[str] | None = None,
    prefix: str = "spk",
    pitch: tuple[int, int] = (25, 75),
    rate: tuple[int, int] = (140, 210),
    pitch_range: tuple[int, int] = (25, 75),
) -> list[Speaker]:
    """``n`` speakers with distinct (voice, variant) pairs and random profiles.

    Ids are ``f"{prefix}{i:03d}"``.  ``variants`` defaults to every variant in the
    eSpeak data (:func:`pefttune.data.espeak.list_variants`).
    """
    variants = list(espeak.list_variants() if variants is None else variants)
    pairs = [(v, var) for v in voices for var in variants]
    if n > len(pairs):
        raise ValueError(f"asked for {n} speakers but only {len(pairs)} voice/variant pairs exist")
    chosen = rng.choice(len(pairs), size=n, replace=False)
    speakers = []
    for i, k in enumerate(chosen):
        voice, variant = pairs[int(k)]
        speakers.append(Speaker(
            id=f"{prefix}{i:03d}", voice=voice, variant=variant,
            pitch=int(rng.integers(pitch[0], pitch[1] + 1)),
            rate=int(rng.integers(rate[0], rate[1] + 1)),
            pitch_range=int(rng.integers(pitch_range[0], pitch_range[1] + 1)),
        ))
    return speakers


def make_sentences(
    rng: np.random.Generator,
    n: int,
    exclude: Iterable[str] = (),
    unique: bool = True,
) -> list[str]:
    """``n`` short English sentences from :data:`SENTENCE_WORDS` templates.

    Words in ``exclude`` are never used (the built-in lists already avoid every KS
    word).  With ``unique=True`` all sentences differ.
    """
    excluded = {w.lower() for w in exclude}
    words = {k: [w for w in v if w not in excluded] for k, v in SENTENCE_WORDS.items()}
    empty = [k for k, v in words.items() if not v]
    if empty:
        raise ValueError(f"exclude removes every word of class {empty}")
    sentences: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(sentences) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could not make {n} distinct sentences from the word lists")
        template = _SENTENCE_TEMPLATES[int(rng.integers(len(_SENTENCE_TEMPLATES)))]
        sentence = " ".join(words[c][int(rng.integers(len(words[c])))] for c in template)
        if unique and sentence in seen:
            continue
        seen.add(sentence)
        sentences.append(sentence)
    return sentences


def make_noise(rng: np.random.Generator, num_samples: int, kind: str | None = None,
               sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, str]:
    """Background noise with unit RMS: ``white``, ``pink`` (1/f), ``brown`` (1/f^2) or
    ``hum`` (mains hum with harmonics over a white floor).  ``kind=None`` picks one.

    Returns ``(noise, kind)``.
    """
    if kind is None:
        kind = NOISE_KINDS[int(rng.integers(len(NOISE_KINDS)))]
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; use one of {NOISE_KINDS}")
    white = rng.standard_normal(num_samples)
    if kind == "white":
        noise = white
    elif kind in ("pink", "brown"):
        spectrum = np.fft.rfft(white)
        freqs = np.fft.rfftfreq(num_samples, d=1.0 / sample_rate)
        freqs[0] = freqs[1] if num_samples > 1 else 1.0
        spectrum /= np.sqrt(freqs) if kind == "pink" else freqs
        noise = np.fft.irfft(spectrum, n=num_samples)
    else:
        t = np.arange(num_samples) / sample_rate
        f0 = 50.0 if rng.random() < 0.5 else 60.0
        noise = sum(
            rng.uniform(0.2, 1.0) / h * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi))
            for h in range(1, 6)
        ) + 0.1 * white
    rms = float(np.sqrt(np.mean(noise ** 2))) or 1.0
    return (noise / rms).astype(np.float32), kind


def trim_silence(wav: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    """Cut leading and trailing samples quieter than ``threshold`` times the peak."""
    if wav.size == 0:
        return wav
    loud = np.flatnonzero(np.abs(wav) > threshold * float(np.abs(wav).max()))
    if loud.size == 0:
        return wav[:0]
    return wav[loud[0]:loud[-1] + 1]


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``speech + noise`` with the noise scaled to ``snr_db`` below the speech's RMS.

    The speech RMS is measured over its non-silent part, so padding does not change the
    SNR.  Both arrays must have the same length.
    """
    if speech.shape != noise.shape:
        raise ValueError(f"speech and noise shapes differ: {speech.shape} vs {noise.shape}")
    active = trim_silence(speech)
    speech_rms = float(np.sqrt(np.mean(active ** 2))) if active.size else 0.0
    noise_rms = float(np.sqrt(np.mean(noise ** 2))) or 1.0
    scale = speech_rms / (10.0 ** (snr_db / 20.0)) / noise_rms
    return (speech + scale * noise).astype(np.float32)


# --------------------------------------------------------------------------------------
# Corpus plans: what to say, by whom, and how to render it
# --------------------------------------------------------------------------------------

@dataclass
class _Clip:
    """One planned clip: its manifest fields, its synthesis request and render settings."""

    row: dict
    request: espeak.SynthRequest | None   # None: noise only (``_silence_``)
    seed: int
    clip_seconds: float | None            # fixed length (KS) or None (speech + padding)
    snr_db: tuple[float, float]


def _share(n: int) -> int:
    """15% of ``n`` items (at least one): the default dev and test share."""
    return max(1, int(round(n * 0.15)))


def _split_counts(n: int, test: int | None = None, name: str = "test_speakers") -> dict[str, int]:
    """Split ``n`` items 70/15/15, at least one each (needs n >= 3); ``test`` items in test
    if given (dev keeps its 15%, train gets the rest and must keep one: else a ValueError
    naming ``name``)."""
    if n < 3:
        raise ValueError(f"need at least 3 items to make train/dev/test splits, got {n}")
    dev = _share(n)
    test = _share(n) if test is None else int(test)
    if test < 1 or n - dev - test < 1:
        raise ValueError(
            f"{name}: {test} of {n} leaves no train speaker after {dev} dev speakers "
            f"(use between 1 and {n - dev - 1}, or more speakers)"
        )
    return {"train": n - dev - test, "dev": dev, "test": test}


def _split_items(items: Sequence, rng: np.random.Generator, test: int | None = None) -> dict[str, list]:
    order = [items[int(i)] for i in rng.permutation(len(items))]
    counts = _split_counts(len(items), test)
    out, start = {}, 0
    for split, _ in _SPLIT_FRACTIONS:
        out[split] = order[start:start + counts[split]]
        start += counts[split]
    return out


def _speaker_fields(speaker: Speaker | None) -> dict:
    if speaker is None:
        return {"speaker": None, "voice": None, "variant": None}
    return {"speaker": speaker.id, "voice": speaker.voice, "variant": speaker.variant}


def _plan_ks(rng: np.random.Generator, per_class: int, eval_per_class: int, speakers: int,
             test_per_class: int | None = None, test_speakers: int | None = None) -> list[_Clip]:
    test_per_class = eval_per_class if test_per_class is None else test_per_class
    if per_class < 1 or eval_per_class < 1 or test_per_class < 1:
        raise ValueError("ks needs per_class, eval_per_class and test_per_class >= 1")
    _split_counts(speakers, test_speakers)  # a bad test_speakers fails before eSpeak is asked
    pool = make_speakers(rng, speakers, prefix="ks")
    by_split = _split_items(pool, rng, test_speakers)
    clips = []
    for split, _ in _SPLIT_FRACTIONS:
        count = {"train": per_class, "dev": eval_per_class, "test": test_per_class}[split]
        split_speakers = by_split[split]
        for label in KS_LABELS:
            order = rng.permutation(len(split_speakers))
            for k in range(count):
                seed = int(rng.integers(2**63))
                clip_id = f"{split}-{label.strip('_')}-{k:05d}"
                if label == KS_SILENCE_LABEL:
                    speaker, word, request = None, "", None
                else:
                    speaker = split_speakers[int(order[k % len(order)])]
                    word = label
                    if label == KS_UNKNOWN_LABEL:
                        word = KS_UNKNOWN_WORDS[int(rng.integers(len(KS_UNKNOWN_WORDS)))]
                    request = speaker.request(word, rng, rate_jitter=0.1, pitch_jitter=4)
                row = {
                    "id": clip_id, "path": f"audio/{split}/{label}/{clip_id}.flac",
                    "split": split, "label": label, "text": word, **_speaker_fields(speaker),
                }
                clips.append(_Clip(row, request, seed, 1.0, (5.0, 30.0)))
    return clips


def _plan_sid(rng: np.random.Generator, speakers: int, per_speaker: int) -> list[_Clip]:
    if per_speaker < 3:
        raise ValueError(f"sid needs per_speaker >= 3 (train/dev/test), got {per_speaker}")
    pool = make_speakers(rng, speakers, prefix="spk", pitch=(15, 85), rate=(130, 220), pitch_range=(15, 85))
    held_out = max(1, per_speaker // 6)
    sentences = make_sentences(rng, speakers * per_speaker)
    clips = []
    for s, speaker in enumerate(pool):
        mine = sentences[s * per_speaker:(s + 1) * per_speaker]
        splits = ["train"] * (per_speaker - 2 * held_out) + ["dev"] * held_out + ["test"] * held_out
        for k, (sentence, split) in enumerate(zip(mine, splits)):
            seed = int(rng.integers(2**63))
            clip_id = f"{speaker.id}-{k:03d}"
            row = {
                "id": clip_id, "path": f"audio/{split}/{speaker.id}/{clip_id}.flac",
                "split": split, "label": speaker.id, "text": sentence, **_speaker_fields(speaker),
            }
            request = speaker.request(sentence, rng, rate_jitter=0.03, pitch_jitter=2)
            clips.append(_Clip(row, request, seed, None, (15.0, 35.0)))
    return clips


def _cover_tokens(by_split: dict[str, list[str]], transcripts: dict[str, str]) -> None:
    """Swap sentences so every dev/test phoneme also occurs in train (in place).

    A dev/test sentence with a phoneme that no train sentence has trades places with a
    train sentence whose phonemes all stay covered without it; split sizes are kept.
    """
    def tokens(sentence: str) -> set[str]:
        return set(transcripts[sentence].split())

    for split in ("dev", "test"):
        for i, sentence in enumerate(list(by_split[split])):
            counts: dict[str, int] = {}
            for s in by_split["train"]:
                for t in tokens(s):
                    counts[t] = counts.get(t, 0) + 1
            if tokens(sentence) <= set(counts):
                continue
            for j, candidate in enumerate(by_split["train"]):
                needed = {t for t in tokens(candidate) if counts[t] == 1}
                if not needed:
                    by_split["train"][j], by_split[split][i] = sentence, candidate
                    break
            else:
                raise ValueError("cannot cover the dev/test phonemes with train sentences; use more sentences")


def _plan_pr(rng: np.random.Generator, sentences: int, speakers: int,
             test_speakers: int | None = None) -> list[_Clip]:
    _split_counts(speakers, test_speakers)
    pool = make_speakers(rng, speakers, voices=PR_VOICES, prefix="pr")
    speakers_by_split = _split_items(pool, rng, test_speakers)
    texts = make_sentences(rng, sentences)
    # One accent (PR_VOICES), so a sentence has one transcript whoever says it.
    transcripts = {t: " ".join(espeak.phonemize(t, PR_VOICES[0])) for t in texts}
    sentences_by_split = _split_items(texts, rng)
    _cover_tokens(sentences_by_split, transcripts)
    clips = []
    for split, _ in _SPLIT_FRACTIONS:
        split_speakers = speakers_by_split[split]
        for k, sentence in enumerate(sentences_by_split[split]):
            speaker = split_speakers[k % len(split_speakers)]
            seed = int(rng.integers(2**63))
            clip_id = f"{split}-{k:05d}"
            row = {
                "id": clip_id, "path": f"audio/{split}/{speaker.id}/{clip_id}.flac",
                "split": split, "transcript": transcripts[sentence],
                "text": sentence, **_speaker_fields(speaker),
            }
            request = speaker.request(sentence, rng, rate_jitter=0.05, pitch_jitter=3)
            clips.append(_Clip(row, request, seed, None, (20.0, 40.0)))
    return clips


_PLANNERS: dict[str, Callable[..., list[_Clip]]] = {"ks": _plan_ks, "sid": _plan_sid, "pr": _plan_pr}


def _render(clip: _Clip, speech: np.ndarray | None) -> tuple[np.ndarray, dict]:
    """The final waveform of a clip and the render facts that go into the manifest."""
    rng = np.random.default_rng(clip.seed)
    facts: dict = {}
    if speech is None:  # noise only
        n = int(round(clip.clip_seconds * SAMPLE_RATE))
        noise, kind = make_noise(rng, n)
        level_db = rng.uniform(-50.0, -20.0)
        wav = noise * (10.0 ** (level_db / 20.0))
        facts.update(noise=kind, snr_db=np.nan, onset=np.nan)
    else:
        voiced = trim_silence(speech)
        if voiced.size == 0:
            raise RuntimeError(f"eSpeak produced silence for {clip.request}")
        peak_db = rng.uniform(-12.0, -1.0)
        voiced = voiced * (10.0 ** (peak_db / 20.0) / float(np.abs(voiced).max()))
        if clip.clip_seconds is not None:
            n = int(round(clip.clip_seconds * SAMPLE_RATE))
            voiced = voiced[:n]
            onset = int(rng.integers(0, n - voiced.size + 1))
        else:
            lead = int(rng.uniform(0.05, 0.25) * SAMPLE_RATE)
            tail = int(rng.uniform(0.05, 0.25) * SAMPLE_RATE)
            n = lead + voiced.size + tail
            onset = lead
        dry = np.zeros(n, dtype=np.float32)
        dry[onset:onset + voiced.size] = voiced
        noise, kind = make_noise(rng, n)
        snr = float(rng.uniform(*clip.snr_db))
        wav = mix_at_snr(dry, noise, snr)
        facts.update(noise=kind, snr_db=round(snr, 3), onset=round(onset / SAMPLE_RATE, 4))
    wav = np.clip(wav, -1.0, 1.0).astype(np.float32)
    facts["duration"] = wav.size / SAMPLE_RATE
    if clip.request is not None:
        facts.update(rate=clip.request.rate, pitch=clip.request.pitch)
    else:
        facts.update(rate=np.nan, pitch=np.nan)
    return wav, facts


# --------------------------------------------------------------------------------------
# Corpus folders
# --------------------------------------------------------------------------------------

def corpus_sizes(task: str, **size: int) -> dict[str, int]:
    """The complete size settings for ``task``: the defaults updated with ``size``.

    For ``ks``, ``eval_per_class`` (dev clips per class) follows ``per_class // 4`` (at least
    1) unless given, and ``test_per_class`` follows ``eval_per_class`` unless given (only the
    default corpus has a larger test split).
    For ``ks`` and ``pr``, ``speakers`` is the whole pool, split into train, dev (15%) and
    ``test_speakers``; with ``speakers`` given, ``test_speakers`` follows 15% of it unless
    given.  Train must keep at least one speaker (else a ValueError naming ``test_speakers``).
    For ``sid`` (whose classes are speakers), ``per_class`` means ``per_speaker``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; use one of {', '.join(TASKS)}")
    if task == "sid" and "per_class" in size:
        per_class = size.pop("per_class")
        if per_class is not None:
            size.setdefault("per_speaker", per_class)
    unknown = set(size) - set(DEFAULT_SIZES[task])
    if unknown:
        raise ValueError(
            f"unknown size setting(s) {sorted(unknown)} for task {task!r}; "
            f"known: {sorted(DEFAULT_SIZES[task])}"
        )
    sizes = dict(DEFAULT_SIZES[task])
    given = {k: int(v) for k, v in size.items() if v is not None}
    if task == "ks" and "per_class" in given and "eval_per_class" not in given:
        sizes["eval_per_class"] = max(1, given["per_class"] // 4)
    if task == "ks" and ({"per_class", "eval_per_class"} & set(given)) and "test_per_class" not in given:
        sizes["test_per_class"] = given.get("eval_per_class", sizes["eval_per_class"])
    if "test_speakers" in sizes and "speakers" in given and "test_speakers" not in given:
        sizes["test_speakers"] = _share(given["speakers"])
    sizes.update(given)
    for key, value in sizes.items():
        if value < 1:
            raise ValueError(f"{key} must be at least 1, got {value}")
    if "test_speakers" in sizes:
        _split_counts(sizes["speakers"], sizes["test_speakers"])
    return sizes


def corpus_plan(task: str, seed: int = 0, **size: int) -> pd.DataFrame:
    """The manifest rows :func:`build_corpus` would write (id, path, split, label or
    transcript, text, speaker, voice, variant), without synthesizing any audio."""
    sizes = corpus_sizes(task, **size)
    return pd.DataFrame([c.row for c in _PLANNERS[task](np.random.default_rng(seed), **sizes)])


def is_corpus_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`build_corpus`."""
    return (Path(path) / CORPUS_MARKER).is_file()


def read_corpus_info(path: str | Path) -> dict:
    """The marker of a corpus folder: task, seed, sizes, versions, counts."""
    marker = Path(path) / CORPUS_MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{path} is not a pefttune corpus (no {CORPUS_MARKER})")
    return json.loads(marker.read_text())


def _check_output_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_corpus_dir(out_dir):
        raise FileExistsError(
            f"output folder {out_dir} is not empty and is not a pefttune corpus; "
            "refusing to write into it (choose a new or empty folder)"
        )


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in ("pefttune", "espeakng-loader"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def _write_corpus(task: str, folder: Path, seed: int, sizes: dict[str, int]) -> dict:
    """Generate a corpus into the empty ``folder``; returns the marker dict."""
    rng = np.random.default_rng(seed)
    clips = _PLANNERS[task](rng, **sizes)
    requests = [c.request for c in clips if c.request is not None]
    stream = espeak.synthesize_stream(requests, sample_rate=SAMPLE_RATE)
    rows = []
    for clip in clips:
        speech = next(stream) if clip.request is not None else None
        wav, facts = _render(clip, speech)
        write_flac(folder / clip.row["path"], wav)
        rows.append({**clip.row, **facts, "seed": clip.seed})
    for _ in stream:  # drain (there is nothing left) so the worker exits cleanly
        pass
    columns = ["path", "split", "label", "transcript", "speaker", "duration", "id", "text",
               "voice", "variant", "rate", "pitch", "noise", "snr_db", "onset", "seed"]
    df = pd.DataFrame(rows)
    df = df[[c for c in columns if c in df.columns]]
    df["seed"] = df["seed"].astype("uint64")
    write_manifest(df, folder)
    if task == "pr":
        vocab = TokenVocab.from_transcripts(df["transcript"], unit="phoneme", base=EN_US_PHONEMES)
        vocab.save(folder / "vocab.json")
    info = {
        "format": "pefttune-synthetic-corpus",
        "corpus_format": CORPUS_FORMAT,
        "task": task,
        "seed": int(seed),
        "sizes": sizes,
        "versions": _package_versions(),
        "clips": {split: int((df["split"] == split).sum()) for split, _ in _SPLIT_FRACTIONS},
        "hours": round(float(df["duration"].sum()) / 3600.0, 4),
    }
    (folder / CORPUS_MARKER).write_text(json.dumps(info, indent=1, sort_keys=True))
    return info


def _staging_dir(out_dir: Path) -> Path:
    """A new hidden staging folder beside ``out_dir`` (named after this host and process), after
    removing the ones that builders killed on this host left behind (their process is gone):
    a killed build leaves nothing half-written that a later one would keep or read."""
    _clear_abandoned_staging(out_dir)
    return out_dir.parent / f".{out_dir.name}.partial-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _clear_abandoned_staging(out_dir: Path) -> list[Path]:
    """Remove the staging folders of ``out_dir`` whose builder ran on this host and is dead; returns them.
    (Live builders' folders, other hosts' and unnamed ones are left alone.)"""
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.partial-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{12}}$")
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    for entry in out_dir.parent.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and match["host"] == _host() and not _process_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def build_corpus(task: str, out_dir: str | Path, seed: int = 0, **size: int) -> Path:
    """Generate the synthetic ``task`` corpus in ``out_dir``; returns its manifest path.

    ``out_dir`` must be new, empty, or a previous pefttune corpus (which is replaced:
    only the entries pefttune wrote are removed).  The corpus is built in a hidden
    sibling folder and moved into place when complete, so a failed run leaves nothing
    half-written.  Same task, seed and sizes -> same bytes.

    Sizes (defaults in :data:`DEFAULT_SIZES`, rules in :func:`corpus_sizes`): ``ks``:
    ``per_class``, ``eval_per_class``, ``test_per_class``, ``speakers``, ``test_speakers``;
    ``sid``: ``speakers``, ``per_speaker``; ``pr``: ``sentences``, ``speakers``, ``test_speakers``.
    """
    sizes = corpus_sizes(task, **size)
    out_dir = Path(out_dir).expanduser().absolute()
    _check_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_dir(out_dir)
    staging.mkdir()
    try:
        _write_corpus(task, staging, seed, sizes)
        _replace_dir(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir / "manifest.parquet"


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move ``staging`` to ``out_dir``, clearing a previous corpus's own entries first."""
    if out_dir.is_dir():
        _check_output_dir(out_dir)
        if is_corpus_dir(out_dir):
            for name in _OWNED_ENTRIES:
                target = out_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        if any(out_dir.iterdir()):
            # Files of the user's next to an old corpus: move ours in beside them.
            for entry in staging.iterdir():
                entry.rename(out_dir / entry.name)
            return
        out_dir.rmdir()
    staging.rename(out_dir)


def timed_build(task: str, out_dir: str | Path, seed: int = 0, **size: int) -> tuple[Path, float]:
    """:func:`build_corpus` that also returns the wall-clock seconds it took."""
    start = time.perf_counter()
    manifest = build_corpus(task, out_dir, seed=seed, **size)
    return manifest, time.perf_counter() - start
