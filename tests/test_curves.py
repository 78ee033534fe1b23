"""Tests for mode-connecting curves over arbitrary modules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdlkit.ensemble import Bezier, PolyChain, evaluate_path, linear_path, train_curve
from bdlkit.models import VGGSmall

torch.set_num_threads(1)


class ResBlockNet(nn.Module):
    """A non-Sequential graph: conv stem, residual block with BN, skip connection, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        r = F.relu(self.bn1(self.conv1(h)))
        h = F.relu(h + self.bn2(self.conv2(r)))
        return self.head(h.mean((2, 3)))


def _trained_bn_state(net: nn.Module, seed: int) -> nn.Module:
    """Give BN layers non-trivial running statistics and the net random weights."""
    torch.manual_seed(seed)
    for p in net.parameters():
        p.data.normal_(0, 0.3)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 1, 8, 8) * 2 + seed)
    return net.eval()


def test_bezier_coefficients_closed_form():
    c = Bezier(nn.Linear(2, 2), nn.Linear(2, 2), num_bends=3)
    assert c.coefficients(0.25) == [0.5625, 0.375, 0.0625]
    c5 = Bezier(nn.Linear(2, 2), nn.Linear(2, 2), num_bends=5)
    t = 0.3
    expect = [1 * 0.7**4, 4 * 0.3 * 0.7**3, 6 * 0.09 * 0.49, 4 * 0.027 * 0.7, 0.3**4]
    assert c5.coefficients(t) == pytest.approx(expect, rel=1e-12)
    assert sum(c5.coefficients(0.77)) == pytest.approx(1.0)


def test_polychain_coefficients():
    c = PolyChain(nn.Linear(2, 2), nn.Linear(2, 2), num_bends=3)
    assert c.coefficients(0.25) == [0.5, 0.5, 0.0]
    assert c.coefficients(0.5) == [0.0, 1.0, 0.0]
    assert c.coefficients(0.75) == [0.0, 0.5, 0.5]
    assert c.coefficients(1.0) == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("cls", [Bezier, PolyChain])
@pytest.mark.parametrize("make", [ResBlockNet, lambda: VGGSmall(widths=(4, 8, 8))])
def test_endpoints_reproduced_exactly_with_bn(cls, make):
    a = _trained_bn_state(make(), 1)
    b = _trained_bn_state(make(), 2)
    curve = cls(a, b, num_bends=3).eval()
    x = torch.randn(5, 1, 8, 8) if isinstance(a, ResBlockNet) else torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        for t, ref in [(0.0, a), (1.0, b)]:
            assert torch.equal(curve(x, t), ref(x))
            assert torch.equal(curve.model_at(t)(x), ref(x))
            for (n1, v1), (n2, v2) in zip(curve.model_at(t).state_dict().items(),
                                          ref.state_dict().items(), strict=True):
                assert n1 == n2 and torch.equal(v1, v2)


def test_bends_start_on_line_and_model_at_matches_forward():
    torch.manual_seed(0)
    a, b = ResBlockNet(), ResBlockNet()
    curve = Bezier(a, b, num_bends=4)
    t = 0.37
    w = curve.weights_at(t)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(w[name], (1 - t) * pa + t * pb, rtol=1e-5, atol=1e-6)
    m = curve.model_at(t)
    assert type(m) is ResBlockNet and not any(p.is_meta for p in m.parameters())
    curve.eval()
    m.eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(curve(x, t), m(x))


def test_gradients_reach_bends_only():
    torch.manual_seed(0)
    a, b = ResBlockNet(), ResBlockNet()
    a_state = copy.deepcopy(a.state_dict())
    curve = Bezier(a, b, num_bends=3)
    params = list(curve.parameters())
    assert len(params) == len(list(a.parameters()))  # one bend = one copy of the weights
    out = curve(torch.randn(4, 1, 8, 8), 0.4)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    for buf in curve.buffers():
        assert not buf.requires_grad and buf.grad is None
    assert all(p.grad is None for p in a.parameters())  # the source models are untouched
    for k, v in a.state_dict().items():
        assert torch.equal(v, a_state[k])
    # At the endpoints the bends are not used at all (coefficient exactly 0).
    assert not curve(torch.randn(4, 1, 8, 8), 0.0).requires_grad


def test_curve_bad_input():
    a = ResBlockNet()
    with pytest.raises(ValueError, match="end"):
        Bezier(a, VGGSmall())
    with pytest.raises(ValueError, match="end"):
        Bezier(VGGSmall(widths=(4, 8, 8)), VGGSmall(widths=(4, 8, 16)))
    with pytest.raises(ValueError, match="num_bends"):
        Bezier(a, ResBlockNet(), num_bends=1)
    with pytest.raises(TypeError, match="start"):
        Bezier("a", a)  # type: ignore[arg-type]
    curve = PolyChain(a, ResBlockNet())
    x = torch.randn(2, 1, 8, 8)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="t"):
            curve(x, bad)
        with pytest.raises(ValueError, match="t"):
            curve.model_at(bad)
    with pytest.raises(ValueError, match="bends"):
        train_curve(linear_path(a, ResBlockNet()), [(x, torch.zeros(2, dtype=torch.long))], 1)


def test_linear_path_has_no_parameters_and_is_linear():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    line = linear_path(a, b)
    assert list(line.parameters()) == []
    m = line.model_at(0.25)
    torch.testing.assert_close(m.weight, 0.75 * a.weight + 0.25 * b.weight)


