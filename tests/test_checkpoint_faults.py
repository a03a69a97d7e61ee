"""A checkpoint cut off in the middle of its write is never read as complete.

``state.json`` is written last and atomically, and lists every other file with its size and
SHA-256 (:mod:`pefttune.trainables.checkpoint`).  Without Ray: writers made to fail half-way
(predictions, optimizer state, the rename of ``state.json``) and files cut off or changed
afterwards are refused with :class:`IncompleteCheckpointError`.  With Ray: one small search
whose trials get the same placement and seed; two of them have a checkpoint cut off by a
fault hook and are then failed (Ray restores them from that very checkpoint): one's epoch-2
weights, the other's final predictions.  They resume from their previous complete
checkpoint and end with the numbers of the undamaged one.  A copy of that search with one
trial's predictions cut off and another's ``state.json`` removed is then reported:
``pefttune report`` exits 0 and the two trials are ``incomplete``, out of every comparison.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pefttune.heads import HeadConfig
from pefttune.model import build_model
from pefttune.placement import Placement
from pefttune.schema import PREDICTIONS_DIR, STATE_FILE, CheckpointState, predictions_file
from pefttune.trainables import checkpoint as ckpt
from pefttune.trainables.checkpoint import IncompleteCheckpointError
from pefttune.training import Evaluation, TrainConfig, setup_optimizer, setup_scheduler

PLACEMENT = {"num_layers": 4, "layers": ["lora", "none", "bitfit", "none"]}


def _model():
    torch.manual_seed(0)
    model = build_model("tiny-hubert", Placement.from_dict(PLACEMENT),
                        HeadConfig(kind="linear", num_outputs=3, task="classification"))
    optimizer = setup_optimizer(model, TrainConfig(epochs=2, lr=0.01))
    return model, optimizer, setup_scheduler(optimizer, 6, 0.0)


def _predictions() -> dict[str, Evaluation]:
    rng = np.random.default_rng(0)
    arrays = {"index": np.arange(50), "probs": rng.random((50, 3)).astype(np.float32),
              "label": rng.integers(0, 3, 50), "pred": rng.integers(0, 3, 50)}
    return {split: Evaluation(metric="accuracy", score=0.5, loss=0.5, arrays=arrays) for split in ("dev", "test")}


def _write(directory: Path, epoch: int, predictions=None) -> Path:
    model, optimizer, scheduler = _model()
    state = CheckpointState(epoch=epoch, best_score=0.5, best_epoch=epoch, finished=predictions is not None)
    return ckpt.write_checkpoint(directory, model, state, optimizer=optimizer, scheduler=scheduler,
                                 best_weights=ckpt.trainable_state(model), predictions=predictions)


def _cut(path: Path) -> None:
    """Keep the first half of a file, as a kill while it was written or copied would."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_state_json_is_last_and_lists_every_file(tmp_path):
    directory = _write(tmp_path / "ckpt", 1, _predictions())
    listed = json.loads((directory / STATE_FILE).read_text())["files"]
    assert set(listed) == {"trainer_state.pt", "model/adapter.safetensors", "model/placement.json",
                           "model/model.json", "best/adapter.safetensors", "best/placement.json", "best/model.json",
                           "predictions/dev.safetensors", "predictions/test.safetensors"}
    for rel, (size, digest) in listed.items():
        assert (directory / rel).stat().st_size == size and len(digest) == 64
    assert ckpt.read_state(directory).epoch == 1 and ckpt.checkpoint_problem(directory) is None
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize("writer", ["save_predictions", "torch.save"])
def test_a_write_killed_before_state_json_is_incomplete(tmp_path, monkeypatch, writer):
    """The writer of the predictions (or of the optimizer state) dies half-way through its file,
    after the weights: no state.json, so the checkpoint is refused, never half read."""
    def half_then_die(*args, **kwargs):
        path = Path(args[0] if writer == "save_predictions" else args[1])
        path.write_bytes(b"\0" * 100)  # the start of the file ...
        raise KeyboardInterrupt("killed mid-write")  # ... then the process is gone

    if writer == "save_predictions":
        monkeypatch.setattr(ckpt, "save_predictions", half_then_die)
    else:
        monkeypatch.setattr(ckpt.torch, "save", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path / "ckpt", 2, _predictions())
    assert (tmp_path / "ckpt" / "model" / "adapter.safetensors").is_file()  # the weights were written
    model, optimizer, scheduler = _model()
    before = {k: v.clone() for k, v in ckpt.trainable_state(model).items()}
    with pytest.raises(IncompleteCheckpointError, match=r"ckpt is incomplete: no state\.json"):
        ckpt.read_checkpoint(tmp_path / "ckpt", model, optimizer=optimizer, scheduler=scheduler)
    with pytest.raises(IncompleteCheckpointError):
        ckpt.read_state(tmp_path / "ckpt")
    for name, tensor in ckpt.trainable_state(model).items():  # nothing was loaded
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)


