"""(IA)^3 (Liu et al. 2022) through the peft library's IA3 layer.

Learned vectors rescale the keys, the values (outputs of k_proj, v_proj) and the input
of the FFN's second linear (``output_dense``, a "feedforward" target in peft's terms).
Vectors start at one, so the layer starts as the frozen backbone. 2 D + I parameters per
layer with the default targets.

Merges: scaling a projection's output scales its weight's rows and its bias; scaling its
input scales the weight's columns (:meth:`IA3.fold`, used by :mod:`pefttune.merge`).

Under a DARTS gate g the output is ``base(x) + g * (ia3(x) - base(x))``.
"""
from __future__ import annotations

from peft import IA3Config
from peft.tuners.ia3 import Linear as PeftIA3Linear
from torch import nn

from pefttune.methods.base import LINEAR_SITES, HParam, MethodSpec, WrappedLinearMethod, linear_dims, register_method

ADAPTER = "default"
FEEDFORWARD = ("intermediate_dense", "output_dense")


class IA3(WrappedLinearMethod):
    def wrap(self, base: nn.Linear, target: str) -> nn.Module:
        feedforward = target in FEEDFORWARD
        config = IA3Config(target_modules=[target], feedforward_modules=[target] if feedforward else [])
        wrapped = PeftIA3Linear(base, ADAPTER, config=config, is_feedforward=feedforward)

        def before_forward(module, args):
            module._disable_adapters = not self.active

        def after_forward(module, args, output):
            if self.gate is None or not self.active:
                return output
            plain = module.base_layer(args[0])
            return plain + self.gate * (output - plain)

        self._handles.append(wrapped.register_forward_pre_hook(before_forward))
        self._handles.append(wrapped.register_forward_hook(after_forward))
        return wrapped

    def trainable_parameters(self):
        return [w.ia3_l[ADAPTER] for w in self._wrapped.values()]

    def fold(self, target, weight, bias):
        """Input scaling (feedforward targets): ``W diag(l)``; output scaling: ``diag(l) W``, ``l * b``.

        peft keeps ``l`` as (1, in_features) or (out_features, 1), so it broadcasts over W.
        """
        scale = self._wrapped[target].ia3_l[ADAPTER]
        if target in FEEDFORWARD:
            return weight * scale, bias
        return weight * scale, None if bias is None else bias * scale.flatten()


def _count(info, hp) -> int:
    # feedforward targets scale their input, the others their output
    return sum(linear_dims(info, t)[0 if t in FEEDFORWARD else 1] for t in hp["targets"])


register_method(
    MethodSpec(
        name="ia3",
        description="(IA)^3: learned rescaling of keys, values and the FFN's inner activations, via peft.",
        hparams={
            "targets": HParam(
                ("k_proj", "v_proj", "output_dense"), "Projections to rescale.", tuple, choices=tuple(LINEAR_SITES)
            ),
        },
        count=_count,
        build=lambda layer, info, hp: IA3(hp["targets"]),
        mergeable=True,
    )
)
