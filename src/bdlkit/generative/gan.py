"""Small GANs shared by the generative recipes (implicit MH, TRIP).

What is here:

- :class:`MLPGenerator` / :class:`MLPDiscriminator`: fully connected generator and
  discriminator (critic) for any output shape; :func:`mnist_gan` builds the MNIST pair
  (pixels in [0, 1], sigmoid output) and :func:`toy_gan` the 2-D pair used for the 25-Gaussian
  grid.
- :class:`StandardNormalPrior`: the default latent prior (any object with ``sample(n)`` works).
- :func:`train_gan`: non-saturating GAN or WGAN-GP training loop. The prior is pluggable and a
  ``prior_step(z, score)`` hook is called after every generator update with the latent codes and
  the discriminator's per-sample score of ``G(z)`` (higher = more realistic), so that a learnable
  prior can be trained by REINFORCE (:class:`ReinforcePriorStep`) without touching the loop.
- :func:`generate`: batched sampling without gradients.
- :func:`grid_gaussians`: samples from the 25-Gaussian grid target.

Example:
    >>> G, D = toy_gan(latent_dim=2)
    >>> data = lambda n: grid_gaussians(n)
    >>> hist = train_gan(G, D, data, steps=5, batch_size=64)
    >>> generate(G, 10).shape
    torch.Size([10, 2])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from bdlkit._checks import check_positive_int

__all__ = [
    "MLPGenerator",
    "MLPDiscriminator",
    "StandardNormalPrior",
    "ReinforcePriorStep",
    "mnist_gan",
    "toy_gan",
    "train_gan",
    "generate",
    "grid_gaussians",
    "grid_means",
]


class Prior(Protocol):
    """Anything with ``sample(n) -> Tensor (n, latent_dim)``.

    :class:`bdlkit.TRIP` qualifies as it is. A ``torch.distributions`` object needs a small
    wrapper, because its ``sample`` takes a shape (``sample((n,))``), not a count.

    Example:
        >>> class Normal:
        ...     def sample(self, n: int) -> torch.Tensor:
        ...         return torch.randn(n, 8)
        >>> Normal().sample(4).shape
        torch.Size([4, 8])
    """

    def sample(self, n: int) -> torch.Tensor: ...



def _check_shape(name: str, shape: Any) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of ints, got {shape!r}") from None
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {shape!r}")
    return shape


class MLPGenerator(nn.Module):
    """Fully connected generator ``z (N, latent_dim) -> x (N, *out_shape)``.

    Args:
        latent_dim: size of the latent code.
        out_shape: shape of one sample, e.g. ``(1, 28, 28)`` or ``(2,)``.
        hidden: widths of the hidden layers (LeakyReLU 0.2).
        batchnorm: BatchNorm1d after each hidden linear layer (stabilises MNIST training;
            in eval mode the running statistics are used).
        out_activation: ``"sigmoid"`` (data in [0, 1]), ``"tanh"`` (data in [-1, 1]) or
            ``None`` (unbounded, e.g. 2-D toy data).

    Example:
        >>> G = MLPGenerator(8, (1, 28, 28))
        >>> G(torch.randn(3, 8)).shape
        torch.Size([3, 1, 28, 28])
    """

    def __init__(
        self,
        latent_dim: int,
        out_shape: Sequence[int] | int,
        hidden: Sequence[int] = (256, 512),
        out_activation: str | None = "sigmoid",
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        check_positive_int("latent_dim", latent_dim)
        self.out_shape = _check_shape("out_shape", out_shape)
        hidden = tuple(hidden)
        for h in hidden:
            check_positive_int("hidden", h)
        if out_activation not in ("sigmoid", "tanh", None):
            raise ValueError(
                f"out_activation must be 'sigmoid', 'tanh' or None, got {out_activation!r}"
            )
        self.latent_dim = latent_dim
        sizes = (latent_dim, *hidden, math.prod(self.out_shape))
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                if batchnorm:
                    layers.append(nn.BatchNorm1d(b))
                layers.append(nn.LeakyReLU(0.2))
        if out_activation == "sigmoid":
            layers.append(nn.Sigmoid())
        elif out_activation == "tanh":
            layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"z must have shape (N, {self.latent_dim}), got {tuple(z.shape)}"
            )
        return self.net(z).reshape(z.shape[0], *self.out_shape)


class MLPDiscriminator(nn.Module):
    """Fully connected discriminator/critic ``x (N, *in_shape) -> logit (N,)``.

    The output is a raw score: for the non-saturating GAN it is the logit of D(x), i.e. an
    estimate of ``log p_data(x) / p_model(x)``; for WGAN-GP it is the critic value.

    Args:
        in_shape: shape of one sample.
        hidden: widths of the hidden layers (LeakyReLU 0.2).
        dropout: dropout probability after each hidden layer (0 disables it).

    Example:
        >>> MLPDiscriminator((2,))(torch.zeros(4, 2)).shape
        torch.Size([4])
    """

    def __init__(
        self,
        in_shape: Sequence[int] | int,
        hidden: Sequence[int] = (512, 256),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_shape = _check_shape("in_shape", in_shape)
        hidden = tuple(hidden)
        for h in hidden:
            check_positive_int("hidden", h)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        sizes = (math.prod(self.in_shape), *hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(sizes[-1], 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(
                f"x must have shape (N, {', '.join(map(str, self.in_shape))}), "
                f"got {tuple(x.shape)}"
            )
        return self.net(x).squeeze(1)


class StandardNormalPrior:
    """Standard normal latent prior N(0, I).

    Example:
        >>> StandardNormalPrior(3).sample(5).shape
        torch.Size([5, 3])
    """

    def __init__(self, latent_dim: int, device: torch.device | str | None = None) -> None:
        check_positive_int("latent_dim", latent_dim)
        self.latent_dim = latent_dim
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def sample(self, n: int) -> torch.Tensor:
        check_positive_int("n", n)
        return torch.randn(n, self.latent_dim, device=self.device)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log density of each row of ``z`` (shape (N,))."""
        return -0.5 * (z.pow(2).sum(1) + self.latent_dim * math.log(2 * math.pi))


