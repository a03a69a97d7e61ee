"""AdapterBias (Fu et al. 2022): a token-dependent shift of the FFN output.

``ffn_out + v * alpha(x)``, with ``v`` a learned vector (D) and ``alpha(x) = w . x + c``
a linear score per frame computed from the FFN input ``x``. 2D + 1 parameters per layer.
``v`` starts at zero, so the layer starts as the frozen backbone.
"""
from __future__ import annotations

import torch
from torch import nn

from pefttune.methods.base import LayerMethod, MethodSpec, register_method


class AdapterBias(LayerMethod):
    def __init__(self, dim: int):
        super().__init__()
        self.vector = nn.Parameter(torch.zeros(dim))
        self.alpha = nn.Linear(dim, 1)

    def attach(self, layer: nn.Module) -> None:
        def hook(module, args, output):
            if not self.active:
                return output
            return output + self.scale(self.alpha(args[0]) * self.vector)

        self._handles.append(layer.feed_forward.register_forward_hook(hook))


register_method(
    MethodSpec(
        name="adapterbias",
        description="Token-dependent bias shift v * alpha(x) on the FFN output (AdapterBias).",
        hparams={},
        count=lambda info, hp: 2 * info.hidden_size + 1,
        build=lambda layer, info, hp: AdapterBias(info.hidden_size),
    )
)
