"""What produced a result (pefttune.runtime.provenance): collected, hashed, rendered, stored."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import yaml

from pefttune.config import parse_config
from pefttune.runtime import provenance
from pefttune.runtime.provenance import NOT_A_CHECKOUT, PARQUET_KEY, Provenance, collect, config_hash, markdown


def test_collect_names_versions_machine_and_config():
    import numpy
    import ray
    import torch

    prov = collect(parse_config({}))
    assert prov.torch.split("+")[0] == torch.__version__.split("+")[0]
    assert (prov.numpy, prov.ray) == (numpy.__version__, ray.__version__)
    assert prov.cpu and prov.cpu_threads >= 1
    if torch.cuda.is_available():
        assert prov.gpu_count == torch.cuda.device_count() and prov.gpu != "none"
    else:
        assert (prov.gpu, prov.gpu_count) == ("none", 0)
    assert len(prov.config_hash) == 16 and collect().config_hash is None


def test_the_config_hash_is_that_of_the_saved_config_and_ignores_tracking():
    from pefttune.runtime.study_dir import config_yaml

    config = parse_config({"train": {"lr": 0.01, "seeds": [0, 1]}})
    assert config_hash(config) == config_hash(yaml.safe_load(config_yaml(config)))  # experiment.yaml
    assert config_hash(config) == config_hash(parse_config({"train": {"lr": 0.01, "seeds": [0, 1]},
                                                            "tracking": {"mlflow": True}}))
    assert config_hash(config) != config_hash(parse_config({"train": {"lr": 0.02, "seeds": [0, 1]}}))


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_the_commit_is_that_of_pefttunes_own_checkout(tmp_path):
    package = tmp_path / "repo" / "src" / "pefttune"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    assert provenance._git_state(package) == (NOT_A_CHECKOUT, None)  # no repository at all
    repo = tmp_path / "repo"
    _git(repo, "init", "-q")
    (repo / "other.txt").write_text("y")
    _git(repo, "add", "other.txt")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    # installed inside some other repository's tree (untracked there): not a checkout of pefttune
    assert provenance._git_state(package) == (NOT_A_CHECKOUT, None)
    _git(repo, "add", "src")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pefttune")
    assert provenance._git_state(package) == (_git(repo, "rev-parse", "HEAD"), False)
    (package / "__init__.py").write_text("x = 2\n")
    assert provenance._git_state(package) == (_git(repo, "rev-parse", "HEAD"), True)


def test_markdown_shows_every_field():
    prov = Provenance(pefttune="0.1.0", git_commit="abc123", git_modified=True, python="3.11.7", torch="2.13.0",
                      transformers="5.25.0", peft="0.21.2", ray="2.60.0", optuna="5.1.0", numpy="2.4.6",
                      cpu="AMD EPYC", cpu_threads=2, gpu="NVIDIA H100", gpu_count=1, config_hash="0123456789abcdef")
    text = "\n".join(markdown(prov.to_dict()))
    for part in ("## Provenance", "0.1.0, commit `abc123 (modified)`", "`0123456789abcdef`", "3.11.7",
                 "torch 2.13.0, transformers 5.25.0, peft 0.21.2, ray 2.60.0, optuna 5.1.0, numpy 2.4.6",
                 "AMD EPYC, 2 threads", "1 x NVIDIA H100"):
        assert part in text, part
    assert max(len(line) for line in text.splitlines()) <= 120


def test_a_table_carries_the_provenance_in_its_parquet_schema(tmp_path):
    from pefttune.analysis.tables import write_table

    frame = pd.DataFrame({"a": [1, 2], "b": ["x", None], "c": pd.array([1, None], dtype="Int64")})
    prov = collect(parse_config({}))
    files = write_table(frame, tmp_path, "t", provenance=prov)
    meta = pq.read_schema(files["t.parquet"]).metadata
    assert json.loads(meta[PARQUET_KEY]) == prov.to_dict()
    pd.testing.assert_frame_equal(pd.read_parquet(files["t.parquet"]), frame)  # the frame as it was
    write_table(frame, tmp_path / "plain", "t")
    assert PARQUET_KEY not in (pq.read_schema(tmp_path / "plain" / "t.parquet").metadata or {})
