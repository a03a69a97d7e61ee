"""The discrete search on a multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head
with no CPU and two 1-CPU worker nodes, all on this machine, private temp dir).

- a node-local ``storage`` is refused on more than one node unless ``storage_shared``;
- trials spread over the worker nodes and the search completes;
- a worker node removed mid-search: its trial is retried from its checkpoint on the
  remaining node, and every trial finishes exactly once.

The module shuts the session's local Ray down (the ``ray_session`` fixture starts it only
once), hence the name: it sorts last, so no later test expects that Ray.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pefttune.config import parse_config
from pefttune.runtime.cluster import check_cluster_storage
from pefttune.runtime.study_dir import results_frame
from pefttune.search.run import load_study, run_search
from pefttune.search.space import FixedPoint
from pefttune.testing import Faults, sleep_after
from pefttune.trainables.checkpoint import read_state
from test_search_fixtures import search_config, write_tone_manifest

PER_SPLIT = {"train": 4, "dev": 2, "test": 2}


# -- the decision, as a pure function ------------------------------------------------------------


@pytest.mark.parametrize(
    ("storage", "nodes", "shared", "refused"),
    [
        ("/data/results", 1, False, False),  # a single node: any local path
        ("./results", 0, False, False),
        ("/data/results", 2, False, True),
        ("./results", 3, False, True),
        ("file:///data/results", 2, False, True),  # a file:// URI is node-local too
        ("/mnt/nfs/results", 2, True, False),  # declared shared
        ("s3://bucket/results", 5, False, False),
        ("gs://bucket/results", 2, False, False),
        ("hdfs://namenode:8020/results", 2, False, False),
    ],
)
def test_check_cluster_storage(storage, nodes, shared, refused):
    if not refused:
        check_cluster_storage(storage, nodes, shared)
        return
    with pytest.raises(ValueError) as err:
        check_cluster_storage(storage, nodes, shared)
    message = str(err.value)
    assert message.startswith("storage: ") and repr(storage) in message and f"{nodes} nodes" in message
    assert "Ray >= 2.7" in message and "s3://" in message and "storage_shared: true" in message


def test_storage_shared_is_a_config_field(tmp_path):
    base = {"storage": str(tmp_path)}
    assert parse_config(base).storage_shared is False
    assert parse_config({**base, "storage_shared": True}).storage_shared is True
    with pytest.raises(ValueError, match="storage_shared"):
        parse_config({**base, "storage_shared": "maybe"})


# -- a real multi-node cluster ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    session_ray = ray.is_initialized()  # the session's local Ray (tests/conftest.py): started again after
    if session_ray:
        ray.shutdown()
    temp = tempfile.mkdtemp(prefix="pefttune-cluster-")
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp  # Cluster writes its address file under it, not to /tmp/ray
    node_args = {"temp_dir": os.path.join(temp, "ray"), "object_store_memory": 80 * 1024 * 1024}
    os.makedirs(node_args["temp_dir"])
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node_args, "num_cpus": 0, "include_dashboard": False},
    )
    try:
        workers = [cluster.add_node(num_cpus=1, **node_args) for _ in range(2)]
        cluster.wait_for_nodes()
        yield {"cluster": cluster, "workers": workers, "node_args": node_args}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        if session_ray:  # the files after this one (pytest -n runs files in any order) find it running
            from conftest import start_local_ray

            start_local_ray()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_tone_manifest(tmp_path_factory.mktemp("tones"), classes=2, per_split=PER_SPLIT)


def _config(manifest, storage, name, epochs, **search):
    return parse_config(
        search_config(
            manifest, storage, name=name, storage_shared=True,
            data={"batch_size": 4},
            train={"epochs": epochs, "max_steps_per_epoch": 2},
            search={"scheduler": "none", "max_concurrent": 2, "max_failures": 1, **search},
        )
    )


def _worker_ids(cluster) -> set[str]:
    return {node.node_id for node in cluster["workers"]}


def test_local_storage_is_refused_on_a_cluster(cluster, manifest, tmp_path):
    import ray

    config = _config(manifest, tmp_path, "refused", 1, num_samples=0)
    config = config.model_copy(update={"storage_shared": False})
    with pytest.raises(ValueError, match=r"storage: .* 3 nodes.*Ray >= 2\.7.*storage_shared"):
        run_search(config, address=cluster["cluster"].address, verbose=0)
    assert not ray.is_initialized()  # run_search disconnected
    assert not (tmp_path / "refused").exists()  # refused before the Tuner and the config copy


def test_trials_spread_over_worker_nodes(cluster, manifest, tmp_path):
    # a new actor per trial: two trials at once need both one-CPU workers (a reused actor may run
    # every short trial on the node whose actor started first)
    config = _config(manifest, tmp_path, "spread", 1, num_samples=1, hybrid=False, reuse_actors=False)
    results = run_search(config, address=cluster["cluster"].address, verbose=0)
    frame = results_frame(results, 1)
    assert len(frame) == 4 and frame["trial_id"].is_unique  # 3 uniform baselines + 1 searched
    assert (frame["status"] == "TERMINATED").all() and frame["epoch"].eq(1).all()
    assert frame["test_accuracy"].between(0, 1).all()
    # the head has no CPU: every trial ran on a worker, and both workers ran trials
    assert set(frame["node_id"]) == _worker_ids(cluster)


def _midway(path: Path) -> dict[str, str]:
    """Trials whose newest readable checkpoint is past epoch 1 but not final: their node ids
    (reported with the checkpoint's metrics)."""
    out = {}
    for trial in path.glob("train_fn_*"):
        for checkpoint in sorted(trial.glob("checkpoint_*"), reverse=True):
            try:
                state = read_state(checkpoint)
            except (FileNotFoundError, ValueError):  # being written right now
                continue
            if state.epoch >= 1 and not state.finished:
                out[trial.name] = state.metrics["node_id"]
            break
    return out


def test_node_loss_resumes_trials_from_checkpoints(cluster, manifest, tmp_path):
    import ray

    epochs = 2
    config = _config(manifest, tmp_path, "node-loss", epochs, num_samples=0, uniform_baselines=False, hybrid=False)
    points = [FixedPoint("uniform", method=m) for m in ("lora", "bitfit", "sequential")]
    faults = Faults(after_epoch=sleep_after(4.0))
    path = tmp_path / "node-loss"
    removed: dict = {}
    stop = threading.Event()

    def remove_a_busy_worker():
        # once a trial has its epoch-1 checkpoint and sleeps after it, remove the worker node
        # it runs on (never the node the driver is attached to)
        deadline = time.time() + 150
        while time.time() < deadline and not stop.is_set():
            driver = ray._private.worker.global_worker.node
            for trial, node_id in _midway(path).items():
                node = next((n for n in cluster["workers"] if n.node_id == node_id), None)
                if node is None or (driver is not None and node._raylet_socket_name == driver._raylet_socket_name):
                    continue
                time.sleep(1.0)  # the driver has registered the checkpoint
                removed.update(trial=trial, node_id=node_id)
                cluster["cluster"].remove_node(node)
                cluster["workers"].remove(node)
                return
            time.sleep(0.1)
        removed["error"] = "no trial was seen mid-run on a removable worker"

    remover = threading.Thread(target=remove_a_busy_worker, daemon=True)
    remover.start()
    try:
        results = run_search(config, address=cluster["cluster"].address, extra_points=points, verbose=0,
                             faults=faults)
    finally:
        stop.set()
        remover.join(timeout=60)
        # a fresh worker, so the cluster is whole again for any later test of this module
        cluster["workers"].append(cluster["cluster"].add_node(num_cpus=1, **cluster["node_args"]))
    assert "error" not in removed, removed.get("error")
    assert "node_id" in removed, "no worker node was removed"

    frame = results_frame(results, epochs).set_index("trial_id")
    assert len(frame) == 3 and frame.index.is_unique  # no trial lost or duplicated
    assert sorted(p.name for p in path.glob("train_fn_*")) == sorted(f"train_fn_{t}" for t in frame.index)
    assert (frame["status"] == "TERMINATED").all() and frame["epoch"].eq(epochs).all()
    assert sorted(frame["method"]) == ["bitfit", "lora", "sequential"]
    assert (frame["node_id"] != removed["node_id"]).all()  # every final attempt ran on a live node

    # the trial of the removed node failed once and resumed after its epoch-1 checkpoint
    failures = {t: (path / f"train_fn_{t}" / "error.txt") for t in frame.index}
    failed = [t for t, f in failures.items() if f.exists() and f.read_text().count("Failure #") >= 1]
    assert len(failed) == 1, failed
    assert f"train_fn_{failed[0]}" == removed["trial"]
    assert frame.loc[failed[0], "start_epoch"] == 2  # restored, epoch 1 not run again
    assert (frame.drop(index=failed[0])["start_epoch"] == 1).all()

    study = load_study(path)  # the Optuna study: each trial once, all complete
    assert sorted(t.user_attrs["ray_trial_id"] for t in study.get_trials()) == sorted(frame.index)
    assert all(t.state.name == "COMPLETE" for t in study.get_trials())
