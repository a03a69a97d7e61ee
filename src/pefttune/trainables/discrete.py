"""The Ray Tune function trainable of one discrete placement: ``train_fn``.

``tune.with_parameters(train_fn, setup=TrialSetup(...))`` (see
:func:`make_trainable`); the trial config holds:

- ``placement``: the placement (JSON string or mapping, :meth:`Placement.to_dict` form);
- ``kind``: ``uniform`` / ``discrete`` / ``hybrid`` / ``darts-derived``; ``method``
  (uniform baselines); ``lr`` (default ``train.lr``); ``budget_exempt`` (train even over
  ``config.budget``);
- test hooks: ``_fail_once_at_epoch`` (raise once after that epoch's checkpoint; a marker
  file in the trial dir makes it once), ``_nan_at_epoch`` (set the head's weights to NaN
  at that epoch's first step, so the real NaN-loss path runs) and ``_sleep_after_epoch``
  (seconds to wait after each report: a trial slow enough to interrupt).

Per epoch it reports (``tune.report``) the dev metric and loss, ``best_dev_<metric>``,
``trainable_params`` (PEFT + head), ``peft_params``, ``samples_per_s``, ``epoch``, the
placement columns (``placement`` JSON, ``placement_short``, ``layer_00``...), ``kind``,
``method``, ``over_budget`` and ``node_id`` (the Ray node of this attempt), with a
checkpoint of the PEFT + head weights, the optimizer/scheduler state and the epoch. The last epoch first scores the best-dev
weights on dev and test and adds ``test_<metric>``/``test_loss`` and the per-example
predictions to the final checkpoint (before the report: ASHA stops a trial right at its
``max_t`` report).

Budget: a placement with more PEFT parameters than ``config.budget`` is rejected before
anything is built: one report with ``over_budget=True``, ``epoch=0`` and the worst score,
no checkpoint.

Divergence: a NaN/inf loss raises :class:`~pefttune.training.DivergedError`; the message is
also written to ``DIVERGED`` in the trial's folder of the experiment storage, and a retry
(``FailureConfig``) or a resume re-raises it at once instead of training again, so the
trial ends as an error with that message and the experiment goes on. (Delete the file to
train that trial again with ``resume_errored``.)
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from pefttune.config import ExperimentConfig
from pefttune.heads import HeadConfig
from pefttune.model import build_model
from pefttune.training import DivergedError, EpochResult, Hooks, fit, is_better, setup_optimizer, setup_scheduler
from pefttune.trainables import common
from pefttune.trainables.common import CheckpointState

@dataclass
class TrialSetup:
    """What every trial shares (passed once through ``tune.with_parameters``)."""

    experiment: ExperimentConfig
    data: common.DataRef
    experiment_path: str | None = None  # <storage>/<name>: per-trial markers live there

    @property
    def head(self) -> HeadConfig:
        return self.data.head_config(self.experiment)


def make_trainable(setup: TrialSetup):
    """``train_fn`` bound to ``setup``, with the per-trial resources of the experiment."""
    from ray import tune

    resources = setup.experiment.resources
    trainable = tune.with_parameters(train_fn, setup=setup)
    return tune.with_resources(trainable, {"cpu": resources.cpu, "gpu": resources.gpu})


def _trial_value(config: dict, key: str, default=None):
    value = config.get(key, default)
    return default if value is None else value


def train_fn(config: dict, setup: TrialSetup) -> None:
    """Train, evaluate and checkpoint one placement (a Ray Tune function trainable)."""
    import ray
    from ray import tune

    experiment = setup.experiment
    if "placement" not in config:
        raise ValueError("trial config: missing 'placement'")
    placement = common.parse_placement(config["placement"])
    info = common.backbone_info(experiment.backbone)
    placement.validate_for(info)
    lr = float(_trial_value(config, "lr", experiment.train.lr))
    train = common.train_config(experiment, lr=lr)
    metric, mode = train.metric, train.mode
    head = setup.head
    peft = placement.trainable_parameters(info)
    head_params = common.head_parameters(info, head)
    columns = {
        **common.placement_columns(placement),
        "kind": _trial_value(config, "kind", "discrete"),
        "method": _trial_value(config, "method", ""),
        "lr": lr,
        "peft_params": peft,
        "head_params": head_params,
        "trainable_params": peft + head_params,
        "node_id": ray.get_runtime_context().get_node_id(),  # where this attempt runs (clusters)
    }
    directory = common.trial_dir(setup.experiment_path)
    previous = common.diverged_message(directory)
    if previous is not None:
        raise DivergedError(f"{previous} (diverged in an earlier attempt; not retried)")

    budget = experiment.budget
    if budget is not None and peft > budget and not config.get("budget_exempt"):
        worst = common.worst_score(mode)
        common.report(
            {
                **columns,
                "over_budget": True,
                "epoch": 0,
                f"dev_{metric}": worst,
                f"best_dev_{metric}": worst,
                "best_epoch": 0,
                "budget": budget,
            }
        )
        return

    common.set_threads(experiment.resources.cpu)
    device = common.trial_device(experiment.resources.gpu, experiment.resources.gpu_wait_s)
    torch.manual_seed(train.seed)
    workers = max(0, int(experiment.resources.cpu) - 1)  # audio decoding off the training thread
    data = common.load_data(experiment, setup.data, seed=train.seed, num_workers=workers)
    model = build_model(experiment.backbone, placement, head).to(device)
    cache = common.frozen_cache(experiment, setup.data, model)
    optimizer = setup_optimizer(model, train)
    steps = train.epochs * data.steps_per_epoch(train.max_steps_per_epoch)
    scheduler = setup_scheduler(optimizer, steps, train.warmup_ratio)

    state = CheckpointState()
    best_weights = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            state, best_weights = common.read_checkpoint(path, model, optimizer=optimizer, scheduler=scheduler)
        if state.finished:  # restored after the final report: report it again, train nothing
            common.report(state.metrics)
            return
    start_epoch = state.epoch + 1
    data.train_sampler.set_epoch(state.epoch)
    metadata = {"kind": columns["kind"], "method": columns["method"], "metric": metric, "vocab": setup.data.vocab}

    def on_epoch(result: EpochResult) -> None:
        nonlocal best_weights
        score = result.dev.score
        if is_better(score, state.best_score, mode):
            state.best_score, state.best_epoch = score, result.epoch
            best_weights = common.trainable_state(model)
        state.epoch = result.epoch
        metrics = {
            **columns,
            **result.metrics(),
            f"best_dev_{metric}": state.best_score,
            "best_epoch": state.best_epoch,
            "over_budget": False,
            "start_epoch": start_epoch,
        }
        predictions = None
        if result.epoch == train.epochs:
            current = common.trainable_state(model)
            predictions = common.final_evaluation(
                model, best_weights, {"dev": data.dev, "test": data.test}, train, device, cache=cache
            )
            common.load_trainable_state(model, current)
            metrics.update(predictions["test"].metrics("test"))
            state.finished = True
        state.metrics = metrics

        def write(path):
            common.write_checkpoint(
                path,
                model,
                state,
                optimizer=optimizer,
                scheduler=scheduler,
                best_weights=best_weights,
                predictions=predictions,
                metadata={**metadata, "epoch": result.epoch},
            )

        common.report(metrics, write)
        if config.get("_sleep_after_epoch"):
            time.sleep(float(config["_sleep_after_epoch"]))
        fail_at = config.get("_fail_once_at_epoch")
        if fail_at is not None and int(fail_at) == result.epoch and directory is not None:
            if common.read_marker(str(directory), "FAILED_ONCE") is None:
                common.write_marker(str(directory), "FAILED_ONCE", json.dumps({"epoch": result.epoch}))
                raise RuntimeError(f"_fail_once_at_epoch: injected failure after epoch {result.epoch}")

    hooks = Hooks()
    nan_at = config.get("_nan_at_epoch")
    if nan_at is not None:

        def poison(step: int, epoch: int) -> None:
            if epoch == int(nan_at) and step == 0:
                with torch.no_grad():
                    for param in model.head.parameters():
                        param.fill_(float("nan"))

        hooks.before_step = poison

    if start_epoch > train.epochs:
        return
    try:
        fit(
            model,
            data.train,
            data.dev,
            train,
            optimizer=optimizer,
            scheduler=scheduler,
            start_epoch=start_epoch,
            hooks=hooks,
            on_epoch=on_epoch,
            device=device,
            cache=cache,
        )
    except DivergedError as err:
        common.mark_diverged(directory, str(err))
        raise
