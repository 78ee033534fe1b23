"""Tests for the MNIST VAE with pluggable priors (ELBO, IW-NLL, priors, training loop)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bdlkit.generative.trip import TRIP
from bdlkit.generative.vae import (
    VAE,
    GaussianMixturePrior,
    StandardNormalPrior,
    binarize,
    evaluate_vae,
    fit_vae,
)

torch.set_num_threads(1)


def _tiny_vae(prior: nn.Module | None = None, latent_dim: int = 1, data_dim: int = 4) -> VAE:
    torch.manual_seed(0)
    vae = VAE(latent_dim, prior, hidden=(8,), data_dim=data_dim).double()
    with torch.no_grad():
        for p in vae.parameters():
            p.mul_(2.0)
    return vae


def _exact_log_px(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x) for a 1-D latent by quadrature of p(z) p(x|z) on a fine grid."""
    zs = torch.linspace(-12, 12, 4001, dtype=torch.float64)[:, None]
    log_pz = vae.prior.log_prob(zs).detach()
    logits = vae.decode(zs).detach()  # (G, data_dim)
    log_px_z = -torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, None, :].expand(-1, x.shape[0], -1), x.expand(zs.shape[0], -1, -1),
        reduction="none").sum(-1)  # (G, B)
    dz = zs[1, 0] - zs[0, 0]
    return torch.logsumexp(log_pz[:, None] + log_px_z, 0) + dz.log()


@pytest.mark.parametrize("prior_kind", ["normal", "gmm"])
def test_iw_nll_converges_to_exact_marginal_likelihood(prior_kind):
    torch.manual_seed(1)
    prior = None if prior_kind == "normal" else GaussianMixturePrior(1, 3).double()
    vae = _tiny_vae(prior)
    x = binarize(torch.rand(6, 4, dtype=torch.float64))
    exact = -_exact_log_px(vae, x)
    g = torch.Generator().manual_seed(0)
    est = vae.iw_nll(x, k=5000, generator=g)
    torch.testing.assert_close(est, exact, atol=0.05, rtol=0)
    # the single-sample ELBO is a lower bound on log p(x): -ELBO >= NLL on average
    torch.manual_seed(2)
    neg_elbo = -torch.stack([vae.elbo(x) for _ in range(1000)]).mean(0).detach()
    assert torch.all(neg_elbo >= exact - 0.05)
    # the k=2 bound lies in between on average: NLL <= E[IW-NLL_2] <= -ELBO
    k2 = vae.iw_nll(x.repeat(2000, 1), k=2, generator=g).reshape(2000, -1).mean(0)
    assert torch.all(k2 >= exact - 0.05) and torch.all(k2 <= neg_elbo + 0.05)


def test_iw_nll_chunking_does_not_change_result():
    # B * D = 16: torch draws normals in blocks of 16, so the chunked draws reproduce the
    # unchunked stream exactly and the two estimates must agree to rounding
    vae = _tiny_vae(latent_dim=2, data_dim=5)
    x = binarize(torch.rand(8, 5, dtype=torch.float64))
    a = vae.iw_nll(x, k=100, generator=torch.Generator().manual_seed(3), max_points=8 * 9)
    b = vae.iw_nll(x, k=100, generator=torch.Generator().manual_seed(3), max_points=1 << 20)
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_analytic_and_monte_carlo_kl_agree_in_expectation():
    vae = _tiny_vae(latent_dim=3, data_dim=6)
    x = binarize(torch.rand(4, 6, dtype=torch.float64))
    torch.manual_seed(0)
    analytic = torch.stack([vae.elbo(x, analytic_kl=True) for _ in range(1500)]).mean(0)
    torch.manual_seed(0)
    mc = torch.stack([vae.elbo(x, analytic_kl=False) for _ in range(1500)]).mean(0)
    torch.testing.assert_close(analytic.detach(), mc.detach(), atol=0.1, rtol=0)


