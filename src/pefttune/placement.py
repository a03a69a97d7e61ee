"""Per-layer placement of PEFT methods: data, validation, and applying it to a backbone.

A :class:`Placement` says, for every encoder layer, which methods (zero, one, or several:
a *hybrid* layer) it holds, each with its hyper-parameters. It is plain data: JSON/YAML
serialisable, validated against the method registry, and countable without building a
model.

JSON form (``to_dict``)::

    {"num_layers": 4,
     "layers": [[{"method": "lora", "rank": 8}], [], [{"method": "houlsby"}], []]}

``from_dict`` also accepts a method as a bare name (``"lora"``), ``"none"`` for an empty
layer, a sparse mapping ``{"layers": {"0": "lora", "2": ["houlsby", "lora"]}}``, and a
hybrid entry ``{"method": "hybrid", "sequential": {"bottleneck": 10}, "lora": {"rank": 2}}``,
which the layer holds as its members (:mod:`pefttune.methods.hybrid`).
``{"num_layers": 0, "layers": []}`` is the empty placement of a backbone without layers
(the ``log-mel`` reference).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from pefttune.backbones import BackboneInfo, SpeechEncoder
from pefttune.methods import LayerMethod, get_method
from pefttune.methods import hybrid as hybrid_spec


@dataclass(frozen=True)
class MethodChoice:
    """One method in one layer, with all hyper-parameters resolved (defaults filled).

    ``method == "hybrid"`` is a per-layer choice of several merged methods (a candidate of
    the search or of DARTS): ``hparams`` maps each member method to its resolved
    hyper-parameters (:mod:`pefttune.methods.hybrid`). A placement layer never holds it as
    such: it holds the :meth:`members`.
    """

    method: str
    hparams: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        if self.method == hybrid_spec.HYBRID:
            return {"method": self.method, **{e.pop("method"): e for e in hybrid_spec.member_entries(self.hparams)}}
        return {"method": self.method, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.hparams.items()}}

    def short(self) -> str:
        if self.method == hybrid_spec.HYBRID:
            return f"hybrid[{hybrid_spec.short(self.hparams)}]"
        spec = get_method(self.method)
        parts = [f"{spec.hparams[k].short}={_fmt(v)}" for k, v in self.hparams.items() if spec.hparams[k].short]
        return f"{self.method}({','.join(parts)})" if parts else self.method

    def count(self, info: BackboneInfo) -> int:
        if self.method == hybrid_spec.HYBRID:
            return hybrid_spec.count(info, self.hparams)
        return get_method(self.method).count(info, self.hparams)

    def members(self) -> tuple["MethodChoice", ...]:
        """The choices this one puts into a layer: a hybrid's members, else itself."""
        if self.method == hybrid_spec.HYBRID:
            return tuple(MethodChoice(name, dict(hparams)) for name, hparams in self.hparams.items())
        return (self,)


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _parse_choice(entry: Any, where: str) -> MethodChoice:
    if isinstance(entry, str):
        name, hparams = entry, {}
    elif isinstance(entry, dict):
        if "method" not in entry:
            raise ValueError(f"{where}: a method entry needs a 'method' field, got {entry!r}")
        hparams = dict(entry)
        name = hparams.pop("method")
        hparams.update(hparams.pop("hparams", {}) or {})
    elif isinstance(entry, MethodChoice):
        name, hparams = entry.method, entry.hparams
    else:
        raise ValueError(f"{where}: expected a method name or mapping, got {entry!r}")
    if not isinstance(name, str):
        raise ValueError(f"{where}.method: expected a method name, got {name!r}")
    if name == hybrid_spec.HYBRID:
        return MethodChoice(name, hybrid_spec.resolve_members(hparams, f"{where}.hybrid"))
    try:
        spec = get_method(name)
    except ValueError as err:
        raise ValueError(f"{where}.method: {err}") from None
    return MethodChoice(name, spec.resolve(hparams, f"{where}.{name}"))


def _parse_layer(entry: Any, where: str) -> tuple[MethodChoice, ...]:
    if entry is None:
        return ()
    items = entry if isinstance(entry, (list, tuple)) else [entry]
    choices = [_parse_choice(item, f"{where}[{i}]" if len(items) > 1 else where) for i, item in enumerate(items)]
    choices = [m for c in choices for m in c.members() if m.method != "none"]  # a hybrid: its members
    names = [c.method for c in choices]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{where}: method(s) {dupes} appear twice in one layer")
    return tuple(choices)


