"""The tune-lr stage: the learning-rate protocol (:mod:`pefttune.tuning`) for the fixed configurations
known before the search: the uniform baselines, the hybrid and the references ``frozen`` and ``log-mel``.

One grid experiment ``<storage>/<name>/tune-lr``: each configuration's first-seed trial at every
rate of ``train.lr_grid``, stopped at the rung; ``tune-lr/lr_choices.json`` holds the chosen
rates, which the search's fixed points (:func:`pefttune.search.run.run_search`), the replicates
and the further seeds' rounds train at.

Example::

    from pefttune.search.tune_lr import run_tune_lr
    choices = run_tune_lr(config)              # Ray connected; resume=True finishes a killed one
    choices.lr("uniform:lora", config.train.lr)
"""
from __future__ import annotations

from pefttune.config import StudyConfig
from pefttune.runtime.study_dir import study_dir
from pefttune.search.replicates import fixed_configurations
from pefttune.trainables.setup import Faults, make_setup
from pefttune.tuning import TUNE_DIR, LrChoices, LrProtocol, tune_rates


def tune_lr_path(config: StudyConfig) -> str:
    return f"{study_dir(config)}/{TUNE_DIR}"


def run_tune_lr(config: StudyConfig, resume: bool = False, *, verbose: int = 1,
                faults: Faults | None = None) -> LrChoices:
    """Choose the rate of every fixed configuration of ``config`` (Ray connected); no choices
    without ``train.lr_grid``."""
    from pefttune.trainables.discrete import train_fn
    from pefttune.trainables.trial import make_trainable

    if LrProtocol.of(config) is None:
        return LrChoices()
    path = tune_lr_path(config)
    candidates = [r.trial_config() for r in fixed_configurations(config)]
    setup = make_setup(config, path, faults)
    return tune_rates(config, path, candidates, make_trainable(train_fn, setup), resume=resume, verbose=verbose,
                      title="tune-lr")
