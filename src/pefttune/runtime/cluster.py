"""Ray for pefttune: connect (a private loopback instance, or join a cluster), check that a
multi-node cluster has shared storage, the driver's environment while a Tuner runs, and a
trial's device, threads and GPU-memory wait.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time

import torch


def connect_ray(address: str | None, num_cpus: int | None = None, log_to_driver: bool = True) -> bool:
    """Join Ray at ``address`` or start a private local one; True if this call started it.

    Without ``address``, ``RAY_ADDRESS`` (set by ``ray job submit`` for its drivers) is
    joined if set. An already initialized Ray is used as is. ``log_to_driver=False`` keeps
    the workers' output (trial prints, checkpoint lines, weight-loading bars) off the
    driver's console; it stays in Ray's log files. It also keeps off the notice on token
    authentication that Ray logs at every ``ray.init`` (Ray's default applies either way)."""
    import ray  # Ray on use: the analysis reads results without it

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    with _quiet_logger(_RAY_AUTH_LOGGER, not log_to_driver):
        if address:
            ray.init(address=address, log_to_driver=log_to_driver)
            return True
        temp_dir = tempfile.mkdtemp(prefix="pefttune-ray-")
        os.environ["RAY_TMPDIR"] = temp_dir
        with _loopback_only():
            ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir, _node_ip_address="127.0.0.1",
                     configure_logging=False, log_to_driver=log_to_driver)
    return True


#: The logger of Ray's notice "Token authentication is enabled for this Ray cluster. ..."
_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


@contextlib.contextmanager
def _quiet_logger(name: str, quiet: bool):
    """Only errors of logger ``name`` while the block runs (when ``quiet``)."""
    import logging

    logger = logging.getLogger(name)
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def is_node_local(storage: str) -> bool:
    """A path (or file:// URI) on the local disk of whichever node reads it."""
    return "://" not in storage or storage.startswith("file://")


def check_cluster_storage(storage: str, nodes: int, storage_shared: bool = False) -> None:
    """Refuse a node-local ``storage`` path on a multi-node cluster (``nodes`` alive).

    Ray >= 2.7 no longer syncs trial directories from worker nodes to the head: trials
    write checkpoints straight to ``storage``, so every node must see the same storage.
    A URI (s3://, gs://, any pyarrow filesystem) passes, as does a single node or a local
    path declared shared (``storage_shared``: e.g. NFS mounted at the same path everywhere).
    """
    if nodes <= 1 or storage_shared or not is_node_local(storage):
        return
    raise ValueError(
        f"storage: {storage!r} is a node-local path but the Ray cluster has {nodes} nodes; "
        "Ray >= 2.7 no longer syncs trial directories (checkpoints, results) to the head node, "
        "so each node would write its trials to its own disk. Use a URI every node can reach "
        "(s3://, gs://, any pyarrow filesystem) or a shared filesystem mounted at the same path "
        "on every node and set storage_shared: true"
    )


def alive_nodes() -> int:
    """Alive nodes of the connected Ray cluster."""
    import ray  # Ray on use: the analysis reads results without it

    return sum(1 for node in ray.nodes() if node.get("Alive"))


@contextlib.contextmanager
def _loopback_only():
    """Make a local Ray listen on 127.0.0.1 only.

    Ray maps ``_node_ip_address="127.0.0.1"`` to the machine's routable address unless
    clusters are disabled (its switch for laptops: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read
    by the GCS, raylet and workers it starts, and by this process at import, hence the
    constant is set too). Both are restored once Ray runs; its node address stays 127.0.0.1.
    """
    from ray._private import ray_constants  # Ray on use: the analysis reads results without it

    key = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    previous_env, previous_flag = os.environ.get(key), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[key] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous_flag
        if previous_env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous_env


#: Driver environment while the Tuner runs: Ray's classic CLIReporter table (the new output
#: engine ignores progress reporters), and no warning about the experiment snapshot that
#: Tune takes after each trial checkpoint (wanted: it keeps resumes exact).
_FIT_ENVIRONMENT = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


@contextlib.contextmanager
def fit_environment():
    previous = {key: os.environ.get(key) for key in _FIT_ENVIRONMENT}
    os.environ.update(_FIT_ENVIRONMENT)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def trial_name(trial) -> str:
    """Ray trial (and trial folder) name: ``<trainable>_<trial id>``, stable across resumes."""
    return f"{trial.trainable_name}_{trial.trial_id}"


# -- a trial's device ------------------------------------------------------------------------------


def trial_device(gpus: float, wait_s: float = 0.0, poll_s: float = 1.0) -> torch.device:
    """The trial's device. On a GPU, first wait (up to ``wait_s``) until the free memory
    reaches the trial's share ``min(gpus, 1) x total``, so a trial does not start while the
    previous occupant of its slot is still releasing memory."""
    if gpus > 0:
        if not torch.cuda.is_available():
            raise RuntimeError("resources.gpu > 0 but this trial sees no CUDA device")
        wait_for_gpu_memory(min(gpus, 1.0), wait_s, poll_s)
        return torch.device("cuda")
    return torch.device("cpu")


def wait_for_gpu_memory(share: float, wait_s: float, poll_s: float = 1.0) -> float:
    """Seconds waited until ``free >= share x total`` GPU memory (gives up after ``wait_s``)."""
    start = time.monotonic()
    while True:
        free, total = torch.cuda.mem_get_info()
        waited = time.monotonic() - start
        if free >= share * total or waited >= wait_s:
            if free < share * total:
                print(f"[pefttune] GPU memory still busy after {waited:.0f}s "
                      f"({free / 2**30:.1f} of {total / 2**30:.1f} GiB free); starting anyway", flush=True)
            return waited
        time.sleep(poll_s)


def set_threads(cpus: float) -> None:
    torch.set_num_threads(max(1, int(cpus)))


def grid_tune_config(max_concurrent: int, reuse_actors: bool):
    """``TuneConfig`` of a grid experiment (one trial per grid point), trials named by :func:`trial_name`."""
    from ray import tune  # Ray on use: the analysis reads results without it

    return tune.TuneConfig(
        num_samples=1,
        max_concurrent_trials=max_concurrent,
        reuse_actors=reuse_actors,
        trial_name_creator=trial_name,
        trial_dirname_creator=trial_name,
    )
