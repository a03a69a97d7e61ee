"""Continuous relaxations of the per-layer choice among K candidate methods.

Architecture weights ``alpha`` are one logit vector per encoder layer, shape (L, K),
column :data:`NONE` (0) being the parameter-free ``none`` candidate. A
:class:`Relaxation` turns one layer's logits into *mixing weights* (what the mixed layer
multiplies candidates by, see :mod:`pefttune.darts.supernet`) and the whole matrix into
*probabilities* (what is reported, derived from and penalised).

- ``softmax`` (DARTS): weights = softmax(alpha / T); probabilities = the same.
- ``gumbel`` (GDAS): in training, weights = softmax((alpha + g) / T) with Gumbel noise g
  and T annealed exponentially from ``temperature`` to ``final_temperature`` over the
  search epochs; ``hard`` replaces them by the one-hot argmax in the forward pass with the
  soft weights' gradient (straight-through). In evaluation the weights are the one-hot
  argmax of alpha (the architecture that would be derived now). Probabilities are
  softmax(alpha), the distribution the Gumbel-max trick samples from.
- ``fair`` (Fair-DARTS): independent sigmoids, weight_k = sigmoid(alpha_k) for every
  method k != none; the mix adds each method's change of the layer output scaled by its
  own sigmoid (no competition between candidates). The ``none`` logit takes no part (its
  weight is reported as prod_k (1 - sigmoid(alpha_k)), the chance that no method is on
  under independent gates). :meth:`Relaxation.regularizer` is the zero-one loss
  -mean((sigmoid - 1/2)^2), which pushes every sigmoid to 0 or 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

#: Column of ``alpha`` that holds the ``none`` candidate.
NONE = 0

Kind = Literal["softmax", "gumbel", "fair"]
KINDS: tuple[str, ...] = ("softmax", "gumbel", "fair")


@dataclass
class Relaxation:
    """How logits become mixing weights; ``temperature`` is the current one (gumbel anneals it)."""

    kind: Kind = "softmax"
    temperature: float = 1.0
    final_temperature: float = 0.1  # gumbel only
    hard: bool = False  # gumbel only: straight-through one-hot
    zero_one: float = 10.0  # fair only: weight of the zero-one loss

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"darts.relaxation: unknown {self.kind!r}; expected one of {KINDS}")
        if not (self.temperature > 0 and self.final_temperature > 0):
            raise ValueError("darts.temperature and darts.final_temperature must be > 0")
        if self.hard and self.kind != "gumbel":
            raise ValueError("darts.hard: straight-through one-hot weights need relaxation 'gumbel'")
        self.start_temperature = self.temperature

    @property
    def additive(self) -> bool:
        """True for ``fair``: methods add their deltas independently (weights need not sum to 1)."""
        return self.kind == "fair"

    # -- schedule -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int, total_epochs: int) -> float:
        """Gumbel: exponential schedule T_e = T_0 (T_end / T_0)^((e - 1) / (E - 1)), 1-based epochs."""
        if self.kind == "gumbel":
            progress = 0.0 if total_epochs <= 1 else min(1.0, max(0.0, (epoch - 1) / (total_epochs - 1)))
            ratio = self.final_temperature / self.start_temperature
            self.temperature = self.start_temperature * math.exp(progress * math.log(ratio))
        return self.temperature

    # -- weights --------------------------------------------------------------------------------
    def weights(self, logits: torch.Tensor, training: bool, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Mixing weights for logits of shape (..., K); differentiable in ``logits``.

        ``noise`` (gumbel, training only): Gumbel samples of the same shape to use instead
        of fresh ones (the second-order step needs the same sample in all its passes).
        """
        if self.kind == "softmax":
            return torch.softmax(logits / self.temperature, dim=-1)
        if self.kind == "fair":
            weights = torch.sigmoid(logits)
            keep = torch.ones_like(weights)
            keep[..., NONE] = 0.0
            return weights * keep
        # gumbel
        if not training:
            return _one_hot_argmax(logits)
        if noise is None:
            noise = sample_gumbel(logits.shape, logits.device, logits.dtype)
        soft = torch.softmax((logits + noise) / self.temperature, dim=-1)
        if not self.hard:
            return soft
        return _one_hot_argmax(soft) - soft.detach() + soft

    def probabilities(self, alpha: torch.Tensor) -> torch.Tensor:
        """(L, K) per-layer preference for each candidate: reported, derived from, penalised.

        Softmax rows sum to 1; ``fair`` rows hold the sigmoids, with prod(1 - sigmoid) for none.
        """
        if self.kind == "softmax":
            return torch.softmax(alpha / self.temperature, dim=-1)
        if self.kind == "gumbel":
            return torch.softmax(alpha, dim=-1)
        sig = torch.sigmoid(alpha)
        methods = torch.cat([sig[..., :NONE], sig[..., NONE + 1 :]], dim=-1)
        none = torch.prod(1.0 - methods, dim=-1, keepdim=True)
        return torch.cat([sig[..., :NONE], none, sig[..., NONE + 1 :]], dim=-1)

    def regularizer(self, alpha: torch.Tensor) -> torch.Tensor:
        """Fair-DARTS zero-one loss (times ``zero_one``) over the method sigmoids; 0 otherwise."""
        if self.kind != "fair" or not self.zero_one:
            return alpha.new_zeros(())
        sig = torch.sigmoid(torch.cat([alpha[..., :NONE], alpha[..., NONE + 1 :]], dim=-1))
        return -self.zero_one * torch.mean((sig - 0.5) ** 2)


def sample_gumbel(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    uniform = torch.rand(shape, device=device, dtype=dtype).clamp(1e-10, 1.0 - 1e-7)
    return -torch.log(-torch.log(uniform))


def _one_hot_argmax(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).to(x.dtype)


def entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Per-row entropy (nats) of the rows normalised to sum 1."""
    p = probabilities / probabilities.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
