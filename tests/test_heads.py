"""SUPERB-style heads: weighted layer sum, masked mean pooling, CTC log-probs and losses."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pefttune.heads import ClassificationHead, CTCHead, Head, HeadConfig, PooledNorm, WeightedLayerSum

B, T, D, L1 = 3, 11, 16, 5  # batch, frames, hidden, number of hidden states (L + 1)


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    states = [torch.randn(B, T, D, generator=gen) for _ in range(L1)]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate([T, 7, 3]):
        mask[b, :n] = True
    return states, mask


def _scramble_padding(states, mask, seed: int = 9):
    gen = torch.Generator().manual_seed(seed)
    return [torch.where(mask[..., None], s, 100 * torch.randn(s.shape, generator=gen)) for s in states]


def test_weighted_layer_sum_is_a_softmax_average():
    states, _ = _inputs()
    wsum = WeightedLayerSum(L1)
    torch.testing.assert_close(wsum(states), torch.stack(states).mean(0))  # equal weights at init
    with torch.no_grad():
        wsum.weights.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0]))
    w = torch.softmax(wsum.weights.detach(), 0)
    assert torch.isclose(w.sum(), torch.tensor(1.0)) and (w > 0).all()
    expected = sum(w[i] * states[i] for i in range(L1))
    torch.testing.assert_close(wsum(states), expected)
    # a huge weight selects one state
    with torch.no_grad():
        wsum.weights.copy_(torch.tensor([0.0, 0.0, 50.0, 0.0, 0.0]))
    torch.testing.assert_close(wsum(states), states[2])
    wsum(states).sum().backward()
    assert wsum.weights.grad is not None
    with pytest.raises(ValueError, match="expected 5 hidden states, got 4"):
        wsum(states[:4])


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_classification_mean_pool_ignores_padded_frames(kind):
    config = HeadConfig("classification", 4, kind=kind, hidden=8)
    torch.manual_seed(0)
    head = Head(L1, D, config)
    states, mask = _inputs()
    logits = head(states, mask)
    assert logits.shape == (B, 4)
    # padded frames changed wildly: the same logits
    torch.testing.assert_close(head(_scramble_padding(states, mask), mask), logits, atol=0, rtol=0)
    # and the pooled vector is the mean over valid frames
    features = head.featurizer(states)
    pooled = torch.stack([features[b, mask[b]].mean(0) for b in range(B)])
    torch.testing.assert_close(logits, head.head.proj(pooled))
    # without padding it is a plain mean
    full = torch.ones(B, T, dtype=torch.bool)
    torch.testing.assert_close(head(states, full), head.head.proj(features.mean(1)))


def test_classification_loss_is_cross_entropy():
    head = Head(L1, D, HeadConfig("classification", 3))
    states, mask = _inputs()
    logits = head(states, mask)
    labels = torch.tensor([0, 2, 1])
    loss = head.loss(logits, mask, {"labels": labels})
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


@pytest.mark.parametrize("kind", ["linear", "bilstm"])
def test_ctc_head_outputs_log_probs(kind):
    torch.manual_seed(0)
    head = Head(L1, D, HeadConfig("ctc", 6, kind=kind, hidden=8))
    states, mask = _inputs()
    out = head(states, mask)
    assert out.shape == (B, T, 6)
    assert (out <= 0).all()
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(B, T))
    # valid frames do not see the padding (the BiLSTM packs the sequences)
    scrambled = head(_scramble_padding(states, mask), mask)
    torch.testing.assert_close(scrambled[mask], out[mask], atol=1e-6, rtol=0)
    if kind == "bilstm":
        # each utterance alone gives the same frames as in the padded batch
        for b in range(B):
            n = int(mask[b].sum())
            alone = head([s[b : b + 1, :n] for s in states], mask[b : b + 1, :n])
            torch.testing.assert_close(alone[0], out[b, :n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "bilstm"])
def test_ctc_loss_finite_and_trains(kind):
    torch.manual_seed(0)
    head = Head(L1, D, HeadConfig("ctc", 6, kind=kind, hidden=8))
    states, mask = _inputs()
    batch = {"targets": torch.tensor([[1, 2, 3, 2], [4, 5, 0, 0], [1, 1, 0, 0]]), "target_lengths": torch.tensor([4, 2, 1])}
    out = head(states, mask)
    loss = head.loss(out, mask, batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    expected = F.ctc_loss(out.transpose(0, 1), batch["targets"], mask.sum(1), batch["target_lengths"], blank=0)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)
    # a target longer than its input is impossible: zero_infinity keeps the loss finite
    impossible = {"targets": torch.ones(B, 9, dtype=torch.long), "target_lengths": torch.tensor([9, 9, 9])}
    assert torch.isfinite(head.loss(head(states, mask), mask, impossible))
    # a few steps lower the loss
    opt = torch.optim.Adam(head.parameters(), lr=3e-2)
    losses = []
    for _ in range(15):
        loss = head.loss(head(states, mask), mask, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_head_config_validation():
    assert HeadConfig("ctc", 30, "bilstm").to_dict() == {"task": "ctc", "num_outputs": 30, "kind": "bilstm", "hidden": 128,
                                                        "norm": "none"}
    assert HeadConfig(**HeadConfig("classification", 4, "mlp", 32).to_dict()) == HeadConfig("classification", 4, "mlp", 32)
    with pytest.raises(ValueError, match="head.task"):
        HeadConfig("regression", 2)
    with pytest.raises(ValueError, match="head.num_outputs"):
        HeadConfig("classification", 1)
    with pytest.raises(ValueError, match="head.kind.*bilstm"):
        HeadConfig("classification", 3, "bilstm")
    with pytest.raises(ValueError, match="head.kind.*mlp"):
        HeadConfig("ctc", 3, "mlp")
    with pytest.raises(ValueError, match="head.norm.*classification heads only"):
        HeadConfig("ctc", 3, norm="batch")
    with pytest.raises(ValueError, match="head.norm: expected"):
        HeadConfig("classification", 3, norm="layer")
    old = {"task": "classification", "num_outputs": 4, "kind": "linear", "hidden": 128}  # a model.json of before
    assert HeadConfig(**old).norm == "none"
    assert isinstance(Head(L1, D, HeadConfig("ctc", 3)).head, CTCHead)
    assert isinstance(Head(L1, D, HeadConfig("classification", 3)).head, ClassificationHead)


def test_pooled_norm_standardises_in_training_and_uses_running_statistics_after():
    torch.manual_seed(0)
    norm = PooledNorm(4)
    assert not list(norm.parameters())  # no affine parameters: the head stays an affine map of the pooled features
    scale, shift = torch.tensor([100.0, 0.1, 1.0, 5.0]), torch.tensor([3.0, -2.0, 0.0, 50.0])
    batches = [torch.randn(64, 4) * scale + shift for _ in range(200)]
    out = norm(batches[0])
    torch.testing.assert_close(out.mean(0), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(0, unbiased=False), torch.ones(4), atol=1e-2, rtol=0)
    for batch in batches[1:]:
        norm(batch)
    assert ((norm.running_mean - shift).abs() < 0.1 * scale).all(), norm.running_mean
    torch.testing.assert_close(norm.running_var.sqrt(), scale, rtol=0.1, atol=0)
    norm.eval()
    x = torch.randn(5, 4) * scale + shift
    torch.testing.assert_close(norm(x), (x - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps))
    norm.train()
    one = x[:1]  # a training batch of one example has no batch statistics: the running ones are used
    before = norm.running_mean.clone()
    torch.testing.assert_close(norm(one), (one - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps))
    torch.testing.assert_close(norm.running_mean, before)


def test_a_normed_head_learns_where_the_plain_one_is_badly_conditioned():
    """Two classes told apart by a feature 1000x smaller than a noise feature: in the same few
    steps the standardised head separates them, the plain one does not."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (256,), generator=gen)
    signal = (labels.float() * 2 - 1) * 1e-3 + 2e-4 * torch.randn(256, generator=gen)
    noise = 10.0 * torch.randn(256, generator=gen)
    pooled = torch.stack([signal, noise], 1)
    states, mask = [pooled[:, None, :].expand(256, 3, 2).contiguous()], torch.ones(256, 3, dtype=torch.bool)
    accuracy = {}
    for norm in ("none", "batch"):
        torch.manual_seed(0)
        head = Head(1, 2, HeadConfig("classification", 2, norm=norm))
        opt = torch.optim.Adam(head.parameters(), lr=0.05)
        for _ in range(150):
            loss = head.loss(head(states, mask), mask, {"labels": labels})
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            accuracy[norm] = float((head(states, mask).argmax(1) == labels).float().mean())
    assert accuracy["batch"] > 0.95 and accuracy["none"] < 0.75, accuracy
