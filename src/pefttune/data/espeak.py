"""Offline speech synthesis and phonemization with eSpeak NG, through ctypes.

The shared library and its voice data come from the ``espeakng-loader`` wheel, so
nothing has to be installed on the system and nothing is downloaded.

One concept, one module (about 530 lines): the ctypes binding of the eSpeak NG library and
the deterministic worker process that drives it belong together, since the determinism
guarantee rests on how the two interact.  It is part of the core, not of :mod:`pefttune.demo`:
the LibriSpeech layout's phoneme targets come from :func:`phonemize`; the demo's corpora
(:mod:`pefttune.demo.synth`) synthesize with it.

Public API
----------
- :func:`synthesize` -- text to a float32 mono waveform at 16 kHz (by default).
- :func:`synthesize_many` / :func:`synthesize_stream` -- many :class:`SynthRequest`,
  *deterministically*, in a fresh worker process (see "Determinism" below).
- :func:`phonemize` -- text to a list of IPA phoneme tokens.
- :func:`list_variants` / :func:`list_voices` -- what the bundled data offers.

Determinism
-----------
Two things make eSpeak NG's output vary.  (1) Its noise source (breathy and whispery
variants) is seeded from the clock: :func:`synthesize` reseeds it with ``seed``
(``espeak_ng_SetRandSeed``) before every utterance.  (2) It keeps internal state
(e.g. the pitch-flutter phase of its wave generator) in static variables that
``espeak_Initialize`` does not reset, so the same text gives slightly different
samples on each call inside one process, while a *fresh* process replays exactly the
same sequence.  Anything that must be reproducible byte for byte (the synthesized
corpora) goes through :func:`synthesize_stream` / :func:`synthesize_many`, which run
their requests in a fixed order in a newly started process.  :func:`synthesize`
itself is fine for anything that does not need bit-exact repeats.

Thread safety: the library has one global state per process; calls are serialised
by a lock.

Phoneme tokenisation
--------------------
:func:`phonemize` asks ``espeak_TextToPhonemes`` for IPA with an explicit separator
between phoneme names, so multi-character phonemes (``aɪ``, ``dʒ``, ``oʊ``, ``ɑː``)
stay one token.  Stress marks (``ˈ``, ``ˌ``) are removed unless ``keep_stress=True``;
length marks (``ː``) stay part of their vowel.  Language-switch flags such as
``(fr)`` are dropped.  Word boundaries are dropped too, unless ``word_boundary`` names a
token to insert between words.  This matches how SUPERB's PR task scores phones
(a flat phone sequence, no stress).
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import Iterator, Sequence

import espeakng_loader
import numpy as np

__all__ = [
    "ESPEAK_SAMPLE_RATE",
    "TARGET_SAMPLE_RATE",
    "SynthRequest",
    "synthesize",
    "synthesize_many",
    "synthesize_stream",
    "phonemize",
    "list_variants",
    "list_voices",
    "voice_name",
    "data_path",
]

#: Native sample rate of eSpeak NG's output.
ESPEAK_SAMPLE_RATE = 22050
#: Sample rate that every pefttune waveform uses.
TARGET_SAMPLE_RATE = 16000

# --- constants from espeak-ng's speak_lib.h --------------------------------------
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_EE_OK = 0
_PARAM_RATE = 1
_PARAM_VOLUME = 2
_PARAM_PITCH = 3
_PARAM_RANGE = 4
_PARAM_WORDGAP = 7
_PHONEMES_IPA = 0x02
_PHONEME_SEPARATOR = "_"
_RATE_MIN, _RATE_MAX = 80, 450

_STRESS_MARKS = "ˈˌ"
_LANG_FLAG = re.compile(r"\([^)]*\)")
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")

_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class _VoiceStruct(ctypes.Structure):
    """``espeak_VOICE`` from speak_lib.h."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


