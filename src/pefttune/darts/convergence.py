"""Has the relaxation converged? Normalised entropy, top-2 margin, argmax stability.

A DARTS search ends with one probability row per layer over K candidates (see
:meth:`pefttune.darts.Relaxation.probabilities`). Its derived placement is only an answer
when those rows have left uniform: an argmax over a near-uniform row is an argmax over
noise. Per layer:

- the *normalised entropy* H / ln K of the row (normalised to sum 1; Fair-DARTS rows hold
  independent sigmoids): 1 = uniform, 0 = one-hot;
- the *margin* between its two largest probabilities (of the normalised row): how far the
  argmax is from a tie.

The relaxation counts as *converged* when the mean normalised entropy over layers is at
most ``threshold`` (``darts.converged_entropy``, default 0.7) and, when the previous
epoch's argmax is known, the argmax placement did not change in the last epoch. Pure
numpy/pandas (no torch): :func:`convergence` for one probability matrix,
:class:`ConvergenceTracker` for the per-epoch report of a search (what the DARTS trainable
reports), :func:`history_convergence` / :func:`convergence_table` for a whole alpha
history (the ``alpha`` table's columns ``trial_id, epoch, layer, method, prob``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

#: Default threshold on the mean normalised entropy (``darts.converged_entropy``).
CONVERGED_ENTROPY = 0.7
#: Name of the parameter-free candidate (column 0 of alpha).
NONE_NAME = "none"


def _rows(probabilities) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"convergence: expected probabilities of shape (layers, K >= 2), got {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("convergence: probabilities must be finite and >= 0")
    return p / np.clip(p.sum(-1, keepdims=True), 1e-12, None)


def entropy_norm(probabilities) -> np.ndarray:
    """Per-row entropy H / ln K (rows normalised to sum 1): 1 uniform, 0 one-hot."""
    p = _rows(probabilities)
    h = -(p * np.log(np.clip(p, 1e-12, None))).sum(-1)
    return np.clip(h / math.log(p.shape[1]), 0.0, 1.0)


def top2_margin(probabilities) -> np.ndarray:
    """Per-row difference between the two largest probabilities (rows normalised to sum 1)."""
    p = np.sort(_rows(probabilities), axis=-1)
    return p[:, -1] - p[:, -2]


def convergence(
    probabilities: np.ndarray,
    threshold: float = CONVERGED_ENTROPY,
    previous_argmax: np.ndarray | None = None,
) -> dict:
    """Convergence of one (L, K) probability matrix.

    Returns ``entropy_norm`` (per layer), ``entropy_norm_mean``, ``margin`` (per layer),
    ``margin_min``, ``margin_mean``, ``argmax`` (per layer), ``threshold``,
    ``entropy_converged`` (``entropy_norm_mean <= threshold``) and ``converged`` (the same).
    With ``previous_argmax`` (the previous epoch's argmax per layer) also
    ``argmax_changed``, and ``converged`` further requires that it is False.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"convergence: threshold must be in (0, 1], got {threshold}")
    p = _rows(probabilities)
    ent = entropy_norm(p)
    margin = top2_margin(p)
    argmax = p.argmax(-1)
    out = {
        "entropy_norm": ent,
        "entropy_norm_mean": float(ent.mean()),
        "margin": margin,
        "margin_min": float(margin.min()),
        "margin_mean": float(margin.mean()),
        "argmax": argmax,
        "threshold": float(threshold),
        "entropy_converged": bool(ent.mean() <= threshold),
        "converged": bool(ent.mean() <= threshold),
    }
    if previous_argmax is not None:
        previous = np.asarray(previous_argmax)
        if previous.shape != argmax.shape:
            raise ValueError(f"convergence: previous_argmax has shape {previous.shape}, expected {argmax.shape}")
        out["argmax_changed"] = bool((previous != argmax).any())
        out["converged"] = out["converged"] and not out["argmax_changed"]
    return out


@dataclass
class ConvergenceTracker:
    """Per-epoch convergence report of one search; remembers the previous epoch's argmax.

    ``previous``: the argmax before the first :meth:`update` (a fresh search: the initial
    alpha's; a resumed one: the restored alpha's, i.e. the last reported epoch's);
    ``stable_epochs``: epochs since the argmax last changed, as last reported.
    """

    threshold: float = CONVERGED_ENTROPY
    previous: np.ndarray | None = None
    stable_epochs: int = 0
    none_index: int = 0
    history: list = field(default_factory=list, repr=False)

    def update(self, probabilities) -> dict:
        """Flat metrics of this epoch: ``entropy_norm/L03``, ``margin/L03``, their summaries,
        ``argmax_changed``, ``argmax_stable_epochs``, ``none_argmax_share``,
        ``entropy_converged`` (mean normalised entropy <= threshold), ``converged`` (that, and
        the argmax unchanged since the previous epoch) and ``converged_entropy`` (the threshold)."""
        result = convergence(probabilities, self.threshold, self.previous)
        changed = result.get("argmax_changed", False)
        self.stable_epochs = 0 if changed else self.stable_epochs + 1
        self.previous = result["argmax"]
        out: dict = {}
        for layer, (ent, margin) in enumerate(zip(result["entropy_norm"], result["margin"])):
            out[f"entropy_norm/L{layer:02d}"] = float(ent)
            out[f"margin/L{layer:02d}"] = float(margin)
        out.update(
            entropy_norm_mean=result["entropy_norm_mean"],
            margin_min=result["margin_min"],
            margin_mean=result["margin_mean"],
            argmax_changed=bool(changed),
            argmax_stable_epochs=int(self.stable_epochs),
            none_argmax_share=float((result["argmax"] == self.none_index).mean()),
            entropy_converged=bool(result["entropy_converged"]),
            converged=bool(result["converged"]),
            converged_entropy=float(self.threshold),
        )
        return out


