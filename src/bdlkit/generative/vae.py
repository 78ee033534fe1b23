"""A small MLP VAE for binarised MNIST with pluggable priors.

Priors share a tiny interface: ``log_prob(z) -> (B,)`` and ``sample(n) -> (n, D)``; a prior may
also offer ``init_from_data(z)``, which :func:`fit_vae` calls once on posterior samples after a
warm-up (the TRIP paper's recipe). Provided priors: :class:`StandardNormalPrior`,
:class:`GaussianMixturePrior` (learnable diagonal mixture) and :class:`bdlkit.generative.trip.TRIP`.

Evaluation: :meth:`VAE.elbo` and :meth:`VAE.iw_nll`, an importance-weighted estimate of
``-log p(x)`` with ``k`` posterior samples processed in chunks so memory stays bounded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bdlkit._checks import check_positive_int

__all__ = [
    "StandardNormalPrior",
    "GaussianMixturePrior",
    "VAE",
    "binarize",
    "fit_vae",
    "evaluate_vae",
]

_LOG_2PI = math.log(2.0 * math.pi)




def _check_latent(z: torch.Tensor, dim: int) -> None:
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise TypeError("z must be a floating-point torch.Tensor")
    if z.dim() < 1 or z.shape[-1] != dim:
        raise ValueError(f"z must have shape (..., {dim}), got {tuple(z.shape)}")


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastic binarisation: each pixel is 1 with probability equal to its intensity.

    Example:
        >>> binarize(torch.tensor([0.0, 1.0])).tolist()
        [0.0, 1.0]
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point torch.Tensor")
    if not bool(((x >= 0) & (x <= 1)).all()):  # NaN fails this test too
        raise ValueError("x must lie in [0, 1] (no NaN)")
    device = x.device if generator is None else generator.device
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
    return (u < x).to(x.dtype)


class StandardNormalPrior(nn.Module):
    """``N(0, I)`` prior with no parameters.

    Example:
        >>> StandardNormalPrior(2).log_prob(torch.zeros(1, 2))
        tensor([-1.8379])
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        # Empty, not saved: lets .double() / .to(device) set the dtype and device of samples.
        self.register_buffer("_like", torch.empty(0), persistent=False)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``log N(z | 0, I)`` over the last dimension.

        Example:
            >>> StandardNormalPrior(1).log_prob(torch.zeros(2, 1)).shape
            torch.Size([2])
        """
        _check_latent(z, self.dim)
        return -0.5 * (z * z + _LOG_2PI).sum(-1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws, shape ``(n, dim)``, in the prior's dtype and device.

        Example:
            >>> StandardNormalPrior(3).double().sample(2).dtype
            torch.float64
        """
        check_positive_int("n", n)
        return torch.randn(n, self.dim, generator=generator, dtype=self._like.dtype,
                           device=self._like.device)


