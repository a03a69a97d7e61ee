"""Do the findings' verdicts hold across study seeds and corpus draws? The embedded study run several times.

Each run is the embedded default study (``pefttune run``) with its own, disjoint set of
training seeds (study seed s uses ``train.seeds = [3s, 3s+1, 3s+2]``; the Optuna search uses the
first of them, DARTS searches once per seed), the same settings otherwise; ``--data-seeds``
adds runs on other draws of the synthesized corpus (``data.seed``: other speakers and clips).
The verdicts of the three findings are printed side by side. The target: no finding reads
*reproduced* in one run and *not reproduced* in another (*inconclusive* is allowed where the
seeds cannot decide). Each run's verdicts are also re-decided with the other interval setting
(``analysis.interval``: seeds x speakers <-> examples only), from the same trials.

    python benchmarks/verdict_stability.py --out /tmp/stability            # 3 runs, ~15 min each on 2 cores
    python benchmarks/verdict_stability.py --out /tmp/stability --study-seeds 0 --data-seeds 1   # another corpus
    python benchmarks/verdict_stability.py --smoke-test --out /tmp/stab    # tiny backbone and data, for CI

Results of a run already in ``--out`` are reused (``--resume`` finishes an interrupted one).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pefttune.config import load_config, parse_config

FINDINGS = ("1", "2", "3")


def study_config(base, study_seed: int, out: Path, seeds_per_study: int, smoke: bool, data_seed: int | None = None):
    data = base.model_dump(mode="json")
    data["name"] = f"stability-s{study_seed}" + (f"-d{data_seed}" if data_seed is not None else "")
    data["storage"] = str(out)
    data["train"]["seeds"] = [study_seed * seeds_per_study + k for k in range(seeds_per_study)]
    data["train"].pop("seed", None)
    if data_seed is not None:
        data["data"]["seed"] = data_seed
    if base.darts.retrain == "every-seed":  # the searches run with the study's first seed
        data["darts"]["seeds"] = [data["train"]["seeds"][0]]  # (per-seed: one search per training seed)
    if smoke:  # seconds, not minutes: the tiny random backbone on a small synthesized corpus
        data["backbone"] = "tiny-hubert"
        data["data"].update({"per_class": 4, "batch_size": 16})
        data["train"].update({"epochs": 1, "max_steps_per_epoch": 2})
        data["search"].update({"num_samples": 1, "replicate_top": 1, "max_concurrent": 2, "grace_period": 1})
        data["darts"].update({"epochs": 2, "warmup_epochs": 1})
        data["methods"] = {"lora": {"rank": 2}, "bitfit": {}}
        data["budget"] = None
        data["search"]["hybrid"] = False
    return parse_config(data, f"study seed {study_seed}")


def run_one(config, resume: bool, reanalyse: bool = False) -> dict:
    from pefttune.runtime.study_dir import study_dir
    from pefttune.study import run_study

    summary_file = Path(study_dir(config)) / "analysis" / "summary.json"
    if summary_file.exists() and reanalyse:  # the same trained runs, decided by the current analysis code
        from pefttune.analysis.report import analyze

        analyze(str(study_dir(config)))
    if summary_file.exists() and not resume:
        return json.loads(summary_file.read_text())
    started = time.perf_counter()
    result = run_study(config, resume=resume or Path(study_dir(config)).exists(), verbose=1)
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else dict(result.summary)
    summary["wall_s"] = time.perf_counter() - started
    return summary


def other_intervals(config, summary: dict) -> dict:
    """The run's verdicts re-decided with the other interval setting (``analysis.interval``
    flipped: seeds x speakers <-> test examples only), from the same trials."""
    from pefttune.analysis.findings import decide
    from pefttune.analysis.report import analysis_settings
    from pefttune.analysis.store import open_results
    from pefttune.analysis.tables import alpha_table
    from pefttune.runtime.study_dir import study_dir

    experiment = open_results(str(study_dir(config)))
    settings = analysis_settings(experiment)
    settings["interval"] = "examples" if settings["interval"] == "seeds-speakers" else "seeds-speakers"
    decided = decide(experiment, alpha=alpha_table(experiment), **settings)
    return {"train_seeds": summary.get("train_seeds"), "interval": settings["interval"],
            "findings": {str(k): {"verdict": str(f.verdict), "rule": f.rule} for k, f in decided.findings.items()}}


def table(summaries: dict[int, dict]) -> str:
    seeds = list(summaries)
    lines = ["| finding | " + " | ".join(f"study seed {s} (train.seeds {summaries[s].get('train_seeds')})"
                                          for s in seeds) + " | same verdict |",
             "|---|" + "---|" * len(seeds) + "---|"]
    stable, consistent = True, True
    for key in FINDINGS:
        verdicts = [summaries[s].get("findings", {}).get(key, {}).get("verdict", "missing") for s in seeds]
        same = len(set(verdicts)) == 1
        stable &= same
        consistent &= not contradicts(verdicts)
        lines.append(f"| {key} | " + " | ".join(verdicts) + f" | {'yes' if same else 'NO'} |")
    lines.append(f"\nall findings stable: {'yes' if stable else 'no'}")
    lines.append(f"no finding reproduced in one run and not reproduced in another: {'yes' if consistent else 'NO'}")
    return "\n".join(lines)


def contradicts(verdicts: list[str]) -> bool:
    """One run says (partly) reproduced and another not reproduced."""
    said = {v.split(":")[0].strip() for v in verdicts}
    return "not reproduced" in said and bool(said & {"reproduced", "partly reproduced"})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Folder for the three experiments.")
    parser.add_argument("--config", help="Base experiment YAML (default: the embedded study).")
    parser.add_argument("--study-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seeds-per-study", type=int, default=3)
    parser.add_argument("--data-seeds", type=int, nargs="*", default=[],
                        help="Also run each study seed on these other draws of the synthesized corpus (data.seed).")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--smoke-test", action="store_true")
    parser.add_argument("--reanalyse", action="store_true",
                        help="Re-run the analysis of finished runs with the current code (same trials).")
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser().resolve()
    base = load_config(args.config)
    summaries, others = {}, {}
    runs = [(s, None) for s in args.study_seeds] + [(s, d) for d in args.data_seeds for s in args.study_seeds]
    for study_seed, data_seed in runs:
        config = study_config(base, study_seed, out, args.seeds_per_study, args.smoke_test, data_seed)
        summary = run_one(config, args.resume, args.reanalyse)
        summary["train_seeds"] = config.train.replicate_seeds
        key = str(study_seed) if data_seed is None else f"{study_seed}, data.seed {data_seed}"
        summaries[key] = summary
        others[key] = other_intervals(config, summary)
        print(f"study seed {key}: " + ", ".join(
            f"finding {k} {summary.get('findings', {}).get(k, {}).get('verdict')}" for k in FINDINGS)
            + (f" ({summary['wall_s']:.0f} s)" if "wall_s" in summary else ""), flush=True)
    print()
    print(table(summaries))
    for study_seed, summary in summaries.items():
        for key in FINDINGS:
            finding = summary.get("findings", {}).get(key, {})
            print(f"study seed {study_seed}, finding {key}: {finding.get('rule', '')}")
    flipped = next(iter(others.values()))["interval"] if others else None
    print(f"\nThe same runs, re-decided with analysis.interval: {flipped}:\n")
    print(table(others))
    for study_seed, summary in others.items():
        for key in FINDINGS:
            print(f"study seed {study_seed}, finding {key} ({flipped}): "
                  f"{summary['findings'].get(key, {}).get('rule', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
