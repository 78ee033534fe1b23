"""Tests for bdlkit.posterior.swag: moments, sampling covariance, prediction, state, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from bdlkit.batchnorm import refresh_bn
from bdlkit.posterior import swag as swag_mod
from bdlkit.posterior.swag import SWAG, swa_learning_rate, swa_scheduler
from bdlkit.weights import assign_params, flatten_params

torch.set_num_threads(1)


def _perturbed_iterates(model: nn.Module, n: int, seed: int = 0, step: float = 0.3):
    """Yield n random-walk weight vectors written into ``model`` (in place)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        vec = flatten_params(model)
        assign_params(model, vec + step * torch.randn(vec.shape, generator=g))
        yield flatten_params(model).double()


def _state_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if isinstance(a[k], torch.Tensor):
            if not torch.equal(a[k], b[k]):
                return False
        elif a[k] != b[k]:
            return False
    return True


# ---------------------------------------------------------------- moments
@pytest.mark.parametrize("n_collect", [1, 3, 7])
def test_moments_and_ring_buffer_match_brute_force(n_collect):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    swag = SWAG(net, max_rank=3, dtype=torch.float64)
    thetas, devs = [], []
    for theta in _perturbed_iterates(net, n_collect):
        swag.collect(net)
        thetas.append(theta)
        devs.append(theta - torch.stack(thetas).mean(0))  # deviation from the updated mean
    stack = torch.stack(thetas)
    torch.testing.assert_close(swag.mean, stack.mean(0), rtol=0, atol=1e-12)
    var = (stack**2).mean(0) - stack.mean(0) ** 2
    torch.testing.assert_close(swag.variance, var.clamp(min=1e-30), rtol=1e-9, atol=1e-12)
    assert swag.n_collected == n_collect
    assert swag.rank == min(n_collect, 3)
    torch.testing.assert_close(swag.deviations, torch.stack(devs[-3:]), rtol=0, atol=1e-12)
    assert swag._dev.shape == (3, swag.num_params)  # preallocated, never grows
    held = sum(t.numel() for t in vars(swag).values() if isinstance(t, torch.Tensor))
    assert held == (3 + 2) * swag.num_params  # (K + 2) * d, nothing else


