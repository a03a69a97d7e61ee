"""Log-mel frames aligned with a speech encoder's CNN: :class:`LogMel`.

The ``log-mel`` reference backbone (:class:`pefttune.backbones.LogMelEncoder`) embeds audio with
it, and the demo's pretraining clusters it into HuBERT targets.

Frame alignment is exact by construction. A padding-free CNN with kernels ``k_i`` and
strides ``s_i`` has a receptive field ``R = 1 + sum_i (k_i - 1) * prod_{j<i} s_j`` and a
total stride ``S = prod_i s_i``; output frame ``t`` sees samples ``[S t, S t + R)`` and
``n`` samples give ``(n - R) // S + 1`` frames. For the tiny backbones (kernels
(10, 3, 3, 3, 2), strides (5, 4, 4, 2, 2)) that is R = 380, S = 320 (20 ms)::

    receptive_field((10, 3, 3, 3, 2), (5, 4, 4, 2, 2))   # (380, 320)
    LogMel(40, window=380, hop=320)(waveforms)          # (B, frames, 40)
"""
from __future__ import annotations

import torch
from transformers.audio_utils import mel_filter_bank

__all__ = ["LogMel", "N_FFT", "SAMPLE_RATE", "frame_count", "receptive_field"]

SAMPLE_RATE = 16_000
N_FFT = 512


def frame_count(num_samples: int, window: int, hop: int) -> int:
    """Frames of a padding-free framing (window, hop) of ``num_samples`` samples."""
    return 0 if num_samples < window else (num_samples - window) // hop + 1


def receptive_field(conv_kernel, conv_stride) -> tuple[int, int]:
    """(receptive field, total stride) in samples of a padding-free CNN."""
    field, stride = 1, 1
    for kernel, step in zip(conv_kernel, conv_stride):
        field += (kernel - 1) * stride
        stride *= step
    return field, stride


class LogMel:
    """Log-mel spectrogram (Hann window, FFT 512, no centring) with a given window and hop.

    Use :meth:`for_config` to match a backbone's frames exactly.
    """

    def __init__(self, num_mels: int = 40, window: int = 380, hop: int = 320):
        if not 0 < window <= N_FFT:
            raise ValueError(f"log_mel.window: must be within 1..{N_FFT} samples, got {window}")
        if hop < 1:
            raise ValueError(f"log_mel.hop: must be >= 1, got {hop}")
        self.num_mels, self.window, self.hop = num_mels, window, hop
        bank = mel_filter_bank(
            num_frequency_bins=N_FFT // 2 + 1,
            num_mel_filters=num_mels,
            min_frequency=20.0,
            max_frequency=SAMPLE_RATE / 2,
            sampling_rate=SAMPLE_RATE,
            norm="slaney",
            mel_scale="slaney",
        )
        self.bank = torch.tensor(bank, dtype=torch.float32)  # (freq, mels)
        self.taper = torch.hann_window(window, periodic=True)

    @classmethod
    def for_config(cls, config, num_mels: int = 40) -> "LogMel":
        """Window = the CNN's receptive field, hop = its total stride (20 ms for the tiny backbones)."""
        field, stride = receptive_field(config.conv_kernel, config.conv_stride)
        return cls(num_mels, window=field, hop=stride)

    def frames(self, num_samples: int) -> int:
        return frame_count(num_samples, self.window, self.hop)

    def __call__(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(B, samples) -> (B, frames, num_mels) natural-log mel energies.

        Frame ``t`` is exactly samples ``[hop * t, hop * t + window)``, Hann-tapered and
        zero-padded at the end to the FFT size (``torch.stft`` would instead centre a
        short window inside the FFT frame, shifting it by ``(N_FFT - window) / 2``).
        """
        if waveforms.dim() != 2:
            raise ValueError(f"log_mel: expected (batch, samples), got shape {tuple(waveforms.shape)}")
        if waveforms.shape[1] < self.window:
            raise ValueError(f"log_mel: {waveforms.shape[1]} samples are fewer than one window ({self.window})")
        frames = waveforms.float().unfold(1, self.window, self.hop) * self.taper  # (B, T, window)
        power = torch.fft.rfft(frames, n=N_FFT).abs().pow(2)  # (B, T, freq)
        return torch.log(power @ self.bank + 1e-6)