class _Engine:
    """The process-wide eSpeak NG instance (the library has global state: one per process)."""

    def __init__(self) -> None:
        self.data_path = Path(espeakng_loader.get_data_path())
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        lib.espeak_TextToPhonemes.argtypes = [
            ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int
        ]
        self.set_rand_seed = getattr(lib, "espeak_ng_SetRandSeed", None)
        if self.set_rand_seed is not None:
            self.set_rand_seed.restype = None
            self.set_rand_seed.argtypes = [ctypes.c_long]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_VoiceStruct))
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_path).encode(), 0
        )
        if rate != ESPEAK_SAMPLE_RATE:
            raise RuntimeError(
                f"eSpeak NG initialisation failed or gave an unexpected sample rate ({rate}); "
                f"data path {self.data_path}"
            )
        self.lib = lib
        self.lock = threading.RLock()
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._on_audio)  # keep a reference: C holds the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def _on_audio(self, wav, num_samples, _events) -> int:
        if wav and num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0

    def set_voice(self, name: str) -> None:
        if self.lib.espeak_SetVoiceByName(name.encode("utf-8")) != _EE_OK:
            raise ValueError(
                f"eSpeak NG has no voice {name!r}; see pefttune.data.espeak.list_voices() "
                "and list_variants()"
            )

    def synth_int16(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int,
                    volume: int, word_gap: int, seed: int = 0) -> np.ndarray:
        """Synthesize at the native rate; the caller holds ``self.lock``."""
        self.set_voice(voice)
        if self.set_rand_seed is not None:
            self.set_rand_seed(int(seed))
        for param, value in (
            (_PARAM_RATE, rate), (_PARAM_PITCH, pitch), (_PARAM_RANGE, pitch_range),
            (_PARAM_VOLUME, volume), (_PARAM_WORDGAP, word_gap),
        ):
            if self.lib.espeak_SetParameter(param, int(value), 0) != _EE_OK:
                raise ValueError(f"eSpeak NG rejected parameter {param}={value}")
        data = text.encode("utf-8")
        self._chunks = []
        status = self.lib.espeak_Synth(
            data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
        )
        if status != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed with status {status} for text {text!r}")
        chunks, self._chunks = self._chunks, []
        if not chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(chunks)

    def text_to_phonemes(self, text: str, voice: str) -> list[str]:
        """IPA clauses with ``_`` between phonemes; the caller holds ``self.lock``."""
        self.set_voice(voice)
        mode = _PHONEMES_IPA | (ord(_PHONEME_SEPARATOR) << 8)
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        pointer = ctypes.c_char_p(ctypes.addressof(buf))
        clauses = []
        while pointer.value:
            result = self.lib.espeak_TextToPhonemes(ctypes.byref(pointer), _CHARS_UTF8, mode)
            if result:
                clauses.append(result.decode("utf-8"))
        return clauses


_ENGINE: _Engine | None = None
_ENGINE_LOCK = threading.Lock()


def _engine() -> _Engine:
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            _ENGINE = _Engine()
        return _ENGINE


def data_path() -> Path:
    """The ``espeak-ng-data`` directory shipped in the ``espeakng-loader`` wheel."""
    return Path(espeakng_loader.get_data_path())


@functools.lru_cache(maxsize=1)
def list_variants() -> list[str]:
    """Voice variants (files under ``espeak-ng-data/voices/!v``), sorted.

    Variants modify any language voice (``"en-us+m3"``, ``"en-us+klatt"``, ...).  Names
    with spaces or other odd characters are left out: they cannot be joined with ``+``
    reliably.
    """
    directory = data_path() / "voices" / "!v"
    return sorted(p.name for p in directory.iterdir() if p.is_file() and _VARIANT_NAME.match(p.name))


@functools.lru_cache(maxsize=1)
def _voice_files() -> dict[str, str]:
    """Language code -> voice file name (what ``espeak_SetVoiceByName`` accepts).

    Read from ``espeak_ListVoices``.  A voice lists (priority byte, NUL-terminated
    language) pairs; every listed language maps to the voice's file name (the last
    part of its identifier, e.g. ``roa/fr`` -> ``fr`` for ``fr-fr``).  The first voice
    listing a language wins.
    """
    eng = _engine()
    mapping: dict[str, str] = {}
    with eng.lock:
        voices = eng.lib.espeak_ListVoices(None)
        i = 0
        while voices[i]:
            voice = voices[i].contents
            i += 1
            if not voice.languages or not voice.identifier:
                continue
            file_name = voice.identifier.decode("utf-8", "replace").rsplit("/", 1)[-1]
            offset = 0
            while True:
                priority = ctypes.string_at(voice.languages + offset, 1)[0]
                if priority == 0:
                    break
                language = ctypes.string_at(voice.languages + offset + 1)
                offset += 2 + len(language)
                mapping.setdefault(language.decode("utf-8", "replace").lower(), file_name)
    return mapping


def list_voices() -> list[str]:
    """Language voices known to eSpeak NG, as codes that ``synthesize`` accepts (sorted).

    E.g. ``"en-us"``, ``"en-gb"``, ``"en-gb-scotland"``, ``"fr-fr"``, ``"de"``.
    """
    return sorted(_voice_files())


def voice_name(voice: str, variant: str | None = None) -> str:
    """The eSpeak voice string for ``voice`` with an optional ``variant``.

    A language code from :func:`list_voices` is mapped to its voice file
    (``"fr-fr"`` -> ``"fr"``); anything else is passed through to eSpeak as given.
    ``voice_name("en-us", "m3") == "en-US+m3"``.
    """
    voice = _voice_files().get(voice.lower(), voice)
    if variant:
        if variant not in list_variants():
            raise ValueError(f"unknown eSpeak variant {variant!r}; known: {', '.join(list_variants())}")
        return f"{voice}+{variant}"
    return voice


