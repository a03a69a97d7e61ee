"""DARTS core: mixed layers, relaxations, bi-level steps, derivation (tiny backbones, CPU)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import BACKBONES, audio_batch, perturb
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from pefttune.darts import (
    NONE,
    Relaxation,
    budgeted_choices,
    build_supernet,
    candidate_choices,
    derive_placement,
    entropy,
    inherit_weights,
    make_architect,
    search_architecture,
    task_loss,
)
from pefttune.heads import HeadConfig
from pefttune.model import build_model
from pefttune.placement import Placement
from pefttune.training import TrainConfig, fit

# ia3 is left out: it wraps v_proj like LoRA, and one projection holds one wrapper
CANDIDATES = {"sequential": {"bottleneck": 8}, "parallel": {"bottleneck": 8}, "lora": {"rank": 4}, "bitfit": {},
              "prefix": {"length": 2}}
NAMES = ["none", *CANDIDATES]
HEAD = HeadConfig("classification", 3)


def supernet(backbone="tiny-hubert", mix="gated", relaxation=None, candidates=CANDIDATES, seed=1, std=0.05):
    torch.manual_seed(seed)  # method inits (LoRA A, adapter down-projections) and the head
    net = build_supernet(backbone, candidates, HEAD, mix=mix, relaxation=relaxation)
    perturb(net.model, seed=seed, std=std)  # off the zero init, so every path carries gradient
    return net


def placement_of(net, picks) -> Placement:
    layers = [[] if k == NONE else [net.candidates[k].to_dict()] for k in picks]
    return Placement.from_dict({"num_layers": len(picks), "layers": layers})


def head_output(model, x, mask, layer_fn=None):
    hidden0, frames = model.embed(x, mask)
    return model.forward_from([hidden0], frames, layer_fn=layer_fn)


# -- candidates --------------------------------------------------------------------------------


def test_candidates_none_first_one_choice_per_method():
    choices = candidate_choices({"lora": {"rank": [4, 8]}, "sequential": {"bottleneck": 16}, "bitfit": {}})
    assert [c.method for c in choices] == ["none", "lora", "sequential", "bitfit"]
    assert choices[1].hparams["rank"] == 4  # first listed value
    assert choices[2].hparams["bottleneck"] == 16
    with pytest.raises(ValueError, match="at least one candidate"):
        candidate_choices({"none": {}})
    # LoRA and IA3 both adapt v_proj: nested wrappers, each its own candidate
    net = build_supernet("tiny-hubert", {"lora": {}, "ia3": {}}, HEAD)
    v_proj = net.model.encoder.layers[0].attention.v_proj
    assert hasattr(v_proj, "ia3_l") and hasattr(v_proj.base_layer, "lora_A")


# -- mixed layers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mix", ["gated", "exact"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_one_hot_alpha_is_the_discrete_model_and_gradients_reach_everything(backbone, mix):
    x, mask = audio_batch(0)
    # softmax at a tiny temperature turns a one-hot alpha into exactly one-hot weights
    # (exp(-1000) == 0): the real relaxation path, every candidate still run with weight 0
    net = supernet(backbone, mix, Relaxation("softmax", temperature=1e-3))
    net.model.eval()
    for picks in ([1, 2, 3, 0], [4, 5, 0, 3]):  # every candidate, none included, somewhere
        with torch.no_grad():
            net.alpha.zero_()
            net.alpha[range(4), picks] = 1.0
            assert all(torch.equal(net.layer_weights(i), torch.eye(6)[k]) for i, k in enumerate(picks))
            mixed = head_output(net.model, x, mask, net.layer_fn)
        placement = placement_of(net, picks)
        discrete = inherit_weights(net, placement)  # build_model + the same weights
        discrete.eval()
        with torch.no_grad():
            reference, _ = discrete(x, mask)
            # one-hot weights that skip the zero-weight candidates: bit for bit the discrete model
            with net.fixed_weights(net.one_hot(placement)):
                fixed = head_output(net.model, x, mask, net.layer_fn)
        torch.testing.assert_close(mixed, reference, rtol=0, atol=1e-6)
        assert torch.equal(fixed, reference)

    # Gumbel in evaluation is the argmax of alpha: exactly the same discrete model
    net.relaxation = Relaxation("gumbel", hard=True)
    with torch.no_grad():
        assert torch.equal(head_output(net.model, x, mask, net.layer_fn), reference)

    # soft weights: gradients reach every entry of alpha and every candidate's weights
    net.relaxation = Relaxation("softmax")
    net.model.train()
    with torch.no_grad():
        net.alpha.copy_(0.3 * torch.randn(4, 6, generator=torch.Generator().manual_seed(0)))
    out = head_output(net.model, x, mask, net.layer_fn)
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 2])).backward()
    assert net.alpha.grad is not None and bool((net.alpha.grad != 0).all()), net.alpha.grad
    for index, layer in enumerate(net.model.methods):
        for method in layer:
            for param in method.trainable_parameters():
                assert param.grad is not None and param.grad.abs().sum() > 0, (index, type(method).__name__)
    # the mix leaves the modules as it found them: every method active, gate 1
    assert all(m.active and m.gate is None for layer in net.model.methods for m in layer)


def test_the_derived_model_inherits_a_normed_heads_running_statistics():
    torch.manual_seed(2)
    net = build_supernet("tiny-hubert", {"lora": {"rank": 4}}, HeadConfig("classification", 3, norm="batch"))
    x, mask = audio_batch(0)
    net.model.train()
    with torch.no_grad():
        head_output(net.model, x * 20 + 3, mask, net.layer_fn)  # the statistics move off (0, 1)
    derived = inherit_weights(net, Placement.from_dict({"num_layers": 4, "layers": {"2": {"method": "lora", "rank": 4}}}))
    theirs = dict(net.model.head.named_buffers())
    assert not torch.equal(theirs["head.norm.running_var"], torch.ones_like(theirs["head.norm.running_var"]))
    for name, buffer in derived.head.named_buffers():
        assert torch.equal(buffer, theirs[name]), name


def test_gated_and_exact_agree_to_first_order_and_differ_beyond():
    """Both mixes are the frozen layer plus sum_k w_k (change by method k) to first order."""
    x, mask = audio_batch(0)
    identity_at_init = {k: v for k, v in CANDIDATES.items() if k != "prefix"}
    gaps = {}
    for std in (1e-3, 0.3):
        outputs = {}
        for mix in ("gated", "exact"):
            net = supernet("tiny-hubert", mix, candidates=identity_at_init, std=std)
            with torch.no_grad():
                net.alpha.copy_(torch.randn(4, 5, generator=torch.Generator().manual_seed(3)))
                outputs[mix] = head_output(net.model, x, mask, net.layer_fn)
        frozen = inherit_weights(net, Placement.from_dict({"layers": [[]] * 4}))  # same head
        with torch.no_grad():
            outputs["frozen"] = head_output(frozen, x, mask)
        change = (outputs["exact"] - outputs["frozen"]).abs().max()
        gaps[std] = ((outputs["gated"] - outputs["exact"]).abs().max() / change).item()
    assert gaps[1e-3] < 0.02, gaps  # second order in the methods' changes
    assert gaps[0.3] > 5 * gaps[1e-3], gaps


# -- relaxations -------------------------------------------------------------------------------------


def test_relaxation_weights_and_probabilities():
    alpha = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]], requires_grad=True)
    soft = Relaxation("softmax", temperature=2.0)
    torch.testing.assert_close(soft.weights(alpha[0], True), torch.softmax(alpha[0] / 2, -1))
    torch.testing.assert_close(soft.probabilities(alpha), torch.softmax(alpha / 2, -1))
    assert torch.allclose(entropy(torch.full((1, 5), 0.2)), torch.tensor([math.log(5)]))

    gumbel = Relaxation("gumbel", temperature=10.0, final_temperature=0.1, hard=True)
    assert [round(gumbel.set_epoch(e, 5), 6) for e in range(1, 6)] == [10.0, 3.162278, 1.0, 0.316228, 0.1]
    sample = gumbel.weights(alpha[0], training=True)
    assert sorted(sample.tolist()) == [0.0, 0.0, 1.0]  # one-hot in the forward pass ...
    (sample * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert bool((alpha.grad[0] != 0).all())  # ... soft gradients (straight-through)
    assert torch.equal(gumbel.weights(alpha[1], training=False), torch.tensor([1.0, 0.0, 0.0]))
    torch.manual_seed(0)
    counts = torch.stack([Relaxation("gumbel", hard=True).weights(alpha[0].detach(), True) for _ in range(3000)]).mean(0)
    assert torch.allclose(counts, torch.softmax(alpha[0].detach(), -1), atol=0.03)  # samples ~ softmax(alpha)

    fair = Relaxation("fair")
    w = fair.weights(alpha[0], True)
    assert w[NONE] == 0 and torch.allclose(w[1:], torch.sigmoid(alpha[0, 1:]))
    p = fair.probabilities(alpha.detach())
    sig = torch.sigmoid(alpha.detach())
    assert torch.allclose(p[:, NONE], (1 - sig[:, 1:]).prod(-1)) and torch.allclose(p[:, 1:], sig[:, 1:])
    at_half = fair.regularizer(torch.zeros(2, 3))
    assert at_half == 0 and fair.regularizer(alpha) < at_half  # zero-one loss: lower away from 1/2
    with pytest.raises(ValueError, match="gumbel"):
        Relaxation("softmax", hard=True)


@pytest.mark.parametrize("mix", ["gated", "exact"])
def test_fair_mix_adds_independent_method_deltas(mix):
    x, mask = audio_batch(0)
    net = supernet("tiny-hubert", mix, Relaxation("fair"), candidates={"lora": {"rank": 4}, "bitfit": {}}, std=0.3)
    net.model.eval()
    with torch.no_grad():
        net.alpha.copy_(torch.tensor([[5.0, -30.0, -30.0], [0.0, 30.0, -30.0], [0.0, -30.0, 30.0], [-5.0, 30.0, 30.0]]))
        mixed = head_output(net.model, x, mask, net.layer_fn)
    # sigmoid(+-30) is 1 / ~1e-13: layer 0 frozen (the none logit plays no part), 1 lora,
    # 2 bitfit, 3 both (the additive mix of two full deltas vs the hybrid layer: close, not equal)
    hybrid = [{"method": "lora", "rank": 4}, {"method": "bitfit"}]
    discrete = inherit_weights(net, Placement.from_dict({"layers": [[], hybrid[:1], hybrid[1:], hybrid]}))
    discrete.eval()
    with torch.no_grad():
        reference, _ = discrete(x, mask)
    assert (mixed - reference).abs().max() < (0.05 if mix == "exact" else 1e-5)


# -- bi-level optimisation ------------------------------------------------------------------------------


def tone_batches(seed: int, n_batches: int = 4, size: int = 4) -> list[dict]:
    """Tones whose octave band (200-400, 400-800, ... Hz) is the label."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(8000) / 16000
    batches = []
    for b in range(n_batches):
        label = torch.randint(0, 4, (size,), generator=gen)
        freq = 200 * 2.0 ** (label + torch.rand(size, generator=gen))
        amp = 0.2 + 0.5 * torch.rand(size, 1, generator=gen)
        x = amp * torch.sin(2 * torch.pi * freq[:, None] * t) + 0.05 * torch.randn(size, 8000, generator=gen)
        batches.append({"input_values": x, "labels": label, "index": torch.arange(b * size, (b + 1) * size)})
    return batches


