"""Tests for bdlkit.generative.gan: shapes, training loop contract, prior hook, REINFORCE."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bdlkit.generative.gan import (
    MLPDiscriminator,
    MLPGenerator,
    ReinforcePriorStep,
    StandardNormalPrior,
    generate,
    grid_gaussians,
    grid_means,
    mnist_gan,
    toy_gan,
    train_gan,
)

torch.set_num_threads(1)


def test_shapes_and_ranges() -> None:
    G, D = mnist_gan(latent_dim=12)
    x = G(torch.randn(5, 12))
    assert x.shape == (5, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    assert D(x).shape == (5,)
    assert MLPGenerator(3, 4, out_activation="tanh")(torch.randn(2, 3)).abs().max() <= 1
    with pytest.raises(ValueError, match="z must have shape"):
        G(torch.randn(5, 11))
    with pytest.raises(ValueError, match="x must have shape"):
        D(torch.rand(5, 784))
    with pytest.raises(ValueError, match="latent_dim"):
        MLPGenerator(0, (2,))
    with pytest.raises(ValueError, match="out_activation"):
        MLPGenerator(2, (2,), out_activation="relu")
    with pytest.raises(ValueError, match="in_shape"):
        MLPDiscriminator(())


def test_grid_gaussians_statistics() -> None:
    m = grid_means(5, 2.0)
    assert m.shape == (25, 2)
    assert set(m[:, 0].tolist()) == {-4.0, -2.0, 0.0, 2.0, 4.0}
    g = torch.Generator().manual_seed(0)
    x = grid_gaussians(50000, std=0.05, generator=g)
    d = torch.cdist(x, m)
    idx = d.argmin(1)
    counts = torch.bincount(idx, minlength=25).float()
    assert (counts / counts.sum() - 1 / 25).abs().max() < 0.01
    resid = x - m[idx]
    assert abs(float(resid.std()) - 0.05) < 0.002


def test_train_gan_history_hook_and_determinism() -> None:
    calls: list[tuple[torch.Size, torch.Size]] = []
    seen: list[torch.Tensor] = []

    def hook(z: torch.Tensor, score: torch.Tensor) -> None:
        assert not z.requires_grad and not score.requires_grad
        calls.append((z.shape, score.shape))
        seen.append(score)

    def run() -> tuple[MLPGenerator, dict]:
        torch.manual_seed(0)
        G, D = toy_gan(latent_dim=3)
        h = train_gan(G, D, grid_gaussians, steps=7, batch_size=16, prior_step=hook,
                      log_every=3)
        return G, h

    G1, h = run()
    assert h["step"] == [3, 6, 7]
    assert set(h) == {"step", "d_loss", "g_loss", "d_real", "d_fake"}
    assert calls[0] == (torch.Size([16, 3]), torch.Size([16]))
    assert len(calls) == 7
    G2, _ = run()
    for a, b in zip(G1.parameters(), G2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not G1.training


def test_train_gan_epochs_with_loader_and_wgan() -> None:
    torch.manual_seed(1)
    ds = TensorDataset(grid_gaussians(64), torch.zeros(64))
    ld = DataLoader(ds, batch_size=16, shuffle=True)
    G, D = toy_gan()
    h = train_gan(G, D, ld, epochs=2, log_every=1)
    assert h["step"][-1] == 8  # 2 epochs x 4 batches, n_critic=1
    h = train_gan(G, D, ld, epochs=2, loss="wgan-gp", n_critic=2, log_every=1)
    assert h["step"][-1] == 4
    assert all(torch.isfinite(torch.tensor(h["d_loss"])))


def test_custom_prior_is_used() -> None:
    class ShiftPrior:
        def __init__(self) -> None:
            self.n_calls = 0

        def sample(self, n: int) -> torch.Tensor:
            self.n_calls += 1
            return torch.randn(n, 2) + 10

    prior = ShiftPrior()
    G, D = toy_gan()
    train_gan(G, D, grid_gaussians, steps=3, batch_size=8, prior=prior)
    assert prior.n_calls == 6  # one for D, one for G per step
    torch.manual_seed(2)
    x = generate(G, 5, prior=prior)
    torch.manual_seed(2)
    z = torch.randn(5, 2) + 10
    with torch.no_grad():
        assert torch.allclose(x, G(z))


def test_reinforce_prior_step_climbs_the_score() -> None:
    torch.manual_seed(3)

    class GaussPrior(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mu = nn.Parameter(torch.zeros(2))

        def sample(self, n: int) -> torch.Tensor:
            return self.mu.detach() + torch.randn(n, 2)

        def log_prob(self, z: torch.Tensor) -> torch.Tensor:
            return -0.5 * (z - self.mu).pow(2).sum(1)

    prior = GaussPrior()
    step = ReinforcePriorStep(prior, torch.optim.Adam(prior.parameters(), lr=0.05))
    target = torch.tensor([2.0, -1.0])
    for _ in range(400):
        z = prior.sample(256)
        step(z, -(z - target).pow(2).sum(1))  # score maximal at target
    assert torch.allclose(prior.mu.detach(), target, atol=0.2)
    with pytest.raises(TypeError, match="log_prob"):
        ReinforcePriorStep(object(), torch.optim.SGD(prior.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="score"):
        step(torch.zeros(3, 2), torch.zeros(4))


def test_train_gan_bad_input() -> None:
    G, D = toy_gan()
    with pytest.raises(ValueError, match="exactly one"):
        train_gan(G, D, grid_gaussians, steps=1, epochs=1, batch_size=4)
    with pytest.raises(ValueError, match="exactly one"):
        train_gan(G, D, grid_gaussians, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        train_gan(G, D, grid_gaussians, steps=1)
    with pytest.raises(ValueError, match="loss"):
        train_gan(G, D, grid_gaussians, steps=1, batch_size=4, loss="hinge")
    with pytest.raises(ValueError, match="steps"):
        train_gan(G, D, grid_gaussians, steps=0, batch_size=4)
    with pytest.raises(TypeError, match="prior"):
        train_gan(G, D, grid_gaussians, steps=1, batch_size=4, prior=object())
    with pytest.raises(ValueError, match="latent_dim"):
        train_gan(nn.Linear(2, 2), D, grid_gaussians, steps=1, batch_size=4)
    with pytest.raises(TypeError, match="generator"):
        train_gan(lambda z: z, D, grid_gaussians, steps=1, batch_size=4)  # type: ignore
    assert StandardNormalPrior(4).log_prob(torch.zeros(1, 4)).shape == (1,)


@pytest.mark.slow
def test_toy_gan_learns_rough_grid() -> None:
    # An untrained generator collapses near the central mode; training must spread it over
    # the grid: (almost) every mode gets samples and the spread matches the target's.
    torch.manual_seed(0)
    G, D = toy_gan()
    m = grid_means()

    def modes_and_spread(x: torch.Tensor) -> tuple[int, float]:
        counts = torch.bincount(torch.cdist(x, m).argmin(1), minlength=len(m))
        return int((counts >= 20).sum()), float(x.std(0).mean())

    modes_before, spread_before = modes_and_spread(generate(G, 2000))
    train_gan(G, D, grid_gaussians, steps=1500, batch_size=256)
    modes_after, spread_after = modes_and_spread(generate(G, 2000))
    target_spread = float(grid_gaussians(2000).std(0).mean())
    assert modes_before <= 3 and spread_before < 0.5
    assert modes_after >= 20
    assert abs(spread_after - target_spread) < 0.25 * target_spread
