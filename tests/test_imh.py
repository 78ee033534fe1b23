"""Tests for bdlkit.generative.imh: exactness on finite state spaces, closed-form discriminator
optima, calibration, DRS, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bdlkit.generative.imh import (
    ImplicitMH,
    PairDiscriminator,
    _pav,
    calibrate_discriminator,
    discriminator_rejection_sampling,
    fit_calibration,
    pcn_proposal,
    random_walk_proposal,
    train_discriminator,
    train_pair_discriminator,
)

torch.set_num_threads(1)

K = 8


def _dists(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(K, generator=g, dtype=torch.float64) + 0.2
    p /= p.sum()
    q = torch.rand(K, generator=g, dtype=torch.float64) + 0.2
    q /= q.sum()
    Q = torch.rand(K, K, generator=g, dtype=torch.float64) ** 2 + 0.05  # asymmetric kernel
    Q /= Q.sum(1, keepdim=True)
    return p, q, Q


def _tv(samples: torch.Tensor, p: torch.Tensor) -> float:
    emp = torch.bincount(samples.reshape(-1), minlength=K).double()
    return 0.5 * float((emp / emp.sum() - p).abs().sum())


def _pooled_last(res, k: int = 5) -> torch.Tensor:
    return res.samples[-k:].reshape(-1)


def test_independent_exact_ratio_matches_target() -> None:
    torch.manual_seed(0)
    p, q, _ = _dists()
    disc = lambda x: (p[x] / q[x]).log()  # noqa: E731
    prop = lambda n: torch.multinomial(q, n, replacement=True)  # noqa: E731
    n_chains = 20000
    x0 = prop(n_chains)
    assert _tv(x0, p) > 0.1  # the raw proposal is far from the target
    res = ImplicitMH(disc, prop).run(x0, n_steps=60)
    assert res.samples.shape == (61, n_chains)
    assert _tv(res.samples[-1], p) < 0.02
    assert _tv(_pooled_last(res), p) < 0.02
    # the MH acceptance rate of the independent sampler: E_{x~p, y~q} min(1, w(y)/w(x))
    w = p / q
    expected = float((p[:, None] * q[None, :] * torch.clamp(w[None, :] / w[:, None], max=1)).sum())
    assert abs(float(res.acceptance.mean()) - expected) < 0.02
    assert int(res.n_nonfinite.sum()) == 0


@pytest.mark.parametrize("kernel", ["asymmetric", "random_walk"])
def test_markov_exact_ratio_matches_target(kernel: str) -> None:
    torch.manual_seed(1)
    p, _, Q = _dists(1)
    if kernel == "random_walk":  # symmetric +-1 cyclic walk
        Q = torch.zeros(K, K, dtype=torch.float64)
        for i in range(K):
            Q[i, (i + 1) % K] = Q[i, (i - 1) % K] = 0.5
    f = lambda x, y: (p[x] * Q[x, y]).log()  # noqa: E731  # d(x,y) is then exact
    prop = lambda x: torch.multinomial(Q[x], 1).squeeze(1)  # noqa: E731
    x0 = torch.zeros(20000, dtype=torch.long)  # all chains start in one state
    res = ImplicitMH(f, prop, markov=True).run(x0, n_steps=100, thin=10)
    assert res.samples.shape == (11, 20000)
    assert _tv(res.samples[-1], p) < 0.02
    # without the accept/reject step the proposal's own stationary law is different
    if kernel == "asymmetric":
        evals, evecs = torch.linalg.eig(Q.T)
        stat = evecs[:, torch.argmax(evals.real)].real
        stat = stat / stat.sum()
        assert 0.5 * float((stat - p).abs().sum()) > 0.05


def test_perfect_proposal_accepts_everything() -> None:
    p, _, _ = _dists(2)
    prop = lambda n: torch.multinomial(p, n, replacement=True)  # noqa: E731
    disc = lambda x: (p[x] / p[x]).log()  # noqa: E731
    res = ImplicitMH(disc, prop).run(prop(500), n_steps=20)
    assert torch.all(res.acceptance == 1.0)
    # Markov: independent draws from p used as a Markov kernel, exact pair function
    f = lambda x, y: (p[x] * p[y]).log()  # noqa: E731
    res = ImplicitMH(f, lambda x: prop(len(x)), markov=True).run(prop(500), n_steps=20)
    assert torch.all(res.acceptance == 1.0)


def test_perfect_proposal_with_trained_discriminator_accepts_nearly_all() -> None:
    torch.manual_seed(3)
    data = torch.randn(4000, 2)
    D = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 1))
    hist = train_discriminator(
        D, data, lambda n: torch.randn(n, 2), steps=300, batch_size=256, lr=1e-3,
        val_real=torch.randn(2000, 2), val_fake=torch.randn(2000, 2), val_every=100,
    )
    assert abs(hist["val_loss"][-1] - math.log(2)) < 0.02
    res = ImplicitMH(lambda x: D(x).squeeze(1), lambda n: torch.randn(n, 2)).run(
        torch.randn(2000, 2), n_steps=20
    )
    assert float(res.acceptance.mean()) > 0.9


def test_train_discriminator_recovers_log_ratio() -> None:
    # p = N(0,1), q = N(1,1): log p/q = -x + 1/2
    torch.manual_seed(4)
    D = nn.Linear(1, 1)
    hist = train_discriminator(
        D, lambda n: torch.randn(n, 1), lambda n: torch.randn(n, 1) + 1, steps=1500,
        batch_size=512, lr=0.02, val_real=torch.randn(4000, 1),
        val_fake=torch.randn(4000, 1) + 1, val_every=250,
    )
    assert abs(D.weight.item() + 1.0) < 0.1
    assert abs(D.bias.item() - 0.5) < 0.1
    assert hist["val_loss"][-1] < math.log(2) - 0.1
    assert len(hist["val_acc"]) == len(hist["step"]) == 6


class _QuadPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 1, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, b = x[:, 0], y[:, 0]
        return self.lin(torch.stack([a * a, b * b, a, b, a * b], 1)).squeeze(1)


def test_train_pair_discriminator_recovers_closed_form() -> None:
    # p = N(0,1), asymmetric AR proposal y = x/2 + eps: log p(x)q(y|x) - log p(y)q(x|y)
    # = -(x^2 - y^2) / 8.
    torch.manual_seed(5)
    f = _QuadPair()
    prop = lambda x: 0.5 * x + torch.randn_like(x)  # noqa: E731
    hist = train_pair_discriminator(
        f, lambda n: torch.randn(n, 1), prop, steps=1500, batch_size=2048, lr=0.01,
        val_real=torch.randn(4000, 1), val_every=500,
    )
    w = f.lin.weight[0].detach()
    assert abs(float(w[0] - w[1]) + 0.125) < 0.02
    assert abs(float(w[2] - w[3])) < 0.03
    assert len(hist["val_loss"]) == 3
    assert hist["val_loss"][-1] < math.log(2)


def test_pair_discriminator_is_antisymmetric_and_validates() -> None:
    f = PairDiscriminator((2, 3), hidden=(8,))
    x, y = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    assert torch.allclose(f.pair_logit(x, y), -f.pair_logit(y, x))
    with pytest.raises(ValueError, match="shape"):
        f(x, torch.randn(4, 6))


def test_rw_and_pcn_proposals() -> None:
    torch.manual_seed(6)
    z = torch.randn(200000, 1)
    y = pcn_proposal(0.8)(z)
    assert abs(float(y.std()) - 1) < 0.01  # N(0, I) is preserved
    assert abs(float((y * z).mean()) - 0.8) < 0.01
    d = random_walk_proposal(0.3)(z) - z
    assert abs(float(d.std()) - 0.3) < 0.005
    with pytest.raises(ValueError, match="rho"):
        pcn_proposal(1.0)
    with pytest.raises(ValueError, match="scale"):
        random_walk_proposal(0.0)


def test_drs_exact_mode_matches_target() -> None:
    torch.manual_seed(7)
    p, q, _ = _dists(3)
    disc = lambda x: (p[x] / q[x]).log()  # noqa: E731
    prop = lambda n: torch.multinomial(q, n, replacement=True)  # noqa: E731
    M = float((p / q).log().max())
    r = discriminator_rejection_sampling(
        disc, prop, 30000, gamma=0.0, epsilon=0.0, max_log_ratio=M, batch_size=5000
    )
    assert r.samples.shape == (30000,)
    assert _tv(r.samples, p) < 0.02
    assert abs(r.acceptance_rate - math.exp(-M)) < 0.02  # 1/M acceptance of rejection sampling
    # M estimated from burn-in proposals
    r2 = discriminator_rejection_sampling(disc, prop, 20000, burn_in=2000, gamma=0.0,
                                          epsilon=0.0)
    assert _tv(r2.samples, p) < 0.02
    assert abs(r2.max_log_ratio - M) < 1e-6


def test_drs_dynamic_gamma_continuous() -> None:
    # p = N(0, 1), q = N(0, 2^2): log p/q = log 2 - 3 x^2 / 8
    torch.manual_seed(11)
    disc = lambda x: math.log(2) - 0.375 * x[:, 0] ** 2  # noqa: E731
    prop = lambda n: 2 * torch.randn(n, 1)  # noqa: E731
    r = discriminator_rejection_sampling(disc, prop, 20000, burn_in=5000)
    # gamma = 95th percentile of F filters harder than exact rejection sampling (rate 1/2),
    # concentrating mass where the ratio is high: std shrinks from q's 2 to at most p's 1
    assert 0.01 < r.acceptance_rate < 0.5
    assert 0.2 < float(r.samples.std()) < 1.05


def test_isotonic_pav_against_bruteforce() -> None:
    y = np.array([1.0, 3.0, 2.0, 2.0, 0.0, 5.0])
    w = np.ones(6)
    fit = _pav(y, w)
    assert np.all(np.diff(fit) >= 0)
    np.testing.assert_allclose(fit, [1.0, 1.75, 1.75, 1.75, 1.75, 5.0])
    # brute-force check on random data: PAV minimises the squared error among monotone fits
    rng = np.random.default_rng(0)
    y = rng.normal(size=7)
    fit = _pav(y, np.ones(7))
    for _ in range(2000):
        cand = np.sort(rng.normal(size=7))
        assert ((cand - y) ** 2).sum() >= ((fit - y) ** 2).sum() - 1e-12


def test_calibration_recovers_log_ratio() -> None:
    torch.manual_seed(8)
    # scores: real ~ N(2,1), fake ~ N(0,1) -> log p/q = 2 s - 2
    real, fake = torch.randn(20000) + 2, torch.randn(10000)
    cal = fit_calibration(real, fake, "logistic")  # unequal sizes: prior odds removed
    s = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    assert torch.allclose(cal(s), 2 * s - 2, atol=0.1)
    iso = fit_calibration(real, fake, "isotonic")
    out = iso(torch.linspace(-1, 3, 50))
    assert torch.all(out[1:] >= out[:-1])
    assert torch.allclose(iso(s[1:3]), 2 * s[1:3] - 2, atol=0.3)
    # isotonic calibration is invariant to monotone transforms of the raw score
    iso2 = fit_calibration(3 * real + 5, 3 * fake + 5, "isotonic")
    assert torch.allclose(iso2(3 * s + 5), iso(s), atol=1e-6)
    D = lambda x: 7.0 * x[:, 0]  # noqa: E731  # over-confident discriminator
    cD = calibrate_discriminator(D, real[:, None] / 7, fake[:, None] / 7, "logistic")
    assert torch.allclose(cD(s[:, None] / 7), 2 * s - 2, atol=0.1)
    with pytest.raises(ValueError, match="method"):
        fit_calibration(real, fake, "platt")
    with pytest.raises(ValueError, match="finite"):
        fit_calibration(torch.tensor([1.0, float("nan")]), fake)


def test_nonfinite_outputs_are_rejected_and_counted() -> None:
    torch.manual_seed(9)
    p, q, _ = _dists(4)

    def disc(x: torch.Tensor) -> torch.Tensor:
        s = (p[x] / q[x]).log()
        return torch.where(x == 3, torch.full_like(s, float("nan")), s)

    proposals: list[torch.Tensor] = []

    def prop(n: int) -> torch.Tensor:
        y = torch.multinomial(q, n, replacement=True)
        proposals.append(y)
        return y

    x0 = torch.zeros(3000, dtype=torch.long)
    res = ImplicitMH(disc, prop).run(x0, n_steps=30)
    assert not (res.samples == 3).any()  # never moved into the NaN state
    n_prop3 = (torch.stack(proposals) == 3).sum(0)
    assert torch.equal(res.n_nonfinite, n_prop3)
    assert int(res.n_nonfinite.sum()) > 0

    # Markov: inf pair outputs also rejected and counted
    f = lambda x, y: torch.where(y == 3, torch.tensor(math.inf), torch.zeros(len(x)))  # noqa
    res = ImplicitMH(f, lambda x: (x + 1) % K, markov=True).run(
        torch.zeros(10, dtype=torch.long), n_steps=10
    )
    assert int(res.samples.max()) == 2
    assert torch.all(res.n_nonfinite == 10 - 2)  # stuck at 2 after two moves; every try bad

    # a non-finite score at x0 lets the chain leave at its first finite proposal
    d0 = lambda x: torch.where(x == 0, torch.tensor(math.nan), torch.zeros(len(x)))  # noqa
    res = ImplicitMH(d0, lambda n: torch.ones(n, dtype=torch.long)).run(
        torch.zeros(5, dtype=torch.long), n_steps=3
    )
    assert torch.all(res.samples[1] == 1)
    assert torch.all(res.n_nonfinite == 1)


def test_bad_input_raises_clear_errors() -> None:
    disc = lambda x: torch.zeros(len(x))  # noqa: E731
    mh = ImplicitMH(disc, lambda n: torch.zeros(n, 3))
    x0 = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="shape"):
        mh.run(x0, n_steps=2)
    mh_m = ImplicitMH(lambda x, y: torch.zeros(len(x)), lambda x: x[:, :1], markov=True)
    with pytest.raises(ValueError, match="shape"):
        mh_m.run(x0, n_steps=2)
    ok = ImplicitMH(disc, lambda n: torch.zeros(n, 2))
    for bad in (0, -1):
        with pytest.raises(ValueError, match="n_steps"):
            ok.run(x0, n_steps=bad)
    for bad in (1.5, True):
        with pytest.raises(TypeError, match="n_steps"):
            ok.run(x0, n_steps=bad)
    with pytest.raises(ValueError, match="thin"):
        ok.run(x0, n_steps=2, thin=0)
    with pytest.raises(ValueError, match="keep"):
        ok.run(x0, n_steps=2, keep="first")
    with pytest.raises(ValueError, match="x0"):
        ok.run(torch.zeros(0, 2), n_steps=2)
    with pytest.raises(ValueError, match="one score per sample"):
        ImplicitMH(lambda x: torch.zeros(len(x), 2), lambda n: torch.zeros(n, 2)).run(x0, 2)
    with pytest.raises(TypeError, match="discriminator"):
        ImplicitMH(3, lambda n: n)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="proposal"):
        ImplicitMH(disc, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="markov"):
        ImplicitMH(disc, disc, markov=1)  # type: ignore[arg-type]
    # the caller's x0 is never modified
    x0c = x0.clone()
    ImplicitMH(disc, lambda n: torch.ones(n, 2)).run(x0, 3)
    assert torch.equal(x0, x0c)
    with pytest.raises(ValueError, match="steps"):
        train_discriminator(nn.Linear(1, 1), torch.zeros(4, 1), torch.zeros(4, 1), steps=0)
    with pytest.raises(ValueError, match="val_real"):
        train_discriminator(nn.Linear(1, 1), torch.zeros(4, 1), torch.zeros(4, 1),
                            val_real=torch.zeros(3, 1))
    with pytest.raises(TypeError, match="nn.Module"):
        train_discriminator(disc, torch.zeros(4, 1), torch.zeros(4, 1))  # type: ignore
    with pytest.raises(ValueError, match="shape"):
        train_pair_discriminator(PairDiscriminator((2,)), torch.zeros(8, 2),
                                 lambda x: x[:, :1], steps=1)
    with pytest.raises(ValueError, match="gamma_quantile"):
        discriminator_rejection_sampling(disc, lambda n: torch.zeros(n, 1), 5, gamma_quantile=1)


def test_thinning_keep_last_and_determinism() -> None:
    p, q, _ = _dists(5)
    disc = lambda x: (p[x] / q[x]).log()  # noqa: E731

    def run(keep: str, thin: int = 1):
        torch.manual_seed(10)
        prop = lambda n: torch.multinomial(q, n, replacement=True)  # noqa: E731
        return ImplicitMH(disc, prop).run(torch.zeros(100, dtype=torch.long), 9, thin, keep)

    a, b, c = run("all"), run("all", thin=3), run("last")
    assert a.samples.shape == (10, 100) and b.samples.shape == (4, 100)
    assert c.samples.shape == (1, 100)
    assert torch.equal(a.samples[::3], b.samples)
    assert torch.equal(a.final, c.final)
    assert torch.equal(a.acceptance, c.acceptance)


def test_discriminator_loss_matches_bce_and_rejects_bad_input() -> None:
    from bdlkit.generative.imh import discriminator_loss

    real, fake = torch.randn(7, 2), torch.randn(5, 2)
    disc = torch.nn.Linear(2, 1)
    loss, acc = discriminator_loss(disc, real, fake, batch_size=3)
    logits = torch.cat([disc(real), disc(fake)]).squeeze(1).detach()
    labels = torch.cat([torch.ones(7), torch.zeros(5)])
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    assert abs(loss - float(ref)) < 1e-6
    assert acc == float(((logits > 0).float() == labels).float().mean())
    with pytest.raises(ValueError, match="batch_size"):
        discriminator_loss(disc, real, fake, batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        discriminator_loss(disc, real[:0], fake[:0])
