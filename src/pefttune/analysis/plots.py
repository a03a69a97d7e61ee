"""PNG plots of an experiment (headless: matplotlib's Agg backend).

- :func:`placement_heatmap`: layers x top trials, each cell coloured by its method;
- :func:`alpha_evolution`: DARTS probabilities per layer over the epochs, and each layer's
  normalised entropy against the convergence threshold, one PNG per trial;
- :func:`pareto_plot`: score vs trainable parameters (log scale) with the Pareto front;
- :func:`ensemble_bar`: members' and ensembles' test scores;
- :func:`agreement_heatmap`: a pairwise agreement / kappa matrix.

Each function writes its file atomically and returns the path (``None`` when there is
nothing to plot, e.g. no DARTS trials).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

from pefttune.runtime.storage import atomic_output  # noqa: E402
from pefttune.schema import TrialKind

__all__ = ["agreement_heatmap", "alpha_evolution", "ensemble_bar", "pareto_front", "pareto_plot", "placement_heatmap"]

KIND_COLORS = {
    TrialKind.UNIFORM: "tab:blue", TrialKind.DISCRETE: "tab:orange", TrialKind.HYBRID: "tab:purple",
    TrialKind.DARTS_DERIVED: "tab:red", TrialKind.DARTS: "tab:brown",
}


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_output(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _score_column(trials: pd.DataFrame, prefer: str = "test_score") -> str:
    if prefer in trials.columns and trials[prefer].notna().any():
        return prefer
    return "best_dev_score"


def _ranked(trials: pd.DataFrame, mode: str, column: str = "best_dev_score") -> pd.DataFrame:
    frame = trials[trials[column].notna()]
    return frame.sort_values([column, "trial_id"], ascending=[mode == "min", True])


# --------------------------------------------------------------------------- placements
def placement_heatmap(trials: pd.DataFrame, path: str | Path, mode: str = "max", top: int = 12) -> Path | None:
    """Layers (rows) x the ``top`` trials best by dev score (columns), coloured by method.

    Trials are the finished placements (``outcome == completed``, not DARTS searches);
    hybrid layers (``a+b``) are a colour of their own, empty layers are light grey.
    """
    layer_cols = sorted(c for c in trials.columns if c.startswith("layer_") and c[6:].isdigit())
    pool = trials[(trials["outcome"] == "completed") & (trials["kind"] != TrialKind.DARTS)]
    pool = _ranked(pool, mode).head(top)
    if pool.empty or not layer_cols:
        return None
    grid = pool[layer_cols].fillna("none").astype(str).to_numpy().T  # (layers, trials)
    labels = sorted(set(grid.ravel()) - {"none"})
    labels = ["none"] + labels
    palette = ["#e6e6e6"] + [plt.get_cmap("tab10" if len(labels) <= 11 else "tab20")(i % 20) for i in range(len(labels) - 1)]
    codes = np.vectorize(labels.index)(grid)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(pool) + 2.5), max(2.5, 0.35 * len(layer_cols) + 1.5)))
    ax.imshow(codes, cmap=ListedColormap(palette), vmin=-0.5, vmax=len(labels) - 0.5, aspect="auto",
              interpolation="nearest", origin="lower")
    ax.set_yticks(range(len(layer_cols)), [c.removeprefix("layer_") for c in layer_cols])
    names = [
        f"{k}{':' + m if isinstance(m, str) and m else ''}\n{s:.3g}"
        for k, m, s in zip(pool["kind"], pool["method"].astype(object).where(pool["method"].notna(), ""), pool["best_dev_score"])
    ]
    ax.set_xticks(range(len(pool)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("layer")
    ax.set_title(f"Placements of the top {len(pool)} trials (by dev score)")
    ax.legend(handles=[Patch(color=palette[i], label=label) for i, label in enumerate(labels)],
              bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8, title="method")
    return _save(fig, path)


# --------------------------------------------------------------------------- DARTS
def _entropy_norm(frame: pd.DataFrame, x_col: str) -> pd.DataFrame:
    """(x, layer, entropy_norm) per result and layer: the alpha table's column, else H / ln K
    of the normalised probabilities."""
    if "entropy_norm" in frame and frame["entropy_norm"].notna().all():
        return frame.groupby([x_col, "layer"], as_index=False)["entropy_norm"].first()
    rows = []
    for (x, layer), part in frame.groupby([x_col, "layer"]):
        p = part["prob"].to_numpy(dtype=float)
        p = p / max(p.sum(), 1e-12)
        h = float(-(p * np.log(np.clip(p, 1e-12, None))).sum())
        rows.append({x_col: x, "layer": layer, "entropy_norm": h / np.log(len(p)) if len(p) > 1 else np.nan})
    return pd.DataFrame(rows, columns=[x_col, "layer", "entropy_norm"])


def alpha_evolution(alpha: pd.DataFrame, out_dir: str | Path, prefix: str = "alpha",
                    threshold: float | None = 0.7) -> list[Path]:
    """One PNG per DARTS trial: a panel per layer, a line per candidate (prob vs epoch), and a
    bottom panel with each layer's normalised entropy H / ln K over the epochs (1 = uniform)
    and the convergence ``threshold`` (``darts.converged_entropy``; None: no line)."""
    if alpha.empty:
        return []
    out = []
    for trial_id, frame in alpha.groupby("trial_id", sort=True):
        layers = sorted(frame["layer"].dropna().astype(int).unique())
        cols = min(4, len(layers))
        rows = int(np.ceil(len(layers) / cols))
        fig = plt.figure(figsize=(3.2 * cols, 2.4 * (rows + 1) + 0.6), layout="constrained")
        grid = fig.add_gridspec(rows + 1, cols)
        axes = np.array([[fig.add_subplot(grid[r, c]) for c in range(cols)] for r in range(rows)])
        methods = sorted(frame["method"].unique())
        colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
        x_col = "epoch" if frame["epoch"].notna().all() else "training_iteration"
        for ax, layer in zip(axes.ravel(), layers):
            part = frame[frame["layer"] == layer]
            for method in methods:
                line = part[part["method"] == method].sort_values(x_col)
                ax.plot(line[x_col].astype(float), line["prob"], marker="o", ms=3, color=colors[method], label=method)
            ax.set_title(f"layer {layer}", fontsize=9)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
        for ax in axes.ravel()[len(layers):]:
            ax.axis("off")
        axes[0, 0].set_ylabel("probability")
        axes[-1, 0].set_xlabel(x_col)
        fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
        # convergence: normalised entropy per layer, and the threshold
        ent_ax = fig.add_subplot(grid[rows, :])
        entropy = _entropy_norm(frame, x_col)
        shades = plt.get_cmap("viridis")
        for i, layer in enumerate(layers):
            line = entropy[entropy["layer"] == layer].sort_values(x_col)
            ent_ax.plot(line[x_col].astype(float), line["entropy_norm"], marker="o", ms=3,
                        color=shades(i / max(1, len(layers) - 1)), label=f"L{layer}")
        mean = entropy.groupby(x_col)["entropy_norm"].mean()
        ent_ax.plot(mean.index.astype(float), mean.to_numpy(), color="black", lw=2, label="mean")
        if threshold is not None:
            ent_ax.axhline(threshold, color="tab:red", ls="--", lw=1.2, label=f"converged <= {threshold:g}")
        ent_ax.set_ylim(0, 1.02)
        ent_ax.set_ylabel("entropy H / ln K")
        ent_ax.set_xlabel(x_col)
        ent_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ent_ax.grid(alpha=0.3)
        ent_ax.legend(fontsize=7, ncol=min(8, len(layers) + 2), loc="lower left")
        fig.suptitle(f"DARTS architecture weights, trial {trial_id}")
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(trial_id))
        out.append(_save(fig, Path(out_dir) / f"{prefix}_{safe}.png"))
    return out


# --------------------------------------------------------------------------- Pareto
def _compact(value: float, _pos=None) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def pareto_front(params: Sequence[float], scores: Sequence[float], mode: str = "max") -> list[int]:
    """Indices of the non-dominated points (fewer parameters and a better score), by params."""
    order = sorted(range(len(params)), key=lambda i: (params[i], -scores[i] if mode == "max" else scores[i]))
    front, best = [], None
    for i in order:
        s = scores[i]
        if best is None or (s > best if mode == "max" else s < best):
            front.append(i)
            best = s
    return front


def pareto_plot(trials: pd.DataFrame, path: str | Path, mode: str = "max", metric: str = "score") -> Path | None:
    """Score (test if reported, else best dev) vs trainable parameters, Pareto front drawn."""
    column = _score_column(trials)
    pool = trials[trials[column].notna() & trials["trainable_params"].notna() & (trials["kind"] != TrialKind.DARTS)
                  & (trials["outcome"] == "completed")]
    pool = pool[pool["trainable_params"] > 0]
    if pool.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, part in pool.groupby("kind", sort=True):
        ax.scatter(part["trainable_params"].astype(float), part[column], label=kind, s=30,
                   color=KIND_COLORS.get(kind, "tab:gray"), alpha=0.85, edgecolor="k", linewidth=0.4)
    params = pool["trainable_params"].astype(float).tolist()
    scores = pool[column].astype(float).tolist()
    front = pareto_front(params, scores, mode)
    fx, fy = [params[i] for i in front], [scores[i] for i in front]
    ax.step(fx + [max(params)], fy + [fy[-1]], where="post", color="k", lw=1.2, label="Pareto front")
    ax.scatter(fx, fy, s=110, facecolor="none", edgecolor="k", linewidth=1.0)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(_compact))
    decades = np.log10(max(params) / min(params)) if min(params) > 0 else 2
    ax.xaxis.set_minor_formatter(FuncFormatter(_compact) if decades < 1.5 else NullFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"{column.removesuffix('_score')} {metric}")
    ax.set_title(f"{metric} vs trainable parameters ({'higher' if mode == 'max' else 'lower'} is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


# --------------------------------------------------------------------------- ensembles
def ensemble_bar(
    members: Sequence[tuple[str, float]],
    ensembles: Sequence[tuple[str, float]],
    path: str | Path,
    metric: str = "score",
    mode: str = "max",
    title: str | None = None,
) -> Path | None:
    """Bars of the members' and the ensembles' test scores; the best member as a line."""
    if not members and not ensembles:
        return None
    names = [n for n, _ in members] + [n for n, _ in ensembles]
    values = [float(v) for _, v in members] + [float(v) for _, v in ensembles]
    colors = ["tab:blue"] * len(members) + ["tab:orange"] * len(ensembles)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.6 * len(names) + 2), 4.0))
    ax.bar(range(len(names)), values, color=colors, edgecolor="k", linewidth=0.4)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    if members:
        member_values = [float(v) for _, v in members]
        best = max(member_values) if mode == "max" else min(member_values)
        ax.axhline(best, color="tab:blue", ls="--", lw=1, label="best member")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"test {metric}")
    ax.set_title(title or "Ensembles vs members (test)")
    ax.legend(handles=[Patch(color="tab:blue", label="member"), Patch(color="tab:orange", label="ensemble")],
              fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def agreement_heatmap(matrix: pd.DataFrame, path: str | Path, title: str = "Cohen's kappa") -> Path | None:
    """A square matrix (e.g. :func:`pefttune.analysis.intervals.agreement_matrix`) as a heatmap."""
    if matrix.empty:
        return None
    values = matrix.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 * len(matrix) + 2.5, 0.9 * len(matrix) + 1.8))
    image = ax.imshow(values, vmin=min(0.0, np.nanmin(values)), vmax=1.0, cmap="viridis")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, "nan" if np.isnan(values[i, j]) else f"{values[i, j]:.2f}", ha="center", va="center",
                    color="w" if values[i, j] < 0.6 else "k", fontsize=8)
    ax.set_xticks(range(len(matrix)), matrix.columns, rotation=45, ha="right")
    ax.set_yticks(range(len(matrix)), matrix.index)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)
