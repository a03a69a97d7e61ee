"""The checkpoint format of both trainables, and the end of a trial.

- :func:`write_checkpoint` / :func:`read_checkpoint` and :func:`report` (writes a checkpoint
  into a temporary directory and hands it to ``tune.report`` through
  ``tune.Checkpoint.from_directory``);
- :func:`final_evaluation` scores the best-dev weights on dev and test and returns
  per-example predictions, stored in the final checkpoint.

Layout (nothing pickled; optimizer state via ``torch.load(weights_only=True)``)::

    state.json                 epoch, best score/epoch, finished, last reported metrics
    model/                     PeftSpeechModel.save: adapter.safetensors (PEFT + head
                               weights, current), placement.json, model.json
    best/                      the same for the best-dev weights (load_model_dir works)
    trainer_state.pt           optimizer, scheduler and torch RNG state (tensors only)
    predictions/dev.safetensors, predictions/test.safetensors   final checkpoint only
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from pefttune.model import MODEL_FILE, PLACEMENT_FILE, WEIGHTS_FILE, PeftSpeechModel
from pefttune.training import Evaluation, TrainConfig, evaluate, load_predictions, save_predictions

STATE_FILE = "state.json"
TRAINER_FILE = "trainer_state.pt"
MODEL_DIR = "model"
BEST_DIR = "best"
PREDICTIONS_DIR = "predictions"


@dataclass
class CheckpointState:
    """What a trial needs, besides weights, to resume or to be read afterwards."""

    epoch: int = 0  # last finished epoch
    best_score: float | None = None
    best_epoch: int = 0
    finished: bool = False  # final evaluation done, predictions stored
    metrics: dict = field(default_factory=dict)  # the metrics reported with this checkpoint

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=_json_default) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "CheckpointState":
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def trainable_state(model: PeftSpeechModel) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable (PEFT + head) weights."""
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in model.trainable_named_parameters().items()}


def load_trainable_state(model: PeftSpeechModel, state: dict[str, torch.Tensor]) -> None:
    own = model.trainable_named_parameters()
    if set(own) != set(state):
        raise ValueError(f"weights do not match the model: missing {sorted(set(own) - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - set(own))[:5]}")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def write_checkpoint(
    directory: str | Path,
    model: PeftSpeechModel,
    state: CheckpointState,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    best_weights: dict[str, torch.Tensor] | None = None,
    predictions: dict[str, Evaluation] | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write a checkpoint directory (layout in the module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / MODEL_DIR, metadata=metadata)
    if best_weights is not None:
        best = directory / BEST_DIR
        best.mkdir(exist_ok=True)
        save_file(best_weights, str(best / WEIGHTS_FILE))
        for name in (PLACEMENT_FILE, MODEL_FILE):
            shutil.copyfile(directory / MODEL_DIR / name, best / name)
    if optimizer is not None:
        trainer = {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
        if scheduler is not None:
            trainer["scheduler"] = scheduler.state_dict()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            trainer["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save(trainer, directory / TRAINER_FILE)
    if predictions:
        (directory / PREDICTIONS_DIR).mkdir(exist_ok=True)
        for split, evaluation in predictions.items():
            save_predictions(directory / PREDICTIONS_DIR / f"{split}.safetensors", evaluation)
    (directory / STATE_FILE).write_text(state.to_json())
    return directory


def read_state(directory: str | Path) -> CheckpointState:
    path = Path(directory) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {directory}: missing {STATE_FILE}")
    return CheckpointState.from_json(path.read_text())


def read_checkpoint(
    directory: str | Path,
    model: PeftSpeechModel | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
) -> tuple[CheckpointState, dict[str, torch.Tensor] | None]:
    """Restore what :func:`write_checkpoint` wrote into ``model``/``optimizer``/``scheduler``.

    Returns the state and the best-dev weights (None if the checkpoint has none).
    """
    directory = Path(directory)
    state = read_state(directory)
    if model is not None:
        model.load_weights(directory / MODEL_DIR / WEIGHTS_FILE)
    best = directory / BEST_DIR / WEIGHTS_FILE
    best_weights = load_file(str(best)) if best.exists() else None
    trainer_path = directory / TRAINER_FILE
    if optimizer is not None:
        if not trainer_path.exists():
            raise FileNotFoundError(f"checkpoint {directory}: missing {TRAINER_FILE}")
        trainer = torch.load(trainer_path, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(trainer["optimizer"])
        if scheduler is not None and "scheduler" in trainer:
            scheduler.load_state_dict(trainer["scheduler"])
        torch.set_rng_state(trainer["torch_rng"])
        if "cuda_rng" in trainer and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(trainer["cuda_rng"])
    return state, best_weights


def checkpoint_predictions(directory: str | Path, split: str) -> dict:
    """Per-example predictions stored in a final checkpoint (see training.evaluate)."""
    path = Path(directory) / PREDICTIONS_DIR / f"{split}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {directory}: no {split} predictions (not a final checkpoint?)")
    return load_predictions(path)


def report(metrics: dict, write: Callable[[Path], None] | None = None) -> None:
    """``tune.report`` the metrics, with a checkpoint written by ``write(dir)`` if given.

    The checkpoint is written to a temporary directory that Ray copies to the
    experiment's storage during the call; the temporary copy is removed afterwards.
    """
    from ray import tune

    if write is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="pefttune-ckpt-") as tmp:
        write(Path(tmp))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


# -- the end of a trial ----------------------------------------------------------------------------


def final_evaluation(
    model: PeftSpeechModel,
    best_weights: dict[str, torch.Tensor] | None,
    loaders: dict,
    config: TrainConfig,
    device=None,
    layer_fn=None,
    cache=None,
) -> dict[str, Evaluation]:
    """Load the best-dev weights into ``model`` and evaluate every split in ``loaders``."""
    if best_weights is not None:
        load_trainable_state(model, best_weights)
    return {
        split: evaluate(model, loader, config, device, layer_fn=layer_fn, cache=cache) for split, loader in loaders.items()
    }
