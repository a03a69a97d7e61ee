"""Several placements on one frozen backbone: its weights held once, its frozen part run once.

An ensemble's members differ only in their PEFT modules and heads. :func:`share_encoder`
gives each member a *view* of one frozen encoder: its own module objects (so a placement can
wrap the view's projections and hook its layers) around the very same parameter and buffer
tensors, so K members hold one backbone's weights plus their own PEFT and head weights.
:class:`SharedBackboneEnsemble` runs what no member adapts (the CNN front end, the
positional convolution and the layers below the lowest adapted layer of any member) once per
batch on the plain encoder, then each member's layers from there and its head:

    encoder = load_backbone("tiny-hubert-ssl")
    members = [build_model(share_encoder(encoder), placement, head) for placement in placements]
    ensemble = SharedBackboneEnsemble(encoder, members)
    outputs, mask = ensemble(input_values, attention_mask)  # one (B, C) or (B, T, V) output per member

Each member computes what it computes alone: the layers below the shared start hold no PEFT
module in any member, so their outputs are the plain encoder's.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from pefttune.backbones import LogMelEncoder, SpeechEncoder
from pefttune.model import PeftSpeechModel


def share_encoder(encoder: SpeechEncoder) -> SpeechEncoder:
    """A new encoder whose modules are copies and whose tensors are ``encoder``'s own.

    ``encoder`` must hold no placement (the view starts from the plain backbone). Attaching a
    placement to the view leaves ``encoder`` and every other view untouched.
    """
    if any(hasattr(layer, "pefttune") for layer in encoder.layers):
        raise ValueError("share_encoder: the encoder already holds a placement; share the plain backbone")
    if isinstance(encoder, LogMelEncoder):
        return LogMelEncoder(encoder.settings)  # no weights to share
    model = encoder.model
    # deepcopy copies every module object; tensors found in the memo are reused as they are
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return SpeechEncoder(copy.deepcopy(model, memo=shared), name=encoder.name)


def shares_weights(encoder: SpeechEncoder, other: SpeechEncoder) -> bool:
    """Whether the two encoders' frozen weights are the same tensors (not equal copies)."""
    mine, theirs = encoder.frozen_state_dict(), other.frozen_state_dict()
    return mine.keys() == theirs.keys() and all(mine[k].data_ptr() == theirs[k].data_ptr() for k in mine)


class SharedBackboneEnsemble(nn.Module):
    """One plain frozen encoder (``trunk``) and members built on views of it."""

    def __init__(self, trunk: SpeechEncoder, members: list[PeftSpeechModel]):
        super().__init__()
        if not members:
            raise ValueError("SharedBackboneEnsemble: no members")
        if any(hasattr(layer, "pefttune") for layer in trunk.layers):
            raise ValueError("SharedBackboneEnsemble: the trunk must be the plain encoder (it holds a placement)")
        strangers = [i for i, m in enumerate(members) if not shares_weights(trunk, m.encoder)]
        if strangers:
            raise ValueError(f"SharedBackboneEnsemble: members {strangers} do not share the trunk's weights "
                             "(build them on share_encoder(trunk))")
        self.trunk = trunk
        self.members = nn.ModuleList(members)
        lowest = [m.placement.lowest_adapted_layer() for m in members]
        #: layers below this index hold no PEFT module in any member: run once, on the trunk
        self.start = min(trunk.num_layers if i is None else i for i in lowest)

    def shared_states(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(hidden states h_0..h_start of the frozen part, frame mask): computed once per batch."""
        hidden0, mask = self.trunk.embed(input_values, attention_mask)
        states = [hidden0]
        if self.start:
            with torch.no_grad():
                states += self.trunk.run_layers(hidden0, mask, start=0, stop=self.start)
        return states, mask

    @torch.no_grad()
    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(one head output per member, frame mask): logits (B, C) or CTC log-probs (B, T, V)."""
        states, mask = self.shared_states(input_values, attention_mask)
        return [member.forward_from(states, mask) for member in self.members], mask
