"""The PEFT method matrix: every tiny backbone family x every method case, run against
the same checks (trainable set, gradients, identity at init, counts, gates, padding),
plus a short CPU training per method."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import (
    BACKBONES,
    MATRIX,
    MATRIX_IDS,
    METHOD_CASES,
    SHORT,
    Case,
    audio_batch,
    fresh_encoder,
    frozen_states,
    make_model,
    max_diff_valid,
    methods_of,
    perturb,
    set_all,
    transformers_states,
)
from pefttune.methods import get_method, method_names

matrix = pytest.mark.parametrize(("backbone", "case"), MATRIX, ids=MATRIX_IDS)
adapted = pytest.mark.parametrize(
    ("backbone", "case"),
    [(b, c) for b, c in MATRIX if c.id != "none"],
    ids=[i for i, (_, c) in zip(MATRIX_IDS, MATRIX) if c.id != "none"],
)


def _peft_params(model) -> dict[int, torch.nn.Parameter]:
    return {id(p): p for method in methods_of(model) for p in method.trainable_parameters()}


def _states(model, seed: int = 0, grad: bool = False):
    x, mask = audio_batch(seed)
    with torch.set_grad_enabled(grad):
        return model.encoder(x, mask)


# -- trainable parameters ----------------------------------------------------------------------


@matrix
def test_only_peft_and_head_parameters_are_trainable(backbone, case):
    model = make_model(backbone, case)
    peft = _peft_params(model)
    head = {id(p): p for p in model.head.parameters()}
    trainable = {id(p): name for name, p in model.named_parameters() if p.requires_grad}

    assert set(trainable) == set(peft) | set(head), (
        sorted(n for i, n in trainable.items() if i not in peft and i not in head)
    )
    assert not set(peft) & set(head)
    # No duplicates in trainable_parameters() and every PEFT parameter is reachable from the model.
    listed = [p for m in methods_of(model) for p in m.trainable_parameters()]
    assert len(listed) == len(peft)
    if case.id == "none":
        assert not peft
    else:
        assert peft and all(p.requires_grad for p in peft.values())

    # Every parameter of the frozen backbone stays frozen, and none went missing or was added.
    frozen = [(n, p) for n, p in model.encoder.named_parameters() if id(p) not in peft]
    assert frozen and not any(p.requires_grad for _, p in frozen)
    bare = fresh_encoder(backbone)
    assert sum(p.numel() for _, p in frozen) == sum(p.numel() for p in bare.parameters())
    # The optimiser-facing view agrees.
    assert set(model.trainable_named_parameters()) == set(trainable.values())


@matrix
def test_counted_parameters_equal_formula(backbone, case):
    model = make_model(backbone, case)
    info = model.encoder.info
    counts = model.count_parameters()
    expected = case.placement().trainable_parameters(info)
    assert counts["peft"] == expected
    assert counts["peft"] == sum(p.numel() for p in _peft_params(model).values())
    assert counts["head"] == sum(p.numel() for p in model.head.parameters()) > 0
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # and per layer: each layer's modules hold exactly what its choices count
    for layer_methods, choices in zip(model.methods, case.placement().layers):
        assert len(layer_methods) == len(choices)
        for method, choice in zip(layer_methods, choices):
            assert sum(p.numel() for p in method.trainable_parameters()) == choice.count(info), choice


# -- gradients ---------------------------------------------------------------------------------------


@adapted
def test_every_peft_parameter_gets_a_gradient(backbone, case):
    """After perturb_ (zero-init up-projections block gradients at init), one backward
    pass reaches every PEFT parameter. Catches the WavLM trap: transformers' WavLM
    attention bypasses the q/k/v/out modules, so wrapped projections would get none."""
    model = make_model(backbone, case)
    perturb(model)
    model.train()
    x, mask = audio_batch()
    logits, frames = model(x, mask)
    loss = F.cross_entropy(logits, torch.tensor([0, 2]))
    # also a per-frame term so that every layer output matters directly
    states, _ = model.encoder(x, mask)
    loss = loss + sum((s[frames] ** 2).mean() for s in states[1:])
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: no gradient"
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"{name}: zero gradient"
        else:
            assert p.grad is None, f"{name}: frozen parameter got a gradient"


# -- outputs at init ------------------------------------------------------------------------------------


@matrix
def test_identity_at_init_matches_frozen_backbone_and_transformers(backbone, case):
    model = make_model(backbone, case)
    model.eval()
    states, frames = _states(model)
    frozen, frozen_frames = frozen_states(backbone)
    reference = transformers_states(backbone)
    assert torch.equal(frames, frozen_frames)
    assert frames.sum(1).tolist()[0] > frames.sum(1).tolist()[1] > 0  # the batch is padded
    assert len(states) == len(reference) == model.encoder.num_layers + 1
    if case.identity_at_init:
        assert max_diff_valid(states, list(frozen), frames) < 1e-5
        assert max_diff_valid(states, list(reference), frames) < 1e-5
    else:
        # Not the identity (prefix): claiming identity_at_init=False must be true, too.
        assert max_diff_valid(states, list(frozen), frames) > 1e-3


@adapted
def test_perturbed_methods_change_the_output(backbone, case):
    """The methods act: once off their init, every one changes every layer it sits in."""
    model = make_model(backbone, case)
    perturb(model)
    model.eval()
    states, frames = _states(model)
    frozen, _ = frozen_states(backbone)
    first = case.placement().lowest_adapted_layer()
    # below the first adapted layer nothing changes; from it on, the output moves
    assert max_diff_valid(states[: first + 1], list(frozen[: first + 1]), frames) < 1e-5
    assert max_diff_valid(states[first + 1 :], list(frozen[first + 1 :]), frames) > 1e-4


def test_every_registered_method_declares_identity_correctly():
    assert set(method_names()) == {
        "none", "houlsby", "sequential", "parallel", "lora", "bitfit", "prefix", "adapterbias", "ia3"
    }
    assert [m for m in method_names() if not get_method(m).identity_at_init] == ["prefix"]


# -- gates ---------------------------------------------------------------------------------------------


@adapted
def test_gate_zero_and_inactive_give_the_frozen_output(backbone, case):
    model = make_model(backbone, case)
    perturb(model)
    model.eval()
    frozen, _ = frozen_states(backbone)
    perturbed, frames = _states(model)
    assert max_diff_valid(perturbed, list(frozen), frames) > 1e-4

    set_all(model, gate=0.0)
    gated, _ = _states(model)
    assert max_diff_valid(gated, list(frozen), frames) < 1e-5

    set_all(model, gate=torch.tensor(1.0))
    assert max_diff_valid(_states(model)[0], perturbed, frames) < 1e-5

    set_all(model, gate=None, active=False)
    assert max_diff_valid(_states(model)[0], list(frozen), frames) < 1e-5

    set_all(model, active=True)
    assert max_diff_valid(_states(model)[0], perturbed, frames) < 1e-6


@pytest.mark.parametrize("case", [c for c in METHOD_CASES if c.id != "none"], ids=lambda c: c.id)
def test_gate_receives_gradient(case):
    """DARTS sets gate to a softmax weight: it must stay in the graph for every method."""
    model = make_model("tiny-wavlm", case)
    perturb(model)
    gates = []
    for method in methods_of(model):
        method.gate = torch.tensor(0.7, requires_grad=True)
        gates.append(method.gate)
    states, frames = _states(model, grad=True)
    sum((s[frames] ** 2).mean() for s in states).backward()
    for gate, method in zip(gates, methods_of(model)):
        assert gate.grad is not None and gate.grad.abs() > 0, type(method).__name__


# -- padding -------------------------------------------------------------------------------------------


@matrix
def test_padded_batch_invariance(backbone, case):
    """An utterance alone and padded (with garbage) in a batch: same states and logits on valid frames."""
    model = make_model(backbone, case)
    perturb(model)
    model.eval()
    x, mask = audio_batch(garbage_padding=True)
    with torch.no_grad():
        states, frames = model.encoder(x, mask)
        logits, _ = model(x, mask)
        alone, alone_frames = model.encoder(x[1:, :SHORT])
        alone_logits, _ = model(x[1:, :SHORT])
    n = int(alone_frames.sum())
    assert n == int(frames[1].sum()) and alone_frames.all()
    for layer, (a, b) in enumerate(zip(states, alone)):
        torch.testing.assert_close(a[1, :n], b[0], atol=1e-4, rtol=0, msg=lambda m: f"state {layer}: {m}")
    torch.testing.assert_close(logits[1:], alone_logits, atol=1e-4, rtol=0)


# -- train / eval modes ----------------------------------------------------------------------------------


def _dropout_encoder(family: str):
    """A tiny backbone whose own dropouts are all 0.5: they must never switch on."""
    from pefttune.backbones import SpeechEncoder, _MODEL_CLASSES, tiny_config

    config = tiny_config(family)
    for key in ("hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout"):
        setattr(config, key, 0.5)
    torch.manual_seed(0)
    return SpeechEncoder(_MODEL_CLASSES[family](config), name=f"dropout-{family}")


@pytest.mark.parametrize("backbone", BACKBONES)
def test_train_mode_keeps_frozen_model_in_eval(backbone):
    from pefttune.backbones import TINY_BACKBONES
    from pefttune.heads import HeadConfig
    from pefttune.model import build_model
    from pefttune.placement import Placement

    encoder = _dropout_encoder(TINY_BACKBONES[backbone])
    placement = Placement.uniform(["houlsby", "lora"], 4, lora={"dropout": 0.5})
    model = build_model(encoder, placement, HeadConfig("classification", 2))
    perturb(model)
    model.train()
    assert model.training and model.head.training and encoder.training

    peft_modules = {id(m) for method in methods_of(model) for m in method.modules()}
    wrappers = [m for m in encoder.model.modules() if hasattr(m, "lora_A")]
    assert len(wrappers) == 8
    for w in wrappers:
        peft_modules |= {id(m) for name, m in w.named_modules() if not name.startswith("base_layer")}
    dropouts_on = [n for n, m in encoder.model.named_modules() if id(m) not in peft_modules and m.training]
    assert not dropouts_on, dropouts_on[:5]
    assert all(m.training for m in methods_of(model))
    assert all(w.lora_dropout["default"].training for w in wrappers)

    # Behaviour: without LoRA dropout the model is deterministic in train mode...
    x, mask = audio_batch()
    for method in methods_of(model):
        method.active = type(method).__name__ != "LoRA"
    with torch.no_grad():
        a, _ = model.encoder(x, mask)
        b, _ = model.encoder(x, mask)
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    # ... and LoRA's own dropout (a PEFT module) does train.
    for method in methods_of(model):
        method.active = True
    with torch.no_grad():
        c, _ = model.encoder(x, mask)
        d, _ = model.encoder(x, mask)
    assert not torch.equal(c[-1], d[-1])

    model.eval()
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        e, _ = model.encoder(x, mask)
        f, _ = model.encoder(x, mask)
    assert torch.equal(e[-1], f[-1])


# -- smoke training ----------------------------------------------------------------------------------------


def _two_class_data(n_per_class: int = 2):
    """Two fixed random 'classes' of waveforms: low-frequency vs. high-frequency noise bursts."""
    gen = torch.Generator().manual_seed(7)
    t = torch.arange(4_000) / 16_000
    waves, labels = [], []
    for label, freq in ((0, 220.0), (1, 2_200.0)):
        for _ in range(n_per_class):
            phase = torch.rand(1, generator=gen) * 6.28
            wave = torch.sin(2 * torch.pi * freq * t + phase) + 0.3 * torch.randn(4_000, generator=gen)
            waves.append(wave)
            labels.append(label)
    return torch.stack(waves), torch.tensor(labels)


@pytest.mark.parametrize("method", method_names())
def test_smoke_training_decreases_loss(method):
    """Short Adam training on tiny-hubert. Phase 1 freezes the (random) head, so only the
    PEFT method can lower the loss; phase 2 trains method and head together."""
    torch.manual_seed(0)
    model = make_model("tiny-hubert", Case(method, tuple([[method]] * 4)))
    x, labels = _two_class_data()
    model.train()
    hidden0, mask = model.embed(x)  # the frozen front end, cached as trainers do
    assert not hidden0.requires_grad

    def run(params, steps, lr):
        opt = torch.optim.Adam(params, lr=lr)
        losses = []
        for _ in range(steps):
            loss = model.loss(model.forward_from([hidden0], mask), mask, {"labels": labels})
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(torch.isfinite(torch.tensor(losses))), losses
        return losses

    peft = [p for m in methods_of(model) for p in m.trainable_parameters()]
    initial = {id(p): p.detach().clone() for p in peft}
    losses = []
    if peft:
        for p in model.head.parameters():
            p.requires_grad_(False)
        losses = run(peft, 15, 3e-2)
        assert losses[-1] < 0.97 * losses[0], [round(v, 3) for v in losses]
        assert all(not torch.equal(initial[id(p)], p) for p in peft)
        for p in model.head.parameters():
            p.requires_grad_(True)
    losses += run([p for p in model.parameters() if p.requires_grad], 20, 1e-2)
    assert min(losses[-3:]) < 0.5 * losses[0], [round(v, 3) for v in losses]


# -- what each method computes -----------------------------------------------------------------------------
# A hand-written post-LN encoder layer (wav2vec 2.0 / HuBERT base) in plain functional ops,
# bypassing every module (and so every hook and wrapper), with each method's published
# update written out. The layer run by pefttune must agree with it.


def _lin(module, x):
    module = getattr(module, "base_layer", module)
    return F.linear(x, module.weight, module.bias)


def _ln(module, x):
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def _attend(q, k, v, heads):
    batch, frames, dim = q.shape

    def split(t):
        return t.reshape(batch, -1, heads, dim // heads).transpose(1, 2)

    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1)
    return (weights @ split(v)).transpose(1, 2).reshape(batch, frames, dim)


def _bottleneck(adapter, x):
    return adapter.up(adapter.act(adapter.down(x)))


def _reference_layer(layer, x, methods):
    att, ffn = layer.attention, layer.feed_forward
    m = {type(method).__name__: method for method in methods}
    bitfit = m["BitFit"].deltas if "BitFit" in m else {}
    lora = m["LoRA"]._wrapped if "LoRA" in m else {}
    ia3 = m["IA3"]._wrapped if "IA3" in m else {}

    def proj(name, module, h):
        if name in ia3 and name in ("intermediate_dense", "output_dense"):
            h = h * ia3[name].ia3_l["default"].flatten()  # feedforward: scale the input
        out = _lin(module, h)
        if name in bitfit:
            out = out + bitfit[name]
        if name in lora:
            w = lora[name]
            scaling = w.lora_alpha["default"] / w.r["default"]
            out = out + scaling * (h @ w.lora_A["default"].weight.T @ w.lora_B["default"].weight.T)
        if name in ia3 and name not in ("intermediate_dense", "output_dense"):
            out = out * ia3[name].ia3_l["default"].flatten()
        return out

    def norm(name, module, h):
        return _ln(module, h) + bitfit[name] if name in bitfit else _ln(module, h)

    q, k, v = (proj(n, getattr(att, n), x) for n in ("q_proj", "k_proj", "v_proj"))
    if "Prefix" in m:
        prefix = m["Prefix"]
        k = torch.cat([prefix.key.expand(x.shape[0], -1, -1), k], dim=1)
        v = torch.cat([prefix.value.expand(x.shape[0], -1, -1), v], dim=1)
    a = proj("out_proj", att.out_proj, _attend(q, k, v, att.num_heads))
    if "SequentialAdapter" in m and "attention" in m["SequentialAdapter"].adapters:
        a = a + _bottleneck(m["SequentialAdapter"].adapters["attention"], a)
    h = norm("layer_norm", layer.layer_norm, x + a)
    f = proj("output_dense", ffn.output_dense, ffn.intermediate_act_fn(proj("intermediate_dense", ffn.intermediate_dense, h)))
    if "SequentialAdapter" in m:
        f = f + _bottleneck(m["SequentialAdapter"].adapters["feed_forward"], f)
    if "ParallelAdapter" in m:
        p = m["ParallelAdapter"]
        f = f + p.scaling * _bottleneck(p.adapter, x if p.source == "layer" else h)
    if "AdapterBias" in m:
        ab = m["AdapterBias"]
        f = f + ab.alpha(h) * ab.vector
    return norm("final_layer_norm", layer.final_layer_norm, h + f)


@pytest.mark.parametrize("backbone", ["tiny-wav2vec2", "tiny-hubert"])
@pytest.mark.parametrize("case", METHOD_CASES, ids=lambda c: c.id)
def test_layer_computes_the_methods_update(backbone, case):
    model = make_model(backbone, case)
    perturb(model, std=0.2)
    model.eval()
    x, _ = audio_batch()
    hidden0, frames = model.embed(x)  # no padding: the hand-written attention has no mask
    hidden = hidden0
    with torch.no_grad():
        for index, layer in enumerate(model.encoder.layers):
            got = model.encoder.run_layer(index, hidden, frames)
            expected = _reference_layer(layer, hidden, model.methods[index])
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=0, msg=lambda s: f"layer {index}: {s}")
            hidden = got


@pytest.mark.parametrize("case", METHOD_CASES, ids=lambda c: c.id)
def test_detach_restores_the_frozen_layers(case):
    model = make_model("tiny-wavlm", case)
    perturb(model)
    model.eval()
    for method in methods_of(model):
        method.detach()
    states, frames = _states(model)
    frozen, _ = frozen_states("tiny-wavlm")
    assert max_diff_valid(states, list(frozen), frames) < 1e-5
    for name, module in model.encoder.model.named_modules():
        assert not hasattr(module, "base_layer"), f"{name}: wrapper left behind"
        assert not module._forward_hooks and not module._forward_pre_hooks, f"{name}: hook left behind"
        assert getattr(module, "pefttune_prefix", None) is None, name
