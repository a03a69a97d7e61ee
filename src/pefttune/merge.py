"""Fold a placement's PEFT weights into the backbone's own: one plain transformers model.

LoRA (``W + s B A``), IA3 (rows or columns of ``W`` scaled, and the bias) and BitFit
(biases shifted) change only the weights and biases of the projections and layer norms they
touch, affinely, so a placement of these methods alone folds into a model of the
backbone's own class and shape (their specs say ``mergeable``). The result is the stock
transformers model (``HubertModel``, ``Wav2Vec2Model``, ``WavLMModel``) with its stock
parameter names and stock modules (transformers' own attention, not
:mod:`pefttune.attention`), so ``transformers.AutoModel.from_pretrained`` loads its
``save_pretrained`` directory without pefttune. Bottleneck adapters, prefixes and
AdapterBias add nonlinear paths or new attention positions: they do not fold, and
:func:`check_mergeable` names the layers holding them.

    model = load_model_dir("checkpoint/best")
    check_mergeable(model.placement)      # ValueError naming every layer and method that cannot merge
    merged = merge_backbone(model)        # e.g. a HubertModel, in eval mode
    merged.save_pretrained("merged")      # config.json + model.safetensors

Several methods on one projection fold in the order they run: BitFit's bias first (it sits
on the frozen projection itself), then each wrapper from the innermost outwards.

On disk (:func:`save_merged`, :func:`load_merged`) a merged model is a transformers model
directory with the head beside it::

    config.json, model.safetensors   the merged backbone (transformers' save_pretrained)
    head.safetensors                 the head's weights (layer weights + classifier / CTC layer)
    head.json                        what the head is and what it reads (all L + 1 hidden states)
    merged_from.json                 the backbone and placement it was merged from, and its hash

:func:`head_recipe` writes the few lines of plain torch that apply the head.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from pefttune.backbones import FAMILIES, load_backbone
from pefttune.heads import HeadConfig
from pefttune.methods import get_method
from pefttune.methods.base import LINEAR_SITES, LayerMethod, WrappedLinearMethod
from pefttune.methods.bitfit import effective_bias
from pefttune.model import PeftSpeechModel
from pefttune.placement import Placement

HEAD_WEIGHTS_FILE = "head.safetensors"
HEAD_FILE = "head.json"
MERGED_FROM_FILE = "merged_from.json"

#: The layer norms of an encoder layer whose biases BitFit tunes.
LAYER_NORMS = ("layer_norm", "final_layer_norm")


def unmergeable(placement: Placement) -> dict[int, tuple[str, ...]]:
    """Layer index -> the methods in it that do not fold into the frozen weights."""
    found = {}
    for index, layer in enumerate(placement.layers):
        names = tuple(c.method for c in layer if not get_method(c.method).mergeable)
        if names:
            found[index] = names
    return found


def check_mergeable(placement: Placement, where: str = "placement") -> None:
    """Raise a ValueError naming every layer and method that cannot merge (None if all can)."""
    bad = unmergeable(placement)
    if bad:
        layers = "; ".join(f"layer {i}: {', '.join(names)}" for i, names in bad.items())
        can = sorted(name for name in _mergeable_methods() if name != "none")
        raise ValueError(
            f"{where}: cannot merge into the backbone's weights ({layers}); only {', '.join(can)} merge. "
            "Export it without --merged (pefttune's own directory, loaded by pefttune.predictor.load_model)."
        )


def _mergeable_methods() -> list[str]:
    from pefttune.methods import method_names

    return [name for name in method_names() if get_method(name).mergeable]


def merge_backbone(model: PeftSpeechModel) -> PreTrainedModel:
    """A fresh transformers model of the backbone's class whose forward equals ``model``'s
    adapted encoder (its hidden states; the head is not part of it)."""
    encoder = model.encoder
    if encoder.family not in FAMILIES:
        raise ValueError(f"backbone {encoder.name!r} ({encoder.family}) has no transformers model to merge into")
    check_mergeable(model.placement)
    for index, methods in enumerate(model.methods):
        for method in methods:
            if method.gate is not None or not method.active:
                raise ValueError(f"layer {index}: {type(method).__name__} is gated or switched off (a DARTS "
                                 "supernet); only a trained placement merges")
    merged = type(encoder.model)(copy.deepcopy(encoder.config))
    merged.load_state_dict(encoder.frozen_state_dict(), strict=True)
    with torch.no_grad():
        for index, (layer, methods) in enumerate(zip(encoder.layers, model.methods)):
            if methods:
                _merge_layer(layer, methods, merged.encoder.layers[index])
    return merged.eval()


def _merge_layer(layer: nn.Module, methods: list[LayerMethod], target: nn.Module) -> None:
    """Write the folded weights of adapted ``layer`` into the stock layer ``target``."""
    wrapping = [m for m in methods if isinstance(m, WrappedLinearMethod)]
    for site, (parent, name) in LINEAR_SITES.items():
        weight, bias = _folded_linear(site, getattr(getattr(layer, parent), name), wrapping)
        stock = getattr(getattr(target, parent), name)
        stock.weight.copy_(weight)
        if bias is not None:
            if stock.bias is None:
                raise ValueError(f"{site}: the merged update has a bias but the stock projection has none")
            stock.bias.copy_(bias)
    for name in LAYER_NORMS:
        module = getattr(layer, name, None)
        if module is not None and module.bias is not None:
            getattr(target, name).bias.copy_(effective_bias(module))


def _folded_linear(site: str, module: nn.Module, wrapping: list[WrappedLinearMethod]):
    """(weight, bias) of the affine map the (possibly wrapped) projection ``module`` computes."""
    chain = []  # wrappers, outermost first
    while hasattr(module, "base_layer"):
        chain.append(module)
        module = module.base_layer
    weight, bias = module.weight, effective_bias(module)
    for wrapper in reversed(chain):
        owner = next((m for m in wrapping if m.wrapper_of(site) is wrapper), None)
        if owner is None:
            raise ValueError(f"{site}: a {type(wrapper).__name__} wrapper that no method of this layer owns")
        weight, bias = owner.fold(site, weight, bias)
    return weight, bias


# -- on disk ---------------------------------------------------------------------------------------


def save_merged(model: PeftSpeechModel, out: str | Path) -> Path:
    """Write ``model`` merged (:func:`merge_backbone`) with its head beside it into ``out``."""
    out = Path(out)
    merged = merge_backbone(model)
    merged.save_pretrained(str(out))
    head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    save_file(head, str(out / HEAD_WEIGHTS_FILE))
    encoder = model.encoder
    (out / HEAD_FILE).write_text(json.dumps({
        "head": model.head_config.to_dict(),
        "num_states": encoder.num_layers + 1,
        "hidden_size": encoder.config.hidden_size,
        "input": "hidden_states of AutoModel(input_values, attention_mask, output_hidden_states=True): "
                 "all num_states of them, embedding output first",
        "featurizer": "softmax(featurizer.weights) . hidden_states",
        "pooling": "classification: mean over valid frames; ctc: none (per frame)",
        "norm": "batch: pooled standardised by head.norm.running_mean / running_var (eps 1e-5); none: as pooled",
        "output": "classification: logits (B, classes); ctc: log-probabilities (B, frames, tokens), blank = 0",
    }, indent=2) + "\n")
    (out / MERGED_FROM_FILE).write_text(json.dumps({
        "backbone": encoder.name,
        "backbone_hash": encoder.content_hash(),
        "placement": model.placement.to_dict(),
        "merged_hash": load_backbone(out).content_hash(),  # as it loads back from disk
    }, indent=2) + "\n")
    return out


def load_merged(directory: str | Path, check_hash: bool = True) -> PeftSpeechModel:
    """A merged directory as a :class:`PeftSpeechModel` (its backbone, no PEFT module, its head)."""
    directory = Path(directory)
    for name in ("config.json", HEAD_WEIGHTS_FILE, HEAD_FILE, MERGED_FROM_FILE):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory}: missing {name}")
    spec = json.loads((directory / HEAD_FILE).read_text())
    source = json.loads((directory / MERGED_FROM_FILE).read_text())
    encoder = load_backbone(directory)
    if check_hash and source.get("merged_hash") and encoder.content_hash() != source["merged_hash"]:
        raise ValueError(f"{directory}: the merged weights do not match the recorded hash "
                         f"{source['merged_hash'][:12]}... (changed since export)")
    model = PeftSpeechModel(encoder, Placement(tuple(() for _ in encoder.layers)), HeadConfig(**spec["head"]))
    path = directory / HEAD_WEIGHTS_FILE
    tensors, own = load_file(str(path)), model.head.state_dict()
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    bad = sorted(k for k in set(own) & set(tensors) if tensors[k].shape != own[k].shape)
    if missing or extra or bad:
        raise ValueError(f"{path}: does not match {HEAD_FILE}: missing {missing}, unexpected {extra}, "
                         f"wrong shape {bad}")
    model.head.load_state_dict(tensors)
    return model.eval()


def head_recipe(config: HeadConfig) -> str:
    """Plain torch + transformers code that applies a merged directory's head (no pefttune).

    Reads ``directory``, ``input_values`` (B, samples: 16 kHz waveforms, each normalised to
    zero mean and unit variance, zero-padded) and ``attention_mask`` (B, samples: 1 on
    samples); leaves ``output`` (logits (B, C), or CTC log-probabilities (B, T, V)) and
    ``frame_mask`` (B, T).
    """
    lines = [
        "import torch",
        "import torch.nn.functional as F",
        "from safetensors.torch import load_file",
        "from transformers import AutoModel",
        "",
        "model = AutoModel.from_pretrained(directory).eval()",
        'head = load_file(f"{directory}/head.safetensors")',
        "with torch.no_grad():",
        "    hidden = model(input_values, attention_mask=attention_mask, output_hidden_states=True).hidden_states",
        "    frame_mask = model._get_feature_vector_attention_mask(hidden[0].shape[1], attention_mask)",
        '    weights = torch.softmax(head["featurizer.weights"], 0)',
        '    features = torch.einsum("l,lbtd->btd", weights, torch.stack(hidden))',
    ]
    if config.task == "classification":
        lines += [
            "    valid = frame_mask[..., None].to(features.dtype)",
            "    pooled = (features * valid).sum(1) / valid.sum(1).clamp_min(1.0)",
        ]
        if config.norm == "batch":  # PooledNorm at evaluation: the training's running statistics
            lines.append('    pooled = (pooled - head["head.norm.running_mean"]) / torch.sqrt(head["head.norm.running_var"] '
                         '+ 1e-5)')
        if config.kind == "mlp":
            lines += [
                '    pooled = torch.relu(F.linear(pooled, head["head.proj.0.weight"], head["head.proj.0.bias"]))',
                '    output = F.linear(pooled, head["head.proj.2.weight"], head["head.proj.2.bias"])  # logits',
            ]
        else:
            lines.append('    output = F.linear(pooled, head["head.proj.weight"], head["head.proj.bias"])  # logits')
        return "\n".join(lines)
    if config.kind == "bilstm":
        lines += [
            f"    lstm = torch.nn.LSTM(features.shape[-1], {config.hidden}, batch_first=True, bidirectional=True)",
            '    lstm.load_state_dict({k[len("head.lstm."):]: v for k, v in head.items() if k.startswith("head.lstm.")})',
            "    lengths = frame_mask.sum(1).clamp_min(1).cpu()",
            "    packed = torch.nn.utils.rnn.pack_padded_sequence(features, lengths, batch_first=True, enforce_sorted=False)",
            "    features, _ = torch.nn.utils.rnn.pad_packed_sequence(lstm(packed)[0], batch_first=True,",
            "                                                         total_length=features.shape[1])",
        ]
    lines.append('    output = torch.log_softmax(F.linear(features, head["head.proj.weight"], head["head.proj.bias"]), -1)')
    return "\n".join(lines)
