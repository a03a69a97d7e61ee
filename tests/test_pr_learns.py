"""Phoneme recognition learns: the shipped encoder, uniform LoRA and SUPERB's
linear CTC head get past the blank-only phase on a tiny synthesized PR corpus within a
small step budget, through the same data, cache and training loop as a trial."""
from __future__ import annotations

import pytest
import torch

from pefttune.config import parse_config
from pefttune.data.loaders import load_data, prepare_data
from pefttune.model import build_model
from pefttune.placement import Placement
from pefttune.trainables.setup import TrialSetup, frozen_cache, train_config
from pefttune.training import evaluate, fit

pytestmark = pytest.mark.slow


def test_a_short_pr_run_gets_well_below_per_one():
    torch.manual_seed(0)
    config = parse_config({
        "backbone": "tiny-hubert-ssl",
        "data": {"source": "synth", "task": "pr", "sentences": 60, "batch_size": 4},
        "train": {"epochs": 25, "lr": 0.01, "warmup_ratio": 0.1},
    })
    ref = prepare_data(config, progress=False)
    data = load_data(config, ref, seed=0)
    model = build_model(config.backbone, Placement.uniform("lora", 4), TrialSetup(config, ref).head)
    cache = frozen_cache(config, ref, model)
    settings = train_config(config)
    before = evaluate(model, data.train, settings, cache=cache)
    history = fit(model, data.train, data.dev, settings, cache=cache)
    after = evaluate(model, data.train, settings, cache=cache)
    lengths = after.arrays["hyp_len"]
    assert before.score >= 0.95  # blanks (or noise) at the start
    assert after.score < 0.6, [round(r.dev.score, 3) for r in history]  # the training sentences are learned
    assert float(lengths.mean()) > 0.5 * float(after.arrays["ref_len"].mean())  # no longer blank-only
    assert history[-1].dev.score < 0.9  # and it carries to unseen speakers and sentences
