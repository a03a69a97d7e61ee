"""LoRA (Hu et al. 2022) through the peft library's LoRA layer.

Each target projection of the layer (default q_proj and v_proj, as in the study) is
wrapped in ``peft.tuners.lora.Linear``: ``W x + (alpha / r) * B A x`` with B zero-init.
Rank 8 on q and v gives 4 * r * D parameters per layer (24,576 at hidden 768).

Merges: the update folds into the projection's weight, ``W + (alpha / r) B A``
(:meth:`LoRA.fold`, used by :mod:`pefttune.merge`).

Works on WavLM too, because pefttune's attention calls the projection modules (see
:mod:`pefttune.attention`). A DARTS gate multiplies peft's scaling for the forward pass.
"""
from __future__ import annotations

from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

from pefttune.methods.base import LINEAR_SITES, HParam, MethodSpec, WrappedLinearMethod, linear_dims, register_method

ADAPTER = "default"


class LoRA(WrappedLinearMethod):
    def __init__(self, targets: tuple[str, ...], rank: int, alpha: float, dropout: float):
        super().__init__(targets)
        self.config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets))
        self._scaling: dict[str, float] = {}  # peft's scaling per target, without a gate

    def wrap(self, base: nn.Linear, target: str) -> nn.Module:
        c = self.config
        wrapped = PeftLoraLinear(base, ADAPTER, config=c, r=c.r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout)
        base_scaling = self._scaling[target] = wrapped.scaling[ADAPTER]

        def before_forward(module, args):
            module.scaling[ADAPTER] = base_scaling if self.gate is None else base_scaling * self.gate
            module._disable_adapters = not self.active  # peft's own switch (a read-only property)

        self._handles.append(wrapped.register_forward_pre_hook(before_forward))
        return wrapped

    def trainable_parameters(self):
        return [p for w in self._wrapped.values() for p in (w.lora_A[ADAPTER].weight, w.lora_B[ADAPTER].weight)]

    def fold(self, target, weight, bias):
        """``W + s B A`` (peft's forward: ``base(x) + s B A x``); the bias is unchanged."""
        wrapped = self._wrapped[target]
        delta = wrapped.lora_B[ADAPTER].weight @ wrapped.lora_A[ADAPTER].weight
        return weight + self._scaling[target] * delta, bias


register_method(
    MethodSpec(
        name="lora",
        description="Low-rank updates B A on the layer's projections, via peft's LoRA layer.",
        hparams={
            "rank": HParam(8, "LoRA rank r.", int, minimum=1, short="r"),
            "alpha": HParam(16.0, "LoRA alpha; the update is scaled by alpha / r.", float, minimum=0.0),
            "dropout": HParam(0.0, "Dropout on the LoRA input.", float, minimum=0.0, maximum=1.0),
            "targets": HParam(("q_proj", "v_proj"), "Projections to adapt.", tuple, choices=tuple(LINEAR_SITES)),
        },
        count=lambda info, hp: sum(hp["rank"] * sum(linear_dims(info, t)) for t in hp["targets"]),
        build=lambda layer, info, hp: LoRA(hp["targets"], hp["rank"], hp["alpha"], hp["dropout"]),
        mergeable=True,
    )
)
