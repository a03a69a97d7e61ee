"""One self-attention forward for wav2vec 2.0, HuBERT and WavLM layers.

transformers' WavLM attention passes the raw projection weights to
``F.multi_head_attention_forward``, so a wrapped ``q_proj`` (LoRA, IA3) is never called
and gets no gradient. :func:`install` replaces each layer's attention ``forward`` with
:func:`attention_forward`, which

- calls the ``q_proj``/``k_proj``/``v_proj``/``out_proj`` *modules* (wrappers run),
- prepends learned key/value prefixes from the layer's prefix provider (prefix tuning),
- keeps WavLM's gated relative position bias,
- takes a boolean (B, T) frame mask (True = valid frame) as ``attention_mask``.

With no PEFT method it reproduces transformers' outputs (tested against
``model(...).last_hidden_state`` for every family).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, length, dim = x.shape
    return x.view(batch, length, num_heads, dim // num_heads).transpose(1, 2)


def attention_core(
    attn: nn.Module,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head self-attention through the projection modules.

    hidden: (B, T, D); mask: (B, T) bool, True = valid key, or None when every frame is
    valid (:meth:`~pefttune.backbones.SpeechEncoder.run_layers` decides once per forward);
    bias: (B, H, T, T) additive.
    A prefix provider at ``attn.pefttune_prefix`` (a callable returning None or
    (key (P, D), value (P, D), logit shift or None)) adds P always-visible key/value
    positions.
    """
    batch, length, _ = hidden.shape
    heads = attn.num_heads
    q = _split_heads(attn.q_proj(hidden), heads)
    k = _split_heads(attn.k_proj(hidden), heads)
    v = _split_heads(attn.v_proj(hidden), heads)
    prefix_len, prefix_logit = 0, None
    provider = getattr(attn, "pefttune_prefix", None)
    prefix = provider() if provider is not None else None
    if prefix is not None:
        pk, pv, prefix_logit = prefix
        prefix_len = pk.shape[0]
        k = torch.cat([_split_heads(pk.expand(batch, -1, -1), heads), k], dim=2)
        v = torch.cat([_split_heads(pv.expand(batch, -1, -1), heads), v], dim=2)
    attn_mask = None
    if mask is not None:
        keys = mask
        if prefix_len:
            keys = torch.cat([mask.new_ones(batch, prefix_len), mask], dim=1)
        attn_mask = torch.zeros(batch, 1, 1, keys.shape[1], dtype=q.dtype, device=q.device)
        attn_mask = attn_mask.masked_fill(~keys[:, None, None, :], torch.finfo(q.dtype).min)
    if bias is not None:
        if prefix_len:
            bias = F.pad(bias, (prefix_len, 0))
        attn_mask = bias if attn_mask is None else attn_mask + bias
    if prefix_logit is not None:
        # DARTS gate on the prefix: + log(g) on the prefix logits.
        shift = torch.cat([prefix_logit.expand(prefix_len), q.new_zeros(length)]).view(1, 1, 1, -1)
        attn_mask = shift if attn_mask is None else attn_mask + shift
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=attn.head_dim**-0.5)
    out = out.transpose(1, 2).reshape(batch, length, -1)
    return attn.out_proj(out)


def _wav2vec2_forward(self, hidden_states, attention_mask=None, **kwargs):
    return attention_core(self, hidden_states, attention_mask), None


def _wavlm_forward(self, hidden_states, attention_mask=None, position_bias=None, index=0, **kwargs):
    batch, length, _ = hidden_states.shape
    if position_bias is None:
        position_bias = self.compute_bias(length, length)
        position_bias = position_bias.unsqueeze(0).repeat(batch, 1, 1, 1).view(batch * self.num_heads, length, length)
    # WavLM's gate on the relative position bias, computed from the layer input (as in transformers).
    gated = hidden_states.view(hidden_states.shape[:-1] + (self.num_heads, -1)).permute(0, 2, 1, 3)
    proj = self.gru_rel_pos_linear(gated).view(gated.shape[:-1] + (2, 4)).sum(-1)
    gate_a, gate_b = torch.sigmoid(proj).chunk(2, dim=-1)
    gate = gate_a * (gate_b * self.gru_rel_pos_const - 1.0) + 2.0
    gated_bias = (gate.view(batch * self.num_heads, -1, 1) * position_bias).view(batch, self.num_heads, length, length)
    out = attention_core(self, hidden_states, attention_mask, bias=gated_bias)
    return out, None, position_bias


def install(encoder) -> None:
    """Route every layer's attention of a :class:`~pefttune.backbones.SpeechEncoder` here."""
    forward = _wavlm_forward if encoder.family == "wavlm" else _wav2vec2_forward
    for layer in encoder.layers:
        attn = layer.attention
        if not hasattr(attn, "head_dim"):
            attn.head_dim = attn.embed_dim // attn.num_heads
        attn.forward = types.MethodType(forward, attn)
