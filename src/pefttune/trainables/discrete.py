"""The Ray Tune function trainable of one discrete placement: ``train_fn``.

``tune.with_parameters(train_fn, setup=TrialSetup(...))`` (see
:func:`make_trainable`); the trial config holds:

- ``placement``: the placement (JSON string or mapping, :meth:`Placement.to_dict` form);
- ``backbone`` (optional): overrides ``experiment.backbone`` for this trial (the ``log-mel``
  reference: ``{"backbone": "log-mel", "placement": {"num_layers": 0, "layers": []}}``);
- ``kind``: ``uniform`` / ``discrete`` / ``hybrid`` / ``darts-derived``; ``method``
  (uniform baselines); ``lr`` (default ``train.lr``); ``budget_exempt`` (train even over
  ``config.budget``); ``head_lr`` (default ``train.head_lr``: the references' chosen rate,
  whose head is all they train); ``epochs`` (default ``train.epochs``; the references':
  ``train.reference_epochs``); ``stop_epoch`` (a rung of the learning-rate protocol,
  :mod:`pefttune.tuning`: end after this epoch's report, on the schedule of ``epochs``, with
  no final evaluation: the trial is stopped early by design); ``continues`` (a rung's
  checkpoint: where the trial starts when it has none of its own, the chosen rate's first seed
  going on from its rung);
- tests inject failures, NaNs and delays through ``setup.faults``
  (:class:`~pefttune.trainables.setup.Faults`), never through the trial config.

Per epoch it reports (``tune.report``) the dev metric and loss, ``best_dev_<metric>``,
``trainable_params`` (PEFT + head), ``peft_params``, ``samples_per_s``, ``epoch``, the
placement columns (``placement`` JSON, ``placement_short``, ``layer_00``...), ``kind``,
``method``, ``over_budget`` and ``node_id`` (the Ray node of this attempt), with a
checkpoint of the PEFT + head weights, the optimizer/scheduler state and the epoch (a restored
trial resumes from its newest complete checkpoint: :func:`~pefttune.trainables.checkpoint.restore`). The last epoch first scores the best-dev
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

import torch

from pefttune.backbones import backbone_info
from pefttune.data.loaders import load_data
from pefttune.metrics import worst_score
from pefttune.model import build_model
from pefttune.runtime import storage
from pefttune.runtime.cluster import set_threads, trial_device
from pefttune.runtime.study_dir import config_id, parse_placement, placement_columns
from pefttune.schema import CONTINUES, STOP_EPOCH, TrialKind, metric_key
from pefttune.trainables import checkpoint as ckpt
from pefttune.trainables.checkpoint import CheckpointState
from pefttune.trainables.setup import TrialSetup, frozen_cache, head_parameters, train_config
from pefttune.training import (
    DivergedError, EpochResult, Hooks, fit, is_better, setup_optimizer, setup_scheduler, skip_cached_audio,
)


def make_trainable(setup: TrialSetup):
    """``train_fn`` bound to ``setup``, with the per-trial resources of the experiment."""
    from ray import tune

    resources = setup.experiment.resources
    trainable = tune.with_parameters(train_fn, setup=setup)
    return tune.with_resources(trainable, {"cpu": resources.cpu, "gpu": resources.gpu})


def _trial_value(config: dict, key: str, default=None):
    value = config.get(key, default)
    return default if value is None else value


def trial_backbone(config: dict, experiment) -> str:
    """The trial's backbone: the trial config's ``backbone`` (reference trials), else the experiment's."""
    return str(_trial_value(config, "backbone", experiment.backbone))