def test_swa_mean_equals_averaged_model():
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    ).to(memory_format=torch.channels_last)
    swag = SWAG(net, max_rank=5)
    avg = AveragedModel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    for step in range(12):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        if step >= 2:
            swag.collect(net)
            avg.update_parameters(net)
    swa = swag.sample(scale=0.0)
    for (name, p_swa), p_avg in zip(swa.named_parameters(), avg.module.parameters(), strict=True):
        torch.testing.assert_close(p_swa, p_avg, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(swag.mean, flatten_params(avg.module), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- sampling
def _small_swag(n_collect=8, max_rank=5, seed=0):
    torch.manual_seed(seed)
    net = nn.Linear(4, 3)  # 15 parameters
    swag = SWAG(net, max_rank=max_rank, dtype=torch.float64)
    for _ in _perturbed_iterates(net, n_collect, seed=seed):
        swag.collect(net)
    return net, swag


def test_sample_vector_formula_exact():
    _, swag = _small_swag()
    k = swag.rank
    for scale, cov in [(0.5, True), (1.0, True), (0.5, False), (0.25, False)]:
        g = torch.Generator().manual_seed(3)
        z1 = torch.randn(swag.num_params, generator=g, dtype=torch.float64)
        z2 = torch.randn(k, generator=g, dtype=torch.float64)
        noise = swag.variance.sqrt() * z1
        if cov:
            # rows in buffer storage order (the one z2 is applied to)
            noise = noise + swag._dev[:k].T @ z2 / math.sqrt(k - 1)
        expected = swag.mean + math.sqrt(scale) * noise
        got = swag.sample_vector(scale=scale, cov=cov, seed=3)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cov", [True, False])
def test_empirical_covariance_of_20000_samples(cov):
    _, swag = _small_swag()
    scale = 0.5
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([swag.sample_vector(scale=scale, cov=cov, generator=g)
                           for _ in range(20000)])
    n = samples.shape[0]
    target = swag.covariance(scale=scale, cov=cov)
    # closed form written out independently of SWAG.covariance
    k = swag.rank
    dk = swag.deviations
    manual = scale * (torch.diag(swag.variance) + (dk.T @ dk / (k - 1) if cov else 0.0))
    torch.testing.assert_close(target, manual, rtol=1e-10, atol=1e-14)
    emp_mean = samples.mean(0)
    centred = samples - emp_mean
    emp_cov = centred.T @ centred / (n - 1)
    diag = torch.diag(target)
    se = torch.sqrt((diag[:, None] * diag[None, :] + target**2) / n)  # std error of Wishart
    assert bool(((emp_cov - target).abs() <= 5 * se).all()), (emp_cov - target).abs().max()
    assert bool(((emp_mean - swag.mean).abs() <= 5 * torch.sqrt(diag / n)).all())
    # the low-rank term must matter for this test to be able to fail
    if cov:
        off = target - torch.diag(diag)
        assert off.abs().max() > 20 * se.max()


def test_sample_returns_independent_module_and_is_seeded():
    net, swag = _small_swag()
    before = flatten_params(net).clone()
    a, b = swag.sample(seed=1), swag.sample(seed=1)
    c = swag.sample(seed=2)
    assert isinstance(a, nn.Linear) and a is not net
    torch.testing.assert_close(flatten_params(a), flatten_params(b), rtol=0, atol=0)
    assert not torch.equal(flatten_params(a), flatten_params(c))
    torch.testing.assert_close(flatten_params(net), before, rtol=0, atol=0)
    target = nn.Linear(4, 3)
    out = swag.sample(seed=1, into=target)
    assert out is target
    torch.testing.assert_close(flatten_params(target), flatten_params(a), rtol=0, atol=0)
    swa = swag.sample(scale=0.0)
    torch.testing.assert_close(flatten_params(swa).double(), swag.mean, rtol=0, atol=1e-6)


def test_single_collect_samples_diag_only():
    net = nn.Linear(2, 2)
    swag = SWAG(net, var_clamp=1e-8)
    swag.collect(net)
    v = swag.sample_vector(scale=0.5, seed=0)
    assert torch.isfinite(v).all()
    # variance clamps to 1e-8, so the sample stays within a few 1e-4 of the single point
    assert (v - flatten_params(net)).abs().max() < 1e-3


# ---------------------------------------------------------------- prediction
def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _bn_swag(net):
    swag = SWAG(net, max_rank=4)
    for _ in _perturbed_iterates(net, 6, step=0.2):
        swag.collect(net)
    return swag


def test_predict_equals_manual_bma_and_uses_one_copy(monkeypatch):
    net = _bn_net()
    swag = _bn_swag(net)
    g = torch.Generator().manual_seed(0)
    test = [(torch.randn(7, 5, generator=g), torch.zeros(7)) for _ in range(3)]
    train = [(torch.randn(10, 5, generator=g), torch.zeros(10)) for _ in range(4)]
    calls = []
    real_deepcopy = copy.deepcopy

    def counting(obj, *args, **kw):
        if isinstance(obj, nn.Module):
            calls.append(type(obj).__name__)
        return real_deepcopy(obj, *args, **kw)

    monkeypatch.setattr(swag_mod.copy, "deepcopy", counting)
    probs = swag.predict(test, n_samples=5, bn_loader=train, bn_batches=3, seed=11)
    assert len(calls) == 1
    monkeypatch.undo()
    # manual: same generator sequence, fresh copy per sample, explicit BN refresh
    gen = torch.Generator().manual_seed(11)
    x = torch.cat([b[0] for b in test])
    manual = torch.zeros(21, 3)
    for _ in range(5):
        m = copy.deepcopy(net)
        assign_params(m, swag.sample_vector(generator=gen))
        refresh_bn(m, train[:3])
        m.eval()
        with torch.no_grad():
            manual += torch.softmax(m(x), -1)
    manual /= 5
    torch.testing.assert_close(probs, manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(21), rtol=0, atol=1e-5)
    # the original network is untouched (weights and training flag)
    assert net.training
    # SWA prediction = one deterministic sample at the mean
    p_swa = swag.predict(test, n_samples=1, scale=0.0, bn_loader=train)
    swa = swag.sample(scale=0.0)
    refresh_bn(swa, train)
    swa.eval()
    with torch.no_grad():
        torch.testing.assert_close(p_swa, torch.softmax(swa(x), -1), rtol=1e-5, atol=1e-6)


def test_predict_requires_bn_loader_for_bn_models_and_accepts_dicts():
    net = _bn_net()
    swag = _bn_swag(net)
    data = [{"input": torch.randn(6, 5)} for _ in range(2)]
    with pytest.raises(ValueError, match="bn_loader"):
        swag.predict(data, n_samples=2)
    p = swag.predict(data, n_samples=2, bn_loader=data, seed=0)
    assert p.shape == (12, 3)
    with pytest.raises(ValueError, match="n_samples"):
        swag.predict(data, n_samples=0, bn_loader=data)
    with pytest.raises(ValueError, match="bn_batches"):
        swag.predict(data, bn_loader=data, bn_batches=0)


# ---------------------------------------------------------------- state
def test_state_dict_round_trip_with_map_location(tmp_path):
    net, swag = _small_swag(n_collect=7, max_rank=4)
    path = tmp_path / "swag.pt"
    torch.save(swag.state_dict(), path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    restored = SWAG.from_state_dict(net, state)
    assert _state_equal(restored.state_dict(), swag.state_dict())
    assert restored.dtype == torch.float64 and restored.max_rank == 4
    torch.testing.assert_close(restored.sample_vector(seed=5), swag.sample_vector(seed=5),
                               rtol=0, atol=0)
    # continuing collection after a restore equals continuing on the original
    for _ in _perturbed_iterates(net, 3, seed=9):
        swag.collect(net)
        restored.collect(net)
    assert _state_equal(restored.state_dict(), swag.state_dict())
    # load into an existing object (float32): values converted, counters restored
    other = SWAG(net, max_rank=4)
    other.load_state_dict(state)
    assert other.n_collected == 7
    torch.testing.assert_close(other.mean.double(), state["mean"], rtol=0, atol=1e-6)


def test_load_state_dict_rejects_bad_state_and_keeps_old():
    net, swag = _small_swag(n_collect=3, max_rank=4)
    before = swag.state_dict()
    good = swag.state_dict()
    bad_spec = dict(good, spec=[["weight", [3, 5]], ["bias", [3]]])
    bad_shape = dict(good, mean=torch.zeros(7, dtype=torch.float64))
    bad_counts = dict(good, next_row=0)
    bad_rank = dict(good, max_rank=5)
    missing = {k: v for k, v in good.items() if k != "sq_mean"}
    for bad in (bad_spec, bad_shape, bad_counts, bad_rank, missing):
        with pytest.raises(ValueError):
            swag.load_state_dict(bad)
        assert _state_equal(swag.state_dict(), before)
    with pytest.raises(TypeError):
        swag.load_state_dict([1, 2])


# ---------------------------------------------------------------- bad input
def test_constructor_validation():
    net = nn.Linear(2, 2)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="max_rank"):
            SWAG(net, max_rank=bad)
    with pytest.raises(TypeError, match="model"):
        SWAG("net")
    with pytest.raises(TypeError, match="dtype"):
        SWAG(net, dtype=torch.float16)
    with pytest.raises(ValueError, match="var_clamp"):
        SWAG(net, var_clamp=0.0)
    with pytest.raises(ValueError, match="no parameters"):
        SWAG(nn.ReLU())


def test_collect_rejects_mismatch_and_nan_atomically():
    net, swag = _small_swag(n_collect=3, max_rank=4)
    before = swag.state_dict()
    wrong_shape = nn.Linear(5, 3)
    wrong_names = nn.Sequential(nn.Linear(4, 3))
    nan_net = copy.deepcopy(net)
    with torch.no_grad():
        nan_net.bias[1] = float("nan")
    inf_net = copy.deepcopy(net)
    with torch.no_grad():
        inf_net.weight[0, 0] = float("inf")
    for bad, match in ((wrong_shape, "does not match"), (wrong_names, "does not match"),
                       (nan_net, "non-finite"), (inf_net, "non-finite")):
        with pytest.raises(ValueError, match=match):
            swag.collect(bad)
        assert _state_equal(swag.state_dict(), before)
    with pytest.raises(TypeError, match="model"):
        swag.collect(torch.zeros(3))


def test_sample_before_collect_and_bad_scale():
    net = nn.Linear(2, 2)
    swag = SWAG(net)
    with pytest.raises(RuntimeError, match="collect"):
        swag.sample()
    with pytest.raises(RuntimeError, match="collect"):
        swag.predict([torch.randn(2, 2)])
    swag.collect(net)
    before = swag.state_dict()
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            swag.sample(scale=bad)
    for bad in ("0.5", None, True):
        with pytest.raises(TypeError, match="scale"):
            swag.sample(scale=bad)
    with pytest.raises(TypeError, match="cov"):
        swag.sample(cov=1)
    with pytest.raises(TypeError, match="seed"):
        swag.sample(seed=1.5)
    with pytest.raises(ValueError, match="does not match"):
        swag.sample(into=nn.Linear(3, 2))
    assert _state_equal(swag.state_dict(), before)


# ---------------------------------------------------------------- learning rate
def test_swa_learning_rate_piecewise():
    kw = {"lr_init": 0.1, "swa_lr": 0.01, "swa_start": 20}
    assert swa_learning_rate(0, **kw) == 0.1
    assert swa_learning_rate(10, **kw) == 0.1  # t = 0.5
    assert math.isclose(swa_learning_rate(14, **kw), 0.1 - 0.09 * 0.5)  # t = 0.7, halfway
    assert math.isclose(swa_learning_rate(18, **kw), 0.01)  # t = 0.9
    assert swa_learning_rate(19, **kw) == pytest.approx(0.01)
    assert swa_learning_rate(50, **kw) == pytest.approx(0.01)
    # continuity at the breakpoints
    for t in (0.5, 0.9):
        e = t * 20
        assert swa_learning_rate(e - 1e-9, **kw) == pytest.approx(
            swa_learning_rate(e + 1e-9, **kw), abs=1e-8)
    with pytest.raises(ValueError, match="swa_start"):
        swa_learning_rate(1, lr_init=0.1, swa_lr=0.01, swa_start=0)
    with pytest.raises(ValueError, match="epoch"):
        swa_learning_rate(-1, **kw)


def test_swa_scheduler_per_batch_matches_function():
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD([{"params": [net.weight], "lr": 0.1},
                           {"params": [net.bias], "lr": 0.2}], momentum=0.9)
    sched = swa_scheduler(opt, swa_start=4, swa_lr=0.01, steps_per_epoch=5)
    for step in range(30):
        for group, lr0 in zip(opt.param_groups, (0.1, 0.2), strict=True):
            want = swa_learning_rate(step / 5, lr_init=lr0, swa_lr=0.01, swa_start=4)
            assert group["lr"] == pytest.approx(want, rel=1e-12)
        opt.step()
        sched.step()
    with pytest.raises(ValueError, match="steps_per_epoch"):
        swa_scheduler(opt, swa_start=4, swa_lr=0.01, steps_per_epoch=0)


def test_predict_uncertainty_matches_a_per_draw_reference() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))
    swag = SWAG(net, max_rank=5)
    for _ in range(8):  # spread-out iterates, so the draws disagree
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.3 * torch.randn_like(p))
        swag.collect(net)
    batches = [torch.randn(5, 3), torch.randn(7, 3)]
    u = swag.predict_uncertainty(batches, n_samples=6, scale=0.5, seed=3)
    torch.testing.assert_close(u["probs"], swag.predict(batches, n_samples=6, scale=0.5, seed=3))
    assert not any(t.requires_grad for t in u.values())
    gen = torch.Generator().manual_seed(3)  # the same draws, one network at a time
    work, per_draw = copy.deepcopy(net), []
    for _ in range(6):
        assign_params(work, swag.sample_vector(scale=0.5, cov=True, generator=gen))
        with torch.no_grad():
            per_draw.append(torch.cat([torch.softmax(work(b), -1) for b in batches]))
    stack = torch.stack(per_draw)
    ent = -(stack * stack.log()).sum(-1)
    mean = stack.mean(0)
    torch.testing.assert_close(u["aleatoric"], ent.mean(0))
    torch.testing.assert_close(u["total"], -(mean * mean.log()).sum(-1))
    torch.testing.assert_close(u["total"], u["aleatoric"] + u["epistemic"])
    assert bool((u["epistemic"] > 1e-4).all())  # the draws disagree
    swa = swag.predict_uncertainty(batches, n_samples=3, scale=0.0, seed=0)  # identical draws
    assert float(swa["epistemic"].abs().max()) < 1e-5
    with pytest.raises(ValueError, match="n_samples"):
        swag.predict_uncertainty(batches, n_samples=0)


def test_load_state_dict_rejects_bad_var_clamp_atomically():
    net = nn.Linear(3, 2)
    a = SWAG(net, max_rank=2)
    a.collect(net)
    b = SWAG(net, max_rank=2)
    for bad in ("oops", -1.0, float("nan"), True):
        state = a.state_dict()
        state["var_clamp"] = bad
        with pytest.raises(ValueError, match="var_clamp"):
            b.load_state_dict(state)
        assert b.n_collected == 0 and not b._mean.any() and b.var_clamp == a.var_clamp


def test_predict_with_untracked_batchnorm_needs_no_bn_loader():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False),
                        nn.Linear(4, 2))
    swag = SWAG(net, max_rank=2)
    swag.collect(net)
    x = torch.randn(8, 3)
    probs = swag.predict([x], n_samples=2, seed=0)
    assert probs.shape == (8, 2)
    assert torch.allclose(swag.predict([x], n_samples=2, seed=0, bn_loader=[x]), probs)
