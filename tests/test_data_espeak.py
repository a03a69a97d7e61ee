"""eSpeak NG through ctypes: synthesis, phonemization, voices, determinism."""
from __future__ import annotations

import numpy as np
import pytest

from pefttune.data import espeak


def test_synthesize_is_float32_mono_16k_speech():
    wav = espeak.synthesize("yes")
    assert wav.dtype == np.float32 and wav.ndim == 1
    # "yes" at 175 wpm lasts a few hundred milliseconds at 16 kHz (not 8 kHz, not 22.05 kHz).
    assert 0.2 < wav.size / 16000 < 1.0
    assert 0.05 < np.abs(wav).max() <= 1.0
    native = espeak.synthesize("yes", sample_rate=espeak.ESPEAK_SAMPLE_RATE)
    # Same utterance at the native rate: 441/320 times as many samples (within the
    # few samples the in-process state may shift it).
    assert abs(native.size / wav.size - 22050 / 16000) < 0.02


def test_rate_changes_duration_and_variant_changes_voice():
    slow = espeak.synthesize("left right", rate=100)
    fast = espeak.synthesize("left right", rate=300)
    assert slow.size > 1.8 * fast.size
    male = espeak.synthesize("hello", variant="m1")
    female = espeak.synthesize("hello", variant="f2")
    assert male.size != female.size or not np.allclose(male, female)


def test_voices_and_variants_from_the_bundled_data():
    variants = espeak.list_variants()
    for name in ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "klatt", "whisper", "croak"]:
        assert name in variants
    voices = espeak.list_voices()
    assert {"en-us", "en-gb", "fr-fr", "de"} <= set(voices)
    assert espeak.voice_name("en-us", "m3").endswith("+m3")
    assert espeak.synthesize("bonjour", voice="fr-fr").size > 0


def test_phonemize_ipa_tokens():
    assert espeak.phonemize("yes no") == ["j", "ɛ", "s", "n", "oʊ"]
    assert espeak.phonemize("yes no", word_boundary="|") == ["j", "ɛ", "s", "|", "n", "oʊ"]
    stressed = espeak.phonemize("yes", keep_stress=True)
    assert any("ˈ" in t for t in stressed)
    # Multi-letter phonemes stay single tokens; punctuation and clauses are handled.
    assert "dʒ" in espeak.phonemize("judge")
    assert espeak.phonemize("Hello, world. Again!") == espeak.phonemize("hello world again")
    assert espeak.phonemize("   ") == []


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="no voice"):
        espeak.synthesize("yes", voice="xx-not-a-voice")
    with pytest.raises(ValueError, match="variant"):
        espeak.synthesize("yes", variant="nope")
    with pytest.raises(ValueError, match="rate"):
        espeak.synthesize("yes", rate=1000)
    with pytest.raises(ValueError, match="non-empty"):
        espeak.synthesize("  ")


def test_synthesize_many_is_bit_exact_across_fresh_processes():
    # Includes noisy variants (whisper, croak), whose noise eSpeak seeds from the clock
    # unless pefttune seeds it, and repeated texts (in-process state drifts).
    requests = [
        espeak.SynthRequest(word, variant=variant, rate=150 + 10 * i, pitch=40 + i, seed=i)
        for i, (word, variant) in enumerate(
            [("yes", "whisper"), ("yes", "whisper"), ("stop", "croak"), ("go", "m3"), ("left", "f2")]
        )
    ]
    first = espeak.synthesize_many(requests)
    second = espeak.synthesize_many(requests)
    assert len(first) == len(requests)
    for a, b in zip(first, second):
        assert a.dtype == np.float32
        assert a.tobytes() == b.tobytes()


def test_synthesize_stream_reports_worker_errors():
    with pytest.raises(ValueError, match="no voice"):
        list(espeak.synthesize_stream([espeak.SynthRequest("yes", voice="xx-not-a-voice")]))
    with pytest.raises(ValueError, match="SynthRequest"):
        list(espeak.synthesize_stream(["yes"]))
    assert espeak.synthesize_many([]) == []
