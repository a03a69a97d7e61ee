"""The learning-rate protocol's options, measured: every fixed configuration at the first seed, every rate.

Trains, with pefttune's own trainable on the embedded study's corpus and settings, each
fixed configuration of the study (the uniform baselines and the hybrid, ``train.epochs``
epochs; the references ``frozen`` and ``log-mel`` with ``--ref-epochs``) at every rate of a
wide grid, with the study's first seed, as one Ray grid experiment per epoch count. Every
trial runs to the end, so each option of the protocol can be read off the same trials:

- *full grid*: the rate with the best dev score after all epochs;
- *successive halving, rung r*: the rate with the best dev score after r epochs (a trial
  stopped there has trained exactly those epochs of the full schedule); the chosen rate is
  then trained to the end;

and for each option the trial-seconds it costs (from each trial's own ``time_total_s`` per
epoch: the sum over trials, less sensitive to what else runs on the machine than a wall
time). The rates each option chooses are compared with the full grid's.

    python benchmarks/lr_options.py --out /tmp/lr-options            # ~30 min on 2 idle cores
    python benchmarks/lr_options.py --out /tmp/lr-options --report   # print the tables of a finished run

Nothing here chooses a setting by a test score: the choices are read on dev, test is printed
for information.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

GRID = (0.003, 0.01, 0.03, 0.1)
REF_GRID = (0.01, 0.03, 0.1, 0.3)


def fixed_trials(config, grid, references: bool) -> list[dict]:
    """Seed-0 trial configs of every fixed configuration (or of the references) at every rate of ``grid``."""
    import pandas as pd

    from pefttune.backbones import backbone_info
    from pefttune.search.replicates import Replicate, plan_replicates

    one_seed = config.model_copy(update={"train": config.train.model_copy(update={"seeds": [config.train.seed]})})
    search = one_seed.search.model_copy(update={"frozen_reference": references})
    analysis = one_seed.analysis.model_copy(update={"logmel_reference": references})
    one_seed = one_seed.model_copy(update={"search": search, "analysis": analysis})
    replicates = plan_replicates(one_seed, pd.DataFrame())
    if not references:  # the fixed points are planned for the other seeds only: plan them with seed 0 here
        from pefttune.search.space import fixed_points, validate_space
        from pefttune.runtime.study_dir import config_id

        space = validate_space(config, backbone_info(config.backbone))
        replicates = []
        for point in fixed_points(config):
            placement = space.fixed_placement(point)
            cid = point.extra.get("config_id") or config_id(point.kind, point.method, placement)
            replicates.append(Replicate(cid, point.kind, point.method or "",
                                        json.dumps(placement.to_dict(), separators=(",", ":")), config.train.seed))
    return [r.trial_config(lr) for r in replicates for lr in grid]


def run_grid(config, name: str, trials: list[dict]) -> None:
    from pefttune.runtime.cluster import fit_environment, grid_tune_config
    from pefttune.runtime.console import Console, quiet_ray_loggers
    from pefttune.runtime.plan import GridPlan, grid_tuner, restore_grid
    from pefttune.runtime.study_dir import holds_run, study_dir
    from pefttune.runtime.tune_run import run_config
    from pefttune.trainables.discrete import train_fn
    from pefttune.trainables.trial import make_trainable
    from pefttune.trainables.setup import make_setup

    root = study_dir(config)
    path = f"{root}/{name}"
    setup = make_setup(config, path)
    if holds_run(path):
        tuner = restore_grid(path, make_trainable(train_fn, setup))
    else:
        console = Console(name, config.metric, "max", total=len(trials), study_dir=root)
        tuner = grid_tuner(make_trainable(train_fn, setup), path, GridPlan(trials),
                           grid_tune_config(config.search.max_concurrent, config.search.reuse_actors),
                           run_config(config, path, callbacks=[console.callback()]))
    with fit_environment(), quiet_ray_loggers(1):
        tuner.fit()


def histories(root: Path):
    """One row per trial and epoch: config_id, lr, epoch, dev, best dev so far, seconds of that epoch; and
    one row per trial with its test score."""
    from pefttune.analysis.store import open_results
    from pefttune.analysis.tables import history_table, trials_table

    store = open_results(str(root))
    trials = trials_table(store)
    history = history_table(store)
    history = history.drop(columns=[c for c in ("config_id", "lr", "test_score") if c in history])
    history = history.merge(trials[["trial_id", "config_id", "lr", "test_score"]], on="trial_id")
    history["config_id"] = history["config_id"] + history["experiment"].map(
        lambda e: f" ({e.split('-')[-1]} epochs)" if e.startswith("references-") else "")
    history = history.sort_values(["config_id", "lr", "epoch"])
    history["seconds"] = history.groupby("trial_id")["time_total_s"].diff().fillna(history["time_total_s"])
    return history, trials


def options(history, rungs: list[int]):
    """Per configuration: the full grid's choice and each rung's, with what each costs in
    trial-epochs (load-free) and trial-seconds (each trial's own seconds per epoch, summed)."""
    import pandas as pd

    rows = []
    for cid, group in history.groupby("config_id"):
        last = int(group["epoch"].max())
        rates = group["lr"].nunique()
        final = group[group["epoch"] == last].set_index("lr")
        full = final["best_dev_accuracy"].idxmax()
        row = {"config": cid, "epochs": last, "full grid": full, "dev": final.loc[full, "best_dev_accuracy"],
               "full: trial-epochs": rates * last, "full: s": group["seconds"].sum(),
               "one rate: s": group[group["lr"] == full]["seconds"].sum()}
        for r in rungs:
            at = group[group["epoch"] == r].set_index("lr")
            choice = at["best_dev_accuracy"].idxmax()
            rung_seconds = group[group["epoch"] <= r]["seconds"].sum()
            rest = group[(group["lr"] == choice) & (group["epoch"] > r)]["seconds"].sum()
            row[f"rung {r}"] = choice
            row[f"rung {r}: dev"] = final.loc[choice, "best_dev_accuracy"]
            row[f"rung {r}: trial-epochs (continued)"] = rates * r + last - r
            row[f"rung {r}: s (continued)"] = rung_seconds + rest
        rows.append(row)
    return pd.DataFrame(rows)


def convergence(history, tolerance: float = 0.005):
    """Per configuration and rate: the first epoch whose best dev so far is within ``tolerance`` of the
    trial's last best dev (how many epochs the schedule needed), and that best dev."""
    rows = []
    for (cid, rate), group in history.groupby(["config_id", "lr"]):
        best = group["best_dev_accuracy"].to_numpy()
        epochs = group["epoch"].to_numpy()
        reached = int(epochs[(best >= best[-1] - tolerance).argmax()])
        rows.append({"config": cid, "lr": rate, "epochs": int(epochs[-1]), "best dev": best[-1],
                     f"epoch within {tolerance}": reached, "test": group["test_score"].iloc[-1]})
    import pandas as pd

    return pd.DataFrame(rows)


def report(root: Path, rungs: list[int]) -> None:
    import pandas as pd

    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 40)
    history, trials = histories(root)
    wide = history.pivot_table(index=["config_id", "lr"], columns="epoch", values="dev_accuracy")
    wide = wide[[c for c in wide.columns if c <= 5 or c % 5 == 0]]  # epochs 1-5, then every 5th
    wide.columns = [f"dev@{int(c)}" for c in wide.columns]
    final = history.groupby(["config_id", "lr"]).agg(best_dev=("best_dev_accuracy", "last"),
                                                     test=("test_score", "last"), seconds=("seconds", "sum"))
    print(wide.join(final).round(4).to_string())
    for epochs, part in history.groupby(history.groupby("trial_id")["epoch"].transform("max")):
        usable = sorted({r for r in rungs if r < epochs} | {max(1, -(-epochs // 5))})  # and a 0.2 share
        print(f"\n{epochs}-epoch trials: choices (dev) and their cost")
        print(options(part, usable).round(4).to_string(index=False))
        print(f"\n{epochs}-epoch trials: convergence")
        print(convergence(part).round(4).to_string(index=False))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--grid", type=float, nargs="+", default=list(GRID))
    parser.add_argument("--ref-grid", type=float, nargs="+", default=list(REF_GRID))
    parser.add_argument("--ref-epochs", type=int, nargs="+", default=[15, 40])
    parser.add_argument("--rungs", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--report", action="store_true", help="Only print the tables of a finished run.")
    args = parser.parse_args(argv)

    from pefttune.config import load_config, parse_config

    base = load_config(None).model_dump(mode="json")
    base.update(name="lr-options", storage=str(args.out))
    config = parse_config(base)
    root = args.out / "lr-options"
    if not args.report:
        from pefttune.runtime.cluster import connect_ray
        from pefttune.trainables.setup import prefill_local

        started = time.perf_counter()
        prefill_local(config, make_data(config), None)
        connect_ray(None, log_to_driver=False)
        run_grid(config, "fixed", fixed_trials(config, args.grid, references=False))
        for epochs in args.ref_epochs:
            ref = parse_config({**base, "train": {**base["train"], "epochs": epochs}})
            run_grid(ref, f"references-{epochs}", fixed_trials(ref, args.ref_grid, references=True))
        print(f"wall time {time.perf_counter() - started:.0f} s", flush=True)
    report(root, args.rungs)
    return 0


def make_data(config):
    from pefttune.data.loaders import prepare_data

    return prepare_data(config)


if __name__ == "__main__":
    raise SystemExit(main())
