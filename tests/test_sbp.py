"""Tests for Structured Bayesian Pruning (bdlkit.compress.sbp)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from bdlkit.compress import sbp
from bdlkit.compress.sbp import SBPNoise, truncated_lognormal_stats
from bdlkit.models import MLP, LeNet5, LeNet500_300, VGGSmall

torch.set_num_threads(1)

A, B = -20.0, 0.0


def _numeric(mu: float, log_sigma: float, n: int = 400001) -> dict[str, float]:
    """KL to LogU[a,b], E[θ], SNR of the log-truncated normal by trapezoid integration."""
    s = math.exp(log_sigma)
    xstar = min(max(mu, A), B)
    half = math.sqrt((xstar - mu) ** 2 + 2 * 60 * s * s)  # log-density within 60 of its max
    lo, hi = max(A, mu - half), min(B, mu + half)
    x = np.linspace(lo, hi, n)
    logq = -((x - mu) ** 2 - (xstar - mu) ** 2) / (2 * s * s)
    q = np.exp(logq)
    z = np.trapezoid(q, x)
    q, logq = q / z, logq - math.log(z)
    ent = -np.trapezoid(q * logq, x)
    m1 = np.trapezoid(q * np.exp(x), x)
    m2 = np.trapezoid(q * np.exp(2 * x), x)
    return {"kl": math.log(B - A) - ent, "mean": m1, "snr": m1 / math.sqrt(m2 - m1 * m1)}


def test_kl_reference_value() -> None:
    layer = SBPNoise(3)
    assert torch.allclose(layer.kl(), torch.full((3,), 7.270), atol=5e-4)
    assert round(float(truncated_lognormal_stats(torch.zeros(1), torch.tensor([-5.0]))["kl"]),
                 3) == 7.270


@pytest.mark.parametrize("mu", [-19.0, -10.0, -3.0, -0.5, 0.0, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("log_sigma", [-3.0, -1.0, 0.0, 1.0, 2.5])
def test_kl_and_moments_match_numerical_integration(mu: float, log_sigma: float) -> None:
    st = truncated_lognormal_stats(torch.tensor([mu]), torch.tensor([log_sigma]))
    ref = _numeric(mu, log_sigma)
    assert float(st["kl"]) == pytest.approx(ref["kl"], abs=1e-5)
    assert float(st["mean"]) == pytest.approx(ref["mean"], rel=1e-5)
    assert float(st["snr"]) == pytest.approx(ref["snr"], rel=1e-4)
    var = float(st["var"])
    assert float(st["mean"]) / math.sqrt(var) == pytest.approx(float(st["snr"]), rel=1e-9)


def test_extreme_limits_match_closed_forms() -> None:
    # tiny σ, μ inside: θ is log-normal, SNR = 1/sqrt(expm1(σ²)), E = exp(μ + σ²/2)
    st = truncated_lognormal_stats(torch.tensor([-10.0]), torch.tensor([-20.0]))
    s = math.exp(-20)
    assert float(st["mean"]) == pytest.approx(math.exp(-10 + s * s / 2), rel=1e-12)
    assert float(st["snr"]) == pytest.approx(1 / math.sqrt(math.expm1(s * s)), rel=1e-6)
    # KL = log(b-a) - entropy of N(μ, σ²) = log 20 - 0.5 log(2πe) + 20
    assert float(st["kl"]) == pytest.approx(math.log(20) - 0.5 * math.log(2 * math.pi * math.e)
                                            + 20, abs=1e-9)
    # μ = 5 ≫ b with tiny σ: q is ≈ an exponential of rate λ = μ/σ² below b;
    # KL = log 20 − (1 − log λ); E[θ] → 1
    st = truncated_lognormal_stats(torch.tensor([5.0]), torch.tensor([-20.0]))
    lam = 5.0 / s**2
    assert float(st["kl"]) == pytest.approx(math.log(20) - 1 + math.log(lam), abs=1e-6)
    assert float(st["mean"]) == pytest.approx(1.0, abs=1e-12)


def _grid(n: int = 61) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.linspace(-20.0, 5.0, n, dtype=torch.float64)
    g = torch.cat([g, torch.tensor([-20 + 1e-9, -1e-9, 1e-9, 5 - 1e-9], dtype=torch.float64)])
    m, s = torch.meshgrid(g, g, indexing="ij")
    return m.reshape(-1), s.reshape(-1)


def test_stats_and_gradients_finite_over_clip_range() -> None:
    mu, ls = _grid()
    mu.requires_grad_(True)
    ls.requires_grad_(True)
    st = truncated_lognormal_stats(mu, ls)
    for k, v in st.items():
        assert torch.isfinite(v).all(), k
    assert (st["kl"] > -1e-9).all()  # KL ≥ 0
    assert ((st["mean"] > 0) & (st["mean"] <= 1)).all()
    (st["kl"].sum() + st["mean"].sum()).backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(ls.grad).all()
    # the float32 layer too (snr is capped at 1e30 so fits in float32)
    layer = SBPNoise(mu.numel())
    with torch.no_grad():
        layer.mu.copy_(mu.float())
        layer.log_sigma.copy_(ls.float())
    for v in (layer.kl(), layer.mean(), layer.variance(), layer.snr()):
        assert v.dtype == torch.float32 and torch.isfinite(v).all()


def test_sgvlb_gradient_finite_everywhere_in_clip_range() -> None:
    mu, ls = _grid(41)
    n = mu.numel()
    torch.manual_seed(0)
    net = nn.Sequential(SBPNoise(n), nn.Linear(n, 3))
    with torch.no_grad():
        net[0].mu.copy_(mu.float())
        net[0].log_sigma.copy_(ls.float())
    net.train()
    x, y = torch.randn(8, n), torch.randint(0, 3, (8,))
    loss = sbp.sgvlb(net(x), y, net, n_train=1000)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(net[0].mu.grad).all() and torch.isfinite(net[0].log_sigma.grad).all()


@pytest.mark.parametrize("u", [1e-5, 0.5, 1 - 1e-5])
def test_sampler_finite_with_gradients_at_extreme_u(u: float) -> None:
    mu, ls = _grid(41)
    mu.requires_grad_(True)
    ls.requires_grad_(True)
    lt = sbp._sample_log_theta(mu, ls, torch.full_like(mu, u))
    assert torch.isfinite(lt).all() and (lt >= A).all() and (lt <= B).all()
    lt.sum().backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(ls.grad).all()


@pytest.mark.parametrize("mu,log_sigma", [(-3.0, 0.0), (0.0, -1.0), (1.0, -0.7), (4.0, -2.3),
                                          (-19.5, 0.5)])
def test_sampler_matches_truncated_normal(mu: float, log_sigma: float) -> None:
    from scipy import stats

    torch.manual_seed(0)
    layer = SBPNoise(1, init_mu=mu, init_log_sigma=log_sigma)
    theta = layer.sample((20000,)).view(-1).detach()
    s = math.exp(log_sigma)
    dist = stats.truncnorm((A - mu) / s, (B - mu) / s, loc=mu, scale=s)
    assert stats.kstest(torch.log(theta).numpy(), dist.cdf).pvalue > 1e-3
    st = truncated_lognormal_stats(torch.tensor([mu]), torch.tensor([log_sigma]))
    se = math.sqrt(float(st["var"]) / theta.numel())
    assert abs(float(theta.mean()) - float(st["mean"])) < 5 * se + 1e-12


def test_reparameterised_gradient_matches_finite_difference() -> None:
    u = torch.tensor([0.3, 0.7, 0.01], dtype=torch.float64)
    for mu0, ls0 in [(-2.0, -0.5), (1.0, -1.0), (4.0, -2.5)]:  # 4, -2.5: Newton tail branch
        mu = torch.full((3,), mu0, dtype=torch.float64, requires_grad=True)
        ls = torch.full((3,), ls0, dtype=torch.float64, requires_grad=True)
        sbp._sample_log_theta(mu, ls, u).sum().backward()
        eps = 1e-6
        with torch.no_grad():
            f = [sbp._sample_log_theta(mu + d, ls, u).sum() for d in (eps, -eps)]
            g = [sbp._sample_log_theta(mu, ls + d, u).sum() for d in (eps, -eps)]
        assert float(mu.grad.sum()) == pytest.approx(float(f[0] - f[1]) / (2 * eps), rel=1e-4,
                                                     abs=1e-7)
        assert float(ls.grad.sum()) == pytest.approx(float(g[0] - g[1]) / (2 * eps), rel=1e-4,
                                                     abs=1e-7)


def test_forward_train_and_eval() -> None:
    torch.manual_seed(0)
    layer = SBPNoise(4)
    with torch.no_grad():
        layer.mu.copy_(torch.tensor([0.0, -1.0, -20.0, -5.0]))
        layer.log_sigma.copy_(torch.tensor([-5.0, -3.0, 3.0, 1.0]))
    x = torch.ones(3, 4, 2, 2)
    layer.eval()
    mult = layer.mean() * (layer.snr() > 1.0)
    assert torch.allclose(layer(x), x * mult.view(1, 4, 1, 1))
    assert layer.mask().tolist() == [True, True, False, False]
    layer.train()
    out = layer(x)
    assert out.shape == x.shape and (out > 0).all() and (out <= 1).all()
    assert not torch.equal(out[0], out[1])  # a noise sample per example
    assert torch.equal(out[:, :, 0, 0], out[:, :, 1, 1])  # shared over spatial positions
    with pytest.raises(ValueError, match="expects input"):
        layer(torch.ones(3, 5))


def test_kl_sgvlb_and_clip() -> None:
    net = sbp.add_noise(nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)))
    layers = sbp.sbp_layers(net)
    assert [m.num_units for _, m in layers] == [5, 7]
    assert sbp.kl(net).item() == pytest.approx(12 * 7.2699409, rel=1e-6)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    net.eval()
    logits = net(x)
    expect = 100 * nn.functional.cross_entropy(logits, y) + 0.5 * sbp.kl(net)
    assert torch.allclose(sbp.sgvlb(logits, y, net, 100, kl_weight=0.5), expect)
    with torch.no_grad():
        layers[0][1].mu.fill_(9.0)
        layers[0][1].log_sigma.fill_(-30.0)
    sbp.clip_(net)
    assert layers[0][1].mu.max().item() == 5.0 and layers[0][1].log_sigma.min().item() == -20.0


def _randomise(net: nn.Module, seed: int, frac_pruned: float = 0.4) -> None:
    """Give every SBP layer random (μ, log σ), about `frac_pruned` of units with SNR < 1."""
    g = torch.Generator().manual_seed(seed)
    for _, m in sbp.sbp_layers(net):
        n = m.num_units
        dead = torch.rand(n, generator=g) < frac_pruned
        dead[0] = False
        with torch.no_grad():
            m.mu.copy_(torch.where(dead, torch.full((n,), -8.0), -2 * torch.rand(n, generator=g)))
            m.log_sigma.copy_(torch.where(dead, torch.full((n,), 2.0),
                                          -4 + 2 * torch.rand(n, generator=g)))
    for mod in net.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                mod.running_mean.uniform_(-0.5, 0.5, generator=g)
                mod.running_var.uniform_(0.5, 2.0, generator=g)
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.uniform_(-0.5, 0.5, generator=g)


@pytest.mark.parametrize("make,shape", [
    (LeNet5, (1, 28, 28)), (LeNet500_300, (1, 28, 28)), (lambda: VGGSmall(widths=(8, 8, 16)),
                                                         (1, 28, 28)),
    (lambda: MLP(12, 3, hidden=(20, 10)), (12,)),
    (lambda: nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Sigmoid(),
                           nn.Linear(16, 4)), (12,)),
    # padded conv consumer: exact because conv1 has no bias (removed channels output GELU(0))
    (lambda: nn.Sequential(nn.Conv2d(2, 6, 3, bias=False), nn.GELU(),
                           nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                           nn.Flatten(), nn.Linear(45, 7), nn.ELU(), nn.Linear(7, 2)), (2, 8, 8)),
    # unpadded conv consumer with biases: removed channels output GELU(b) != 0, folded
    (lambda: nn.Sequential(nn.Conv2d(2, 6, 3), nn.GELU(), nn.Conv2d(6, 5, 3), nn.ReLU(),
                           nn.AvgPool2d(2), nn.Flatten(), nn.Linear(45, 7), nn.ELU(),
                           nn.Linear(7, 2)), (2, 10, 10)),
    # padded conv consumers of removed biased channels (border maps), the map then scaled by
    # the consumer's own noise; 'same' padding; Conv1d
    (lambda: nn.Sequential(nn.Conv2d(2, 6, 3), nn.GELU(), nn.Conv2d(6, 5, 3, padding=1),
                           nn.Tanh(), nn.Conv2d(5, 4, 3, padding="same"), nn.ReLU(),
                           nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 7), nn.ELU(),
                           nn.Linear(7, 2)), (2, 8, 8)),
    (lambda: nn.Sequential(nn.Conv1d(3, 6, 3), nn.SiLU(), nn.Conv1d(6, 5, 5, padding=2),
                           nn.BatchNorm1d(5), nn.ReLU(), nn.Flatten(), nn.Linear(50, 3)),
     (3, 12)),
    # conv + BatchNorm with a conv bias (noise after the BatchNorm), padded consumer
    (lambda: nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Tanh(),
                           nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                           nn.Flatten(), nn.Linear(4 * 36, 3)), (2, 6, 6)),
])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_prune_equals_eval_output(make, shape, dtype, tol) -> None:  # noqa: ANN001
    # float64: pruning is exact up to rounding of the last bits, not merely close
    torch.manual_seed(0)
    net = sbp.add_noise(make()).to(dtype)
    _randomise(net, seed=1)
    net.eval()
    x = torch.randn(16, *shape, dtype=dtype)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        ref = net(x)
    small = sbp.prune(net, 1.0, example_input=x[:4])
    with torch.no_grad():
        out = small(x)
    assert out.dtype == dtype
    assert torch.allclose(out, ref, atol=tol, rtol=tol), (out - ref).abs().max()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(isinstance(m, SBPNoise) for m in small.modules())
    n_small = sum(p.numel() for p in small.parameters())
    n_big = sum(p.numel() for n, p in net.named_parameters()
                if not n.endswith(("mu", "log_sigma")))
    assert n_small < n_big
    # the removed units really carried a non-zero constant (the bias) wherever one exists
    biased = [m for _, m in sbp.sbp_layers(net) if m.bias is not None]
    assert all(bool((m.bias[~m.mask()] != 0).any()) for m in biased)


def test_prune_lenet5_physical_sizes() -> None:
    net = sbp.add_noise(LeNet5())
    _randomise(net, seed=3)
    kept = {n: int(m.mask().sum()) for n, m in sbp.sbp_layers(net)}
    small = sbp.prune(net, example_input=torch.randn(2, 1, 28, 28))
    convs = [m for m in small if isinstance(m, nn.Conv2d)]
    lins = [m for m in small if isinstance(m, nn.Linear)]
    assert convs[0].out_channels == kept["features.0_sbp"] == convs[1].in_channels
    assert lins[0].out_features == kept["classifier.1_sbp"] == lins[1].in_features
    # fc1 inputs: the kept ones of the 800 features whose conv2 channel survived
    assert lins[0].in_features <= kept["classifier.1_sbp_in"]
    assert lins[1].out_features == 10


def test_prune_threshold_changes_units() -> None:
    net = sbp.add_noise(LeNet500_300())
    _randomise(net, seed=2, frac_pruned=0.0)
    x = torch.randn(3, 1, 28, 28)
    sizes = []
    for thr in (0.0, 15.0, 30.0):
        small = sbp.prune(net, thr, example_input=x)
        sizes.append(sum(p.numel() for p in small.parameters()))
        # eval output at this threshold
        with torch.no_grad():
            h = x
            for m in [m for m in net.modules() if not list(m.children())]:
                if isinstance(m, SBPNoise):
                    h = h * m.multiplier(thr).float().view(1, -1)
                    h = h + (m.bias.view(1, -1) if m.bias is not None else 0.0)
                else:
                    h = m(h)
            assert torch.allclose(small(x), h, atol=1e-5)
    assert sizes[0] > sizes[1] > sizes[2]


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="threshold"):
        SBPNoise(3, threshold=-1.0)
    with pytest.raises(ValueError, match="num_units"):
        SBPNoise(0)
    net = sbp.add_noise(LeNet500_300())
    x = torch.zeros(1, 1, 28, 28)
    with pytest.raises(ValueError, match="snr_threshold"):
        sbp.prune(net, -0.5, example_input=x)
    with pytest.raises(ValueError, match="threshold"):
        sbp.sbp_layers(net)[0][1].mask(-1.0)
    with pytest.raises(TypeError, match="example_input"):
        sbp.prune(net, example_input=None)  # type: ignore[arg-type]
    # no prunable layers
    with pytest.raises(ValueError, match="no nn.Linear"):
        sbp.add_noise(nn.Sequential(nn.Flatten(), nn.ReLU()))
    with pytest.raises(ValueError, match="no prunable"):
        sbp.add_noise(nn.Linear(3, 2), input_noise=False)
    with pytest.raises(ValueError, match="no SBPNoise"):
        sbp.prune(LeNet500_300(), example_input=x)
    with pytest.raises(ValueError, match="no SBPNoise"):
        sbp.kl(LeNet500_300())
    with pytest.raises(ValueError, match="already"):
        sbp.add_noise(net)
    with pytest.raises(ValueError, match="n_train"):
        sbp.sgvlb(torch.zeros(2, 10), torch.zeros(2, dtype=torch.long), net, 0)
    # a layer whose every unit is pruned: ValueError naming the layer, model untouched
    name, layer = sbp.sbp_layers(net)[1]
    with torch.no_grad():
        layer.mu.fill_(-15.0)
        layer.log_sigma.fill_(3.0)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    with pytest.raises(ValueError, match=f"every unit of SBP layer '{name}'"):
        sbp.prune(net, example_input=x)
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_add_noise_on_bare_and_wrapped_layers() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(6, 8)
            self.act = nn.ReLU()
            self.fc2 = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.act(self.fc1(x)))

    model = Custom()
    net = sbp.add_noise(model)
    assert isinstance(net.fc1, nn.Sequential) and isinstance(model.fc1, nn.Linear)
    assert [m.num_units for _, m in sbp.sbp_layers(net)] == [6, 8]
    _randomise(net, seed=0)
    x = torch.randn(5, 6)
    net.eval()
    small = sbp.prune(net, example_input=x)
    assert torch.allclose(small(x), net(x), atol=1e-5)
    bare = sbp.add_noise(nn.Linear(4, 3), skip_output=False)
    assert isinstance(bare, nn.Sequential) and len(bare) == 3


def test_prune_rejects_non_sequential_graphs() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(6, 6)
            self.fc2 = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(x + torch.relu(self.fc1(x)))

    net = sbp.add_noise(Residual())
    with pytest.raises(ValueError, match="Sequential-style"):
        sbp.prune(net, example_input=torch.randn(3, 6))


def test_recipe_lr_schedule_holds_then_decays_to_floor() -> None:
    from bdlkit.experiments.sbp import FULL, QUICK, lr_factor

    vals = [lr_factor(s, 100, 0.5, 0.01) for s in range(101)]
    assert vals[:51] == [1.0] * 51
    assert all(a >= b for a, b in zip(vals, vals[1:], strict=False))
    assert vals[-1] == pytest.approx(0.01)
    assert lr_factor(500, 100, 0.0, 0.1) == pytest.approx(0.1)
    for cfg in (*FULL.values(), *QUICK.values()):
        assert 0.0 <= cfg["hold"] <= 1.0 and 0.0 <= cfg["floor"] <= 1.0
    with pytest.raises(ValueError, match="total"):
        lr_factor(0, 0, 0.5, 0.01)
    with pytest.raises(ValueError, match="hold"):
        lr_factor(0, 10, 1.5, 0.01)


def test_recipe_lr_lambdas_freeze_noise_in_last_epochs() -> None:
    from bdlkit.experiments.sbp import lr_factor, lr_lambdas

    cfg = {"sbp_epochs": 4, "hold": 0.5, "floor": 0.01}
    plain = lr_lambdas(cfg, steps_per_epoch=5, n_groups=3)
    frozen = lr_lambdas({**cfg, "sbp_freeze_epochs": 1}, steps_per_epoch=5, n_groups=3)
    for step in range(21):
        ref = lr_factor(step, 20, 0.5, 0.01)
        assert [f(step) for f in plain] == [ref] * 3
        assert frozen[0](step) == ref
        assert [f(step) for f in frozen[1:]] == [0.0 if step >= 15 else ref] * 2
    for bad in (4, -1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="sbp_freeze_epochs"):
            lr_lambdas({**cfg, "sbp_freeze_epochs": bad}, 5, 3)
    with pytest.raises(ValueError, match="n_groups"):
        lr_lambdas(cfg, 5, 0)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        lr_lambdas(cfg, 0, 3)


def test_recipe_with_overrides_types_and_errors() -> None:
    from bdlkit.experiments.sbp import FULL, with_overrides

    base = FULL["LeNet5-Caffe"]
    before = dict(base)
    cfg = with_overrides(base, ["sbp_epochs=25", "lr=2e-2", "sbp_freeze_epochs=3"])
    assert cfg["sbp_epochs"] == 25 and isinstance(cfg["sbp_epochs"], int)
    assert cfg["lr"] == 0.02 and cfg["sbp_freeze_epochs"] == 3
    assert base == before  # the recipe's own config is untouched
    for bad, match in (("nokey=1", "KEY=VALUE"), ("sbp_epochs", "KEY=VALUE"),
                       ("lr=fast", "not a number"), ("sbp_epochs=2.5", "integer"),
                       ("lr=nan", "finite"), ("lr=inf", "finite")):
        with pytest.raises(ValueError, match=match):
            with_overrides(base, [bad])
    with pytest.raises(TypeError, match="items"):
        with_overrides(base, "sbp_epochs=25")


def test_recipe_frozen_epochs_keep_units_and_train_weights() -> None:
    from bdlkit.experiments.sbp import lr_lambdas, param_groups

    torch.manual_seed(0)
    noisy = sbp.add_noise(LeNet500_300())
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    cfg = {"lr": 1e-2, "sbp_lr": 0.1, "sbp_epochs": 2, "sbp_freeze_epochs": 1}
    opt = torch.optim.Adam(param_groups(noisy, cfg, x[:1]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(cfg, 2, len(opt.param_groups)))
    layer = sbp.sbp_layers(noisy)[0][1]
    weight = next(p for n, p in noisy.named_parameters() if n.endswith("weight"))
    snapshots = []
    for _ in range(4):  # 2 epochs of 2 steps: noise trained in the first, frozen in the second
        snapshots.append((layer.mu.detach().clone(), weight.detach().clone()))
        opt.zero_grad()
        sbp.sgvlb(noisy(x), y, noisy, n_train=1000).backward()
        opt.step()
        sched.step()
    snapshots.append((layer.mu.detach().clone(), weight.detach().clone()))
    assert not torch.equal(snapshots[0][0], snapshots[2][0])  # μ moved while trained
    assert torch.equal(snapshots[2][0], snapshots[4][0])  # and not at all once frozen
    assert not torch.equal(snapshots[2][1], snapshots[4][1])  # the weights kept training


def test_recipe_nets_selection_and_merge() -> None:
    from bdlkit.experiments.sbp import _check_nets, merge_results, run

    assert _check_nets(None) == ["LeNet-500-300", "LeNet5-Caffe"]
    assert _check_nets(["LeNet5-Caffe", "LeNet-500-300"]) == ["LeNet-500-300", "LeNet5-Caffe"]
    with pytest.raises(ValueError, match="nets"):
        run("/tmp/unused", nets=["LeNet7"])
    with pytest.raises(ValueError, match="configs"):  # a config for a network not run
        run("/tmp/unused", nets=["LeNet5-Caffe"], configs={"LeNet-500-300": {}})
    with pytest.raises(ValueError, match="configs"):
        run("/tmp/unused", configs=[("LeNet5-Caffe", {})])
    with pytest.raises(ValueError, match="nets"):
        _check_nets([])
    with pytest.raises(TypeError, match="nets"):
        _check_nets("LeNet5-Caffe")

    def report(nets: list[str], tag: str, seed: int = 0) -> dict:
        return {"tables": [{"title": "t", "rows": [[n, tag] for n in nets]}],
                "headline": {n: {"error": tag} for n in nets},
                "config": {"quick": False, "seed": seed, "nets": {n: tag for n in nets},
                           "pruned_models": {n: tag for n in nets}},
                "notes": ["general"] + [f"{n}: note {tag}" for n in nets]}

    old = report(["LeNet-500-300", "LeNet5-Caffe"], "old")
    new = report(["LeNet5-Caffe"], "new")
    m = merge_results(old, new)
    assert m["tables"][0]["rows"] == [["LeNet-500-300", "old"], ["LeNet5-Caffe", "new"]]
    assert m["headline"] == {"LeNet-500-300": {"error": "old"}, "LeNet5-Caffe": {"error": "new"}}
    assert list(m["config"]["nets"].items()) == [("LeNet-500-300", "old"), ("LeNet5-Caffe", "new")]
    assert m["config"]["pruned_models"]["LeNet-500-300"] == "old"
    assert m["merged_from_earlier_run"] == ["LeNet-500-300"]
    assert any("LeNet-500-300: note old" in x for x in m["notes"])
    assert not any("LeNet5-Caffe: note old" in x for x in m["notes"])
    assert new["headline"] == {"LeNet5-Caffe": {"error": "new"}}  # inputs untouched
    with pytest.raises(ValueError, match="seed"):
        merge_results(old, report(["LeNet5-Caffe"], "new", seed=1))
    with pytest.raises(TypeError, match="report"):
        merge_results(old, {"tables": []})


def test_noise_acts_before_the_bias() -> None:
    """θ ⊙ (W x) + b (METHODS.md §3): the bias moves into the SBP layer, noise-free."""
    torch.manual_seed(0)
    model = LeNet5()
    net = sbp.add_noise(model)
    assert model.features[0].bias is not None  # the original is not modified
    conv1, noise1 = net.features[0], net.features[1]
    assert isinstance(noise1, SBPNoise) and conv1.bias is None
    assert torch.equal(noise1.bias, model.features[0].bias)
    assert net.classifier[2].bias is None and net.classifier[3].bias is not None  # fc1
    assert "features.0_sbp.bias" in net.state_dict() and "features.0.bias" not in net.state_dict()
    assert sbp.sbp_layers(net)[2][1].bias is None  # input-feature noise of fc1: no bias
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        noise1.mu[:3] = -20.0  # units 0-2: θ ≈ e⁻²⁰ in training, removed (SNR < 1) in eval
        noise1.log_sigma[:3] = torch.tensor([-20.0, 3.0, 3.0])
        b = model.features[0].bias.view(1, -1, 1, 1)
        wx = model.features[0](x) - b  # W x of the original layer
        net.eval()
        out = noise1(conv1(x))
        expect = wx * noise1.multiplier().float().view(1, -1, 1, 1) + b
        assert torch.allclose(out, expect, atol=1e-6)
        assert torch.equal(out[:, 1:3], b[:, 1:3].expand(4, 2, 24, 24))  # removed unit = bias
        net.train()
        out = noise1(conv1(x))
        assert torch.allclose(out[:, 0], b[:, 0].expand(4, 24, 24), atol=1e-6)  # θ ≈ 0
        assert (out[:, 3:] - b[:, 3:]).abs().max() > 1e-2  # the others still see W x
    # state_dict round trip into a fresh noisy network (what the recipe does)
    fresh = sbp.add_noise(LeNet5())
    fresh.load_state_dict(net.state_dict())
    net.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))


def test_batchnorm_keeps_conv_bias_and_noise_after_bn() -> None:
    net = sbp.add_noise(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Flatten(), nn.Linear(4 * 36, 2)))
    assert net[0].bias is not None and isinstance(net[2], SBPNoise) and net[2].bias is None


def test_prune_padded_conv_fed_by_removed_biased_units_is_exact() -> None:
    # removed conv1 channels output tanh(0.3) everywhere; the padded conv2 sees zeros at its
    # borders, so the fold needs a per-position correction (PositionBias)
    torch.manual_seed(0)
    net = sbp.add_noise(nn.Sequential(nn.Conv2d(2, 6, 3), nn.Tanh(), nn.Conv2d(6, 4, 3, padding=1),
                                      nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)))
    first = sbp.sbp_layers(net)[0][1]
    with torch.no_grad():
        first.mu[:2] = -20.0
        first.log_sigma[:2] = 3.0
        first.bias.fill_(0.3)
    net.eval()
    x = torch.randn(5, 2, 8, 8)
    small = sbp.prune(net, example_input=x[:2])
    with torch.no_grad():
        assert torch.allclose(small(x), net(x), atol=1e-5)
    assert small[0].out_channels == 4
    maps = [m for m in small if isinstance(m, sbp.PositionBias)]
    assert len(maps) == 1 and maps[0].bias_map.shape == (4, 6, 6)
    assert maps[0].bias_map[:, 2:4, 2:4].abs().max() < 1e-6  # interior: folded into the bias
    assert maps[0].bias_map[:, 0].abs().max() > 1e-3  # borders: the padding zeros
    with pytest.raises(ValueError, match="built for inputs of shape"):
        small(torch.randn(1, 2, 10, 10))
    unpadded = sbp.add_noise(nn.Sequential(nn.Conv2d(2, 6, 3), nn.Tanh(),
                                           nn.Conv2d(6, 4, 3, padding="valid"), nn.ReLU(),
                                           nn.Flatten(), nn.Linear(4 * 16, 3)))
    unpadded.load_state_dict({k: v for k, v in net.state_dict().items()
                              if not k.startswith(("5", "6"))}, strict=False)
    unpadded.eval()
    small = sbp.prune(unpadded, example_input=x[:2])
    assert not any(isinstance(m, sbp.PositionBias) for m in small)  # "valid": no borders
    with torch.no_grad():
        assert torch.allclose(small(x), unpadded(x), atol=1e-5)
    with torch.no_grad():  # a zero constant (zero bias, tanh(0) = 0) needs no map
        first.bias.zero_()
    small = sbp.prune(net, example_input=x)
    assert not any(isinstance(m, sbp.PositionBias) for m in small)
    with torch.no_grad():
        assert torch.allclose(small(x), net(x), atol=1e-5)


def test_noise_after_bias_option_prunes_padded_consumer_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.Tanh(), nn.Conv2d(6, 4, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    net = sbp.add_noise(model, before_bias=False)
    assert net[0].bias is not None and sbp.sbp_layers(net)[0][1].bias is None
    first = sbp.sbp_layers(net)[0][1]
    with torch.no_grad():
        net[0].bias.fill_(0.3)  # the case that raises with the noise before the bias
        first.mu[:2] = -20.0
        first.log_sigma[:2] = 3.0
    net.eval()
    x = torch.randn(5, 2, 8, 8)
    with torch.no_grad():
        assert torch.equal(net[1](net[0](x))[:, :2], torch.zeros(5, 2, 6, 6))  # θ ⊙ (Wx + b)
    small = sbp.prune(net, example_input=x)
    with torch.no_grad():
        assert torch.allclose(small(x), net(x), atol=1e-5)
    assert small[0].out_channels == 4
    with pytest.raises(TypeError, match="before_bias"):
        sbp.add_noise(model, before_bias=1)


def test_sgvlb_gradients_finite_with_bias_after_noise() -> None:
    torch.manual_seed(0)
    net = sbp.add_noise(LeNet5())
    _randomise(net, seed=4)
    net.train()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    sbp.sgvlb(net(x), y, net, n_train=60000).backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["features.0_sbp.bias"].abs().sum() > 0
    assert grads["classifier.1_sbp.bias"].abs().sum() > 0


def test_prune_rejects_misplaced_biased_noise() -> None:
    net = nn.Sequential(nn.Linear(3, 4), SBPNoise(4, bias=True), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="bias-free"):
        sbp.prune(net, example_input=torch.randn(2, 3))
    with pytest.raises(TypeError, match="bias"):
        SBPNoise(3, bias=1)  # type: ignore[arg-type]


def test_recipe_param_groups_split_dense_and_conv_noise() -> None:
    from bdlkit.experiments.sbp import param_groups

    net = sbp.add_noise(LeNet5())
    x = torch.zeros(2, 1, 28, 28)
    base = param_groups(net, {"lr": 1e-2, "sbp_lr": 0.3}, x)
    assert [g["lr"] for g in base] == [1e-2, 0.3]
    assert len(base[1]["params"]) == 8  # 4 SBP layers x (mu, log_sigma)
    split = param_groups(net, {"lr": 1e-2, "sbp_lr": 0.3, "sbp_lr_linear": 0.1}, x)
    assert [g["lr"] for g in split] == [1e-2, 0.3, 0.1]
    layers = dict(sbp.sbp_layers(net))
    ids = [{id(p) for p in g["params"]} for g in split]
    assert ids[1] == {id(layers[n].mu) for n in ("features.0_sbp", "features.2_sbp")} | {
        id(layers[n].log_sigma) for n in ("features.0_sbp", "features.2_sbp")}
    assert id(layers["classifier.1_sbp_in"].mu) in ids[2]
    assert id(layers["classifier.1_sbp"].log_sigma) in ids[2]
    assert id(layers["features.0_sbp"].bias) in ids[0]  # the moved bias is a weight
    assert sum(len(i) for i in ids) == len(list(net.parameters()))
    assert net.training  # the probe pass restores the mode
    with pytest.raises(ValueError, match="sbp_lr_linear"):
        param_groups(net, {"lr": 1e-2, "sbp_lr": 0.3, "sbp_lr_linear": -1.0}, x)


@pytest.mark.parametrize("net", [LeNet5, LeNet500_300])
def test_recipe_param_groups_first_layer_rate(net) -> None:  # noqa: ANN001
    from bdlkit.experiments.sbp import param_groups

    noisy = sbp.add_noise(net())
    x = torch.zeros(2, 1, 28, 28)
    groups = param_groups(noisy, {"lr": 1e-2, "sbp_lr": 0.3, "sbp_lr_linear": 0.1,
                                  "sbp_lr_first": 2.0}, x)
    first_name, first = sbp.sbp_layers(noisy)[0]
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    assert by_lr[2.0] == {id(first.mu), id(first.log_sigma)}, first_name
    assert all(id(first.mu) not in ids for lr, ids in by_lr.items() if lr != 2.0)
    assert sum(len(g["params"]) for g in groups) == len(list(noisy.parameters()))
    for bad in (0.0, -1.0, True, "2"):
        with pytest.raises(ValueError, match="sbp_lr_first"):
            param_groups(noisy, {"lr": 1e-2, "sbp_lr": 0.3, "sbp_lr_first": bad}, x)


def test_channel_scale_checks_its_vector() -> None:
    from bdlkit.compress.sbp import ChannelScale

    out = ChannelScale(torch.tensor([2.0, 0.5]))(torch.ones(3, 2, 4, 4))
    assert torch.equal(out[:, 0], torch.full((3, 4, 4), 2.0))
    assert torch.equal(out[:, 1], torch.full((3, 4, 4), 0.5))
    for bad in (torch.ones(2, 2), torch.tensor([1, 2]), [1.0, 2.0]):
        with pytest.raises(TypeError, match="scale"):
            ChannelScale(bad)


def test_recipe_post_pruning_finetune_keeps_units_and_trains() -> None:
    from bdlkit.experiments.sbp import QUICK, finetune_pruned, with_overrides

    torch.manual_seed(0)
    noisy = sbp.add_noise(LeNet500_300()).eval()
    x = torch.randn(200, 1, 28, 28)
    y = torch.randint(0, 10, (200,))
    train = torch.utils.data.TensorDataset(x, y)
    pruned = sbp.prune(noisy, 1.0, example_input=x[:4])
    shapes = [p.shape for p in pruned.parameters()]

    def loss(net: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(net(x), y))

    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    assert finetune_pruned(pruned, QUICK["LeNet-500-300"], train, seed=0) == 0.0  # no key: no-op
    assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in before.items())
    cfg = with_overrides(QUICK["LeNet-500-300"], ["post_epochs=3", "post_lr=1e-3"])
    runs = []
    for _ in range(2):  # same seed, same result
        net = copy.deepcopy(pruned)
        assert finetune_pruned(net, cfg, train, seed=0) > 0
        runs.append(net)
    assert [p.shape for p in runs[0].parameters()] == shapes  # units fixed
    assert loss(runs[0]) < loss(pruned) and not runs[0].training
    assert all(torch.equal(a, b) for a, b in zip(runs[0].parameters(), runs[1].parameters(),
                                                 strict=True))
    for bad, match in (({"post_epochs": -1}, "post_epochs"), ({"post_epochs": 1.5}, "post_epochs"),
                       ({"post_epochs": 1}, "post_lr"), ({"post_epochs": 1, "post_lr": 0.0},
                                                         "post_lr")):
        with pytest.raises(ValueError, match=match):
            finetune_pruned(copy.deepcopy(pruned), bad, train, seed=0)


def test_recipe_load_network_round_trip_and_refuses_other_code(tmp_path) -> None:  # noqa: ANN001
    import pickle

    from bdlkit.experiments.sbp import load_network

    torch.manual_seed(0)
    net = LeNet5()
    noisy = sbp.add_noise(LeNet5()).eval()
    x = torch.randn(4, 1, 28, 28)
    pruned = sbp.prune(noisy, 1.0, example_input=x)
    for name, model in (("pre.pt", net), ("pruned.pt", pruned)):
        torch.save(model, tmp_path / name)
        loaded = load_network(tmp_path / name)
        assert not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(x), model.eval()(x))
    other = nn.Sequential(nn.Linear(2, 2), nn.Tanh())  # Tanh is not on the allow-list
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_network(tmp_path / "other.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "dict.pt")
    with pytest.raises(TypeError, match="nn.Module"):
        load_network(tmp_path / "dict.pt")


@pytest.mark.parametrize("where", ["mu", "weight", "running_var"])
def test_prune_refuses_non_finite_models(where: str) -> None:
    net = sbp.add_noise(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                      nn.Linear(8, 2)))
    with torch.no_grad():
        if where == "mu":
            sbp.sbp_layers(net)[0][1].mu[0] = float("nan")
        elif where == "weight":
            net.get_submodule("0").weight[0, 0] = float("inf")
        else:
            net.get_submodule("1").running_var[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        sbp.prune(net, example_input=torch.randn(3, 4))


@pytest.mark.parametrize("mu, log_sigma", [(4.0, -17.0), (1.0, -19.0), (0.3, -15.0), (2.0, -12.0)])
def test_kl_gradient_in_the_far_upper_tail(mu: float, log_sigma: float) -> None:
    # μ > 0 with tiny σ: KL ≈ log 20 − 1 − 2 log σ + log μ + ..., so ∂/∂μ = 1/μ and
    # ∂/∂log σ = −2 (torch's erfcx derivative cancels catastrophically here).
    m = torch.tensor([mu], dtype=torch.float64, requires_grad=True)
    ls = torch.tensor([log_sigma], dtype=torch.float64, requires_grad=True)
    d_mu, d_ls = torch.autograd.grad(sbp.truncated_lognormal_stats(m, ls)["kl"].sum(), (m, ls))
    assert d_mu.item() == pytest.approx(1.0 / mu, rel=1e-6)
    assert d_ls.item() == pytest.approx(-2.0, rel=1e-6)
    h = 1e-4

    def kl_at(a: float, b: float) -> float:
        return sbp.truncated_lognormal_stats(torch.tensor([a], dtype=torch.float64),
                                             torch.tensor([b], dtype=torch.float64))["kl"].item()

    assert d_mu.item() == pytest.approx((kl_at(mu + h, log_sigma) - kl_at(mu - h, log_sigma))
                                        / (2 * h), rel=1e-5)


@pytest.mark.parametrize("mu, log_sigma", [(5.0, -8.0), (1.0, -10.0), (0.0, -20.0), (2.0, -17.0),
                                           (0.3, -6.0), (-5.0, -14.0)])
def test_variance_and_snr_match_high_precision_moments(mu: float, log_sigma: float) -> None:
    # With μ ≥ 0 and tiny σ, Var[θ] / E[θ]² falls far below float64 resolution of the
    # log-moment formula; the reference here uses 60-digit arithmetic.
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 60
    s = mp.e ** log_sigma
    a, b = (sbp.LOWER - mu) / s, (sbp.UPPER - mu) / s

    def moment(t: int):  # noqa: ANN202
        return (mp.e ** (t * mu + t * t * s * s / 2) * (mp.ncdf(b - t * s) - mp.ncdf(a - t * s))
                / (mp.ncdf(b) - mp.ncdf(a)))

    var = moment(2) - moment(1) ** 2
    stats = sbp.truncated_lognormal_stats(torch.tensor([mu], dtype=torch.float64),
                                          torch.tensor([log_sigma], dtype=torch.float64))
    assert stats["var"].item() == pytest.approx(float(var), rel=1e-4)
    assert stats["snr"].item() == pytest.approx(float(moment(1) / mp.sqrt(var)), rel=1e-4)
