"""BitFit (Ben Zaken et al. 2022): tune only the biases of the layer.

Biases of q/k/v/out, both FFN linears, and both layer norms (the study's set: 8,448
parameters per layer at hidden 768). The frozen biases stay untouched: each tuned bias
is a learned delta (zero-initialised) added to the submodule's output, which is exactly
a bias update (``W x + b + d``), and lets DARTS gate the update.
"""
from __future__ import annotations

import torch
from torch import nn

from pefttune.methods.base import LayerMethod, MethodSpec, register_method

_SITES = {
    "q_proj": ("attention", "q_proj"),
    "k_proj": ("attention", "k_proj"),
    "v_proj": ("attention", "v_proj"),
    "out_proj": ("attention", "out_proj"),
    "intermediate_dense": ("feed_forward", "intermediate_dense"),
    "output_dense": ("feed_forward", "output_dense"),
    "layer_norm": (None, "layer_norm"),
    "final_layer_norm": (None, "final_layer_norm"),
}


def _site_module(layer: nn.Module, site: str) -> nn.Module:
    parent, name = _SITES[site]
    owner = layer if parent is None else getattr(layer, parent)
    module = getattr(owner, name)
    return getattr(module, "base_layer", module)  # a LoRA/IA3 wrapper keeps the original


class BitFit(LayerMethod):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.deltas = nn.ParameterDict()
        for site in _SITES:
            module = _site_module(layer, site)
            size = module.out_features if isinstance(module, nn.Linear) else module.normalized_shape[0]
            self.deltas[site] = nn.Parameter(torch.zeros(size))

    def attach(self, layer: nn.Module) -> None:
        for site in _SITES:

            def hook(module, args, output, site=site):
                return output + self.scale(self.deltas[site]) if self.active else output

            self._handles.append(_site_module(layer, site).register_forward_hook(hook))


register_method(
    MethodSpec(
        name="bitfit",
        description="Bias-only tuning of the layer's linear and layer-norm biases (BitFit).",
        hparams={},
        count=lambda info, hp: 7 * info.hidden_size + info.intermediate_size,
        build=lambda layer, info, hp: BitFit(layer),
    )
)