class ReinforcePriorStep:
    """``prior_step`` hook for :func:`train_gan`: REINFORCE update of a learnable prior.

    Maximises ``E_{z~prior}[score(G(z))]`` with the score-function estimator
    ``-(score - b) * log prior(z)`` and a moving-average baseline ``b``. The prior must have
    ``log_prob(z) -> (N,)`` differentiable in its parameters; ``z`` is treated as a constant.

    Args:
        prior: the learnable prior (``sample`` and ``log_prob``).
        optimizer: optimiser over the prior's parameters.
        baseline_decay: decay of the moving-average baseline, in [0, 1).
        normalize: divide the advantage by the batch std of the score (variance reduction).

    Example:
        >>> class P(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.mu = nn.Parameter(torch.zeros(2))
        ...     def sample(self, n): return self.mu.detach() + torch.randn(n, 2)
        ...     def log_prob(self, z): return -0.5 * (z - self.mu).pow(2).sum(1)
        >>> p = P(); step = ReinforcePriorStep(p, torch.optim.SGD(p.parameters(), lr=0.1))
        >>> step(torch.randn(8, 2), torch.randn(8))
    """

    def __init__(
        self,
        prior: Any,
        optimizer: torch.optim.Optimizer,
        baseline_decay: float = 0.9,
        normalize: bool = True,
    ) -> None:
        if not callable(getattr(prior, "log_prob", None)):
            raise TypeError("prior must have a callable log_prob(z)")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
        if not 0.0 <= float(baseline_decay) < 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1), got {baseline_decay!r}")
        self.prior = prior
        self.optimizer = optimizer
        self.baseline_decay = float(baseline_decay)
        self.normalize = bool(normalize)
        self.baseline: float | None = None
        self.last_loss: float | None = None

    def __call__(self, z: torch.Tensor, score: torch.Tensor) -> None:
        score = score.detach().reshape(-1)
        if score.shape[0] != z.shape[0]:
            raise ValueError(f"score has {score.shape[0]} entries for {z.shape[0]} latents")
        mean = float(score.mean())
        b = mean if self.baseline is None else self.baseline
        adv = score - b
        if self.normalize and score.numel() > 1:
            adv = adv / score.std().clamp_min(1e-8)
        loss = -(adv * self.prior.log_prob(z.detach())).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        d = self.baseline_decay
        self.baseline = mean if self.baseline is None else d * self.baseline + (1 - d) * mean
        self.last_loss = float(loss.detach())