def lora_only_helps(mix: str, seed: int = 0, relaxation=None):
    """A supernet (none, lora, bitfit) whose LoRA + head were trained on the tone task and
    whose BitFit is untrained (zero: the same as none): only LoRA can help."""
    torch.manual_seed(seed)
    train = tone_batches(seed)
    head = HeadConfig("classification", 4)
    trained = build_model("tiny-hubert", Placement.uniform("lora", 4, rank=4), head)
    fit(trained, train, train[:1], TrainConfig(epochs=6, lr=1e-2, warmup_ratio=0.0))
    net = build_supernet("tiny-hubert", {"lora": {"rank": 4}, "bitfit": {}}, head, mix=mix, relaxation=relaxation)
    own = net.model.trainable_named_parameters()
    with torch.no_grad():
        for name, param in trained.trainable_named_parameters().items():
            own[name].copy_(param)
    return net, train


@pytest.mark.parametrize("order,mix", [("first", "gated"), ("first", "exact"), ("second", "gated"), ("second", "exact")])
def test_arch_steps_move_alpha_toward_the_candidate_that_helps(order, mix):
    net, train = lora_only_helps(mix)
    optimizer, _, recording, architect = make_architect(
        net, train, train, TrainConfig(epochs=1, lr=1e-3), order=order, lr=0.05, weight_decay=0.0
    )
    weights_before = {n: p.detach().clone() for n, p in net.model.trainable_named_parameters().items()}
    before = net.probabilities()
    for i in range(4):
        recording.current = train[i]  # the batch the next weight step would train on
        architect.step(train[(i + 1) % 4], train[i] if order == "second" else None)
    after = net.probabilities()
    change = (after - before).mean(0)
    assert change[1] > 0.05 and change[0] < 0 and change[2] < 0, change
    assert after.argmax(-1).tolist() == [1, 1, 1, 1]
    # the arch step never changes the weights (the unrolled step restores them)
    for name, param in net.model.trainable_named_parameters().items():
        assert torch.equal(param, weights_before[name]), name
    assert all(p is not net.alpha for g in optimizer.param_groups for p in g["params"])


