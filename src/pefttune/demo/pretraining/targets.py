"""HuBERT targets: k-means clusters of frame features at the encoder's frame rate.

Iteration 1 clusters acoustic features: 40-band log-mel (:class:`pefttune.log_mel.LogMel`) or MFCC-39
(:class:`MFCC39`: 13 cepstra + deltas + delta-deltas); iteration 2 clusters a layer of
the iteration-1 model (see :mod:`.train`).

Frame alignment is exact by construction (see :mod:`pefttune.log_mel`):
:class:`~pefttune.log_mel.LogMel` built :meth:`~pefttune.log_mel.LogMel.for_config` uses the
CNN's receptive field as window, its total stride as hop and no centring, so
log-mel frame ``t`` covers exactly the samples that encoder frame ``t`` sees and the
counts agree for every length (:func:`check_alignment` verifies this against the
model's own length formula).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pefttune.log_mel import LogMel, frame_count, receptive_field


def check_alignment(model, log_mel: "LogMel", lengths=range(300, 40_000, 37)) -> None:
    """Raise ``ValueError`` unless ``model``'s frames match ``log_mel``'s frame for frame."""
    field, stride = receptive_field(model.config.conv_kernel, model.config.conv_stride)
    if (field, stride) != (log_mel.window, log_mel.hop):
        raise ValueError(
            f"backbone: CNN receptive field/stride {field}/{stride} samples differ from the "
            f"log-mel window/hop {log_mel.window}/{log_mel.hop}; targets would not align"
        )
    lengths = [n for n in lengths if n >= field]
    counts = model._get_feat_extract_output_lengths(torch.tensor(lengths))
    for n, count in zip(lengths, counts.tolist()):
        expected = frame_count(n, log_mel.window, log_mel.hop)
        if int(count) != expected:
            raise ValueError(f"backbone: {count} encoder frames but {expected} log-mel frames for {n} samples")


#: Acoustic target features of HuBERT iteration 1 (``--targets``).
TARGET_FEATURES: tuple[str, ...] = ("logmel", "mfcc39")


def dct_matrix(num_in: int, num_out: int) -> torch.Tensor:
    """(num_in, num_out) orthonormal DCT-II matrix: ``x @ M`` gives the first ``num_out`` cepstra."""
    n = torch.arange(num_in, dtype=torch.float64)
    k = torch.arange(num_out, dtype=torch.float64)
    m = torch.cos(torch.pi / num_in * (n[:, None] + 0.5) * k[None, :]) * (2.0 / num_in) ** 0.5
    m[:, 0] /= 2.0 ** 0.5
    return m.float()


def deltas(x: torch.Tensor, width: int = 2) -> torch.Tensor:
    """Regression deltas over +-``width`` frames along dim 1 of (B, T, D), edges replicated."""
    frames = x.shape[1]
    padded = torch.cat([x[:, :1].expand(-1, width, -1), x, x[:, -1:].expand(-1, width, -1)], 1)
    out = torch.zeros_like(x)
    for n in range(1, width + 1):
        out = out + n * (padded[:, width + n:width + n + frames] - padded[:, width - n:width - n + frames])
    return out / (2 * sum(n * n for n in range(1, width + 1)))


class MFCC39:
    """MFCC-39: 13 cepstra (DCT-II of the 40-band :class:`LogMel`, c0 included) + deltas +
    delta-deltas (regression over +-2 frames). Same frames as the :class:`LogMel` it wraps."""

    def __init__(self, log_mel: LogMel, num_ceps: int = 13):
        self.log_mel, self.num_ceps = log_mel, num_ceps
        self.window, self.hop = log_mel.window, log_mel.hop
        self.dct = dct_matrix(log_mel.num_mels, num_ceps)

    @property
    def dims(self) -> int:
        return 3 * self.num_ceps

    def frames(self, num_samples: int) -> int:
        return self.log_mel.frames(num_samples)

    def __call__(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(B, samples) -> (B, frames, 39)."""
        ceps = self.log_mel(waveforms) @ self.dct
        d1 = deltas(ceps)
        return torch.cat([ceps, d1, deltas(d1)], -1)


def target_features(kind: str, config, num_mels: int = 40):
    """The frame-aligned feature extractor of HuBERT iteration 1 targets (``logmel`` or ``mfcc39``)."""
    log_mel = LogMel.for_config(config, num_mels)
    if kind == "logmel":
        return log_mel
    if kind == "mfcc39":
        return MFCC39(log_mel)
    raise ValueError(f"targets: expected one of {TARGET_FEATURES}, got {kind!r}")


@dataclass
class KMeansTargets:
    """Feature standardisation + cluster centroids; :meth:`assign` gives frame labels."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    centroids: torch.Tensor  # (K, D) in standardised units
    inertia: float  # mean squared distance of the fitting frames to their centroid

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """(..., D) features -> (...) nearest-centroid labels (long)."""
        flat = (features.reshape(-1, features.shape[-1]) - self.mean) / self.std
        labels = torch.cdist(flat, self.centroids).argmin(-1)
        return labels.reshape(features.shape[:-1])


def fit_kmeans(
    features: torch.Tensor,
    num_clusters: int,
    seed: int,
    iterations: int = 25,
    max_frames: int = 100_000,
) -> KMeansTargets:
    """k-means++ initialisation then Lloyd iterations on (up to ``max_frames``) frames.

    ``features`` is (N, D). Deterministic for a given ``seed``. Empty clusters are
    re-seeded with the frame farthest from its centroid.
    """
    if features.dim() != 2:
        raise ValueError(f"kmeans: expected (frames, dims), got {tuple(features.shape)}")
    if features.shape[0] < num_clusters:
        raise ValueError(f"kmeans: {features.shape[0]} frames are fewer than num_clusters={num_clusters}")
    gen = torch.Generator().manual_seed(seed)
    mean, std = features.mean(0), features.std(0).clamp_min(1e-5)
    x = (features - mean) / std
    if x.shape[0] > max_frames:
        x = x[torch.randperm(x.shape[0], generator=gen)[:max_frames]]
    # k-means++ seeding
    centroids = [x[torch.randint(x.shape[0], (1,), generator=gen)].squeeze(0)]
    closest = torch.cdist(x, centroids[0][None]).squeeze(1).pow(2)
    for _ in range(1, num_clusters):
        probs = closest / closest.sum()
        pick = torch.multinomial(probs, 1, generator=gen)
        centroids.append(x[pick].squeeze(0))
        closest = torch.minimum(closest, torch.cdist(x, x[pick]).squeeze(1).pow(2))
    c = torch.stack(centroids)
    for _ in range(iterations):
        dist = torch.cdist(x, c)
        labels = dist.argmin(-1)
        counts = torch.bincount(labels, minlength=num_clusters)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        new = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            far = dist.gather(1, labels[:, None]).squeeze(1).topk(len(empty)).indices
            new[empty] = x[far]
        if torch.allclose(new, c):
            c = new
            break
        c = new
    inertia = float(torch.cdist(x, c).min(-1).values.pow(2).mean())
    return KMeansTargets(mean=mean, std=std, centroids=c, inertia=inertia)
