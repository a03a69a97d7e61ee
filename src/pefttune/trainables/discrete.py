"""The Ray Tune function trainable of one discrete placement: ``train_fn``.

``make_trainable(train_fn, setup)`` (:func:`pefttune.trainables.trial.make_trainable`); the
steps of a trial are :class:`pefttune.trainables.trial.Trial`'s, this module writes those of a
placement (:class:`PlacementTrial`). The trial config holds:

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

Per epoch it reports (a :class:`~pefttune.schema.TrialReport`) the dev metric and loss,
``best_dev_<metric>``, ``trainable_params`` (PEFT + head), ``peft_params``, ``samples_per_s``, ``epoch``, the
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

import ray

from pefttune.backbones import backbone_info
from pefttune.data.loaders import load_data
from pefttune.metrics import worst_score
from pefttune.model import build_model
from pefttune.runtime.study_dir import config_id, parse_placement, placement_columns
from pefttune.schema import CONTINUES, STOP_EPOCH, TrialKind, TrialReport, metric_key
from pefttune.trainables import checkpoint as ckpt
from pefttune.trainables.setup import TrialSetup, frozen_cache, head_parameters, train_config
from pefttune.trainables.trial import Parts, Trial
from pefttune.training import Hooks, setup_optimizer, setup_scheduler, skip_cached_audio


def _trial_value(config: dict, key: str, default=None):
    value = config.get(key, default)
    return default if value is None else value


def trial_backbone(config: dict, experiment) -> str:
    """The trial's backbone: the trial config's ``backbone`` (reference trials), else the experiment's."""
    return str(_trial_value(config, "backbone", experiment.backbone))


class PlacementTrial(Trial):
    """A trial of one discrete placement: its budget check, its final scoring on dev and test
    with the best-dev weights, and the per-example predictions in the final checkpoint."""

    keep_best_weights = True

    def plan(self) -> None:
        config, experiment = self.config, self.experiment
        if "placement" not in config:
            raise ValueError("trial config: missing 'placement'")
        placement = parse_placement(config["placement"])
        self.backbone = trial_backbone(config, experiment)
        info = backbone_info(self.backbone)
        placement.validate_for(info)
        lr = float(_trial_value(config, "lr", experiment.train.lr))
        self.seed = int(_trial_value(config, "seed", experiment.train.seed))
        self.train = train_config(experiment, lr=lr, seed=self.seed, epochs=_trial_value(config, "epochs", None),
                                  head_lr=_trial_value(config, "head_lr", None))
        if config.get(STOP_EPOCH) is not None:  # a rung of the learning-rate protocol: never scores test
            self.stop_epoch, self.rung = int(config[STOP_EPOCH]), True
        self.start_from = config.get(CONTINUES)  # a chosen rate's first seed goes on from its rung
        self.placement = placement
        self.peft = placement.trainable_parameters(info)
        head_params = head_parameters(info, self.setup.head)
        kind = _trial_value(config, "kind", TrialKind.DISCRETE.value)
        self.columns = {
            **placement_columns(placement),
            "kind": kind,
            "method": _trial_value(config, "method", ""),
            "seed": self.seed,
            "config_id": _trial_value(config, "config_id", None) or config_id(kind, config.get("method"), placement),
            "lr": lr,
            "peft_params": self.peft,
            "head_params": head_params,
            "trainable_params": self.peft + head_params,
            "node_id": ray.get_runtime_context().get_node_id(),  # where this attempt runs (clusters)
        }
        self.over_budget = False

    def reject(self) -> TrialReport | None:
        """Over ``config.budget`` (and not ``budget_exempt``): one report, the worst score, no checkpoint."""
        budget = self.experiment.budget
        if budget is None or self.peft <= budget or self.config.get("budget_exempt"):
            return None
        metric, worst = self.train.metric, worst_score(self.train.mode)
        return TrialReport(metric, self.columns, epoch=0, scores={metric_key("dev", metric): worst}, best_dev=worst,
                           best_epoch=0, over_budget=True, extra={"budget": budget})

    def build(self, device) -> Parts:
        experiment, setup, train = self.experiment, self.setup, self.train
        workers = max(0, int(experiment.resources.cpu) - 1)  # audio decoding off the training thread
        self.data = data = load_data(experiment, setup.data, seed=train.seed, num_workers=workers)
        model = build_model(self.backbone, self.placement, setup.head).to(device)
        cache = frozen_cache(experiment, setup.data, model)
        skip_cached_audio(cache, model, data.train, data.dev, data.test)
        optimizer = setup_optimizer(model, train)
        steps = train.epochs * data.steps_per_epoch(train.max_steps_per_epoch)
        scheduler = setup_scheduler(optimizer, steps, train.warmup_ratio)
        return Parts(model, data.train, data.dev, data.train_sampler, optimizer, scheduler, cache)

    def hooks(self, parts: Parts, state) -> Hooks:
        return Hooks(before_step=self.setup.before_step(self.config, parts.model))

    def final_scores(self, parts: Parts, best_weights):
        """The best-dev weights scored on dev and test (the current weights put back after)."""
        current = ckpt.trainable_state(parts.model)
        predictions = ckpt.final_evaluation(parts.model, best_weights, {"dev": self.data.dev, "test": self.data.test},
                                            self.train, self.device, cache=parts.cache)
        ckpt.load_trainable_state(parts.model, current)
        return predictions["test"].metrics("test"), predictions

    def metadata(self) -> dict:
        return {"kind": self.columns["kind"], "method": self.columns["method"], "metric": self.train.metric,
                "vocab": self.setup.data.vocab}


def train_fn(config: dict, setup: TrialSetup) -> None:
    """Train, evaluate and checkpoint one placement (a Ray Tune function trainable)."""
    PlacementTrial(config, setup).run()
