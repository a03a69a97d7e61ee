"""Self-supervised pretraining of a tiny speech encoder, and its provenance.

One concept, one module (about 700 lines): the training loop, its schedule and the provenance
that makes a shipped run replayable step for step are kept together, since the replay
guarantee depends on all three agreeing.

:func:`pretrain` builds the synthesized corpus (:mod:`.corpus`), then trains one of two
objectives from scratch:

``hubert`` (default): HuBERT masked prediction. Iteration-1 targets are k-means clusters
    of acoustic frames at the encoder's 20 ms frame rate (:mod:`.targets`, exact
    alignment): 40-band log-mel and/or MFCC-39 (``targets``, one codebook each; the loss
    averages the codebooks). With ``iter2_at`` the run switches, at that progress, to
    iteration-2 targets: k-means of hidden state ``iter2_layer`` of the model being
    trained (fresh classifier, same optimizer and schedule). Spans of the projected CNN
    features are replaced by the model's ``masked_spec_embed`` (``mask_prob`` /
    ``mask_length``); a linear layer per codebook maps the last hidden state to cluster
    logits, and the loss is cross-entropy at the masked frames. Saved as a ``HubertModel``.
``wav2vec2``: wav2vec 2.0's contrastive objective (``Wav2Vec2ForPreTraining``: Gumbel
    vector quantizer, distractors from masked frames of the same clip, diversity loss).
    Saved as a ``Wav2Vec2Model``.

Clips are normalised per clip (zero mean, unit variance) as
:class:`pefttune.data.dataset.SpeechDataset` does by default, so the encoder sees the
same input scale in pretraining and downstream. Both objectives write a standard
transformers model directory (``config.json`` +
``model.safetensors``, encoder only) that :func:`pefttune.backbones.load_backbone`
loads, plus ``provenance.json``.

Budget and schedule: the learning rate follows the run's *progress* p in [0, 1]: linear
warmup over the first ``warmup`` fraction, then cosine decay to 0. With ``steps`` only,
p = step / steps and the run is deterministic: the same config, seed, thread count and
library versions repeat it bit for bit. With ``minutes``, p = training time used /
budget, so the schedule always completes inside the budget however busy the machine is
(the number of steps then depends on the machine's speed; the provenance records it).
With both, p is the larger of the two and the run stops at whichever comes first.
Every run writes the progress value of each step to ``schedule.json``; giving that list
back as ``schedule`` (CLI: ``--replay-schedule``) replays the run step for step, so a
time-bounded run, too, can be repeated bit for bit (same seeds, thread count, versions).
The provenance also records a sha256 of the encoder's weights every ``hash_every`` steps
(``steps.state_sha256``): a replay stopped early (``stop_after``, CLI ``--stop-after K``)
checks a prefix of a long run bit for bit in a fraction of its time.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import json
import math
import platform
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import HubertModel, Wav2Vec2ForPreTraining

from pefttune.backbones import tiny_config
from pefttune.data.dataset import normalize_waveform
from pefttune.demo.pretraining.corpus import Corpus, CorpusRecipe, build_corpus
from pefttune.demo.pretraining.targets import TARGET_FEATURES, check_alignment, fit_kmeans, target_features

Objective = Literal["hubert", "wav2vec2"]
OBJECTIVES: tuple[str, ...] = ("hubert", "wav2vec2")
PROVENANCE_FILE = "provenance.json"
SCHEDULE_FILE = "schedule.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class PretrainConfig:
    """What to pretrain, on what, for how long. ``corpus`` is a :class:`CorpusRecipe`."""

    objective: Objective = "hubert"
    seed: int = 0
    # model (tiny_config: 20 ms frames, no dropout, layer-norm CNN)
    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 256
    num_heads: int = 4
    # targets / masking
    num_clusters: int = 100
    num_mels: int = 40
    targets: tuple[str, ...] = ("logmel",)  # iteration-1 codebooks: one k-means per feature kind
    iter2_at: float | None = None  # progress at which targets switch to k-means of a layer (HuBERT iteration 2)
    iter2_layer: int = 2  # hidden state (0 = CNN projection) clustered for iteration 2
    iter2_clusters: int | None = None  # default: num_clusters
    unmasked_weight: float = 0.0  # weight of the cross-entropy at unmasked frames (HuBERT's 1 - alpha; 0 = masked only)
    mask_prob: float = 0.08  # probability that a frame starts a masked span
    mask_length: int = 10  # frames per span
    num_negatives: int = 20  # wav2vec2 distractors per masked frame
    # optimisation
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.08  # fraction of the run (progress) spent warming up the learning rate ...
    warmup_steps: int = 200  # ... and at least this many steps (a slow machine makes few steps)
    grad_clip: float = 1.0
    # budget
    steps: int | None = None
    minutes: float | None = None
    eval_utterances: int = 64
    threads: int = 2
    stop_after: int | None = None  # stop after this many steps (same schedule): checks a prefix of a run
    hash_every: int = 100  # record a sha256 of the encoder's weights every this many steps
    log_every_s: float = 30.0
    corpus: CorpusRecipe = field(default_factory=CorpusRecipe)
    schedule: tuple[float, ...] | None = None  # replay: progress of every step of an earlier run

    @property
    def budget(self) -> str:
        if self.schedule is not None:
            return "replayed"
        return "by steps" if self.minutes is None else "by time" if self.steps is None else "by steps and time"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {OBJECTIVES}, got {self.objective!r}")
        if self.schedule is not None:
            if not self.schedule or any(not 0.0 <= p < 1.0 for p in self.schedule):
                raise ValueError("schedule: expected a non-empty list of progress values within [0, 1)")
            if any(b < a for a, b in zip(self.schedule, self.schedule[1:])):
                raise ValueError("schedule: progress values must not decrease")
        elif self.steps is None and self.minutes is None:
            raise ValueError("budget: give steps and/or minutes (or a schedule to replay)")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"minutes: must be > 0, got {self.minutes}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.num_clusters < 2:
            raise ValueError(f"num_clusters: need at least 2, got {self.num_clusters}")
        if not self.targets or any(t not in TARGET_FEATURES for t in self.targets):
            raise ValueError(f"targets: expected a non-empty list from {TARGET_FEATURES}, got {self.targets!r}")
        if self.iter2_at is not None and not 0 < self.iter2_at < 1:
            raise ValueError(f"iter2_at: must be a progress fraction within (0, 1), got {self.iter2_at}")
        if self.iter2_at is not None and not 0 <= self.iter2_layer <= self.num_layers:
            raise ValueError(f"iter2_layer: must be within 0..{self.num_layers} (num_layers), got {self.iter2_layer}")
        if self.iter2_clusters is not None and self.iter2_clusters < 2:
            raise ValueError(f"iter2_clusters: need at least 2, got {self.iter2_clusters}")
        if self.unmasked_weight < 0:
            raise ValueError(f"unmasked_weight: must be >= 0, got {self.unmasked_weight}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after: must be >= 1, got {self.stop_after}")
        if self.hash_every < 1:
            raise ValueError(f"hash_every: must be >= 1, got {self.hash_every}")
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"mask_prob: must be within (0, 1), got {self.mask_prob}")
        if self.mask_length < 1:
            raise ValueError(f"mask_length: must be >= 1, got {self.mask_length}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup: must be a fraction within [0, 1), got {self.warmup}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.eval_utterances < self.corpus.utterances:
            raise ValueError(
                f"eval_utterances: must be within 0..{self.corpus.utterances - 1} "
                f"(corpus.utterances), got {self.eval_utterances}"
            )
        if self.threads < 1:
            raise ValueError(f"threads: must be >= 1, got {self.threads}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["targets"] = list(self.targets)
        data["corpus"] = self.corpus.to_dict()
        data["schedule"] = None if self.schedule is None else f"replayed ({len(self.schedule)} steps)"
        return data


# -- masking ------------------------------------------------------------------------------
def span_mask(batch: int, frames: int, prob: float, length: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, frames) bool mask: each frame starts a span of ``length`` with probability ``prob``.

    Every row gets at least one span. Spans may overlap (as in wav2vec 2.0 / HuBERT), so
    about ``1 - (1 - prob) ** length`` of the frames are masked (57 % for 0.08 and 10).
    """
    if frames < 1:
        raise ValueError("span_mask: need at least one frame")
    length = min(length, frames)
    last_start = frames - length + 1
    starts = torch.rand(batch, last_start, generator=generator) < prob
    empty = ~starts.any(1)
    if empty.any():
        forced = torch.randint(last_start, (int(empty.sum()),), generator=generator)
        starts[empty.nonzero().flatten(), forced] = True
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    for offset in range(length):
        mask[:, offset:offset + last_start] |= starts
    return mask


