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

Complete or not: ``state.json`` is written last, atomically (a temporary file renamed into
place), and lists every other file of the checkpoint with its size and SHA-256 (``files``).
A checkpoint is complete when its ``state.json`` parses and every listed file is there with
that size and hash; anything else (a kill while the files were written or copied into the
trial's folder, storage that lost data) is an :class:`IncompleteCheckpointError`, which
:func:`read_state` and :func:`read_checkpoint` raise instead of reading half a file.  A trial
restored from an incomplete checkpoint goes back to its newest complete one
(:func:`restore`).  A ``state.json`` without ``files`` (written before the list existed) is
taken as complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from ray import tune
from safetensors.torch import load_file, save_file

from pefttune.model import MODEL_FILE, PLACEMENT_FILE, WEIGHTS_FILE, PeftSpeechModel
from pefttune.runtime.atomic_fs import ATOMIC_LOCAL
from pefttune.schema import (BEST_DIR, CHECKPOINT_NAME, MODEL_DIR, PREDICTIONS_DIR, STATE_FILE, TRAINER_FILE,
                             CheckpointState, predictions_file, state_json)
from pefttune.schema import listed_files as _listed_files
from pefttune.training import Evaluation, TrainConfig, evaluate, load_predictions, save_predictions



class IncompleteCheckpointError(FileNotFoundError, ValueError):
    """A checkpoint that was not written (or copied) to the end: no valid ``state.json``, or a
    file it lists missing, truncated or different.  (Both a FileNotFoundError, like the missing
    ``state.json`` of old, and a ValueError.)"""


def trainable_state(model: PeftSpeechModel) -> dict[str, torch.Tensor]:
    """A CPU copy of the trained (PEFT + head) weights and the head's buffers."""
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in model.trained_tensors().items()}


def load_trainable_state(model: PeftSpeechModel, state: dict[str, torch.Tensor]) -> None:
    own = model.trained_tensors()
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
            save_predictions(directory / PREDICTIONS_DIR / predictions_file(split), evaluation)
    write_state(directory, state)
    return directory


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_files(directory: Path) -> list[str]:
    """Relative paths of the checkpoint's files, ``state.json`` and hidden temporaries aside."""
    out = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel != STATE_FILE and not any(part.startswith(".") for part in rel.split("/")):
            out.append(rel)
    return out


