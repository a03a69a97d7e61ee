"""`pefttune run` end to end on a reduced config: both arms, ensembles, exports, plots, report."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from pefttune.cli import main as cli_main

pytestmark = pytest.mark.slow


def test_pefttune_run_smoke_writes_every_artefact(ray_session, tmp_path, capsys):
    from test_search_fixtures import search_config, write_tone_manifest

    manifest = write_tone_manifest(tmp_path / "data", classes=3, per_split={"train": 6, "dev": 3, "test": 3})
    config = search_config(
        manifest, tmp_path / "results", name="smoke",
        train={"epochs": 2, "max_steps_per_epoch": 2},
        search={"num_samples": 2, "scheduler": "none", "max_failures": 0, "hybrid": True},
        darts={"warmup_epochs": 0, "seeds": [0]},
    )
    # a hybrid candidate whose members are candidates on their own too (DARTS' supernet holds both)
    config["methods"] = {"lora": {"rank": 2}, "bitfit": {}, "sequential": {"bottleneck": 8},
                         "hybrid": {"sequential": {"bottleneck": 4}, "lora": {"rank": 1}}}
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))

    assert cli_main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    for stage in ("discrete arm", "DARTS arm", "analysis"):
        assert stage in out
    assert "finding 1:" in out and "finding 2:" in out and "finding 3:" in out

    experiment = tmp_path / "results" / "smoke"
    analysis = experiment / "analysis"
    report = (analysis / "report.md").read_text()
    for finding in ("Finding 1", "Finding 2", "Finding 3"):
        assert finding in report
    for table in ("trials", "history", "alpha", "predictions", "ensembles"):
        for suffix in ("parquet", "csv"):
            assert (analysis / "tables" / f"{table}.{suffix}").stat().st_size > 0, table
    trials = pd.read_parquet(analysis / "tables" / "trials.parquet")
    kinds = set(trials["kind"])
    assert {"uniform", "hybrid", "discrete", "darts", "darts-derived"} <= kinds, kinds
    assert {"layer_00", "layer_01", "layer_02", "layer_03"} <= set(trials.columns)
    assert len(trials[trials["kind"] == "uniform"]) == 3
    alpha = pd.read_parquet(analysis / "tables" / "alpha.parquet")
    assert set(alpha["method"]) >= {"none", "lora", "bitfit", "sequential", "hybrid"} and len(alpha) > 0
    plots = sorted(p.name for p in (analysis / "plots").glob("*.png"))
    assert plots and all((analysis / "plots" / p).stat().st_size > 1000 for p in plots)
    summary = json.loads((analysis / "summary.json").read_text())
    assert summary["n_trials"] == len(trials)

    # an existing experiment is never overwritten: a second run without --resume is refused
    assert cli_main(["run", str(path)]) == 2
    assert "already holds" in capsys.readouterr().err
