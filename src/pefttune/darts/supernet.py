"""The DARTS supernet: every candidate method in every layer, mixed by alpha.

A supernet is a :class:`~pefttune.model.PeftSpeechModel` whose placement puts *all*
candidate methods in every encoder layer (a hybrid placement; a hybrid candidate's members
sit next to the single-method candidates, :func:`candidate_slots`), plus the architecture
logits ``alpha`` (L, K), column 0 being ``none``. ``alpha`` lives outside the model, so
the model's weights, ``save`` and the weight optimizer never see it. The mix happens in
:meth:`Supernet.layer_fn`, which replaces how :meth:`SpeechEncoder.run_layers` runs a
layer (pass it as ``layer_fn`` / ``Hooks.layer_fn``).

Two mixes of the K candidates of a layer, for mixing weights w = relaxation(alpha_l):

``exact`` (paper-faithful)
    Run the frozen layer K times, each time with exactly one candidate active (``none``:
    no method), and return sum_k w_k out_k. With ``fair`` (independent sigmoids) it returns
    out_none + sum_{k != none} w_k (out_k - out_none). Cost: K layer passes.
``gated`` (one pass)
    Run the layer once with every method active, each method's contribution scaled by its
    weight (``LayerMethod.gate = w_k``: adapter outputs, LoRA scaling, BitFit deltas, IA3
    interpolation, prefix logits + log w_k); ``none`` has no module, so its weight acts
    only by leaving less to the others. Cost: one layer pass plus the methods.

How they differ: the exact mix averages the *outputs* of K complete layers, each
nonlinear in its one method; the gated mix puts all methods, scaled, into *one* layer, so
their contributions interact (a sequential adapter sees the attention output already
changed by a scaled LoRA) and the layer's nonlinearities (attention softmax, GELU, layer
norms) act on their scaled sum. The two agree exactly when the weights are one-hot, and to
first order when every method's change of the layer is small (as at the start of a
search, where adapters and LoRA are zero-initialised); away from that, "w = 0.5 on LoRA"
means "half of the LoRA output plus half of the frozen output" in the exact mix but "LoRA
at half strength" in the gated one.

In both mixes a candidate whose weight is exactly 0 in the forward pass is not run (hard
Gumbel samples: only the sampled candidate is computed, as in GDAS; Gumbel in evaluation
and :meth:`Supernet.fixed_weights` are one-hot too); then a one-hot weight on candidate m
gives exactly the discrete model with m in that layer. (Softmax and sigmoid weights are
never exactly 0, so their candidates all run; a softmax that underflows to a one-hot then
gives the discrete model up to a prefix's attention weight times 1e-12, the floor of its
gate.)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from pefttune.backbones import SpeechEncoder, load_backbone
from pefttune.darts.relaxation import NONE, Relaxation, entropy, sample_gumbel
from pefttune.heads import HeadConfig
from pefttune.methods import LayerMethod, get_method
from pefttune.methods import hybrid as hybrid_spec
from pefttune.model import PeftSpeechModel
from pefttune.placement import MethodChoice, Placement

Mix = Literal["gated", "exact"]
MIXES: tuple[str, ...] = ("gated", "exact")


def candidate_choices(methods: dict[str, dict] | list) -> tuple[MethodChoice, ...]:
    """Candidates of every layer: ``none`` first, then one resolved choice per method.

    ``methods`` maps method name -> hyper-parameters (single values; a list of values is
    taken at its first entry, as a layer cannot hold one method twice), or is a list of
    names / :class:`MethodChoice`. A ``hybrid`` candidate (members merged in the layer,
    :mod:`pefttune.methods.hybrid`) adds its members to every layer of the supernet, next to
    the other candidates: its LoRA member and a LoRA candidate are two modules of the layer
    (:func:`candidate_slots`). Only a prefix cannot be held twice by one attention.
    """
    entries = list(methods.items()) if isinstance(methods, dict) else [(m, {}) for m in methods]
    choices = [MethodChoice("none", {})]
    for name, hparams in entries:
        if isinstance(name, MethodChoice):
            choice = name
        elif name == hybrid_spec.HYBRID:
            choice = MethodChoice(name, hybrid_spec.resolve_members(hparams, "darts.candidates.hybrid"))
        else:
            fixed = {}
            for key, value in (hparams or {}).items():
                many = isinstance(value, list) and value and (key != "targets" or isinstance(value[0], list))
                fixed[key] = value[0] if many else value
            choice = MethodChoice(name, get_method(name).resolve(fixed, f"darts.candidates.{name}"))
        if choice.method == "none":
            continue
        if any(c.method == choice.method for c in choices):
            raise ValueError(f"darts: method {choice.method!r} is a candidate twice")
        held = {m.method: c for c in choices for m in c.members()}
        for member in choice.members():
            if member.method in SINGLE_PER_LAYER and member.method in held:
                raise ValueError(
                    f"darts: {member.method!r} is in two candidates ({held[member.method].short()} and "
                    f"{choice.short()}); the supernet holds every candidate in every layer and a layer's attention "
                    f"holds one {member.method}, so keep it in one of them"
                )
        choices.append(choice)
    if len(choices) < 2:
        raise ValueError("darts: need at least one candidate method besides 'none'")
    return tuple(choices)


#: Methods a layer can hold only once (the attention takes one prefix).
SINGLE_PER_LAYER = frozenset({"prefix"})


def candidate_slots(candidates: tuple[MethodChoice, ...]) -> list[tuple[tuple[str, MethodChoice], ...]]:
    """Per candidate, the modules it puts into a supernet layer: (key in ``layer.pefttune``,
    choice). A method's first module is keyed by its name, as in a discrete layer; a later one
    of the same method (a hybrid member next to that method's own candidate) by
    ``<method>@<candidate>``, e.g. ``lora@hybrid``. ``none`` holds no module."""
    taken: set[str] = set()
    slots = []
    for candidate in candidates:
        own = []
        for member in (() if candidate.method == "none" else candidate.members()):
            key = member.method if member.method not in taken else f"{member.method}@{candidate.method}"
            taken.add(key)
            own.append((key, member))
        slots.append(tuple(own))
    return slots


def hybrid_placement(candidates: tuple[MethodChoice, ...], num_layers: int) -> Placement:
    """Every candidate's first module of each method, in every layer (the rest of a supernet
    layer, see :func:`candidate_slots`, is attached by :func:`build_supernet`)."""
    layer = [choice.to_dict() for slots in candidate_slots(candidates) for key, choice in slots
             if key == choice.method]
    return Placement.from_dict({"num_layers": num_layers, "layers": [layer] * num_layers})


def attach_second_modules(model: PeftSpeechModel, candidates: tuple[MethodChoice, ...]) -> None:
    """Attach the modules of :func:`candidate_slots` that repeat a method of the layer
    (nested wrappers on a projection, a second adapter hook, a second bias delta)."""
    extra = [(key, choice) for slots in candidate_slots(candidates) for key, choice in slots if key != choice.method]
    if not extra:
        return
    info = model.encoder.info
    for index, layer in enumerate(model.encoder.layers):
        for key, choice in extra:
            method = get_method(choice.method).build(layer, info, choice.hparams)
            method.attach(layer)
            layer.pefttune[key] = method
            model.methods[index].append(method)
    for param in model.encoder.model.parameters():  # a wrapper may have frozen what it wrapped
        param.requires_grad_(False)
    for methods in model.methods:
        for method in methods:
            for param in method.trainable_parameters():
                param.requires_grad_(True)


@dataclass
class Supernet:
    """A model holding all candidates in every layer, and the architecture logits ``alpha``."""

    model: PeftSpeechModel
    candidates: tuple[MethodChoice, ...]
    alpha: nn.Parameter  # (L, K), column NONE is 'none'
    relaxation: Relaxation = field(default_factory=Relaxation)
    mix: Mix = "gated"
    cache: object | None = field(default=None, repr=False)  # a FrozenStateCache for the frozen front end
    _noise: torch.Tensor | None = field(default=None, repr=False)
    _fixed: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.mix not in MIXES:
            raise ValueError(f"darts.mix: unknown {self.mix!r}; expected one of {MIXES}")
        if self.candidates[NONE].method != "none":
            raise ValueError("darts: candidate 0 must be 'none'")
        shape = (self.model.encoder.num_layers, len(self.candidates))
        if tuple(self.alpha.shape) != shape:
            raise ValueError(f"darts: alpha has shape {tuple(self.alpha.shape)}, expected {shape}")
        # per layer: the attached LayerMethod of candidate k (None for 'none'; a hybrid: its members, gated as one)
        self._modules: list[list[LayerMethod | _Members | None]] = []
        slots = candidate_slots(self.candidates)
        for layer in self.model.encoder.layers:
            self._modules.append([
                None if not own else layer.pefttune[own[0][0]] if len(own) == 1
                else _Members([layer.pefttune[key] for key, _ in own]) for own in slots
            ])

    def candidate_modules(self, index: int, k: int) -> list[LayerMethod]:
        """The modules candidate ``k`` holds in layer ``index`` (a hybrid: its members, in order)."""
        module = self._modules[index][k]
        return [] if module is None else list(module.members) if isinstance(module, _Members) else [module]

    def layer_modules(self, index: int, layer: tuple[MethodChoice, ...]) -> list[LayerMethod]:
        """The supernet modules behind a discrete layer's methods, one per method in order: the
        layer is one candidate, or several (Fair DARTS keeps every candidate over its
        threshold), each a single method or a hybrid's run of members."""
        held = [c.members() if c.method != "none" else () for c in self.candidates]
        if layer in held:
            return self.candidate_modules(index, held.index(layer))
        modules, at = [], 0
        while at < len(layer):
            k = next((k for k in sorted(range(1, len(held)), key=lambda k: -len(held[k]))
                      if held[k] == layer[at:at + len(held[k])]), None)
            if k is None:
                raise ValueError(f"darts: {layer[at].short()} in layer {index} is not a candidate")
            modules += self.candidate_modules(index, k)
            at += len(held[k])
        return modules

    # -- structure ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [c.method for c in self.candidates]

    @property
    def num_layers(self) -> int:
        return self.alpha.shape[0]

    def candidate_parameters(self) -> torch.Tensor:
        """(K,) trainable parameters each candidate adds to one layer."""
        info = self.model.encoder.info
        return torch.tensor([float(c.count(info)) for c in self.candidates])

    # -- the mixed layer ---------------------------------------------------------------------
    def to(self, device) -> "Supernet":
        """Move the model and alpha (the same Parameter object, so optimizers stay valid)."""
        self.model.to(device)
        self.alpha.data = self.alpha.data.to(device)
        return self

    def layer_weights(self, index: int, detach: bool = False) -> torch.Tensor:
        """Mixing weights (K,) of layer ``index`` for one forward pass (fresh Gumbel noise);
        ``detach``: constants for autograd (the weight step needs no gradient for alpha)."""
        if self._fixed is not None:
            return self._fixed[index]
        noise = None if self._noise is None else self._noise[index]
        alpha = self.alpha[index].detach() if detach else self.alpha[index]
        return self.relaxation.weights(alpha, self.model.training, noise)

    @contextlib.contextmanager
    def frozen_noise(self):
        """Reuse one Gumbel sample for every forward inside (the unrolled step's passes)."""
        if self.relaxation.kind == "gumbel":
            self._noise = sample_gumbel(self.alpha.shape, self.alpha.device, self.alpha.dtype)
        try:
            yield
        finally:
            self._noise = None

    @contextlib.contextmanager
    def fixed_weights(self, weights: torch.Tensor):
        """Mix with these (L, K) weights instead of the relaxation's (e.g. the one-hot of a
        derived placement: then the supernet computes exactly that discrete model). Fixed
        weights always mix as convex weights (sum_k w_k out_k), whatever the relaxation."""
        self._fixed = weights.to(self.alpha.device, self.alpha.dtype)
        try:
            yield
        finally:
            self._fixed = None

    def one_hot(self, placement: Placement) -> torch.Tensor:
        """(L, K) one-hot weights of a placement with at most one candidate per layer."""
        weights = torch.zeros(self.alpha.shape)
        held = [c.members() if c.method != "none" else () for c in self.candidates]  # a hybrid: its members
        for index, layer in enumerate(placement.layers):
            if layer not in held:
                if len(layer) > 1:
                    raise ValueError(f"darts: layer {index} of the placement holds {len(layer)} methods "
                                     "that are not one hybrid candidate")
                raise ValueError(f"darts: {layer[0].short()} in layer {index} is not a candidate")
            weights[index, held.index(layer)] = 1.0
        return weights

    def layer_fn(self, index: int, hidden: torch.Tensor, mask: torch.Tensor, bias) -> torch.Tensor:
        """Run encoder layer ``index`` as the mix of its candidates (``Hooks.layer_fn``)."""
        return self._mixed_layer(index, hidden, mask, bias, detach=False)

    def weight_step_layer_fn(self, index: int, hidden: torch.Tensor, mask: torch.Tensor, bias) -> torch.Tensor:
        """:meth:`layer_fn` with the mixing weights as constants: the same forward values and
        the same weight gradients, without the backward work for alpha's gradient (a mul and
        a full-size reduction per gated contribution), which the weight step would discard."""
        return self._mixed_layer(index, hidden, mask, bias, detach=True)

    def _mixed_layer(self, index, hidden, mask, bias, detach: bool) -> torch.Tensor:
        weights = self.layer_weights(index, detach)
        zero = self._zero_weights(weights)
        if self.mix == "gated":
            return self._gated(index, weights, zero, hidden, mask, bias)
        return self._exact(index, weights, zero, hidden, mask, bias)

    def _zero_weights(self, weights: torch.Tensor) -> list[bool]:
        """Which candidates have weight exactly 0 (not run). Only fixed weights and Gumbel
        (hard samples, or the argmax in evaluation) produce exact zeros; softmax and sigmoid
        weights are positive, so they skip the check (a device sync per layer on GPU)."""
        relaxation = self.relaxation
        one_hot = relaxation.kind == "gumbel" and (relaxation.hard or not self.model.training)
        if self._fixed is None and not one_hot:
            return [False] * weights.shape[0]
        return (weights.detach() == 0).tolist()

    def _gated(self, index, weights, zero, hidden, mask, bias) -> torch.Tensor:
        modules = self._modules[index]
        try:
            for k, module in enumerate(modules):
                if module is not None:
                    module.active = not zero[k]
                    module.gate = weights[k]
            return self.model.encoder.run_layer(index, hidden, mask, bias)
        finally:
            _reset(modules)

    def _exact(self, index, weights, zero, hidden, mask, bias) -> torch.Tensor:
        modules = self._modules[index]
        encoder = self.model.encoder

        def run_only(k: int) -> torch.Tensor:
            for j, module in enumerate(modules):
                if module is not None:
                    module.active = j == k
            return encoder.run_layer(index, hidden, mask, bias)

        try:
            if self.relaxation.additive and self._fixed is None:
                base = run_only(NONE)
                out = base
                for k in range(len(modules)):
                    if k != NONE and not zero[k]:
                        out = out + weights[k] * (run_only(k) - base)
                return out
            out = None
            for k in range(len(modules)):
                if zero[k]:
                    continue
                term = weights[k] * run_only(k)
                out = term if out is None else out + term
            return out
        finally:
            _reset(modules)

    # -- architecture summaries ----------------------------------------------------------------
    def probabilities(self) -> torch.Tensor:
        """(L, K) candidate preferences (detached, CPU); see :meth:`Relaxation.probabilities`."""
        with torch.no_grad():
            return self.relaxation.probabilities(self.alpha.detach()).cpu()

    def expected_parameters(self) -> torch.Tensor:
        """Expected trainable PEFT parameters under the relaxation (differentiable in alpha).

        Softmax/Gumbel: sum_l sum_k p_lk count_k; Fair: sum_l sum_k sigmoid(alpha_lk) count_k.
        """
        probs = self.relaxation.probabilities(self.alpha)
        counts = self.candidate_parameters().to(probs)
        counts[NONE] = 0.0
        return (probs * counts).sum()

    def budget_penalty(self, budget: int | None) -> torch.Tensor:
        """Hinge on the expected parameters over the budget, relative: relu(E - B) / max(B, 1)."""
        if budget is None:
            return self.alpha.new_zeros(())
        return torch.relu(self.expected_parameters() - budget) / max(float(budget), 1.0)

    def metrics(self) -> dict[str, float]:
        """Flat report: ``alpha/L03/lora`` (probabilities), entropies, none share, argmax."""
        probs = self.probabilities()
        ent = entropy(probs)
        normalised = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
        out: dict[str, float] = {}
        for layer in range(self.num_layers):
            for k, name in enumerate(self.names):
                out[f"alpha/L{layer:02d}/{name}"] = float(probs[layer, k])
            out[f"entropy/L{layer:02d}"] = float(ent[layer])
        argmax = probs.argmax(-1)
        out["entropy_mean"] = float(ent.mean())
        out["entropy_max"] = float(torch.log(torch.tensor(float(len(self.names)))))
        out["none_share"] = float(normalised[:, NONE].mean())
        out["none_argmax_layers"] = int((argmax == NONE).sum())
        out["expected_params"] = float(self.expected_parameters().detach())
        out["temperature"] = float(self.relaxation.temperature)
        return out

    def clear(self) -> None:
        """Every method active with gate 1 (the model is then the plain hybrid)."""
        for modules in self._modules:
            _reset(modules)


