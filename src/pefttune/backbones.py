"""Frozen speech SSL encoders (wav2vec 2.0, HuBERT, WavLM), run component by component.

One concept, one module (about 580 lines): every encoder the model can sit on, the log-mel
reference pseudo-encoder included, shares the :class:`SpeechEncoder` interface defined here.

`load_backbone(name_or_path)` accepts
- a built-in tiny backbone name (`tiny-wav2vec2`, `tiny-hubert`, `tiny-wavlm`: random init
  from a fixed seed, for unit tests) or a shipped self-supervised one (see `SHIPPED`),
- a local directory written by `save_pretrained` (config.json and safetensors weights: a
  pickled pytorch_model.bin is refused, never loaded),
- a Hugging Face model id (needs the model in the local HF cache or network access), or
- ``log-mel`` (:data:`LOG_MEL`): the reference pseudo-backbone, no SSL encoder at all
  (:class:`LogMelEncoder`: 40-band log-mel frames at 20 ms, zero layers).

The returned :class:`SpeechEncoder` keeps the transformers model frozen and runs it in
two separable steps, so that trainers can cache what never changes:

1. :meth:`SpeechEncoder.embed`: CNN feature encoder, feature projection, positional
   convolution (always frozen, always run under ``no_grad``) -> hidden state 0;
2. :meth:`SpeechEncoder.run_layers`: the transformer layers, where PEFT methods live.

Attention in every layer is served by :mod:`pefttune.attention`, which calls the
q/k/v/out projection modules (so wrapped projections such as LoRA train on every family,
WavLM included) and accepts learned key/value prefixes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    HubertConfig,
    HubertModel,
    PretrainedConfig,
    PreTrainedModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
)

from pefttune import attention
from pefttune.log_mel import LogMel

Family = Literal["wav2vec2", "hubert", "wavlm", "log-mel"]
#: The transformers SSL families (``log-mel`` is the pseudo-backbone's family, not one of these).
FAMILIES: tuple[Family, ...] = ("wav2vec2", "hubert", "wavlm")

_CONFIG_CLASSES = {"wav2vec2": Wav2Vec2Config, "hubert": HubertConfig, "wavlm": WavLMConfig}
_MODEL_CLASSES = {"wav2vec2": Wav2Vec2Model, "hubert": HubertModel, "wavlm": WavLMModel}

#: Built-in random-init tiny backbones: name -> family. Unit tests use these.
TINY_BACKBONES: dict[str, Family] = {
    "tiny-wav2vec2": "wav2vec2",
    "tiny-hubert": "hubert",
    "tiny-wavlm": "wavlm",
}

#: Self-supervised backbones shipped inside the package (directory under pefttune/assets).
SHIPPED: dict[str, str] = {
    "tiny-hubert-ssl": "tiny-hubert-ssl",
}

#: Config keys that describe how a model was serialised, not what it computes.
_CONFIG_METADATA = frozenset(
    {"architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "_commit_hash",
     "_attn_implementation", "_attn_implementation_internal", "attn_implementation"}
)

SAMPLE_RATE = 16_000
TINY_SEED = 1234

#: The reference pseudo-backbone: the same head on log-mel filterbank features, no SSL encoder.
LOG_MEL = "log-mel"


def tiny_config(
    family: Family,
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    conv_dim: int | None = None,
) -> PretrainedConfig:
    """A small config with the real models' 20 ms frame rate and no dropout.

    The CNN has kernels (10, 3, 3, 3, 2) and strides (5, 4, 4, 2, 2): total stride 320
    samples at 16 kHz, i.e. 49 frames per second like wav2vec 2.0 base. Layer norm in the
    CNN (not group norm) so that padded batches with attention masks are exact.
    """
    if family not in FAMILIES:
        raise ValueError(f"family: unknown backbone family {family!r}; expected one of {FAMILIES}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    conv = conv_dim or hidden_size
    kwargs = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size or 2 * hidden_size,
        conv_dim=(conv,) * 5,
        conv_kernel=(10, 3, 3, 3, 2),
        conv_stride=(5, 4, 4, 2, 2),
        conv_bias=True,
        feat_extract_norm="layer",
        do_stable_layer_norm=False,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.0,
        mask_feature_prob=0.0,
        vocab_size=32,
    )
    if family == "hubert":
        kwargs["feat_proj_layer_norm"] = True
    config = _CONFIG_CLASSES[family](**kwargs)
    config._attn_implementation = "eager" if family == "wavlm" else "sdpa"
    return config


def build_tiny_model(family: Family, seed: int = TINY_SEED, **config_overrides) -> PreTrainedModel:
    """Random-init tiny model, identical for the same (family, seed, overrides)."""
    config = tiny_config(family, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[family](config)
    return model


def family_of(config: PretrainedConfig) -> Family:
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type == family or model_type == f"{family}":
            return family
    if model_type in ("wav2vec2-conformer",):
        raise ValueError("backbone: wav2vec2-conformer is not supported (no standard encoder layers)")
    raise ValueError(
        f"backbone: model_type {model_type!r} is not a supported speech SSL family {FAMILIES}"
    )


def shipped_dir(name: str) -> Path:
    return Path(__file__).parent / "assets" / SHIPPED[name]


def _load_pretrained(source: str | Path, local: bool = False) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(str(source))
    family = family_of(config)
    kwargs = {"attn_implementation": "eager"} if family == "wavlm" else {}
    if local:  # a directory a user hands over: safetensors only, never a pickle
        kwargs["use_safetensors"] = True
    return _MODEL_CLASSES[family].from_pretrained(str(source), **kwargs)


#: Weight files of a ``save_pretrained`` directory that pefttune loads (safetensors only).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def check_local_dir(path: Path) -> Path:
    """``path`` as a loadable backbone directory: ``config.json`` and safetensors weights.

    Raises FileNotFoundError naming the directory, what is missing and how to write it."""
    save = f"write it with `model.save_pretrained('{path}')` (transformers saves config.json and model.safetensors)"
    if not path.is_dir():
        raise FileNotFoundError(f"backbone: {path} is a file, not a model directory; {save}")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"backbone: {path} has no config.json (expected a save_pretrained directory); {save}")
    if any((path / name).exists() for name in WEIGHT_FILES):
        return path
    pickled = [name for name in _PICKLED_WEIGHTS if (path / name).exists()]
    if pickled:
        raise FileNotFoundError(
            f"backbone: {path} holds only {pickled[0]}, a pickle, which pefttune never loads; convert it once "
            f"to safetensors where you trust the file: `AutoModel.from_pretrained('{path}')"
            f".save_pretrained('{path}')` writes model.safetensors")
    raise FileNotFoundError(f"backbone: {path} has config.json but no weights ({' or '.join(WEIGHT_FILES)}); {save}")


def hub_error(name: str, err: Exception) -> ValueError:
    """The error for a Hugging Face id that could not be resolved: offline (``HF_HUB_OFFLINE``) or
    without network, it says so and asks for a local directory."""
    import huggingface_hub.constants

    builtin = sorted(TINY_BACKBONES) + sorted(SHIPPED) + [LOG_MEL]
    head = (f"backbone: {name!r} is neither a built-in backbone ({', '.join(builtin)}), a local directory, "
            "nor a Hugging Face model in the local cache")
    save = (f"on a machine with network run `python -c \"from transformers import AutoModel; "
            f"AutoModel.from_pretrained('{name}').save_pretrained('DIR')\"`, copy DIR here and set backbone: DIR "
            "(a local directory)")
    text = " ".join(str(err).split())
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return ValueError(f"{head}, and it cannot be fetched offline (HF_HUB_OFFLINE is set). Fix: {save}")
    if any(word in text.lower() for word in ("connect", "network", "resolve", "offline", "timed out")):
        return ValueError(f"{head}, and it cannot be fetched offline (no network: huggingface.co could not be "
                          f"reached). Fix: {save}")
    return ValueError(f"{head} ({err.__class__.__name__}: {text[:300]}). Fix: check the id, or set backbone to a "
                      "local directory written by save_pretrained")


def _check_hub_weights(name: str) -> None:
    """Offline, a hub id whose config is cached but whose weights are not fails here, not in a trial."""
    import huggingface_hub.constants
    from huggingface_hub import try_to_load_from_cache

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        return
    if not any(isinstance(try_to_load_from_cache(name, file), str) for file in (*WEIGHT_FILES, *_PICKLED_WEIGHTS)):
        raise hub_error(name, OSError("its config is cached, its weights are not"))


def load_backbone(name_or_path: str | Path) -> "SpeechEncoder":
    """Load a frozen encoder by built-in name, local directory or Hugging Face id."""
    name = str(name_or_path)
    if name == LOG_MEL:
        return LogMelEncoder()
    if name in TINY_BACKBONES:
        return SpeechEncoder(build_tiny_model(TINY_BACKBONES[name]), name=name)
    if name in SHIPPED:
        directory = shipped_dir(name)
        if not (directory / "config.json").exists():
            raise FileNotFoundError(
                f"backbone: shipped weights for {name!r} are missing at {directory}; "
                "reinstall pefttune or run `pefttune backbone pretrain`"
            )
        return SpeechEncoder(_load_pretrained(directory), name=name)
    path = Path(name).expanduser()
    if path.exists():
        return SpeechEncoder(_load_pretrained(check_local_dir(path), local=True), name=str(path.resolve()))
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"backbone: local path {name} does not exist")
    try:
        return SpeechEncoder(_load_pretrained(name), name=name)
    except OSError as err:
        raise hub_error(name, err) from err


def transformers_reference(name: str) -> str:
    """What ``transformers.AutoModel.from_pretrained`` loads for a backbone that
    :func:`load_backbone` knows by ``name``: a Hugging Face id as it is, a local directory
    as its absolute path, a shipped backbone as its directory inside this installation. A
    built-in random tiny backbone (:data:`TINY_BACKBONES`) has no directory: its name
    stays (only :func:`build_tiny_model` makes it)."""
    if name in TINY_BACKBONES or name == LOG_MEL:
        return name
    if name in SHIPPED:
        return str(shipped_dir(name).resolve())
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


@dataclass(frozen=True)
class BackboneInfo:
    """What placement, heads and budgets need to know about a backbone, without weights."""

    name: str
    family: Family
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int

    @classmethod
    def from_config(cls, config: PretrainedConfig, name: str = "") -> "BackboneInfo":
        return cls(
            name=name,
            family=family_of(config),
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=config.num_attention_heads,
        )


def backbone_info(name: str) -> BackboneInfo:
    """Shape of a backbone from its config only (no weights loaded)."""
    if name == LOG_MEL:
        return LogMelConfig().info()
    if name in TINY_BACKBONES:
        return BackboneInfo.from_config(tiny_config(TINY_BACKBONES[name]), name)
    if name in SHIPPED:
        source = shipped_dir(name)
        if not (source / "config.json").exists():
            raise FileNotFoundError(f"backbone: shipped weights for {name!r} are missing at {source}")
        return BackboneInfo.from_config(AutoConfig.from_pretrained(str(source)), name)
    path = Path(name).expanduser()
    if path.exists():
        return BackboneInfo.from_config(AutoConfig.from_pretrained(str(check_local_dir(path))), str(path.resolve()))
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"backbone: local path {name} does not exist")
    try:
        info = BackboneInfo.from_config(AutoConfig.from_pretrained(name), name)
    except OSError as err:
        raise hub_error(name, err) from err
    _check_hub_weights(name)
    return info


class SpeechEncoder(nn.Module):
    """A frozen transformers speech encoder with all hidden states exposed.

    The wrapped ``model`` is put in eval mode and its parameters frozen; PEFT methods
    added later (see :func:`pefttune.placement.apply_placement`) are the only trainable
    parameters. ``train()`` never switches the frozen model's own dropouts on.
    """

    def __init__(self, model: PreTrainedModel, name: str = ""):
        super().__init__()
        self.model = model
        self.name = name
        self.family: Family = family_of(model.config)
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        attention.install(self)

    # -- structure --------------------------------------------------------------
    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def info(self) -> BackboneInfo:
        return BackboneInfo.from_config(self.config, self.name)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def stable_layer_norm(self) -> bool:
        return bool(getattr(self.config, "do_stable_layer_norm", False))

    def train(self, mode: bool = True) -> "SpeechEncoder":
        # Keep the frozen model in eval mode (no dropout); PEFT modules follow `mode`.
        super().train(mode)
        self.model.eval()
        for module in self.model.modules():
            if getattr(module, "pefttune_trainable", False):
                module.train(mode)
                base = getattr(module, "base_layer", None)  # a wrapper's frozen projection
                if isinstance(base, nn.Module):
                    base.eval()
        return self

    def content_hash(self) -> str:
        """SHA-256 over the frozen weights (names, shapes, bytes) and config."""
        digest = hashlib.sha256()
        # Serialisation metadata (transformers version, dtype, architectures, ...) differs
        # between the same weights built in memory, saved, or loaded elsewhere: not hashed.
        config = {k: v for k, v in self.config.to_diff_dict().items() if k not in _CONFIG_METADATA}
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for key, tensor in sorted(self.frozen_state_dict().items()):
            digest.update(key.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def frozen_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen weights under the transformers model's own names (PEFT weights left out,
        method wrappers' ``.base_layer`` removed): what ``load_state_dict`` of a fresh model
        of the same class takes."""
        frozen = {}
        for key, tensor in self.model.state_dict().items():
            if any(tag in key for tag in ("lora_", "ia3_", ".pefttune.")):
                continue  # PEFT weights, not the backbone's
            frozen[key.replace(".base_layer", "")] = tensor
        return frozen

    # -- forward, in two steps ------------------------------------------------------
    def frame_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        return self.model._get_feat_extract_output_lengths(sample_lengths).to(torch.long)

    def frame_mask(self, attention_mask: torch.Tensor | None, num_frames: int, batch: int) -> torch.Tensor:
        """Boolean (B, frames) mask of valid frames from a (B, samples) sample mask."""
        if attention_mask is None:
            return torch.ones(batch, num_frames, dtype=torch.bool)
        lengths = self.frame_lengths(attention_mask.sum(-1))
        positions = torch.arange(num_frames, device=attention_mask.device)
        return positions[None, :] < lengths[:, None]

    @torch.no_grad()
    def embed(
        self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen front end -> (hidden state 0 (B, T, D), frame mask (B, T) bool).

        Runs under ``no_grad``: nothing here is trainable, so backward never enters the CNN.
        """
        model = self.model
        features = model.feature_extractor(input_values).transpose(1, 2)
        mask = self.frame_mask(attention_mask, features.shape[1], features.shape[0]).to(features.device)
        projected = model.feature_projection(features)
        hidden = projected[0] if isinstance(projected, tuple) else projected
        hidden = hidden.masked_fill(~mask[..., None], 0.0)
        encoder = model.encoder
        hidden = hidden + encoder.pos_conv_embed(hidden)
        if not self.stable_layer_norm:
            hidden = encoder.layer_norm(hidden)
        return hidden, mask

    def position_bias(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """WavLM's relative position bias (computed by layer 0, shared by all layers)."""
        if self.family != "wavlm":
            return None
        batch, frames, _ = hidden.shape
        attn = self.layers[0].attention
        bias = attn.compute_bias(frames, frames)
        return bias.unsqueeze(0).repeat(batch, 1, 1, 1).view(batch * attn.num_heads, frames, frames)

    def run_layer(
        self,
        index: int,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        position_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run encoder layer ``index`` (with whatever PEFT modules it holds)."""
        layer = self.layers[index]
        if self.family == "wavlm":
            out, _ = layer(hidden, attention_mask=mask, position_bias=position_bias, index=index)
            return out
        out = layer(hidden, attention_mask=mask)
        return out[0] if isinstance(out, tuple) else out

    def run_layers(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        start: int = 0,
        layer_fn=None,
        stop: int | None = None,
    ) -> list[torch.Tensor]:
        """Run layers ``start..stop-1`` (default: to the last) from ``hidden``, the input of layer ``start``.

        Returns the outputs of each layer run. ``layer_fn(index, hidden, mask, bias)`` may
        replace :meth:`run_layer` (DARTS mixes use this). For pre-LN (stable layer norm)
        models the encoder's final layer norm is applied to the last output, as in
        transformers.
        """
        run = layer_fn or self.run_layer
        bias = self.position_bias(hidden)
        # Decided once per forward (one host sync, not one per layer on a GPU): with no
        # padded frame the attention needs no mask at all.
        if mask is not None and bool(mask.all()):
            mask = None
        outputs = []
        stop = self.num_layers if stop is None else stop
        for index in range(start, stop):
            hidden = run(index, hidden, mask, bias)
            outputs.append(hidden)
        if self.stable_layer_norm and outputs and stop == self.num_layers:
            outputs[-1] = self.model.encoder.layer_norm(outputs[-1])
        return outputs

    def forward(
        self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """All L + 1 hidden states (embedding output, then each layer) and the frame mask."""
        hidden, mask = self.embed(input_values, attention_mask)
        return [hidden, *self.run_layers(hidden, mask)], mask


# -- the log-mel reference ---------------------------------------------------------------------


@dataclass(frozen=True)
class LogMelConfig:
    """Settings of the ``log-mel`` pseudo-backbone (all of them enter its content hash).

    Window 380 / hop 320 samples (23.75 ms / 20 ms at 16 kHz) are the tiny backbones'
    CNN receptive field and total stride (:func:`pefttune.log_mel.receptive_field`
    of :func:`tiny_config`): log-mel frame ``t`` covers exactly the samples that a tiny
    backbone's frame ``t`` sees, so the head pools over the same frames as on the default
    ``tiny-hubert-ssl``. Normalisation ``utterance``: one mean and one standard deviation
    per utterance, over all its valid frames and bands. It removes the gain and keeps the
    spectral shape; per-band (cepstral) mean normalisation would erase a stationary
    spectrum, e.g. a speaker's average spectrum that speaker identification relies on.
    """

    num_mels: int = 40
    window: int = 380
    hop: int = 320
    normalize: Literal["utterance"] = "utterance"

    @property
    def hidden_size(self) -> int:
        return self.num_mels

    @property
    def num_hidden_layers(self) -> int:
        return 0

    def to_diff_dict(self) -> dict:
        return {"model_type": LOG_MEL, "num_mels": self.num_mels, "window": self.window, "hop": self.hop,
                "normalize": self.normalize, "sample_rate": SAMPLE_RATE}

    def info(self) -> BackboneInfo:
        return BackboneInfo(name=LOG_MEL, family="log-mel", num_layers=0, hidden_size=self.num_mels,
                            intermediate_size=0, num_heads=0)


class LogMelEncoder(SpeechEncoder):
    """The ``log-mel`` reference: a :class:`SpeechEncoder` without an SSL encoder.

    :meth:`embed` computes normalised log-mel frames (:class:`LogMelConfig`) with
    :class:`pefttune.log_mel.LogMel`; there are zero transformer layers, so the
    head's weighted layer sum sees one hidden state (the features), the only placement is
    the empty one (``{"num_layers": 0, "layers": []}``) and the head holds every trainable
    parameter. It has no weights of its own (``model`` is an empty module), so
    :func:`~pefttune.placement.apply_placement`, the frozen cache and saved models treat it
    like any other backbone; :meth:`content_hash` hashes the settings.
    """

    def __init__(self, settings: LogMelConfig | None = None):
        nn.Module.__init__(self)  # no transformers model to wrap (SpeechEncoder.__init__ needs one)
        self.settings = settings or LogMelConfig()
        self.name = LOG_MEL
        self.family: Family = "log-mel"
        self.model = nn.Module()  # holds no weights: nothing to freeze, nothing to adapt
        self._layers = nn.ModuleList()
        self.log_mel = LogMel(self.settings.num_mels, window=self.settings.window, hop=self.settings.hop)

    @property
    def config(self) -> LogMelConfig:
        return self.settings

    @property
    def info(self) -> BackboneInfo:
        return self.settings.info()

    @property
    def layers(self) -> nn.ModuleList:
        return self._layers

    def train(self, mode: bool = True) -> "LogMelEncoder":
        nn.Module.train(self, mode)
        return self

    def content_hash(self) -> str:
        """SHA-256 over the settings: the features are a fixed function of them."""
        return hashlib.sha256(json.dumps(self.settings.to_diff_dict(), sort_keys=True).encode()).hexdigest()

    def frame_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        """Whole windows within the valid samples (the tiny backbones' count for the defaults)."""
        window, hop = self.settings.window, self.settings.hop
        lengths = sample_lengths.to(torch.long)
        return torch.where(lengths >= window, torch.div(lengths - window, hop, rounding_mode="floor") + 1, 0)

    @torch.no_grad()
    def embed(
        self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised log-mel frames (B, T, num_mels), frame mask (B, T) bool); padded frames are 0.

        A valid frame sees only valid samples, so an utterance gets the same features alone
        or in a padded batch.
        """
        log_mel = self.log_mel
        if log_mel.bank.device != input_values.device:  # LogMel keeps plain tensors: follow the input
            log_mel.bank, log_mel.taper = log_mel.bank.to(input_values.device), log_mel.taper.to(input_values.device)
        waveforms = input_values.float()
        if waveforms.shape[1] < self.settings.window:  # shorter than one window: no valid frame
            waveforms = nn.functional.pad(waveforms, (0, self.settings.window - waveforms.shape[1]))
        features = log_mel(waveforms)  # (B, T, M)
        batch, frames = features.shape[:2]
        if attention_mask is None:
            samples = torch.full((batch,), input_values.shape[1], device=features.device)
        else:
            samples = attention_mask.sum(-1).to(features.device)
        mask = torch.arange(frames, device=features.device)[None, :] < self.frame_lengths(samples)[:, None]
        valid = mask[..., None].to(features.dtype)
        count = valid.sum((1, 2), keepdim=True) * features.shape[-1]
        mean = (features * valid).sum((1, 2), keepdim=True) / count.clamp_min(1.0)
        var = ((features - mean).pow(2) * valid).sum((1, 2), keepdim=True) / count.clamp_min(1.0)
        features = (features - mean) / var.sqrt().clamp_min(1e-5)
        return features.masked_fill(~mask[..., None], 0.0), mask

    def run_layer(self, index, hidden, mask, position_bias=None):
        raise IndexError(f"backbone {LOG_MEL!r} has no layers (asked for layer {index})")
