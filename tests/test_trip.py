"""Tests for the tensor-ring induced prior against brute-force enumeration of its d^D components."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy import stats

from bdlkit.generative.trip import TRIP

torch.set_num_threads(1)


def _random_trip(D: int, d: int, m: int, seed: int = 0, dtype=torch.float64) -> TRIP:
    torch.manual_seed(seed)
    prior = TRIP(D, d, m).to(dtype)
    with torch.no_grad():
        prior.raw_means.normal_(0.0, 1.5)
        prior.log_stds.uniform_(math.log(0.3), math.log(1.5))
        prior.log_cores.normal_(0.0, 1.5)
    return prior


def _component_weights(prior: TRIP) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """All index tuples and their normalised ring weights Tr(prod_k Q_k[j_k]) / Z."""
    q = prior.cores.detach().double()
    D, d = prior.dim, prior.n_components
    combos = list(itertools.product(range(d), repeat=D))
    w = []
    for js in combos:
        mat = torch.eye(prior.rank, dtype=torch.float64)
        for k, j in enumerate(js):
            mat = mat @ q[k, j]
        w.append(torch.trace(mat))
    w = torch.stack(w)
    return combos, w / w.sum()


def _brute_log_prob(prior: TRIP, z: torch.Tensor, observed: torch.Tensor | None = None):
    """Brute-force mixture log density (marginal over unobserved dims), float64."""
    combos, w = _component_weights(prior)
    mu, sd = prior.means.detach().double(), prior.stds.detach().double()
    z = z.double()
    if observed is None:
        observed = ~torch.isnan(z)
    z = torch.where(observed, z, torch.zeros_like(z))
    out = []
    for js, wj in zip(combos, w, strict=True):
        lp = torch.zeros(z.shape[0], dtype=torch.float64)
        for k, j in enumerate(js):
            lk = torch.distributions.Normal(mu[k, j], sd[k, j]).log_prob(z[:, k])
            lp = lp + torch.where(observed[:, k], lk, torch.zeros_like(lk))
        out.append(lp + wj.log())
    return torch.logsumexp(torch.stack(out), 0)


@pytest.mark.parametrize("D,d,m", [(3, 3, 2), (4, 2, 3)])
def test_log_prob_matches_brute_force(D, d, m):
    prior = _random_trip(D, d, m)
    z = torch.randn(50, D, dtype=torch.float64) * 2
    expected = _brute_log_prob(prior, z)
    torch.testing.assert_close(prior.log_prob(z).detach(), expected, atol=1e-5, rtol=0)
    prior32 = prior.float()
    torch.testing.assert_close(
        prior32.log_prob(z.float()).detach().double(), expected, atol=1e-5, rtol=0
    )


def test_log_prob_gradient_matches_brute_force():
    prior = _random_trip(3, 2, 2)
    z = torch.randn(7, 3, dtype=torch.float64)
    prior.log_prob(z).sum().backward()
    grads = [p.grad.clone() for p in (prior.raw_means, prior.log_stds, prior.log_cores)]

    # brute force with autograd through the same parameters
    combos = list(itertools.product(range(2), repeat=3))
    q, mu, sd = prior.cores, prior.means, prior.stds
    ws, comps = [], []
    for js in combos:
        mat = torch.eye(2, dtype=torch.float64)
        lp = torch.zeros(7, dtype=torch.float64)
        for k, j in enumerate(js):
            mat = mat @ q[k, j]
            lp = lp + torch.distributions.Normal(mu[k, j], sd[k, j]).log_prob(z[:, k])
        ws.append(torch.trace(mat))
        comps.append(lp)
    w = torch.stack(ws)
    brute = torch.logsumexp(torch.stack(comps) + (w / w.sum()).log()[:, None], 0)
    bgrads = torch.autograd.grad(brute.sum(), [prior.raw_means, prior.log_stds, prior.log_cores])
    for g, b in zip(grads, bgrads, strict=True):
        torch.testing.assert_close(g, b, atol=1e-8, rtol=1e-6)


def test_row_blocks_give_the_same_values_and_gradients():
    """log_prob splits large batches into row blocks; results must not depend on it."""
    prior = _random_trip(4, 2, 3)
    z = torch.randn(23, 4, dtype=torch.float64)
    z[3, 1] = float("nan")
    expected = _brute_log_prob(prior, z)
    whole = prior.log_prob(z)
    whole.sum().backward()
    g_whole = [p.grad.clone() for p in prior.parameters()]
    prior.zero_grad()
    prior._chunk_rows = lambda: 5  # type: ignore[method-assign]  # 5 blocks, the last of 3 rows
    blocked = prior.log_prob(z)
    blocked.sum().backward()
    torch.testing.assert_close(blocked, whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(blocked.detach(), expected, atol=1e-8, rtol=0)
    for p, g in zip(prior.parameters(), g_whole, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-12, rtol=1e-10)
    assert TRIP(100, 10, 20)._chunk_rows() == 64


def test_integrates_to_one_on_2d_grid():
    prior = _random_trip(2, 3, 2, seed=3)
    lo = (prior.means - 8 * prior.stds).min().item()
    hi = (prior.means + 8 * prior.stds).max().item()
    xs = torch.linspace(lo, hi, 801, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, xs, indexing="ij")
    dens = prior.log_prob(torch.stack([gx, gy], -1)).detach().exp()
    assert dens.shape == (801, 801)
    total = torch.trapezoid(torch.trapezoid(dens, xs, dim=1), xs)
    assert abs(total.item() - 1.0) < 1e-4


def test_marginalisation_matches_brute_force_and_leaves_input_untouched():
    prior = _random_trip(4, 2, 3, seed=1)
    z = torch.randn(30, 4, dtype=torch.float64)
    z[:10, 1] = float("nan")
    z[10:20, [0, 3]] = float("nan")
    z[20:, 2] = float("nan")
    z_copy = z.clone()
    expected = _brute_log_prob(prior, z)
    got = prior.log_prob(z).detach()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(torch.isnan(z), torch.isnan(z_copy))
    assert torch.equal(torch.nan_to_num(z), torch.nan_to_num(z_copy))
    # an explicit mask gives the same result, and the values behind the mask are ignored
    filled = torch.nan_to_num(z, nan=123.0)
    torch.testing.assert_close(prior.log_prob(filled, observed=~torch.isnan(z)).detach(), got)
    # a one-dimensional marginal is the 1-D mixture sum_j P(j_k = j) N(z_k | mu_kj, sd_kj)
    combos, w = _component_weights(prior)
    pk = torch.zeros(2, dtype=torch.float64)
    for js, wj in zip(combos, w, strict=True):
        pk[js[2]] += wj
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    zz = torch.full((7, 4), float("nan"), dtype=torch.float64)
    zz[:, 2] = x
    mix = torch.distributions.Normal(prior.means[2].detach(), prior.stds[2].detach())
    one_d = torch.logsumexp(mix.log_prob(x[:, None]) + pk.log(), -1)
    torch.testing.assert_close(prior.log_prob(zz).detach(), one_d, atol=1e-10, rtol=0)


def test_sampled_component_frequencies_pass_chi_square():
    prior = _random_trip(3, 2, 2, seed=2)
    combos, w = _component_weights(prior)
    g = torch.Generator().manual_seed(0)
    n = 40000
    z, idx = prior.sample(n, generator=g, return_indices=True)
    assert z.shape == (n, 3) and idx.shape == (n, 3)
    code = (idx * torch.tensor([4, 2, 1])).sum(-1)
    counts = torch.bincount(code, minlength=8).double()
    order = [sum(j * b for j, b in zip(js, (4, 2, 1), strict=True)) for js in combos]
    expected = torch.zeros(8, dtype=torch.float64)
    expected[order] = w * n
    p = stats.chisquare(counts.numpy(), expected.numpy()).pvalue
    assert p > 1e-3, p
    # given its index, each coordinate is N(mu, sd): check standardised residuals
    mu = torch.gather(prior.means.detach().expand(n, -1, -1), 2, idx[:, :, None]).squeeze(-1)
    sd = torch.gather(prior.stds.detach().expand(n, -1, -1), 2, idx[:, :, None]).squeeze(-1)
    r = ((z - mu) / sd).flatten()
    assert abs(r.mean().item()) < 0.02 and abs(r.std().item() - 1) < 0.02


def test_conditional_samples_keep_fixed_dims_and_follow_posterior():
    prior = _random_trip(3, 2, 2, seed=4)
    combos, w = _component_weights(prior)
    cond = torch.tensor([0.7, float("nan"), float("nan")], dtype=torch.float64)
    cond_copy = cond.clone()
    n = 30000
    g = torch.Generator().manual_seed(1)
    z, idx = prior.sample(n, condition=cond, generator=g, return_indices=True)
    assert torch.all(z[:, 0] == 0.7)
    assert torch.isfinite(z).all()
    assert torch.equal(torch.isnan(cond), torch.isnan(cond_copy))
    # exact posterior over (j_2, j_3) given z_1 = 0.7
    mu, sd = prior.means.detach(), prior.stds.detach()
    post = torch.zeros(2, 2, dtype=torch.float64)
    for js, wj in zip(combos, w, strict=True):
        post[js[1], js[2]] += wj * torch.distributions.Normal(mu[0, js[0]], sd[0, js[0]]).log_prob(
            torch.tensor(0.7, dtype=torch.float64)
        ).exp()
    post = post.flatten() / post.sum()
    counts = torch.bincount(idx[:, 1] * 2 + idx[:, 2], minlength=4).double()
    assert stats.chisquare(counts.numpy(), (post * n).numpy()).pvalue > 1e-3
    # per-row conditions: each row keeps its own observed values
    rows = prior.sample(5, generator=g).clone()
    keep = rows.clone()
    rows[:, 1:] = float("nan")
    out = prior.sample(5, condition=rows, generator=g)
    assert torch.equal(out[:, 0], keep[:, 0])
    # a fully observed condition is returned unchanged
    assert torch.equal(prior.sample(5, condition=keep), keep)


def test_sampling_is_reproducible_with_generator():
    prior = _random_trip(5, 3, 4, seed=5)
    a = prior.sample(100, generator=torch.Generator().manual_seed(7))
    b = prior.sample(100, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_float32_safe_at_large_dimension():
    torch.manual_seed(0)
    prior = TRIP(128, 10, 40)
    with torch.no_grad():
        prior.log_cores.normal_(0.0, 2.0)
    z = prior.sample(64)
    assert torch.isfinite(z).all()
    z = torch.cat([z, 3 * torch.randn(16, 128)])
    lp32 = prior.log_prob(z)
    assert torch.isfinite(lp32).all()
    lp32.sum().backward()
    for p in prior.parameters():
        assert torch.isfinite(p.grad).all()
    lp64 = prior.double().log_prob(z.double()).detach()
    torch.testing.assert_close(lp32.detach().double(), lp64, rtol=1e-5, atol=1e-3)


def test_init_from_data_recovers_per_dimension_mixture():
    torch.manual_seed(0)
    n = 4000
    centres = torch.tensor([[-3.0, 0.0, 3.0], [-1.0, 1.0, 5.0]])
    which = torch.randint(0, 3, (n, 2))
    x = torch.gather(centres.expand(n, -1, -1), 2, which[:, :, None]).squeeze(-1)
    x = x + 0.3 * torch.randn(n, 2)
    prior = TRIP(2, 3, 4)
    before = prior.log_prob(x).mean().item()
    prior.init_from_data(x)
    after = prior.log_prob(x).mean().item()
    assert after > before
    fitted = prior.means.detach().sort(-1).values
    torch.testing.assert_close(fitted, centres, atol=0.05, rtol=0)
    torch.testing.assert_close(prior.stds.detach(), torch.full((2, 3), 0.3), atol=0.03, rtol=0)


def test_bad_inputs_raise_clear_errors():
    for kwargs, exc, name in [
        (dict(dim=0, n_components=2, rank=2), ValueError, "dim"),
        (dict(dim=3, n_components=-1, rank=2), ValueError, "n_components"),
        (dict(dim=3, n_components=2, rank=0), ValueError, "rank"),
        (dict(dim=3.0, n_components=2, rank=2), TypeError, "dim"),
    ]:
        with pytest.raises(exc, match=name):
            TRIP(**kwargs)
    prior = TRIP(3, 2, 2)
    with pytest.raises(ValueError, match="z must have shape"):
        prior.log_prob(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="every dimension is missing"):
        prior.log_prob(torch.tensor([[0.0, 1.0, 2.0], [float("nan")] * 3]))
    with pytest.raises(ValueError, match="infinite"):
        prior.log_prob(torch.tensor([[0.0, float("inf"), 2.0]]))
    with pytest.raises(TypeError, match="floating-point"):
        prior.log_prob(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        prior.log_prob([[0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="observed"):
        prior.log_prob(torch.zeros(2, 3), observed=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="n must be positive"):
        prior.sample(0)
    with pytest.raises(ValueError, match="condition must have shape"):
        prior.sample(4, condition=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="z must be finite"):
        prior.init_from_data(torch.tensor([[0.0, 1.0, float("nan")]] * 4))
    with pytest.raises(ValueError, match="at least 2 rows"):
        prior.init_from_data(torch.zeros(1, 3))
    state = {k: v.clone() for k, v in prior.state_dict().items()}
    with pytest.raises(ValueError):
        prior.init_from_data(torch.zeros(5, 4))
    for k, v in prior.state_dict().items():
        assert torch.equal(v, state[k])
    with torch.no_grad():
        prior.log_cores[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="log_cores contains non-finite"):
        prior.log_prob(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="non-finite"):
        prior.sample(3)


def test_batch_shapes_and_empty_batch():
    prior = _random_trip(3, 2, 2)
    z = torch.randn(2, 5, 3, dtype=torch.float64)
    lp = prior.log_prob(z)
    assert lp.shape == (2, 5)
    torch.testing.assert_close(lp.reshape(-1), prior.log_prob(z.reshape(-1, 3)))
    assert prior.log_prob(torch.zeros(0, 3, dtype=torch.float64)).shape == (0,)
    assert prior.log_prob(torch.zeros(3, dtype=torch.float64)).shape == ()


def test_cluster_init_captures_correlated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[-3.0, -3.0], [0.0, 3.0], [3.0, 0.0]])
    n = 3000
    which = torch.randint(0, 3, (n,))
    x = centres[which] + 0.4 * torch.randn(n, 2)
    true = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.ones(3)),
        torch.distributions.Independent(torch.distributions.Normal(centres, 0.4), 1),
    ).log_prob(x).mean()
    g = torch.Generator().manual_seed(0)
    clustered = TRIP(2, 3, 3).init_from_data(x, generator=g).log_prob(x).mean()
    product = TRIP(2, 3, 3).init_from_data(x, cluster_init=False).log_prob(x).mean()
    # the product of 1-D marginals puts mass on the 6 empty grid cells: ~log(3) nats worse
    assert product < true - 0.8
    assert abs(clustered.item() - true.item()) < 0.05


def test_float32_far_point_gives_minus_inf_not_nan():
    prior = TRIP(3, 2, 2)
    out = prior.log_prob(torch.tensor([[1e20, 0.0, 0.0], [0.1, 0.0, 0.0]]))
    assert out[0] == -float("inf") and torch.isfinite(out[1])
    with torch.no_grad():
        prior.log_stds.fill_(-46.0)  # stds far below float32's resolution of z
    assert not torch.isnan(prior.log_prob(torch.tensor([[1.0, 0.0, 0.0]]))).any()
    with pytest.raises(ValueError, match="zero density"):
        prior.sample(4, condition=torch.tensor([1e20, float("nan"), float("nan")]))


def test_underflowing_ring_raises_in_float32_and_works_in_float64():
    prior = TRIP(2, 1, 2)
    with torch.no_grad():
        prior.log_cores[0, 0] = torch.tensor([[0.0, 110.0], [-110.0, -110.0]])
        prior.log_cores[1, 0] = torch.tensor([[0.0, -110.0], [-110.0, 0.0]])
    with pytest.raises(ValueError, match="normaliser"):
        prior.log_prob(torch.zeros(1, 2))
    assert torch.isfinite(prior.double().log_prob(torch.zeros(1, 2, dtype=torch.float64)))


def test_single_component_starts_at_zero_and_init_needs_two_rows():
    assert torch.equal(TRIP(2, 1, 1).means, torch.zeros(2, 1))
    with pytest.raises(ValueError, match="at least 2 rows"):
        TRIP(2, 1, 1).init_from_data(torch.randn(1, 2))
    with pytest.raises(ValueError, match="min_std"):
        TRIP(2, 3, 2).init_from_data(torch.randn(50, 2), min_std=float("inf"))
