"""The hybrid (several methods merged inside a layer): the study's mix and its parameter
count, ``search.hybrid: auto`` matched to a budget, the hybrid as a per-layer candidate of a
placement, of the discrete search space and of the DARTS supernet, and validation."""
from __future__ import annotations

import optuna
import pytest
import torch
from helpers import audio_batch, perturb

from pefttune.backbones import BackboneInfo, backbone_info
from pefttune.config import load_config, parse_config
from pefttune.darts import Relaxation, build_supernet, derive_placement, inherit_weights
from pefttune.heads import HeadConfig
from pefttune.methods import hybrid as hybrid_spec
from pefttune.model import build_model
from pefttune.placement import MethodChoice, Placement
from pefttune.search.space import fixed_points, layer_param, validate_space

optuna.logging.set_verbosity(optuna.logging.WARNING)

BASE = BackboneInfo(name="base", family="hubert", num_layers=12, hidden_size=768, intermediate_size=3072, num_heads=12)
MIX = {"sequential": {"bottleneck": 10}, "parallel": {"bottleneck": 10}, "lora": {"rank": 2}}
# the study's mix at hidden 768: two bottleneck adapters (b=10) and LoRA r=2 on q and v
SEQUENTIAL_10 = 2 * 768 * 10 + 10 + 768
LORA_2 = 2 * (2 * 768 * 2)
MIX_768 = 2 * SEQUENTIAL_10 + LORA_2
HEAD = HeadConfig("classification", 3)


def config(**overrides):
    return parse_config({"backbone": "tiny-hubert", **overrides})


def hybrid_placement(cfg, info) -> Placement:
    (point,) = [p for p in fixed_points(cfg) if p.kind == "hybrid"]
    return validate_space(cfg, info).fixed_placement(point)


# -- the study's mix -----------------------------------------------------------------------


def test_study_mix_parameter_count_at_768():
    assert MIX_768 == 38_420  # below one sequential adapter at b=32 (49,952)
    assert hybrid_spec.STUDY_MIX == MIX
    assert MethodChoice("hybrid", hybrid_spec.resolve_members(MIX, "x")).count(BASE) == MIX_768
    placement = Placement.from_dict({"num_layers": 12, "layers": [[{"method": "hybrid", **MIX}]] * 12})
    assert placement.layer_methods() == ["sequential+parallel+lora"] * 12
    assert placement.trainable_parameters(BASE) == 12 * MIX_768
    # search.hybrid: true is exactly that mix, whatever the candidate methods
    fixed = hybrid_placement(config(search={"hybrid": True}), BASE)
    assert fixed == placement and fixed.trainable_parameters(BASE) == 12 * MIX_768
    # a mapping is taken as given; `candidates` is the former all-candidates merge
    custom = hybrid_placement(config(search={"hybrid": {"lora": {"rank": 4}, "bitfit": {}}}), BASE)
    assert custom.layer_methods() == ["lora+bitfit"] * 12 and custom.layers[0][0].hparams["rank"] == 4
    merged = hybrid_placement(config(methods={"lora": {"rank": [4, 8]}, "bitfit": {}},
                                     search={"hybrid": "candidates"}), BASE)
    assert merged.layer_methods() == ["lora+bitfit"] * 12 and merged.layers[0][0].hparams["rank"] == 4
    assert not [p for p in fixed_points(config(search={"hybrid": False})) if p.kind == "hybrid"]


# -- auto: matched to the budget --------------------------------------------------------------


@pytest.mark.parametrize("info", [BASE, backbone_info("tiny-hubert"), backbone_info("tiny-hubert-ssl")],
                         ids=["768", "tiny-hubert", "tiny-hubert-ssl"])
def test_auto_never_exceeds_the_budget_and_lands_within_one_step(info):
    ones = {"sequential": {"bottleneck": 1}, "parallel": {"bottleneck": 1}, "lora": {"rank": 1}}
    smallest = info.num_layers * hybrid_spec.count(info, hybrid_spec.resolve_members(ones, "x"))
    seen = set()
    for budget in (smallest, smallest + 1, 3 * smallest + 17, 10 * smallest, 12 * MIX_768 + 5, 1_200_000, 40_000):
        if budget < smallest:
            continue
        placement = hybrid_placement(config(budget=budget, search={"hybrid": "auto"}), info)
        members = {c.method: c.hparams for c in placement.layers[0]}
        assert list(members) == ["sequential", "parallel", "lora"]
        assert all(layer == placement.layers[0] for layer in placement.layers)  # the same mix in every layer
        total = placement.trainable_parameters(info)
        assert total <= budget
        steps = hybrid_spec.size_steps(info, members, info.num_layers)
        assert budget - total < min(steps.values()), (budget, total, steps)  # within one step
        for name, step in steps.items():  # and maximal: one more unit of any member goes over
            size = hybrid_spec.SIZE_HPARAMS[name]
            bigger = {**members, name: {**members[name], size: members[name][size] + 1}}
            assert info.num_layers * hybrid_spec.count(info, bigger) > budget
        seen.add(tuple(m[hybrid_spec.SIZE_HPARAMS[n]] for n, m in members.items()))
    assert len(seen) >= 4  # the sizes really follow the budget


