"""DARTS convergence: normalised entropy, top-2 margin, argmax stability, k arch steps per weight step."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import audio_batch, perturb

from pefttune.config import DartsSection
from pefttune.darts import (
    ConvergenceTracker,
    Relaxation,
    build_supernet,
    convergence,
    convergence_table,
    convergence_tracker,
    history_convergence,
    make_architect,
    search_hooks,
)
from pefttune.heads import HeadConfig
from pefttune.training import TrainConfig

NAMES = ["none", "sequential", "lora", "bitfit"]


def peaked(top: int, p_top: float, k: int = 4) -> list[float]:
    """A row with ``p_top`` on ``top`` and the rest spread evenly."""
    row = [(1 - p_top) / (k - 1)] * k
    row[top] = p_top
    return row


# -- one probability matrix -----------------------------------------------------------------------


def test_convergence_of_uniform_peaked_and_known_rows():
    uniform = np.full((3, 5), 0.2)
    result = convergence(uniform)
    assert result["entropy_norm"] == pytest.approx([1.0, 1.0, 1.0])
    assert result["margin"] == pytest.approx([0.0, 0.0, 0.0])
    assert result["entropy_norm_mean"] == pytest.approx(1.0) and not result["converged"]

    probs = np.array([peaked(1, 0.97, 5), peaked(2, 0.9, 5), [0.5, 0.5, 0.0, 0.0, 0.0]])
    result = convergence(probs, threshold=0.7)
    h = [-(p * np.log(p)).sum() / math.log(5) for p in (np.array(peaked(1, 0.97, 5)), np.array(peaked(2, 0.9, 5)))]
    assert result["entropy_norm"] == pytest.approx(h + [math.log(2) / math.log(5)])
    assert result["margin"] == pytest.approx([0.97 - 0.0075, 0.9 - 0.025, 0.0])
    assert result["margin_min"] == pytest.approx(0.0) and result["margin_mean"] == pytest.approx(np.mean(result["margin"]))
    assert result["argmax"].tolist() == [1, 2, 0]
    assert result["entropy_norm_mean"] < 0.7 and result["converged"]
    # the threshold decides; rows that do not sum to 1 (Fair-DARTS sigmoids) are normalised first
    assert not convergence(probs, threshold=0.1)["converged"]
    assert convergence(3 * probs)["entropy_norm"] == pytest.approx(result["entropy_norm"])
    # with the previous argmax: a changed argmax is not converged, whatever the entropy
    assert convergence(probs, previous_argmax=[1, 2, 0])["converged"]
    changed = convergence(probs, previous_argmax=[1, 3, 0])
    assert changed["argmax_changed"] and not changed["converged"]
    with pytest.raises(ValueError):
        convergence(np.array([0.5, 0.5]))
    with pytest.raises(ValueError):
        convergence(probs, threshold=0.0)


def test_tracker_reports_flat_metrics_and_counts_stable_epochs():
    tracker = ConvergenceTracker(0.7, previous=np.zeros(2, dtype=int))
    first = tracker.update(np.full((2, 4), 0.25))  # uniform: argmax none, as before
    assert set(first) == {"entropy_norm/L00", "entropy_norm/L01", "margin/L00", "margin/L01", "entropy_norm_mean",
                          "margin_min", "margin_mean", "argmax_changed", "argmax_stable_epochs", "none_argmax_share",
                          "entropy_converged", "converged", "converged_entropy"}
    assert first["entropy_norm/L01"] == pytest.approx(1.0) and first["margin/L00"] == pytest.approx(0.0)
    assert not first["argmax_changed"] and first["argmax_stable_epochs"] == 1 and first["none_argmax_share"] == 1.0
    assert not first["converged"] and first["converged_entropy"] == 0.7
    second = tracker.update(np.array([peaked(2, 0.95), peaked(1, 0.95)]))
    assert second["argmax_changed"] and second["argmax_stable_epochs"] == 0 and not second["converged"]
    assert second["entropy_converged"]  # low entropy, but the argmax moved
    assert second["margin/L00"] == pytest.approx(0.95 - 0.05 / 3) and second["none_argmax_share"] == 0.0
    third = tracker.update(np.array([peaked(2, 0.96), peaked(1, 0.96)]))
    assert not third["argmax_changed"] and third["argmax_stable_epochs"] == 1 and third["converged"]


# -- a whole alpha history ---------------------------------------------------------------------------


def history(rows_per_epoch: list[list[list[float]]], trial_id: str = "t0") -> pd.DataFrame:
    """An alpha table (columns as :func:`pefttune.analysis.tables.alpha_table`) from (L x K) rows per epoch."""
    records = []
    for epoch, matrix in enumerate(rows_per_epoch, start=1):
        for layer, row in enumerate(matrix):
            for method, prob in zip(NAMES, row):
                records.append({"trial_id": trial_id, "experiment": "darts", "training_iteration": epoch,
                                "epoch": epoch, "layer": layer, "method": method, "prob": prob})
    return pd.DataFrame(records)


UNIFORM = [[0.25] * 4] * 3


def test_history_converged():
    frame = history([UNIFORM, [peaked(2, 0.5), peaked(1, 0.5), peaked(0, 0.5)],
                     [peaked(2, 0.9), peaked(1, 0.9), peaked(0, 0.9)], [peaked(2, 0.95), peaked(1, 0.95), peaked(0, 0.95)]])
    judged = history_convergence(frame)
    assert judged["converged"] and judged["epochs"] == 4 and judged["final_epoch"] == 4
    assert judged["entropy_norm_mean"] == pytest.approx(convergence(np.array([peaked(2, 0.95)] * 3))["entropy_norm_mean"])
    assert judged["margin_min"] == pytest.approx(0.95 - 0.05 / 3)
    assert judged["argmax"] == ["lora", "sequential", "none"]
    assert judged["argmax_changes"] == 1  # epoch 1 -> 2 (uniform rows' argmax is none)
    assert judged["epochs_since_argmax_change"] == 2
    assert judged["none_share"] == pytest.approx(1 / 3)


def test_history_not_converged_near_uniform():
    frame = history([UNIFORM, [peaked(2, 0.3)] * 3, [peaked(2, 0.32)] * 3])
    judged = history_convergence(frame)
    assert judged["entropy_norm_mean"] > 0.9 and not judged["converged"]
    assert judged["epochs_since_argmax_change"] == 1  # stable, but still near uniform
    assert history_convergence(frame, threshold=0.995)["converged"]  # the threshold is what failed


def test_history_argmax_still_flipping_is_not_converged():
    frame = history([UNIFORM, [peaked(2, 0.9)] * 3, [peaked(1, 0.9)] * 3, [peaked(2, 0.92)] * 3])
    judged = history_convergence(frame)
    assert judged["entropy_norm_mean"] < 0.7  # low entropy, but the argmax changed in the last epoch
    assert judged["argmax_changes"] == 3 and judged["epochs_since_argmax_change"] == 0
    assert not judged["converged"] and judged["entropy_converged"]
    assert history_convergence(frame, stable_epochs=0)["converged"]  # entropy alone would pass
    # one table, several trials: judged per trial
    both = pd.concat([frame, history([UNIFORM, [peaked(3, 0.95)] * 3, [peaked(3, 0.97)] * 3], "t1")])
    with pytest.raises(ValueError, match="several trials"):
        history_convergence(both)
    table = convergence_table(both)
    assert table["trial_id"].tolist() == ["t0", "t1"] and table["converged"].tolist() == [False, True]
    assert table.loc[1, "argmax"] == "bitfit bitfit bitfit" and table.loc[1, "none_share"] == 0.0


# -- the search's reported metrics on a tiny supernet -----------------------------------------------------------


HEAD = HeadConfig("classification", 3)
CANDIDATES = {"lora": {"rank": 2}, "bitfit": {}}


def tiny_supernet(seed: int = 0):
    torch.manual_seed(seed)
    net = build_supernet("tiny-hubert", CANDIDATES, HEAD, mix="gated", relaxation=Relaxation("softmax"))
    perturb(net.model, seed=seed, std=0.05)  # off the zero init, so alpha gets a gradient
    return net


def batches(n: int, seed: int = 0) -> list[dict]:
    out = []
    for i in range(n):
        x, mask = audio_batch(seed + i)
        out.append({"input_values": x, "attention_mask": mask, "labels": torch.tensor([i % 3, (i + 1) % 3])})
    return out


def test_search_reports_convergence_metrics_of_the_supernet():
    net = tiny_supernet()
    data = batches(1)
    _, _, _, architect = make_architect(net, data, data, TrainConfig(epochs=1))
    hooks = search_hooks(net, architect, convergence_tracker(net, threshold=0.5))
    start = hooks.epoch_metrics(1)  # alpha = 0: uniform over none, lora, bitfit
    for layer in range(4):
        assert start[f"entropy_norm/L{layer:02d}"] == pytest.approx(1.0)
        assert start[f"margin/L{layer:02d}"] == pytest.approx(0.0, abs=1e-7)
    assert start["entropy_norm_mean"] == pytest.approx(1.0) and start["margin_min"] == pytest.approx(0.0, abs=1e-7)
    assert start["converged"] is False and start["argmax_changed"] is False and start["converged_entropy"] == 0.5
    assert start["entropy_mean"] == pytest.approx(math.log(3))  # the existing report is still there

    with torch.no_grad():
        net.alpha.copy_(torch.tensor([[0.0, 4.0, 0.0], [0.0, 0.0, 4.0], [4.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    moved = hooks.epoch_metrics(2)
    expected = convergence(torch.softmax(net.alpha.detach(), -1).numpy(), 0.5)
    for layer in range(4):
        assert moved[f"entropy_norm/L{layer:02d}"] == pytest.approx(expected["entropy_norm"][layer], rel=1e-5)
        assert moved[f"margin/L{layer:02d}"] == pytest.approx(expected["margin"][layer], rel=1e-5)
    assert moved["margin_min"] == pytest.approx(expected["margin"][3], rel=1e-5)
    assert moved["argmax_changed"] is True and moved["argmax_stable_epochs"] == 0
    assert moved["none_argmax_share"] == 0.25  # layer 2
    assert moved["converged"] is False  # the argmax changed in this epoch
    again = hooks.epoch_metrics(3)
    assert again["argmax_changed"] is False and again["argmax_stable_epochs"] == 1
    assert again["converged"] is (expected["entropy_norm_mean"] <= 0.5)


# -- k architecture steps per weight step -----------------------------------------------------------------


def run_before_steps(k: int, weight_steps: int = 3, seed: int = 0) -> tuple[torch.Tensor, int]:
    net = tiny_supernet(seed)
    arch = batches(4, seed=10)
    train = batches(1)
    _, _, _, architect = make_architect(
        net, train, arch, TrainConfig(epochs=1), lr=0.05, weight_decay=0.0, steps_per_weight_step=k
    )
    for step in range(weight_steps):
        architect.before_step(step, epoch=1)
    return net.alpha.detach().clone(), architect.steps


def test_k_arch_steps_per_weight_step_move_alpha_more_and_stay_deterministic():
    one, steps_one = run_before_steps(1)
    three, steps_three = run_before_steps(3)
    assert steps_one == 3 and steps_three == 9
    assert three.abs().sum() > 2 * one.abs().sum() > 0  # Adam steps of ~lr each: about 3x the movement
    again, _ = run_before_steps(3)
    assert torch.equal(three, again)  # same seed, same batches: bit for bit the same
    with pytest.raises(ValueError, match="arch_steps_per_weight_step"):
        make_architect(tiny_supernet(), batches(1), batches(1), TrainConfig(epochs=1), steps_per_weight_step=0)


def test_k_arch_steps_draw_consecutive_arch_batches():
    net = tiny_supernet()
    arch = [{"id": i} for i in range(5)]
    seen = []
    _, _, _, architect = make_architect(net, batches(1), arch, TrainConfig(epochs=1), steps_per_weight_step=2)
    architect.step = lambda val_batch, train_batch=None: seen.append(val_batch["id"])
    architect.before_step(0, epoch=1)
    architect.before_step(1, epoch=1)
    architect.before_step(2, epoch=1)
    assert seen == [0, 1, 2, 3, 4, 0]  # each step its own batch; the split wraps around


def test_darts_section_new_fields():
    section = DartsSection()
    assert section.arch_steps_per_weight_step == 1 and section.arch_batch_size is None
    assert section.converged_entropy == 0.7
    assert DartsSection.model_fields["converged_entropy"].description
    with pytest.raises(ValueError):
        DartsSection(arch_steps_per_weight_step=0)
    with pytest.raises(ValueError):
        DartsSection(converged_entropy=1.5)
    assert DartsSection(variants=[{"arch_steps_per_weight_step": 4}]).variants[0] == {"arch_steps_per_weight_step": 4}


def test_arch_batch_size_sets_only_the_arch_loader():
    from types import SimpleNamespace

    from pefttune.trainables.darts import darts_data

    dataset = list(range(40))
    train = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=lambda items: items)
    data = SimpleNamespace(train=train, dev=train, train_sampler=SimpleNamespace(lengths=None))
    default = darts_data(data, 0.5, split_seed=0, seed=0, task_kind="classification")
    larger = darts_data(data, 0.5, split_seed=0, seed=0, task_kind="classification", arch_batch_size=10)
    assert default.arch.batch_size == 4 and larger.arch.batch_size == 10 and larger.weight.batch_size == 4
    assert [len(b) for b in larger.arch] == [10, 10] and len(larger.weight) == 5
    # the same examples on each side, whatever the arch batch size
    assert sorted(sum(larger.arch, [])) == sorted(sum(default.arch, []))


def test_darts_loaders_keep_the_trials_length_buckets():
    from types import SimpleNamespace

    from pefttune.trainables.darts import darts_data

    class Clips(list):
        lengths = [float(i % 7) for i in range(56)]  # 0..6 s, in a repeating pattern

    train = torch.utils.data.DataLoader(Clips(range(56)), batch_size=4, collate_fn=lambda items: items)
    data = SimpleNamespace(train=train, dev=train, train_sampler=SimpleNamespace(lengths=Clips.lengths))
    split = darts_data(data, 0.5, split_seed=0, seed=0, task_kind="ctc", arch_batch_size=7)
    for loader in (split.weight, split.arch):
        spread = [max(Clips.lengths[i] for i in b) - min(Clips.lengths[i] for i in b) for b in loader]
        assert sum(spread) / len(spread) <= 2.0, spread  # unbucketed batches of 4 from 0..6 s spread ~4 s


def test_arch_betas_reach_alphas_adam():
    net = tiny_supernet()
    _, _, _, architect = make_architect(net, batches(1), batches(1), TrainConfig(epochs=1), betas=(0.9, 0.99))
    assert architect.optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    _, _, _, default = make_architect(net, batches(1), batches(1), TrainConfig(epochs=1))
    assert default.optimizer.param_groups[0]["betas"] == (0.5, 0.999)  # DARTS'
    with pytest.raises(ValueError, match="arch_betas"):
        make_architect(net, batches(1), batches(1), TrainConfig(epochs=1), betas=(1.0, 0.9))
    with pytest.raises(ValueError):
        DartsSection(arch_betas=(0.9, 1.0))


# -- the alpha table and plot ------------------------------------------------------------------------------


class FakeExperiment:
    """Just what :func:`alpha_table` reads: trials (id, experiment, last result) and their history."""

    def __init__(self, results: dict[str, list[dict]]):
        from types import SimpleNamespace

        self.trials = [SimpleNamespace(trial_id=tid, experiment="darts", last_result=rows[-1]) for tid, rows in results.items()]
        self._results = results

    def history(self, trial):
        return pd.DataFrame(self._results[trial.trial_id])


def reported(epoch: int, rows: list[list[float]]) -> dict:
    out = {"training_iteration": epoch, "epoch": epoch}
    for layer, row in enumerate(rows):
        for method, prob in zip(NAMES, row):
            out[f"alpha/L{layer:02d}/{method}"] = prob
    return out


def test_alpha_table_and_plot_carry_entropy_and_margin(monkeypatch, tmp_path):
    from pefttune.analysis import plots, tables

    rows = {"t0": [reported(1, [[0.25] * 4, [0.25] * 4]), reported(2, [peaked(2, 0.9), [0.4, 0.4, 0.1, 0.1]])]}
    monkeypatch.setattr(tables, "open_results", lambda experiment: experiment)
    frame = tables.alpha_table(FakeExperiment(rows))
    assert list(frame.columns) == tables.ALPHA_COLUMNS and {"entropy_norm", "margin"} <= set(frame.columns)
    assert frame["entropy_norm"].dtype == np.float64 and frame["margin"].dtype == np.float64
    for (epoch, layer), part in frame.groupby(["epoch", "layer"]):
        matrix = part.set_index("method").loc[NAMES, "prob"].to_numpy()[None, :]
        expected = convergence(matrix)
        assert part["entropy_norm"].tolist() == pytest.approx([expected["entropy_norm"][0]] * 4)
        assert part["margin"].tolist() == pytest.approx([expected["margin"][0]] * 4)
    last = frame[frame["epoch"] == 2].groupby("layer")["margin"].first()
    assert last.tolist() == pytest.approx([0.9 - 0.1 / 3, 0.0])
    assert history_convergence(frame)["entropy_norm_mean"] == pytest.approx(
        frame[frame["epoch"] == 2].groupby("layer")["entropy_norm"].first().mean())

    paths = plots.alpha_evolution(frame, tmp_path)
    assert len(paths) == 1 and paths[0].stat().st_size > 0
    # an alpha table of an older run (no entropy column) still plots: entropy from the probabilities
    assert len(plots.alpha_evolution(frame.drop(columns=["entropy_norm", "margin"]), tmp_path / "old")) == 1
    empty = tables.alpha_table(FakeExperiment({}))
    assert empty.empty and list(empty.columns) == tables.ALPHA_COLUMNS


def test_tracker_of_a_restored_search_continues_from_the_restored_alpha():
    net = tiny_supernet()
    with torch.no_grad():  # as restored from a checkpoint: the last reported epoch's alpha
        net.alpha.copy_(torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
    tracker = convergence_tracker(net, threshold=0.9, stable_epochs=3)
    assert tracker.previous.tolist() == [1, 2, 0, 1]
    same = tracker.update(net.probabilities().numpy())
    assert same["argmax_changed"] is False and same["argmax_stable_epochs"] == 4 and same["converged"] is True
    with torch.no_grad():
        net.alpha[0] = torch.tensor([0.0, 0.0, 2.0])
    moved = tracker.update(net.probabilities().numpy())
    assert moved["argmax_changed"] is True and moved["argmax_stable_epochs"] == 0 and moved["converged"] is False


def test_darts_search_cpu_sets_the_search_trials_resources():
    from pefttune.config import parse_config
    from pefttune.darts.run import search_experiment

    plain = parse_config({})
    assert search_experiment(plain) is plain  # default: the trials' own resources.cpu
    two = parse_config({"darts": {"search_cpu": 2}})
    assert search_experiment(two).resources.cpu == 2 and two.resources.cpu == 1
    assert search_experiment(two).darts == two.darts and search_experiment(two).train == two.train