class GaussianMixturePrior(nn.Module):
    """Learnable mixture of ``n_components`` diagonal Gaussians.

    Example:
        >>> prior = GaussianMixturePrior(dim=3, n_components=5)
        >>> prior.log_prob(prior.sample(4)).shape
        torch.Size([4])
    """

    def __init__(self, dim: int, n_components: int, init_std: float = 1.0) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.n_components = check_positive_int("n_components", n_components)
        if not (math.isfinite(init_std) and init_std > 0):
            raise ValueError(f"init_std must be finite and > 0, got {init_std}")
        self.means = nn.Parameter(torch.randn(n_components, dim))
        self.log_stds = nn.Parameter(torch.full((n_components, dim), math.log(init_std)))
        self.logits = nn.Parameter(torch.zeros(n_components))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log density of ``z`` (shape ``(..., dim)``) under the mixture.

        Example:
            >>> GaussianMixturePrior(2, 3).log_prob(torch.zeros(4, 2)).shape
            torch.Size([4])
        """
        _check_latent(z, self.dim)
        for name, p in (("means", self.means), ("log_stds", self.log_stds),
                        ("logits", self.logits)):
            if not bool(torch.isfinite(p).all()):
                raise ValueError(f"mixture parameter {name} contains non-finite values")
        diff = (z[..., None, :] - self.means) / self.log_stds.exp()
        comp = -0.5 * (diff * diff + _LOG_2PI).sum(-1) - self.log_stds.sum(-1)
        return torch.logsumexp(comp + torch.log_softmax(self.logits, -1), -1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        check_positive_int("n", n)
        probs = torch.softmax(self.logits, -1)
        idx = torch.multinomial(probs, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        return self.means[idx] + self.log_stds.exp()[idx] * eps

    @torch.no_grad()
    def init_from_data(self, z: torch.Tensor, generator: torch.Generator | None = None) -> Any:
        """Means = random data points, stds = data std / K^(1/D), equal weights."""
        _check_latent(z, self.dim)
        need = max(2, self.n_components)  # 2: a standard deviation needs two points
        if z.dim() != 2 or z.shape[0] < need:
            raise ValueError(f"z must have shape (N >= {need}, {self.dim})")
        if not bool(torch.isfinite(z).all()):
            raise ValueError("z must be finite")
        idx = torch.randperm(z.shape[0], generator=generator)[: self.n_components]
        std = z.std(0).clamp_min(1e-3) / self.n_components ** (1.0 / self.dim)
        self.means.copy_(z[idx])
        self.log_stds.copy_(std.log().expand_as(self.log_stds))
        self.logits.zero_()
        return self


class VAE(nn.Module):
    """MLP VAE with a Bernoulli decoder, diagonal Gaussian encoder and a pluggable prior.

    Args:
        latent_dim: ``D``.
        prior: a module with ``log_prob`` and ``sample``; defaults to ``N(0, I)``.
        hidden: hidden widths of the encoder (the decoder mirrors them).
        data_dim: flattened input size (784 for MNIST).

    Example:
        >>> vae = VAE(latent_dim=4, hidden=(32,))
        >>> x = binarize(torch.rand(3, 784))
        >>> vae.elbo(x).shape, vae.iw_nll(x, k=50).shape
        (torch.Size([3]), torch.Size([3]))
    """

    def __init__(
        self,
        latent_dim: int = 16,
        prior: nn.Module | None = None,
        hidden: Sequence[int] = (512, 256),
        data_dim: int = 784,
    ) -> None:
        super().__init__()
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        self.data_dim = check_positive_int("data_dim", data_dim)
        hidden = tuple(hidden)
        for h in hidden:
            check_positive_int("hidden", h)
        if prior is None:
            prior = StandardNormalPrior(latent_dim)
        if not (callable(getattr(prior, "log_prob", None)) and callable(getattr(prior, "sample",
                                                                                 None))):
            raise TypeError("prior must provide log_prob(z) and sample(n)")
        if getattr(prior, "dim", latent_dim) != latent_dim:
            raise ValueError(f"prior.dim={prior.dim} does not match latent_dim={latent_dim}")
        self.prior = prior

        def mlp(sizes: Sequence[int]) -> nn.Sequential:
            layers: list[nn.Module] = []
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
                layers.append(nn.Linear(a, b))
                if i < len(sizes) - 2:
                    layers.append(nn.ReLU())
            return nn.Sequential(*layers)

        self.encoder = mlp((data_dim, *hidden, 2 * latent_dim))
        self.decoder = mlp((latent_dim, *reversed(hidden), data_dim))

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point torch.Tensor")
        x = x.reshape(x.shape[0], -1) if x.dim() > 1 else x
        if x.dim() != 2 or x.shape[1] != self.data_dim:
            raise ValueError(f"x must have {self.data_dim} features per row, got {tuple(x.shape)}")
        return x

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-std, each ``(B, D)``."""
        h = self.encoder(self._flat(x))
        mu, log_std = h.chunk(2, dim=-1)
        return mu, log_std.clamp(-10.0, 5.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits ``(..., data_dim)``."""
        return self.decoder(z)

    def _log_terms(
        self, x: torch.Tensor, mu: torch.Tensor, log_std: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log p(x|z), log p(z), log q(z|x)) for z = mu + std * eps, eps of shape (S, B, D)."""
        z = mu + log_std.exp() * eps
        logits = self.decode(z)
        log_px = -F.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none"
        ).sum(-1)
        log_pz = self.prior.log_prob(z)
        log_qz = (-0.5 * (eps * eps + _LOG_2PI) - log_std).sum(-1)
        return log_px, log_pz, log_qz

    def elbo(self, x: torch.Tensor, analytic_kl: bool | None = None) -> torch.Tensor:
        """Single-sample ELBO per example ``(B,)`` (reparameterised, differentiable).

        With a standard-normal prior the KL term is analytic (``analytic_kl=None`` chooses
        automatically); otherwise ``log q(z|x) - log p(z)`` is estimated with the same sample.
        """
        x = self._flat(x)
        mu, log_std = self.encode(x)
        eps = torch.randn_like(mu)
        if analytic_kl is None:
            analytic_kl = isinstance(self.prior, StandardNormalPrior)
        if analytic_kl:
            if not isinstance(self.prior, StandardNormalPrior):
                raise ValueError("analytic_kl needs a StandardNormalPrior")
            z = mu + log_std.exp() * eps
            log_px = -F.binary_cross_entropy_with_logits(self.decode(z), x, reduction="none").sum(
                -1
            )
            kl = 0.5 * (mu * mu + (2 * log_std).exp() - 1 - 2 * log_std).sum(-1)
            return log_px - kl
        log_px, log_pz, log_qz = self._log_terms(x, mu, log_std, eps[None])
        return (log_px + log_pz - log_qz)[0]

    @torch.no_grad()
    def iw_nll(self, x: torch.Tensor, k: int = 1000, max_points: int = 1 << 13,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Importance-weighted estimate of ``-log p(x)`` per example, ``(B,)``, in nats.

        ``-log (1/k) sum_i p(x, z_i) / q(z_i | x)``, ``z_i ~ q(z|x)``. Samples are processed in
        chunks of at most ``max_points`` (example, sample) pairs and combined with a running
        log-sum-exp, so memory does not grow with ``k``.
        """
        check_positive_int("k", k)
        check_positive_int("max_points", max_points)
        x = self._flat(x)
        mu, log_std = self.encode(x)
        B = x.shape[0]
        chunk = max(1, min(k, max_points // max(B, 1)))
        total = torch.full((B,), -math.inf, dtype=mu.dtype)
        done = 0
        while done < k:
            s = min(chunk, k - done)
            eps = torch.randn((s, *mu.shape), generator=generator, dtype=mu.dtype)
            log_px, log_pz, log_qz = self._log_terms(x, mu, log_std, eps)
            total = torch.logaddexp(total, torch.logsumexp(log_px + log_pz - log_qz, 0))
            done += s
        return -(total - math.log(k))

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """``n`` images ``(n, 1, 28, 28)`` (pixel probabilities if ``mean`` else binary)."""
        z = self.prior.sample(n, generator=generator)
        return self.decode_images(z, mean=mean, generator=generator)

    @torch.no_grad()
    def decode_images(self, z: torch.Tensor, mean: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode latents into images ``(n, 1, 28, 28)``."""
        p = torch.sigmoid(self.decode(z))
        if not mean:
            p = binarize(p, generator)
        side = int(round(math.sqrt(self.data_dim)))
        return p.reshape(-1, 1, side, side) if side * side == self.data_dim else p


def fit_vae(
    vae: VAE,
    train_x: torch.Tensor,
    epochs: int,
    lr: float = 1e-3,
    prior_lr: float | None = None,
    batch_size: int = 100,
    prior_init_epoch: int | None = 1,
    prior_init_points: int = 10000,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    lr_schedule: str = "constant",
) -> dict[str, list[float]]:
    """Train a VAE on dynamically binarised data by maximising the ELBO with Adam.

    Args:
        vae: the model (its prior's parameters are trained too, with ``prior_lr``).
        train_x: images in [0, 1], ``(N, ...)`` with ``data_dim`` features per row.
        epochs: passes over the data.
        lr: Adam learning rate of encoder and decoder.
        prior_lr: Adam learning rate of the prior (default: ``lr``).
        batch_size: minibatch size.
        prior_init_epoch: after this many epochs, if the prior has ``init_from_data``, it is
            re-initialised from posterior samples of ``prior_init_points`` training images
            (``None`` disables; 0 initialises before training).
        seed: seeds shuffling, binarisation and reparameterisation noise.
        log: optional callable receiving one progress line per epoch.
        lr_schedule: ``"constant"`` keeps every learning rate fixed; ``"cosine"`` decays all of
            them (model and prior) per step with a cosine to 0 over the ``epochs``, so the last
            steps are small and the final prior is not one noisy iterate of a large-step Adam.

    Returns:
        ``{"train_elbo": [...per epoch], "seconds": [...]}``.

    Example:
        >>> vae = VAE(4, hidden=(16,))
        >>> h = fit_vae(vae, torch.rand(64, 784), epochs=1, batch_size=32)
        >>> len(h["train_elbo"])
        1
    """
    check_positive_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
    if not isinstance(vae, VAE):
        raise TypeError("vae must be a VAE")
    x_all = vae._flat(train_x)
    if not (lr > 0):
        raise ValueError(f"lr must be > 0, got {lr}")
    prior_lr = lr if prior_lr is None else prior_lr
    if not (prior_lr > 0):
        raise ValueError(f"prior_lr must be > 0, got {prior_lr}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    groups = [{"params": list(vae.encoder.parameters()) + list(vae.decoder.parameters()),
               "lr": lr}]
    prior_params = list(vae.prior.parameters())
    if prior_params:
        groups.append({"params": prior_params, "lr": prior_lr})
    opt = torch.optim.Adam(groups)
    n = x_all.shape[0]
    total_steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 1.0 if lr_schedule == "constant"
        else 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    can_init = callable(getattr(vae.prior, "init_from_data", None))
    history: dict[str, list[float]] = {"train_elbo": [], "seconds": []}

    def init_prior() -> None:
        vae.eval()
        idx = torch.randperm(x_all.shape[0], generator=gen)[:prior_init_points]
        with torch.no_grad():
            mu, log_std = vae.encode(binarize(x_all[idx], gen))
            z = mu + log_std.exp() * torch.randn(mu.shape, generator=gen, dtype=mu.dtype)
        vae.prior.init_from_data(z)
        # the prior's Adam state refers to the old parameters: reset it
        for p in prior_params:
            opt.state.pop(p, None)

    for epoch in range(epochs):
        if can_init and prior_init_epoch is not None and epoch == prior_init_epoch:
            init_prior()
        vae.train()
        start = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for i in range(0, n, batch_size):
            xb = binarize(x_all[perm[i : i + batch_size]], gen)
            loss = -vae.elbo(xb).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += -loss.item() * xb.shape[0]
            count += xb.shape[0]
        history["train_elbo"].append(total / count)
        history["seconds"].append(time.perf_counter() - start)
        if log is not None:
            log(f"epoch {epoch + 1}/{epochs} train ELBO {total / count:.3f} "
                f"({history['seconds'][-1]:.1f}s)")
    vae.eval()
    return history


