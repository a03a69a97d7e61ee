"""The discrete placement search space, as an Optuna define-by-run function.

For every encoder layer ``i`` one categorical parameter ``layer_{i:02d}`` chooses among
``none`` and the candidate methods of ``config.methods`` (a ``hybrid`` candidate puts its
members, merged, into the layer: :mod:`pefttune.methods.hybrid`). Each method's listed
hyper-parameters (e.g. ``lora.rank`` in ``[4, 8]``) are shared by all layers that use the
method and are suggested only when some layer uses it (conditional parameters, which is
why the space is a function and TPE runs with ``multivariate=True, group=True``).
``lr`` is drawn from ``train.lr_grid`` (a categorical parameter) when it is set: the learning-rate
protocol's grid (:mod:`pefttune.tuning`), from which the fixed points' rates are chosen too.

The function returns the trial config the trainable reads: ``placement`` (a JSON string,
:meth:`Placement.to_dict` form), ``kind``, ``method``, ``lr``, ``peft_params`` and
``budget_exempt``. It also records ``kind``/``placement_short``/``peft_params`` as
Optuna user attributes (visible in optuna-dashboard) and, when ``config.budget`` is set,
the constraint ``budget = peft_params - budget`` (feasible when <= 0), which Optuna's TPE
and NSGA-II use to steer away from over-budget placements.

Fixed points (uniform baselines, the hybrid, DARTS-derived placements) are enqueued
Optuna trials: :meth:`FixedPoint.optuna_params` fixes the layer parameters (uniform) and
the user attribute ``pefttune_fixed`` tells the space function which kind of point it is.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from pefttune.backbones import BackboneInfo
from pefttune.config import StudyConfig
from pefttune.methods import get_method
from pefttune.methods import hybrid as hybrid_spec
from pefttune.placement import Placement
from pefttune.schema import TrialKind

NONE = "none"
FIXED_ATTR = "pefttune_fixed"
LR_PARAM = "lr"  # the searched trials' rate, drawn from train.lr_grid


def layer_param(index: int) -> str:
    return f"layer_{index:02d}"


def hp_param(method: str, hp: str) -> str:
    return f"{method}.{hp}"


def encode_choice(value: Any) -> Any:
    """Optuna categorical values must be scalars: lists (e.g. LoRA targets) become 'a,b'."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return value


def decode_choice(method: str, hp: str, value: Any) -> Any:
    if method == hybrid_spec.HYBRID:  # a member's hyper-parameters (one value, never an Optuna parameter)
        return value
    spec = get_method(method).hparams[hp]
    if spec.kind is tuple and isinstance(value, str):
        return tuple(v for v in value.split(",") if v)
    return value


@dataclass(frozen=True)
class FixedPoint:
    """A placement every search runs, besides the sampled ones.

    ``kind`` is ``uniform`` (``method`` in every layer), ``hybrid`` (``search.hybrid``'s
    members merged in every layer, see :meth:`PlacementSpace.hybrid`) or any other label with an explicit ``placement`` (e.g.
    ``darts-derived``). ``lr`` defaults to ``train.lr`` (the learning-rate protocol sets the
    chosen rate: :func:`with_rates`); ``extra`` adds keys to the trial
    config (e.g. ``derived_from``, or ``seed`` and ``config_id`` of a replicate).
    """

    kind: str
    method: str | None = None
    placement: dict | None = None
    lr: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind == TrialKind.UNIFORM and not self.method:
            raise ValueError("FixedPoint: kind 'uniform' needs a method")
        if self.kind not in (TrialKind.UNIFORM, TrialKind.HYBRID) and self.placement is None:
            raise ValueError(f"FixedPoint: kind {self.kind!r} needs an explicit placement")
        if self.placement is not None:
            Placement.from_dict(self.placement)  # validates

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.method}" if self.method else self.kind

    def to_attr(self) -> dict:
        return asdict(self)

    @classmethod
    def from_attr(cls, data: dict) -> "FixedPoint":
        return cls(**data)


def with_rates(points: list[FixedPoint], choices) -> list[FixedPoint]:
    """``points`` at the rates the learning-rate protocol chose (``choices``:
    :class:`~pefttune.tuning.LrChoices`, by the points' ``config_id``), each continuing its rung
    (``continues``); a point without a choice keeps its own (``train.lr`` when None)."""
    from dataclasses import replace

    from pefttune.schema import CONTINUES

    out = []
    for point in points:
        cid, seed = point.extra.get("config_id"), point.extra.get("seed")
        choice = choices.choices.get(cid)
        if choice is not None:  # the first seed continues the chosen rate's rung
            point = replace(point, lr=choice.lr, extra={**point.extra, CONTINUES: choices.continues(cid, seed)})
        out.append(point)
    return out


def uniform_methods(config: StudyConfig) -> list[str]:
    """The candidates that get a uniform baseline: all but a ``hybrid`` candidate (the
    hybrid in every layer is a hybrid, not one method everywhere)."""
    return [name for name in config.methods if name != hybrid_spec.HYBRID]


