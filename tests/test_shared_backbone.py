"""Ensembles on one frozen backbone: shared weights, the frozen part run once, the members' own outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pefttune.backbones import load_backbone
from pefttune.heads import HeadConfig
from pefttune.model import build_model, load_model_dir
from pefttune.placement import Placement
from pefttune.predictor import EnsemblePredictor, Predictor, combine_probabilities, combine_transcripts, load_model
from pefttune.shared_backbone import SharedBackboneEnsemble, share_encoder, shares_weights

#: Uniform placements (every layer adapted: only the front end is shared) ...
UNIFORM = [Placement.uniform(m, 4) for m in ("lora", "bitfit", "sequential", "ia3")]
#: ... and placements in the upper layers only (layers 0-1 shared too).
UPPER = [Placement.from_dict({"num_layers": 4, "layers": layers}) for layers in (
    {"2": "lora", "3": "lora"}, {"3": "prefix"}, {"2": ["parallel", "bitfit"]})]


def _members(trunk, placements, head: HeadConfig, seed: int = 0):
    torch.manual_seed(seed)
    members = []
    for placement in placements:
        model = build_model(share_encoder(trunk), placement, head).eval()
        for layer in model.methods:
            for method in layer:
                method.perturb_(0.2)
        with torch.no_grad():
            for param in model.head.parameters():
                param.add_(torch.randn_like(param) * 0.5)
        members.append(model)
    return members


def _waves(count: int = 7, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(3000, 12000, size=count)]


def _storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct tensor storages a module holds."""
    seen = {}
    for tensor in (*module.parameters(), *module.buffers()):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("placements, start", [(UNIFORM, 0), (UPPER, 2)])
def test_members_on_one_backbone_compute_what_they_compute_alone(placements, start):
    trunk = load_backbone("tiny-hubert")
    members = _members(trunk, placements, HeadConfig("classification", 3))
    ensemble = SharedBackboneEnsemble(trunk, members).eval()
    assert ensemble.start == start
    assert not any(hasattr(layer, "pefttune") for layer in trunk.layers)  # the trunk stays plain
    assert all(shares_weights(trunk, m.encoder) for m in members)
    # one backbone's weights: the ensemble holds the trunk plus only PEFT and head weights
    extra = sum(sum(p.numel() for p in m.trainable_named_parameters().values()) * 4 for m in members)
    assert _storage_bytes(ensemble) <= _storage_bytes(trunk) + extra
    values = torch.randn(3, 9000)
    mask = torch.ones(3, 9000, dtype=torch.long)
    mask[1, 6000:] = 0
    outputs, frames = ensemble(values, mask)
    for member, output in zip(members, outputs):
        alone = load_model_dir_like(member)  # the same weights on a backbone of its own
        with torch.no_grad():
            expected, expected_frames = alone(values, mask)
        assert torch.equal(frames, expected_frames)
        assert torch.allclose(output, expected, atol=1e-6), float((output - expected).abs().max())


def load_model_dir_like(member):
    """``member``'s placement and weights on a freshly loaded backbone (a separate model)."""
    alone = build_model(load_backbone(member.encoder.name), member.placement, member.head_config).eval()
    alone.load_state_dict(member.state_dict())
    assert not shares_weights(alone.encoder, member.encoder)
    return alone


def test_the_frozen_part_runs_once_per_batch():
    trunk = load_backbone("tiny-hubert")
    members = _members(trunk, UPPER, HeadConfig("classification", 3))
    ensemble = SharedBackboneEnsemble(trunk, members)
    calls = {"front": 0, "layers": [0] * 4}
    trunk.model.feature_extractor.register_forward_hook(lambda *a: calls.__setitem__("front", calls["front"] + 1))
    for view in [trunk] + [m.encoder for m in members]:
        for index, layer in enumerate(view.layers):
            layer.register_forward_hook(lambda *a, i=index: calls["layers"].__setitem__(i, calls["layers"][i] + 1))
    ensemble(torch.randn(2, 8000))
    assert calls == {"front": 1, "layers": [1, 1, 3, 3]}  # layers 0-1 once, layers 2-3 once per member


def test_views_refuse_adapted_encoders_and_strangers():
    trunk = load_backbone("tiny-hubert")
    adapted = build_model(trunk, UNIFORM[0], HeadConfig("classification", 2))
    with pytest.raises(ValueError, match="already holds a placement"):
        share_encoder(adapted.encoder)
    plain = load_backbone("tiny-hubert")
    stranger = build_model(load_backbone("tiny-hubert"), UNIFORM[1], HeadConfig("classification", 2))
    with pytest.raises(ValueError, match=r"members \[0\] do not share"):
        SharedBackboneEnsemble(plain, [stranger])


def _write_ensemble(root, members, vocab: dict, strategy: str, weights=None):
    """An export-model ensemble directory (the documented layout) for ``members``."""
    entries = []
    for i, member in enumerate(members):
        member.save(root / "members" / f"m{i}")
        entries.append({"dir": f"members/m{i}", "trial_id": f"m{i}"})
    (root / "backbone.json").write_text(json.dumps({"reference": members[0].encoder.name}))
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "preprocessing.json").write_text(json.dumps({"sample_rate": 16000, "normalize": True}))
    (root / "ensemble.json").write_text(json.dumps({"strategy": strategy, "members": entries, "weights": weights}))
    return root


@pytest.mark.parametrize("task, strategy", [("classification", "vote"), ("classification", "weighted"),
                                            ("classification", "soft"), ("ctc", "frame_vote"),
                                            ("ctc", "posterior_avg"), ("ctc", "rover")])
def test_exported_ensemble_predicts_what_separate_members_predict(tmp_path, task, strategy):
    trunk = load_backbone("tiny-hubert")
    head = HeadConfig("classification", 3) if task == "classification" else HeadConfig("ctc", 5)
    members = _members(trunk, UNIFORM[:2] + UPPER[:1], head, seed=1)
    if task == "classification":
        vocab = {"kind": "labels", "labels": ["yes", "no", "up"]}
    else:
        vocab = {"kind": "tokens", "tokens": ["a", "b", "c", "d"], "unit": "phoneme"}
    weights = [0.9, 0.5, 0.7] if strategy == "weighted" else None
    directory = _write_ensemble(tmp_path, members, vocab, strategy, weights)
    predictor = load_model(directory)
    assert isinstance(predictor, EnsemblePredictor)
    assert all(shares_weights(predictor.ensemble.trunk, m.encoder) for m in predictor.ensemble.members)
    waves = _waves()
    predictions = predictor.predict(waves)
    # the oracle: every member as a separate model with a backbone of its own, combined the same way
    separate = [Predictor(load_model_dir(directory / "members" / f"m{i}"), predictor.vocab)
                for i in range(len(members))]
    outputs = [p.outputs(waves) for p in separate]
    shared_outputs = predictor.outputs(waves)
    for ours, theirs in zip(shared_outputs, outputs):
        for a, b in zip(ours, theirs):
            assert a.shape == b.shape and np.allclose(a, b, atol=1e-6)
    if task == "classification":
        probs = np.stack([np.stack(o) for o in outputs])
        expected = combine_probabilities(probs, strategy, weights)
        assert [p.label for p in predictions] == [predictor.vocab.decode(int(i)) for i in expected]
        for p, mean in zip(predictions, probs.mean(0)):
            assert np.allclose([p.probabilities[label] for label in vocab["labels"]], mean, atol=1e-6)
    else:
        from pefttune.predictor import decode_tokens

        expected = combine_transcripts(outputs, strategy)
        assert [p.transcript for p in predictions] == [decode_tokens(predictor.vocab, ids) for ids in expected]
