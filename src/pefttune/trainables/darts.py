"""The Ray Tune function trainable of one DARTS search: ``darts_fn``.

``make_trainable(darts_fn, setup)`` (:func:`pefttune.trainables.trial.make_trainable`;
:class:`~pefttune.trainables.setup.TrialSetup` is shared with the discrete trainable;
its ``ray_dir`` is the DARTS Ray experiment, ``<storage>/<name>/darts``, where
per-trial markers live). The steps of a trial are :class:`pefttune.trainables.trial.Trial`'s;
this module writes those of a search (:class:`DartsTrial`).
The trial config holds ``seed`` (one of ``darts.seeds``) and ``variant`` (a mapping of
``darts`` fields overriding the experiment's ``darts`` section, ``{}`` for none), so
several seeds and variants are trials of one Ray experiment. Tests inject failures through
``setup.faults`` (``after_epoch``), as for the discrete trainable.

One trial:

1. splits the training set into a *weight* part and an *arch* part (``darts.arch_split``
   of it, stratified by label for classification, fixed by ``train.seed`` so every trial
   sees the same halves; dev and test are never used for alpha);
2. builds the supernet (all candidate methods of ``config.methods`` in every layer, the
   first listed value of each hyper-parameter, ``none`` always a candidate) and runs the
   search through :func:`pefttune.training.fit` (weights on the weight part, alpha on the
   arch part, see :mod:`pefttune.darts.architect`), ``darts.epochs`` (default
   ``train.epochs``) epochs, with the trial's seed;
3. reports every epoch: ``kind="darts"``, ``seed``, ``variant``, ``mix``, ``relaxation``,
   ``order``, ``train_loss``, ``dev_<metric>``/``dev_loss`` (the relaxed supernet),
   ``best_dev_<metric>``, ``arch_loss``/``arch_penalty``/``arch_steps``,
   ``alpha/L03/lora`` (the relaxation's probabilities, see
   :meth:`pefttune.darts.Supernet.metrics`), ``entropy/L03``, ``entropy_mean``,
   ``none_share``, ``none_argmax_layers``, ``expected_params``, ``temperature``, the
   convergence of the relaxation (:mod:`pefttune.darts.convergence`): ``entropy_norm/L03``
   (H / ln K), ``entropy_norm_mean``, ``margin/L03`` (top-2 probability margin),
   ``margin_min``, ``margin_mean``, ``argmax_changed`` (the argmax placement differs from
   the previous epoch's), ``argmax_stable_epochs``, ``none_argmax_share``,
   ``entropy_converged`` (mean normalised entropy <= ``darts.converged_entropy``),
   ``converged`` (that, and the argmax unchanged this epoch) and ``converged_entropy``; and the
   placement derived *now*: ``derived_placement`` (JSON string), ``derived_placement_short``,
   ``derived_params``, ``derived_is_argmax`` (False when the budget forced another
   choice); the last epoch adds ``derived_dev_<metric>``/``derived_dev_loss``, the dev
   score of the derived placement with the supernet's weights (the one-hot mix, i.e.
   exactly that discrete model before retraining);
4. checkpoints every epoch: the common layout of :mod:`pefttune.trainables.checkpoint` (the
   supernet's PEFT + head weights, optimizer, scheduler, RNG) plus ``alpha.safetensors``
   (``alpha``, L x K, and the candidates in its metadata), ``arch_state.pt`` (alpha's Adam
   state, steps, the arch sampler's epoch) and, for the derived placement,
   ``derived_placement.json``. A restored trial continues from its last epoch.

The derived placement is the argmax candidate per layer, or, when that exceeds
``config.budget``, the most probable placement within the budget
(:func:`pefttune.darts.derive_placement`). Retraining it is the discrete trainable's job
(:mod:`pefttune.darts.run`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pefttune.config import DartsSection, StudyConfig
from pefttune.darts import (
    Relaxation,
    Supernet,
    build_supernet,
    candidate_choices,
    convergence_tracker,
    derivation_report,
    derive_placement,
    make_architect,
    search_hooks,
)
from pefttune.placement import MethodChoice, Placement
from pefttune.data.loaders import EpochSampler, TaskData, load_data
from pefttune.schema import TrialKind
from pefttune.trainables.setup import TrialSetup, frozen_cache, train_config
from pefttune.trainables.trial import Parts, Trial
from pefttune.training import EpochResult, Hooks, evaluate, skip_cached_audio

TRAINABLE_NAME = "pefttune_darts"
ALPHA_FILE = "alpha.safetensors"
ARCH_FILE = "arch_state.pt"
DERIVED_FILE = "derived_placement.json"


# -- settings ---------------------------------------------------------------------------------------


def variant_settings(experiment: StudyConfig, variant: dict | None) -> DartsSection:
    """The experiment's ``darts`` section with a variant's overrides (validated)."""
    base = experiment.darts.model_dump()
    return DartsSection.model_validate({**base, **(variant or {})})


def variant_label(variant: dict | None) -> str:
    """``base`` or e.g. ``mix=exact,relaxation=gumbel`` (keys sorted)."""
    return ",".join(f"{k}={v}" for k, v in sorted((variant or {}).items())) or "base"


def darts_candidates(experiment: StudyConfig) -> tuple[MethodChoice, ...]:
    """``none`` and one choice per configured method (first listed value of each hyper-parameter)."""
    return candidate_choices(experiment.methods)


def make_relaxation(settings: DartsSection) -> Relaxation:
    return Relaxation(
        settings.relaxation,
        temperature=settings.temperature,
        final_temperature=settings.final_temperature,
        hard=settings.hard,
        zero_one=settings.fair_zero_one,
    )


# -- data: the weight and arch parts of the training set ----------------------------------------------------


def split_indices(dataset, share: float, seed: int, task_kind: str) -> tuple[list[int], list[int]]:
    """(weight positions, arch positions) of ``dataset``: ``share`` of it for alpha.

    Classification: per label (each label's examples shuffled, ``round(share * n)`` to the
    arch part), so both parts keep the class balance. CTC: one random split.
    """
    generator = torch.Generator().manual_seed(seed)
    size = len(dataset)
    frame = getattr(dataset, "frame", None)
    if task_kind == "classification" and frame is not None and "label" in frame:
        labels = frame["label"].astype(str).tolist()
        groups: dict[str, list[int]] = {}
        for position, label in enumerate(labels):
            groups.setdefault(label, []).append(position)
    else:
        groups = {"": list(range(size))}
    weight, arch = [], []
    for label in sorted(groups):
        members = groups[label]
        order = torch.randperm(len(members), generator=generator).tolist()
        cut = int(round(share * len(members)))
        if len(members) > 1:
            cut = min(max(cut, 1), len(members) - 1)  # both parts see every label with 2+ examples
        else:
            cut = 0
        arch += [members[i] for i in order[:cut]]
        weight += [members[i] for i in order[cut:]]
    if not weight or not arch:
        raise ValueError(
            f"darts.arch_split: {share} of {size} training examples leaves an empty part "
            f"({len(weight)} for weights, {len(arch)} for alpha)"
        )
    return sorted(weight), sorted(arch)


@dataclass
class DartsData:
    weight: torch.utils.data.DataLoader
    arch: torch.utils.data.DataLoader
    dev: torch.utils.data.DataLoader
    weight_sampler: EpochSampler
    arch_sampler: EpochSampler

    def steps_per_epoch(self, max_steps: int | None = None) -> int:
        steps = len(self.weight)
        return max(1, min(steps, max_steps) if max_steps else steps)


def darts_data(
    data: TaskData, share: float, split_seed: int, seed: int, task_kind: str, arch_batch_size: int | None = None
) -> DartsData:
    """Loaders over the two parts of ``data.train`` (same collation; the arch part's batches
    hold ``arch_batch_size`` examples, default the training batch size)."""
    dataset = data.train.dataset
    weight_idx, arch_idx = split_indices(dataset, share, split_seed, task_kind)
    batch_size = data.train.batch_size
    bucketed = data.train_sampler.lengths is not None  # length buckets as the trial's own loader has them
    lengths = np.asarray(dataset.lengths) if bucketed else None

    def sampler(indices, sampler_seed, size):
        return EpochSampler(len(indices), sampler_seed, lengths=None if lengths is None else lengths[indices],
                            batch_size=size)

    weight_sampler = sampler(weight_idx, seed, batch_size)
    arch_sampler = sampler(arch_idx, seed + 7919, arch_batch_size or batch_size)

    def loader(indices, sampler, size):
        subset = torch.utils.data.Subset(dataset, indices)
        return torch.utils.data.DataLoader(
            subset, batch_size=size, sampler=sampler, collate_fn=data.train.collate_fn,
            num_workers=data.train.num_workers,
        )

    return DartsData(
        loader(weight_idx, weight_sampler, batch_size), loader(arch_idx, arch_sampler, arch_batch_size or batch_size),
        data.dev, weight_sampler, arch_sampler,
    )


# -- checkpoints ----------------------------------------------------------------------------------------


def save_arch(directory: Path, supernet: Supernet, architect, arch_sampler: EpochSampler) -> None:
    names = json.dumps(supernet.names)
    save_file({"alpha": supernet.alpha.detach().cpu().contiguous()}, str(directory / ALPHA_FILE), metadata={"candidates": names})
    torch.save({**architect.state_dict(), "arch_sampler_epoch": arch_sampler.epoch}, directory / ARCH_FILE)


def load_arch(directory: Path, supernet: Supernet, architect, arch_sampler: EpochSampler) -> None:
    for name in (ALPHA_FILE, ARCH_FILE):
        if not (directory / name).exists():
            raise FileNotFoundError(f"checkpoint {directory}: missing {name} (not a DARTS checkpoint?)")
    alpha = load_file(str(directory / ALPHA_FILE))["alpha"]
    if tuple(alpha.shape) != tuple(supernet.alpha.shape):
        raise ValueError(f"checkpoint {directory}: alpha has shape {tuple(alpha.shape)}, expected {tuple(supernet.alpha.shape)}")
    with torch.no_grad():
        supernet.alpha.copy_(alpha)
    state = torch.load(directory / ARCH_FILE, map_location="cpu", weights_only=True)
    architect.load_state_dict(state)
    arch_sampler.set_epoch(int(state.get("arch_sampler_epoch", 0)))


def read_alpha(directory: str | Path) -> tuple[torch.Tensor, list[str]]:
    """(alpha (L, K), candidate names) from a DARTS checkpoint directory."""
    path = Path(directory) / ALPHA_FILE
    with safe_open(str(path), framework="pt") as handle:
        names = json.loads(handle.metadata()["candidates"])
        return handle.get_tensor("alpha"), names


# -- the trainable --------------------------------------------------------------------------------------


class DartsTrial(Trial):
    """A DARTS search: the supernet and its architecture step, the derived placement in every
    report and checkpoint, and that placement's dev score at the end."""

    def plan(self) -> None:
        config, experiment = self.config, self.experiment
        self.seed = int(config.get("seed", experiment.darts_seeds[0]))
        variant = dict(config.get("variant") or {})
        self.settings = settings = variant_settings(experiment, variant)
        epochs = settings.epochs or experiment.train.epochs
        self.train = train_config(experiment, epochs=epochs, seed=self.seed)
        self.candidates = candidates = darts_candidates(experiment)
        self.budget = budget = experiment.budget
        if settings.budget_penalty and budget is None:
            raise ValueError("darts.budget_penalty: needs the experiment's `budget`")
        self.columns = {
            "kind": TrialKind.DARTS.value,
            "seed": self.seed,
            "variant": variant_label(variant),
            "mix": settings.mix,
            "relaxation": settings.relaxation,
            "order": settings.order,
            "arch_steps_per_weight_step": settings.arch_steps_per_weight_step,
            "candidates": ",".join(c.short() for c in candidates),
        }
        if budget is not None:
            self.columns["budget"] = budget

    def build(self, device) -> Parts:
        experiment, setup, settings, seed = self.experiment, self.setup, self.settings, self.seed
        data = load_data(experiment, setup.data, seed=seed)
        self.parts = parts = darts_data(
            data, settings.arch_split, experiment.train.seed, seed, setup.data.task_kind, settings.arch_batch_size
        )
        self.supernet = supernet = build_supernet(
            experiment.backbone, self.candidates, setup.head, mix=settings.mix, relaxation=make_relaxation(settings)
        ).to(device)
        supernet.cache = frozen_cache(experiment, setup.data, supernet.model)
        skip_cached_audio(supernet.cache, supernet.model, data.train, data.dev, data.test)
        optimizer, scheduler, recording, self.architect = make_architect(
            supernet,
            parts.weight,
            parts.arch,
            self.train,
            order=settings.order,
            lr=settings.arch_lr,
            weight_decay=settings.arch_weight_decay,
            warmup_epochs=settings.warmup_epochs,
            steps_per_weight_step=settings.arch_steps_per_weight_step,
            betas=settings.arch_betas,
            budget=self.budget,
            budget_penalty=settings.budget_penalty,
        )
        self.columns["supernet_peft_params"] = supernet.model.count_parameters()["peft"]
        return Parts(supernet.model, recording, parts.dev, parts.weight_sampler, optimizer, scheduler, supernet.cache)

    def restore_extra(self, path: Path) -> None:
        load_arch(path, self.supernet, self.architect, self.parts.arch_sampler)

    def hooks(self, parts: Parts, state) -> Hooks:
        # the previous argmax is the restored alpha's (the last reported epoch's); the count goes on
        tracker = convergence_tracker(
            self.supernet, self.settings.converged_entropy, int((state.metrics or {}).get("argmax_stable_epochs", 0))
        )
        return search_hooks(self.supernet, self.architect, tracker)

    def epoch_columns(self, result: EpochResult) -> dict:
        """The placement derived now (kept for the final score and the checkpoint)."""
        self.placement = placement = derive_placement(self.supernet, self.budget)
        report = derivation_report(self.supernet, placement)
        return {
            "derived_placement": json.dumps(placement.to_dict(), separators=(",", ":")),
            "derived_placement_short": placement.short(),
            "derived_params": report["derived_params"],
            "derived_is_argmax": report["derived_is_argmax"],
            "derived_log_prob": report["derived_log_prob"],
        }

    def final_scores(self, parts: Parts, best_weights):
        """The derived placement's dev score with the supernet's weights (its one-hot mix)."""
        supernet = self.supernet
        with supernet.fixed_weights(supernet.one_hot(self.placement)):
            derived = evaluate(supernet.model, parts.dev, self.train, self.device, layer_fn=supernet.layer_fn,
                               cache=supernet.cache)
        return derived.metrics("derived_dev"), None

    def metadata(self) -> dict:
        return {"kind": TrialKind.DARTS.value, "seed": self.seed, "variant": self.columns["variant"]}

    def write_extra(self, path: Path) -> None:
        save_arch(path, self.supernet, self.architect, self.parts.arch_sampler)
        self.placement.save(path / DERIVED_FILE)


def darts_fn(config: dict, setup: TrialSetup) -> None:
    """One DARTS search (a Ray Tune function trainable); see the module docstring."""
    DartsTrial(config, setup).run()


def derived_from_checkpoint(directory: str | Path) -> Placement:
    """The derived placement stored in a DARTS checkpoint."""
    return Placement.load(Path(directory) / DERIVED_FILE)
