"""From architecture weights to a discrete placement.

- :func:`derive_placement`: the argmax candidate of every layer (``none`` allowed), or,
  with a budget, the most probable placement whose PEFT parameters fit: the one that
  maximises sum_l log p_l(choice_l) subject to sum_l count(choice_l) <= budget, solved
  exactly by dynamic programming over the Pareto front of (parameters, log-probability).
  ``none`` costs nothing, so a feasible placement always exists.
- :func:`inherit_weights`: a discrete model built on a fresh backbone that takes the
  supernet's trained weights of the chosen candidates (and its head); used to check that
  one-hot mixes are the discrete model, and to score a derived placement without
  retraining.
"""
from __future__ import annotations

import math

import torch

from pefttune.backbones import SpeechEncoder, load_backbone
from pefttune.darts.supernet import Supernet
from pefttune.model import PeftSpeechModel, build_model
from pefttune.placement import MethodChoice, Placement


def _placement(choices: list[MethodChoice]) -> Placement:
    return Placement.from_dict(
        {"num_layers": len(choices), "layers": [[] if c.method == "none" else [c.to_dict()] for c in choices]}
    )


def argmax_choices(probabilities: torch.Tensor) -> list[int]:
    return [int(i) for i in probabilities.argmax(-1)]


def budgeted_choices(probabilities: torch.Tensor, counts: list[int], budget: int) -> list[int]:
    """Per layer the candidate index maximising total log-probability with sum of counts <= budget."""
    logp = torch.log(probabilities.double().clamp_min(1e-300)).tolist()
    # front: list of (cost, score, choices), sorted by cost, score strictly increasing
    front: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for layer_logp in logp:
        expanded = [
            (cost + counts[k], score + layer_logp[k], picks + (k,))
            for cost, score, picks in front
            for k in range(len(counts))
            if cost + counts[k] <= budget
        ]
        expanded.sort(key=lambda item: (item[0], -item[1]))
        front = []
        for item in expanded:
            if not front or item[1] > front[-1][1]:
                front.append(item)
    best = max(front, key=lambda item: (item[1], -item[0]))
    return list(best[2])


def derive_placement(supernet: Supernet, budget: int | None = None) -> Placement:
    """Argmax per layer; with ``budget``, the most probable placement that fits it."""
    probs = supernet.probabilities()
    picks = argmax_choices(probs)
    counts = [int(c) for c in supernet.candidate_parameters().tolist()]
    if budget is not None and sum(counts[k] for k in picks) > budget:
        picks = budgeted_choices(probs, counts, budget)
    return _placement([supernet.candidates[k] for k in picks])


def derivation_report(supernet: Supernet, placement: Placement) -> dict:
    """How confident the derivation is: log-probability of the placement, vs the argmax one."""
    probs = supernet.probabilities()
    names = supernet.names
    picks = [names.index(layer[0].method) if layer else names.index("none") for layer in placement.layers]
    logp = sum(math.log(max(float(probs[i, k]), 1e-300)) for i, k in enumerate(picks))
    best = sum(math.log(max(float(p), 1e-300)) for p in probs.max(-1).values)
    return {
        "derived_log_prob": logp,
        "argmax_log_prob": best,
        "derived_is_argmax": picks == argmax_choices(probs),
        "derived_params": placement.trainable_parameters(supernet.model.encoder.info),
    }


def inherit_weights(
    supernet: Supernet, placement: Placement, backbone: str | SpeechEncoder | None = None
) -> PeftSpeechModel:
    """The discrete model of ``placement`` on a fresh backbone, with the supernet's weights.

    Each layer's methods take the weights of the supernet modules of the candidates the layer
    holds (a hybrid: its members, in order; :meth:`Supernet.layer_modules`), the head takes
    the supernet's head.
    """
    source = supernet.model
    encoder = backbone if isinstance(backbone, SpeechEncoder) else load_backbone(backbone or source.encoder.name)
    model = build_model(encoder, placement, source.head_config)
    pairs = []
    for index, layer in enumerate(placement.layers):
        for own, theirs in zip(model.methods[index], supernet.layer_modules(index, layer), strict=True):
            pairs += zip(own.trainable_parameters(), theirs.trainable_parameters(), strict=True)
    pairs += zip(model.head.parameters(), source.head.parameters(), strict=True)
    pairs += zip(model.head.buffers(), source.head.buffers(), strict=True)  # PooledNorm's statistics
    with torch.no_grad():
        for param, weights in pairs:
            if param.shape != weights.shape:
                raise ValueError(f"inherit_weights: a tensor has shape {tuple(weights.shape)} in the supernet, "
                                 f"{tuple(param.shape)} in the placement")
            param.copy_(weights)
    return model.to(next(source.parameters()).device)