@torch.no_grad()
def evaluate_vae(vae: VAE, test_x: torch.Tensor, k: int = 1000, batch_size: int = 100,
                 seed: int = 0, elbo_repeats: int = 10) -> dict[str, float]:
    """Test ELBO (averaged over ``elbo_repeats`` samples) and IW-NLL (``k`` samples) in nats.

    ``test_x`` is binarised once with ``seed`` (a fixed stochastic binarisation).

    Example:
        >>> vae = VAE(4, hidden=(16,))
        >>> sorted(evaluate_vae(vae, torch.rand(8, 784), k=20))
        ['elbo', 'elbo_std_err', 'iw_nll', 'iw_nll_std_err']
    """
    check_positive_int("k", k)
    check_positive_int("batch_size", batch_size)
    check_positive_int("elbo_repeats", elbo_repeats)
    vae.eval()
    gen = torch.Generator().manual_seed(seed)
    x = binarize(vae._flat(test_x), gen)
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        elbos, nlls = [], []
        for xb in x.split(batch_size):
            elbos.append(torch.stack([vae.elbo(xb) for _ in range(elbo_repeats)]).mean(0))
            nlls.append(vae.iw_nll(xb, k=k, generator=gen))
    finally:
        torch.random.set_rng_state(rng_state)
    elbo, nll = torch.cat(elbos).double(), torch.cat(nlls).double()
    n = elbo.numel()
    return {
        "elbo": elbo.mean().item(),
        "elbo_std_err": (elbo.std() / math.sqrt(n)).item() if n > 1 else float("nan"),
        "iw_nll": nll.mean().item(),
        "iw_nll_std_err": (nll.std() / math.sqrt(n)).item() if n > 1 else float("nan"),
    }
