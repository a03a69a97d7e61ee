"""Trial helpers shared by the trainables (no Ray): data from a manifest, checkpoints that
resume exactly, the final evaluation with predictions, and the result-table helpers."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pefttune.config import parse_config
from pefttune.heads import HeadConfig
from pefttune.model import build_model, load_model_dir
from pefttune.placement import Placement
from pefttune.schema import CheckpointState, TrialKind
from pefttune.search.summary import pareto_front, summary_table, top_k
from pefttune import backbones
from pefttune.trainables import checkpoint as ckpt
from pefttune.runtime import cluster
from pefttune.data import loaders
from pefttune import metrics
from pefttune.runtime import study_dir as results
from pefttune.trainables import setup as trial_setup
from pefttune.training import fit, setup_optimizer, setup_scheduler
from test_search_fixtures import search_config, search_row, write_tone_manifest


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    manifest = write_tone_manifest(tmp_path_factory.mktemp("tones"), classes=3,
                                   per_split={"train": 6, "dev": 2, "test": 2})
    config = parse_config(search_config(manifest, tmp_path_factory.mktemp("results"),
                                        data={"batch_size": 4}, train={"epochs": 2, "max_steps_per_epoch": 3}))
    return config, loaders.prepare_data(config)


def test_prepare_and_load_data(setup):
    config, ref = setup
    assert ref.task_kind == "classification" and ref.vocab == {"kind": "labels", "labels": ["tone0", "tone1", "tone2"]}
    head = ref.head_config(config)
    assert head.num_outputs == 3 and head.kind == "linear"
    data = loaders.load_data(config, ref, seed=0)
    assert len(data.train.dataset) == 18 and len(data.dev.dataset) == 6 and len(data.test.dataset) == 6
    batch = next(iter(data.dev))
    assert batch["input_values"].shape[0] == 4 and batch["labels"].dtype == torch.long
    lengths = batch["attention_mask"].sum(1)
    assert (lengths <= batch["input_values"].shape[1]).all() and (lengths >= 6400).all()
    for row, length in zip(batch["input_values"], lengths):
        assert (row[int(length):] == 0).all()
    indices = torch.cat([b["index"] for b in data.test]).tolist()
    assert len(set(indices)) == 6  # manifest row ids, unique across the split


def test_epoch_sampler_resumes_the_order():
    straight = loaders.EpochSampler(10, seed=3)
    orders = [list(straight) for _ in range(3)]
    assert orders[0] != orders[1] and sorted(orders[2]) == list(range(10))
    resumed = loaders.EpochSampler(10, seed=3)
    resumed.set_epoch(2)  # epochs 1 and 2 done before the interruption
    assert list(resumed) == orders[2]


def test_epoch_sampler_length_buckets():
    """Bucketed: the loader's consecutive batch_size chunks hold similar lengths (little padding),
    every example once per epoch, the one short batch last, the order new each epoch and resumable."""
    rng = np.random.default_rng(0)
    lengths = rng.uniform(1.0, 4.5, 250)
    plain, bucketed = (loaders.EpochSampler(250, seed=1, lengths=x, batch_size=16, pool_batches=5)
                       for x in (None, lengths))

    def padded(order):  # compute spent on the padded batches / compute on the audio itself
        return sum(lengths[order[i:i + 16]].max() * len(order[i:i + 16]) for i in range(0, 250, 16)) / lengths.sum()

    orders = [list(bucketed) for _ in range(3)]
    assert all(sorted(o) == list(range(250)) for o in orders) and orders[0] != orders[1]
    assert padded(orders[0]) < 1.15 < 1.3 < padded(list(plain))
    last = orders[0][240:]  # 250 = 15 * 16 + 10: the short batch comes last
    assert len(last) == 10
    resumed = loaders.EpochSampler(250, seed=1, lengths=lengths, batch_size=16, pool_batches=5)
    resumed.set_epoch(2)
    assert list(resumed) == orders[2]
    with pytest.raises(ValueError, match="one length per example"):
        loaders.EpochSampler(250, seed=1, lengths=lengths[:-1], batch_size=16)


def _trial(config, ref, device="cpu"):
    info = backbones.backbone_info(config.backbone)
    placement = Placement.from_dict({"num_layers": info.num_layers, "layers": ["lora", "none", "bitfit", "sequential"]})
    train = trial_setup.train_config(config, lr=0.01)
    torch.manual_seed(train.seed)
    data = loaders.load_data(config, ref, seed=train.seed)
    model = build_model(config.backbone, placement, ref.head_config(config))
    optimizer = setup_optimizer(model, train)
    scheduler = setup_scheduler(optimizer, train.epochs * data.steps_per_epoch(train.max_steps_per_epoch), 0.5)
    return model, data, optimizer, scheduler, train


def test_checkpoint_resume_gives_the_same_weights(setup, tmp_path):
    """Two epochs straight == one epoch, checkpoint, a fresh process state, one more epoch."""
    config, ref = setup
    model, data, optimizer, scheduler, train = _trial(config, ref)
    fit(model, data.train, data.dev, train, optimizer=optimizer, scheduler=scheduler)
    straight = ckpt.trainable_state(model)

    model, data, optimizer, scheduler, train = _trial(config, ref)
    state = CheckpointState()

    def stop_after_first(result):
        state.epoch, state.best_score, state.best_epoch = result.epoch, result.dev.score, result.epoch
        ckpt.write_checkpoint(tmp_path / "ckpt", model, state, optimizer=optimizer, scheduler=scheduler,
                                best_weights=ckpt.trainable_state(model), metadata={"epoch": result.epoch})
        raise KeyboardInterrupt  # the interruption

    with pytest.raises(KeyboardInterrupt):
        fit(model, data.train, data.dev, train, optimizer=optimizer, scheduler=scheduler, on_epoch=stop_after_first)
    torch.manual_seed(1234)  # a different RNG state: the checkpoint must restore it

    model, data, optimizer, scheduler, train = _trial(config, ref)
    restored, best = ckpt.read_checkpoint(tmp_path / "ckpt", model, optimizer=optimizer, scheduler=scheduler)
    assert restored.epoch == 1 and restored.best_epoch == 1 and set(best) == set(straight)
    data.train_sampler.set_epoch(restored.epoch)
    fit(model, data.train, data.dev, train, optimizer=optimizer, scheduler=scheduler, start_epoch=restored.epoch + 1)
    resumed = ckpt.trainable_state(model)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6)
    assert scheduler.last_epoch == 2 * 3
    files = {p.relative_to(tmp_path / "ckpt").as_posix() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    assert files == {
        "state.json", "trainer_state.pt", "model/adapter.safetensors", "model/placement.json", "model/model.json",
        "best/adapter.safetensors", "best/placement.json", "best/model.json",
    }


def test_final_evaluation_uses_the_best_weights(setup, tmp_path):
    config, ref = setup
    model, data, optimizer, scheduler, train = _trial(config, ref)
    best = ckpt.trainable_state(model)  # "best" = the initial weights
    fit(model, data.train, data.dev, train, optimizer=optimizer, scheduler=scheduler)
    evaluations = ckpt.final_evaluation(model, best, {"dev": data.dev, "test": data.test}, train)
    fresh, *_ = _trial(config, ref)
    from pefttune.training import evaluate

    expected = evaluate(fresh, data.test, train)
    np.testing.assert_allclose(evaluations["test"].arrays["probs"], expected.arrays["probs"], atol=1e-6)
    state = CheckpointState(epoch=2, best_score=0.5, best_epoch=1, finished=True, metrics={"test_accuracy": 1.0})
    ckpt.write_checkpoint(tmp_path, model, state, best_weights=best, predictions=evaluations)
    stored = ckpt.checkpoint_predictions(tmp_path, "test")
    assert set(stored) == {"index", "probs", "label", "pred"}
    np.testing.assert_array_equal(stored["pred"], evaluations["test"].arrays["pred"])
    assert ckpt.read_state(tmp_path).metrics == {"test_accuracy": 1.0}
    reloaded = load_model_dir(tmp_path / "best")
    for name, tensor in reloaded.trainable_named_parameters().items():
        torch.testing.assert_close(tensor.detach(), best[name])
    with pytest.raises(FileNotFoundError, match="no dev predictions"):
        ckpt.checkpoint_predictions(tmp_path / "model", "dev")


def test_placement_columns_and_worst_scores():
    placement = Placement.from_dict({"num_layers": 3, "layers": ["lora", [], ["bitfit", "lora"]]})
    columns = results.placement_columns(placement)
    assert columns["layer_00"] == "lora" and columns["layer_01"] == "none" and columns["layer_02"] == "bitfit+lora"
    assert Placement.from_json(columns["placement"]) == placement
    assert columns["placement_short"] == placement.short()
    assert results.parse_placement(columns["placement"]) == placement
    with pytest.raises(ValueError, match="trial config 'placement': not valid JSON"):
        results.parse_placement("{oops")
    assert metrics.worst_score("max") == 0.0 and metrics.worst_score("min") == float("inf")


def _frame():
    uniform, discrete, hybrid = TrialKind.UNIFORM, TrialKind.DISCRETE, TrialKind.HYBRID
    rows = [
        # kind, score, params, status, over budget, stopped early
        (uniform, 0.70, 900, "TERMINATED", False, False),
        (discrete, 0.80, 500, "TERMINATED", False, False),
        (discrete, 0.80, 400, "TERMINATED", False, False),
        (discrete, 0.60, 100, "TERMINATED", False, False),
        (discrete, 0.95, 300, "TERMINATED", False, True),
        (hybrid, 0.00, 9000, "TERMINATED", True, False),
        (discrete, np.nan, 200, "ERROR", False, False),
    ]
    frame = pd.DataFrame([search_row(f"t{i}", kind, score, params, status=status, over_budget=over, stopped_early=early)
                          for i, (kind, score, params, status, over, early) in enumerate(rows)])
    frame["method"] = ["lora", "", "", "", "", "", ""]
    frame["placement_short"] = [f"P{i}" for i in range(len(frame))]
    frame["epoch"] = 3
    frame["error"] = ["", "", "", "", "", "", "DivergedError: loss became nan"]
    return frame


def test_top_k_and_pareto_front():
    frame = _frame()
    best = top_k(frame, "best_dev_accuracy", "max", k=3)
    assert list(best["trial_id"]) == ["t1", "t2", "t0"]  # ties: by trial id
    assert list(top_k(frame, "best_dev_accuracy", "min", k=2)["trial_id"]) == ["t3", "t0"]
    assert list(top_k(frame, "best_dev_accuracy", "max", kinds=["uniform"])["trial_id"]) == ["t0"]
    front = pareto_front(frame, "best_dev_accuracy", "max")
    assert list(front["trial_id"]) == ["t3", "t2"]  # t1 and t0 are dominated by t2


def test_summary_table_sections():
    frame = _frame()
    config = parse_config({"search": {"multi_objective": True}})
    text = summary_table(frame, config, k=2)
    assert "7 trials" in text and "4 finished, 1 stopped early, 1 over budget, 1 errors" in text
    assert "best 2 trials by best_dev_accuracy" in text and "uniform baselines and hybrid" in text
    assert "Pareto front" in text and "DivergedError: loss became nan" in text
    assert json.dumps(text)


def test_gpu_trials_wait_for_their_share_of_free_memory(monkeypatch):
    """A GPU trial waits until the GPU's free memory reaches its share (mocked CUDA)."""
    import torch

    from pefttune import backbones
    from pefttune.trainables import checkpoint as ckpt
    from pefttune.runtime import cluster
    from pefttune.data import loaders
    from pefttune import metrics
    from pefttune.runtime import study_dir as results
    from pefttune.trainables import setup as trial_setup

    readings = iter([(10, 100), (20, 100), (30, 100), (60, 100)])  # memory being released
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: next(readings))
    assert cluster.trial_device(0.5, wait_s=10, poll_s=0.0).type == "cuda"
    with pytest.raises(StopIteration):  # all four readings were needed: it waited for 60 >= 50
        next(readings)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (1, 100))
    assert cluster.wait_for_gpu_memory(0.5, wait_s=0.0, poll_s=0.0) == pytest.approx(0.0, abs=0.1)  # gives up