def test_auto_keeps_the_study_proportions_and_matches_the_uniform_mean_without_budget():
    members = hybrid_spec.auto_members(BASE, 12 * MIX_768)
    assert {n: m[hybrid_spec.SIZE_HPARAMS[n]] for n, m in members.items()} == {
        "sequential": 10, "parallel": 10, "lora": 2}  # the study's own budget gives the study's mix
    doubled = hybrid_spec.auto_members(BASE, 2 * 12 * MIX_768)
    assert {n: m[hybrid_spec.SIZE_HPARAMS[n]] for n, m in doubled.items()} == {
        "sequential": 20, "parallel": 20, "lora": 4}
    # no budget: the mean PEFT parameters of the uniform baselines
    cfg = config(methods={"sequential": {"bottleneck": 32}, "lora": {"rank": 8}, "bitfit": {}},
                 search={"hybrid": "auto"})
    space = validate_space(cfg, BASE)
    uniform = [space.fixed_placement(p).trainable_parameters(BASE) for p in fixed_points(cfg) if p.kind == "uniform"]
    assert len(uniform) == 3 and space.hybrid_target() == sum(uniform) // 3
    total = space.hybrid().trainable_parameters(BASE)
    assert 0 <= space.hybrid_target() - total < min(hybrid_spec.size_steps(BASE, space.hybrid_members(), 12).values())


def test_shipped_configs_train_a_budget_matched_hybrid_and_every_uniform_baseline_without_exemption():
    embedded = load_config()
    assert embedded.search.hybrid == "auto" and not embedded.search.budget_exempt_fixed
    info = backbone_info(embedded.backbone)
    space = validate_space(embedded, info)
    counts = {p.label: space.fixed_placement(p).trainable_parameters(info) for p in fixed_points(embedded)}
    assert set(counts) == {"uniform:sequential", "uniform:parallel", "uniform:lora", "uniform:bitfit", "hybrid"}
    assert all(c <= embedded.budget for c in counts.values()), counts
    assert embedded.budget - counts["hybrid"] < min(hybrid_spec.size_steps(info, space.hybrid_members(), 4).values())
    superb = load_config(load_config.__globals__["CONFIG_DIR"] / "superb-ks-hubert-base.yaml")
    assert superb.search.hybrid == "auto" and not superb.search.budget_exempt_fixed
    space = validate_space(superb, BASE)  # HuBERT base's shape, without fetching its config
    counts = {p.label: space.fixed_placement(p).trainable_parameters(BASE) for p in fixed_points(superb)}
    assert all(c <= superb.budget for c in counts.values()), counts
    assert superb.budget - counts["hybrid"] < min(hybrid_spec.size_steps(BASE, space.hybrid_members(), 12).values())


# -- the hybrid as a per-layer candidate ---------------------------------------------------------


