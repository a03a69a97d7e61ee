"""What every PEFT method provides, and the registry that names them.

A method is described by a :class:`MethodSpec`: its hyper-parameters (with defaults,
types and checks), a parameter-count formula that needs only the backbone's shape
(so searches can enforce budgets without building anything), and a ``build`` function
that attaches one instance to one encoder layer.

A method whose update is an affine change of the weights it touches (LoRA, IA3, BitFit)
says so with ``mergeable``: :mod:`pefttune.merge` folds it into the backbone's own weights.

Instances are :class:`LayerMethod` modules. Their contribution to the layer can be scaled
by ``gate`` (``None`` = 1): DARTS' one-pass ``gated`` mix sets it to the softmax weight of
the method, and ``active = False`` removes the method from the forward pass (the exact
mix activates one candidate at a time).
"""
from __future__ import annotations

import abc

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from pefttune.backbones import BackboneInfo


@dataclass(frozen=True)
class HParam:
    """One hyper-parameter of a method."""

    default: Any
    help: str
    kind: type = int
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None
    short: str | None = None  # name in the placement's short string form, e.g. "r"

    def check(self, value: Any, where: str) -> Any:
        if self.kind is tuple:
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"{where}: expected a non-empty list, got {value!r}")
            value = tuple(value)
            bad = [v for v in value if self.choices and v not in self.choices]
            if bad:
                raise ValueError(f"{where}: {bad} not among {list(self.choices)}")
            if any(v in value[:i] for i, v in enumerate(value)):
                raise ValueError(f"{where}: duplicate entries in {list(value)}")
            return value
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise ValueError(f"{where}: expected an integer, got {value!r}")
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}: expected a number, got {value!r}")
            value = float(value)
        elif self.kind is str:
            if not isinstance(value, str):
                raise ValueError(f"{where}: expected a string, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{where}: {value!r} not among {list(self.choices)}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{where}: must be >= {self.minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"{where}: must be <= {self.maximum}, got {value!r}")
        return value


class LayerMethod(nn.Module, abc.ABC):
    """One PEFT method attached to one encoder layer.

    Subclasses register hooks or wrap submodules in ``attach`` and undo it in ``detach``;
    ``trainable_parameters()`` lists exactly the parameters the method adds.
    """

    pefttune_trainable = True  # SpeechEncoder.train() switches these to training mode

    def __init__(self) -> None:
        super().__init__()
        self.gate: torch.Tensor | float | None = None
        self.active: bool = True
        self._handles: list = []

    def scale(self, contribution: torch.Tensor) -> torch.Tensor:
        return contribution if self.gate is None else contribution * self.gate

    @abc.abstractmethod
    def attach(self, layer: nn.Module) -> None:
        """Install the method's hooks or wrappers into ``layer``."""

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def perturb_(self, std: float = 0.02) -> None:
        """Move every parameter off its init (tests: zero-init weights block gradients)."""
        with torch.no_grad():
            for param in self.trainable_parameters():
                param.add_(torch.randn_like(param) * std)


@dataclass(frozen=True)
class MethodSpec:
    """A registered PEFT method."""

    name: str
    description: str
    hparams: dict[str, HParam]
    count: Callable[[BackboneInfo, dict], int]
    build: Callable[[nn.Module, BackboneInfo, dict], LayerMethod] | None
    identity_at_init: bool = True
    aliases: tuple[str, ...] = field(default=())
    #: Its trained update folds into the frozen weights (:mod:`pefttune.merge`).
    mergeable: bool = False

    def resolve(self, hparams: dict | None, where: str) -> dict:
        """Defaults filled in, unknown names rejected, values checked."""
        hparams = dict(hparams or {})
        unknown = sorted(set(hparams) - set(self.hparams))
        if unknown:
            raise ValueError(
                f"{where}: unknown hyper-parameter(s) {unknown} for method {self.name!r}; "
                f"known: {sorted(self.hparams) or 'none'}"
            )
        return {
            key: spec.check(hparams.get(key, spec.default), f"{where}.{key}") for key, spec in self.hparams.items()
        }


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown PEFT method {name!r}; known: {sorted(_REGISTRY)}") from None


def method_names() -> list[str]:
    return list(_REGISTRY)


# -- shared building blocks ------------------------------------------------------------


class Bottleneck(nn.Module):
    """down -> nonlinearity -> up, with the up-projection zero-initialised."""

    def __init__(self, dim: int, bottleneck: int, activation: str = "relu"):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "tanh": nn.Tanh()}[activation]
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | float | None = None) -> torch.Tensor:
        """``up(act(down(x)))``, times ``scale`` if given: applied to the bottleneck
        activations and the up bias (``W (s h) + s b``), a tensor bottleneck/dim the size."""
        h = self.act(self.down(x))
        if scale is None:
            return self.up(h)
        return F.linear(h * scale, self.up.weight, self.up.bias * scale)


