"""SUPERB-style downstream heads over a frozen encoder's hidden states.

All heads start from a learnable softmax-weighted sum over the L + 1 hidden states
(:class:`WeightedLayerSum`), then:

- ``classification``: mean pool over valid frames, optionally standardised (``norm="batch"``:
  :class:`PooledNorm`), then a linear layer or a small MLP;
- ``ctc``: per-frame linear layer (or a small BiLSTM then linear) to a token vocabulary
  whose index 0 is the CTC blank; outputs log-probabilities.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

TaskKind = Literal["classification", "ctc"]
HeadNorm = Literal["none", "batch"]


@dataclass(frozen=True)
class HeadConfig:
    """What head to put on the encoder."""

    task: TaskKind
    num_outputs: int  # classes, or CTC vocabulary size including the blank (index 0)
    kind: Literal["linear", "mlp", "bilstm"] = "linear"
    hidden: int = 128  # MLP / BiLSTM width
    norm: HeadNorm = "none"  # "batch": the pooled features standardised (PooledNorm); classification only

    def __post_init__(self):
        if self.task not in ("classification", "ctc"):
            raise ValueError(f"head.task: expected 'classification' or 'ctc', got {self.task!r}")
        if self.num_outputs < 2:
            raise ValueError(f"head.num_outputs: need at least 2, got {self.num_outputs}")
        allowed = ("linear", "mlp") if self.task == "classification" else ("linear", "bilstm")
        if self.kind not in allowed:
            raise ValueError(f"head.kind: {self.kind!r} is not available for {self.task}; choose from {allowed}")
        if self.norm not in ("none", "batch"):
            raise ValueError(f"head.norm: expected 'none' or 'batch', got {self.norm!r}")
        if self.norm != "none" and self.task != "classification":
            raise ValueError(f"head.norm: {self.norm!r} is available for classification heads only (pooled features)")

    def to_dict(self) -> dict:
        return asdict(self)


class WeightedLayerSum(nn.Module):
    """softmax(w) . [h_0, ..., h_L], w initialised equal (SUPERB's featurizer)."""

    def __init__(self, num_states: int):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_states))

    def forward(self, states: list[torch.Tensor]) -> torch.Tensor:
        if len(states) != self.weights.numel():
            raise ValueError(f"WeightedLayerSum: expected {self.weights.numel()} hidden states, got {len(states)}")
        w = torch.softmax(self.weights, dim=0)
        return torch.einsum("l,lbtd->btd", w, torch.stack(states))


class PooledNorm(nn.BatchNorm1d):
    """The pooled features standardised per dimension: a batch norm without affine parameters.

    Training batches use their own mean and variance and update running estimates; evaluation
    (and a training batch of one example) uses the running estimates, so the head at evaluation
    is ``linear((pooled - running_mean) / sqrt(running_var + eps))``: still an affine map of the
    pooled features, the same family of heads as without it, better conditioned to train (SSL
    layers' features differ in scale by orders of magnitude). The running estimates are buffers,
    saved with the head's weights.

    Example::

        norm = PooledNorm(4)
        norm(torch.randn(8, 4) * 100 + 5).std(0)   # about 1 in every dimension
    """

    def __init__(self, dim: int):
        super().__init__(dim, affine=False)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.training and pooled.shape[0] < 2:  # one example: no batch statistics
            return F.batch_norm(pooled, self.running_mean, self.running_var, training=False, eps=self.eps)
        return super().forward(pooled)


class ClassificationHead(nn.Module):
    def __init__(self, dim: int, config: HeadConfig):
        super().__init__()
        self.norm = PooledNorm(dim) if config.norm == "batch" else None
        if config.kind == "mlp":
            self.proj = nn.Sequential(nn.Linear(dim, config.hidden), nn.ReLU(), nn.Linear(config.hidden, config.num_outputs))
        else:
            self.proj = nn.Linear(dim, config.num_outputs)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(features.dtype)
        pooled = (features * m).sum(1) / m.sum(1).clamp_min(1.0)
        if self.norm is not None:
            pooled = self.norm(pooled)
        return self.proj(pooled)  # logits (B, C)


class CTCHead(nn.Module):
    def __init__(self, dim: int, config: HeadConfig):
        super().__init__()
        self.lstm = None
        if config.kind == "bilstm":
            self.lstm = nn.LSTM(dim, config.hidden, batch_first=True, bidirectional=True)
            dim = 2 * config.hidden
        self.proj = nn.Linear(dim, config.num_outputs)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.lstm is not None:
            lengths = mask.sum(1).clamp_min(1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(features, lengths, batch_first=True, enforce_sorted=False)
            out, _ = self.lstm(packed)
            features, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=mask.shape[1])
        return torch.log_softmax(self.proj(features), dim=-1)  # (B, T, V)


class Head(nn.Module):
    """Weighted layer sum + task head; ``loss`` knows the task's criterion."""

    def __init__(self, num_states: int, dim: int, config: HeadConfig):
        super().__init__()
        self.config = config
        self.featurizer = WeightedLayerSum(num_states)
        self.head = ClassificationHead(dim, config) if config.task == "classification" else CTCHead(dim, config)

    def forward(self, states: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.featurizer(states), mask)

    def loss(self, output: torch.Tensor, mask: torch.Tensor, batch: dict) -> torch.Tensor:
        if self.config.task == "classification":
            return F.cross_entropy(output, batch["labels"])
        return F.ctc_loss(
            output.transpose(0, 1),  # (T, B, V)
            batch["targets"],
            mask.sum(1),
            batch["target_lengths"],
            blank=0,
            zero_infinity=True,
        )
