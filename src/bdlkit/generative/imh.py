"""Implicit Metropolis-Hastings (Neklyudov, Egorov & Vetrov, 2019) and its baselines.

The target ``p`` is known only through samples; the proposal is implicit (a generator for
independent proposals, or any stochastic map ``x -> y`` for Markov proposals). A learned
discriminator replaces the density ratio in the Metropolis-Hastings acceptance test:

- independent proposal (MH-GAN form): the discriminator returns a logit ``s(x)`` with
  ``sigmoid(s) = D(x) ~= p/(p+q)``, i.e. ``s(x) ~= log p(x)/q(x)``; accept ``x -> y`` with
  probability ``min{1, exp(s(y) - s(x))}``.
- Markov proposal: a pair function ``f(x, y)`` with ``d(x, y) = sigmoid(f(x, y) - f(y, x))``
  estimating ``p(x)q(y|x) / (p(x)q(y|x) + p(y)q(x|y))``; accept ``x -> y`` with probability
  ``min{1, exp(f(y, x) - f(x, y))}``.

With the exact ratio the chain's stationary distribution is exactly ``p``; with a learned one the
paper bounds the total-variation error by the discriminator's loss, so the validation loss
reported by :func:`train_discriminator` / :func:`train_pair_discriminator` is the quality signal.

Also here: discriminator rejection sampling (DRS, Azadi et al. 2019) as a baseline, MH-GAN style
calibration of a discriminator on held-out data (logistic or isotonic), and two standard Markov
proposals (Gaussian random walk, preconditioned Crank-Nicolson).

Example:
    >>> import math
    >>> p = torch.tensor([0.1, 0.2, 0.3, 0.4]); q = torch.full((4,), 0.25)
    >>> disc = lambda x: (p[x] / q[x]).log()           # exact log density ratio
    >>> prop = lambda n: torch.multinomial(q, n, replacement=True)
    >>> res = ImplicitMH(disc, prop).run(prop(2000), n_steps=50, keep="last")
    >>> res.samples.shape
    torch.Size([1, 2000])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bdlkit._checks import check_positive_int
from bdlkit.generative.gan import _score_shape_check

__all__ = [
    "ImplicitMH",
    "MHResult",
    "train_discriminator",
    "train_pair_discriminator",
    "PairDiscriminator",
    "discriminator_rejection_sampling",
    "discriminator_loss",
    "DRSResult",
    "Calibrator",
    "fit_calibration",
    "calibrate_discriminator",
    "random_walk_proposal",
    "pcn_proposal",
]

Sampler = Callable[[int], torch.Tensor]



def _scores(out: Any, n: int, who: str) -> torch.Tensor:
    """Coerce a discriminator output to a float tensor of shape (n,)."""
    if not isinstance(out, torch.Tensor):
        try:
            out = torch.as_tensor(out)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{who} must return a tensor, got {type(out)}") from None
    if out.dim() == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.dim() != 1 or out.shape[0] != n:
        raise ValueError(
            f"{who} must return one score per sample: expected shape ({n},), "
            f"got {tuple(out.shape)}"
        )
    return out.detach().float()


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------


@dataclass
class MHResult:
    """Output of :meth:`ImplicitMH.run`.

    Attributes:
        samples: ``(n_kept, n_chains, *state_shape)``: ``x0`` and every ``thin``-th state
            (``n_kept = n_steps // thin + 1``), or only the final state when ``keep="last"``.
        acceptance: per-chain acceptance rate over the ``n_steps`` steps, shape ``(n_chains,)``.
        n_nonfinite: per-chain count of steps whose discriminator output was NaN/inf (those
            proposals were rejected); non-finite scores of ``x0`` are counted too.
        n_steps: number of MH steps run.
        thin: thinning used for ``samples``.

    Example:
        >>> mh = ImplicitMH(lambda x: torch.zeros(len(x)), lambda n: torch.randn(n, 2))
        >>> res = mh.run(torch.zeros(8, 2), n_steps=10, thin=5)
        >>> res.samples.shape, res.acceptance.shape
        (torch.Size([3, 8, 2]), torch.Size([8]))
    """

    samples: torch.Tensor
    acceptance: torch.Tensor
    n_nonfinite: torch.Tensor
    n_steps: int
    thin: int

    @property
    def final(self) -> torch.Tensor:
        """The last state of every chain, ``(n_chains, *state_shape)``."""
        return self.samples[-1]


class ImplicitMH:
    """Implicit Metropolis-Hastings sampler running many chains in parallel.

    Args:
        discriminator: any callable. Independent case: ``discriminator(x) -> (N,)`` logits
            ``s(x) ~= log p(x)/q(x)``. Markov case: ``discriminator(x, y) -> (N,)`` values
            ``f(x, y)`` of the antisymmetrised pair discriminator
            ``d(x, y) = sigmoid(f(x, y) - f(y, x))`` (e.g. a :class:`PairDiscriminator`, or
            ``log p(x) + log q(y|x)`` when both are known).
        proposal: independent case: ``proposal(n) -> (n, *state_shape)`` fresh samples of q;
            Markov case: ``proposal(x) -> y`` of the same shape as ``x`` (one draw of
            ``q(.|x_i)`` per row).
        markov: whether ``proposal`` is a Markov (state-dependent) proposal.

    Non-finite discriminator outputs never crash a run: the proposal is rejected and the event
    counted in ``MHResult.n_nonfinite``. In the independent case a non-finite score of the
    initial state is treated as ``-inf`` (no evidence the state belongs to p), so that chain
    moves to its first proposal with a finite score; this is counted too.

    Example:
        >>> p = torch.tensor([0.5, 0.5]); q = torch.tensor([0.9, 0.1])
        >>> mh = ImplicitMH(lambda x: (p[x] / q[x]).log(),
        ...                 lambda n: torch.multinomial(q, n, replacement=True))
        >>> res = mh.run(torch.zeros(1000, dtype=torch.long), n_steps=100, keep="last")
        >>> abs(res.final.float().mean().item() - 0.5) < 0.1
        True
    """

    def __init__(
        self,
        discriminator: Callable[..., torch.Tensor],
        proposal: Callable[..., torch.Tensor],
        markov: bool = False,
    ) -> None:
        if not callable(discriminator):
            raise TypeError(f"discriminator must be callable, got {type(discriminator)}")
        if not callable(proposal):
            raise TypeError(f"proposal must be callable, got {type(proposal)}")
        if not isinstance(markov, bool):
            raise TypeError(f"markov must be a bool, got {type(markov)}")
        self.discriminator = discriminator
        self.proposal = proposal
        self.markov = markov

    def _propose(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        y = self.proposal(x) if self.markov else self.proposal(n)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"proposal must return a tensor, got {type(y)}")
        if y.shape != x.shape:
            raise ValueError(
                f"proposal output shape {tuple(y.shape)} does not match the state shape "
                f"{tuple(x.shape)}"
            )
        return y.to(device=x.device, dtype=x.dtype)

    def _pair_log_alpha(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        out = _scores(
            self.discriminator(torch.cat([x, y]), torch.cat([y, x])), 2 * n, "discriminator"
        )
        f_xy, f_yx = out[:n], out[n:]
        return f_yx - f_xy

    @torch.no_grad()
    def run(
        self,
        x0: torch.Tensor,
        n_steps: int,
        thin: int = 1,
        keep: str = "all",
        generator: torch.Generator | None = None,
    ) -> MHResult:
        """Run ``x0.shape[0]`` chains for ``n_steps`` MH steps, vectorised over chains.

        Args:
            x0: initial states ``(n_chains, *state_shape)`` (e.g. generator samples or data).
            n_steps: number of MH steps (>= 1).
            thin: keep ``x0`` and every ``thin``-th state.
            keep: ``"all"`` (the thinned trajectory) or ``"last"`` (only the final state, to save
                memory for image-sized states).
            generator: optional ``torch.Generator`` for the accept/reject uniforms (the
                proposal uses its own randomness).

        Returns:
            :class:`MHResult`.

        Example:
            >>> mh = ImplicitMH(lambda x, y: torch.zeros(len(x)), lambda x: x + 1, markov=True)
            >>> mh.run(torch.zeros(3, 2), n_steps=4).samples.shape
            torch.Size([5, 3, 2])
        """
        if not isinstance(x0, torch.Tensor) or x0.dim() < 1 or x0.shape[0] < 1:
            raise ValueError("x0 must be a tensor of shape (n_chains, *state_shape), n_chains >= 1")
        check_positive_int("n_steps", n_steps)
        check_positive_int("thin", thin)
        if keep not in ("all", "last"):
            raise ValueError(f"keep must be 'all' or 'last', got {keep!r}")
        x = x0.detach().clone()
        n = x.shape[0]
        dev = x.device
        accepted = torch.zeros(n, dtype=torch.long, device=dev)
        nonfinite = torch.zeros(n, dtype=torch.long, device=dev)
        n_kept = n_steps // thin + 1 if keep == "all" else 1
        store = torch.empty((n_kept, *x.shape), dtype=x.dtype, device=dev)
        if keep == "all":
            store[0] = x
        s_x = None
        if not self.markov:
            s_x = _scores(self.discriminator(x), n, "discriminator").to(dev)
            bad = ~torch.isfinite(s_x)
            nonfinite += bad.long()
            s_x = torch.where(bad, torch.full_like(s_x, -math.inf), s_x)
        for t in range(1, n_steps + 1):
            y = self._propose(x)
            if self.markov:
                log_alpha = self._pair_log_alpha(x, y).to(dev)
                ok = torch.isfinite(log_alpha)
                s_y = None
            else:
                s_y = _scores(self.discriminator(y), n, "discriminator").to(dev)
                ok = torch.isfinite(s_y)
                log_alpha = s_y - s_x  # +inf when s_x = -inf (bad x0), handled below
            nonfinite += (~ok).long()
            u = torch.rand(n, device=dev, generator=generator)
            log_alpha = torch.where(ok, log_alpha, torch.full_like(log_alpha, -math.inf))
            acc = ok & (torch.log(u) < log_alpha)
            accepted += acc.long()
            mask = acc.reshape(n, *([1] * (x.dim() - 1)))
            x = torch.where(mask, y, x)
            if s_y is not None:
                s_x = torch.where(acc, s_y, s_x)
            if keep == "all" and t % thin == 0:
                store[t // thin] = x
        if keep == "last":
            store[0] = x
        return MHResult(
            samples=store,
            acceptance=accepted.double() / n_steps,
            n_nonfinite=nonfinite,
            n_steps=n_steps,
            thin=thin,
        )


# --------------------------------------------------------------------------------------------
# Markov proposals
# --------------------------------------------------------------------------------------------


def random_walk_proposal(scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Gaussian random-walk Markov proposal ``y = x + scale * eps`` (symmetric).

    Example:
        >>> prop = random_walk_proposal(0.1)
        >>> prop(torch.zeros(5, 2)).shape
        torch.Size([5, 2])
    """
    if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")

    def propose(x: torch.Tensor) -> torch.Tensor:
        return x + scale * torch.randn_like(x)

    return propose


def pcn_proposal(rho: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Preconditioned Crank-Nicolson proposal ``y = rho x + sqrt(1 - rho^2) eps``.

    It is reversible with respect to N(0, I), so in the latent space of a generator with a
    standard normal prior the MH ratio for the target ``N(z) r(G(z))`` reduces to
    ``r(G(y)) / r(G(x))``: use the pair function ``f(z, z') = s(G(z))``.

    Example:
        >>> pcn_proposal(0.9)(torch.zeros(4, 3)).shape
        torch.Size([4, 3])
    """
    if not (isinstance(rho, (int, float)) and 0 <= rho < 1):
        raise ValueError(f"rho must be in [0, 1), got {rho!r}")
    sigma = math.sqrt(1 - rho * rho)

    def propose(x: torch.Tensor) -> torch.Tensor:
        return rho * x + sigma * torch.randn_like(x)

    return propose


# --------------------------------------------------------------------------------------------
# Discriminators and their training
# --------------------------------------------------------------------------------------------


class PairDiscriminator(nn.Module):
    """MLP pair function ``f(x, y)`` on the concatenation of the flattened ``x`` and ``y``.

    Use ``d(x, y) = sigmoid(f(x, y) - f(y, x))``; :meth:`pair_logit` returns
    ``f(x, y) - f(y, x)``. Passing ``diff=True`` also feeds ``y - x`` (helps for local proposals).

    Example:
        >>> f = PairDiscriminator((2,), hidden=(16,))
        >>> x, y = torch.randn(5, 2), torch.randn(5, 2)
        >>> torch.allclose(f.pair_logit(x, y), -f.pair_logit(y, x))
        True
    """

    def __init__(
        self, in_shape: tuple[int, ...] | int, hidden: tuple[int, ...] = (256, 256),
        diff: bool = True,
    ) -> None:
        super().__init__()
        in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        if not in_shape or any(not isinstance(s, int) or s < 1 for s in in_shape):
            raise ValueError(f"in_shape must be positive ints, got {in_shape!r}")
        for h in hidden:
            check_positive_int("hidden", h)
        self.in_shape = in_shape
        self.diff = bool(diff)
        d = math.prod(in_shape)
        sizes = ((3 if self.diff else 2) * d, *hidden)
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
        layers.append(nn.Linear(sizes[-1], 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(
                f"x and y must both have shape (N, *{self.in_shape}), got "
                f"{tuple(x.shape)} and {tuple(y.shape)}"
            )
        a, b = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
        feats = [a, b, b - a] if self.diff else [a, b]
        return self.net(torch.cat(feats, 1)).squeeze(1)

    def pair_logit(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``f(x, y) - f(y, x)``: the logit of ``d(x, y)``."""
        return self(x, y) - self(y, x)


def _as_sampler(src: torch.Tensor | Sampler, name: str) -> Sampler:
    if isinstance(src, torch.Tensor):
        if src.dim() < 1 or src.shape[0] < 1:
            raise ValueError(f"{name} must hold at least one sample")

        def sample(n: int) -> torch.Tensor:
            return src[torch.randint(src.shape[0], (n,))]

        return sample
    if callable(src):
        return src
    raise TypeError(f"{name} must be a tensor of samples or a callable sampler(n)")


def _module_params(m: Any) -> list[torch.nn.Parameter]:
    if not isinstance(m, nn.Module):
        raise TypeError(f"the discriminator to train must be an nn.Module, got {type(m)}")
    params = [p for p in m.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the discriminator has no trainable parameters")
    return params


@torch.no_grad()
def discriminator_loss(
    disc: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    batch_size: int = 1024,
) -> tuple[float, float]:
    """Mean binary cross-entropy and accuracy of a logit discriminator on ``real`` (label 1)
    and ``fake`` (label 0) samples: the validation signal of the paper's TV bound
    (``ln 2`` = chance).

    Example:
        >>> loss, acc = discriminator_loss(lambda x: x[:, 0], torch.ones(4, 1), -torch.ones(4, 1))
        >>> round(loss, 3), acc
        (0.313, 1.0)
    """
    check_positive_int("batch_size", batch_size)
    losses, correct, count = 0.0, 0, 0
    for src, label in ((real, 1), (fake, 0)):
        for chunk in src.split(batch_size):
            s = _scores(disc(chunk), chunk.shape[0], "discriminator")
            losses += float((F.softplus(-s) if label else F.softplus(s)).sum())
            correct += int(((s > 0) == bool(label)).sum())
            count += chunk.shape[0]
    if count == 0:
        raise ValueError("real and fake are both empty")
    # per-sample mean BCE over both sets (= mean of the two class means for equal sizes)
    return losses / count, correct / count


def _fit_discriminator(
    discriminator: nn.Module,
    opt: torch.optim.Optimizer,
    batch_loss: Callable[[], torch.Tensor],
    validate: Callable[[], tuple[float, float]] | None,
    steps: int,
    val_every: int,
    keep_best: bool,
) -> dict[str, list[float]]:
    """The loop both discriminator trainers share: optimise ``batch_loss``, log the mean train
    loss every ``val_every`` steps, validate, and keep the weights with the best val loss."""
    hist: dict[str, list[float]] = {"step": [], "train_loss": [], "val_loss": [], "val_acc": []}
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    running, cnt = 0.0, 0
    for step in range(1, steps + 1):
        discriminator.train()
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += float(loss.detach())
        cnt += 1
        if step % val_every == 0 or step == steps:
            hist["step"].append(step)
            hist["train_loss"].append(running / cnt)
            running, cnt = 0.0, 0
            if validate is not None:
                discriminator.eval()
                with torch.no_grad():
                    vl, va = validate()
                hist["val_loss"].append(vl)
                hist["val_acc"].append(va)
                if keep_best and (best is None or vl < best[0]):
                    best = (vl, {k: v.detach().clone()
                                 for k, v in discriminator.state_dict().items()})
    if best is not None:
        discriminator.load_state_dict(best[1])
    discriminator.eval()
    return hist

def train_discriminator(
    discriminator: nn.Module,
    real: torch.Tensor | Sampler,
    fake: torch.Tensor | Sampler,
    *,
    steps: int = 1000,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    val_real: torch.Tensor | None = None,
    val_fake: torch.Tensor | None = None,
    val_every: int = 100,
    optimizer: torch.optim.Optimizer | None = None,
    keep_best: bool = True,
) -> dict[str, list[float]]:
    """Train a density-ratio discriminator for independent proposals (BCE, real = 1).

    At the optimum ``sigmoid(s(x)) = p/(p+q)``, so ``s(x) = log p(x)/q(x)``.

    Args:
        discriminator: module mapping a batch to one logit per sample.
        real: target samples (tensor, sampled with replacement) or a sampler ``real(n)``.
        fake: proposal samples or the proposal itself (``fake(n)``).
        steps, batch_size, lr, weight_decay: Adam training settings (one real and one fake
            batch of ``batch_size`` per step).
        val_real, val_fake: held-out samples; the validation loss (mean BCE over both sets, the
            quantity that bounds the chain's TV error in the paper) and accuracy are recorded
            every ``val_every`` steps.
        optimizer: use this optimiser instead of Adam.
        keep_best: with validation data, restore the parameters with the lowest validation
            loss at the end (early stopping against overfitting).

    The module is left in eval mode.

    Returns:
        ``{"step", "train_loss", "val_loss", "val_acc"}`` (validation lists empty without
        validation data).

    Example:
        >>> D = nn.Linear(1, 1)
        >>> h = train_discriminator(D, torch.randn(500, 1), torch.randn(500, 1) + 1,
        ...                         steps=20, val_every=10)
        >>> len(h["train_loss"])
        2
    """
    params = _module_params(discriminator)
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    check_positive_int("val_every", val_every)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if (val_real is None) != (val_fake is None):
        raise ValueError("give both val_real and val_fake, or neither")
    real_s, fake_s = _as_sampler(real, "real"), _as_sampler(fake, "fake")
    opt = optimizer or torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)

    def batch_loss() -> torch.Tensor:
        xr = real_s(batch_size)
        with torch.no_grad():
            xf = fake_s(batch_size)
        s_r = _score_shape_check(discriminator(xr), xr.shape[0])
        s_f = _score_shape_check(discriminator(xf), xf.shape[0])
        return 0.5 * (F.softplus(-s_r).mean() + F.softplus(s_f).mean())

    validate = None
    if val_real is not None:
        def validate() -> tuple[float, float]:
            return discriminator_loss(discriminator, val_real, val_fake, 1024)  # type: ignore[arg-type]

    return _fit_discriminator(discriminator, opt, batch_loss, validate, steps, val_every,
                              keep_best)



def train_pair_discriminator(
    discriminator: nn.Module,
    real: torch.Tensor | Sampler,
    proposal: Callable[[torch.Tensor], torch.Tensor],
    *,
    steps: int = 1000,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    val_real: torch.Tensor | None = None,
    val_every: int = 100,
    optimizer: torch.optim.Optimizer | None = None,
    keep_best: bool = True,
) -> dict[str, list[float]]:
    """Train a pair discriminator ``f(x, y)`` for a Markov proposal with the paper's pair loss.

    Pairs ``(x, y)``, ``x ~ data``, ``y ~ q(.|x)`` are labelled 1 and the swapped ``(y, x)``
    labelled 0, with ``d(x, y) = sigmoid(f(x, y) - f(y, x))``. Because ``d(y, x) = 1 - d(x, y)``
    both halves of the cross-entropy are equal, so the loss is ``softplus(f(y, x) - f(x, y))``.
    At the optimum ``f(x, y) - f(y, x) = log p(x)q(y|x) / (p(y)q(x|y))``.

    Args:
        discriminator: module ``f(x, y) -> (N,)`` (e.g. :class:`PairDiscriminator`).
        real: target samples or a sampler ``real(n)``.
        proposal: the Markov proposal ``proposal(x) -> y``.
        val_real: held-out target samples; the validation pair loss (fresh proposals) and
            accuracy are recorded every ``val_every`` steps.
        Other arguments as in :func:`train_discriminator`.

    Returns:
        ``{"step", "train_loss", "val_loss", "val_acc"}``.

    Example:
        >>> f = PairDiscriminator((1,), hidden=(8,))
        >>> h = train_pair_discriminator(f, torch.randn(256, 1), random_walk_proposal(0.5),
        ...                              steps=10, val_every=5)
        >>> len(h["step"])
        2
    """
    params = _module_params(discriminator)
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    check_positive_int("val_every", val_every)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not callable(proposal):
        raise TypeError("proposal must be callable")
    real_s = _as_sampler(real, "real")

    def propose(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y = proposal(x)
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            raise ValueError(
                f"proposal output shape {tuple(getattr(y, 'shape', ()))} does not match the "
                f"state shape {tuple(x.shape)}"
            )
        return y

    def pair_logit(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        out = _score_shape_check(discriminator(torch.cat([x, y]), torch.cat([y, x])), 2 * n)
        return out[:n] - out[n:]

    opt = optimizer or torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)

    def batch_loss() -> torch.Tensor:
        x = real_s(batch_size)
        return F.softplus(-pair_logit(x, propose(x))).mean()

    validate = None
    if val_real is not None:
        val_pairs = (val_real, propose(val_real))

        def validate() -> tuple[float, float]:
            tot, acc, m = 0.0, 0, 0
            for xa, ya in zip(val_pairs[0].split(1024), val_pairs[1].split(1024), strict=True):
                lg = pair_logit(xa, ya)
                tot += float(F.softplus(-lg).sum())
                acc += int((lg > 0).sum())
                m += xa.shape[0]
            return tot / m, acc / m

    return _fit_discriminator(discriminator, opt, batch_loss, validate, steps, val_every,
                              keep_best)


# --------------------------------------------------------------------------------------------
# Calibration (MH-GAN)
# --------------------------------------------------------------------------------------------


def _pav(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pool-adjacent-violators: weighted isotonic (non-decreasing) fit of ``y``."""
    vals: list[float] = []
    wts: list[float] = []
    lens: list[int] = []
    for yi, wi in zip(y.tolist(), w.tolist(), strict=True):
        vals.append(yi)
        wts.append(wi)
        lens.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            wsum = wts[-2] + wts[-1]
            v = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / wsum
            ln = lens[-2] + lens[-1]
            vals[-2:], wts[-2:], lens[-2:] = [v], [wsum], [ln]
    return np.repeat(np.asarray(vals), np.asarray(lens))


class Calibrator:
    """Maps raw discriminator logits to calibrated density-ratio logits ``log p/q``.

    Built by :func:`fit_calibration`; call it on a tensor of logits.

    Example:
        >>> cal = fit_calibration(torch.randn(200) + 1, torch.randn(200), method="logistic")
        >>> cal(torch.zeros(3)).shape
        torch.Size([3])
    """

    def __init__(self, method: str, params: dict[str, Any], log_prior_odds: float) -> None:
        self.method = method
        self.params = params
        self.log_prior_odds = float(log_prior_odds)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        s = scores.detach().double()
        if self.method == "logistic":
            out = self.params["a"] * s + self.params["b"]
        else:
            xs, ps = self.params["x"], self.params["p"]
            prob = np.interp(s.cpu().numpy(), xs, ps)
            prob = np.clip(prob, self.params["eps"], 1 - self.params["eps"])
            out = torch.from_numpy(np.log(prob) - np.log1p(-prob)).to(s.device)
        # Remove the class-prior odds so the output estimates log p/q, not P(real|x) odds.
        return (out - self.log_prior_odds).to(scores.dtype if scores.is_floating_point()
                                               else torch.float32)


def fit_calibration(
    scores_real: torch.Tensor, scores_fake: torch.Tensor, method: str = "isotonic"
) -> Calibrator:
    """Fit a calibration of discriminator logits on held-out real and fake samples.

    ``"logistic"``: Platt scaling ``a s + b`` by Newton's method on the cross-entropy;
    ``"isotonic"``: monotone (pool-adjacent-violators) fit of P(real | s), interpolated
    linearly and clipped to ``[1/(2n), 1 - 1/(2n)]``. Unequal set sizes are corrected for, so
    the calibrated output estimates ``log p(x)/q(x)``.

    Example:
        >>> cal = fit_calibration(torch.randn(100) + 2, torch.randn(100))
        >>> cal.method
        'isotonic'
    """
    if method not in ("logistic", "isotonic"):
        raise ValueError(f"method must be 'logistic' or 'isotonic', got {method!r}")
    for name, s in (("scores_real", scores_real), ("scores_fake", scores_fake)):
        if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.numel() < 2:
            raise ValueError(f"{name} must be a 1-D tensor with at least 2 scores")
        if not torch.isfinite(s).all():
            raise ValueError(f"{name} must be finite")
    s = torch.cat([scores_real, scores_fake]).detach().double().cpu()
    y = torch.cat([torch.ones(len(scores_real)), torch.zeros(len(scores_fake))]).double()
    log_prior_odds = math.log(len(scores_real) / len(scores_fake))
    if method == "logistic":
        a, b = 1.0, 0.0
        X = torch.stack([s, torch.ones_like(s)], 1)
        w = torch.tensor([a, b], dtype=torch.float64)
        for _ in range(100):
            p = torch.sigmoid(X @ w)
            g = X.T @ (p - y)
            H = X.T @ (X * (p * (1 - p)).unsqueeze(1)) + 1e-9 * torch.eye(2, dtype=torch.float64)
            delta = torch.linalg.solve(H, g)
            w = w - delta
            if float(delta.abs().max()) < 1e-10:
                break
        return Calibrator("logistic", {"a": float(w[0]), "b": float(w[1])}, log_prior_odds)
    order = torch.argsort(s)
    xs, ys = s[order].numpy(), y[order].numpy()
    # Merge tied scores first so the interpolation abscissae are strictly increasing.
    ux, inv = np.unique(xs, return_inverse=True)
    wsum = np.bincount(inv).astype(float)
    ymean = np.bincount(inv, weights=ys) / wsum
    fitted = _pav(ymean, wsum)
    eps = 0.5 / len(s)
    return Calibrator("isotonic", {"x": ux, "p": fitted, "eps": eps}, log_prior_odds)


def calibrate_discriminator(
    discriminator: Callable[[torch.Tensor], torch.Tensor],
    val_real: torch.Tensor,
    val_fake: torch.Tensor,
    method: str = "isotonic",
    batch_size: int = 1024,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return ``x -> calibrator(discriminator(x))`` fitted on held-out real/fake samples.

    Example:
        >>> D = lambda x: 3 * x[:, 0]
        >>> cal_D = calibrate_discriminator(D, torch.randn(300, 1) + 1, torch.randn(300, 1),
        ...                                 method="logistic")
        >>> cal_D(torch.zeros(2, 1)).shape
        torch.Size([2])
    """
    if not callable(discriminator):
        raise TypeError("discriminator must be callable")
    check_positive_int("batch_size", batch_size)
    with torch.no_grad():
        sr = torch.cat([_scores(discriminator(c), len(c), "discriminator")
                        for c in val_real.split(batch_size)])
        sf = torch.cat([_scores(discriminator(c), len(c), "discriminator")
                        for c in val_fake.split(batch_size)])
    cal = fit_calibration(sr, sf, method)

    def calibrated(x: torch.Tensor) -> torch.Tensor:
        return cal(_scores(discriminator(x), len(x), "discriminator"))

    calibrated.calibrator = cal  # type: ignore[attr-defined]
    return calibrated


# --------------------------------------------------------------------------------------------
# Discriminator rejection sampling (baseline)
# --------------------------------------------------------------------------------------------


@dataclass
class DRSResult:
    """Output of :func:`discriminator_rejection_sampling`.

    Attributes:
        samples: the ``n`` accepted samples.
        acceptance_rate: accepted / proposed.
        n_proposed: proposals drawn after burn-in.
        n_nonfinite: proposals rejected because their score was NaN/inf.
        max_log_ratio: final estimate of ``max_x s(x)`` (``D*_M``).
        gamma: the last ``gamma`` used.

    Example:
        >>> r = discriminator_rejection_sampling(lambda x: torch.zeros(len(x)),
        ...     lambda m: torch.randn(m, 2), 100, burn_in=100)
        >>> r.samples.shape, r.acceptance_rate > 0
        (torch.Size([100, 2]), True)
    """

    samples: torch.Tensor
    acceptance_rate: float
    n_proposed: int
    n_nonfinite: int
    max_log_ratio: float
    gamma: float


@torch.no_grad()
def discriminator_rejection_sampling(
    discriminator: Callable[[torch.Tensor], torch.Tensor],
    proposal: Sampler,
    n: int,
    *,
    batch_size: int = 1000,
    gamma: float | None = None,
    gamma_quantile: float = 0.95,
    epsilon: float = 1e-6,
    burn_in: int = 10000,
    max_log_ratio: float | None = None,
    max_proposals: int | None = None,
) -> DRSResult:
    """Discriminator rejection sampling (Azadi et al. 2019).

    With ``s`` the logit and ``M`` the running maximum of ``s`` (estimated on ``burn_in``
    proposals, raised whenever exceeded), a proposal is accepted with probability
    ``sigmoid(F)``, ``F = s - M - log(1 - exp(s - M - epsilon)) - gamma``. With ``gamma=0`` and
    ``epsilon=0`` this is exact rejection sampling ``P(accept) = exp(s - M)`` (valid when
    ``M`` is the true maximum). ``gamma=None`` picks ``gamma`` per batch as the
    ``gamma_quantile`` of ``F`` (the paper's dynamic choice, trading exactness for acceptance).

    Args:
        discriminator: ``x -> (N,)`` logits (``log p/q`` estimates).
        proposal: sampler ``proposal(n)``.
        n: number of samples to return.
        batch_size: proposals per round.
        max_log_ratio: known ``M``; skips the burn-in estimate.
        max_proposals: give up with ``RuntimeError`` after this many proposals
            (default ``1000 * n + burn_in``).

    Example:
        >>> q = torch.tensor([0.7, 0.3]); p = torch.tensor([0.3, 0.7])
        >>> r = discriminator_rejection_sampling(lambda x: (p[x] / q[x]).log(),
        ...     lambda m: torch.multinomial(q, m, replacement=True), 500,
        ...     gamma=0.0, epsilon=0.0, max_log_ratio=math.log(7 / 3))
        >>> r.samples.shape
        torch.Size([500])
    """
    if not callable(discriminator):
        raise TypeError("discriminator must be callable")
    if not callable(proposal):
        raise TypeError("proposal must be callable")
    check_positive_int("n", n)
    check_positive_int("batch_size", batch_size)
    if not 0.0 < gamma_quantile < 1.0:
        raise ValueError(f"gamma_quantile must be in (0, 1), got {gamma_quantile!r}")
    if epsilon < 0:
        raise ValueError(f"epsilon must be non-negative, got {epsilon!r}")
    if gamma is not None and not math.isfinite(gamma):
        raise ValueError(f"gamma must be finite, got {gamma!r}")
    if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
        raise ValueError(f"burn_in must be a non-negative int, got {burn_in!r}")
    limit = max_proposals if max_proposals is not None else 1000 * n + burn_in
    M = max_log_ratio
    if M is None:
        m_vals = []
        done = 0
        while done < max(burn_in, 1):
            k = min(batch_size, max(burn_in, 1) - done)
            s = _scores(discriminator(proposal(k)), k, "discriminator")
            s = s[torch.isfinite(s)]
            if s.numel():
                m_vals.append(float(s.max()))
            done += k
        if not m_vals:
            raise ValueError("all burn-in discriminator scores were non-finite")
        M = max(m_vals)
    kept: list[torch.Tensor] = []
    n_kept = n_prop = n_bad = 0
    g_used = 0.0 if gamma is None else float(gamma)
    while n_kept < n:
        if n_prop >= limit:
            raise RuntimeError(
                f"DRS accepted only {n_kept}/{n} samples after {n_prop} proposals"
            )
        x = proposal(batch_size)
        if not isinstance(x, torch.Tensor) or x.shape[0] != batch_size:
            raise ValueError(f"proposal({batch_size}) must return {batch_size} samples")
        s = _scores(discriminator(x), batch_size, "discriminator").double()
        ok = torch.isfinite(s)
        n_bad += int((~ok).sum())
        n_prop += batch_size
        if ok.any():
            M = max(M, float(s[ok].max()))
        s = torch.where(ok, s, torch.full_like(s, -math.inf))
        diff = s - M
        # log(1 - exp(diff - eps)) computed stably; at diff = 0 and eps = 0 it is -inf -> F = inf
        inner = diff - epsilon
        log1m = torch.where(inner < -0.693, torch.log1p(-torch.exp(inner)),
                            torch.log(-torch.expm1(inner)))
        Fv = diff - log1m
        if gamma is None:
            finite_F = Fv[torch.isfinite(Fv)]
            g_used = float(torch.quantile(finite_F, gamma_quantile)) if finite_F.numel() else 0.0
        Fv = Fv - g_used
        accept = ok & (torch.rand(batch_size, dtype=torch.float64) < torch.sigmoid(Fv))
        acc_x = x[accept.to(x.device)]
        kept.append(acc_x)
        n_kept += acc_x.shape[0]
    samples = torch.cat(kept)[:n]
    return DRSResult(
        samples=samples,
        acceptance_rate=n_kept / n_prop,
        n_proposed=n_prop,
        n_nonfinite=n_bad,
        max_log_ratio=float(M),
        gamma=g_used,
    )
