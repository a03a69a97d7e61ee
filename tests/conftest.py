"""Shared fixtures: one private Ray instance per test session, small threads."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

torch.set_num_threads(1)

# Corpora and frozen-feature caches of this test session go to a private folder
# (set before Ray starts, so trial workers inherit it).
if "PEFTTUNE_CACHE" not in os.environ:
    _CACHE = os.environ["PEFTTUNE_CACHE"] = tempfile.mkdtemp(prefix="pefttune-cache-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)  # this session's, so removed at its end


#: this session's private Ray temp folder (set when the session's Ray first starts)
_RAY_TMP: list[str] = []


def start_local_ray():
    """Start (or start again) this test session's local Ray: 2 CPUs, a private temp folder (a
    crashed run's stale state is never joined). ``tests/test_zz_cluster.py`` shuts it down for
    its own cluster and calls this after, so test files may run in any order (``pytest -n``)."""
    import ray

    if not _RAY_TMP:
        _RAY_TMP.append(tempfile.mkdtemp(prefix="pefttune-ray-"))
    os.environ["RAY_TMPDIR"] = _RAY_TMP[0]
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=_RAY_TMP[0], log_to_driver=False,
                 configure_logging=False)
    return ray


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (never `ray stop`: it kills every Ray on the machine)."""
    ray = start_local_ray()
    yield ray
    ray.shutdown()
    shutil.rmtree(_RAY_TMP[0], ignore_errors=True)  # Ray's session folders are large: not left in /tmp