@pytest.mark.parametrize("mix", ["gated", "exact"])
def test_second_order_step_is_the_unrolled_gradient(mix):
    """The finite-difference step equals d/dalpha L_arch(w - xi grad_w L_weight(w, alpha), alpha)."""
    net = supernet("tiny-hubert", mix, candidates={"lora": {"rank": 2}, "sequential": {"bottleneck": 4}}, std=0.2)
    net.model.double()
    with torch.no_grad():
        net.alpha.data = 0.5 * torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    weight_batch = {"input_values": 0.5 * torch.randn(2, 8000, generator=gen).double(), "labels": torch.tensor([0, 2])}
    arch_batch = {"input_values": 0.5 * torch.randn(2, 8000, generator=gen).double(), "labels": torch.tensor([1, 2])}
    optimizer, _, _, architect = make_architect(
        net, [weight_batch], [arch_batch], TrainConfig(epochs=1, lr=0.05, head_lr=0.02), order="second"
    )
    _, finite_difference = architect._unrolled(arch_batch, weight_batch)

    xi = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    weights = net.model.trainable_named_parameters()

    class Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = net.model

        def forward(self, batch):
            return task_loss(net, batch)

    loss = Loss()
    params = {f"model.{n}": p for n, p in weights.items()}
    with sdpa_kernel(SDPBackend.MATH):  # double backward through attention
        grads = torch.autograd.grad(functional_call(loss, params, (weight_batch,)), list(params.values()), create_graph=True)
        unrolled = {n: p - xi[id(p)] * g for (n, p), g in zip(params.items(), grads)}
        (exact,) = torch.autograd.grad(functional_call(loss, unrolled, (arch_batch,)), [net.alpha])
        (first,) = torch.autograd.grad(task_loss(net, arch_batch), [net.alpha])
    relative = ((finite_difference - exact).norm() / exact.norm()).item()
    assert relative < 1e-3, relative
    assert ((first - exact).norm() / exact.norm()).item() > 10 * relative  # the second-order term matters here