def test_hybrid_layer_in_a_placement_holds_its_members_and_runs():
    info = backbone_info("tiny-hubert")
    layers = ["lora", [{"method": "hybrid", **MIX}], "none", {"method": "hybrid", "hparams": MIX}]
    placement = Placement.from_dict({"num_layers": 4, "layers": layers})
    assert placement.layer_methods() == ["lora", "sequential+parallel+lora", "none", "sequential+parallel+lora"]
    mix = hybrid_spec.count(info, hybrid_spec.resolve_members(MIX, "x"))
    assert placement.trainable_parameters(info) == Placement.uniform("lora", 4).layers[0][0].count(info) + 2 * mix
    assert Placement.from_dict(placement.to_dict()) == placement  # stored as plain methods
    torch.manual_seed(0)
    model = build_model("tiny-hubert", placement, HEAD)
    assert [[type(m).__name__ for m in layer] for layer in model.methods][1] == [
        type(m).__name__ for m in model.methods[3]] and len(model.methods[1]) == 3
    assert sum(p.numel() for layer in model.methods for m in layer for p in m.trainable_parameters()) == \
        placement.trainable_parameters(info)
    x, mask = audio_batch(0)
    logits, _ = model(x, mask)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_search_space_samples_the_hybrid_candidate():
    info = backbone_info("tiny-hubert")
    cfg = config(methods={"lora": {"rank": 4}, "bitfit": {}, "hybrid": MIX},
                 search={"algorithm": "random", "uniform_baselines": True, "hybrid": False})
    # the hybrid candidate is a per-layer option, not a uniform baseline
    assert [p.label for p in fixed_points(cfg)] == ["uniform:lora", "uniform:bitfit"]
    space = validate_space(cfg, info)
    assert space.layer_options() == ["none", "lora", "bitfit", "hybrid"]
    mix = hybrid_spec.count(info, hybrid_spec.resolve_members(MIX, "x"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    chosen = 0
    for _ in range(12):
        trial = study.ask()
        out = space(trial)
        placement = Placement.from_json(out["placement"])
        expected = 0
        for i, layer in enumerate(placement.layers):
            option = trial.params[layer_param(i)]
            if option == "hybrid":
                chosen += 1
                assert [(c.method, c.hparams.get("bottleneck", c.hparams.get("rank"))) for c in layer] == [
                    ("sequential", 10), ("parallel", 10), ("lora", 2)]
                expected += mix
            else:
                assert [c.method for c in layer] == ([] if option == "none" else [option])
                expected += sum(c.count(info) for c in layer)
        assert out["peft_params"] == placement.trainable_parameters(info) == expected
        study.tell(trial, 0.0)
    assert chosen > 0


def _tiny_supernet(mix, candidates):
    torch.manual_seed(1)
    net = build_supernet("tiny-hubert", candidates, HEAD, mix=mix, relaxation=Relaxation("softmax", temperature=1e-3))
    perturb(net.model, seed=1, std=0.05)
    return net


def _one_hot_vs_discrete(net, picks, x, mask):
    """The supernet with a one-hot alpha on ``picks`` and the discrete model of the placement
    derived from it (supernet weights inherited): (derived placement, mixed output, discrete output)."""
    net.model.eval()
    with torch.no_grad():
        net.alpha.zero_()
        net.alpha[range(len(picks)), picks] = 1.0
        hidden0, frames = net.model.embed(x, mask)
        mixed = net.model.forward_from([hidden0], frames, layer_fn=net.layer_fn)
    derived = derive_placement(net)
    discrete = inherit_weights(net, derived)
    discrete.eval()
    with torch.no_grad():
        reference, _ = discrete(x, mask)
    return derived, mixed, reference


@pytest.mark.parametrize("mix", ["gated", "exact"])
def test_darts_supernet_offers_the_hybrid_as_one_candidate(mix):
    info = backbone_info("tiny-hubert")
    net = _tiny_supernet(mix, {"bitfit": {}, "prefix": {"length": 2}, "hybrid": MIX})
    assert net.names == ["none", "bitfit", "prefix", "hybrid"]
    mix_count = hybrid_spec.count(info, hybrid_spec.resolve_members(MIX, "x"))
    assert net.candidate_parameters()[3].item() == mix_count
    assert net.model.placement.layer_methods() == ["bitfit+prefix+sequential+parallel+lora"] * 4
    x, mask = audio_batch(0)
    picks = [3, 0, 1, 3]
    derived, mixed, reference = _one_hot_vs_discrete(net, picks, x, mask)
    assert derived.layer_methods() == ["sequential+parallel+lora", "none", "bitfit", "sequential+parallel+lora"]
    assert torch.equal(net.one_hot(derived), torch.eye(4)[picks])
    torch.testing.assert_close(mixed, reference, rtol=0, atol=1e-6)  # the hybrid's members switched as one
    # soft weights: the forward runs and alpha gets a gradient for the hybrid column too
    net.relaxation = Relaxation("softmax")
    net.model.train()
    hidden0, frames = net.model.embed(x, mask)
    out = net.model.forward_from([hidden0], frames, layer_fn=net.layer_fn)
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 2])).backward()
    assert net.alpha.grad is not None and bool((net.alpha.grad[:, 3] != 0).all())
    assert all(m.active and m.gate is None for layer in net.model.methods for m in layer)


