"""Plots are real, non-empty PNGs (headless), over a real Ray experiment dir."""
from __future__ import annotations

import pandas as pd
import pytest

from pefttune.analysis import plots
from pefttune.analysis.store import open_results
from pefttune.analysis.tables import alpha_table, trials_table
from test_analysis import classification_experiment

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 2000


@pytest.fixture(scope="module")
def exp(ray_session):
    return open_results(classification_experiment())


def test_backend_is_headless():
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"


def test_placement_heatmap_and_pareto(exp, tmp_path):
    trials = trials_table(exp)
    path = plots.placement_heatmap(trials, tmp_path / "placements.png", exp.mode, top=4)
    assert path == tmp_path / "placements.png" and is_png(path)
    path = plots.pareto_plot(trials, tmp_path / "pareto.png", exp.mode, exp.metric)
    assert is_png(path)
    # nothing to plot -> no file
    empty = trials[trials["outcome"] == "nothing"]
    assert plots.placement_heatmap(empty, tmp_path / "none.png") is None
    assert plots.pareto_plot(empty, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_pareto_front():
    params = [300, 800, 900, 1000, 2000, 3000]
    scores = [0.7, 0.6, 0.72, 0.7, 0.9, 0.5]
    assert plots.pareto_front(params, scores, "max") == [0, 2, 4]
    assert plots.pareto_front(params, [0.3, 0.4, 0.28, 0.3, 0.1, 0.5], "min") == [0, 2, 4]


def test_alpha_evolution_one_png_per_darts_trial(exp, tmp_path):
    paths = plots.alpha_evolution(alpha_table(exp), tmp_path)
    darts = [t for t in exp.trials if t.kind == "darts"]
    assert len(paths) == len(darts) == 1 and is_png(paths[0])
    assert plots.alpha_evolution(alpha_table(exp).iloc[:0], tmp_path) == []


def test_ensemble_bar_and_agreement_heatmap(tmp_path):
    path = plots.ensemble_bar([("lora", 0.7), ("bitfit", 0.7)], [("vote", 1.0), ("soft", 0.9)],
                              tmp_path / "ens.png", "accuracy")
    assert is_png(path)
    matrix = pd.DataFrame([[1.0, 0.1], [0.1, 1.0]], index=["a", "b"], columns=["a", "b"])
    assert is_png(plots.agreement_heatmap(matrix, tmp_path / "kappa.png"))
    assert plots.ensemble_bar([], [], tmp_path / "none.png") is None
