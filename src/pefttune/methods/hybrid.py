"""The hybrid: several methods merged inside one layer, as one per-layer choice.

Not a registered method (it has no layer module of its own): a hybrid is a mapping of
member method -> hyper-parameters, e.g. the study's mix (``STUDY_MIX``)::

    {sequential: {bottleneck: 10}, parallel: {bottleneck: 10}, lora: {rank: 2}}

A placement layer holding ``{"method": "hybrid", ...members}`` holds the members' own
modules (:mod:`pefttune.placement` expands it), so its parameter count is the sum of its
members' counts. It serves as the ``search.hybrid`` fixed point (the hybrid in every layer)
and as a per-layer candidate ``methods: {hybrid: {...}}`` of the discrete search and DARTS.

:func:`auto_members` scales the members' sizes (bottleneck, rank, prefix length) so that a
placement with the hybrid in every layer comes as close as possible to a parameter target
without going over: the result is maximal (one more unit of any member's size would go
over), so it lands within one step of the target, a step being the smallest increment
:func:`size_steps` of the placement's count for one unit of one member's size.
"""
from __future__ import annotations

from typing import Any

from pefttune.backbones import BackboneInfo
from pefttune.methods.base import get_method

HYBRID = "hybrid"

#: The study's hybrid ("mix"): sequential + parallel adapters at bottleneck 10 and LoRA rank 2.
STUDY_MIX: dict[str, dict[str, Any]] = {
    "sequential": {"bottleneck": 10},
    "parallel": {"bottleneck": 10},
    "lora": {"rank": 2},
}

#: The hyper-parameter :func:`auto_members` scales, per method (methods without one keep their size).
SIZE_HPARAMS: dict[str, str] = {
    "sequential": "bottleneck",
    "parallel": "bottleneck",
    "houlsby": "bottleneck",
    "lora": "rank",
    "prefix": "length",
}


def resolve_members(spec: Any, where: str) -> dict[str, dict[str, Any]]:
    """Members of a hybrid spec with every hyper-parameter resolved (defaults filled).

    ``spec`` maps member method -> hyper-parameters (single values; ``{}`` or null for the
    defaults). At least two members, each a registered method other than ``none``; errors
    name ``where`` and the member, e.g. ``search.hybrid.lora.rank: must be >= 1``.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"{where + ': ' if where else ''}expected a mapping of member method -> hyper-parameters, got {spec!r}")
    if len(spec) < 2:
        raise ValueError(f"{where + ': ' if where else ''}a hybrid merges at least two methods, got {sorted(spec) or 'none'}")
    members: dict[str, dict[str, Any]] = {}
    for name, hparams in spec.items():
        at = f"{where}.{name}" if where else str(name)
        if name in ("none", HYBRID):
            raise ValueError(f"{at}: cannot be a member of a hybrid")
        try:
            method = get_method(name)
        except ValueError as err:
            raise ValueError(f"{at}: {err}") from None
        if hparams is None:
            hparams = {}
        if not isinstance(hparams, dict):
            raise ValueError(f"{at}: expected a mapping of hyper-parameter -> value, got {hparams!r}")
        for hp, value in hparams.items():
            listed = isinstance(value, list) and value and (hp != "targets" or isinstance(value[0], list))
            if listed:
                raise ValueError(
                    f"{at}.{hp}: a hybrid member takes one value, got the list {value!r} "
                    "(list several hybrids' sizes as separate configs instead)"
                )
        members[name] = method.resolve(hparams, at)
    return members


def member_entries(members: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The members as placement entries ``{"method": name, **hparams}``."""
    return [
        {"method": name, **{k: list(v) if isinstance(v, tuple) else v for k, v in hparams.items()}}
        for name, hparams in members.items()
    ]


def count(info: BackboneInfo, members: dict[str, dict[str, Any]]) -> int:
    """PEFT parameters of the hybrid in one layer: the sum of its members'."""
    return sum(get_method(name).count(info, hparams) for name, hparams in members.items())


def short(members: dict[str, dict[str, Any]]) -> str:
    """E.g. ``sequential(b=10)+parallel(b=10)+lora(r=2)``."""
    parts = []
    for name, hparams in members.items():
        spec = get_method(name)
        sizes = [f"{spec.hparams[k].short}={_fmt(v)}" for k, v in hparams.items() if spec.hparams[k].short]
        parts.append(f"{name}({','.join(sizes)})" if sizes else name)
    return "+".join(parts)


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _with_sizes(members: dict, sizes: dict[str, int]) -> dict:
    return {name: {**hparams, **({SIZE_HPARAMS[name]: sizes[name]} if name in sizes else {})}
            for name, hparams in members.items()}


def size_steps(info: BackboneInfo, members: dict[str, dict[str, Any]], num_layers: int) -> dict[str, int]:
    """Per scalable member: how many PEFT parameters one more unit of its size adds to a
    placement with the hybrid in each of ``num_layers`` layers (counts are affine in sizes)."""
    steps = {}
    for name, hparams in members.items():
        hp = SIZE_HPARAMS.get(name)
        if hp is None:
            continue
        spec = get_method(name)
        bigger = {**hparams, hp: hparams[hp] + 1}
        steps[name] = num_layers * (spec.count(info, bigger) - spec.count(info, hparams))
    return steps


def auto_members(
    info: BackboneInfo,
    target: int,
    num_layers: int | None = None,
    base: dict[str, dict[str, Any]] | None = None,
    where: str = "search.hybrid",
) -> dict[str, dict[str, Any]]:
    """``base`` (default: the study's mix) with its members' sizes scaled so that the hybrid
    in every layer has as many PEFT parameters as possible, at most ``target``.

    The sizes keep ``base``'s proportions as far as they fit (one common scale, rounded
    down, each at least 1); the remainder is then filled one unit at a time, always for the
    member furthest below its share that still fits, until no member can grow. So the
    result never exceeds ``target`` and is within one step (:func:`size_steps`) of it.
    """
    layers = info.num_layers if num_layers is None else num_layers
    members = resolve_members(base if base is not None else STUDY_MIX, where)
    scalable = [name for name in members if name in SIZE_HPARAMS]
    if not scalable:
        raise ValueError(f"{where}: auto needs a member with a size ({sorted(SIZE_HPARAMS)}), got {sorted(members)}")
    shares = {name: float(members[name][SIZE_HPARAMS[name]]) for name in scalable}

    def total(sizes: dict[str, int]) -> int:
        return layers * count(info, _with_sizes(members, sizes))

    smallest = {name: 1 for name in scalable}
    if total(smallest) > target:
        raise ValueError(
            f"{where}: auto: the smallest hybrid ({short(_with_sizes(members, smallest))} in {layers} layers) has "
            f"{total(smallest)} PEFT parameters, more than the target {target}"
        )

    def scaled(scale: float) -> dict[str, int]:
        return {name: max(1, int(shares[name] * scale)) for name in scalable}

    low, high = 0.0, 1.0
    while total(scaled(high)) <= target:  # the counts grow without bound with the scale
        low, high = high, high * 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if total(scaled(middle)) <= target else (low, middle)
    sizes = scaled(low)
    while True:
        fits = [name for name in scalable if total({**sizes, name: sizes[name] + 1}) <= target]
        if not fits:
            break
        grow = min(fits, key=lambda name: (sizes[name] / shares[name], scalable.index(name)))
        sizes[grow] += 1
    return _with_sizes(members, sizes)