@pytest.mark.parametrize("mix", ["gated", "exact"])
def test_darts_supernet_holds_a_hybrid_next_to_its_members_own_candidates(mix):
    """The study's candidate set plus its mix: LoRA, both adapters and BitFit each alone and
    merged in the hybrid. A supernet layer holds two LoRAs (nested on q/v), two sequential and
    two parallel adapters, two bias deltas; a one-hot alpha on any candidate computes exactly
    the discrete model of the derived placement with the inherited weights."""
    mix_bitfit = {**MIX, "bitfit": {}}
    candidates = {"bitfit": {}, "lora": {"rank": 4}, "sequential": {"bottleneck": 8}, "parallel": {"bottleneck": 6},
                  "hybrid": mix_bitfit}
    net = _tiny_supernet(mix, candidates)
    assert net.names == ["none", "bitfit", "lora", "sequential", "parallel", "hybrid"]
    layer = net.model.encoder.layers[0]
    assert list(layer.pefttune) == ["bitfit", "lora", "sequential", "parallel",
                                    "sequential@hybrid", "parallel@hybrid", "lora@hybrid", "bitfit@hybrid"]
    q_proj = layer.attention.q_proj
    assert q_proj.lora_A["default"].weight.shape[0] == 2 and q_proj.base_layer.lora_A["default"].weight.shape[0] == 4
    info = backbone_info("tiny-hubert")
    counts = [int(c) for c in net.candidate_parameters().tolist()]
    assert counts[5] == hybrid_spec.count(info, hybrid_spec.resolve_members(mix_bitfit, "x"))
    expected = sum(counts[1:]) * info.num_layers
    assert net.model.count_parameters()["peft"] == expected  # every candidate's modules, the hybrid's included
    x, mask = audio_batch(0)
    for picks in ([5, 2, 0, 5], [2, 3, 4, 1]):
        derived, mixed, reference = _one_hot_vs_discrete(net, picks, x, mask)
        assert torch.equal(net.one_hot(derived), torch.eye(6)[picks])
        torch.testing.assert_close(mixed, reference, rtol=0, atol=1e-5)
    # soft weights: every module gets a gradient, both LoRAs of a projection included, and alpha too
    net.relaxation = Relaxation("softmax")
    net.model.train()
    hidden0, frames = net.model.embed(x, mask)
    out = net.model.forward_from([hidden0], frames, layer_fn=net.layer_fn)
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 2])).backward()
    assert net.alpha.grad is not None and bool((net.alpha.grad[:, 1:] != 0).all())
    for methods in net.model.methods:
        for method in methods:
            assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in method.trainable_parameters())
    assert all(not p.requires_grad for n, p in net.model.encoder.model.named_parameters()
               if not any(tag in n for tag in ("lora_", "pefttune")))


def test_darts_refuses_a_prefix_in_two_candidates_and_accepts_overlapping_projections():
    from pefttune.darts.run import validate

    with pytest.raises(ValueError, match=r"'prefix' is in two candidates \(prefix\(p=2\) and hybrid\[prefix"):
        build_supernet("tiny-hubert", {"prefix": {"length": 2}, "hybrid": {"prefix": {}, "lora": {}}}, HEAD)
    with pytest.raises(ValueError, match="'prefix' is in two candidates"):
        validate(config(methods={"hybrid": {"prefix": {}, "bitfit": {}}, "prefix": {"length": 4}}))
    # LoRA in the hybrid and IA3 on the same projection: nested wrappers, both trained
    validate(config(methods={"hybrid": MIX, "ia3": {}, "lora": {"rank": 4}, "sequential": {}}))
    net = build_supernet("tiny-hubert", {"ia3": {}, "hybrid": MIX}, HEAD)
    v_proj = net.model.encoder.layers[1].attention.v_proj
    assert hasattr(v_proj, "lora_A") and hasattr(v_proj.base_layer, "ia3_l")


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, message", [
    ({"lora": {"rank": 0}, "sequential": {}}, "search.hybrid: lora.rank: must be >= 1"),
    ({"lora": {"rank": 2}}, "search.hybrid: a hybrid merges at least two methods"),
    ({"lora": {}, "adaptr": {}}, "search.hybrid: adaptr: unknown PEFT method 'adaptr'"),
    ({"lora": {"rank": [2, 4]}, "bitfit": {}}, "search.hybrid: lora.rank: a hybrid member takes one value"),
    ({"lora": {"rnk": 2}, "bitfit": {}}, r"search.hybrid: lora: unknown hyper-parameter\(s\) \['rnk'\]"),
    ({"none": {}, "bitfit": {}}, "search.hybrid: none: cannot be a member of a hybrid"),
    ("automatic", "search.hybrid: expected true, false, auto, candidates or a mapping"),
])
def test_search_hybrid_errors_name_the_field(value, message):
    with pytest.raises(ValueError, match=message):
        config(search={"hybrid": value})


def test_hybrid_candidate_and_auto_errors_name_the_field():
    with pytest.raises(ValueError, match="methods: hybrid.sequential.bottleneck: a hybrid member takes one value"):
        config(methods={"hybrid": {"sequential": {"bottleneck": [8, 16]}, "lora": {}}})
    with pytest.raises(ValueError, match="methods: hybrid.lora.rank: must be >= 1"):
        config(methods={"hybrid": {"sequential": {}, "lora": {"rank": 0}}})
    with pytest.raises(ValueError, match="search.hybrid: auto: the smallest hybrid .* more than the target 1000"):
        validate_space(config(budget=1000, search={"hybrid": "auto"}), backbone_info("tiny-hubert"))
    with pytest.raises(ValueError, match=r"placement.layers\[0\].hybrid: a hybrid merges at least two methods"):
        Placement.from_dict({"num_layers": 1, "layers": ["hybrid"]})