def _xor_data(n: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()
    return x, y


def _train(net, x, y, steps=300, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def test_trained_curve_lowers_midpoint_loss():
    """Two XOR solutions: the trained Bezier's mid loss is far below the straight line's."""
    x, y = _xor_data()

    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))

    a = _train(make(1), x, y, seed=1)
    b = _train(make(2), x, y, seed=2)
    loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(x), 64)]
    curve = Bezier(a, b, num_bends=3)
    hist = train_curve(curve, loader, epochs=40, lr=0.05, wd=0.0,
                       generator=torch.Generator().manual_seed(0))
    assert hist["loss"][-1] < hist["loss"][0]
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    res_c = evaluate_path(curve, {"train": loader}, ts, bn_loader=loader)
    res_l = evaluate_path(linear_path(a, b), {"train": loader}, ts, bn_loader=loader)
    assert res_c["t"] == ts and len(res_c["train_nll"]) == 5
    ends = (res_l["train_nll"][0] + res_l["train_nll"][-1]) / 2
    assert res_c["train_nll"][0] == pytest.approx(res_l["train_nll"][0])
    assert max(res_l["train_nll"]) > ends + 0.1
    assert max(res_c["train_nll"]) < max(res_l["train_nll"])
    with pytest.raises(ValueError, match="bn_loader"):
        evaluate_path(curve, loader, 3)


def test_evaluate_path_refreshes_bn_at_each_t():
    """With a refresh, the BN stats at t equal those recomputed on model_at(t) by hand."""
    torch.manual_seed(0)
    a = _trained_bn_state(ResBlockNet(), 1)
    b = _trained_bn_state(ResBlockNet(), 2)
    curve = PolyChain(a, b, num_bends=3)
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))) for _ in range(3)]
    res = evaluate_path(curve, data, [0.5], bn_loader=data)
    from bdlkit.batchnorm import refresh_bn

    m = refresh_bn(curve.model_at(0.5), data).eval()
    with torch.no_grad():
        nll = sum(F.cross_entropy(m(xb), yb, reduction="sum") for xb, yb in data) / 24
    assert res["nll"][0] == pytest.approx(float(nll), rel=1e-5)


def test_channels_last_and_state_dict_roundtrip():
    torch.manual_seed(0)
    a = VGGSmall(widths=(4, 8, 8)).to(memory_format=torch.channels_last)
    b = VGGSmall(widths=(4, 8, 8)).to(memory_format=torch.channels_last)
    curve = Bezier(a, b)
    w = curve.weights_at(0.3)
    assert w["features.0.weight"].is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 28, 28).to(memory_format=torch.channels_last)
    curve.eval()
    curve2 = Bezier(VGGSmall(widths=(4, 8, 8)), VGGSmall(widths=(4, 8, 8))).eval()
    curve2.load_state_dict(curve.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(curve2(x, 0.3), curve(x, 0.3))


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 6, bias=False)
        self.dec = nn.Linear(6, 4, bias=False)
        self.head = nn.Linear(6, 4, bias=False)
        self.head.weight = self.dec.weight  # one tensor under two names

    def forward(self, x):
        h = torch.relu(self.emb(x))
        return self.head(h) + self.dec(h)


def test_tied_parameters_stay_tied_along_the_curve():
    torch.manual_seed(0)
    a, b = _Tied(), _Tied()
    curve = Bezier(a, b).eval()
    x = torch.randn(3, 4)
    assert torch.equal(curve(x, 0.0), a(x)) and torch.equal(curve(x, 1.0), b(x))
    mid = curve.model_at(0.5)
    assert mid.head.weight is mid.dec.weight
    assert torch.allclose(mid(x), curve(x, 0.5))
    assert torch.equal(curve.model_at(0.0)(x), a(x))


def test_model_at_follows_the_curve_dtype_and_frozen_parameters_stay_frozen():
    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), nn.Sequential(nn.Linear(3, 3),
                                                                           nn.Linear(3, 2))
    for m in (a, b):
        m[0].requires_grad_(False)
    curve = Bezier(a, b)
    assert [p.requires_grad for p in curve.bends[0]] == [False, False, True, True]
    data = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(3)]
    frozen_before = curve.bends[0][0].detach().clone()
    train_curve(curve, data, epochs=2, lr=0.1)
    assert torch.equal(curve.bends[0][0], frozen_before)
    mid = curve.double().model_at(0.5)
    assert mid[0].weight.dtype == torch.float64 and not mid[0].weight.requires_grad
    assert mid(torch.randn(2, 3, dtype=torch.float64)).dtype == torch.float64


def test_weights_at_never_returns_the_stored_tensors():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    curve = Bezier(a, b)
    with torch.no_grad():
        curve.weights_at(0.0)["weight"].add_(1.0)
    assert torch.equal(curve.model_at(0.0).weight, a.weight)


def test_evaluate_path_ts_forms():
    import numpy as np

    c = linear_path(nn.Linear(4, 2), nn.Linear(4, 2))
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    assert evaluate_path(c, data, ts=np.int64(3))["t"] == [0.0, 0.5, 1.0]
    assert evaluate_path(c, data, ts=np.array([0.0, 0.25], dtype=np.float32))["t"] == [0.0, 0.25]
    for bad in (0.5, torch.tensor(0.5)):
        with pytest.raises(TypeError, match="ts must be"):
            evaluate_path(c, data, ts=bad)