class _Members:
    """A hybrid candidate's member modules, switched and gated together as one candidate."""

    def __init__(self, members: list[LayerMethod]):
        self.members = members

    def __setattr__(self, name, value):
        if name in ("active", "gate"):
            for member in self.members:
                setattr(member, name, value)
        else:
            object.__setattr__(self, name, value)


def _reset(modules: list[LayerMethod | None]) -> None:
    for module in modules:
        if module is not None:
            module.active = True
            module.gate = None


def build_supernet(
    backbone: str | SpeechEncoder,
    candidates: tuple[MethodChoice, ...] | dict | list,
    head: HeadConfig,
    *,
    mix: Mix = "gated",
    relaxation: Relaxation | None = None,
) -> Supernet:
    """A fresh supernet: all candidates in every layer of a frozen backbone, alpha = 0 (equal)."""
    candidates = candidate_choices(list(candidates) if isinstance(candidates, tuple) else candidates)
    encoder = backbone if isinstance(backbone, SpeechEncoder) else load_backbone(backbone)
    placement = hybrid_placement(candidates, encoder.num_layers)
    try:
        model = PeftSpeechModel(encoder, placement, head)
        attach_second_modules(model, candidates)
    except ValueError as err:
        raise ValueError(f"darts: the candidates {[c.method for c in candidates]} cannot share one layer: {err}") from None
    device = next(model.head.parameters()).device
    alpha = nn.Parameter(torch.zeros(encoder.num_layers, len(candidates), device=device))
    return Supernet(model, candidates, alpha, relaxation or Relaxation(), mix)