def test_state_json_is_replaced_atomically(tmp_path, monkeypatch):
    """A kill while state.json is renamed into place leaves no state.json (the temporary file
    is hidden and never read), so the checkpoint stays incomplete."""
    def die(src, dst):
        raise KeyboardInterrupt("killed at the rename")

    monkeypatch.setattr(ckpt.os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path / "ckpt", 1)
    assert not (tmp_path / "ckpt" / STATE_FILE).exists()
    assert "no state.json" in ckpt.checkpoint_problem(tmp_path / "ckpt")


@pytest.mark.parametrize("damage", ["cut weights", "cut predictions", "changed bytes", "missing file",
                                    "cut state.json"])
def test_files_cut_off_after_the_seal_are_refused(tmp_path, damage):
    """What a kill while Ray copied the checkpoint (in any order), or storage losing data, leaves."""
    directory = _write(tmp_path / "ckpt", 3, _predictions())
    if damage == "cut weights":
        _cut(directory / "model" / "adapter.safetensors")
        expected = r"model/adapter\.safetensors has \d+ bytes, state\.json lists \d+ \(cut off\)"
    elif damage == "cut predictions":
        _cut(directory / PREDICTIONS_DIR / predictions_file("test"))
        expected = r"predictions/test\.safetensors has \d+ bytes"
    elif damage == "changed bytes":
        data = bytearray((directory / "best" / "adapter.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (directory / "best" / "adapter.safetensors").write_bytes(bytes(data))
        expected = r"best/adapter\.safetensors differs from what state\.json lists"
    elif damage == "missing file":
        (directory / "trainer_state.pt").unlink()
        expected = r"trainer_state\.pt is missing"
    else:
        _cut(directory / STATE_FILE)
        expected = r"state\.json is not valid JSON"
    with pytest.raises(IncompleteCheckpointError, match=expected):
        ckpt.read_state(directory)
    with pytest.raises(IncompleteCheckpointError, match=expected):
        ckpt.read_checkpoint(directory, _model()[0])
    with pytest.raises(IncompleteCheckpointError):
        ckpt.checkpoint_predictions(directory, "test")


def test_older_state_without_a_file_list_is_read(tmp_path):
    directory = _write(tmp_path / "ckpt", 1)
    state = json.loads((directory / STATE_FILE).read_text())
    del state["files"]
    (directory / STATE_FILE).write_text(json.dumps(state))
    assert ckpt.read_state(directory).epoch == 1


def test_the_newest_complete_checkpoint_is_found(tmp_path):
    for index in range(3):
        _write(tmp_path / f"checkpoint_{index:06d}", index + 1)
    _cut(tmp_path / "checkpoint_000002" / "model" / "adapter.safetensors")
    (tmp_path / "checkpoint_000003" / "model").mkdir(parents=True)  # a copy that barely began
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["checkpoint_000001", "checkpoint_000000"]
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path, below=1)] == ["checkpoint_000000"]


# -- with Ray: trials resume from their previous complete checkpoint ---------------------------------

EPOCHS = 3