def fixed_points(config: StudyConfig) -> list[FixedPoint]:
    """Uniform baselines (one per candidate method) and the hybrid, as configured."""
    seed = {"seed": config.train.seed}
    points = []
    if config.search.uniform_baselines:
        points += [FixedPoint(TrialKind.UNIFORM.value, method=name,
                              extra={**seed, "config_id": f"{TrialKind.UNIFORM}:{name}"})
                   for name in uniform_methods(config)]
    hybrid = config.search.hybrid
    if hybrid is not False and (hybrid != "candidates" or len(uniform_methods(config)) > 1):
        points.append(FixedPoint(TrialKind.HYBRID.value, extra={**seed, "config_id": TrialKind.HYBRID.value}))
    return points


@dataclass(frozen=True)
class PlacementSpace:
    """Define-by-run search space over per-layer placements (picklable plain data).

    ``choices[method][hp]`` lists the (encoded) values of each hyper-parameter;
    ``conditional=False`` suggests every listed hyper-parameter in every trial (needed by
    the grid sampler, whose grid is over all parameters).
    """

    info: BackboneInfo
    choices: dict[str, dict[str, list]]
    lr: float
    lr_grid: tuple[float, ...] | None = None
    budget: int | None = None
    budget_exempt_fixed: bool = False
    conditional: bool = True
    hybrid_spec: Any = True  # search.hybrid: true (the study's mix), auto, candidates or a members mapping

    @classmethod
    def from_config(cls, config: StudyConfig, info: BackboneInfo, conditional: bool = True) -> "PlacementSpace":
        choices = {
            method: {hp: [encode_choice(v) for v in values] for hp, values in hps.items()}
            for method, hps in config.candidate_choices().items()
        }
        return cls(
            info=info,
            choices=choices,
            lr=config.train.lr,
            lr_grid=tuple(config.train.lr_grid) if config.train.lr_grid else None,
            budget=config.budget,
            budget_exempt_fixed=config.search.budget_exempt_fixed,
            conditional=conditional,
            hybrid_spec=config.search.hybrid,
        )

    # -- structure ------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.info.num_layers

    @property
    def methods(self) -> list[str]:
        return list(self.choices)

    def layer_options(self) -> list[str]:
        return [NONE, *[m for m in self.methods if m != NONE]]  # 'none' is always a candidate

    def searched_hparams(self) -> dict[str, list]:
        """Optuna parameter name -> choices, for hyper-parameters with more than one value."""
        return {
            hp_param(m, hp): values for m, hps in self.choices.items() for hp, values in hps.items() if len(values) > 1
        }

    def grid(self) -> dict[str, list]:
        """Every parameter with its values (Optuna's GridSampler search space)."""
        grid = {layer_param(i): self.layer_options() for i in range(self.num_layers)}
        grid.update(self.searched_hparams())
        if self.lr_grid is not None:
            grid[LR_PARAM] = list(self.lr_grid)
        return grid

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    def default_hparams(self, method: str) -> dict:
        return {hp: decode_choice(method, hp, values[0]) for hp, values in self.choices.get(method, {}).items()}

    # -- building placements -----------------------------------------------------------------
    def placement(self, layers: list[str | list[str]], hparams: dict[str, dict]) -> Placement:
        """Placement from per-layer method names (a list = hybrid layer) and per-method hparams
        (for the ``hybrid`` candidate: its members, which the layer then holds)."""
        if len(layers) != self.num_layers:
            raise ValueError(f"placement: {len(layers)} layer entries for a {self.num_layers}-layer backbone")
        entries = []
        for layer in layers:
            names = [layer] if isinstance(layer, str) else list(layer)
            entries.append([{"method": m, **hparams.get(m, {})} for m in names if m != NONE])
        return Placement.from_dict({"num_layers": self.num_layers, "layers": entries})

    def uniform(self, method: str) -> Placement:
        return self.placement([method] * self.num_layers, {method: self.default_hparams(method)})

    def hybrid_members(self) -> dict[str, dict]:
        """The members of the hybrid fixed point, per ``search.hybrid`` (resolved hyper-parameters).

        ``true``: the study's mix; a mapping: those members; ``candidates``: every candidate
        (a ``hybrid`` candidate excluded) at its first listed values; ``auto``: the study's
        mix scaled to the budget, or without one to the mean PEFT parameters of the uniform
        baselines (every candidate but a ``hybrid`` one), see
        :func:`pefttune.methods.hybrid.auto_members`.
        """
        spec = self.hybrid_spec
        if spec is True:
            return hybrid_spec.resolve_members(hybrid_spec.STUDY_MIX, "search.hybrid")
        if isinstance(spec, dict):
            return hybrid_spec.resolve_members(spec, "search.hybrid")
        uniform = [m for m in self.methods if m not in (NONE, hybrid_spec.HYBRID)]
        if spec == "candidates":
            return {m: get_method(m).resolve(self.default_hparams(m), m) for m in uniform}
        if spec == "auto":
            return hybrid_spec.auto_members(self.info, self.hybrid_target(), self.num_layers)
        raise ValueError(f"search.hybrid: no hybrid configured ({spec!r})")

    def hybrid_target(self) -> int:
        """What ``search.hybrid: auto`` aims at: the budget, else the uniform baselines' mean."""
        if self.budget is not None:
            return int(self.budget)
        uniform = [m for m in self.methods if m not in (NONE, hybrid_spec.HYBRID)]
        if not uniform:
            raise ValueError("search.hybrid: auto without a budget needs a uniform baseline to match; "
                             "set budget or add a candidate method")
        counts = [self.uniform(m).trainable_parameters(self.info) for m in uniform]
        return int(sum(counts) // len(counts))

    def hybrid(self) -> Placement:
        """The hybrid fixed point: :meth:`hybrid_members` merged in every layer."""
        entry = {"method": hybrid_spec.HYBRID, **{m: hp for m, hp in self.hybrid_members().items()}}
        return Placement.from_dict({"num_layers": self.num_layers, "layers": [[entry]] * self.num_layers})

    def fixed_placement(self, point: FixedPoint) -> Placement:
        if point.placement is not None:
            placement = Placement.from_dict(point.placement)
            placement.validate_for(self.info)
            return placement
        if point.kind == TrialKind.UNIFORM:
            if point.method not in self.choices:
                raise ValueError(f"FixedPoint: method {point.method!r} is not a candidate in config.methods")
            return self.uniform(point.method)
        if point.kind == TrialKind.HYBRID:
            return self.hybrid()
        raise ValueError(f"FixedPoint: kind {point.kind!r} needs an explicit placement")

    def optuna_params(self, point: FixedPoint) -> dict:
        """Parameters to enqueue for a fixed point (so the sampler learns from it)."""
        params = {}
        if self.conditional is False or point.kind in (TrialKind.UNIFORM, TrialKind.HYBRID):
            params.update({name: values[0] for name, values in self.searched_hparams().items()})
        if point.kind == TrialKind.UNIFORM and point.placement is None:
            params.update({layer_param(i): point.method for i in range(self.num_layers)})
        return params

    # -- the define-by-run function ---------------------------------------------------------
    def __call__(self, trial) -> dict:
        fixed_attr = trial.user_attrs.get(FIXED_ATTR)
        point = FixedPoint.from_attr(fixed_attr) if fixed_attr else None
        lr = self.lr
        if point is None or point.kind == TrialKind.UNIFORM and point.placement is None:
            layers = [trial.suggest_categorical(layer_param(i), self.layer_options()) for i in range(self.num_layers)]
            used = set(layers) - {NONE}
            hparams = {}
            for method in self.methods:
                values = {}
                for hp, options in self.choices[method].items():
                    if len(options) > 1 and (method in used or not self.conditional):
                        value = trial.suggest_categorical(hp_param(method, hp), options)
                    else:
                        value = options[0]
                    values[hp] = decode_choice(method, hp, value)
                hparams[method] = values
            placement = self.placement(layers, hparams)
            if point is None and self.lr_grid is not None:
                lr = float(trial.suggest_categorical(LR_PARAM, list(self.lr_grid)))
        else:
            if point.kind == TrialKind.HYBRID and point.placement is None:
                for name, options in self.searched_hparams().items():  # fixed by the enqueued params
                    trial.suggest_categorical(name, options)
            placement = self.fixed_placement(point)
        kind = point.kind if point else TrialKind.DISCRETE.value
        method = point.method if point else None
        if point is not None and point.lr is not None:
            lr = point.lr
        peft = placement.trainable_parameters(self.info)
        exempt = bool(point is not None and self.budget_exempt_fixed)
        trial.set_user_attr("kind", kind)
        trial.set_user_attr("placement_short", placement.short())
        trial.set_user_attr("peft_params", peft)
        if self.budget is not None:
            trial.set_constraint("budget", 0.0 if exempt else float(peft - self.budget))
        out = {
            "kind": kind,
            "method": method,
            "placement": json.dumps(placement.to_dict(), separators=(",", ":")),
            "lr": lr,
            "peft_params": peft,
            "budget_exempt": exempt,
        }
        if point is not None:
            out.update(point.extra)
        return out


def validate_space(config: StudyConfig, info: BackboneInfo) -> PlacementSpace:
    """Build the space for ``config`` and check it can be searched (errors name the field)."""
    algorithm = config.search.algorithm
    space = PlacementSpace.from_config(config, info, conditional=algorithm != "grid")
    if algorithm == "grid":
        space.grid()  # the grid sampler's space: every parameter finite
    for point in fixed_points(config):
        space.fixed_placement(point).validate_for(info)
    return space
