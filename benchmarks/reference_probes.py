"""Are the references trained to convergence? A study's ``log-mel`` and ``frozen`` rows against converged linear probes.

Reads a finished study (``pefttune run``'s folder: its configs table and saved config) and,
in the same run, fits scikit-learn's ``LogisticRegression`` (L2, lbfgs run to its tolerance, the
features standardised on train, C chosen on dev from a half-decade grid 1e-3 .. 1e3) on the
features each reference's head sees, computed with pefttune's own encoders and loaders on the
study's corpus:

- ``log-mel``: the ``log-mel`` pseudo-backbone's normalised frames, mean-pooled over the valid
  frames (what its head's weighted sum and mean pool see: one hidden state, so the weighted sum
  is the identity);
- ``frozen``: the frozen encoder's hidden states h_0 .. h_L, each mean-pooled, combined with
  the softmax layer weights of each seed's trained head (its own features: the head is a linear
  layer on exactly these); also, as a bound, all layers' pooled states side by side (a richer
  linear family than the head's).

Also the mean+std pooled log-mel frames (``benchmarks/ssl_backbone.py``'s log-mel baseline
pools mean and std of the log-mel bands; this study's reference, like its head, pools the mean
only). Target: each reference row within 0.02 (test accuracy) of the converged probe of its
own features. scikit-learn is needed here only (the ``dev`` extra), never by pefttune.

    python benchmarks/reference_probes.py --study pefttune-results/embedded-ks
"""
from __future__ import annotations

import argparse
import contextlib
import io
import time
from pathlib import Path

import numpy as np

TARGET = 0.02
C_GRID = tuple(10.0 ** (k / 2) for k in range(-6, 7))  # 1e-3 .. 1e3, half decades


def pooled_features(config, backbone: str, splits=("train", "dev", "test")) -> dict:
    """Per split: (N, S, D) mean-pooled hidden states (S: the states the head's weighted sum sees),
    (N, D) std-pooled last state, and labels, in manifest order."""
    import torch

    from pefttune.backbones import backbone_info
    from pefttune.data.loaders import load_data, prepare_data
    from pefttune.model import build_model
    from pefttune.placement import Placement
    from pefttune.trainables.setup import frozen_cache
    from pefttune.training import frozen_step

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ref = prepare_data(config, progress=False)
    info = backbone_info(backbone)
    placement = Placement.from_dict({"num_layers": info.num_layers, "layers": ["none"] * info.num_layers}
                                    if info.num_layers else {"num_layers": 0, "layers": []})
    model = build_model(backbone, placement, ref.head_config(config)).eval()
    with contextlib.redirect_stdout(io.StringIO()):
        cache = frozen_cache(config, ref, model)  # the study's cached states, where the cache holds them
    data = load_data(config, ref)
    out = {}
    with torch.no_grad():
        for name in splits:
            means, stds, labels, index = [], [], [], []
            for batch in getattr(data, name):
                states, mask = frozen_step(model, batch, cache)
                m = mask[..., None].float()
                count = m.sum(1).clamp_min(1.0)
                mean = [(s * m).sum(1) / count for s in states]
                last = states[-1]
                var = (((last - mean[-1][:, None]) ** 2) * m).sum(1) / count
                means.append(torch.stack(mean, 1))
                stds.append(var.sqrt())
                labels.append(batch["labels"])
                index.append(batch["index"])
            order = torch.cat(index).argsort()
            out[name] = {"mean": torch.cat(means)[order].numpy(), "std": torch.cat(stds)[order].numpy(),
                         "labels": torch.cat(labels)[order].numpy()}
    return out


