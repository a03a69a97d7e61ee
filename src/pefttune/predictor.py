"""Use the results: a portable model directory, and predictors for models and ensembles.

An exported directory (:func:`export_model`) is self-contained:

    README.md                model card: metrics, parameters, placement table, provenance
    backbone.json            backbone reference (HF id or path), its config, content hash
    vocab.json               label set or CTC token vocabulary (id 0 = blank)
    preprocessing.json       sample rate, waveform normalisation
    adapter.safetensors      PEFT + head weights          } single model, or one folder
    placement.json, model.json                            } per member under members/
    ensemble.json            members, strategy, weights (ensembles only)
    peft_adapter/            a standard peft LoRA adapter (LoRA-only placements)

``export_model(..., merged=True)`` writes a merged directory instead: the PEFT weights
folded into the backbone, a plain transformers model with the head beside it
(:mod:`pefttune.merge`; LoRA, IA3 and BitFit placements only).

:func:`load_model` returns a :class:`Predictor` (single or merged model) or an
:class:`EnsemblePredictor`; both ``predict(waveforms or paths)``. An ensemble's members
share one frozen backbone (:mod:`pefttune.shared_backbone`): its weights held once, its
frozen part run once per batch. Loading reads safetensors and JSON only, and checks the
backbone's content hash.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pefttune.analysis.ensembles import (
    ctc_frame_vote,
    ctc_posterior_average,
    majority_vote,
    rover_vote,
    soft_vote,
    weighted_vote,
)
from pefttune.data.audio import read_audio
from pefttune.data.dataset import normalize_waveform
from pefttune.data.vocab import LabelVocab, TokenVocab
from pefttune.metrics import ctc_greedy_decode
from pefttune.merge import HEAD_FILE, load_merged
from pefttune.model import MODEL_FILE, PLACEMENT_FILE, WEIGHTS_FILE, PeftSpeechModel, load_model_dir
from pefttune.runtime.provenance import collect as collect_provenance, markdown as provenance_markdown
from pefttune.shared_backbone import SharedBackboneEnsemble, share_encoder

BACKBONE_FILE = "backbone.json"
VOCAB_FILE = "vocab.json"
PREPROCESSING_FILE = "preprocessing.json"
ENSEMBLE_FILE = "ensemble.json"
MEMBERS_DIR = "members"
PEFT_DIR = "peft_adapter"
SAMPLE_RATE = 16_000
ENSEMBLE_STRATEGIES = {"classification": ("vote", "weighted", "soft"), "ctc": ("frame_vote", "posterior_avg", "rover")}


# -- vocabularies -------------------------------------------------------------------------------


def vocab_from_dict(data: dict) -> LabelVocab | TokenVocab:
    if data.get("kind") == "labels":
        return LabelVocab(tuple(data["labels"]))
    if data.get("kind") == "tokens" or "tokens" in data:
        return TokenVocab(tuple(data["tokens"]), data.get("unit", "phoneme"))
    raise ValueError(f"{VOCAB_FILE}: expected kind 'labels' or 'tokens', got {data.get('kind')!r}")


def decode_tokens(vocab: TokenVocab, ids: Sequence[int]) -> str:
    tokens = [vocab.tokens[i - 1] for i in ids if i > 0]
    if vocab.unit == "char":
        return "".join(" " if t == "|" else t for t in tokens).strip()
    return " ".join(tokens)


# -- audio ------------------------------------------------------------------------------------


def _load_inputs(inputs) -> tuple[list[np.ndarray], list[str | None], dict[int, str]]:
    """Waveforms (16 kHz float arrays or paths); errors per item, never for the whole batch."""
    if isinstance(inputs, (str, Path, np.ndarray, torch.Tensor)):
        inputs = [inputs]
    waves, names, errors = [], [], {}
    for i, item in enumerate(inputs):
        if isinstance(item, (str, Path)):
            names.append(str(item))
            try:
                waves.append(read_audio(item, SAMPLE_RATE))
            except (FileNotFoundError, ValueError) as err:
                errors[i] = str(err)
                waves.append(np.zeros(0, dtype=np.float32))
        else:
            names.append(None)
            array = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
            if array.ndim == 2:  # (channels, samples) or (samples, channels): downmix
                array = array.mean(axis=0 if array.shape[0] < array.shape[1] else 1)
            waves.append(array.astype(np.float32))
    for i, wave in enumerate(waves):
        if i not in errors and wave.size < 400:
            errors[i] = f"input {names[i] or i}: too short ({wave.size} samples; need >= 400 at 16 kHz)"
    return waves, names, errors


def _batch(waves: list[np.ndarray], normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    waves = [normalize_waveform(w) if normalize else w for w in waves]
    longest = max(w.size for w in waves)
    values = torch.zeros(len(waves), longest)
    mask = torch.zeros(len(waves), longest, dtype=torch.long)
    for i, w in enumerate(waves):
        values[i, : w.size] = torch.from_numpy(w)
        mask[i, : w.size] = 1
    return values, mask


# -- predictors -------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """One input's result; ``error`` set (and the rest empty) when the input was unreadable."""

    input: str
    label: str | None = None  # classification
    probability: float | None = None
    probabilities: dict[str, float] | None = None
    transcript: str | None = None  # CTC
    error: str | None = None