def test_budget_penalty_lowers_expected_parameters_and_derivation_respects_budget():
    net = supernet("tiny-hubert", "gated", candidates={"lora": {"rank": 4}, "bitfit": {}, "sequential": {"bottleneck": 8}})
    counts = net.candidate_parameters()
    info = net.model.encoder.info
    assert counts.tolist() == [0.0] + [float(c.count(info)) for c in net.candidates[1:]]
    expected = net.expected_parameters()
    assert torch.isclose(expected, (torch.softmax(net.alpha, -1) * counts).sum())
    budget = int(counts[1:].min())  # one cheapest method in one layer
    x, mask = audio_batch(0)
    batch = {"input_values": x, "attention_mask": mask, "labels": torch.tensor([0, 1])}
    _, _, _, architect = make_architect(
        net, [batch], [batch], TrainConfig(epochs=1), lr=0.1, weight_decay=0.0, budget=budget, budget_penalty=10.0
    )
    for _ in range(8):
        architect.step(batch)
    assert architect.last["penalty"] > 0
    assert net.expected_parameters() < 0.7 * expected
    assert net.probabilities()[:, NONE].min() > 1 / 4  # none grew in every layer

    # derivation: argmax when it fits, else the most probable placement within the budget
    with torch.no_grad():
        net.alpha.copy_(torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 4))
    assert derive_placement(net).layer_methods() == ["lora"] * 4
    derived = derive_placement(net, budget=2 * int(counts[1]))
    assert derived.trainable_parameters(info) <= 2 * counts[1]
    assert derive_placement(net, budget=0).layer_methods() == ["none"] * 4