def probe(train_x, train_y, dev_x, dev_y, test_x, test_y) -> dict:
    """Converged multinomial logistic regression, C chosen on dev; its dev and test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    train_x, dev_x, test_x = (scaler.transform(x) for x in (train_x, dev_x, test_x))
    best = None
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=5_000).fit(train_x, train_y)  # lbfgs to its tolerance (1e-4)
        dev = float((model.predict(dev_x) == dev_y).mean())
        if best is None or dev > best["dev"]:
            best = {"C": c, "dev": dev, "test": float((model.predict(test_x) == test_y).mean()),
                    "iterations": int(np.max(model.n_iter_))}
    return best


def study_rows(study: Path) -> tuple[dict, dict]:
    """The study's configs rows of the references, and each completed frozen trial's softmax layer weights."""
    from safetensors.numpy import load_file

    from pefttune.analysis.store import open_results
    from pefttune.analysis.tables import configs_table, trials_table

    store = open_results(str(study))
    configs = configs_table(store).set_index("config_id")
    trials = trials_table(store)
    rows = {cid: configs.loc[cid].to_dict() for cid in ("log-mel", "frozen") if cid in configs.index}
    frozen = trials[(trials["config_id"] == "frozen") & (trials["outcome"] == "completed")]
    weights = {}
    for _, trial in frozen.iterrows():
        tensors = load_file(str(Path(trial["checkpoint"]) / "best" / "adapter.safetensors"))
        w = tensors["head.featurizer.weights"].astype(np.float64)
        weights[int(trial["seed"])] = np.exp(w - w.max()) / np.exp(w - w.max()).sum()
    for cid, row in rows.items():
        part = trials[(trials["config_id"] == cid) & (trials["outcome"] == "completed")]
        row["epochs"] = sorted(set(int(e) for e in part["epochs"]))
    return rows, weights


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", required=True, type=Path, help="A finished study's folder (pefttune run).")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch
    import yaml

    from pefttune.backbones import LOG_MEL
    from pefttune.config import parse_config

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    config = parse_config(yaml.safe_load((args.study / "experiment.yaml").read_text()), str(args.study))
    rows, weights = study_rows(args.study)
    out = []

    def line(row: str, features: str, result: dict, study: dict | None) -> None:
        head = "-" if study is None else f"{study['test_mean']:.3f} ± {study['test_std']:.3f}"
        gap = "-" if study is None else f"{study['test_mean'] - result['test']:+.3f}"
        out.append(f"| {row} | {features} | {result['C']:g} | {result['dev']:.3f} | {result['test']:.3f} | "
                   f"{head} | {gap} |")
        print(out[-1], f"({time.perf_counter() - started:.0f} s)", flush=True)

    mel = pooled_features(config, LOG_MEL)
    xy = lambda name, x: (x, mel[name]["labels"])  # noqa: E731
    mean = {n: mel[n]["mean"][:, 0] for n in mel}
    line("log-mel", "mean-pooled normalised log-mel (the head's, 40)", probe(
        *xy("train", mean["train"]), *xy("dev", mean["dev"]), *xy("test", mean["test"])), rows.get("log-mel"))
    both = {n: np.concatenate([mel[n]["mean"][:, 0], mel[n]["std"]], 1) for n in mel}
    line("log-mel", "mean+std-pooled normalised log-mel (80; ssl_backbone.py's pooling)", probe(
        *xy("train", both["train"]), *xy("dev", both["dev"]), *xy("test", both["test"])), None)

    ssl = pooled_features(config, config.backbone)
    labels = {n: ssl[n]["labels"] for n in ssl}
    per_seed = []
    for seed, w in sorted(weights.items()):
        feats = {n: np.einsum("l,nld->nd", w, ssl[n]["mean"]) for n in ssl}
        per_seed.append(probe(feats["train"], labels["train"], feats["dev"], labels["dev"], feats["test"],
                              labels["test"]))
    if per_seed:
        avg = {k: float(np.mean([r[k] for r in per_seed])) for k in ("dev", "test")}
        avg["C"] = per_seed[0]["C"]
        line("frozen", f"the head's own features: layer sum with each seed's learned weights ({len(per_seed)} "
                       "seeds, mean)", avg, rows.get("frozen"))
    flat = {n: ssl[n]["mean"].reshape(len(labels[n]), -1) for n in ssl}
    line("frozen", f"every layer's pooled state side by side ({flat['train'].shape[1]}: a bound)", probe(
        flat["train"], labels["train"], flat["dev"], labels["dev"], flat["test"], labels["test"]), rows.get("frozen"))

    print(f"study {args.study}: corpus {config.data.source}/{config.data.task}, backbone {config.backbone}")
    for cid, row in rows.items():
        print(f"  {cid}: lr {row.get('lr')}, epochs {row['epochs']}, seeds {row['seeds']}, "
              f"test {row['test_mean']:.4f} ± {row['test_std']:.4f}")
    print("\n| reference | probe features | C | probe dev | probe test | study row test (mean ± std over seeds) | "
          "row - probe |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(out))
    for cid, first in (("log-mel", out[0]), ("frozen", out[2] if per_seed else None)):
        if first is None or cid not in rows:
            continue
        gap = float(first.rsplit("|", 2)[-2])
        print(f"{cid}: row - probe of its own features {gap:+.3f} (target within {TARGET}: "
              f"{'met' if abs(gap) <= TARGET or gap > 0 else 'not met'})")
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