def mnist_gan(
    latent_dim: int = 64,
    g_hidden: Sequence[int] = (256, 512),
    d_hidden: Sequence[int] = (512, 256),
) -> tuple[MLPGenerator, MLPDiscriminator]:
    """Generator/discriminator pair for MNIST (1 x 28 x 28, pixels in [0, 1]).

    Example:
        >>> G, D = mnist_gan(latent_dim=16)
        >>> D(G(torch.randn(2, 16))).shape
        torch.Size([2])
    """
    G = MLPGenerator(latent_dim, (1, 28, 28), g_hidden, out_activation="sigmoid", batchnorm=True)
    D = MLPDiscriminator((1, 28, 28), d_hidden)
    return G, D


def toy_gan(
    latent_dim: int = 2, hidden: Sequence[int] = (128, 128)
) -> tuple[MLPGenerator, MLPDiscriminator]:
    """Generator/discriminator pair for 2-D data (unbounded output).

    Example:
        >>> G, D = toy_gan()
        >>> G(torch.randn(5, 2)).shape
        torch.Size([5, 2])
    """
    return (
        MLPGenerator(latent_dim, (2,), hidden, out_activation=None),
        MLPDiscriminator((2,), hidden),
    )


def grid_means(grid: int = 5, spacing: float = 2.0) -> torch.Tensor:
    """Centres of the ``grid x grid`` Gaussian mixture, centred at 0 (shape (grid**2, 2)).

    Example:
        >>> grid_means(5)[0].tolist()
        [-4.0, -4.0]
    """
    check_positive_int("grid", grid)
    if not spacing > 0:
        raise ValueError(f"spacing must be positive, got {spacing!r}")
    c = (torch.arange(grid, dtype=torch.float32) - (grid - 1) / 2) * spacing
    return torch.cartesian_prod(c, c)