def test_budgeted_choices_is_the_exact_optimum():
    gen = torch.Generator().manual_seed(0)
    counts = [0, 7, 3, 5]
    for _ in range(20):
        probs = torch.softmax(torch.randn(4, 4, generator=gen), -1)
        budget = int(torch.randint(0, 25, (1,), generator=gen))
        picks = budgeted_choices(probs, counts, budget)
        best = max(
            (p for p in itertools.product(range(4), repeat=4) if sum(counts[k] for k in p) <= budget),
            key=lambda p: sum(math.log(probs[i, k]) for i, k in enumerate(p)),
        )
        assert sum(counts[k] for k in picks) <= budget
        score = sum(math.log(probs[i, k]) for i, k in enumerate(picks))
        assert score == pytest.approx(sum(math.log(probs[i, k]) for i, k in enumerate(best)))


# -- a whole search through the training loop ----------------------------------------------------------


@pytest.mark.parametrize(
    "relaxation,mix,order",
    [
        (Relaxation("softmax"), "gated", "first"),
        (Relaxation("gumbel", temperature=10.0, final_temperature=0.1, hard=True), "exact", "first"),
        (Relaxation("gumbel", temperature=5.0, final_temperature=0.5), "gated", "second"),
        (Relaxation("fair"), "exact", "first"),
    ],
    ids=["softmax-gated", "gdas-exact", "gumbel-soft-second", "fair-exact"],
)
def test_search_warms_up_then_updates_alpha_and_reports(relaxation, mix, order):
    net, train = lora_only_helps(mix, relaxation=relaxation)
    weight_half, arch_half = train[:2], train[2:]
    alphas = []
    results, architect = search_architecture(
        net, weight_half, arch_half, train[:1], TrainConfig(epochs=3, lr=3e-3),
        order=order, arch_lr=0.05, warmup_epochs=1, on_epoch=lambda r: alphas.append(net.alpha.detach().clone()),
    )
    assert torch.equal(alphas[0], torch.zeros(4, 3))  # warm-up epoch: weights only
    assert not torch.equal(alphas[1], alphas[0]) and not torch.equal(alphas[2], alphas[1])
    metrics = [r.metrics() for r in results]
    assert len(metrics) == 3
    assert metrics[0]["arch_steps"] == 0 and metrics[1]["arch_steps"] == 2 and metrics[2]["arch_steps"] == 4
    assert "arch_loss" not in metrics[0] and metrics[2]["arch_loss"] > 0
    for layer in range(4):
        for name in ("none", "lora", "bitfit"):
            assert 0 <= metrics[2][f"alpha/L{layer:02d}/{name}"] <= 1
        assert 0 <= metrics[2][f"entropy/L{layer:02d}"] <= math.log(3) + 1e-6
    assert 0 <= metrics[2]["none_share"] <= 1
    if relaxation.kind != "fair":
        assert metrics[0]["entropy_mean"] == pytest.approx(math.log(3)) and metrics[0]["none_share"] == pytest.approx(1 / 3)
    assert metrics[2]["alpha/L00/lora"] != metrics[0]["alpha/L00/lora"]
    if relaxation.kind == "gumbel":
        assert metrics[0]["temperature"] == relaxation.start_temperature
        assert metrics[2]["temperature"] == pytest.approx(relaxation.final_temperature)
    placement = derive_placement(net)
    assert placement.num_layers == 4 and set(placement.layer_methods()) <= {"none", "lora", "bitfit"}