def _resample(x: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    if from_rate == to_rate:
        return x
    from scipy.signal import resample_poly  # imported here: the synthesis worker never needs scipy

    g = gcd(int(from_rate), int(to_rate))
    # 22050 -> 16000 is up 320, down 441.
    return resample_poly(x, to_rate // g, from_rate // g).astype(np.float32)


def synthesize(
    text: str,
    voice: str = "en-us",
    variant: str | None = None,
    rate: int = 175,
    pitch: int = 50,
    pitch_range: int = 50,
    volume: int = 100,
    word_gap: int = 0,
    sample_rate: int = TARGET_SAMPLE_RATE,
    seed: int = 0,
) -> np.ndarray:
    """Speak ``text`` with eSpeak NG and return a float32 mono waveform in [-1, 1].

    Args:
        text: UTF-8 text in the voice's language.
        voice: a language voice, e.g. ``"en-us"`` (see :func:`list_voices`).
        variant: optional voice variant, e.g. ``"m3"``, ``"f2"``, ``"klatt"``, ``"whisper"``
            (see :func:`list_variants`).
        rate: speaking rate in words per minute (eSpeak accepts 80..450).
        pitch: base pitch 0..100 (50 is the voice's normal pitch).
        pitch_range: pitch range 0..100 (0 is monotone, 50 normal).
        volume: amplitude 0..200 (100 normal; more may clip).
        word_gap: extra pause between words, in units of 10 ms.
        sample_rate: output rate; eSpeak's 22050 Hz is resampled with
            ``scipy.signal.resample_poly`` (320/441 for the default 16 kHz).
        seed: seed of eSpeak's noise generator (used by breathy/whispery variants),
            set before this utterance; 0..2**31-1.

    Repeated calls inside one process differ slightly (see the module docstring); use
    :func:`synthesize_many` where bit-exact reproducibility matters.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    pcm = _synthesize_native(text, voice, variant, rate, pitch, pitch_range, volume, word_gap, seed)
    return _to_float(pcm, sample_rate)


def _to_float(pcm: np.ndarray, sample_rate: int) -> np.ndarray:
    """eSpeak's int16 samples at 22.05 kHz -> float32 in [-1, 1] at ``sample_rate``."""
    wav = pcm.astype(np.float32) / 32768.0
    return _resample(wav, ESPEAK_SAMPLE_RATE, sample_rate).astype(np.float32, copy=False)


def _synthesize_native(text: str, voice: str, variant: str | None, rate: int, pitch: int,
                       pitch_range: int, volume: int, word_gap: int, seed: int) -> np.ndarray:
    """Validate the arguments and synthesize int16 samples at eSpeak's native rate."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("synthesize needs non-empty text")
    if not _RATE_MIN <= rate <= _RATE_MAX:
        raise ValueError(f"rate must be within {_RATE_MIN}..{_RATE_MAX} words per minute, got {rate}")
    if not 0 <= pitch <= 100 or not 0 <= pitch_range <= 100:
        raise ValueError(f"pitch and pitch_range must be within 0..100, got {pitch}, {pitch_range}")
    if not 0 <= volume <= 200:
        raise ValueError(f"volume must be within 0..200, got {volume}")
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must be within 0..2**31-1, got {seed}")
    name = voice_name(voice, variant)
    eng = _engine()
    with eng.lock:
        return eng.synth_int16(text, name, rate, pitch, pitch_range, volume, word_gap, seed)


def _split_phonemes(clauses: Sequence[str], keep_stress: bool, word_boundary: str | None) -> list[str]:
    tokens: list[str] = []
    for clause in clauses:
        clause = _LANG_FLAG.sub("", clause)
        for word in clause.split():
            phones = []
            for ph in word.split(_PHONEME_SEPARATOR):
                if not keep_stress:
                    ph = "".join(c for c in ph if c not in _STRESS_MARKS)
                if ph:
                    phones.append(ph)
            if not phones:
                continue
            if word_boundary is not None and tokens:
                tokens.append(word_boundary)
            tokens.extend(phones)
    return tokens


def phonemize(
    text: str,
    voice: str = "en-us",
    keep_stress: bool = False,
    word_boundary: str | None = None,
) -> list[str]:
    """Phoneme tokens (IPA) for ``text`` via ``espeak_TextToPhonemes``.

    See the module docstring for the tokenisation.  ``phonemize("yes no")`` gives
    ``['j', 'ɛ', 's', 'n', 'oʊ']``; with ``word_boundary="|"`` it gives
    ``['j', 'ɛ', 's', '|', 'n', 'oʊ']``.
    """
    if not isinstance(text, str):
        raise ValueError(f"phonemize needs a string, got {type(text).__name__}")
    if not text.strip():
        return []
    name = voice_name(voice)
    eng = _engine()
    with eng.lock:
        clauses = eng.text_to_phonemes(text, name)
    return _split_phonemes(clauses, keep_stress, word_boundary)


@dataclass(frozen=True)
class SynthRequest:
    """One utterance for :func:`synthesize_many`; fields mirror :func:`synthesize`."""

    text: str
    voice: str = "en-us"
    variant: str | None = None
    rate: int = 175
    pitch: int = 50
    pitch_range: int = 50
    volume: int = 100
    word_gap: int = 0
    seed: int = 0

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`synthesize` (all fields but ``text``)."""
        return {
            "voice": self.voice, "variant": self.variant, "rate": self.rate,
            "pitch": self.pitch, "pitch_range": self.pitch_range,
            "volume": self.volume, "word_gap": self.word_gap, "seed": self.seed,
        }


def _child_env() -> dict[str, str]:
    """This environment, with the folder holding this ``pefttune`` package first on
    PYTHONPATH, so the worker imports the same code even when pefttune is not installed."""
    package_parent = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return env


def synthesize_stream(
    requests: Sequence[SynthRequest],
    sample_rate: int = TARGET_SAMPLE_RATE,
) -> Iterator[np.ndarray]:
    """Yield one waveform per request, in order, synthesized in a fresh process.

    The requests go to a newly started ``python -m pefttune.data.espeak`` process, where
    eSpeak starts from its initial state, so the same list always yields the same
    waveforms, byte for byte.  The child streams each utterance back as it is made
    (a little-endian int64 sample count followed by eSpeak's int16 samples at 22.05 kHz;
    this process converts and resamples them, so the child needs neither scipy nor
    much start-up time), and arbitrarily many utterances can be made without holding
    them all in memory.  No pickle is used.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    requests = list(requests)
    for r in requests:
        if not isinstance(r, SynthRequest):
            raise ValueError(f"synthesize requests must be SynthRequest, got {type(r).__name__}")
    if not requests:
        return
    with tempfile.TemporaryDirectory(prefix="pefttune-espeak-") as tmp:
        job = Path(tmp) / "requests.json"
        job.write_text(json.dumps({"requests": [dataclasses.asdict(r) for r in requests]}))
        # The child's stderr goes to a file: a pipe nobody reads could fill up and stall it.
        err_path = Path(tmp) / "stderr.txt"
        err_file = err_path.open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "pefttune.data.espeak", str(job)],
            stdout=subprocess.PIPE, stderr=err_file, env=_child_env(),
        )
        try:
            for index in range(len(requests)):
                header = proc.stdout.read(8)
                if len(header) < 8:
                    break
                (count,) = struct.unpack("<q", header)
                payload = proc.stdout.read(2 * count)
                if len(payload) < 2 * count:
                    break
                yield _to_float(np.frombuffer(payload, dtype="<i2"), sample_rate)
            else:
                index = len(requests)
        finally:
            if proc.poll() is None and index < len(requests):
                proc.kill()
            proc.stdout.close()
            code = proc.wait()
            err_file.close()
            stderr = err_path.read_text(errors="replace")
        if index < len(requests):
            message = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {code}"
            if message.startswith("ValueError: "):
                raise ValueError(message[len("ValueError: "):])
            raise RuntimeError(f"eSpeak worker failed at request {index}: {message}")


def synthesize_many(
    requests: Sequence[SynthRequest],
    sample_rate: int = TARGET_SAMPLE_RATE,
    fresh_process: bool = True,
) -> list[np.ndarray]:
    """Synthesize ``requests`` in order; reproducible byte for byte when ``fresh_process``.

    With ``fresh_process=True`` (default) this is ``list(synthesize_stream(...))``.
    ``fresh_process=False`` runs them in this process (no start-up cost, not repeatable).
    """
    if fresh_process:
        return list(synthesize_stream(requests, sample_rate))
    return [synthesize(r.text, sample_rate=sample_rate, **r.kwargs()) for r in requests]


def _worker_main(job_path: str) -> int:
    """Child side of :func:`synthesize_stream`: read the JSON job, stream waveforms to stdout."""
    job = json.loads(Path(job_path).read_text())
    out = sys.stdout.buffer
    for fields in job["requests"]:
        request = SynthRequest(**fields)
        pcm = _synthesize_native(request.text, **request.kwargs())
        out.write(struct.pack("<q", pcm.shape[0]))
        out.write(pcm.astype("<i2", copy=False).tobytes())
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1]))
