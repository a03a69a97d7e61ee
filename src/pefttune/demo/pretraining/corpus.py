"""The synthesized pretraining corpus: varied English words and phrases, no keyword-spotting words.

A :class:`CorpusRecipe` fully determines the corpus: :func:`build_corpus` draws every
utterance's text, voice, variant, rate, pitch, placement in the clip, gain and noise from
one seeded ``numpy`` generator, synthesizes the texts with eSpeak NG in fresh worker
processes (so the audio is identical on every run, see :mod:`pefttune.data.espeak`) and
returns fixed-length 16 kHz clips.

The vocabulary (:data:`VOCABULARY`) is a hand-written list of common English words
without numerals (``"42"`` would be spoken as "forty two"). The keyword-spotting
words (``KS_COMMANDS`` + ``KS_UNKNOWN_WORDS`` of :mod:`pefttune.data.layouts`) and their
common homophones (:data:`KS_HOMOPHONES`, e.g. "to" for "two", "know" for "no") are
removed from it, and :func:`build_corpus` checks every drawn text again.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from pefttune.data import espeak
from pefttune.data.espeak import TARGET_SAMPLE_RATE, SynthRequest, synthesize_many
from pefttune.data.layouts import KS_COMMANDS, KS_UNKNOWN_WORDS
from pefttune.demo.synth import NOISE_KINDS, make_noise

#: Common English words (no numerals, no keyword-spotting words or their homophones).
VOCABULARY: tuple[str, ...] = tuple(
    """
    apple table window garden river mountain kitchen pencil paper orange purple yellow
    green black white brown silver golden winter summer autumn spring morning evening
    night today tomorrow yesterday water coffee butter bread cheese sugar salt pepper
    chicken fish horse rabbit mouse turtle monkey tiger lion zebra eagle spider snake
    flower forest desert island ocean beach castle bridge tower village city street
    road market school library hospital station airport engine rocket planet moon star
    cloud rain snow thunder lightning wind storm weather mirror picture camera music
    guitar piano violin trumpet drum song dance story letter number question answer
    problem reason moment minute hour week month year family mother father sister
    brother daughter children friend teacher doctor farmer driver painter singer
    soldier captain pilot sailor student person people woman man girl boy baby
    student money market price value paper metal plastic glass stone wood cotton
    silk leather rubber carpet blanket pillow curtain candle lamp bottle basket bucket
    hammer ladder shovel needle button pocket jacket sweater trousers shirt shoe boot
    glove scarf hat ring necklace watch clock calendar ticket passport wallet purse
    key lock door floor wall roof ceiling chair sofa shelf drawer closet garage fence
    yard field farm barn meadow valley canyon volcano glacier harbor lake pond stream
    waterfall jungle swamp prairie hill cliff cave tunnel highway bicycle motorcycle
    truck train bus boat ship plane helicopter subway taxi wagon carriage
    run walk jump swim climb crawl fly drive ride sit stand sleep wake eat drink cook
    bake wash clean sweep paint draw read speak listen sing laugh cry smile shout
    whisper think learn teach build break fix carry lift push pull throw catch kick
    open close begin finish start wait hurry travel visit arrive leave return follow
    lead help hold keep give take bring send receive borrow lend buy sell pay spend
    save count measure weigh cut fold bend shake turn twist press touch feel smell
    taste look watch see hear remember forget believe wonder imagine dream hope wish
    want need like love hate enjoy prefer choose decide explain describe discuss argue
    agree refuse allow forbid promise invite thank welcome greet answer ask
    big small large tiny huge little long short tall wide narrow thick thin heavy
    light dark bright quiet loud soft hard smooth rough warm cold hot cool wet dry
    fresh stale clean dirty empty full early late fast slow quick easy difficult simple
    strange famous common rare rich poor young old modern ancient gentle brave clever
    careful honest polite proud angry calm busy lazy hungry thirsty tired sleepy lucky
    beautiful ugly pretty handsome friendly lonely curious serious funny silly
    wonderful terrible awful pleasant excellent perfect important possible
    always never often sometimes usually rarely already almost maybe perhaps really
    very quite rather together alone again soon later
    the a an and but or because if when while where what which who why how this that
    these those there here with without from into onto over under above below behind
    between among around about after before during until since through across along
    toward against beside beyond inside outside near far my your his her our their
    its some many much more most few less all every each other another such same
    I you he she we they me him us them it is was were are be been being have has
    had do does did will would shall should can could may might must
    please thanks hello goodbye sorry excuse pardon welcome
    elephant giraffe kangaroo penguin dolphin octopus butterfly dragon unicorn robot
    computer keyboard telephone television radio battery magnet crystal diamond
    emerald ruby marble pebble feather ribbon puzzle riddle secret treasure pirate
    wizard giant princess kingdom palace temple museum theatre circus carnival
    festival holiday birthday wedding concert picnic journey voyage adventure
    breakfast lunch dinner supper dessert cookie cake pie soup salad sandwich noodle
    rice bean potato tomato carrot onion garlic lemon banana cherry grape melon peach
    pear plum strawberry blueberry pineapple coconut walnut almond honey vinegar
    mustard ketchup yogurt cereal pancake waffle muffin biscuit
    """.split()
)

#: Homophones or near-homophones of keyword-spotting words, excluded as well.
KS_HOMOPHONES: tuple[str, ...] = (
    "to", "too", "for", "fore", "know", "write", "rite", "wright", "won", "ate",
    "threw", "through",
)

#: Default noise kinds: the original white / brown-ish pair (see :func:`_noise`).
DEFAULT_NOISE_KINDS: tuple[str, ...] = ("white", "brown")

#: Default eSpeak voices (English accents) and variants drawn for the corpus.
DEFAULT_VOICES: tuple[str, ...] = (
    "en-us", "en-gb", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-rp",
    "en-gb-x-gbclan", "en-gb-x-gbcwmd",
)
DEFAULT_VARIANTS: tuple[str, ...] = (
    "", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "whisper", "croak", "adam", "anika", "aunty",
    "benjamin", "boris", "david", "ed", "grandma", "grandpa", "linda", "max", "norbert",
    "paul", "quincy", "rob", "steph", "travis", "victor", "zac",
)


def ks_words() -> tuple[str, ...]:
    """The keyword-spotting words (commands + unknown-class words) of the KS corpus."""
    return tuple(KS_COMMANDS) + tuple(KS_UNKNOWN_WORDS)


@dataclass(frozen=True)
class CorpusRecipe:
    """Everything that determines the pretraining corpus.

    ``excluded_words`` defaults (``None``) to the KS words plus :data:`KS_HOMOPHONES`;
    the resolved list is part of :meth:`to_dict` (and so of the provenance).
    """

    utterances: int = 4000
    seconds: float = 2.0
    seed: int = 0
    max_words: int = 4
    voices: tuple[str, ...] = DEFAULT_VOICES
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    rate: tuple[int, int] = (110, 260)  # words per minute
    pitch: tuple[int, int] = (15, 85)
    pitch_range: tuple[int, int] = (10, 90)
    word_gap: tuple[int, int] = (0, 8)  # 10 ms units
    peak: tuple[float, float] = (0.05, 0.9)  # peak amplitude after scaling
    snr_db: tuple[float, float] = (5.0, 40.0)
    noise_prob: float = 0.8
    noise_kinds: tuple[str, ...] = DEFAULT_NOISE_KINDS  # others: pefttune.demo.synth.make_noise
    speed: tuple[float, float] = (1.0, 1.0)  # speed perturbation factor range (tempo and pitch, by resampling)
    reverb_prob: float = 0.0  # probability of convolving a clip with a synthetic room impulse response
    rt60: tuple[float, float] = (0.15, 0.8)  # reverberation time range of those responses (seconds)
    excluded_words: tuple[str, ...] | None = None
    sample_rate: int = TARGET_SAMPLE_RATE

    def __post_init__(self):
        if self.utterances < 1:
            raise ValueError(f"corpus.utterances: must be >= 1, got {self.utterances}")
        if not 0.5 <= self.seconds <= 30:
            raise ValueError(f"corpus.seconds: must be within 0.5..30, got {self.seconds}")
        if self.max_words < 1:
            raise ValueError(f"corpus.max_words: must be >= 1, got {self.max_words}")
        if not self.voices:
            raise ValueError("corpus.voices: need at least one voice")
        if not self.variants:
            raise ValueError("corpus.variants: need at least one variant ('' for the plain voice)")
        for name in ("rate", "pitch", "pitch_range", "word_gap", "peak", "snr_db"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"corpus.{name}: range ({low}, {high}) is reversed")
        if not 0.0 <= self.noise_prob <= 1.0:
            raise ValueError(f"corpus.noise_prob: must be within 0..1, got {self.noise_prob}")
        if not self.noise_kinds or any(k not in NOISE_KINDS for k in self.noise_kinds):
            raise ValueError(f"corpus.noise_kinds: expected a non-empty list from {NOISE_KINDS}, got {self.noise_kinds}")
        if not 0.5 <= self.speed[0] <= self.speed[1] <= 2.0:
            raise ValueError(f"corpus.speed: expected 0.5 <= low <= high <= 2, got {self.speed}")
        if not 0.0 <= self.reverb_prob <= 1.0:
            raise ValueError(f"corpus.reverb_prob: must be within 0..1, got {self.reverb_prob}")
        if not 0.0 < self.rt60[0] <= self.rt60[1] <= 3.0:
            raise ValueError(f"corpus.rt60: expected 0 < low <= high <= 3 seconds, got {self.rt60}")
        if self.excluded_words is None:
            object.__setattr__(self, "excluded_words", tuple(sorted(set(ks_words()) | set(KS_HOMOPHONES))))

    @property
    def samples(self) -> int:
        return int(round(self.seconds * self.sample_rate))

    def vocabulary(self) -> tuple[str, ...]:
        """:data:`VOCABULARY` without the excluded words (case-insensitive), deduplicated."""
        excluded = {w.lower() for w in self.excluded_words}
        seen: dict[str, None] = {}
        for word in VOCABULARY:
            if word.lower() not in excluded:
                seen.setdefault(word, None)
        return tuple(seen)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["vocabulary_size"] = len(self.vocabulary())
        return data

    def command_options(self) -> list[str]:
        """`pefttune backbone pretrain` options for the augmentation settings that differ from the defaults."""
        out = []
        if self.noise_kinds != DEFAULT_NOISE_KINDS:
            out += ["--noise-kinds", ",".join(self.noise_kinds)]
        if self.snr_db != (5.0, 40.0):
            out += ["--snr", f"{self.snr_db[0]:g},{self.snr_db[1]:g}"]
        if self.noise_prob != 0.8:
            out += ["--noise-prob", f"{self.noise_prob:g}"]
        if self.speed != (1.0, 1.0):
            out += ["--speed", f"{self.speed[0]:g},{self.speed[1]:g}"]
        if self.reverb_prob:
            out += ["--reverb-prob", f"{self.reverb_prob:g}", "--rt60", f"{self.rt60[0]:g},{self.rt60[1]:g}"]
        if self.variants != DEFAULT_VARIANTS:
            out += ["--variants", "all" if self.variants == all_variants() else ",".join(v or "none" for v in self.variants)]
        return out


def all_variants() -> tuple[str, ...]:
    """Every eSpeak NG voice variant installed, plus ``""`` (the plain voice), sorted."""
    return ("",) + tuple(sorted(set(espeak.list_variants()) - {""}))


@dataclass
class Corpus:
    """Fixed-length clips (N, samples) float32 and the text spoken in each."""

    waveforms: np.ndarray
    texts: list[str]
    recipe: CorpusRecipe
    requests: list[SynthRequest] = field(repr=False, default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)


def _draw_requests(recipe: CorpusRecipe, rng: np.random.Generator) -> list[SynthRequest]:
    vocab = recipe.vocabulary()
    requests = []
    for _ in range(recipe.utterances):
        count = int(rng.integers(1, recipe.max_words + 1))
        text = " ".join(vocab[i] for i in rng.integers(0, len(vocab), size=count))
        variant = recipe.variants[int(rng.integers(len(recipe.variants)))] or None
        requests.append(
            SynthRequest(
                text=text,
                voice=recipe.voices[int(rng.integers(len(recipe.voices)))],
                variant=variant,
                rate=int(rng.integers(recipe.rate[0], recipe.rate[1] + 1)),
                pitch=int(rng.integers(recipe.pitch[0], recipe.pitch[1] + 1)),
                pitch_range=int(rng.integers(recipe.pitch_range[0], recipe.pitch_range[1] + 1)),
                word_gap=int(rng.integers(recipe.word_gap[0], recipe.word_gap[1] + 1)),
            )
        )
    return requests


def check_excluded(texts: list[str], excluded: tuple[str, ...]) -> None:
    """Raise ``ValueError`` if any text contains an excluded word."""
    banned = {w.lower() for w in excluded}
    for index, text in enumerate(texts):
        hits = sorted({w for w in text.lower().split() if w in banned})
        if hits:
            raise ValueError(f"corpus: utterance {index} ({text!r}) contains excluded word(s) {hits}")


def _fit_clip(wav: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """Random crop (long) or random placement in silence (short) to exactly ``samples``."""
    if len(wav) >= samples:
        start = int(rng.integers(0, len(wav) - samples + 1))
        return wav[start:start + samples].copy()
    out = np.zeros(samples, dtype=np.float32)
    start = int(rng.integers(0, samples - len(wav) + 1))
    out[start:start + len(wav)] = wav
    return out


def _noise(rng: np.random.Generator, samples: int) -> np.ndarray:
    """White or brown-ish (integrated, high-passed) noise with unit RMS."""
    white = rng.standard_normal(samples)
    if rng.random() < 0.5:
        noise = white
    else:
        noise = np.cumsum(white)
        noise = noise - np.convolve(noise, np.ones(64) / 64, mode="same")  # remove drift
    return noise / max(float(np.sqrt(np.mean(noise**2))), 1e-8)


def _speed(wav: np.ndarray, factor: float) -> np.ndarray:
    """Play ``wav`` ``factor`` times faster (tempo and pitch together) by linear-interpolation resampling."""
    if factor == 1.0 or len(wav) < 2:
        return wav
    positions = np.arange(0.0, len(wav) - 1, factor)
    return np.interp(positions, np.arange(len(wav)), wav).astype(np.float32)


def _reverb(wav: np.ndarray, rng: np.random.Generator, rt60: tuple[float, float], sample_rate: int) -> np.ndarray:
    """Convolve with a synthetic room impulse response: a direct path, then exponentially
    decaying Gaussian noise (60 dB decay in a random RT60), cut at the clip length."""
    t60 = rng.uniform(*rt60)
    length = int(min(t60, 1.0) * sample_rate)
    t = np.arange(length) / sample_rate
    tail = rng.standard_normal(length) * np.exp(-6.9 * t / t60)
    delay = int(rng.integers(int(0.002 * sample_rate), int(0.02 * sample_rate)))  # first reflections
    tail[:delay] = 0.0
    impulse = tail * rng.uniform(0.1, 0.5) / max(float(np.sqrt(np.sum(tail**2))), 1e-8)
    impulse[0] = 1.0
    size = len(wav) + length - 1
    n_fft = 1 << (size - 1).bit_length()
    wet = np.fft.irfft(np.fft.rfft(wav, n_fft) * np.fft.rfft(impulse, n_fft), n_fft)[: len(wav)]
    return wet.astype(np.float32)


def build_corpus(recipe: CorpusRecipe, chunk: int = 500) -> Corpus:
    """Synthesize the corpus of ``recipe`` (deterministic for a given recipe).

    The texts and synthesis settings are drawn first; audio is synthesized in chunks of
    ``chunk`` requests, each in a fresh eSpeak process (fixed order, hence reproducible);
    then each clip is cropped/placed, scaled to a random peak and mixed with noise at a
    random SNR, all from the recipe's seed.
    """
    rng = np.random.default_rng(recipe.seed)
    requests = _draw_requests(recipe, rng)
    texts = [r.text for r in requests]
    check_excluded(texts, recipe.excluded_words)
    raw: list[np.ndarray] = []
    for start in range(0, len(requests), chunk):
        raw.extend(synthesize_many(requests[start:start + chunk], sample_rate=recipe.sample_rate))
    waveforms = np.zeros((len(raw), recipe.samples), dtype=np.float32)
    legacy_noise = recipe.noise_kinds == DEFAULT_NOISE_KINDS
    for i, wav in enumerate(raw):
        wav = np.asarray(wav, dtype=np.float32)
        if recipe.speed != (1.0, 1.0):  # extra draws only when enabled: default recipes stay unchanged
            wav = _speed(wav, float(rng.uniform(*recipe.speed)))
        if recipe.reverb_prob and rng.random() < recipe.reverb_prob:
            wav = _reverb(wav, rng, recipe.rt60, recipe.sample_rate)
        clip = _fit_clip(wav, recipe.samples, rng)
        peak = float(np.abs(clip).max())
        target = rng.uniform(*recipe.peak)
        clip = clip * (target / peak) if peak > 0 else clip
        if rng.random() < recipe.noise_prob:
            speech_rms = float(np.sqrt(np.mean(clip**2)))
            snr = rng.uniform(*recipe.snr_db)
            if legacy_noise:
                noise = _noise(rng, recipe.samples)
            else:
                kind = recipe.noise_kinds[int(rng.integers(len(recipe.noise_kinds)))]
                noise = make_noise(rng, recipe.samples, kind, recipe.sample_rate)[0]
            clip = clip + noise * speech_rms * 10 ** (-snr / 20)
        waveforms[i] = np.clip(clip, -1.0, 1.0)
    return Corpus(waveforms=waveforms, texts=texts, recipe=recipe, requests=requests)