def bottleneck_params(dim: int, bottleneck: int) -> int:
    return 2 * dim * bottleneck + bottleneck + dim


def replace_output(output, new_first):
    """Swap the first element of a module output that may be a tensor or a tuple."""
    if isinstance(output, tuple):
        return (new_first, *output[1:])
    return new_first


def first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


LINEAR_SITES = {
    "q_proj": ("attention", "q_proj"),
    "k_proj": ("attention", "k_proj"),
    "v_proj": ("attention", "v_proj"),
    "out_proj": ("attention", "out_proj"),
    "intermediate_dense": ("feed_forward", "intermediate_dense"),
    "output_dense": ("feed_forward", "output_dense"),
}


def linear_dims(info: BackboneInfo, site: str) -> tuple[int, int]:
    """(in_features, out_features) of a linear site, from the backbone shape alone."""
    d, i = info.hidden_size, info.intermediate_size
    return {"intermediate_dense": (d, i), "output_dense": (i, d)}.get(site, (d, d))


class WrappedLinearMethod(LayerMethod):
    """A method that replaces some of the layer's linear projections by wrappers
    (peft's LoRA and IA3 layers), keeping the original as ``wrapper.base_layer``.

    A projection may hold several wrappers (LoRA and IA3 in one layer, or the DARTS
    supernet's LoRA candidate next to a hybrid's LoRA member): each new wrapper wraps the
    one already there, so the frozen projection is the innermost ``base_layer`` and every
    wrapper adds its own update to what runs inside it."""

    def __init__(self, targets: tuple[str, ...]):
        super().__init__()
        self.targets = targets
        # Plain containers, not registered submodules: the wrappers live in the layer
        # (registering the layer here would make a module cycle).
        self._wrapped: dict[str, nn.Module] = {}
        self._layer: list[nn.Module] = []

    @abc.abstractmethod
    def wrap(self, base: nn.Module, target: str) -> nn.Module:
        """Return the wrapper module for projection ``target`` (``base``: the projection
        as it is now, the frozen Linear or another method's wrapper around it)."""

    def fold(self, target: str, weight: torch.Tensor, bias: torch.Tensor | None):
        """The (weight, bias) of this method's wrapper at ``target``, given those of the
        affine map it wraps. Methods that cannot fold (a nonlinear update) raise."""
        raise NotImplementedError(f"{type(self).__name__} does not fold into the frozen weights")

    def wrapper_of(self, target: str) -> nn.Module | None:
        """This method's wrapper module at projection ``target`` (None if it has none there)."""
        return self._wrapped.get(target)

    def attach(self, layer: nn.Module) -> None:
        self._layer[:] = [layer]
        for target in self.targets:
            parent_name, name = LINEAR_SITES[target]
            parent = getattr(layer, parent_name)
            wrapped = self.wrap(getattr(parent, name), target)
            wrapped.pefttune_trainable = True
            setattr(parent, name, wrapped)
            self._wrapped[target] = wrapped

    def detach(self) -> None:
        super().detach()
        for target, wrapped in self._wrapped.items():
            parent_name, name = LINEAR_SITES[target]
            parent = getattr(self._layer[0], parent_name)
            outer = getattr(parent, name)
            if outer is wrapped:
                setattr(parent, name, wrapped.base_layer)
                continue
            while outer.base_layer is not wrapped:  # a later method wrapped ours: splice ours out
                outer = outer.base_layer
            outer.base_layer = wrapped.base_layer
        self._wrapped.clear()


def frozen_linear(module: nn.Module) -> nn.Module:
    """The frozen projection inside any number of method wrappers."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module