def write_state(directory: str | Path, state: CheckpointState) -> Path:
    """Write ``state.json`` listing every other file of ``directory`` (size, SHA-256), atomically:
    the last step of a checkpoint, which makes it complete (see the module docstring)."""
    directory = Path(directory)
    files = {rel: ((directory / rel).stat().st_size, _sha256(directory / rel)) for rel in _checkpoint_files(directory)}
    fd, tmp = tempfile.mkstemp(prefix=f".{STATE_FILE}.", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(state_json(state, files))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, directory / STATE_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return directory / STATE_FILE


def seal_checkpoint(directory: str | Path) -> Path:
    """Rewrite ``state.json`` so that it also lists files added after :func:`write_checkpoint`
    (e.g. a DARTS checkpoint's architecture state); :func:`report` does this for every checkpoint."""
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.is_file():
        raise IncompleteCheckpointError(f"checkpoint {directory}: no {STATE_FILE} to seal (write_checkpoint first)")
    return write_state(directory, CheckpointState.from_json(path.read_text()))


def listed_files(text: str) -> dict[str, tuple[int, str]] | None:
    """The ``files`` list of a ``state.json`` text (None: an older checkpoint without one).
    Raises :class:`IncompleteCheckpointError` when the text is not a valid state."""
    try:
        return _listed_files(text)
    except ValueError as err:
        raise IncompleteCheckpointError(str(err)) from None


def checkpoint_problem(directory: str | Path, hashes: bool = True) -> str | None:
    """Why the checkpoint in ``directory`` is incomplete, or None when it is complete.

    ``hashes=False`` compares sizes only (enough for a cut-off file, and cheap)."""
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.is_file():
        return f"no {STATE_FILE} (the checkpoint was not written to the end)"
    try:
        files = listed_files(path.read_text())
    except IncompleteCheckpointError as err:
        return str(err)
    for rel, (size, digest) in (files or {}).items():
        file = directory / rel
        if not file.is_file():
            return f"{rel} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{rel} has {actual} bytes, {STATE_FILE} lists {size} (cut off)"
        if hashes and _sha256(file) != digest:
            return f"{rel} differs from what {STATE_FILE} lists (SHA-256)"
    return None


def verify_checkpoint(directory: str | Path) -> None:
    """Raise :class:`IncompleteCheckpointError` (naming the folder and the first problem) unless
    the checkpoint in ``directory`` is complete."""
    problem = checkpoint_problem(directory)
    if problem is not None:
        raise IncompleteCheckpointError(f"checkpoint {directory} is incomplete: {problem}")


def read_state(directory: str | Path) -> CheckpointState:
    """The state of a complete checkpoint (else :class:`IncompleteCheckpointError`)."""
    verify_checkpoint(directory)
    return CheckpointState.from_json((Path(directory) / STATE_FILE).read_text())


def read_checkpoint(
    directory: str | Path,
    model: PeftSpeechModel | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
) -> tuple[CheckpointState, dict[str, torch.Tensor] | None]:
    """Restore what :func:`write_checkpoint` wrote into ``model``/``optimizer``/``scheduler``.

    Returns the state and the best-dev weights (None if the checkpoint has none). An incomplete
    checkpoint raises :class:`IncompleteCheckpointError` before anything is loaded.
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
    """Per-example predictions stored in a final checkpoint (see training.evaluate); an
    incomplete checkpoint raises :class:`IncompleteCheckpointError`."""
    path = Path(directory) / PREDICTIONS_DIR / predictions_file(split)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {directory}: no {split} predictions (not a final checkpoint?)")
    verify_checkpoint(directory)
    return load_predictions(path)


def complete_checkpoints(trial_dir: str | Path, below: int | None = None) -> list[Path]:
    """The complete ``checkpoint_NNNNNN`` folders of a (local) trial folder, newest first;
    ``below``: only those with a smaller index."""
    found = []
    for path in Path(trial_dir).iterdir() if Path(trial_dir).is_dir() else []:
        match = CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir() and (below is None or int(match.group(1)) < below):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found, reverse=True) if checkpoint_problem(path) is None]


def restore(model: PeftSpeechModel | None = None, *, optimizer=None, scheduler=None, on_restore=None,
            start_from: str | None = None):
    """Restore the trial's Ray checkpoint (``tune.get_checkpoint()``) with :func:`read_checkpoint`;
    returns ``(state, best_weights)``, or None when there is nothing to resume from.

    ``start_from`` (a checkpoint folder or URI): where a trial without a checkpoint of its own
    starts, e.g. the rung of the learning-rate protocol that it continues (:mod:`pefttune.tuning`):
    the same trial config and seed, so it goes on exactly as if it had trained those epochs itself.

    An incomplete checkpoint (:class:`IncompleteCheckpointError`) is never read: the trial goes
    back to the newest complete checkpoint before it in the same trial folder (local storage),
    else starts from scratch, and says so.  ``on_restore(path)`` runs with the checkpoint
    folder that was read (e.g. to read more files of it)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None and start_from:
        checkpoint = tune.Checkpoint(start_from)
    if checkpoint is None:
        return None
    local = getattr(checkpoint.filesystem, "type_name", "") in ("local", ATOMIC_LOCAL)
    with contextlib.nullcontext(checkpoint.path) if local else checkpoint.as_directory() as path:
        try:
            restored = read_checkpoint(path, model, optimizer=optimizer, scheduler=scheduler)
            if on_restore is not None:
                on_restore(Path(path))
            return restored
        except IncompleteCheckpointError as err:
            problem = str(err)
    match = CHECKPOINT_NAME.match(Path(checkpoint.path).name)
    local = Path(checkpoint.path).parent if match and Path(checkpoint.path).is_dir() else None
    for older in complete_checkpoints(local, below=int(match.group(1))) if local is not None else []:
        print(f"[pefttune] {problem}; resuming from {older.name} instead", flush=True)
        restored = read_checkpoint(older, model, optimizer=optimizer, scheduler=scheduler)
        if on_restore is not None:
            on_restore(older)
        return restored
    print(f"[pefttune] {problem}; no complete checkpoint before it: the trial starts again", flush=True)
    return None


def report(metrics: dict, write: Callable[[Path], None] | None = None) -> None:
    """``tune.report`` the metrics, with a checkpoint written by ``write(dir)`` if given.

    The checkpoint is written to a temporary directory that Ray copies to the
    experiment's storage during the call; the temporary copy is removed afterwards.
    """
    if write is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="pefttune-ckpt-") as tmp:
        write(Path(tmp))
        seal_checkpoint(tmp)  # state.json lists what write added after write_checkpoint too
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