def _matrices(alpha_frame: pd.DataFrame) -> tuple[list, list[np.ndarray], list[str]]:
    """(epochs, one (L, K) matrix per epoch, candidate names) of one trial's alpha rows."""
    missing = {"epoch", "layer", "method", "prob"} - set(alpha_frame.columns)
    if missing:
        raise ValueError(f"history_convergence: the alpha table lacks columns {sorted(missing)}")
    frame = alpha_frame.dropna(subset=["epoch", "layer", "method", "prob"])
    if frame.empty:
        raise ValueError("history_convergence: no alpha rows")
    methods = sorted(frame["method"].astype(str).unique(), key=lambda m: (m != NONE_NAME, m))
    wide = frame.pivot_table(index=["epoch", "layer"], columns="method", values="prob", aggfunc="last")
    wide = wide.reindex(columns=methods)
    if wide.isna().any().any():
        raise ValueError("history_convergence: some (epoch, layer) rows lack a candidate's probability")
    epochs = sorted(wide.index.get_level_values("epoch").unique())
    layers = sorted(wide.index.get_level_values("layer").unique())
    matrices = []
    for epoch in epochs:
        part = wide.loc[epoch].reindex(layers)
        if part.isna().any().any():
            raise ValueError(f"history_convergence: epoch {epoch} lacks some layers")
        matrices.append(part.to_numpy(dtype=np.float64))
    return epochs, matrices, methods


def history_convergence(alpha_frame: pd.DataFrame, threshold: float = CONVERGED_ENTROPY, stable_epochs: int = 1) -> dict:
    """Judge one DARTS search from its alpha history (one trial's rows of the alpha table).

    Returns ``epochs`` (how many), ``final_epoch``, ``entropy_norm_mean`` and
    ``margin_min``/``margin_mean`` at the final epoch, ``argmax_changes`` (epoch-to-epoch
    changes of the argmax placement), ``epochs_since_argmax_change`` (0: it changed in the
    final epoch; the first epoch counts as a change from nothing, so it is at most
    ``epochs - 1``), ``none_share`` (share of layers whose final argmax is ``none``),
    ``argmax`` (the final argmax method per layer), ``threshold``, ``entropy_converged`` (the
    final mean normalised entropy is at most ``threshold``) and ``converged``: that, and the
    argmax has not changed in the last ``stable_epochs`` epochs.
    """
    if "trial_id" in alpha_frame.columns and alpha_frame["trial_id"].nunique() > 1:
        raise ValueError("history_convergence: rows of several trials; judge each trial (see convergence_table)")
    if stable_epochs < 0:
        raise ValueError("history_convergence: stable_epochs must be >= 0")
    epochs, matrices, methods = _matrices(alpha_frame)
    argmaxes = [m.argmax(-1) for m in matrices]
    changed = [bool((a != b).any()) for a, b in zip(argmaxes, argmaxes[1:])]
    last_change = max((i + 1 for i, c in enumerate(changed) if c), default=0)  # index into epochs
    since = len(epochs) - 1 - last_change
    final = convergence(matrices[-1], threshold)
    final_argmax = argmaxes[-1]
    none_share = float(np.mean([methods[k] == NONE_NAME for k in final_argmax]))
    return {
        "epochs": len(epochs),
        "final_epoch": epochs[-1],
        "entropy_norm_mean": final["entropy_norm_mean"],
        "margin_min": final["margin_min"],
        "margin_mean": final["margin_mean"],
        "argmax_changes": int(sum(changed)),
        "epochs_since_argmax_change": int(since),
        "none_share": none_share,
        "argmax": [methods[k] for k in final_argmax],
        "threshold": float(threshold),
        "entropy_converged": bool(final["entropy_converged"]),
        "converged": bool(final["entropy_converged"] and since >= stable_epochs),
    }


def convergence_table(alpha_frame: pd.DataFrame, threshold: float = CONVERGED_ENTROPY, stable_epochs: int = 1) -> pd.DataFrame:
    """:func:`history_convergence` per trial of an alpha table: one row per ``trial_id``."""
    columns = ["trial_id", "epochs", "final_epoch", "entropy_norm_mean", "margin_min", "margin_mean",
               "argmax_changes", "epochs_since_argmax_change", "none_share", "argmax", "threshold", "entropy_converged",
               "converged"]
    rows = []
    if "trial_id" not in alpha_frame.columns:
        raise ValueError("convergence_table: the alpha table lacks trial_id")
    for trial_id, part in alpha_frame.groupby("trial_id", sort=True):
        judged = history_convergence(part, threshold, stable_epochs)
        rows.append({"trial_id": trial_id, **judged, "argmax": " ".join(judged["argmax"])})
    return pd.DataFrame(rows, columns=columns)
