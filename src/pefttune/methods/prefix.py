"""Prefix tuning for speech self-attention (Li & Liang 2021), own implementation.

Each adapted layer learns P key and P value vectors (in model space, before the head
split) that every frame can attend to; padding masks never hide them. 2 * P * D
parameters per layer. peft's prefix tuning does not run on these encoders.

Prefixes change the output from the first step (attention mass moves to the prefix), so
this method is not the identity at init. Under a DARTS gate g the prefix logits get
``+ log(g)``: g = 1 is plain prefix tuning and g -> 0 removes the prefix smoothly.
"""
from __future__ import annotations

import torch
from torch import nn

from pefttune.methods.base import HParam, LayerMethod, MethodSpec, register_method


class Prefix(LayerMethod):
    def __init__(self, dim: int, length: int, init_std: float):
        super().__init__()
        self.key = nn.Parameter(torch.randn(length, dim) * init_std)
        self.value = nn.Parameter(torch.randn(length, dim) * init_std)
        self._attention: list[nn.Module] = []  # plain list: registering it would make a module cycle

    def provide(self):
        if not self.active:
            return None
        if self.gate is None:
            return self.key, self.value, None
        gate = torch.as_tensor(self.gate, dtype=self.key.dtype)
        return self.key, self.value, torch.log(gate.clamp_min(1e-12))

    def attach(self, layer: nn.Module) -> None:
        if getattr(layer.attention, "pefttune_prefix", None) is not None:
            raise ValueError("prefix: this layer already holds a prefix")
        layer.attention.pefttune_prefix = self.provide
        self._attention[:] = [layer.attention]

    def detach(self) -> None:
        for attention in self._attention:
            attention.pefttune_prefix = None
        self._attention.clear()


register_method(
    MethodSpec(
        name="prefix",
        description="Learned key/value prefixes of length P in the layer's self-attention.",
        hparams={
            "length": HParam(8, "Prefix length P (number of extra key/value positions).", int, minimum=1, short="p"),
            "init_std": HParam(0.5, "Std of the random init of prefix keys/values.", float, minimum=0.0),
        },
        count=lambda info, hp: 2 * hp["length"] * info.hidden_size,
        build=lambda layer, info, hp: Prefix(info.hidden_size, hp["length"], hp["init_std"]),
        identity_at_init=False,
    )
)