def sample_negatives(mask: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    """(B, T, num) flat indices of distractors: other masked frames of the same clip.

    Positions outside the mask get index 0 (ignored by the loss).
    """
    batch, frames = mask.shape
    out = torch.zeros(batch, frames, num, dtype=torch.long)
    for b in range(batch):
        positions = mask[b].nonzero().flatten()
        count = len(positions)
        if count < 2:
            continue
        draw = torch.randint(0, count - 1, (count, num), generator=generator)
        draw = draw + (draw >= torch.arange(count)[:, None]).long()  # skip the positive itself
        out[b, positions] = positions[draw] + b * frames
    return out


# -- objectives -------------------------------------------------------------------------------
def encoder_config(family: str, config: PretrainConfig):
    """The tiny encoder's transformers config, with the pretraining time mask recorded
    (``masked_spec_embed`` exists only when ``mask_time_prob`` > 0)."""
    model_config = tiny_config(
        family, num_layers=config.num_layers, hidden_size=config.hidden_size,
        num_heads=config.num_heads, intermediate_size=config.intermediate_size,
    )
    model_config.mask_time_prob = config.mask_prob
    model_config.mask_time_length = config.mask_length
    return model_config


class HubertObjective(nn.Module):
    """Masked prediction of k-means clusters with one linear classifier per codebook.

    ``labels`` are (B, T, codebooks); the loss is the mean cross-entropy over codebooks at
    the masked frames. :meth:`new_codebooks` replaces the classifiers (HuBERT iteration 2).
    """

    def __init__(self, config: PretrainConfig):
        super().__init__()
        self.encoder = HubertModel(encoder_config("hubert", config))
        self.classifiers = nn.ModuleList(nn.Linear(config.hidden_size, config.num_clusters) for _ in config.targets)
        self.active = list(range(len(config.targets)))
        self.unmasked_weight = config.unmasked_weight

    def new_codebooks(self, sizes: list[int]) -> list[nn.Parameter]:
        """Fresh classifiers for new codebooks of ``sizes`` clusters; returns their parameters."""
        start = len(self.classifiers)
        for size in sizes:
            self.classifiers.append(nn.Linear(self.encoder.config.hidden_size, size))
        self.active = list(range(start, start + len(sizes)))
        return [p for i in self.active for p in self.classifiers[i].parameters()]

    def step(self, waveforms: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, generator) -> tuple:
        """Loss (mean over codebooks of masked CE + unmasked_weight * unmasked CE) and the
        masked-frame accuracy counts."""
        states = self.encoder(waveforms, mask_time_indices=mask).last_hidden_state
        hidden = states[mask]
        kept = states[~mask] if self.unmasked_weight else None
        losses, correct, count = [], 0, 0
        for book, index in enumerate(self.active):
            logits = self.classifiers[index](hidden)
            target = labels[..., book][mask]
            loss = F.cross_entropy(logits, target)
            if kept is not None and len(kept):
                loss = loss + self.unmasked_weight * F.cross_entropy(self.classifiers[index](kept),
                                                                     labels[..., book][~mask])
            losses.append(loss)
            correct += int((logits.argmax(-1) == target).sum())
            count += int(target.numel())
        return torch.stack(losses).mean(), correct, count

    @torch.no_grad()
    def layer_features(self, waveforms: torch.Tensor, layer: int, batch: int = 32) -> torch.Tensor:
        """(N, T, D) hidden state ``layer`` of unmasked clips (eval mode)."""
        was_training = self.training
        self.eval()
        outs = [self.encoder(waveforms[i:i + batch], output_hidden_states=True).hidden_states[layer]
                for i in range(0, len(waveforms), batch)]
        self.train(was_training)
        return torch.cat(outs)

    def anneal(self, progress: float) -> None:
        """Nothing to anneal."""

    def save_encoder(self, directory: Path) -> None:
        self.encoder.save_pretrained(str(directory))


class Wav2Vec2Objective(nn.Module):
    """wav2vec 2.0: contrastive loss against quantized targets plus codebook diversity."""

    def __init__(self, config: PretrainConfig):
        super().__init__()
        model_config = encoder_config("wav2vec2", config)
        model_config.num_codevector_groups = 2
        model_config.num_codevectors_per_group = 64
        model_config.codevector_dim = config.hidden_size
        model_config.proj_codevector_dim = config.hidden_size // 2
        model_config.num_negatives = config.num_negatives
        model_config.contrastive_logits_temperature = 0.1
        model_config.diversity_loss_weight = 0.1
        model_config.feat_quantizer_dropout = 0.0
        self.model = Wav2Vec2ForPreTraining(model_config)
        self.num_negatives = config.num_negatives

    def step(self, waveforms: torch.Tensor, labels, mask: torch.Tensor, generator) -> tuple:
        negatives = sample_negatives(mask, self.num_negatives, generator)
        out = self.model(waveforms, mask_time_indices=mask, sampled_negative_indices=negatives)
        count = int(mask.sum())
        loss = out.loss / count  # transformers sums over masked frames
        with torch.no_grad():
            quantized = out.projected_quantized_states
            batch, frames, dim = quantized.shape
            distractors = quantized.reshape(-1, dim)[negatives.view(-1)].view(batch, frames, -1, dim)
            candidates = torch.cat([quantized[:, :, None], distractors], dim=2)
            sims = F.cosine_similarity(out.projected_states[:, :, None], candidates, dim=-1)
            sims[:, :, 1:][(distractors == quantized[:, :, None]).all(-1)] = -float("inf")
            correct = int((sims.argmax(-1) == 0)[mask].sum())
        return loss, correct, count

    def anneal(self, progress: float) -> None:
        """Gumbel temperature: 2.0 decaying geometrically to 0.5 over the run."""
        self.model.set_gumbel_temperature(max(0.5, 2.0 * (0.25 ** min(progress, 1.0))))

    def save_encoder(self, directory: Path) -> None:
        self.model.wav2vec2.save_pretrained(str(directory))


def encoder_of(objective: nn.Module) -> nn.Module:
    """The transformers encoder that gets saved (HubertModel or Wav2Vec2Model)."""
    return objective.encoder if isinstance(objective, HubertObjective) else objective.model.wav2vec2


def lr_factor(progress: float, step: int, warmup: float, warmup_steps: int) -> float:
    """Cosine decay to 0 at progress 1 after a linear warmup over the first ``warmup`` of the run,
    and over at least ``warmup_steps`` steps (whichever ends later)."""
    ramp = min(1.0, progress / warmup if warmup else 1.0, (step + 1) / warmup_steps if warmup_steps else 1.0)
    if progress < warmup:
        return max(ramp, 0.01)
    decay = (progress - warmup) / (1.0 - warmup)
    return ramp * 0.5 * (1.0 + math.cos(math.pi * min(decay, 1.0)))


# -- results -----------------------------------------------------------------------------------
@dataclass
class PretrainResult:
    directory: Path
    provenance: dict

    @property
    def final_loss(self) -> float:
        return self.provenance["final"]["train_loss"]

    @property
    def final_accuracy(self) -> float:
        return self.provenance["final"]["train_masked_accuracy"]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict:
    try:
        package = metadata.version("pefttune")
    except metadata.PackageNotFoundError:  # running from a source tree
        package = "unknown"
    return {
        "pefttune": package,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


def command_line(config: PretrainConfig, out: str | Path, replay: str | Path | None = None) -> str:
    """The `pefttune backbone pretrain` command line equivalent to ``config``, every option spelled out.

    ``replay`` names the schedule file when ``config.schedule`` came from one.
    """
    c, r = config, config.corpus
    budget = (["--steps", str(c.steps)] if c.steps else []) + (["--minutes", f"{c.minutes:g}"] if c.minutes else [])
    if c.schedule is not None:
        budget = ["--replay-schedule", str(replay or SCHEDULE_FILE)]
    parts = [
        "pefttune", "backbone", "pretrain", "--out", str(out), "--objective", c.objective,
        "--seed", str(c.seed), *budget, "--utterances", str(r.utterances),
        "--seconds", f"{r.seconds:g}", "--corpus-seed", str(r.seed),
        "--hidden-size", str(c.hidden_size), "--layers", str(c.num_layers),
        "--intermediate-size", str(c.intermediate_size), "--heads", str(c.num_heads),
        "--clusters", str(c.num_clusters), "--targets", ",".join(c.targets),
        "--mask-prob", f"{c.mask_prob:g}", "--mask-length", str(c.mask_length),
        "--unmasked-weight", f"{c.unmasked_weight:g}",
    ]
    if c.iter2_at is not None:
        parts += ["--iter2-at", f"{c.iter2_at:g}", "--iter2-layer", str(c.iter2_layer),
                  "--iter2-clusters", str(c.iter2_clusters or c.num_clusters)]
    parts += [
        "--batch-size", str(c.batch_size), "--lr", f"{c.lr:g}",
        "--warmup", f"{c.warmup:g}", "--warmup-steps", str(c.warmup_steps), "--eval-utterances", str(c.eval_utterances),
        "--threads", str(c.threads),
    ]
    parts += r.command_options()
    if c.stop_after is not None:
        parts += ["--stop-after", str(c.stop_after)]
    return shlex.join(parts)


def state_sha256(module: nn.Module) -> str:
    """sha256 over the names and raw bytes of ``module``'s state dict (bit-level identity of weights)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


# -- the run -------------------------------------------------------------------------------------
def pretrain(
    config: PretrainConfig,
    out: str | Path,
    *,
    command: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    corpus: Corpus | None = None,
) -> PretrainResult:
    """Pretrain per ``config`` and write the model directory ``out`` with provenance.

    ``command`` is recorded in the provenance (default: the equivalent
    ``pefttune backbone pretrain`` command line, see :func:`command_line`).
    ``corpus`` may pass an already built corpus for ``config.corpus`` (it must match).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty (use --overwrite to replace it)")
    if corpus is not None and corpus.recipe != config.corpus:
        raise ValueError("corpus: the given corpus was built from a different recipe than config.corpus")
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _pretrain(config, out, command, log, corpus, started)
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain(config, out, command, log, corpus, started) -> PretrainResult:
    """The run's steps, in order: corpus, objective and its targets, training, model and provenance."""
    timings = {}
    corpus, waves = _corpus_waves(config, corpus, started, timings, log)
    torch.manual_seed(config.seed)
    objective, labels, codebooks = _objective(config, waves, config.eval_utterances, timings, log)
    encoder_params = sum(p.numel() for p in encoder_of(objective).parameters())
    frames = int(encoder_of(objective)._get_feat_extract_output_lengths(waves.shape[1]))
    if labels is not None and labels.shape[1] != frames:
        raise ValueError(f"targets: {labels.shape[1]} target frames per clip but {frames} encoder frames")
    run = _Training(config, objective, waves, labels, frames, codebooks, timings, log)
    eval_before = run.evaluate()
    log(f"[pretrain] held-out ({run.num_eval} clips) before training: loss {eval_before[0]:.3f}, "
        f"masked accuracy {eval_before[1]:.3f}")
    run.train()
    eval_after = run.evaluate()
    log(f"[pretrain] held-out after {len(run.history)} steps: loss {eval_after[0]:.3f}, "
        f"masked accuracy {eval_after[1]:.3f}")
    weights = _write_model(out, objective, run.schedule)
    timings["total_s"] = round(time.perf_counter() - started, 2)
    provenance = _provenance(config, out, command, corpus, run, eval_before, eval_after, weights,
                             {"parameters": encoder_params, "frames_per_clip": frames})
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    log(f"[pretrain] wrote {out} ({weights.stat().st_size / 1e6:.1f} MB, sha256 {provenance['weights_sha256'][:16]}...) "
        f"in {_fmt_time(timings['total_s'])}")
    return PretrainResult(directory=out, provenance=provenance)


def _corpus_waves(config: PretrainConfig, corpus: Corpus | None, started: float, timings: dict, log):
    """The corpus (built unless given) and its clips as one (N, samples) tensor, each normalised per
    clip to zero mean, unit variance: what ``SpeechDataset(normalize=True)`` feeds downstream."""
    recipe = config.corpus
    log(f"[pretrain] building corpus: {recipe.utterances} clips of {recipe.seconds:g} s "
        f"(vocabulary {len(recipe.vocabulary())} words, {len(recipe.excluded_words)} excluded)")
    if corpus is None:
        corpus = build_corpus(recipe)
    timings["corpus_s"] = round(time.perf_counter() - started, 2)
    return corpus, torch.from_numpy(np.stack([normalize_waveform(w) for w in corpus.waveforms]))


def _objective(config: PretrainConfig, waves: torch.Tensor, num_eval: int, timings: dict, log):
    """(objective, targets, codebook records): HuBERT with k-means targets of each iteration-1
    feature (frame-aligned with the encoder), or wav2vec 2.0 with none."""
    if config.objective != "hubert":
        return Wav2Vec2Objective(config), None, []
    objective = HubertObjective(config)
    t0 = time.perf_counter()
    books, codebooks = [], []
    for book, kind in enumerate(config.targets):
        extractor = target_features(kind, objective.encoder.config, config.num_mels)
        check_alignment(objective.encoder, getattr(extractor, "log_mel", extractor))
        with torch.no_grad():
            features = torch.cat([extractor(chunk) for chunk in waves.split(256)])
        books.append(_cluster(features, len(waves) - num_eval, config.num_clusters, config.seed + 97 * book,
                              f"{kind} (window {extractor.window}, hop {extractor.hop})", codebooks, log))
    timings["kmeans_s"] = round(time.perf_counter() - t0, 2)
    return objective, torch.stack(books, -1), codebooks


class _Training:
    """The training loop of one run and what it records (loss history, the progress schedule,
    weight hashes, the step of HuBERT's iteration 2).

    Seeded generators: batches ``seed``, masks ``seed + 1``, the held-out masks ``seed + 2``, the
    held-out negatives ``seed + 3``; dropout draws from torch's global generator."""

    def __init__(self, config: PretrainConfig, objective: nn.Module, waves: torch.Tensor, labels, frames: int,
                 codebooks: list, timings: dict, log):
        self.config, self.objective, self.labels, self.frames = config, objective, labels, frames
        self.codebooks, self.timings, self.log = codebooks, timings, log
        self.num_eval = config.eval_utterances
        self.waves = waves
        self.train_waves, self.eval_waves = waves[: len(waves) - self.num_eval], waves[len(waves) - self.num_eval:]
        self.optimizer = _optimizer(objective, config)
        self.batch_gen = torch.Generator().manual_seed(config.seed)
        self.mask_gen = torch.Generator().manual_seed(config.seed + 1)
        eval_gen = torch.Generator().manual_seed(config.seed + 2)
        self.eval_masks = (span_mask(self.num_eval, frames, config.mask_prob, config.mask_length, eval_gen)
                           if self.num_eval else None)
        self.history: list[tuple[float, float]] = []  # (loss, masked accuracy) per step
        self.schedule: list[float] = []  # progress value of each step taken
        self.state_hashes: dict[int, str] = {}  # step -> sha256 of the encoder's weights after that step
        self.iteration2: int | None = None  # step at which the targets switched to k-means of a layer
        self.train_start = 0.0

    def evaluate(self) -> tuple[float, float]:
        """(loss, masked accuracy) on the held-out clips, with fixed masks and negatives."""
        if not self.num_eval:
            return float("nan"), float("nan")
        objective, num_train = self.objective, len(self.train_waves)
        objective.eval()
        total_loss, correct, count = 0.0, 0, 0
        gen = torch.Generator().manual_seed(self.config.seed + 3)
        with torch.no_grad():
            for start in range(0, self.num_eval, 16):
                sl = slice(start, start + 16)
                batch_labels = None if self.labels is None else self.labels[num_train:][sl]
                loss, c, n = objective.step(self.eval_waves[sl], batch_labels, self.eval_masks[sl], gen)
                total_loss += float(loss) * n
                correct += c
                count += n
        objective.train()
        return total_loss / count, correct / count

    def progress(self, step: int) -> float:
        """How far the run is, 0..1: the replayed schedule, else by steps or by time (the further)."""
        config = self.config
        if config.schedule is not None:
            return config.schedule[step] if step < len(config.schedule) else 1.0
        budget_s = None if config.minutes is None else config.minutes * 60.0
        by_steps = step / config.steps if config.steps else 0.0
        by_time = (time.perf_counter() - self.train_start) / budget_s if budget_s else 0.0
        return max(by_steps, by_time)

    def train(self) -> None:
        """Steps until the progress reaches 1 (or ``stop_after``), then the final weight hash."""
        config, objective = self.config, self.objective
        objective.train()
        self.train_start = time.perf_counter()
        order = torch.randperm(len(self.train_waves), generator=self.batch_gen)
        cursor, last_log, step = 0, self.train_start, 0
        while (p := self.progress(step)) < 1.0:
            if config.stop_after is not None and step >= config.stop_after:
                self.log(f"[pretrain] stopping after {step} steps (--stop-after)")
                break
            if config.iter2_at is not None and self.iteration2 is None and p >= config.iter2_at:
                self._switch_to_iteration2(step)
            if cursor + config.batch_size > len(order):
                order, cursor = torch.randperm(len(self.train_waves), generator=self.batch_gen), 0
            self._step(order[cursor:cursor + config.batch_size], step, p)
            cursor += config.batch_size
            step += 1
            if step % config.hash_every == 0:
                self.state_hashes[step] = state_sha256(encoder_of(objective))
            now = time.perf_counter()
            if now - last_log >= config.log_every_s:
                last_log = now
                self._log_progress(step, now)
        completed = len(self.history)
        if self.history:
            recent = self.history[-50:]
            self.log(f"[pretrain] finished {completed} steps: loss {np.mean([h[0] for h in recent]):.3f} "
                     f"masked-acc {np.mean([h[1] for h in recent]):.3f}")
        self.timings["train_s"] = round(time.perf_counter() - self.train_start, 2)
        self.state_hashes[completed] = state_sha256(encoder_of(objective))

    def _step(self, idx: torch.Tensor, step: int, p: float) -> None:
        """One optimizer step on the clips ``idx`` at progress ``p``."""
        config, objective, optimizer = self.config, self.objective, self.optimizer
        self.schedule.append(p)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(p, step, config.warmup, config.warmup_steps)
        objective.anneal(p)
        mask = span_mask(len(idx), self.frames, config.mask_prob, config.mask_length, self.mask_gen)
        labels = None if self.labels is None else self.labels[idx]
        loss, correct, count = objective.step(self.train_waves[idx], labels, mask, self.mask_gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), config.grad_clip)
        optimizer.step()
        self.history.append((loss.item(), correct / max(count, 1)))

    def _switch_to_iteration2(self, step: int) -> None:
        """HuBERT iteration 2: targets from k-means of a hidden layer, fresh classifiers."""
        config, objective = self.config, self.objective
        t0 = time.perf_counter()
        layer = config.iter2_layer
        features = objective.layer_features(self.waves, layer)
        size = config.iter2_clusters or config.num_clusters
        self.labels = _cluster(features, len(self.train_waves), size, config.seed + 1000,
                               f"layer {layer} (iteration 2)", self.codebooks, self.log)[..., None]
        fresh = objective.new_codebooks([size])
        self.optimizer.add_param_group({"params": [q for q in fresh if q.dim() > 1], "weight_decay": config.weight_decay})
        self.optimizer.add_param_group({"params": [q for q in fresh if q.dim() <= 1], "weight_decay": 0.0})
        self.iteration2 = step
        self.timings["iteration2_s"] = round(time.perf_counter() - t0, 2)
        self.codebooks[-1]["from_step"] = step
        self.log(f"[pretrain] iteration 2 from step {step}: targets are k-means({size}) of hidden state {layer} "
                 f"({self.timings['iteration2_s']} s)")

    def _log_progress(self, step: int, now: float) -> None:
        recent = self.history[-50:]
        elapsed = now - self.train_start
        done = max(self.progress(step), 1e-9)
        eta = elapsed / done * (1.0 - done)
        self.log(f"[pretrain] step {step} ({done:.0%}) "
                 f"loss {np.mean([h[0] for h in recent]):.3f} masked-acc {np.mean([h[1] for h in recent]):.3f} "
                 f"lr {self.optimizer.param_groups[0]['lr']:.1e} elapsed {_fmt_time(elapsed)} eta {_fmt_time(eta)}")


def _optimizer(module: nn.Module, config: PretrainConfig) -> torch.optim.AdamW:
    """AdamW, weight decay on matrices only."""
    decay = [p for n, p in module.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in module.named_parameters() if p.dim() <= 1]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.98), eps=1e-6,
    )


