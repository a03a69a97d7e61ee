"""One discrete placement search on Ray Tune: build, run, resume, read the results.

:func:`run_search` is the entry point (``pefttune search`` and ``pefttune run`` call it):

1. validate the config, the space and the experiment directory ``<storage>/<name>/``
   (a new search never reuses an existing directory; ``resume=True`` needs one), all
   before Ray starts;
2. start a private local Ray (loopback, no dashboard, private temp dir) or join one
   (``address``, else ``RAY_ADDRESS``); on a multi-node cluster refuse a node-local
   ``storage`` unless ``storage_shared`` (:func:`check_cluster_storage`); write
   ``experiment.yaml`` to the experiment directory;
3. run a :class:`ray.tune.Tuner` of :func:`pefttune.trainables.discrete.train_fn` with
   :class:`~pefttune.search.optuna_search.PefttuneSearch` (Optuna study in
   ``<dir>/optuna.db``), ASHA on ``epoch`` (``max_t = train.epochs``) and
   ``FailureConfig(max_failures=search.max_failures)``; or restore it
   (``Tuner.restore(..., resume_unfinished=True)``) to finish unfinished trials.

Design choices
--------------
- **Fixed points**: uniform baselines (one per candidate method, first listed value of
  each hyper-parameter, lr = ``train.lr``) and the hybrid are trials of the *same*
  experiment and the same Optuna study: they are enqueued Optuna trials, run first, tagged
  ``kind="uniform"``/``"hybrid"``. ``num_samples`` counts only the searched trials.
- **Budget**: rejection when the trial starts: the trainable reports once with
  ``over_budget=True``, ``epoch=0`` and the worst score, and trains nothing. Optuna gets
  the constraint ``peft_params - budget`` (set by the space), so TPE/NSGA-II learn the
  region is infeasible. ``search.budget_exempt_fixed`` lets fixed points train anyway.
- **Objective**: ``best_dev_<metric>`` (best dev score so far, full epochs only) for ASHA
  and Optuna; plus ``trainable_params`` (min) with ``search.multi_objective``.
- **Early stopping**: ASHA-stopped trials are told PRUNED to Optuna (not COMPLETE).
- **Divergence**: a NaN loss ends the trial as ERROR with the DivergedError message; retries
  re-raise at once (the trainable leaves a marker), so the experiment continues.
- **Top-k**: Ray has none; :func:`results_frame` + :func:`top_k` sort the trials.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from pefttune.config import ExperimentConfig, load_config, parse_config
from pefttune.search.optuna_search import PARAMS_METRIC, Objective, PefttuneSearch, make_sampler, make_storage
from pefttune.search.space import FixedPoint, PlacementSpace, fixed_points, validate_space
from pefttune.trainables import common

logger = logging.getLogger(__name__)

CONFIG_COPY = "experiment.yaml"
OPTUNA_DB = "optuna.db"
TUNER_FILE = "tuner.pkl"


# -- the experiment -----------------------------------------------------------------------------


@dataclass
class Experiment:
    """Everything a search needs, built and validated before Ray starts."""

    config: ExperimentConfig
    path: str  # <storage>/<name>, absolute local path or URI
    space: PlacementSpace
    objective: Objective
    points: list[FixedPoint] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return self.objective.metric

    @property
    def mode(self) -> str:
        return self.objective.mode

    @property
    def is_local(self) -> bool:
        return "://" not in self.path

    @property
    def storage_path(self) -> str:
        return self.path.rsplit("/", 1)[0] if not self.is_local else str(Path(self.path).parent)

    @property
    def optuna_url(self) -> str:
        if self.config.search.optuna_storage:
            return self.config.search.optuna_storage
        if not self.is_local:
            raise ValueError(
                f"search.optuna_storage: required when storage is a URI ({self.config.storage}); "
                "give an RDB URL such as sqlite:////shared/optuna.db or postgresql://..."
            )
        return f"sqlite:///{Path(self.path) / OPTUNA_DB}"

    @property
    def num_samples(self) -> int:
        """Ray trials: searched ones (the whole grid at most) plus the fixed points."""
        searched = self.config.search.num_samples
        if self.config.search.algorithm == "grid":
            size = self.space.grid_size()
            searched = size if searched == 0 else min(searched, size)
        return searched + len(self.points)


def experiment_path(config: ExperimentConfig) -> str:
    storage = config.storage
    if "://" in storage:
        return f"{storage.rstrip('/')}/{config.name}"
    return str(Path(storage).expanduser().resolve() / config.name)


def build_experiment(config: ExperimentConfig, extra_points: list[FixedPoint] | None = None) -> Experiment:
    """Validate everything that can be checked without Ray (errors name the field)."""
    info = common.backbone_info(config.backbone)
    space = validate_space(config, info)
    metric = config.metric
    objective = Objective(
        metric=f"best_dev_{metric}",
        mode=common.metric_mode(metric),
        max_epochs=config.train.epochs,
        multi_objective=config.search.multi_objective,
    )
    if config.search.scheduler == "asha" and config.search.grace_period > config.train.epochs:
        raise ValueError(
            f"search.grace_period: {config.search.grace_period} is more than train.epochs ({config.train.epochs})"
        )
    points = fixed_points(config) + list(extra_points or [])
    for point in points:
        space.fixed_placement(point)
    experiment = Experiment(config, experiment_path(config), space, objective, points)
    experiment.optuna_url  # noqa: B018 - raises for a URI storage without optuna_storage
    return experiment


# -- the experiment directory ---------------------------------------------------------------------


def _exists(path: str) -> bool:
    import pyarrow.fs

    fs, inner = common.storage_filesystem(path)
    return fs.get_file_info(inner).type != pyarrow.fs.FileType.NotFound


def _is_experiment(path: str) -> bool:
    """The directory holds a search (its config copy or Ray's tuner state)."""
    return _exists(f"{path}/{CONFIG_COPY}") or _exists(f"{path}/{TUNER_FILE}")


def config_yaml(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def prepare_directory(experiment: Experiment, resume: bool, write: bool = True) -> None:
    """Refuse to overwrite an experiment; on resume, require one with the same config.

    A new search's config copy is written unless ``write=False`` (then
    :func:`write_config_copy` writes it later, once the cluster checks passed)."""
    path = experiment.path
    if not resume:
        if _is_experiment(path):
            raise FileExistsError(
                f"experiment directory {path} already holds a search; resume it (--resume) "
                "or choose another name (--name)"
            )
        if write:
            write_config_copy(experiment)
        return
    if not _exists(f"{path}/{TUNER_FILE}"):
        raise FileNotFoundError(f"--resume: no search to resume at {path} (missing {TUNER_FILE})")
    if _exists(f"{path}/{CONFIG_COPY}"):
        saved = yaml.safe_load(common.read_storage_text(f"{path}/{CONFIG_COPY}"))
        current = experiment.config.model_dump(mode="json")
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if changed:
            raise ValueError(
                f"--resume: the config differs from {path}/{CONFIG_COPY} in {', '.join(changed)}; "
                "resume with the saved config"
            )


def write_config_copy(experiment: Experiment) -> None:
    common.write_storage_text(f"{experiment.path}/{CONFIG_COPY}", config_yaml(experiment.config))


# -- Ray ---------------------------------------------------------------------------------------------


def connect_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join Ray at ``address`` or start a private local one; True if this call started it.

    Without ``address``, ``RAY_ADDRESS`` (set by ``ray job submit`` for its drivers) is
    joined if set. An already initialized Ray is used as is."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    temp_dir = tempfile.mkdtemp(prefix="pefttune-ray-")
    os.environ["RAY_TMPDIR"] = temp_dir
    with _loopback_only():
        ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir, _node_ip_address="127.0.0.1",
                 configure_logging=False)
    return True


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
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


@contextlib.contextmanager
def _loopback_only():
    """Make a local Ray listen on 127.0.0.1 only.

    Ray maps ``_node_ip_address="127.0.0.1"`` to the machine's routable address unless
    clusters are disabled (its switch for laptops: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read
    by the GCS, raylet and workers it starts, and by this process at import, hence the
    constant is set too). Both are restored once Ray runs; its node address stays 127.0.0.1.
    """
    from ray._private import ray_constants

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


def build_searcher(experiment: Experiment) -> PefttuneSearch:
    sampler = make_sampler(experiment.config, experiment.space)
    storage = make_storage(experiment.optuna_url)
    return PefttuneSearch(
        experiment.space,
        experiment.objective,
        sampler=sampler,
        storage=storage,
        study_name=experiment.config.name,
        points=experiment.points,
    )


#: Trial kinds that ASHA never stops: the baselines every comparison (and ensemble) needs.
FIXED_KINDS = ("uniform", "hybrid")


def build_scheduler(experiment: Experiment):
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

    class BaselineKeepingASHA(AsyncHyperBandScheduler):
        """ASHA over the searched trials; uniform baselines and the hybrid always run to the end
        (their final dev/test predictions feed the comparisons and the ensembles)."""

        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            if trial.config.get("kind") in FIXED_KINDS:
                return TrialScheduler.CONTINUE
            return decision

    search = experiment.config.search
    if search.scheduler == "none":
        return FIFOScheduler()
    return BaselineKeepingASHA(
        time_attr="epoch",
        metric=experiment.metric,
        mode=experiment.mode,
        max_t=experiment.config.train.epochs,
        grace_period=search.grace_period,
        reduction_factor=search.reduction_factor,
    )


def progress_reporter(experiment: Experiment):
    from ray import tune

    metric = experiment.config.metric
    return tune.CLIReporter(
        metric_columns={
            "epoch": "epoch",
            f"dev_{metric}": f"dev_{metric}",
            experiment.metric: experiment.metric,
            "trainable_params": "params",
            "over_budget": "over_budget",
        },
        parameter_columns={"kind": "kind", "lr": "lr"},
        max_report_frequency=30,
        sort_by_metric=True,
        metric=experiment.metric,
        mode=experiment.mode,
    )


def run_config(experiment: Experiment, verbose: int = 1):
    from ray import tune

    return tune.RunConfig(
        name=experiment.config.name,
        storage_path=experiment.storage_path,
        # the latest checkpoint holds the best-dev weights too; keeping two means the one the
        # last experiment snapshot refers to still exists when a resume needs it
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        failure_config=tune.FailureConfig(max_failures=experiment.config.search.max_failures),
        progress_reporter=progress_reporter(experiment) if verbose else None,
        verbose=verbose,
    )


def trial_name(trial) -> str:
    return f"{trial.trainable_name}_{trial.trial_id}"


def build_tuner(experiment: Experiment, setup, verbose: int = 1):
    from ray import tune

    from pefttune.trainables.discrete import make_trainable

    search = experiment.config.search
    return tune.Tuner(
        make_trainable(setup),
        tune_config=tune.TuneConfig(
            search_alg=build_searcher(experiment),
            scheduler=build_scheduler(experiment),
            num_samples=experiment.num_samples,
            max_concurrent_trials=search.max_concurrent,
            reuse_actors=search.reuse_actors,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=run_config(experiment, verbose),
    )


def run_search(
    config: ExperimentConfig | str | Path,
    address: str | None = None,
    resume: bool = False,
    *,
    name: str | None = None,
    extra_points: list[FixedPoint] | None = None,
    resume_errored: bool = False,
    verbose: int = 1,
):
    """Run (or resume) the discrete placement search of ``config``; returns the ResultGrid.

    ``extra_points`` adds fixed points (e.g. ``FixedPoint("darts-derived", placement=...)``)
    to a new search. ``resume=True`` finishes the unfinished trials of ``<storage>/<name>``
    and never re-runs finished ones (``resume_errored=True`` also retries errored trials).
    """
    from ray import tune

    if not isinstance(config, ExperimentConfig):
        config = load_config(config)
    if name is not None:
        config = parse_config({**config.model_dump(mode="json"), "name": name}, source="--name")
    experiment = build_experiment(config, extra_points)
    prepare_directory(experiment, resume, write=False)
    setup = make_setup(config)

    started = connect_ray(address)
    try:
        # before the Tuner (and before the config copy, so a refused search can be rerun)
        check_cluster_storage(config.storage, alive_nodes(), config.storage_shared)
        if not resume:
            write_config_copy(experiment)
        if resume:
            from pefttune.trainables.discrete import make_trainable

            tuner = tune.Tuner.restore(
                experiment.path,
                trainable=make_trainable(setup),
                resume_unfinished=True,
                resume_errored=resume_errored,
            )
        else:
            tuner = build_tuner(experiment, setup, verbose)
        with _fit_environment():
            results = tuner.fit()
    finally:
        if started:
            import ray

            ray.shutdown()
    if verbose:
        print(summary_table(results_frame(results, config.train.epochs), config))
    return results


#: Driver environment while the Tuner runs: Ray's classic CLIReporter table (the new output
#: engine ignores progress reporters), and no warning about the experiment snapshot that
#: Tune takes after each trial checkpoint (wanted: it keeps resumes exact).
_FIT_ENVIRONMENT = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


@contextlib.contextmanager
def _fit_environment():
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


def make_setup(config: ExperimentConfig):
    """The trials' shared setup; a local backbone path is made absolute (trials run in
    their own working directories)."""
    from pefttune.trainables.discrete import TrialSetup

    backbone = Path(config.backbone).expanduser()
    if config.backbone.startswith((".", "/", "~")) or backbone.exists():
        config = config.model_copy(update={"backbone": str(backbone.resolve())})
    return TrialSetup(experiment=config, data=common.prepare_data(config), experiment_path=experiment_path(config))


def load_results(path: str | Path):
    """The ResultGrid of a finished (or interrupted) search directory, without running it."""
    from ray import tune
    from ray.tune import ResultGrid

    return ResultGrid(tune.ExperimentAnalysis(str(path)))


def load_study(path: str | Path, name: str | None = None):
    """The Optuna study of a search directory (sqlite default storage)."""
    import optuna

    path = Path(path)
    url = f"sqlite:///{path / OPTUNA_DB}"
    return optuna.load_study(study_name=name or path.name, storage=url)


# -- results ---------------------------------------------------------------------------------------------

#: Columns every row of :func:`results_frame` has.
BASE_COLUMNS = [
    "trial_id", "status", "kind", "method", "placement_short", "peft_params", "trainable_params",
    "over_budget", "epoch", "stopped_early", "error",
]


def results_frame(results, epochs: int | None = None) -> pd.DataFrame:
    """One row per trial: its last reported metrics, ``status`` (TERMINATED/ERROR),
    ``error``, ``stopped_early``, ``checkpoint`` and the placement columns (taken from the
    trial config when the trial errored before reporting)."""
    rows = []
    for result in results:
        metrics = {k: v for k, v in (result.metrics or {}).items() if k != "config"}
        config = result.config or {}
        row = dict(metrics)
        row["trial_id"] = metrics.get("trial_id") or getattr(result, "path", "").rsplit("/", 1)[-1]
        row["status"] = "ERROR" if result.error else "TERMINATED"
        row["error"] = _error_text(result.error) if result.error else ""
        row["checkpoint"] = result.checkpoint.path if result.checkpoint else ""
        row["path"] = result.path
        if "placement" not in row and "placement" in config:
            row.update(common.placement_columns(common.parse_placement(config["placement"])))
        for key in ("kind", "method", "lr", "peft_params"):
            if row.get(key) is None and key in config:
                row[key] = config[key] if config[key] is not None else ""
        row.setdefault("over_budget", False)
        row.setdefault("epoch", 0)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=BASE_COLUMNS)
    if "head_params" in frame:
        head = frame["head_params"].dropna()
        if len(head):
            frame["head_params"] = frame["head_params"].fillna(head.iloc[0])
            missing = frame["trainable_params"].isna() if "trainable_params" in frame else True
            frame.loc[missing, "trainable_params"] = frame["peft_params"] + frame["head_params"]
    frame["over_budget"] = frame["over_budget"].fillna(False).astype(bool)
    frame["epoch"] = frame["epoch"].fillna(0).astype(int)
    if epochs is None:  # default: the most epochs any trial ran
        epochs = int(frame["epoch"].max())
    frame["stopped_early"] = (frame["status"] == "TERMINATED") & ~frame["over_budget"] & (frame["epoch"] < epochs)
    layers = sorted(c for c in frame.columns if c.startswith("layer_"))
    ordered = [c for c in BASE_COLUMNS if c in frame] + layers
    return frame[ordered + [c for c in frame.columns if c not in ordered]]


def _error_text(error) -> str:
    text = str(error)
    for line in reversed(text.strip().splitlines()):
        if "Error" in line:
            return line.strip()
    return text.strip().splitlines()[-1] if text.strip() else type(error).__name__


def top_k(frame: pd.DataFrame, metric: str, mode: str, k: int = 5, kinds: list[str] | None = None) -> pd.DataFrame:
    """The k best finished trials by ``metric`` (e.g. ``best_dev_accuracy``): no errors, no
    over-budget or early-stopped trials; ties broken by fewer trainable parameters."""
    if metric not in frame:
        return frame.iloc[0:0]
    keep = (frame["status"] == "TERMINATED") & ~frame["over_budget"] & ~frame["stopped_early"]
    keep &= frame[metric].notna()
    if kinds is not None:
        keep &= frame["kind"].isin(kinds)
    chosen = frame[keep]
    by = [metric, "trainable_params"] if "trainable_params" in chosen else [metric]
    ascending = [mode == "min", True][: len(by)]
    return chosen.sort_values(by, ascending=ascending, kind="mergesort").head(k)


def pareto_front(frame: pd.DataFrame, metric: str, mode: str, params: str = PARAMS_METRIC) -> pd.DataFrame:
    """Finished trials not dominated in (metric, trainable parameters), fewest parameters first."""
    chosen = top_k(frame, metric, mode, k=len(frame))
    sign = 1.0 if mode == "max" else -1.0
    front = []
    for index, row in chosen.iterrows():
        score, size = sign * row[metric], row[params]
        dominated = any(
            (sign * other[metric] >= score and other[params] <= size)
            and (sign * other[metric] > score or other[params] < size)
            for _, other in chosen.iterrows()
        )
        if not dominated:
            front.append(index)
    return chosen.loc[front].sort_values(params, kind="mergesort")


def summary_table(frame: pd.DataFrame, config: ExperimentConfig, k: int = 5) -> str:
    """Text summary: counts, best trials, uniform baselines (+ hybrid), Pareto front."""
    metric = f"best_dev_{config.metric}"
    mode = common.metric_mode(config.metric)
    test = f"test_{config.metric}"
    columns = [c for c in ["kind", "method", "placement_short", "trainable_params", metric, test, "epoch"] if c in frame]
    lines = [f"experiment {config.name}: {len(frame)} trials"]
    if len(frame):
        counts = {
            "finished": int(((frame["status"] == "TERMINATED") & ~frame["over_budget"] & ~frame["stopped_early"]).sum()),
            "stopped early": int(frame["stopped_early"].sum()),
            "over budget": int(frame["over_budget"].sum()),
            "errors": int((frame["status"] == "ERROR").sum()),
        }
        lines.append(", ".join(f"{v} {k}" for k, v in counts.items()))
    with pd.option_context("display.max_colwidth", 80, "display.width", 200):
        best = top_k(frame, metric, mode, k)
        lines += [f"\nbest {len(best)} trials by {metric}:", best[columns].to_string(index=False) if len(best) else "  (none)"]
        if "kind" in frame:
            fixed = frame[frame["kind"].isin(["uniform", "hybrid"])]
            if len(fixed):
                lines += ["\nuniform baselines and hybrid:", fixed[columns + ["status"]].to_string(index=False)]
        if config.search.multi_objective:
            front = pareto_front(frame, metric, mode)
            lines += ["\nPareto front (metric vs trainable parameters):",
                      front[columns].to_string(index=False) if len(front) else "  (none)"]
        errors = frame[frame["status"] == "ERROR"]
        if len(errors):
            lines += ["\nerrors:", errors[["trial_id", "kind", "error"]].to_string(index=False)]
    return "\n".join(lines)