def test_priors_match_torch_distributions():
    z = torch.randn(10, 3)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(StandardNormalPrior(3).log_prob(z), ref)
    gmm = GaussianMixturePrior(3, 4)
    with torch.no_grad():
        gmm.logits.normal_()
        gmm.log_stds.normal_(0, 0.3)
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=gmm.logits),
        torch.distributions.Independent(torch.distributions.Normal(gmm.means, gmm.log_stds.exp()),
                                        1),
    ).log_prob(z)
    torch.testing.assert_close(gmm.log_prob(z), ref, rtol=1e-5, atol=1e-5)
    s = gmm.sample(20000, generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(gmm.logits, -1).detach()
    torch.testing.assert_close(s.mean(0), probs @ gmm.means.detach(), atol=0.05, rtol=0)
    data = torch.randn(500, 3) * 2 + 1
    gmm.init_from_data(data)
    assert all(any(torch.equal(m, row) for row in data) for m in gmm.means.detach())


def test_fit_vae_improves_elbo_and_is_deterministic():
    torch.manual_seed(0)
    protos = (torch.rand(4, 36) > 0.5).float()
    x = protos[torch.randint(0, 4, (256,))] * 0.9 + 0.05

    def train(prior):
        torch.manual_seed(0)
        vae = VAE(2, prior, hidden=(32,), data_dim=36)
        hist = fit_vae(vae, x, epochs=4, lr=3e-3, batch_size=32, seed=5, prior_init_epoch=1)
        return vae, hist

    vae, hist = train(None)
    assert hist["train_elbo"][-1] > hist["train_elbo"][0] + 2
    vae2, hist2 = train(None)
    assert hist["train_elbo"] == hist2["train_elbo"]
    for p, q in zip(vae.parameters(), vae2.parameters(), strict=True):
        assert torch.equal(p, q)
    # with a TRIP prior, the prior is re-initialised from posterior samples and then trained
    trip = TRIP(2, 3, 2)
    before = trip.raw_means.detach().clone()
    vae3, hist3 = train(trip)
    assert all(math.isfinite(v) for v in hist3["train_elbo"])
    assert not torch.equal(before, trip.raw_means.detach())
    res = evaluate_vae(vae3, x[:16], k=50, batch_size=8)
    assert res["iw_nll"] <= -res["elbo"] + 0.5
    img = vae3.sample(3)
    assert img.shape == (3, 1, 6, 6) and torch.all((img >= 0) & (img <= 1))


def test_mnist_shapes_and_chunked_iw_with_trip_prior():
    vae = VAE(4, TRIP(4, 3, 2), hidden=(16,))
    x = binarize(torch.rand(3, 1, 28, 28))
    assert vae.elbo(x).shape == (3,)
    assert vae.iw_nll(x, k=50, max_points=10).shape == (3,)
    assert vae.sample(2).shape == (2, 1, 28, 28)


def test_bad_inputs():
    with pytest.raises(ValueError, match="latent_dim"):
        VAE(0)
    with pytest.raises(ValueError, match="prior.dim"):
        VAE(4, StandardNormalPrior(3))
    with pytest.raises(TypeError, match="log_prob"):
        VAE(4, nn.Linear(2, 2))
    vae = VAE(4, hidden=(8,))
    with pytest.raises(ValueError, match="784 features"):
        vae.elbo(torch.rand(2, 100))
    with pytest.raises(TypeError, match="floating-point"):
        vae.elbo(torch.ones(2, 784, dtype=torch.long))
    with pytest.raises(ValueError, match="k must be positive"):
        vae.iw_nll(torch.rand(2, 784), k=0)
    with pytest.raises(ValueError, match="analytic_kl"):
        VAE(4, GaussianMixturePrior(4, 2), hidden=(8,)).elbo(torch.rand(2, 784), analytic_kl=True)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        binarize(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="epochs"):
        fit_vae(vae, torch.rand(4, 784), epochs=0)
    with pytest.raises(ValueError, match="z must have shape"):
        GaussianMixturePrior(3, 2).log_prob(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="n_components"):
        GaussianMixturePrior(3, 0)


def test_fit_vae_cosine_schedule_shrinks_the_last_steps():
    torch.manual_seed(0)
    protos = (torch.rand(4, 36) > 0.5).float()
    x = protos[torch.randint(0, 4, (256,))] * 0.9 + 0.05

    def epoch_moves(schedule: str) -> list[float]:
        torch.manual_seed(0)
        vae = VAE(2, TRIP(2, 3, 2), hidden=(32,), data_dim=36)
        snaps = [torch.cat([p.detach().flatten().clone() for p in vae.parameters()])]

        def log(_: str) -> None:
            snaps.append(torch.cat([p.detach().flatten().clone() for p in vae.parameters()]))

        fit_vae(vae, x, epochs=4, lr=3e-3, prior_lr=3e-2, batch_size=32, seed=5,
                prior_init_epoch=None, log=log, lr_schedule=schedule)
        return [float((b - a).norm()) for a, b in zip(snaps, snaps[1:], strict=False)]

    const, cos = epoch_moves("constant"), epoch_moves("cosine")
    assert const[0] == pytest.approx(cos[0], rel=0.1)  # nearly full rate in the first epoch
    # the last epoch runs at <= 15 % of the rate (cosine over its last quarter), Adam steps scale
    assert cos[-1] < 0.25 * const[-1]
    with pytest.raises(ValueError, match="lr_schedule"):
        fit_vae(VAE(2, hidden=(8,), data_dim=36), x, epochs=1, lr_schedule="linear")


def test_vae_sample_follows_dtype_and_generator():
    for prior in (StandardNormalPrior(4), GaussianMixturePrior(4, 3), TRIP(4, 3, 2)):
        vae = VAE(4, prior, hidden=(8,), data_dim=16)
        a = vae.sample(3, generator=torch.Generator().manual_seed(0))
        b = vae.sample(3, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a, b)
    assert VAE(4, hidden=(8,), data_dim=16).double().sample(2).dtype == torch.float64


def test_mixture_prior_refuses_non_finite_parameters_and_single_row_init():
    g = GaussianMixturePrior(2, 2)
    with pytest.raises(ValueError, match="N >= 2"):
        GaussianMixturePrior(1, 1).init_from_data(torch.randn(1, 1))
    with torch.no_grad():
        g.means[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        g.log_prob(torch.zeros(1, 2))


def test_binarize_refuses_nan():
    with pytest.raises(ValueError, match="no NaN"):
        binarize(torch.tensor([0.5, float("nan")]))
