"""Ray Tune overhead per trial, with and without actor reuse, side by side.

Runs N trivial function trials (one report each) on a private local Ray and prints the
wall time per trial for `reuse_actors=False` and `True` and their ratio. This is the fixed
cost pefttune pays per trial on top of training (the search uses `search.reuse_actors`,
default True).

  python benchmarks/ray_overhead.py --trials 20
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time


def trivial(config):
    from ray import tune

    tune.report({"score": config["x"] * 2})


def run(trials: int, reuse: bool, storage: str) -> float:
    from ray import tune

    tuner = tune.Tuner(
        trivial,
        param_space={"x": tune.grid_search(list(range(trials)))},
        tune_config=tune.TuneConfig(reuse_actors=reuse, max_concurrent_trials=2),
        run_config=tune.RunConfig(storage_path=storage, name=f"overhead-{reuse}", verbose=0),
    )
    start = time.perf_counter()
    results = tuner.fit()
    elapsed = time.perf_counter() - start
    assert len(results) == trials and not results.errors
    return elapsed / trials


def main(argv=None) -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="pefttune-bench-ray-")
    os.environ["RAY_TMPDIR"] = tmp
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, configure_logging=False, log_to_driver=False)
    try:
        storage = tempfile.mkdtemp(prefix="pefttune-bench-storage-")
        fresh = run(args.trials, False, storage)
        reused = run(args.trials, True, storage)
    finally:
        ray.shutdown()
    print(f"# Ray overhead per trial ({args.trials} trivial trials, 2 CPUs, 2 concurrent)")
    print(f"reuse_actors=False  {fresh:6.3f} s/trial")
    print(f"reuse_actors=True   {reused:6.3f} s/trial   ({fresh / reused:.1f}x less)")


if __name__ == "__main__":
    main()