def _write_model(out: Path, objective: nn.Module, schedule: list[float]) -> Path:
    """The encoder as a transformers model folder and the run's progress schedule; the weights file."""
    out.mkdir(parents=True, exist_ok=True)
    objective.save_encoder(out)
    weights = out / WEIGHTS_FILE
    if not weights.exists():
        raise FileNotFoundError(f"save_pretrained did not write {weights}")
    weights.chmod(0o644)  # written through a private temp file; the model is meant to be shared
    (out / SCHEDULE_FILE).write_text(json.dumps({"progress": schedule}) + "\n")
    return weights


def _provenance(config: PretrainConfig, out: Path, command: str | None, corpus: Corpus, run: _Training,
                eval_before, eval_after, weights: Path, model: dict) -> dict:
    """What ``provenance.json`` records of the run."""
    recipe, history, timings = config.corpus, run.history, run.timings
    completed = len(history)
    recent = history[-50:]
    provenance = {
        "command": command if command is not None else command_line(config, out),
        "objective": config.objective,
        "seed": config.seed,
        "config": config.to_dict(),
        "corpus": {
            **recipe.to_dict(),
            "excluded_words": list(recipe.excluded_words),
            "example_texts": corpus.texts[:10],
        },
        "input_normalization": "per clip zero mean, unit variance (pefttune.data.dataset.normalize_waveform)",
        "model": {"class": "HubertModel" if config.objective == "hubert" else "Wav2Vec2Model", **model},
        "steps": {
            "completed": completed,
            "schedule": config.budget,
            "schedule_file": SCHEDULE_FILE,
            "seconds_per_step": round(timings["train_s"] / max(completed, 1), 3),
            "stopped_after": config.stop_after,
            "iteration2_from_step": run.iteration2,
            # sha256 of the encoder's state dict (names + raw bytes, see state_sha256) after these steps:
            # a run stopped early with --stop-after K must match entry K bit for bit
            "state_sha256": {str(k): v for k, v in sorted(run.state_hashes.items())},
        },
        "wall_time_s": timings,
        "initial": {"heldout_loss": round(eval_before[0], 4), "heldout_masked_accuracy": round(eval_before[1], 4)},
        "final": {
            "train_loss": round(float(np.mean([h[0] for h in recent])), 4) if recent else None,
            "train_masked_accuracy": round(float(np.mean([h[1] for h in recent])), 4) if recent else None,
            "heldout_loss": round(eval_after[0], 4),
            "heldout_masked_accuracy": round(eval_after[1], 4),
        },
        "loss_curve": [
            {"step": i + 1, "loss": round(float(np.mean([h[0] for h in history[max(0, i - 49):i + 1]])), 4)}
            for i in range(49, completed, max(50, completed // 40))
        ],
        "weights_sha256": file_sha256(weights),
        "versions": _versions(),
        "threads": config.threads,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if config.objective == "hubert":
        provenance["targets"] = {
            "features": {"logmel": f"log-mel {config.num_mels} (FFT 512, Hann, no centring)",
                         "mfcc39": f"13 cepstra (DCT-II of log-mel {config.num_mels}, c0 kept) + deltas + "
                                   "delta-deltas (+-2 frames)"},
            "standardised": "per dimension over the training frames, before k-means",
            "num_clusters": config.num_clusters,
            "codebooks": run.codebooks,
        }
    return provenance


def _cluster(features: torch.Tensor, num_train: int, size: int, seed: int, what: str, record: list, log) -> torch.Tensor:
    """k-means(``size``) fitted on the training clips' frames of ``features`` (N, T, D); (N, T) labels."""
    t0 = time.perf_counter()
    train = features[:num_train].reshape(-1, features.shape[-1])
    km = fit_kmeans(train, size, seed=seed)
    labels = km.assign(features)
    usage = torch.bincount(labels[:num_train].flatten(), minlength=size)
    record.append({"features": what, "num_clusters": size, "kmeans_inertia": round(km.inertia, 4),
                   "clusters_used": int((usage > 0).sum()),
                   "largest_cluster": round(usage.max().item() / usage.sum().item(), 4)})
    log(f"[pretrain] k-means({size}) on {len(train)} frames of {what}: inertia {km.inertia:.2f}, "
        f"{int((usage > 0).sum())} clusters used, largest holds {usage.max().item() / usage.sum().item():.1%} "
        f"({time.perf_counter() - t0:.1f} s)")
    return labels


def load_schedule(path: str | Path) -> tuple[float, ...]:
    """The per-step progress values from an earlier run's ``schedule.json`` (file or model dir)."""
    path = Path(path)
    if path.is_dir():
        path = path / SCHEDULE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--replay-schedule: {path} does not exist")
    try:
        values = json.loads(path.read_text())["progress"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"--replay-schedule: {path} is not a schedule file ({err})") from None
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
        raise ValueError(f"--replay-schedule: {path}: 'progress' must be a list of numbers")
    return tuple(float(v) for v in values)
