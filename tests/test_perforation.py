"""Tests for bdlkit.compress.perforation (PerforatedCNNs)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdlkit.compress.perforation import (
    PerforatedConv2d,
    fine_tune,
    fuse_for_inference,
    impact_scores,
    nearest_fill_index,
    perforate,
    perforation_mask,
    search_rates,
)
from bdlkit.compress.speed import measure_speedup
from bdlkit.models import VGGSmall

torch.set_num_threads(1)

CONFIGS = [  # (stride, padding, dilation, kernel)
    (1, 1, 1, 3),
    (2, 1, 1, 3),
    (1, 2, 2, 3),
    (2, 0, 1, 3),
    (1, 0, 1, 1),
    (1, 2, 1, 5),
]


def _dense_reference(conv: nn.Module, p: PerforatedConv2d, x: torch.Tensor) -> torch.Tensor:
    """Masked dense reference: dense output, every position replaced by its fill source."""
    ref = F.conv2d(x, p.weight, p.bias, p.stride, p.padding, p.dilation)
    return ref.flatten(2)[:, :, p._fill_dense].view_as(ref)


@pytest.mark.parametrize("stride,padding,dilation,k", CONFIGS)
def test_rate_zero_equals_conv_exactly(stride: int, padding: int, dilation: int, k: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, k, stride=stride, padding=padding, dilation=dilation)
    p = PerforatedConv2d.from_conv(conv, (11, 9), rate=0.0, mask="uniform", seed=0)
    x = torch.randn(2, 3, 11, 9)
    assert torch.equal(p(x), conv(x))
    assert p.num_kept == p.output_size[0] * p.output_size[1]


@pytest.mark.parametrize("mask", ["uniform", "grid", "structure"])
@pytest.mark.parametrize("stride,padding,dilation,k", CONFIGS)
def test_kept_positions_equal_dense_and_fill(mask: str, stride: int, padding: int,
                                             dilation: int, k: int) -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, k, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(3, 4, 12, 10)
    p = PerforatedConv2d.from_conv(conv, (12, 10), rate=0.6, mask=mask, seed=3, pool=(2, 2, 0))
    dense = conv(x)
    kept = p.mask.flatten()
    for kern in p.available_kernels():
        p.kernel = kern
        with torch.no_grad():
            out = p(x)
        assert out.shape == dense.shape
        diff = (out.flatten(2)[:, :, kept] - dense.flatten(2)[:, :, kept]).abs().max()
        assert diff < 1e-5, (kern, float(diff))
        # skipped positions copy their nearest kept position (brute force, Euclidean)
        h, w = p.output_size
        kp = kept.nonzero().squeeze(1)
        of = out.flatten(2)
        for pos in range(h * w):
            d2 = ((kp // w - pos // w) ** 2 + (kp % w - pos % w) ** 2)
            src = int(p._fill_dense[pos])
            assert src in kp[d2 == d2.min()].tolist()
            assert torch.equal(of[:, :, pos], of[:, :, src])


def test_strided_kernel_on_regular_grid() -> None:
    torch.manual_seed(2)
    for size, rate, expect in (((16, 16), 0.75, (8, 8)), ((16, 16), 0.5, (16, 8)),
                               ((14, 14), 0.75, (7, 7))):
        conv = nn.Conv2d(3, 4, 3, padding=1)
        for seed in range(4):  # random offsets
            x = torch.randn(2, 3, *size)
            for kernel in ("strided", "strided_pad"):
                p = PerforatedConv2d.from_conv(conv, size, rate=rate, mask="grid", seed=seed,
                                               kernel=kernel)
                assert p.lattice is not None and (p.lattice[2], p.lattice[5]) == expect
                assert torch.allclose(p(x), _dense_reference(conv, p, x), atol=1e-5)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2), (2, 3, 1)])
def test_strided_pad_kernel_with_stride_padding_dilation(stride: int, padding: int,
                                                          dilation: int) -> None:
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, dilation=dilation)
    # input size whose output is 16 x 12: grid r=0.75 is then a step-2 lattice
    size = tuple((o - 1) * stride + dilation * 2 + 1 - 2 * padding for o in (16, 12))
    x = torch.randn(2, 3, *size)
    offsets = set()
    for seed in range(8):  # random offsets 0/1 on both axes
        p = PerforatedConv2d.from_conv(conv, size, rate=0.75, mask="grid", seed=seed)
        assert p.output_size == (16, 12) and p.lattice is not None
        offsets.add((p.lattice[0], p.lattice[3]))
        ref = _dense_reference(conv, p, x)
        with torch.no_grad():
            for kernel in ("strided", "strided_pad"):
                assert torch.allclose(p._run(kernel, x, True), ref, atol=1e-5), (seed, kernel)
    assert len(offsets) >= 3  # both offsets were exercised


@pytest.mark.parametrize("kernel", ["gather", "dense", "strided", "strided_pad"])
def test_gradients_match_masked_dense_reference(kernel: str) -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=1)
    mask = "grid" if kernel.startswith("strided") else "uniform"
    p = PerforatedConv2d.from_conv(conv, (8, 8), rate=0.75, mask=mask, seed=0, kernel=kernel)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    g = torch.randn(2, 5, 8, 8)
    (p(x) * g).sum().backward()
    gw, gb, gx = p.weight.grad.clone(), p.bias.grad.clone(), x.grad.clone()
    x.grad = None
    w = p.weight.detach().clone().requires_grad_()
    b = p.bias.detach().clone().requires_grad_()
    ref = F.conv2d(x, w, b, 1, 1)
    ref = ref.flatten(2)[:, :, p._fill_dense].view_as(ref)
    (ref * g).sum().backward()
    assert torch.allclose(gw, w.grad, atol=1e-4)
    assert torch.allclose(gb, b.grad, atol=1e-5)
    assert torch.allclose(gx, x.grad, atol=1e-5)


def test_gradient_finite_difference_double() -> None:
    torch.manual_seed(4)
    p = PerforatedConv2d(2, 3, 3, (5, 5), rate=0.5, mask="uniform", padding=1, seed=0,
                         kernel="gather").double()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: p(inp), (x,))


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.75, 0.9])
def test_masks_keep_exact_count(rate: float) -> None:
    h, w = 14, 12
    want = int(math.floor((1 - rate) * h * w + 0.5))
    for kind in ("uniform", "structure", "impact"):
        m = perforation_mask(kind, (h, w), rate, seed=0, pool=nn.MaxPool2d(3, 2),
                             scores=torch.rand(h, w))
        assert m.dtype == torch.bool and m.shape == (h, w) and int(m.sum()) == want, kind
    g = perforation_mask("grid", (h, w), rate, seed=0)
    rows, cols = g.any(1).sum(), g.any(0).sum()
    assert int(g.sum()) == int(rows * cols)  # a Cartesian product (a grid)
    # the product closest to the requested count
    best = min(abs(a * b - want) for a in range(1, h + 1) for b in range(1, w + 1))
    assert abs(int(g.sum()) - want) == best


def test_grid_exact_and_regular_for_vgg_sizes() -> None:
    for s in (56, 28, 14):
        for rate in (0.5, 0.75):
            m = perforation_mask("grid", (s, s), rate, seed=1)
            assert int(m.sum()) == int((1 - rate) * s * s)
            p = PerforatedConv2d(1, 1, 3, (s, s), rate=rate, mask="grid", padding=1, seed=1)
            assert p.lattice is not None and "strided" in p.available_kernels()


def test_grid_follows_paper_formula() -> None:
    # n points per side at ceil((H/n)(i + u)) - 1: consecutive gaps are floor or ceil of H/n
    m = perforation_mask("grid", (13, 13), 0.6, seed=5)
    for axis in (1, 0):
        idx = m.any(axis).nonzero().squeeze(1)
        n = idx.numel()
        gaps = set((idx[1:] - idx[:-1]).tolist())
        assert gaps <= {math.floor(13 / n), math.ceil(13 / n)}


def test_structure_mask_prefers_overlapping_pool_windows() -> None:
    m = perforation_mask("structure", (9, 9), 0.75, seed=0, pool=(3, 2, 0))
    c = torch.zeros(9)
    for s in range(0, 9 - 3 + 1, 2):
        c[s:s + 3] += 1
    counts = (c[:, None] * c[None, :]).flatten()
    kept, skipped = counts[m.flatten()], counts[~m.flatten()]
    assert kept.min() >= skipped.max()


def test_impact_mask_keeps_top_scores_and_random_ties() -> None:
    sc = torch.arange(20.0).view(4, 5)
    m = perforation_mask("impact", (4, 5), 0.5, seed=0, scores=sc)
    assert torch.equal(m.flatten(), sc.flatten() >= 10)
    flat = torch.zeros(4, 5)
    masks = {tuple(perforation_mask("impact", (4, 5), 0.5, seed=s, scores=flat).flatten().tolist())
             for s in range(5)}
    assert len(masks) > 1


def test_nearest_fill_random_ties() -> None:
    m = torch.tensor([[True, False, True]])
    picks = {int(nearest_fill_index(m, seed=s)[1]) for s in range(20)}
    assert picks == {0, 1}
    idx = nearest_fill_index(m, seed=0)
    assert idx[0] == 0 and idx[2] == 1


def test_impact_scores_brute_force() -> None:
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(3 * 25, 4))
    data = [(torch.randn(6, 1, 5, 5), torch.randint(0, 4, (6,))) for _ in range(2)]
    sc = impact_scores(net, data, ["0"])["0"]
    tot = torch.zeros(5, 5)
    for x, y in data:
        for i in range(x.shape[0]):
            v = net[0](x[i:i + 1])
            v.retain_grad()
            out = net[3](net[2](net[1](v)))
            F.cross_entropy(out, y[i:i + 1], reduction="sum").backward()
            tot += (v.grad * v).abs().sum(1)[0].detach()
    assert torch.allclose(sc, tot / 12, atol=1e-5)


def test_bad_inputs_and_atomic_prepare() -> None:
    conv = nn.Conv2d(2, 2, 3, padding=1)
    for r in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="rate"):
            PerforatedConv2d.from_conv(conv, (6, 6), rate=r)
    with pytest.raises(TypeError, match="rate"):
        PerforatedConv2d.from_conv(conv, (6, 6), rate="half")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="groups"):
        PerforatedConv2d.from_conv(nn.Conv2d(2, 2, 3, groups=2), (6, 6), rate=0.5)
    with pytest.raises(ValueError, match="padding_mode"):
        PerforatedConv2d.from_conv(nn.Conv2d(2, 2, 3, padding_mode="reflect"), (6, 6), rate=0.5)
    with pytest.raises(ValueError, match="mask"):
        PerforatedConv2d.from_conv(conv, (6, 6), rate=0.5, mask="random")
    with pytest.raises(ValueError, match="shape"):
        PerforatedConv2d.from_conv(conv, (6, 6), rate=None, mask=torch.ones(5, 5, dtype=bool))
    with pytest.raises(ValueError, match="pool"):
        PerforatedConv2d.from_conv(conv, (6, 6), rate=0.5, mask="structure")
    with pytest.raises(ValueError, match="scores"):
        PerforatedConv2d.from_conv(conv, (6, 6), rate=0.5, mask="impact")
    with pytest.raises(ValueError, match="strided"):
        PerforatedConv2d.from_conv(conv, (6, 6), rate=0.5, mask="uniform", kernel="strided")
    with pytest.raises(TypeError, match="conv"):
        PerforatedConv2d.from_conv(nn.Linear(2, 2), (6, 6), rate=0.5)  # type: ignore[arg-type]
    p = PerforatedConv2d.from_conv(conv, (6, 6), rate=0.5, mask="uniform", seed=0)
    with pytest.raises(ValueError, match="prepared size"):
        p(torch.randn(1, 2, 7, 7))
    with pytest.raises(ValueError, match="expected input"):
        p(torch.randn(1, 3, 6, 6))
    before = p.mask.clone()
    with pytest.raises(ValueError, match="rate"):
        p.prepare((7, 7), rate=2.0)
    assert torch.equal(p.mask, before) and p.input_size == (6, 6)
    p.prepare((7, 7))  # re-prepare with the same rate and mask type
    assert p(torch.randn(1, 2, 7, 7)).shape == (1, 2, 7, 7)
    assert p.num_kept == 25  # round half up of 24.5


def test_tensor_mask_memory_formats_and_dtype() -> None:
    torch.manual_seed(6)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    m = torch.zeros(6, 6, dtype=torch.bool)
    m[::2, ::3] = True
    p = PerforatedConv2d.from_conv(conv, (6, 6), mask=m, rate=None)
    assert p.num_kept == 6 and p.mask_kind == "tensor"
    x = torch.randn(1, 3, 6, 6)
    ref = _dense_reference(conv, p, x)
    for kern in p.available_kernels():
        p.kernel = kern
        assert torch.allclose(p(x), ref, atol=1e-5)
        assert torch.allclose(p(x.contiguous(memory_format=torch.channels_last)), ref, atol=1e-5)
    p.kernel = "auto"
    p64 = p.double()
    assert p64(x.double()).dtype == torch.float64
    assert p.kernel_for(x.double()) in p.available_kernels()


def test_state_dict_round_trip_restores_mask() -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1)
    a = PerforatedConv2d.from_conv(conv, (8, 8), rate=0.5, mask="uniform", seed=1)
    b = PerforatedConv2d.from_conv(conv, (8, 8), rate=0.5, mask="uniform", seed=2)
    assert not torch.equal(a.mask, b.mask)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 2, 8, 8)
    assert torch.equal(b.mask, a.mask)
    assert torch.allclose(a(x), b(x), atol=1e-6)


def test_perforate_fuse_and_speed_helpers() -> None:
    torch.manual_seed(7)
    net = VGGSmall(widths=(4, 8, 8)).eval()
    x = torch.randn(3, 1, 28, 28)
    rates = {"features.3": 0.5, "features.7": 0.75}
    pnet = perforate(net, rates, (28, 28), mask="grid", seed=0)
    assert isinstance(net.features[3], nn.Conv2d)  # original untouched
    p3 = pnet.features[3]
    assert isinstance(p3, PerforatedConv2d) and p3.num_kept == 28 * 14
    assert pnet.features[7].num_kept == 49
    with torch.no_grad():
        y = pnet(x)
        fused = fuse_for_inference(pnet)
        assert isinstance(fused.features[4], nn.Identity)
        assert fused.features[3].activation is not None
        assert torch.allclose(fused(x), y, atol=1e-4)
    for mk in ("uniform", "structure"):
        q = perforate(net, rates, (28, 28), mask=mk, seed=0)
        assert q(x).shape == (3, 10)
    data = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
    qi = perforate(net, rates, (28, 28), mask="impact", loader=data, impact_steps=2)
    assert qi.features[7].num_kept == 49
    with pytest.raises(ValueError, match="not a Conv2d"):
        perforate(net, {"features.1": 0.5}, (28, 28))
    with pytest.raises(ValueError, match="loader"):
        perforate(net, rates, (28, 28), mask="impact")
    r = measure_speedup(net, pnet, (1, 28, 28), (4,), (1,), repeats=2, warmup=1,
                        min_seconds=0.0)
    assert r["rows"][0]["speedup"] > 0
    # caches made under inference_mode must not leak into training (autograd) or no_grad
    losses = fine_tune(pnet, data, epochs=1, lr=1e-3)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_search_rates_reaches_predicted_target() -> None:
    torch.manual_seed(8)
    net = VGGSmall(widths=(4, 8, 8)).eval()
    data = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))]
    out = search_rates(net, data, (28, 28), 1.3, batch_size=16, repeats=1, num_batches=1,
                       levels=(1.0, 0.5, 0.25))
    assert all(r in (0.5, 0.75) for r in out["rates"].values())
    # every greedy step moves one layer one level up, to a level measured faster than before
    level = dict.fromkeys(out["layer_times"], 0)
    for h in out["history"]:
        lt = out["layer_times"][h["layer"]]
        assert lt[level[h["layer"]] + 1] < lt[level[h["layer"]]]
        level[h["layer"]] += 1
        assert h["rate"] == (0.5, 0.75)[level[h["layer"]] - 1]
    assert {n: (0.5, 0.75)[i - 1] for n, i in level.items() if i} == out["rates"]
    if out["rates"]:
        assert out["predicted_speedup"] > 1.0
    # one chosen mask per perforated layer, with the requested kept count, from the candidates
    assert set(out["masks"]) == set(out["rates"])
    sizes = {"features.0": 28, "features.3": 28, "features.7": 14, "features.10": 14,
             "features.14": 7, "features.17": 7}
    for n, m in out["masks"].items():
        hw = sizes[n]
        assert m.shape == (hw, hw) and m.dtype == torch.bool
        cands = [perforation_mask("grid", (hw, hw), out["rates"][n], seed=1000 * i + t)
                 for i, name in enumerate(sizes) if name == n for t in range(4)]
        assert any(torch.equal(m, c) for c in cands)
    bn_modes = [m.training for m in net.modules()]
    assert bn_modes == [False] * len(bn_modes)  # the search left the model's modes alone
    with pytest.raises(ValueError, match="target_speedup"):
        search_rates(net, data, (28, 28), 0.5)
    with pytest.raises(ValueError, match="mask_trials"):
        search_rates(net, data, (28, 28), 1.3, mask_trials=0)


def test_inference_mode_caches_do_not_leak() -> None:
    torch.manual_seed(9)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    p = PerforatedConv2d.from_conv(conv, (9, 9), rate=0.5, mask="uniform", seed=0,
                                   kernel="gather")
    x = torch.randn(2, 3, 9, 9)
    ref = _dense_reference(conv, p, x).detach()
    with torch.inference_mode():
        a = p(x)
    with torch.no_grad():
        b = p(x)
    c = p(x)
    c.sum().backward()
    for out in (a, b, c):
        assert torch.allclose(out, ref, atol=1e-5)
    assert p.weight.grad is not None


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 1),
                                  nn.MaxPool2d((2, 3), (2, 1))])
@pytest.mark.parametrize("mask", ["grid", "uniform"])
def test_fused_pool_equals_pool_of_filled_map(pool: nn.MaxPool2d, mask: str) -> None:
    torch.manual_seed(6)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(3, 3, 12, 10)
    p = PerforatedConv2d.from_conv(conv, (12, 10), rate=0.75, mask=mask, seed=1,
                                   activation=nn.ReLU())
    with torch.no_grad():
        ref = pool(p(x))
        p.fuse_pool(pool)
        for kernel in p.available_kernels():
            assert torch.allclose(p._run(kernel, x, True), ref, atol=1e-6), kernel
        assert torch.allclose(p(x[:1]), ref[:1], atol=1e-6)  # another batch size
    p.fuse_pool(None)
    with torch.no_grad():
        ref = nn.ReLU()(p.to_conv()(x)).flatten(2)[:, :, p._fill_dense].view(3, 4, 12, 10)
        assert torch.allclose(p(x), ref, atol=1e-6)


def test_fuse_for_inference_fuses_pools_in_vgg() -> None:
    torch.manual_seed(7)
    model = VGGSmall().eval()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    p = perforate(model, dict.fromkeys(convs, 0.75), (28, 28), mask="grid", seed=0).eval()
    fused = fuse_for_inference(p)
    pooled = [m for m in fused.features if isinstance(m, PerforatedConv2d) and m.fused_pool]
    assert len(pooled) == 3
    assert not any(isinstance(m, nn.MaxPool2d) for m in fused.features)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(fused(x), p(x), atol=1e-5)
        unfused = fuse_for_inference(p, fuse_pools=False)
        assert sum(isinstance(m, nn.MaxPool2d) for m in unfused.features) == 3
        assert torch.allclose(unfused(x), p(x), atol=1e-5)


def test_fuse_for_inference_sees_through_folded_batchnorm() -> None:
    # perforating an already BN-folded net (BN -> Identity, as the rate search does) must still
    # move the ReLU and the pooling into the perforated convs
    torch.manual_seed(7)
    model = VGGSmall().eval()
    folded = fuse_for_inference(model)
    convs = [n for n, m in folded.named_modules() if isinstance(m, nn.Conv2d)]
    p = perforate(folded, dict.fromkeys(convs, 0.75), (28, 28), mask="grid", seed=0).eval()
    fused = fuse_for_inference(p)
    assert sum(isinstance(m, PerforatedConv2d) and m.fused_pool is not None
               for m in fused.features) == 3
    assert not any(isinstance(m, nn.ReLU | nn.MaxPool2d) for m in fused.features)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(fused(x), p(x), atol=1e-5)


def test_fuse_pool_bad_input() -> None:
    p = PerforatedConv2d(2, 2, 3, (8, 8), rate=0.5, padding=1, seed=0)
    with pytest.raises(TypeError, match="pool"):
        p.fuse_pool(nn.AvgPool2d(2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ceil_mode"):
        p.fuse_pool(nn.MaxPool2d(2, ceil_mode=True))
    with pytest.raises(ValueError, match="does not fit"):
        p.fuse_pool(nn.MaxPool2d(9))
    assert p.fused_pool is None  # unchanged after the errors


def test_fuse_for_inference_keeps_a_pool_it_cannot_fuse() -> None:
    torch.manual_seed(8)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    p = PerforatedConv2d.from_conv(conv, (9, 9), rate=0.5, mask="uniform", seed=0)
    net = nn.Sequential(p, nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)).eval()
    fused = fuse_for_inference(net)
    assert isinstance(fused[2], nn.MaxPool2d) and fused[0].fused_pool is None
    x = torch.randn(2, 2, 9, 9)
    with torch.no_grad():
        assert torch.allclose(fused(x), net(x), atol=1e-6)