def train_fn(config: dict, setup: TrialSetup) -> None:
    """Train, evaluate and checkpoint one placement (a Ray Tune function trainable)."""
    import ray

    experiment = setup.experiment
    if "placement" not in config:
        raise ValueError("trial config: missing 'placement'")
    placement = parse_placement(config["placement"])
    backbone = trial_backbone(config, experiment)
    info = backbone_info(backbone)
    placement.validate_for(info)
    lr = float(_trial_value(config, "lr", experiment.train.lr))
    seed = int(_trial_value(config, "seed", experiment.train.seed))
    train = train_config(experiment, lr=lr, seed=seed, epochs=_trial_value(config, "epochs", None),
                         head_lr=_trial_value(config, "head_lr", None))
    rung = config.get(STOP_EPOCH) is not None  # a rung of the learning-rate protocol: never scores test
    stop = int(config[STOP_EPOCH]) if rung else train.epochs
    metric, mode = train.metric, train.mode
    head = setup.head
    peft = placement.trainable_parameters(info)
    head_params = head_parameters(info, head)
    kind = _trial_value(config, "kind", TrialKind.DISCRETE.value)
    columns = {
        **placement_columns(placement),
        "kind": kind,
        "method": _trial_value(config, "method", ""),
        "seed": seed,
        "config_id": _trial_value(config, "config_id", None) or config_id(kind, config.get("method"), placement),
        "lr": lr,
        "peft_params": peft,
        "head_params": head_params,
        "trainable_params": peft + head_params,
        "node_id": ray.get_runtime_context().get_node_id(),  # where this attempt runs (clusters)
    }
    directory = storage.trial_dir(setup.ray_dir)
    previous = storage.diverged_message(directory)
    if previous is not None:
        raise DivergedError(f"{previous} (diverged in an earlier attempt; not retried)")

    budget = experiment.budget
    if budget is not None and peft > budget and not config.get("budget_exempt"):
        worst = worst_score(mode)
        ckpt.report(
            {
                **columns,
                "over_budget": True,
                "epoch": 0,
                metric_key("dev", metric): worst,
                metric_key("dev", metric, best=True): worst,
                "best_epoch": 0,
                "budget": budget,
            }
        )
        return

    set_threads(experiment.resources.cpu)
    device = trial_device(experiment.resources.gpu, experiment.resources.gpu_wait_s)
    torch.manual_seed(train.seed)
    workers = max(0, int(experiment.resources.cpu) - 1)  # audio decoding off the training thread
    data = load_data(experiment, setup.data, seed=train.seed, num_workers=workers)
    model = build_model(backbone, placement, head).to(device)
    cache = frozen_cache(experiment, setup.data, model)
    skip_cached_audio(cache, model, data.train, data.dev, data.test)
    optimizer = setup_optimizer(model, train)
    steps = train.epochs * data.steps_per_epoch(train.max_steps_per_epoch)
    scheduler = setup_scheduler(optimizer, steps, train.warmup_ratio)

    state = CheckpointState()
    best_weights = None
    # never an incomplete checkpoint; a first run of a chosen rate continues its rung (CONTINUES)
    restored = ckpt.restore(model, optimizer=optimizer, scheduler=scheduler, start_from=config.get(CONTINUES))
    if restored is not None:
        state, best_weights = restored
        if state.finished:  # restored after the final report: report it again, train nothing
            ckpt.report(state.metrics)
            return
    start_epoch = state.epoch + 1
    data.train_sampler.set_epoch(state.epoch)
    metadata = {"kind": columns["kind"], "method": columns["method"], "metric": metric, "vocab": setup.data.vocab}

    def on_epoch(result: EpochResult) -> None:
        nonlocal best_weights
        score = result.dev.score
        if is_better(score, state.best_score, mode):
            state.best_score, state.best_epoch = score, result.epoch
            best_weights = ckpt.trainable_state(model)
        state.epoch = result.epoch
        metrics = {
            **columns,
            **result.metrics(),
            metric_key("dev", metric, best=True): state.best_score,
            "best_epoch": state.best_epoch,
            "over_budget": False,
            "start_epoch": start_epoch,
        }
        predictions = None
        if result.epoch == train.epochs and not rung:
            current = ckpt.trainable_state(model)
            predictions = ckpt.final_evaluation(
                model, best_weights, {"dev": data.dev, "test": data.test}, train, device, cache=cache
            )
            ckpt.load_trainable_state(model, current)
            metrics.update(predictions["test"].metrics("test"))
            state.finished = True
        state.metrics = metrics

        def write(path):
            ckpt.write_checkpoint(
                path,
                model,
                state,
                optimizer=optimizer,
                scheduler=scheduler,
                best_weights=best_weights,
                predictions=predictions,
                metadata={**metadata, "epoch": result.epoch},
            )

        ckpt.report(metrics, write)
        setup.after_epoch(config, result.epoch, directory)

    hooks = Hooks(before_step=setup.before_step(config, model))

    if start_epoch > stop:
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
            end_epoch=stop,
            hooks=hooks,
            on_epoch=on_epoch,
            device=device,
            cache=cache,
        )
    except DivergedError as err:
        storage.mark_diverged(directory, str(err))
        raise