@dataclass(frozen=True)
class Placement:
    """Methods per encoder layer; ``layers[i]`` is a tuple of :class:`MethodChoice`."""

    layers: tuple[tuple[MethodChoice, ...], ...]

    # -- construction ---------------------------------------------------------------
    @classmethod
    def uniform(cls, method: str | list[str], num_layers: int, **hparams) -> "Placement":
        """The same method (or hybrid list of methods) in every layer."""
        if num_layers < 1:
            raise ValueError(f"num_layers: must be >= 1, got {num_layers}")
        methods = [method] if isinstance(method, str) else list(method)
        stray = sorted(set(hparams) - set(methods)) if len(methods) > 1 else []
        if stray:
            raise ValueError(
                f"uniform: hybrid hyper-parameters are keyed by method name ({methods}), got {stray}"
            )
        entry = [{"method": m, **(hparams if len(methods) == 1 else hparams.get(m, {}))} for m in methods]
        return cls.from_dict({"num_layers": num_layers, "layers": [entry] * num_layers})

    @classmethod
    def from_dict(cls, data: dict) -> "Placement":
        if not isinstance(data, dict) or "layers" not in data:
            raise ValueError("placement: expected a mapping with a 'layers' field")
        raw = data["layers"]
        num_layers = data.get("num_layers")
        if num_layers is not None:
            if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
                raise ValueError(f"placement.num_layers: expected a non-negative integer, got {num_layers!r}")
            if num_layers == 0:  # a backbone without layers (the log-mel reference): nothing to place
                if raw not in ([], {}, ()):
                    raise ValueError(f"placement.layers: num_layers is 0, so 'layers' must be empty, got {raw!r}")
                return cls(())
        if isinstance(raw, dict):
            if num_layers is None:
                raise ValueError("placement.num_layers: required when 'layers' is a mapping of layer index -> methods")
            dense: list[Any] = [None] * int(num_layers)
            for key, entry in raw.items():
                try:
                    index = int(key)
                except (TypeError, ValueError):
                    raise ValueError(f"placement.layers: layer key {key!r} is not an integer") from None
                if not 0 <= index < num_layers:
                    raise ValueError(f"placement.layers: layer {index} out of range 0..{num_layers - 1}")
                dense[index] = entry
            raw = dense
        if not isinstance(raw, (list, tuple)) or not raw:
            raise ValueError("placement.layers: expected a non-empty list (one entry per layer)")
        if num_layers is not None and len(raw) != int(num_layers):
            raise ValueError(f"placement.layers: {len(raw)} entries but num_layers is {num_layers}")
        return cls(tuple(_parse_layer(entry, f"placement.layers[{i}]") for i, entry in enumerate(raw)))

    @classmethod
    def from_json(cls, text: str) -> "Placement":
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> "Placement":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"placement file {path} does not exist")
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "layers": [[c.to_dict() for c in layer] for layer in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    def short(self) -> str:
        """E.g. ``L0:lora(r=8) L1:none L2:houlsby(b=32)+lora(r=8)``."""
        return " ".join(
            f"L{i}:{'+'.join(c.short() for c in layer) if layer else 'none'}" for i, layer in enumerate(self.layers)
        )

    def __str__(self) -> str:
        return self.short()

    # -- queries -----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_methods(self) -> list[str]:
        """One label per layer: the method name, ``a+b`` for hybrids, ``none`` if empty."""
        return ["+".join(c.method for c in layer) if layer else "none" for layer in self.layers]

    def lowest_adapted_layer(self) -> int | None:
        """Index of the first layer holding a method (None if no layer does)."""
        return next((i for i, layer in enumerate(self.layers) if layer), None)

    def validate_for(self, info: BackboneInfo) -> None:
        if self.num_layers != info.num_layers:
            raise ValueError(
                f"placement.num_layers: the placement has {self.num_layers} layers but backbone "
                f"{info.name or ''} has {info.num_layers}"
            )

    def trainable_parameters(self, info: BackboneInfo) -> int:
        """PEFT parameters this placement adds to a backbone of this shape (no head)."""
        self.validate_for(info)
        return sum(choice.count(info) for layer in self.layers for choice in layer)


def apply_placement(encoder: SpeechEncoder, placement: Placement) -> list[list[LayerMethod]]:
    """Attach the placement's methods to a frozen encoder, in place.

    Returns the attached method modules per layer. They are also registered on each
    layer as ``layer.pefttune`` (a ModuleDict keyed by method name), so they move with
    ``.to(device)`` and appear in ``named_parameters``. Their parameters are the only
    trainable ones in the encoder.
    """
    info = encoder.info
    placement.validate_for(info)
    if any(hasattr(layer, "pefttune") for layer in encoder.layers):
        raise ValueError("apply_placement: this encoder already holds a placement; load a fresh backbone")
    attached: list[list[LayerMethod]] = []
    for index, (layer, choices) in enumerate(zip(encoder.layers, placement.layers)):
        modules = nn.ModuleDict()
        for choice in choices:
            spec = get_method(choice.method)
            try:
                method = spec.build(layer, info, choice.hparams)
                method.attach(layer)
            except ValueError as err:  # e.g. two methods wrapping the same projection
                raise ValueError(f"placement.layers[{index}].{choice.method}: {err}") from None
            modules[choice.method] = method
        layer.pefttune = modules
        attached.append(list(modules.values()))
    for param in encoder.model.parameters():
        param.requires_grad_(False)
    for methods in attached:
        for method in methods:
            for param in method.trainable_parameters():
                param.requires_grad_(True)
    return attached
