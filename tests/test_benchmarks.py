"""The benchmark scripts still run (tiny shapes, one epoch): their numbers are for benchmarks/README.md."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import darts_cost  # noqa: E402
import encoder_cost  # noqa: E402
import ensemble_inference  # noqa: E402
import throughput  # noqa: E402
import verdict_stability  # noqa: E402, F401

from pefttune.placement import Placement  # noqa: E402


def test_darts_cost_prints_every_loop_with_ratios(capsys):
    darts_cost.main(["--config", "tiny", "--steps", "2", "--batch", "2", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    rows = {line.split()[0] + (" " + line.split()[1] if line.startswith("uniform") else ""): line
            for line in out.splitlines() if line and not line.startswith(("#", "loop"))}
    assert set(rows) == {"uniform sequential", "uniform parallel", "uniform lora", "uniform bitfit", "gated", "exact"}
    # every loop timed, as ratios to the uniform mean and to LoRA (which is faster is the benchmark's
    # to say, on a quiet machine: benchmarks/README.md; two epochs of tiny shapes decide nothing)
    for name, line in rows.items():
        seconds, to_uniform, to_lora = line.split()[len(name.split()):][:3]
        assert float(seconds) > 0 and float(to_uniform.rstrip("x")) > 0 and float(to_lora.rstrip("x")) > 0


def test_throughput_loops_share_one_loss_trajectory_and_interleave():
    """Every loop starts from the same LoRA weights, so all give the reference's losses;
    each loop's epochs are timed once per round."""
    args = argparse.Namespace(config="tiny", family="hubert", steps=2, repeats=2, batch=2, seconds=0.5,
                              threads=1, device="cpu", bf16=False)
    layers = [2, 3]
    placement = Placement.from_dict({"num_layers": 4, "layers": {str(i): "lora" for i in layers}})
    import torch

    torch.manual_seed(0)
    model = throughput.HFLoop("hubert", throughput.CONFIGS["tiny"], layers, False, "cpu").model
    lora = {k: v.detach().clone() for k, v in throughput.lora_weights(model).items()}
    results = throughput.measure(args, placement, layers, lora)
    assert set(results) == set(throughput.LOOPS)
    reference = results["hf-careful"].losses
    assert len(reference) == 4  # 2 rounds x 2 steps (after one untimed step)
    for name, result in results.items():
        assert len(result.seconds) == 2 and all(s > 0 for s in result.seconds)
        assert result.peak_mb >= 0
        assert result.losses == pytest.approx(reference, abs=1e-5), name
        assert (result.cache_mb > 0) == (name == "pefttune")
    median, low, high = throughput.ratio(results, "pefttune", "hf-default")
    assert low <= median <= high and median > 0


def test_throughput_worker_error_names_the_loop():
    args = argparse.Namespace(config="tiny", family="hubert", steps=1, repeats=1, batch=2, seconds=0.5,
                              threads=1, device="cpu", bf16=False)
    placement = Placement.from_dict({"num_layers": 4, "layers": {"3": "lora"}})
    with pytest.raises(RuntimeError, match="throughput loop 'hf-default' failed"):
        throughput.measure(args, placement, [3], {})  # no LoRA weights to copy: KeyError in every worker


def test_verdict_stability_configs_use_disjoint_seeds_and_the_table_flags_flips(tmp_path):
    import verdict_stability

    from pefttune.config import load_config

    base = load_config()
    configs = [verdict_stability.study_config(base, s, tmp_path, 3, smoke=False) for s in (0, 1, 2)]
    seeds = [c.train.replicate_seeds for c in configs]
    assert seeds == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert [c.darts_seeds for c in configs] == seeds and [c.train.seed for c in configs] == [0, 3, 6]  # per seed
    assert len({c.name for c in configs}) == 3 and all(c.data == base.data for c in configs)  # same data
    summaries = {
        0: {"train_seeds": [0, 1, 2], "findings": {"1": {"verdict": "inconclusive"}, "2": {"verdict": "reproduced"},
                                                   "3": {"verdict": "reproduced"}}},
        1: {"train_seeds": [3, 4, 5], "findings": {"1": {"verdict": "inconclusive"}, "2": {"verdict": "inconclusive"},
                                                   "3": {"verdict": "reproduced"}}},
    }
    text = verdict_stability.table(summaries)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "finding" not in line}
    assert rows["1"].rstrip().endswith("| yes |") and rows["2"].rstrip().endswith("| NO |")
    assert "all findings stable: no" in text


