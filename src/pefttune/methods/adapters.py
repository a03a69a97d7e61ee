"""Bottleneck adapters: sequential (Houlsby et al. 2019) and parallel (He et al. 2022).

- ``houlsby``: a sequential adapter ``h + up(act(down(h)))`` on the output of the
  attention block *and* of the feed-forward block, before each residual add.
- ``sequential``: the same adapter on the feed-forward output only. This is the study's
  "sequential adapter" (bottleneck 32 -> 49,952 parameters per layer at hidden 768).
- ``parallel``: ``s * up(act(down(x)))`` added to the feed-forward output, where ``x`` is
  the *layer input* by default (the study's code) or the feed-forward input
  (``source="ffn"``, He et al.'s parallel-FFN variant).

Up-projections are zero-initialised, so every adapter starts as the identity.
"""
from __future__ import annotations

import torch
from torch import nn

from pefttune.methods.base import (
    Bottleneck,
    HParam,
    LayerMethod,
    MethodSpec,
    bottleneck_params,
    first,
    register_method,
    replace_output,
)

_BOTTLENECK = HParam(32, "Bottleneck (hidden) size of the adapter.", int, minimum=1, short="b")
_ACTIVATION = HParam("relu", "Nonlinearity between down- and up-projection.", str, choices=("relu", "gelu", "tanh"))


class SequentialAdapter(LayerMethod):
    def __init__(self, dim: int, bottleneck: int, activation: str, sites: tuple[str, ...]):
        super().__init__()
        self.sites = sites
        self.adapters = nn.ModuleDict({site: Bottleneck(dim, bottleneck, activation) for site in sites})

    def _hook(self, site: str):
        def hook(module, args, output):
            if not self.active:
                return output
            h = first(output)
            return replace_output(output, h + self.adapters[site](h, self.gate))

        return hook

    def attach(self, layer: nn.Module) -> None:
        targets = {"attention": layer.attention, "feed_forward": layer.feed_forward}
        for site in self.sites:
            self._handles.append(targets[site].register_forward_hook(self._hook(site)))


class ParallelAdapter(LayerMethod):
    def __init__(self, dim: int, bottleneck: int, activation: str, scale: float, source: str):
        super().__init__()
        self.adapter = Bottleneck(dim, bottleneck, activation)
        self.scaling = scale
        self.source = source
        self._layer_input: torch.Tensor | None = None

    def attach(self, layer: nn.Module) -> None:
        if self.source == "layer":

            def capture(module, args, kwargs):
                self._layer_input = args[0] if args else kwargs["hidden_states"]

            self._handles.append(layer.register_forward_pre_hook(capture, with_kwargs=True))

        def add(module, args, output):
            if not self.active:
                return output
            x = self._layer_input if self.source == "layer" else args[0]
            scale = self.scaling if self.gate is None else self.scaling * self.gate
            return output + self.adapter(x, None if isinstance(scale, float) and scale == 1.0 else scale)

        self._handles.append(layer.feed_forward.register_forward_hook(add))


register_method(
    MethodSpec(
        name="houlsby",
        description="Sequential bottleneck adapters after the attention block and after the FFN (Houlsby et al.).",
        hparams={"bottleneck": _BOTTLENECK, "activation": _ACTIVATION},
        count=lambda info, hp: 2 * bottleneck_params(info.hidden_size, hp["bottleneck"]),
        build=lambda layer, info, hp: SequentialAdapter(
            info.hidden_size, hp["bottleneck"], hp["activation"], ("attention", "feed_forward")
        ),
    )
)

register_method(
    MethodSpec(
        name="sequential",
        description="One sequential bottleneck adapter on the FFN output, before the final layer norm (the study's).",
        hparams={"bottleneck": _BOTTLENECK, "activation": _ACTIVATION},
        count=lambda info, hp: bottleneck_params(info.hidden_size, hp["bottleneck"]),
        build=lambda layer, info, hp: SequentialAdapter(
            info.hidden_size, hp["bottleneck"], hp["activation"], ("feed_forward",)
        ),
    )
)

register_method(
    MethodSpec(
        name="parallel",
        description="Parallel bottleneck adapter added (scaled) to the FFN output; input = layer input by default.",
        hparams={
            "bottleneck": _BOTTLENECK,
            "activation": _ACTIVATION,
            "scale": HParam(1.0, "Multiplier s on the adapter output (He et al. use 4 for FFN).", float, minimum=0.0, short="s"),
            "source": HParam("layer", "Adapter input: the layer input (study) or the FFN input.", str, choices=("layer", "ffn")),
        },
        count=lambda info, hp: bottleneck_params(info.hidden_size, hp["bottleneck"]),
        build=lambda layer, info, hp: ParallelAdapter(
            info.hidden_size, hp["bottleneck"], hp["activation"], hp["scale"], hp["source"]
        ),
    )
)
