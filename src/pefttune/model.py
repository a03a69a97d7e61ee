"""A frozen speech encoder + a PEFT placement + a SUPERB-style head, and its weights on disk.

:class:`PeftSpeechModel` runs in two separable steps so that trainers can cache the
frozen part: :meth:`~PeftSpeechModel.embed` (frozen front end, no gradients) and
:meth:`~PeftSpeechModel.forward_from` (layers from the lowest adapted one, then head).

On disk (:meth:`save` / :func:`load_model_dir`) a model is a directory with
``adapter.safetensors`` (PEFT + head weights only), ``placement.json`` and
``model.json`` (backbone reference and hash, head config). Nothing is pickled.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pefttune.backbones import SpeechEncoder, load_backbone
from pefttune.heads import Head, HeadConfig
from pefttune.placement import Placement, apply_placement

WEIGHTS_FILE = "adapter.safetensors"
PLACEMENT_FILE = "placement.json"
MODEL_FILE = "model.json"


class PeftSpeechModel(nn.Module):
    def __init__(self, encoder: SpeechEncoder, placement: Placement, head_config: HeadConfig):
        super().__init__()
        self.encoder = encoder
        self.placement = placement
        self.methods = apply_placement(encoder, placement)
        self.head = Head(encoder.num_layers + 1, encoder.config.hidden_size, head_config)

    @property
    def head_config(self) -> HeadConfig:
        return self.head.config

    # -- forward ------------------------------------------------------------------------
    def embed(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Frozen front end: (hidden state 0, frame mask). Cacheable; never needs grad."""
        return self.encoder.embed(input_values, attention_mask)

    def frozen_states(self, hidden0: torch.Tensor, mask: torch.Tensor, upto: int) -> list[torch.Tensor]:
        """Hidden states h_0..h_upto, through layers < ``upto`` that hold no PEFT module."""
        if any(self.placement.layers[i] for i in range(upto)):
            raise ValueError(f"frozen_states: layers below {upto} are adapted; they are not frozen")
        states = [hidden0]
        with torch.no_grad():
            if upto:
                states += self.encoder.run_layers(hidden0, mask, start=0, stop=upto)
        return states

    def forward_from(self, states: list[torch.Tensor], mask: torch.Tensor, layer_fn=None) -> torch.Tensor:
        """Head output given hidden states h_0..h_k (k = len(states) - 1): runs layers k..L-1."""
        start = len(states) - 1
        outputs = self.encoder.run_layers(states[-1], mask, start=start, layer_fn=layer_fn)
        return self.head([*states, *outputs], mask)

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(head output, frame mask): logits (B, C) or CTC log-probs (B, T, V)."""
        hidden0, mask = self.embed(input_values, attention_mask)
        return self.forward_from([hidden0], mask), mask

    def loss(self, output: torch.Tensor, mask: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.head.loss(output, mask, batch)

    # -- parameters ---------------------------------------------------------------------------
    def trainable_named_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """What training changes, by name: the trainable (PEFT + head) parameters and the head's
        buffers (:class:`pefttune.heads.PooledNorm`'s running statistics). What is saved and loaded."""
        return {**self.trainable_named_parameters(), **dict(self.head.named_buffers(prefix="head"))}

    def count_parameters(self) -> dict[str, int]:
        peft = sum(p.numel() for m in self.methods for method in m for p in method.trainable_parameters())
        head = sum(p.numel() for p in self.head.parameters())
        return {"peft": peft, "head": head, "trainable": peft + head}

    # -- disk ---------------------------------------------------------------------------------
    def save(self, directory: str | Path, metadata: dict | None = None) -> Path:
        """Write PEFT + head weights (safetensors), placement and model description."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().cpu().contiguous() for name, p in self.trained_tensors().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        self.placement.save(directory / PLACEMENT_FILE)
        description = {
            "backbone": self.encoder.name,
            "backbone_hash": self.encoder.content_hash(),
            "head": self.head_config.to_dict(),
            **(metadata or {}),
        }
        (directory / MODEL_FILE).write_text(json.dumps(description, indent=2) + "\n")
        return directory

    def load_weights(self, path: str | Path) -> None:
        """Load PEFT + head weights; any missing, extra or mis-shaped tensor is an error."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"weights file {path} does not exist")
        tensors = load_file(str(path))
        own = self.trained_tensors()
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        if missing or extra:
            raise ValueError(f"{path}: does not match this placement/head: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise ValueError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}")
        with torch.no_grad():
            for name, tensor in tensors.items():
                own[name].copy_(tensor)


def build_model(backbone: str | SpeechEncoder, placement: Placement, head: HeadConfig) -> PeftSpeechModel:
    encoder = backbone if isinstance(backbone, SpeechEncoder) else load_backbone(backbone)
    return PeftSpeechModel(encoder, placement, head)


def load_model_dir(directory: str | Path, backbone: str | SpeechEncoder | None = None, check_hash: bool = True):
    """Rebuild a model saved by :meth:`PeftSpeechModel.save`, in evaluation mode.

    ``backbone`` overrides the recorded reference (e.g. the same model at another path);
    with ``check_hash`` the frozen weights must hash to the recorded value.
    """
    directory = Path(directory)
    for name in (MODEL_FILE, PLACEMENT_FILE, WEIGHTS_FILE):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory}: missing {name}")
    description = json.loads((directory / MODEL_FILE).read_text())
    placement = Placement.load(directory / PLACEMENT_FILE)
    head = HeadConfig(**description["head"])
    encoder = backbone if isinstance(backbone, SpeechEncoder) else load_backbone(backbone or description["backbone"])
    if check_hash and description.get("backbone_hash") and encoder.content_hash() != description["backbone_hash"]:
        raise ValueError(
            f"{directory}: backbone {encoder.name!r} does not match the recorded hash "
            f"{description['backbone_hash'][:12]}... (different weights)"
        )
    model = PeftSpeechModel(encoder, placement, head)
    model.load_weights(directory / WEIGHTS_FILE)
    return model.eval()  # to predict with (a standardised head: its running statistics)