def test_reference_probes_fit_a_converged_probe_and_pool_the_heads_features(tmp_path):
    """The probe chooses C on dev and separates separable classes; the pooled features are what the head
    sees (one state for log-mel, h_0..h_L for an encoder), in manifest order."""
    pytest.importorskip("sklearn")
    import numpy as np

    import reference_probes
    from pefttune.backbones import LOG_MEL
    from pefttune.config import parse_config
    from test_search_fixtures import search_config, write_tone_manifest

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 5)) * 4
    def split(n):
        y = np.arange(n) % 3
        return centres[y] + rng.normal(size=(n, 5)), y
    result = reference_probes.probe(*split(60), *split(30), *split(30))
    assert result["dev"] >= 0.9 and result["test"] >= 0.9 and result["C"] in reference_probes.C_GRID

    manifest = write_tone_manifest(tmp_path / "tones", classes=2, per_split={"train": 3, "dev": 2, "test": 2})
    config = parse_config(search_config(manifest, tmp_path / "results"))
    mel = reference_probes.pooled_features(config, LOG_MEL)
    assert mel["train"]["mean"].shape == (6, 1, 40) and mel["train"]["std"].shape == (6, 40)
    assert list(mel["dev"]["labels"]) == [0, 0, 1, 1]  # manifest order
    ssl = reference_probes.pooled_features(config, "tiny-hubert", splits=("dev",))
    assert ssl["dev"]["mean"].shape[:2] == (4, 5)  # h_0 .. h_4 of the 4-layer tiny backbone


def test_ensemble_inference_variants_agree_and_only_separate_models_hold_several_backbones(tmp_path):
    from pefttune.backbones import load_backbone

    directory = ensemble_inference.write_ensemble(tmp_path / "ensemble", "tiny-hubert", ("lora", "bitfit", "ia3"))
    clips = ensemble_inference.make_clips(3)
    results = ensemble_inference.measure(directory, clips, rounds=2, threads=1)
    assert set(results) == set(ensemble_inference.VARIANTS)
    for name, result in results.items():
        assert len(result.seconds) == len(result.cpu_seconds) == 2 and all(s > 0 for s in result.seconds), name
        assert result.peak_mb >= 0
    assert [len(results[n].outputs) for n in ("shared", "separate", "one")] == [3, 3, 1]
    difference, same = ensemble_inference.agreement(results)
    assert difference < 1e-6 and same  # the shared backbone predicts what separate models predict
    assert np.allclose(results["one"].outputs[0], results["separate"].outputs[0], atol=1e-6)
    backbone = ensemble_inference.weights_mb([load_backbone("tiny-hubert")])
    assert results["separate"].weights_mb > 2.9 * backbone  # three backbones
    assert results["shared"].weights_mb < 1.2 * backbone and results["one"].weights_mb < 1.2 * backbone
    text = ensemble_inference.report(results, len(clips), 3)
    assert "| shared |" in text and "labels identical" in text
    front, layers = ensemble_inference.front_end_share("tiny-hubert", repeats=1)
    assert front > 0 and layers > 0
    assert ensemble_inference.bound(front, layers, 4) == pytest.approx((front + 4 * layers) / (4 * (front + layers)))
    assert ensemble_inference.bound(1.0, 0.0, 4) == 0.25 and ensemble_inference.bound(0.0, 1.0, 4) == 1.0


def test_encoder_cost_prints_each_round_and_the_median(capsys):
    median = encoder_cost.main(["--batch", "1", "--seconds", "0.2", "--rounds", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["round 0", "round 1"]
    assert lines[-1].startswith("base-size / tiny-hubert-ssl forward per clip: median") and median > 1  # 12 x 768 vs 4 x 128


def test_head_convergence_trains_the_head_in_each_variant():
    import head_convergence

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 6)) * 3

    def split(n):
        labels = np.arange(n) % 3
        states = centres[labels][:, None, :] + rng.normal(size=(n, 2, 6))  # two hidden states per clip
        return {"mean": states * np.array([1.0, 50.0])[None, :, None], "labels": labels}  # badly scaled 2nd state

    features = {"train": split(90), "dev": split(30), "test": split(30)}
    for variant in head_convergence.VARIANTS:
        result = head_convergence.fit_head(features, lr=0.05, epochs=15, variant=variant, batch=16)
        assert result["dev"] >= 0.9 and result["test"] >= 0.8 and 1 <= result["epoch"] <= 15, variant
    ruled = head_convergence.fit_head(features, lr=0.05, epochs=15, variant="plain", batch=16, rung=3)
    early = head_convergence.fit_head(features, lr=0.05, epochs=15, variant="plain", batch=16, rung=15)
    assert ruled["rung_dev"] <= ruled["dev"] and early["rung_dev"] == early["dev"]  # the best of the first epochs
    with pytest.raises(ValueError, match="variant"):
        head_convergence.fit_head(features, lr=0.05, epochs=1, variant="layernorm")