def cut_then_fail(kind: str, epoch: int, files: tuple[str, ...]):
    """An ``after_epoch`` hook: once, after ``epoch``'s report by a trial of ``kind``, cut its newest
    checkpoint's ``files`` in half (as a kill in the middle of their write or copy leaves them),
    then fail the trial, so Ray restores it from that checkpoint.  (A closure: Ray's workers
    get it by value.)"""
    def hook(trial_config, at_epoch, trial_dir):
        from pathlib import Path as _Path

        if trial_config.get("kind") != kind or at_epoch != epoch or trial_dir is None:
            return
        marker = _Path(trial_dir) / "CUT_ONCE"
        if marker.exists():
            return
        marker.write_text(str(epoch))
        newest = max(_Path(trial_dir).glob("checkpoint_*"))
        for rel in files:
            data = (newest / rel).read_bytes()
            (newest / rel).write_bytes(data[: len(data) // 2])
        (_Path(trial_dir) / "CUT_CHECKPOINT").write_text(newest.name)
        raise RuntimeError(f"killed while writing {newest.name}")
    return hook


@pytest.fixture(scope="module")
def search(ray_session, tmp_path_factory):
    from pefttune.config import parse_config
    from pefttune.search.run import run_search
    from pefttune.search.space import FixedPoint
    from pefttune.testing import Faults, chain
    from test_search_fixtures import search_config, write_tone_manifest

    root = tmp_path_factory.mktemp("faults")
    manifest = write_tone_manifest(root / "data", classes=3, per_split={"train": 8, "dev": 4, "test": 4})
    config = parse_config(search_config(
        manifest, root / "results", name="cut", methods={"lora": {"rank": 2}},
        train={"epochs": EPOCHS, "max_steps_per_epoch": 3},
        search={"num_samples": 0, "hybrid": False, "max_failures": 1, "replicate_top": 0},
    ))
    points = [FixedPoint(kind, placement=PLACEMENT) for kind in ("reference", "cut-weights", "cut-predictions")]
    faults = Faults(after_epoch=chain(
        cut_then_fail("cut-weights", 2, ("model/adapter.safetensors", "best/adapter.safetensors")),
        cut_then_fail("cut-predictions", EPOCHS, ("predictions/test.safetensors",)),
    ))
    results = run_search(config, extra_points=points, verbose=0, faults=faults, replicates=False)
    frame = pd.DataFrame([r.metrics for r in results]).set_index("kind")
    return {"frame": frame, "path": root / "results" / "cut", "root": root}


def _trial_dir(path: Path, trial_id: str) -> Path:
    (found,) = [p for p in path.glob(f"train_fn_{trial_id}*") if p.is_dir()]
    return found


def test_trials_cut_mid_write_resume_from_the_previous_complete_checkpoint(search):
    from pefttune.analysis.store import open_results

    frame, path = search["frame"], search["path"]
    assert set(frame.index) >= {"reference", "cut-weights", "cut-predictions"}
    # the damaged checkpoints were the ones Ray restored from (epoch 2's, the final one) ...
    weights_dir = _trial_dir(path, frame.loc["cut-weights", "trial_id"])
    predictions_dir = _trial_dir(path, frame.loc["cut-predictions", "trial_id"])
    assert (weights_dir / "CUT_CHECKPOINT").read_text() == "checkpoint_000001"
    assert (predictions_dir / "CUT_CHECKPOINT").read_text() == "checkpoint_000002"
    # ... and the trials went back to the complete one before it (epoch 1, epoch 2; Ray keeps
    # the newest checkpoints only, so the cut ones are gone by now)
    assert frame.loc["reference", "start_epoch"] == 1
    assert frame.loc["cut-weights", "start_epoch"] == 2
    assert frame.loc["cut-predictions", "start_epoch"] == EPOCHS
    # with the numbers of the trial never cut (same placement, seed and data order): its
    # optimizer, scheduler and RNG state came from the complete checkpoint (tolerance 1e-6)
    experiment = open_results(path)
    reference = experiment.predictions(frame.loc["reference", "trial_id"], "test")
    for kind in ("cut-weights", "cut-predictions"):
        for key in ("test_accuracy", "best_dev_accuracy", "test_loss"):
            assert frame.loc[kind, key] == pytest.approx(frame.loc["reference", key], abs=1e-6), (kind, key)
        trial = experiment.trial(frame.loc[kind, "trial_id"])
        assert trial.outcome == "completed" and trial.note is None
        stored = experiment.predictions(trial, "test")
        np.testing.assert_allclose(stored["probs"], reference["probs"], atol=1e-6)
        np.testing.assert_array_equal(stored["index"], reference["index"])


def test_report_flags_trials_with_files_cut_off(search, tmp_path):
    """A copy of the finished search, one trial's predictions cut off and another's final
    state.json removed: the report runs (exit 0), flags both, and compares neither."""
    from pefttune.cli import main as cli_main

    frame = search["frame"]
    copy = tmp_path / "cut"
    shutil.copytree(search["path"], copy)
    reference = _trial_dir(copy, frame.loc["reference", "trial_id"])
    final = max(reference.glob("checkpoint_*"))
    _cut(final / PREDICTIONS_DIR / predictions_file("test"))
    uniform = _trial_dir(copy, frame.loc["uniform", "trial_id"])
    (max(uniform.glob("checkpoint_*")) / STATE_FILE).unlink()

    assert cli_main(["report", str(copy)]) == 0
    trials = pd.read_parquet(copy / "analysis" / "tables" / "trials.parquet").set_index("kind")
    assert trials.loc["reference", "outcome"] == "incomplete"
    assert "predictions/test.safetensors has" in trials.loc["reference", "note"]
    assert trials.loc["uniform", "outcome"] == "incomplete"
    assert "no state.json" in trials.loc["uniform", "note"]
    for kind in ("reference", "uniform"):
        assert not trials.loc[kind, "usable"] and not trials.loc[kind, "has_predictions"]
    for kind in ("cut-weights", "cut-predictions"):  # their damaged checkpoints are older ones
        assert trials.loc[kind, "outcome"] == "completed" and pd.isna(trials.loc[kind, "note"])
    configs = pd.read_parquet(copy / "analysis" / "tables" / "configs.parquet")
    compared = ",".join(configs["trial_ids"].astype(str))
    for kind in ("reference", "uniform"):
        assert str(trials.loc[kind, "trial_id"]) not in compared
    assert str(trials.loc["cut-weights", "trial_id"]) in compared
    summary = json.loads((copy / "analysis" / "summary.json").read_text())
    assert summary["outcomes"].get("incomplete") == 2
    assert os.path.getsize(final / PREDICTIONS_DIR / predictions_file("test")) > 0  # the file was read around, not "fixed"
