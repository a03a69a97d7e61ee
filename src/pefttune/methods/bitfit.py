"""BitFit (Ben Zaken et al. 2022): tune only the biases of the layer.

Biases of q/k/v/out, both FFN linears, and both layer norms (the study's set: 8,448
parameters per layer at hidden 768). The frozen biases stay untouched: each tuned bias
is a learned delta (zero-initialised) that the submodule uses in place of its bias,
``W x + (b + d)``, so DARTS can gate the update (``b + g d``). Folding the delta into
the bias vector costs nothing per frame, where adding it to the output would cost a
full-size add (and, when gated, a full-size reduction in backward) at each of 8 sites.
Merges: :func:`effective_bias` is the bias a submodule runs with, which :mod:`pefttune.merge`
writes into the plain backbone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pefttune.methods.base import LayerMethod, MethodSpec, frozen_linear, register_method

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
    return frozen_linear(module)  # LoRA/IA3 wrappers keep the original inside


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
            self._handles.append(_BiasOverride(_site_module(layer, site), self, site))

    def bias(self, site: str, frozen: torch.Tensor | None) -> torch.Tensor | None:
        """The bias the submodule at ``site`` uses in this forward pass."""
        if not self.active:
            return frozen
        delta = self.scale(self.deltas[site])
        return delta if frozen is None else frozen + delta


def effective_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias ``module`` (a frozen Linear or LayerNorm) runs with: its own, passed through
    every BitFit method attached to it (its own bias when none is)."""
    value = module.bias
    for owner, site in vars(module).get("_pefttune_bias_chain", ()):
        value = owner.bias(site, value)
    return value


class _BiasOverride:
    """Makes ``module`` (a Linear or LayerNorm) run with its bias passed through every BitFit
    method attached to it (``method.bias(site, b)`` in turn: one in a plain layer, two when
    the DARTS supernet holds a BitFit candidate next to a hybrid's BitFit member), through an
    instance-level ``forward``; ``remove()`` takes this method out and restores the class's
    forward when none is left."""

    def __init__(self, module: nn.Module, method: BitFit, site: str):
        self.module, self.entry = module, (method, site)
        chain = vars(module).get("_pefttune_bias_chain")
        if chain is not None:
            chain.append(self.entry)
            return
        if "forward" in vars(module):
            raise RuntimeError(f"bitfit: {site} already has its forward replaced")
        chain = module._pefttune_bias_chain = [self.entry]

        if isinstance(module, nn.Linear):

            def forward(x):
                return F.linear(x, module.weight, effective_bias(module))

        elif isinstance(module, nn.LayerNorm):

            def forward(x):
                return F.layer_norm(x, module.normalized_shape, module.weight, effective_bias(module), module.eps)

        else:
            raise TypeError(f"bitfit: {site} is a {type(module).__name__}, expected Linear or LayerNorm")
        module.forward = forward

    def remove(self) -> None:
        chain = vars(self.module).get("_pefttune_bias_chain", [])
        if self.entry in chain:
            chain.remove(self.entry)
        if not chain:
            vars(self.module).pop("forward", None)
            vars(self.module).pop("_pefttune_bias_chain", None)


register_method(
    MethodSpec(
        name="bitfit",
        description="Bias-only tuning of the layer's linear and layer-norm biases (BitFit).",
        hparams={},
        count=lambda info, hp: 7 * info.hidden_size + info.intermediate_size,
        build=lambda layer, info, hp: BitFit(layer),
        mergeable=True,
    )
)