def test_method_lr_gives_a_method_its_own_learning_rate():
    """train.method_lr: the named method's parameters (wherever they live: LoRA's sit in the
    wrapped projection) get their lr; the others and the head keep train.lr; bad names and
    values are refused with the field."""
    config = parse_config({"train": {"lr": 0.01, "method_lr": {"bitfit": 0.02, "lora": 0.005}}})
    train = trial_setup.train_config(config)
    placement = Placement.from_dict({"num_layers": 4, "layers": [["bitfit", "lora"], ["bitfit"], ["sequential"], []]})
    model = build_model("tiny-hubert", placement, HeadConfig(kind="linear", num_outputs=3, task="classification"))
    groups = {g["name"]: g for g in setup_optimizer(model, train).param_groups}
    assert {n: g["lr"] for n, g in groups.items()} == {"peft": 0.01, "peft:lora": 0.005, "peft:bitfit": 0.02,
                                                       "head": 0.01}
    ids = {n: {id(p) for p in g["params"]} for n, g in groups.items()}
    layers = model.encoder.layers
    assert ids["peft:bitfit"] == {id(p) for i in (0, 1) for p in layers[i].pefttune["bitfit"].trainable_parameters()}
    assert ids["peft:lora"] == {id(p) for p in layers[0].pefttune["lora"].trainable_parameters()}
    assert ids["peft"] == {id(p) for p in layers[2].pefttune["sequential"].trainable_parameters()}
    plain = setup_optimizer(model, trial_setup.train_config(parse_config({"train": {"lr": 0.01}})))
    assert [g["name"] for g in plain.param_groups] == ["peft", "head"]
    with pytest.raises(ValueError, match=r"train.method_lr: \['prefix'\] not among"):
        parse_config({"train": {"method_lr": {"prefix": 0.1}}})
    with pytest.raises(ValueError, match="bitfit: -1"):
        parse_config({"train": {"method_lr": {"bitfit": -1}}})
