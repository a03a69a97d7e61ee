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


@pytest.fixture(scope="session")
def ray_session():
    """Start one local Ray for the whole session (never `ray stop`: it kills every Ray on the machine)."""
    import ray

    tmp = tempfile.mkdtemp(prefix="pefttune-ray-")
    os.environ["RAY_TMPDIR"] = tmp  # private: a crashed run's stale state is never joined
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)  # Ray's session folders are large: not left in /tmp
