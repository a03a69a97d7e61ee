"""cluster.yaml (and the on-prem variant) pass Ray's own cluster-config preparation and schema."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-onprem.yaml"])
def test_cluster_config_is_valid(name):
    config = yaml.safe_load((ROOT / name).read_text())
    prepared = _validate(config)
    assert prepared["available_node_types"]
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # the checkout is synced and installed on every node
    assert any("pip install" in cmd and "pefttune" in cmd for cmd in prepared["setup_commands"])


def test_gpu_workers_autoscale():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    worker = config["available_node_types"]["gpu_worker"]
    assert worker["min_workers"] == 0 and worker["max_workers"] >= 1
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}  # no trials on the head


def test_no_secrets_in_cluster_config():
    text = (ROOT / "cluster.yaml").read_text().lower()
    for marker in ("aws_secret_access_key", "aws_access_key_id", "begin rsa private key", "password"):
        assert marker not in text


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c["available_node_types"]["gpu_worker"].__setitem__("min_worker", 1),  # typo
        lambda c: c.__setitem__("head_node_type", "missing"),
        lambda c: c.__setitem__("max_workers", "eight"),
    ],
)
def test_broken_copy_fails_validation(breakage):
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    breakage(config)
    with pytest.raises(Exception) as info:
        _validate(config)
    assert type(info.value).__name__ in {"ValidationError", "ValueError", "KeyError"}