@torch.no_grad()
def _batched_outputs(run, task: str, waves: list[np.ndarray], batch_size: int, normalize: bool,
                     device: torch.device) -> list[list[np.ndarray]]:
    """``run(values, mask) -> ([output per model], frame mask)`` over ``waves`` in batches of
    similar lengths; returns [model][input]: class probabilities (C,) or CTC log-probabilities
    (frames, V)."""
    order = sorted(range(len(waves)), key=lambda i: waves[i].size)  # similar lengths together
    results: list[dict[int, np.ndarray]] = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        values, mask = _batch([waves[i] for i in chunk], normalize)
        outputs, frames = run(values.to(device), mask.to(device))
        results = results or [{} for _ in outputs]
        for output, result in zip(outputs, results):
            for row, i in enumerate(chunk):
                if task == "classification":
                    result[i] = torch.softmax(output[row].float(), -1).cpu().numpy()
                else:
                    result[i] = output[row, : int(frames[row].sum())].float().cpu().numpy()
    return [[result[i] for i in range(len(waves))] for result in results]


class Predictor:
    """A single exported (or saved) model: ``predict`` waveforms or audio files."""

    def __init__(self, model: PeftSpeechModel, vocab, normalize: bool = True, batch_size: int = 8):
        self.model = model.eval()
        self.vocab = vocab
        self.normalize = normalize
        self.batch_size = batch_size

    @property
    def task(self) -> str:
        return self.model.head_config.task

    def outputs(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        """Per input: class probabilities (C,) or CTC log-probabilities (frames, V)."""
        def run(values, mask):
            output, frames = self.model(values, mask)
            return [output], frames

        device = next(self.model.parameters()).device
        return _batched_outputs(run, self.task, waves, self.batch_size, self.normalize, device)[0]

    def predict(self, inputs) -> list[Prediction]:
        waves, names, errors = _load_inputs(inputs)
        good = [i for i in range(len(waves)) if i not in errors]
        outputs = dict(zip(good, self.outputs([waves[i] for i in good]))) if good else {}
        return [self._prediction(names[i] or str(i), outputs.get(i), errors.get(i)) for i in range(len(waves))]

    def _prediction(self, name: str, output: np.ndarray | None, error: str | None) -> Prediction:
        if error is not None:
            return Prediction(name, error=error)
        if self.task == "classification":
            return _label_prediction(name, output, self.vocab)
        ids = ctc_greedy_decode(output[None])[0]
        return Prediction(name, transcript=decode_tokens(self.vocab, ids))


def _label_prediction(name: str, probs: np.ndarray, vocab: LabelVocab) -> Prediction:
    best = int(np.argmax(probs))
    return Prediction(
        name,
        label=vocab.decode(best),
        probability=float(probs[best]),
        probabilities={vocab.decode(i): float(p) for i, p in enumerate(probs)},
    )


class EnsemblePredictor:
    """Members' outputs combined by the exported strategy (majority vote by default).

    The members share one frozen backbone (:class:`~pefttune.shared_backbone.SharedBackboneEnsemble`):
    its weights are held once, and its frozen part runs once per batch.
    """

    def __init__(self, ensemble: SharedBackboneEnsemble, vocab, strategy: str, weights: list[float] | None = None,
                 normalize: bool = True, batch_size: int = 8):
        task = ensemble.members[0].head_config.task
        if strategy not in ENSEMBLE_STRATEGIES[task]:
            raise ValueError(f"{ENSEMBLE_FILE}: strategy {strategy!r} is not available for {task}; "
                             f"choose from {ENSEMBLE_STRATEGIES[task]}")
        self.ensemble = ensemble.eval()
        self.vocab, self.strategy, self.weights = vocab, strategy, weights
        self.normalize, self.batch_size = normalize, batch_size

    @property
    def task(self) -> str:
        return self.ensemble.members[0].head_config.task

    def outputs(self, waves: list[np.ndarray]) -> list[list[np.ndarray]]:
        """[member][input]: class probabilities (C,) or CTC log-probabilities (frames, V)."""
        device = next(self.ensemble.parameters()).device
        return _batched_outputs(self.ensemble, self.task, waves, self.batch_size, self.normalize, device)

    def predict(self, inputs) -> list[Prediction]:
        waves, names, errors = _load_inputs(inputs)
        good = [i for i in range(len(waves)) if i not in errors]
        results: dict[int, Prediction] = {}
        if good:
            outputs = self.outputs([waves[i] for i in good])  # [member][input]
            if self.task == "classification":
                probs = np.stack([np.stack(o) for o in outputs])  # (M, N, C)
                preds = combine_probabilities(probs, self.strategy, self.weights)
                mean = probs.mean(0)
                for row, i in enumerate(good):
                    p = _label_prediction(names[i] or str(i), mean[row], self.vocab)
                    p.label = self.vocab.decode(int(preds[row]))
                    p.probability = float(mean[row, int(preds[row])])
                    results[i] = p
            else:
                hyps = combine_transcripts(outputs, self.strategy)
                for row, i in enumerate(good):
                    results[i] = Prediction(names[i] or str(i), transcript=decode_tokens(self.vocab, hyps[row]))
        return [results.get(i) or Prediction(names[i] or str(i), error=errors[i]) for i in range(len(waves))]


def combine_probabilities(probs: np.ndarray, strategy: str, weights: list[float] | None = None) -> np.ndarray:
    """Ensemble class ids (N,) from members' probabilities (M, N, C) by ``strategy``."""
    if strategy == "vote":
        return majority_vote(probs)
    if strategy == "weighted":
        return weighted_vote(probs, weights)
    return soft_vote(probs)[0]


def combine_transcripts(outputs: list[list[np.ndarray]], strategy: str) -> list[list[int]]:
    """Ensemble token ids per input from members' CTC log-probabilities [member][input] (frames, V)."""
    if strategy == "rover":
        return rover_vote([[ctc_greedy_decode(lp[None])[0] for lp in member] for member in outputs])
    lengths = np.array([lp.shape[0] for lp in outputs[0]])
    padded = np.full((len(outputs), len(lengths), lengths.max(), outputs[0][0].shape[1]), 0.0, dtype=np.float32)
    for m, member in enumerate(outputs):
        for n, lp in enumerate(member):
            padded[m, n, : lp.shape[0]] = lp
    if strategy == "frame_vote":
        return ctc_frame_vote(padded, lengths)
    return ctc_posterior_average(padded, lengths)

# -- loading -----------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path.parent}: missing {path.name}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None


def _load_single(directory: Path, vocab, preprocessing: dict, backbone=None) -> Predictor:
    model = load_model_dir(directory, backbone=backbone)
    return Predictor(model, vocab, normalize=preprocessing.get("normalize", True))


def load_model(directory: str | Path, backbone: str | None = None) -> Predictor | EnsemblePredictor:
    """Load an exported model, merged model or ensemble directory as a predictor.

    ``backbone`` overrides the recorded backbone reference (e.g. the same model at another
    path); its weights must still match the recorded content hash. An ensemble loads the
    backbone once and builds every member on a view of it (:mod:`pefttune.shared_backbone`);
    a merged directory is its own backbone.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    vocab = vocab_from_dict(_read_json(directory / VOCAB_FILE))
    preprocessing = _read_json(directory / PREPROCESSING_FILE)
    if preprocessing.get("sample_rate", SAMPLE_RATE) != SAMPLE_RATE:
        raise ValueError(f"{directory / PREPROCESSING_FILE}: sample_rate must be {SAMPLE_RATE}")
    if (directory / HEAD_FILE).exists():
        if backbone is not None:
            raise ValueError(f"{directory}: a merged model is its own backbone; --backbone does not apply")
        return Predictor(load_merged(directory), vocab, normalize=preprocessing.get("normalize", True))
    reference = _read_json(directory / BACKBONE_FILE)
    encoder_source = backbone or reference["reference"]
    ensemble_path = directory / ENSEMBLE_FILE
    if not ensemble_path.exists():
        return _load_single(directory, vocab, preprocessing, backbone=encoder_source)
    spec = _read_json(ensemble_path)
    if not spec.get("members"):
        raise ValueError(f"{ensemble_path}: no members")
    ensemble = load_shared_ensemble([directory / member["dir"] for member in spec["members"]], encoder_source)
    return EnsemblePredictor(ensemble, vocab, spec.get("strategy", "vote"), spec.get("weights"),
                             normalize=preprocessing.get("normalize", True))


def load_shared_ensemble(member_dirs: Sequence[Path], backbone: str) -> SharedBackboneEnsemble:
    """Saved models (:func:`~pefttune.model.load_model_dir` directories) on one frozen backbone.

    The backbone is loaded and hashed once; each member's recorded hash must match it.
    """
    from pefttune.backbones import load_backbone

    trunk = load_backbone(backbone)
    content_hash = trunk.content_hash()
    members = []
    for member_dir in member_dirs:
        recorded = _read_json(Path(member_dir) / MODEL_FILE).get("backbone_hash")
        if recorded and recorded != content_hash:
            raise ValueError(f"{member_dir}: backbone {trunk.name!r} does not match the recorded hash "
                             f"{recorded[:12]}... (different weights)")
        members.append(load_model_dir(member_dir, backbone=share_encoder(trunk), check_hash=False))
    return SharedBackboneEnsemble(trunk, members)


# -- export ------------------------------------------------------------------------------------------


def _copy_model_files(exp, source: str, target: Path) -> None:
    """Copy a checkpoint's best-dev model files (local or remote storage) into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_FILE, PLACEMENT_FILE, MODEL_FILE):
        try:
            local = exp.local_file(f"{source}/{name}")
        except (FileNotFoundError, OSError):
            local = None
        if local is None or not Path(local).exists():
            raise FileNotFoundError(f"checkpoint {source}: missing {name}")
        shutil.copyfile(local, target / name)


def export_model(
    experiment,
    out: str | Path,
    *,
    trial: str | None = None,
    best: bool = False,
    ensemble: str | None = None,
    strategy: str | None = None,
    merged: bool = False,
) -> Path:
    """Write a self-contained model directory from an experiment's trial(s).

    ``trial``: one trial id; ``best``: the best trial on dev; ``ensemble``: a member choice
    (``top-5``, ``per-method`` or comma-separated ids) combined by ``strategy`` (default:
    majority vote / CTC frame vote). ``merged``: one trial's PEFT weights folded into the
    backbone, a plain transformers model directory with the head beside it
    (:mod:`pefttune.merge`); a placement that cannot merge is refused before anything is
    written.
    """
    from pefttune.analysis.selection import select_members, top_k
    from pefttune.analysis.store import open_results
    from pefttune.backbones import load_backbone

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty; choose a new directory")
    if sum(x is not None and x is not False for x in (trial, best or None, ensemble)) != 1:
        raise ValueError("choose exactly one of --trial ID, --best or --ensemble MEMBERS")
    if merged and ensemble:
        raise ValueError("--merged exports one model (--trial ID or --best), not --ensemble: an ensemble's "
                         "members share one frozen backbone instead")
    exp = open_results(experiment)
    if ensemble:
        _, members = select_members(exp, ensemble)
        if len(members) < 2:
            raise ValueError(f"--ensemble {ensemble}: needs at least 2 usable trials, found {len(members)}")
    elif best:
        members = top_k(exp, 1)
        if not members:
            raise ValueError(f"{experiment}: no finished trial to export")
    else:
        members = [exp.trial(trial)]
    task = exp.task
    strategy = strategy or ("vote" if task == "classification" else "frame_vote")
    if ensemble and strategy not in ENSEMBLE_STRATEGIES[task]:
        raise ValueError(f"--strategy {strategy!r} is not available for {task}; "
                         f"choose from {ENSEMBLE_STRATEGIES[task]}")

    checkpoints = []
    for record in members:
        if not record.checkpoint:
            raise FileNotFoundError(f"trial {record.trial_id}: no checkpoint")
        checkpoints.append(f"{record.checkpoint}/best")
    description = _read_json(Path(exp.local_file(f"{checkpoints[0]}/{MODEL_FILE}")))
    if merged:
        _check_mergeable_trial(exp, members[0], checkpoints[0], description)
    config = exp.config or {}
    vocab = description.get("vocab")
    if vocab is None:
        from pefttune.config import parse_config
        from pefttune.data.loaders import prepare_data

        vocab = prepare_data(parse_config(config)).vocab
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    encoder = load_backbone(description["backbone"])
    if not merged:  # a merged directory is its own backbone (merged_from.json names the source)
        (tmp / BACKBONE_FILE).write_text(json.dumps({
            "reference": description["backbone"],
            "content_hash": encoder.content_hash(),
            "config": encoder.config.to_diff_dict(),
        }, indent=2, default=str) + "\n")
    (tmp / VOCAB_FILE).write_text(json.dumps(vocab, indent=1, ensure_ascii=False) + "\n")
    (tmp / PREPROCESSING_FILE).write_text(json.dumps({"sample_rate": SAMPLE_RATE, "normalize": True}, indent=2) + "\n")
    if merged:
        _write_merged(exp, checkpoints[0], tmp, encoder)
    elif len(members) == 1 and not ensemble:
        _copy_model_files(exp, checkpoints[0], tmp)
    else:
        entries = []
        for record, checkpoint in zip(members, checkpoints):
            rel = f"{MEMBERS_DIR}/{record.trial_id}"
            _copy_model_files(exp, checkpoint, tmp / rel)
            entries.append({"dir": rel, "trial_id": record.trial_id, "kind": record.kind,
                            "dev": exp.score(record, "dev"), "test": exp.score(record, "test")})
        weights = [e["dev"] for e in entries] if strategy == "weighted" else None
        (tmp / ENSEMBLE_FILE).write_text(json.dumps({"strategy": strategy, "members": entries, "weights": weights},
                                                    indent=2) + "\n")
    if len(members) == 1 and not ensemble and not merged:
        _maybe_peft_adapter(tmp)
    card = _model_card(exp, members, strategy if ensemble else None, encoder)
    if merged:
        card += _merged_card(tmp)
    (tmp / "README.md").write_text(card)
    if out.exists():  # an empty directory the user made
        out.rmdir()
    tmp.rename(out)
    return out


def _check_mergeable_trial(exp, record, checkpoint: str, description: dict) -> None:
    """Refuse (ValueError) a trial whose backbone or placement cannot merge, naming why."""
    from pefttune.backbones import FAMILIES, backbone_info
    from pefttune.merge import check_mergeable
    from pefttune.placement import Placement

    if backbone_info(description["backbone"]).family not in FAMILIES:
        raise ValueError(f"--merged: trial {record.trial_id} runs on {description['backbone']!r}, which has no "
                         "transformers model to merge into")
    try:
        local = exp.local_file(f"{checkpoint}/{PLACEMENT_FILE}")
    except (FileNotFoundError, OSError):
        local = None
    if local is None or not Path(local).exists():
        raise FileNotFoundError(f"checkpoint {checkpoint}: missing {PLACEMENT_FILE}")
    check_mergeable(Placement.load(local), where=f"--merged: trial {record.trial_id}")


def _write_merged(exp, checkpoint: str, target: Path, encoder) -> None:
    """The trial's model merged into ``target`` (:func:`pefttune.merge.save_merged`)."""
    import tempfile

    from pefttune.merge import save_merged

    with tempfile.TemporaryDirectory() as scratch:
        _copy_model_files(exp, checkpoint, Path(scratch))
        save_merged(load_model_dir(scratch, backbone=encoder), target)


def _merged_card(directory: Path) -> str:
    """The model card's section on loading a merged directory without pefttune."""
    from pefttune.heads import HeadConfig
    from pefttune.merge import HEAD_FILE, MERGED_FROM_FILE, head_recipe

    head = HeadConfig(**_read_json(directory / HEAD_FILE)["head"])
    source = _read_json(directory / MERGED_FROM_FILE)
    methods = sorted({c["method"] for layer in source["placement"]["layers"] for c in layer})
    return "\n".join([
        "## Merged model",
        "",
        f"The PEFT weights ({', '.join(methods) or 'none'}) are folded into the backbone's own weights: "
        "`config.json` + `model.safetensors` are a plain transformers model of the backbone's class "
        f"(merged from `{source['backbone']}`). The head ({head.task}, {head.kind}) is in `head.safetensors`, "
        "described by `head.json`. Without pefttune, with `directory` this folder, `input_values` the "
        "16 kHz waveforms (B, samples), each normalised to zero mean and unit variance and zero-padded, "
        "and `attention_mask` (B, samples) 1 on samples:",
        "",
        "```python",
        head_recipe(head),
        "```",
        "",
        "Class i of `output` is label i of `vocab.json`." if head.task == "classification" else
        "Token i of `output` is token i - 1 of `vocab.json` (0 is the CTC blank).",
        "",
    ])


def _maybe_peft_adapter(directory: Path) -> None:
    """For LoRA-only placements: also a standard peft adapter directory (PeftModel.from_pretrained)."""
    from pefttune.placement import Placement

    placement = Placement.load(directory / PLACEMENT_FILE)
    choices = [c for layer in placement.layers for c in layer]
    if not choices or any(c.method != "lora" for c in choices):
        return
    model = load_model_dir(directory)
    export_peft_adapter(model, directory / PEFT_DIR)


def export_peft_adapter(model: PeftSpeechModel, out: Path) -> Path:
    """Write the LoRA weights as a peft adapter for the plain transformers backbone.

    Loadable with ``peft.PeftModel.from_pretrained(<same backbone>, out)``; ranks and
    targets per layer go to ``rank_pattern``/``alpha_pattern`` and ``layers_to_transform``.
    ``base_model_name_or_path`` records the backbone as transformers loads it
    (:func:`pefttune.backbones.transformers_reference`: a Hugging Face id, or a local or
    shipped backbone's directory), and ``auto_mapping`` its class, so
    ``peft.AutoPeftModel.from_pretrained(out)`` loads backbone and adapter by itself.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    from pefttune.backbones import transformers_reference
    from pefttune.methods.base import LINEAR_SITES

    choices = {i: layer[0] for i, layer in enumerate(model.placement.layers) if layer}
    if not choices or any(c.method != "lora" or len(model.placement.layers[i]) != 1 for i, c in choices.items()):
        raise ValueError("export_peft_adapter: the placement must hold only LoRA (one method per layer)")
    first = next(iter(choices.values())).hparams
    targets = sorted({t for c in choices.values() for t in c.hparams["targets"]})
    if any(sorted(c.hparams["targets"]) != targets for c in choices.values()):
        raise ValueError("export_peft_adapter: every LoRA layer must adapt the same projections")
    rank_pattern, alpha_pattern = {}, {}
    for i, c in choices.items():
        # peft matches a pattern against the end of a module's name: one key per projection
        modules = [rf"layers\.{i}\.{'.'.join(LINEAR_SITES[t])}" for t in targets]
        if c.hparams["rank"] != first["rank"]:
            rank_pattern.update(dict.fromkeys(modules, c.hparams["rank"]))
        if c.hparams["alpha"] != first["alpha"]:
            alpha_pattern.update(dict.fromkeys(modules, c.hparams["alpha"]))
    config = LoraConfig(
        r=first["rank"], lora_alpha=first["alpha"], lora_dropout=first["dropout"], target_modules=targets,
        layers_to_transform=sorted(choices), layers_pattern="layers", rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern, base_model_name_or_path=transformers_reference(model.encoder.name),
    )
    tensors = {}
    for name, param in model.encoder.model.named_parameters():
        if "lora_" in name:
            # encoder.layers.0.attention.q_proj.lora_A.default.weight -> peft's saved key
            key = "base_model.model." + name.replace(".default", "")
            tensors[key] = param.detach().cpu().contiguous()
    out.mkdir(parents=True, exist_ok=True)
    backbone_class = type(model.encoder.model)
    config.save_pretrained(str(out), auto_mapping_dict={"base_model_class": backbone_class.__name__,
                                                        "parent_library": backbone_class.__module__})
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def _model_card(exp, members, strategy, encoder) -> str:
    from pefttune.placement import Placement

    lines = [f"# pefttune model: {exp.name}", ""]
    lines.append(f"- backbone: `{encoder.name}` ({encoder.family}, {encoder.num_layers} layers, hidden "
                 f"{encoder.config.hidden_size}), content hash `{encoder.content_hash()[:16]}`")
    lines.append(f"- task: {exp.task}, metric: {exp.metric} ({exp.mode})")
    if strategy:
        lines.append(f"- ensemble of {len(members)} members, strategy `{strategy}`")
    lines.append(f"- experiment: `{exp.uri}`")
    lines += ["", "| trial | kind | trainable params | dev | test | placement |", "|---|---|---|---|---|---|"]
    for record in members:
        lines.append(f"| {record.trial_id} | {record.kind} | {record.trainable_params} | "
                     f"{_score(exp.score(record, 'dev'))} | {_score(exp.score(record, 'test'))} | "
                     f"{record.placement_short} |")
    for record in members:
        if record.placement:
            placement = Placement.from_dict(record.placement)
            lines += ["", f"## Placement of {record.trial_id}", "", "| layer | methods |", "|---|---|"]
            lines += [f"| {i} | {m} |" for i, m in enumerate(placement.layer_methods())]
    lines += ["", "Load it: `pefttune.predictor.load_model(DIR).predict([...])` or "
              "`pefttune predict DIR audio.wav`.", ""]
    lines += [""] + provenance_markdown(collect_provenance(exp.config))  # of this export, and the study's config
    return "\n".join(lines)


def _score(value: float | None) -> str:
    """A score as the model card prints it: three decimals (0.7583333333333333 -> 0.758)."""
    return "-" if value is None else f"{value:.3f}"