def grid_gaussians(
    n: int,
    grid: int = 5,
    spacing: float = 2.0,
    std: float = 0.05,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``n`` samples from the equal-weight mixture of Gaussians on a ``grid x grid`` lattice.

    The classic 25-Gaussian target of DRS / MH-GAN: means on {-4, -2, 0, 2, 4}^2, std 0.05.

    Example:
        >>> grid_gaussians(100).shape
        torch.Size([100, 2])
    """
    check_positive_int("n", n)
    if not std > 0:
        raise ValueError(f"std must be positive, got {std!r}")
    means = grid_means(grid, spacing)
    idx = torch.randint(len(means), (n,), generator=generator)
    return means[idx] + std * torch.randn(n, 2, generator=generator)


def _batch_x(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("x", "image", "images", "input"):
            if key in batch:
                return batch[key]
    raise TypeError(
        f"loader batches must be a tensor, a (x, ...) tuple/list or a dict with 'x'; "
        f"got {type(batch)}"
    )


def _data_stream(
    loader: Iterable[Any] | Callable[[int], torch.Tensor], batch_size: int | None
) -> Iterable[torch.Tensor]:
    if isinstance(loader, Iterable):
        while True:
            empty = True
            for batch in loader:
                empty = False
                yield _batch_x(batch)
            if empty:
                raise ValueError("loader yielded no batches")
    else:
        while True:
            yield loader(batch_size)  # type: ignore[arg-type]


def _score_shape_check(out: torch.Tensor, n: int) -> torch.Tensor:
    """Coerce a discriminator output of shape (n,), (n, 1) or (n, 1, ...) to (n,)."""
    out = out.reshape(out.shape[0], -1) if out.dim() > 1 else out
    if out.dim() == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.dim() != 1 or out.shape[0] != n:
        raise ValueError(f"discriminator must return one score per sample, got {tuple(out.shape)}")
    return out


def train_gan(
    generator: nn.Module,
    discriminator: nn.Module,
    loader: Iterable[Any] | Callable[[int], torch.Tensor],
    *,
    epochs: int | None = None,
    steps: int | None = None,
    prior: Prior | None = None,
    loss: str = "ns",
    lr: float = 2e-4,
    d_lr: float | None = None,
    betas: tuple[float, float] = (0.5, 0.999),
    n_critic: int = 1,
    gp_weight: float = 10.0,
    batch_size: int | None = None,
    prior_step: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    callback: Callable[[int, dict[str, float]], Any] | None = None,
    g_optimizer: torch.optim.Optimizer | None = None,
    d_optimizer: torch.optim.Optimizer | None = None,
    log_every: int = 50,
    quiet: bool = True,
) -> dict[str, list[float]]:
    """Train a GAN; returns a history dict.

    One *step* is ``n_critic`` discriminator updates (each on a fresh data batch) followed by
    one generator update. ``epochs`` counts passes over an iterable ``loader`` (in data
    batches); give exactly one of ``epochs``/``steps``.

    Args:
        generator: maps ``z (N, latent_dim)`` to samples.
        discriminator: maps samples to one score per sample (logit for ``"ns"``, critic value
            for ``"wgan-gp"``).
        loader: an iterable of batches (tensor, ``(x, y)`` tuple or dict with ``"x"``),
            re-iterated as needed, or a callable ``loader(batch_size) -> x``.
        epochs / steps: training length (exactly one of them).
        prior: object with ``sample(n)``; default N(0, I) of size ``generator.latent_dim``.
            Its samples are detached: the generator loss never reaches the prior.
        loss: ``"ns"`` (non-saturating GAN, BCE with logits) or ``"wgan-gp"``.
        lr / d_lr: Adam learning rates of generator / discriminator (``d_lr`` defaults to ``lr``).
        betas: Adam betas.
        n_critic: discriminator updates per generator update.
        gp_weight: gradient-penalty weight for ``"wgan-gp"``.
        batch_size: batch size for a callable ``loader`` (and the generator's batch size
            there); with an iterable loader the generator uses the data batch size.
        prior_step: hook ``prior_step(z, score)`` called after every generator update with the
            latent codes (detached) and the detached per-sample discriminator score of
            ``G(z)`` *before* that update (higher = more realistic). Use
            :class:`ReinforcePriorStep` to train a learnable prior.
        callback: ``callback(step, info)`` after every step (``info``: ``d_loss``, ``g_loss``).
        g_optimizer / d_optimizer: optional optimisers to use instead of the default Adam.
        log_every: history is recorded every ``log_every`` steps (and at the last step).
        quiet: if False, prints a line at every logged step.

    Returns:
        ``{"step": [...], "d_loss": [...], "g_loss": [...], "d_real": [...], "d_fake": [...]}``
        where ``d_real``/``d_fake`` are mean scores on the real/fake batch.

    Example:
        >>> G, D = toy_gan()
        >>> h = train_gan(G, D, grid_gaussians, steps=3, batch_size=32, log_every=1)
        >>> len(h["g_loss"])
        3
    """
    if not isinstance(generator, nn.Module):
        raise TypeError(f"generator must be an nn.Module, got {type(generator)}")
    if not isinstance(discriminator, nn.Module):
        raise TypeError(f"discriminator must be an nn.Module, got {type(discriminator)}")
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs or steps")
    if loss not in ("ns", "wgan-gp"):
        raise ValueError(f"loss must be 'ns' or 'wgan-gp', got {loss!r}")
    check_positive_int("n_critic", n_critic)
    check_positive_int("log_every", log_every)
    if not lr > 0 or (d_lr is not None and not d_lr > 0):
        raise ValueError("lr and d_lr must be positive")
    if gp_weight < 0:
        raise ValueError(f"gp_weight must be non-negative, got {gp_weight!r}")
    is_iter = isinstance(loader, Iterable)
    if not is_iter and not callable(loader):
        raise TypeError("loader must be an iterable of batches or a callable loader(batch_size)")
    if not is_iter:
        if batch_size is None:
            raise ValueError("batch_size is required when loader is a callable")
        check_positive_int("batch_size", batch_size)
    if steps is not None:
        check_positive_int("steps", steps)
        total = steps
    else:
        check_positive_int("epochs", epochs)
        if not is_iter:
            raise ValueError("epochs needs an iterable loader; use steps with a callable")
        try:
            n_batches = len(loader)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError("epochs needs a loader with len(); use steps instead") from None
        total = max(1, (epochs * n_batches) // n_critic)  # type: ignore[operator]
    if prior is None:
        latent_dim = getattr(generator, "latent_dim", None)
        if not isinstance(latent_dim, int):
            raise ValueError("prior is None and generator has no int attribute latent_dim")
        device = next(generator.parameters()).device
        prior = StandardNormalPrior(latent_dim, device=device)
    elif not callable(getattr(prior, "sample", None)):
        raise TypeError("prior must have a callable sample(n)")
    if prior_step is not None and not callable(prior_step):
        raise TypeError("prior_step must be callable")

    g_opt = g_optimizer or torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)
    d_opt = d_optimizer or torch.optim.Adam(
        discriminator.parameters(), lr=d_lr if d_lr is not None else lr, betas=betas
    )
    device = next(discriminator.parameters()).device
    stream = iter(_data_stream(loader, batch_size))
    hist: dict[str, list[float]] = {k: [] for k in ("step", "d_loss", "g_loss", "d_real", "d_fake")}
    generator.train()
    discriminator.train()
    for step in range(1, total + 1):
        for _ in range(n_critic):
            real = next(stream).to(device)
            n = real.shape[0]
            with torch.no_grad():
                fake = generator(prior.sample(n).detach().to(device))
            s_real = _score_shape_check(discriminator(real), n)
            s_fake = _score_shape_check(discriminator(fake), n)
            if loss == "ns":
                d_loss = F.softplus(-s_real).mean() + F.softplus(s_fake).mean()
            else:
                eps = torch.rand(n, *([1] * (real.dim() - 1)), device=device)
                mix = (eps * real + (1 - eps) * fake).requires_grad_(True)
                grad = torch.autograd.grad(discriminator(mix).sum(), mix, create_graph=True)[0]
                gp = (grad.reshape(n, -1).norm(dim=1) - 1).pow(2).mean()
                d_loss = s_fake.mean() - s_real.mean() + gp_weight * gp
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
        z = prior.sample(n).detach().to(device)
        s_gen = _score_shape_check(discriminator(generator(z)), n)
        g_loss = F.softplus(-s_gen).mean() if loss == "ns" else -s_gen.mean()
        g_opt.zero_grad(set_to_none=True)
        d_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()
        d_opt.zero_grad(set_to_none=True)
        if prior_step is not None:
            prior_step(z, s_gen.detach())
        info = {"d_loss": float(d_loss.detach()), "g_loss": float(g_loss.detach())}
        if callback is not None:
            callback(step, info)
        if step % log_every == 0 or step == total:
            hist["step"].append(step)
            hist["d_loss"].append(info["d_loss"])
            hist["g_loss"].append(info["g_loss"])
            hist["d_real"].append(float(s_real.detach().mean()))
            hist["d_fake"].append(float(s_fake.detach().mean()))
            if not quiet:
                print(
                    f"step {step}/{total} d_loss {info['d_loss']:.4f} g_loss {info['g_loss']:.4f}"
                )
    generator.eval()
    discriminator.eval()
    return hist


@torch.no_grad()
def generate(
    generator: nn.Module,
    n: int,
    prior: Prior | None = None,
    batch_size: int = 1000,
    return_latents: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` samples from ``generator(prior.sample(.))`` in batches, without gradients.

    Example:
        >>> G, _ = toy_gan()
        >>> x, z = generate(G, 7, return_latents=True)
        >>> x.shape, z.shape
        (torch.Size([7, 2]), torch.Size([7, 2]))
    """
    check_positive_int("n", n)
    check_positive_int("batch_size", batch_size)
    if prior is None:
        latent_dim = getattr(generator, "latent_dim", None)
        if not isinstance(latent_dim, int):
            raise ValueError("prior is None and generator has no int attribute latent_dim")
        prior = StandardNormalPrior(latent_dim, device=next(generator.parameters()).device)
    was_training = generator.training
    generator.eval()
    xs, zs = [], []
    try:
        for i in range(0, n, batch_size):
            z = prior.sample(min(batch_size, n - i))
            xs.append(generator(z))
            zs.append(z)
    finally:
        generator.train(was_training)
    x = torch.cat(xs)
    return (x, torch.cat(zs)) if return_latents else x
