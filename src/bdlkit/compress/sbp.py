"""Structured Bayesian Pruning (Neklyudov et al., NIPS 2017).

Each output channel (conv) or unit (linear) gets a multiplicative noise variable θ > 0 with
``q(log θ) = N(μ, σ²)`` truncated to ``[a, b] = [-20, 0]`` and a log-uniform prior
(``log θ ~ U[a, b]``). Training minimises the SGVLB ``N·mean CE + Σ KL``; at test time
``θ = E[θ]·1[SNR > threshold]`` and units with ``SNR ≤ threshold`` are removed by :func:`prune`,
which returns a physically smaller ``nn.Sequential``.

All closed forms (KL, E[θ], Var[θ], SNR) and the inverse-CDF sampler are evaluated in float64
with ``erfcx`` / log-space formulas, so they are finite (values *and* gradients) over the whole
clip range ``μ, log σ ∈ [-20, 5]``, including ``σ = e⁻²⁰`` and ``μ`` at either bound.

Noise placement (METHODS.md §3, the authors' ``lenet5-sbp.py``, which builds its convolutions
without bias, applies the noise and then adds the bias): θ multiplies ``W x`` *before* the bias,
``θ ⊙ (W x) + b``. :func:`add_noise` therefore moves the bias of a noisy conv/linear layer into
its :class:`SBPNoise` module (``SBPNoise.bias``; the layer itself becomes bias-free), so a
removed unit outputs the constant ``b``; :func:`prune` folds that constant into the next layer's
bias (before a zero-padded convolution, plus a per-position border map, :class:`PositionBias`).
A layer directly followed by BatchNorm keeps its bias and gets the noise after the
BatchNorm: there the BatchNorm's shift ``β`` plays the bias's role (in training BatchNorm
subtracts the batch mean, so a bias before it has no effect), and a removed channel outputs
exactly 0.
The input-feature noise of the first dense layer has no bias.

Pruning supports *Sequential-style* graphs: models whose forward pass applies their leaf modules
one after the other in registration order (``nn.Sequential`` and nestings of it, the zoo's
``LeNet5``, ``LeNet300_100``, ``LeNet500_300``, ``VGGSmall``, ``MLP`` on flat input). This is
checked on ``example_input``; other graphs (residual connections, concatenations) raise.

Example:
    >>> import torch
    >>> from bdlkit.models import LeNet500_300
    >>> net = add_noise(LeNet500_300())  # bk.sbp.add_noise
    >>> loss = sgvlb(net(torch.zeros(4, 1, 28, 28)), torch.zeros(4, dtype=torch.long),
    ...              net, n_train=60000)
    >>> small = prune(net, example_input=torch.zeros(1, 1, 28, 28))
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.special import erfcx, log_ndtr, ndtr, ndtri

from bdlkit._modes import kept_modes

__all__ = [
    "SBPNoise", "add_noise", "kl", "sgvlb", "clip_", "sbp_layers", "kept_units", "prune",
    "truncated_lognormal_stats",
]

LOWER = -20.0  # a: lower truncation bound of log θ (and of the log-uniform prior)
UPPER = 0.0  # b: upper truncation bound of log θ
CLIP = (-20.0, 5.0)  # both μ and log σ are clipped to this range
_U_EPS = 1e-5  # u ~ U(1e-5, 1 - 1e-5) in the inverse-CDF sampler

_SQRT2 = math.sqrt(2.0)
_SQRTPI = math.sqrt(math.pi)
_LOG_2PI = math.log(2.0 * math.pi)
_HALF_LOG_2PIE = 0.5 * math.log(2.0 * math.pi * math.e)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_SERIES_FROM = 100.0  # use the asymptotic series of 1/(√π erfcx(x)) − x beyond this x
_TINY_LOG_VAR_RATIO = 1e-10  # below this, log E[θ²] − 2 log E[θ] comes from Var[log θ]
_MIN_LOG_VAR_RATIO = 1e-60  # floor of log E[θ²] − 2 log E[θ]; keeps SNR ≤ 1e30 (finite in fp32)


# --------------------------------------------------------------------------------------------
# Stable special-function helpers (float64 tensors in, float64 tensors out)
# --------------------------------------------------------------------------------------------
def _log_ndtr(x: torch.Tensor) -> torch.Tensor:
    """log Φ(x) with a correct gradient for very negative x (torch's is wrong below ~ -1e8)."""
    tail = x < -5.0
    xt = torch.where(tail, x, torch.full_like(x, -6.0))
    xn = torch.where(tail, torch.full_like(x, 0.0), x)
    tail_val = torch.log(0.5 * erfcx(-xt / _SQRT2)) - 0.5 * xt * xt
    return torch.where(tail, tail_val, log_ndtr(xn))


def _mills_lower(x: torch.Tensor) -> torch.Tensor:
    """φ(x)/Φ(x) (inverse Mills ratio of the lower tail), stable for all x."""
    return _SQRT_2_OVER_PI / erfcx(-x / _SQRT2)


def _by_branch(neg: torch.Tensor, fn_tail: Any, fn_mid: Any, *args: torch.Tensor,
               ) -> torch.Tensor:
    """Evaluate ``fn_tail`` on the units (last dim) where ``neg`` holds, ``fn_mid`` elsewhere.

    Each function sees only its own units, so neither ever evaluates (or differentiates) the
    other branch's formula outside its domain.
    """
    if bool(neg.all()):
        return fn_tail(*args)
    if not bool(neg.any()):
        return fn_mid(*args)
    ti = neg.nonzero().view(-1)
    mi = (~neg).nonzero().view(-1)
    out_t = fn_tail(*[t.index_select(-1, ti) for t in args])
    out_m = fn_mid(*[t.index_select(-1, mi) for t in args])
    out = out_t.new_zeros(out_t.shape[:-1] + (neg.shape[-1],))
    return out.index_copy(-1, ti, out_t).index_copy(-1, mi, out_m)


def _log_half_e(e: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    """log(E/2) for E = erfcx(x_b) − erfcx(x_a) e^{-(x_a² − x_b²)}, with a usable gradient.

    Beyond x_b = 100 the second term of E is exactly 0 in the clip range (x_a ≥ 5 x_b), and
    torch's derivative of erfcx, 2x·erfcx(x) − 2/√π, cancels catastrophically (at x ~ 1e8 the
    gradient of the KL came out as 0 instead of 1/μ). There the asymptotic series
    erfcx(x) = (1 − 1/(2x²) + 3/(4x⁴) − 15/(8x⁶) …)/(x√π) is used for value and gradient.
    """
    big = xb > _SERIES_FROM
    direct = torch.log(0.5 * e)
    if not bool(big.any()):
        return direct
    xs = torch.where(big, xb, torch.full_like(xb, _SERIES_FROM))
    inv2 = 1.0 / (xs * xs)
    series = (math.log(0.5 / _SQRTPI) - torch.log(xs)
              + torch.log1p(inv2 * (-0.5 + inv2 * (0.75 - 1.875 * inv2))))
    return torch.where(big, series, direct)


def _s_tail(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    # β ≤ 0: Z = ½ e^{-β²/2} E with E = erfcx(x_b) − erfcx(x_a) e^{-(x_a² − x_b²)}
    xb, xa = -beta / _SQRT2, -alpha / _SQRT2
    e = erfcx(xb) - erfcx(xa) * torch.exp(-(xa - xb) * (xa + xb))
    return _log_half_e(e, xb)


def _s_mid(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return torch.log(ndtr(beta) - ndtr(alpha))


def _log_z_scaled(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """S(α, β) = log(Φ(β) − Φ(α)) + ½·min(β, 0)² for α < β, α ≤ 0.

    For β ≤ 0 the mass lies in the lower tail and is written with erfcx relative to β, so S
    stays O(log |β|) where log Z itself would be −β²/2 ~ −1e18.
    """
    return _by_branch(beta <= 0, _s_tail, _s_mid, alpha, beta)


def _kl_tail(log_sigma: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    # −log Z + βφ(β)/(2Z) = −log(E/2) − x_b·(1/(√π E) − x_b): the β²/2 terms cancel
    # analytically; the bracket uses its asymptotic series for large x_b (where e^{-(x_a²−x_b²)}
    # is exactly 0 because x_a ≥ 5 x_b in the clip range).
    xb, xa = -beta / _SQRT2, -alpha / _SQRT2
    d = torch.exp(-(xa - xb) * (xa + xb))
    e = erfcx(xb) - erfcx(xa) * d
    big = xb > _SERIES_FROM
    if bool(big.any()):
        xs = torch.where(big, xb, torch.full_like(xb, _SERIES_FROM))
        series = 0.5 / xs - 0.5 / xs**3 + 1.25 / xs**5
        h = torch.where(big, series, 1.0 / (_SQRTPI * e) - xb)
    else:
        h = 1.0 / (_SQRTPI * e) - xb
    return -log_sigma - _log_half_e(e, xb) - xb * h + xa * d / (_SQRTPI * e)


def _kl_mid(log_sigma: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    # β > 0 ≥ α: Z ≥ 0.05 (the interval has width ≥ 20/e⁵ and contains 0); direct formula.
    z = ndtr(beta) - ndtr(alpha)

    def a_phi(t: torch.Tensor) -> torch.Tensor:
        return t * torch.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)

    return -log_sigma - torch.log(z) - (a_phi(alpha) - a_phi(beta)) / (2.0 * z)


def _kl_from(mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """KL(q || LogU[a, b]) per unit = log(b−a) − H(q) for clipped float64 μ, log σ."""
    sigma = torch.exp(log_sigma)
    alpha, beta = (LOWER - mu) / sigma, (UPPER - mu) / sigma
    kl = _by_branch(beta <= 0, _kl_tail, _kl_mid, log_sigma, alpha, beta)
    return kl + math.log(UPPER - LOWER) - _HALF_LOG_2PIE


def _var_ratio_upper(beta: torch.Tensor) -> torch.Tensor:
    """Var[X] of X ~ N(0, 1) truncated above at ``beta`` (no lower bound): 1 − βλ − λ².

    λ = φ(β)/Φ(β). Beyond −β = 100 the three terms cancel, and the asymptotic series
    1/β² − 6/β⁴ + 50/β⁶ − 518/β⁸ + 6354/β¹⁰ is used instead.
    """
    x = -beta
    big = x > _SERIES_FROM
    b = torch.where(big, torch.full_like(beta, -_SERIES_FROM), beta)
    lam = _mills_lower(b)
    direct = 1.0 - b * lam - lam * lam
    inv2 = 1.0 / torch.where(big, x, torch.full_like(x, _SERIES_FROM)) ** 2
    series = inv2 * (1.0 + inv2 * (-6.0 + inv2 * (50.0 + inv2 * (-518.0 + 6354.0 * inv2))))
    return torch.where(big, series, direct)


def _moments_from(mu: torch.Tensor, log_sigma: torch.Tensor,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log E[θ], log E[θ²] − 2 log E[θ], SNR) for clipped float64 μ, log σ.

    E[θ^t] = e^{tμ + t²σ²/2} Z(α − tσ, β − tσ)/Z(α, β); the polynomial part is simplified
    analytically (it is exactly t·b when β ≤ 0) to avoid cancelling ~1e18-sized terms.
    """
    sigma = torch.exp(log_sigma)
    alpha, beta = (LOWER - mu) / sigma, (UPPER - mu) / sigma
    neg = beta <= 0
    s0 = _log_z_scaled(alpha, beta)
    s1 = _log_z_scaled(alpha - sigma, beta - sigma)
    s2 = _log_z_scaled(alpha - 2 * sigma, beta - 2 * sigma)
    m1 = torch.clamp(beta - sigma, max=0.0)
    m2 = torch.clamp(beta - 2 * sigma, max=0.0)
    poly1 = torch.where(neg, torch.full_like(mu, UPPER), mu + 0.5 * sigma**2 - 0.5 * m1**2)
    log_e1 = poly1 + s1 - s0
    # log E[θ²] − 2 log E[θ]; polynomial part is 0 (β ≤ 0) or σ² − ½m2² + m1² (β > 0).
    dpoly = torch.where(neg, torch.zeros_like(mu), sigma**2 - 0.5 * m2**2 + m1**2)
    dlog = dpoly + (s2 - 2.0 * s1 + s0)
    # For β ≤ 0 all of dlog sits in the s-terms, which are O(log|β|) each: once dlog falls
    # below ~1e-10 their sum is rounding noise. There dlog = κ2 + κ3 + ... of log θ, and
    # κ2 = Var[log θ] = σ²·v(β) alone is accurate to ~1e-5 relative (κ3/κ2 ~ √κ2); the far
    # lower bound (α < −20/σ) contributes nothing at such σ.
    tiny = neg & (dlog < _TINY_LOG_VAR_RATIO)
    if bool(tiny.any()):
        dlog = torch.where(tiny, sigma**2 * _var_ratio_upper(beta), dlog)
    dlog = dlog.clamp(min=_MIN_LOG_VAR_RATIO)
    snr = torch.rsqrt(torch.expm1(dlog))
    return log_e1, dlog, snr


def _ndtri_exp(logp: torch.Tensor) -> torch.Tensor:
    """Φ⁻¹(exp(logp)) for logp ≤ −600 (below float64's exp range): Newton on log Φ."""
    with torch.no_grad():
        t = -2.0 * logp
        x = -torch.sqrt(t - torch.log(t) - _LOG_2PI)
        for _ in range(4):
            x = x - (_log_ndtr(x) - logp) / _mills_lower(x)
    # One differentiable Newton step from the converged point gives the implicit gradient.
    return x - (_log_ndtr(x) - logp) / _mills_lower(x)


def _x_mid(alpha: torch.Tensor, beta: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    # β > 0 ≥ α: p = Φ(α) + u Z is far from 0 and 1 (Z ≥ 0.05, u ∈ [1e-5, 1 − 1e-5]).
    pa = ndtr(alpha)
    return ndtri(pa + u * (ndtr(beta) - pa))


def _x_tail(alpha: torch.Tensor, beta: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    # β ≤ 0: log p = log Φ(β) + log(u + (1 − u) Φ(α)/Φ(β)), in log space.
    lb = _log_ndtr(beta)
    logp = lb + torch.log(u + (1.0 - u) * torch.exp(_log_ndtr(alpha) - lb))
    tail = logp < -600.0
    if not bool(tail.any()):
        return ndtri(torch.exp(logp))
    x = ndtri(torch.exp(torch.where(tail, torch.full_like(logp, -1.0), logp)))
    idx = tail.nonzero(as_tuple=True)
    return x.index_put(idx, _ndtri_exp(logp[idx]))


def _sample_log_theta(mu: torch.Tensor, log_sigma: torch.Tensor, u: torch.Tensor,
                      ) -> torch.Tensor:
    """Inverse-CDF sample of the truncated normal: μ + σ Φ⁻¹(Φ(α) + u Z), u broadcast over μ.

    The per-sample work is one ``ndtri`` plus, only for the rare entries with p < e⁻⁶⁰⁰, a
    few Newton steps on log Φ.
    """
    sigma = torch.exp(log_sigma)
    alpha, beta = (LOWER - mu) / sigma, (UPPER - mu) / sigma
    x = _by_branch(beta <= 0, _x_tail, _x_mid, alpha, beta, u)
    return torch.clamp(mu + sigma * x, LOWER, UPPER)


def truncated_lognormal_stats(mu: torch.Tensor, log_sigma: torch.Tensor) -> dict[str, torch.Tensor]:
    """KL, E[θ], Var[θ] and SNR of θ = exp(X), X ~ N(μ, σ²) truncated to [-20, 0].

    Inputs are clipped to [-20, 5]; computation is float64, outputs are float64.

    Example:
        >>> s = truncated_lognormal_stats(torch.zeros(1), torch.full((1,), -5.0))
        >>> round(float(s["kl"]), 3)
        7.27
    """
    if not isinstance(mu, torch.Tensor) or not isinstance(log_sigma, torch.Tensor):
        raise TypeError("mu and log_sigma must be tensors")
    mu64 = mu.double().clamp(*CLIP)
    ls64 = log_sigma.double().clamp(*CLIP)
    log_e1, dlog, snr = _moments_from(mu64, ls64)
    mean = torch.exp(log_e1)
    return {"kl": _kl_from(mu64, ls64), "mean": mean, "var": mean**2 * torch.expm1(dlog),
            "snr": snr}


# --------------------------------------------------------------------------------------------
# The noise layer
# --------------------------------------------------------------------------------------------
class SBPNoise(nn.Module):
    """Multiplicative log-normal noise, one variable θ per channel (dim 1) of its input.

    Parameters ``mu`` and ``log_sigma`` (init 0 and −5) define ``q(log θ)``: N(μ, σ²)
    truncated to [-20, 0]. Training mode multiplies by a fresh inverse-CDF sample per example
    and channel; eval mode multiplies by ``E[θ]·1[SNR > threshold]``. With ``bias=True`` the
    module owns a per-channel bias added *after* the noise, ``θ ⊙ x + b`` (this is how
    :func:`add_noise` puts the noise before a layer's bias). ``kl()`` returns the
    per-unit KL to the log-uniform prior. Both parameters are used clipped to [-20, 5]; call
    :meth:`clip_` (or :func:`clip_`) after optimiser steps to keep the stored values there too.

    Example:
        >>> layer = SBPNoise(3)
        >>> layer(torch.ones(2, 3, 4, 4)).shape
        torch.Size([2, 3, 4, 4])
        >>> layer.kl().shape
        torch.Size([3])
    """

    def __init__(self, num_units: int, threshold: float = 1.0, init_mu: float = 0.0,
                 init_log_sigma: float = -5.0, bias: bool = False) -> None:
        super().__init__()
        if isinstance(num_units, bool) or not isinstance(num_units, int) or num_units < 1:
            raise ValueError(f"num_units must be a positive int, got {num_units!r}")
        _check_threshold("threshold", threshold)
        for name, v in (("init_mu", init_mu), ("init_log_sigma", init_log_sigma)):
            if not isinstance(v, (int, float)) or not CLIP[0] <= v <= CLIP[1]:
                raise ValueError(f"{name} must be a number in [{CLIP[0]}, {CLIP[1]}], got {v!r}")
        self.num_units = num_units
        self.threshold = float(threshold)
        self.mu = nn.Parameter(torch.full((num_units,), float(init_mu)))
        self.log_sigma = nn.Parameter(torch.full((num_units,), float(init_log_sigma)))
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {bias!r}")
        self.bias: nn.Parameter | None = (nn.Parameter(torch.zeros(num_units)) if bias
                                          else None)

    def extra_repr(self) -> str:
        return f"{self.num_units}, threshold={self.threshold}, bias={self.bias is not None}"

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return y
        return y + self.bias.to(y.dtype).view((1, -1) + (1,) * (y.dim() - 2))

    def _clipped(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu.double().clamp(*CLIP), self.log_sigma.double().clamp(*CLIP)

    def kl(self) -> torch.Tensor:
        """Per-unit KL(q(θ) || log-uniform prior), shape ``(num_units,)``, differentiable."""
        return _kl_from(*self._clipped()).to(self.mu.dtype)

    def mean(self) -> torch.Tensor:
        """E[θ] per unit."""
        log_e1, _, _ = _moments_from(*self._clipped())
        return torch.exp(log_e1).to(self.mu.dtype)

    def variance(self) -> torch.Tensor:
        """Var[θ] per unit (computed as E[θ]²·expm1(log E[θ²] − 2 log E[θ]))."""
        log_e1, dlog, _ = _moments_from(*self._clipped())
        return (torch.exp(2 * log_e1) * torch.expm1(dlog)).to(self.mu.dtype)

    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio E[θ]/√Var[θ] per unit (finite, at most 1e30)."""
        return _moments_from(*self._clipped())[2].to(self.mu.dtype)

    def mask(self, threshold: float | None = None) -> torch.Tensor:
        """Boolean mask of the units kept at ``threshold`` (default: ``self.threshold``)."""
        thr = self.threshold if threshold is None else _check_threshold("threshold", threshold)
        with torch.no_grad():
            return _moments_from(*self._clipped())[2] > thr

    def multiplier(self, threshold: float | None = None) -> torch.Tensor:
        """Eval-mode multiplier ``E[θ]·1[SNR > threshold]`` (float64, no gradient)."""
        thr = self.threshold if threshold is None else _check_threshold("threshold", threshold)
        with torch.no_grad():
            log_e1, _, snr = _moments_from(*self._clipped())
            return torch.exp(log_e1) * (snr > thr)

    def sample(self, shape: tuple[int, ...] = ()) -> torch.Tensor:
        """Draw θ by the inverse CDF; result has shape ``shape + (num_units,)`` (float64)."""
        mu, ls = self._clipped()
        u = torch.empty(*shape, self.num_units, dtype=torch.float64, device=mu.device)
        u.uniform_(_U_EPS, 1.0 - _U_EPS)
        return torch.exp(_sample_log_theta(mu, ls, u))

    @torch.no_grad()
    def clip_(self) -> SBPNoise:
        """Clamp the stored ``mu`` and ``log_sigma`` to [-20, 5] in place."""
        self.mu.clamp_(*CLIP)
        self.log_sigma.clamp_(*CLIP)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_units:
            raise ValueError(f"SBPNoise({self.num_units}) expects input of shape (N, "
                             f"{self.num_units}, ...), got {tuple(x.shape)}")
        view = (-1, self.num_units) + (1,) * (x.dim() - 2)
        if self.training:
            theta = self.sample((x.shape[0],)).to(x.dtype)
            return self._add_bias(x * theta.view(x.shape[0], *view[1:]))
        return self._add_bias(x * self.multiplier().to(x.dtype).view(view))


def _check_threshold(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# Model-level helpers
# --------------------------------------------------------------------------------------------
_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def sbp_layers(model: nn.Module) -> list[tuple[str, SBPNoise]]:
    """All ``SBPNoise`` modules of ``model`` as ``(qualified name, module)`` pairs.

    Example:
        >>> len(sbp_layers(add_noise(torch.nn.Sequential(torch.nn.Linear(3, 4),
        ...                                              torch.nn.ReLU(), torch.nn.Linear(4, 2)))))
        2
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SBPNoise)]


def kl(model: nn.Module) -> torch.Tensor:
    """Sum of the KL terms of all SBP layers of ``model`` (a differentiable scalar).

    Example:
        >>> net = add_noise(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
        ...                                     torch.nn.Linear(4, 2)))
        >>> round(kl(net).item(), 2)  # 3 input + 4 hidden units at 7.270 nats each
        50.89
    """
    layers = sbp_layers(model)
    if not layers:
        raise ValueError("model has no SBPNoise layers; call bk.sbp.add_noise(model) first")
    return torch.stack([m.kl().sum() for _, m in layers]).sum()


def sgvlb(logits: torch.Tensor, y: torch.Tensor, model: nn.Module, n_train: int,
          kl_weight: float = 1.0) -> torch.Tensor:
    """Negative SGVLB: ``n_train · mean cross-entropy + kl_weight · Σ KL`` (minimise it).

    Example:
        >>> net = add_noise(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
        ...                                     torch.nn.Linear(4, 2)))
        >>> sgvlb(net(torch.zeros(5, 3)), torch.zeros(5, dtype=torch.long), net, 100).ndim
        0
    """
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
        raise ValueError(f"n_train must be a positive int, got {n_train!r}")
    if not isinstance(kl_weight, (int, float)) or kl_weight < 0 or not math.isfinite(kl_weight):
        raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")
    if logits.dim() != 2 or y.dim() != 1 or logits.shape[0] != y.shape[0]:
        raise ValueError(f"logits must be (N, K) and y (N,), got {tuple(logits.shape)} and "
                         f"{tuple(y.shape)}")
    return n_train * F.cross_entropy(logits, y) + kl_weight * kl(model)


def clip_(model: nn.Module) -> nn.Module:
    """Clamp ``mu`` / ``log_sigma`` of every SBP layer to [-20, 5] in place; returns ``model``.

    Example:
        >>> net = add_noise(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
        ...                                     torch.nn.Linear(4, 2)))
        >>> _ = clip_(net)
    """
    for _, m in sbp_layers(model):
        m.clip_()
    return model


def kept_units(model: nn.Module, threshold: float | None = None) -> list[tuple[str, int, int]]:
    """``(name, kept, total)`` per SBP layer at ``threshold`` (default: each layer's own).

    Example:
        >>> net = add_noise(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
        ...                                     torch.nn.Linear(4, 2)))
        >>> kept_units(net)
        [('0_sbp_in', 3, 3), ('0_sbp', 4, 4)]
    """
    return [(n, int(m.mask(threshold).sum()), m.num_units) for n, m in sbp_layers(model)]


def add_noise(model: nn.Module, *, input_noise: bool = True, skip_output: bool = True,
              threshold: float = 1.0, init_log_sigma: float = -5.0,
              before_bias: bool = True, inplace: bool = False) -> nn.Module:
    """Insert :class:`SBPNoise` layers into ``model``.

    Noise goes on the output units of every ``nn.Linear`` / ``nn.Conv{1,2,3}d`` except the
    last linear layer when ``skip_output`` (the class scores), and — with ``input_noise`` — on
    the input features of the first linear layer (e.g. the 784 pixels of LeNet-500-300, the 800
    flattened features of LeNet5). The output noise acts before the bias, ``θ ⊙ (W x) + b``:
    the layer's bias is moved into the inserted :class:`SBPNoise` (``<layer>_sbp.bias``; the
    layer becomes bias-free). A layer directly followed by BatchNorm keeps its bias and gets
    the noise after the BatchNorm, whose shift plays the bias's role. ``before_bias=False``
    multiplies the whole output instead, ``θ ⊙ (W x + b)`` (not the paper's placement): a
    removed unit then outputs exactly 0, so :func:`prune` never needs a per-position
    :class:`PositionBias` (which ties the pruned model to one input size) where a biased layer
    feeds a *padded* convolution. Layers inside an
    ``nn.Sequential`` get the noise inserted next to them; other layers are wrapped in an
    ``nn.Sequential``. Returns a modified deep copy unless ``inplace``.

    Example:
        >>> net = add_noise(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 30),
        ...                                     torch.nn.ReLU(), torch.nn.Linear(30, 10)))
        >>> [m.num_units for _, m in sbp_layers(net)]
        [784, 30]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_threshold("threshold", threshold)
    if not isinstance(before_bias, bool):
        raise TypeError(f"before_bias must be a bool, got {before_bias!r}")
    if sbp_layers(model):
        raise ValueError("model already contains SBPNoise layers")
    producers = [(n, m) for n, m in model.named_modules() if isinstance(m, _PRODUCERS)]
    for n, m in producers:
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) and m.groups != 1:
            raise ValueError(f"layer {n!r}: grouped convolutions are not supported")
    if not producers:
        raise ValueError("model has no nn.Linear / nn.Conv layers to put SBP noise on")
    linears = [n for n, m in producers if isinstance(m, nn.Linear)]
    targets = [n for n, _ in producers if not (skip_output and linears and n == linears[-1])]
    first_linear = linears[0] if (input_noise and linears) else None
    if not targets and first_linear is None:
        raise ValueError("model has no prunable layers (its only layer is the output layer)")
    net = model if inplace else copy.deepcopy(model)
    named = dict(net.named_modules())

    def make(units: int) -> SBPNoise:
        return SBPNoise(units, threshold=threshold, init_log_sigma=init_log_sigma)

    def make_out(layer: nn.Module, units: int) -> SBPNoise:
        """Output noise directly after ``layer``: takes over the layer's bias (noise first)."""
        bias = layer.bias if before_bias else None
        noise = SBPNoise(units, threshold=threshold, init_log_sigma=init_log_sigma,
                         bias=bias is not None)
        if bias is not None:
            assert noise.bias is not None
            noise.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
            layer.bias = None
        return noise

    plan: dict[str, tuple[int | None, int | None]] = {}
    for n, m in producers:
        out_units = (m.out_features if isinstance(m, nn.Linear) else m.out_channels)
        in_units = m.in_features if isinstance(m, nn.Linear) else None
        plan[n] = (in_units if n == first_linear else None, out_units if n in targets else None)
    for n, (in_units, out_units) in plan.items():
        parent_name, _, attr = n.rpartition(".")
        parent = named[parent_name] if n else None
        layer = named[n]
        if isinstance(parent, nn.Sequential):
            children = list(parent._modules.items())
            new: list[tuple[str, nn.Module]] = []
            for key, child in children:
                if child is layer and in_units is not None:
                    new.append((f"{key}_sbp_in", make(in_units)))
                new.append((key, child))
            # output noise goes after the layer, or after a BatchNorm that directly follows it
            idx = [i for i, (_, c) in enumerate(new) if c is layer][0]
            if out_units is not None:
                nxt = new[idx + 1][1] if idx + 1 < len(new) else None
                if isinstance(nxt, nn.modules.batchnorm._BatchNorm):
                    new.insert(idx + 2, (f"{new[idx + 1][0]}_sbp", make(out_units)))
                else:
                    new.insert(idx + 1, (f"{new[idx][0]}_sbp", make_out(layer, out_units)))
            parent._modules.clear()
            for key, child in new:
                parent._modules[key] = child
        else:
            seq: list[nn.Module] = []
            if in_units is not None:
                seq.append(make(in_units))
            seq.append(layer)
            if out_units is not None:
                seq.append(make_out(layer, out_units))
            if parent is None:  # the model itself is a bare layer
                return nn.Sequential(*seq)
            setattr(parent, attr, nn.Sequential(*seq))
    return net


# --------------------------------------------------------------------------------------------
# Pruning
# --------------------------------------------------------------------------------------------
class IndexSelect(nn.Module):
    """Keep the entries ``index`` of dimension 1 (used by pruned models to drop inputs).

    Example:
        >>> IndexSelect([0, 2])(torch.arange(6.).view(2, 3)).tolist()
        [[0.0, 2.0], [3.0, 5.0]]
    """

    def __init__(self, index: Any) -> None:
        super().__init__()
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"{self.index.numel()} entries"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.index)


class ChannelScale(nn.Module):
    """Multiply dim 1 by a fixed vector (fallback when a multiplier cannot be absorbed).

    :func:`prune` inserts it where E[θ] of kept units cannot be folded into a neighbouring
    layer's weights (e.g. when no linear layer follows).

    Example:
        >>> ChannelScale(torch.tensor([1.0, 2.0]))(torch.ones(1, 2, 3, 3))[0, :, 0, 0]
        tensor([1., 2.])
    """

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        if not isinstance(scale, torch.Tensor) or scale.dim() != 1 or not scale.is_floating_point():
            raise TypeError("scale must be a 1-D floating-point tensor (one factor per channel)")
        self.register_buffer("scale", scale.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view((1, -1) + (1,) * (x.dim() - 2))


class PositionBias(nn.Module):
    """Add a fixed per-position bias map (used by pruned models, see :func:`prune`).

    A removed channel still outputs a constant (its bias); where it fed a zero-padded
    convolution, its contribution is that constant everywhere except near the borders, where
    the padding zeros enter. ``prune`` folds the interior value into the convolution's bias
    and keeps the border correction here, which ties the pruned network to the spatial input
    size it was built for (other sizes raise ``ValueError``).

    Example:
        >>> PositionBias(torch.ones(2, 3, 3))(torch.zeros(1, 2, 3, 3)).sum().item()
        18.0
    """

    def __init__(self, bias_map: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("bias_map", bias_map.detach().clone())

    def extra_repr(self) -> str:
        return f"shape={tuple(self.bias_map.shape)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != self.bias_map.shape:
            raise ValueError(f"this pruned layer was built for inputs of shape (N, "
                             f"{', '.join(map(str, self.bias_map.shape))}) (the spatial size of "
                             f"prune's example_input), got {tuple(x.shape)}")
        return x + self.bias_map


_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                nn.Dropout3d, nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_ELEMENTWISE = (nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.SiLU, nn.Softplus, nn.ReLU6,
                nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.SELU, nn.CELU,
                nn.Softsign, nn.Tanhshrink)
_BN = nn.modules.batchnorm._BatchNorm


def _leaves(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in module.named_modules():
        if not list(m.children()):
            yield name, m


def _is_linear_pool(m: nn.Module) -> bool:
    return isinstance(m, nn.AvgPool1d | nn.AvgPool2d | nn.AvgPool3d | nn.AdaptiveAvgPool1d
                      | nn.AdaptiveAvgPool2d | nn.AdaptiveAvgPool3d)


def _const_through(m: nn.Module, const: torch.Tensor, name: str) -> torch.Tensor:
    """Value of a removed (input-independent, spatially constant) channel after module m."""
    if isinstance(m, (nn.ReLU, nn.LeakyReLU, *_ELEMENTWISE)):
        with torch.no_grad():
            return m(const.view(1, -1).clone()).view(-1)
    if isinstance(m, nn.AvgPool1d | nn.AvgPool2d | nn.AvgPool3d):
        pad = m.padding if isinstance(m.padding, tuple | list) else (m.padding,)
        if any(p != 0 for p in pad) and bool((const != 0).any()):
            raise ValueError(f"layer {name!r}: a removed channel with a non-zero constant value "
                             "passes through a padded average pooling; cannot prune exactly")
    return const


def prune(model: nn.Module, snr_threshold: float | None = 1.0, *,
          example_input: torch.Tensor) -> nn.Sequential:
    """Remove units with ``SNR ≤ snr_threshold`` and return a physically smaller network.

    Every SBP layer's ``E[θ]`` is absorbed into the next linear/conv layer's input weights
    (or, where an activation that is not positively homogeneous sits in between, into the
    previous layer's output rows / BatchNorm affine, or as a last resort a ``ChannelScale``);
    an SBP layer with a bias (noise before the bias, see :func:`add_noise`) is absorbed into
    its layer's output rows and gives that layer back its bias. Removed channels/units are
    dropped from both neighbouring layers and removed inputs of the first layer with an
    :class:`IndexSelect`. A removed unit outputs a constant (its bias, passed through the
    following element-wise ops and poolings; 0 without a bias); that constant is folded into
    the next layer's bias. This is exact for linear consumers and unpadded convolutions. A
    non-zero constant feeding a zero-*padded* convolution differs near the borders, where the
    padding enters: that correction becomes a :class:`PositionBias` after the convolution,
    built for the spatial size of ``example_input`` (other sizes then raise ``ValueError``;
    zero constants, e.g. bias-free layers or BatchNorm nets, need no map). The
    result is a plain
    ``nn.Sequential`` in eval mode whose output equals ``model.eval()``'s output (with SBP
    thresholds equal to ``snr_threshold``) to float rounding; this is checked on
    ``example_input``. ``snr_threshold=None`` uses each layer's own ``threshold``.

    Only Sequential-style graphs are supported (leaf modules applied in registration order;
    checked on ``example_input``); a layer whose every unit is pruned raises ``ValueError``
    (the network output would no longer depend on the input). The original model is not
    modified.

    Example:
        >>> net = add_noise(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3),
        ...                                     torch.nn.ReLU(), torch.nn.Linear(3, 2)))
        >>> with torch.no_grad():
        ...     net[3].mu[:2] = -20.0; net[3].log_sigma[:2] = 3.0  # two hidden units: SNR < 1
        >>> small = prune(net, example_input=torch.zeros(1, 4))
        >>> small[1].out_features
        1
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    thr = None if snr_threshold is None else _check_threshold("snr_threshold", snr_threshold)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise TypeError("example_input must be a batched tensor (N, ...)")
    if not sbp_layers(model):
        raise ValueError("model has no SBPNoise layers: nothing to prune (use add_noise first)")
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"model has non-finite values in {name!r}: nothing sound to prune")
    chain = list(_leaves(model))
    for name, m in chain:
        ok = isinstance(m, (*_PRODUCERS, SBPNoise, nn.Flatten, _BN)) or isinstance(
            m, _HOMOGENEOUS + _ELEMENTWISE)
        if not ok:
            raise TypeError(f"prune: unsupported module {name!r} ({type(m).__name__})")
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) and (
                m.groups != 1 or m.padding_mode != "zeros"):
            raise ValueError(f"layer {name!r}: only groups=1, zero-padded convolutions")
        if isinstance(m, nn.Flatten) and (m.start_dim != 1 or m.end_dim != -1):
            raise ValueError(f"layer {name!r}: only nn.Flatten(start_dim=1, end_dim=-1)")
        if isinstance(m, _BN) and not m.track_running_stats:
            raise ValueError(f"layer {name!r}: BatchNorm without running statistics")
    for k, (name, m) in enumerate(chain):
        if isinstance(m, SBPNoise) and m.bias is not None and (
                k == 0 or not isinstance(chain[k - 1][1], _PRODUCERS)
                or chain[k - 1][1].bias is not None):
            raise ValueError(f"SBP layer {name!r} has a bias but does not directly follow a "
                             "bias-free linear/conv layer (as add_noise places it)")

    with kept_modes(model):
        model.eval()
        x = example_input.detach()
        with torch.no_grad():
            ref_model = model(x)
            shapes: list[tuple[int, ...]] = []
            mults: dict[int, torch.Tensor] = {}
            h = x  # the chain with the SBP layers' own thresholds must reproduce model(x)
            for _, m in chain:
                h = m(h)
            tol = 1e-5 * (1.0 + ref_model.abs().max().item())
            if h.shape != ref_model.shape or not (h - ref_model).abs().max().item() <= tol:
                raise ValueError("prune supports Sequential-style models only: applying the "
                                 "leaf modules in registration order does not reproduce model(x)")
            h = x  # reference at `snr_threshold`, recording every module's input shape
            for i, (_, m) in enumerate(chain):
                shapes.append(tuple(h.shape))
                if isinstance(m, SBPNoise):
                    mults[i] = m.multiplier(thr).cpu()
                    h = m._add_bias(h * mults[i].to(h).view((1, -1) + (1,) * (h.dim() - 2)))
                else:
                    h = m(h)
            reference = h
        pruned = _build(chain, shapes, mults).to(x.device)
        pruned.eval()
        with torch.no_grad():
            out = pruned(x)
        tol = 1e-4 * (1.0 + reference.abs().max().item())
        if not (out - reference).abs().max().item() <= tol:  # pragma: no cover - internal check
            raise RuntimeError("internal error: pruned network does not reproduce the model")
        return pruned


def _build(chain: list[tuple[str, nn.Module]], shapes: list[tuple[int, ...]],
           mults: dict[int, torch.Tensor]) -> nn.Sequential:
    """Assemble the pruned network segment by segment (segments end at linear/conv layers)."""
    prod_idx = [i for i, (_, m) in enumerate(chain) if isinstance(m, _PRODUCERS)]
    # float64 working copies of producer weights / biases
    W: dict[int, torch.Tensor] = {}
    B: dict[int, torch.Tensor] = {}
    for i in prod_idx:
        m = chain[i][1]
        W[i] = m.weight.detach().double().cpu().clone()
        B[i] = (m.bias.detach().double().cpu().clone() if m.bias is not None
                else torch.zeros(W[i].shape[0], dtype=torch.float64))
    # per-position bias maps of padded convolutions fed by removed non-zero constants
    border: dict[int, torch.Tensor] = {}

    def scale_rows(i: int, factor: torch.Tensor) -> None:
        """Scale output channel/unit rows of producer ``i`` (weights, bias, border map)."""
        W[i] = W[i] * factor.view((-1,) + (1,) * (W[i].dim() - 1))
        B[i] = B[i] * factor
        if i in border:
            border[i] = border[i] * factor.view((-1,) + (1,) * (border[i].dim() - 1))

    bn_params: dict[int, dict[str, torch.Tensor]] = {}
    segments: list[tuple[int | None, list[int], int | None]] = []
    bounds = [None, *prod_idx]
    for k, start in enumerate(bounds):
        end = prod_idx[k] if k < len(prod_idx) else None
        lo = 0 if start is None else start + 1
        hi = len(chain) if end is None else end
        segments.append((start, list(range(lo, hi)), end))

    out_modules: list[nn.Module] = []
    for start, ops, end in segments:
        if start is None and end is None:
            raise ValueError("model has no linear/conv layers")
        if end is not None and isinstance(chain[end][1], nn.Linear) and len(shapes[end]) != 2:
            raise ValueError(f"layer {chain[end][0]!r}: linear layers must receive (N, F) input")
        # an SBP layer with a bias directly after `start`: θ ⊙ (W x) + b. Its multiplier goes
        # into W's rows, its bias becomes the layer's bias; removed units output b.
        pre_bias: int | None = None
        if start is not None and ops and isinstance(chain[ops[0]][1], SBPNoise) \
                and chain[ops[0]][1].bias is not None:
            pre_bias = ops[0]
            noise_b = chain[pre_bias][1].bias.detach().double().cpu()
            if noise_b.numel() != W[start].shape[0]:
                raise ValueError(f"SBP layer {chain[pre_bias][0]!r} does not match its input "
                                 "width")
            # B[start] so far holds constants folded in from removed inputs: they are part of
            # W x, so the noise scales them too
            scale_rows(start, mults[pre_bias])
            B[start] = B[start] + noise_b
        if start is not None:
            c0 = W[start].shape[0]
        else:
            c0 = shapes[ops[0]][1] if ops else shapes[end][1]
        # Pre-pass: where does each SBP multiplier go?  forward into `end`'s columns when only
        # positively homogeneous ops follow; else backward into the last affine op (`start` or a
        # BatchNorm) when only homogeneous channel-wise ops lie between; else a ChannelScale.
        fwd_ok: dict[int, bool] = {}
        tail_ok = end is not None
        for i in reversed(ops):
            m = chain[i][1]
            if isinstance(m, SBPNoise):
                fwd_ok[i] = tail_ok and i != pre_bias
            elif not isinstance(m, _HOMOGENEOUS + (nn.Flatten,)):
                tail_ok = False
        back_scale: dict[int, torch.Tensor] = {}
        fallback: set[int] = set()
        target: int | None = start
        for i in ops:
            m = chain[i][1]
            if isinstance(m, _BN):
                target = i
            elif i == pre_bias:
                continue  # already in `start`'s rows and bias
            elif isinstance(m, SBPNoise) and not fwd_ok[i]:
                if target is None:
                    fallback.add(i)
                else:
                    mult = mults[i]
                    back_scale[target] = back_scale.get(target, torch.ones_like(mult)) * mult
            elif not isinstance(m, _HOMOGENEOUS + (SBPNoise,)):
                target = None
        # Simulate which units are alive, the constant value of removed ones, forward scale.
        alive = torch.ones(c0, dtype=torch.bool)
        const = torch.zeros(c0, dtype=torch.float64)
        fscale = torch.ones(c0, dtype=torch.float64)
        spatial: int | None = None
        for i in ops:
            name, m = chain[i]
            if isinstance(m, SBPNoise):
                mult = mults[i]
                if mult.numel() != alive.numel():
                    raise ValueError(f"SBP layer {name!r} does not match its input width")
                if not bool(((mult > 0) & alive).any()):
                    raise ValueError(
                        f"every unit of SBP layer {name!r} is pruned at this threshold: the "
                        "network output would not depend on the input; lower snr_threshold")
                const = const * mult
                if m.bias is not None:
                    const = const + m.bias.detach().double().cpu()
                alive = alive & (mult > 0)
                if fwd_ok[i]:
                    fscale = fscale * mult
            elif isinstance(m, nn.Flatten):
                if spatial is not None:
                    raise ValueError(f"layer {name!r}: two Flatten layers between linear layers")
                s = shapes[i]
                spatial = math.prod(s[2:]) if len(s) > 2 else 1
                alive = alive.repeat_interleave(spatial)
                const = const.repeat_interleave(spatial)
                fscale = fscale.repeat_interleave(spatial)
            elif isinstance(m, _BN):
                if spatial is not None:
                    raise ValueError(f"layer {name!r}: BatchNorm after Flatten is not supported")
                std = torch.sqrt(m.running_var.double().cpu() + m.eps)
                g = m.weight.detach().double().cpu() if m.affine else torch.ones_like(std)
                b = m.bias.detach().double().cpu() if m.affine else torch.zeros_like(std)
                mean = m.running_mean.double().cpu()
                const = torch.where(alive, const, g * (const - mean) / std + b)
                scale = back_scale.get(i, torch.ones_like(std))
                bn_params[i] = {"g": g * scale, "b": b * scale}
            else:
                const = torch.where(alive, const, _const_through(m, const, name))
        alive_end = alive if end is not None else torch.ones_like(alive)
        # channel-level keep: rows of `start` (or an input gather when there is no `start`)
        keep_ch = alive_end.view(-1, spatial).any(dim=1) if spatial is not None else alive_end
        ch_idx = keep_ch.nonzero().view(-1)
        if start is not None:
            if start in back_scale:
                scale_rows(start, back_scale[start])
            out_modules.append(_make_producer(chain[start][1], W[start][ch_idx], B[start][ch_idx]))
            if start in border:
                dtype = chain[start][1].weight.dtype
                out_modules.append(PositionBias(border[start][ch_idx].to(dtype)))
        elif not bool(keep_ch.all()):
            out_modules.append(IndexSelect(ch_idx))
        # the ops of the segment, sliced to the kept channels / features
        present = ch_idx  # indices (in the unpruned layout) of the entries present right now
        for i in ops:
            name, m = chain[i]
            if isinstance(m, SBPNoise):
                if i in fallback:
                    out_modules.append(ChannelScale(mults[i][present].to(m.mu.dtype)))
            elif isinstance(m, nn.Flatten):
                out_modules.append(nn.Flatten())
                assert spatial is not None
                present = _feat_index(keep_ch, spatial)
                sel = alive_end[present]
                if not bool(sel.all()):
                    out_modules.append(IndexSelect(sel.nonzero().view(-1)))
                    present = present[sel]
            elif isinstance(m, _BN):
                out_modules.append(_make_bn(m, bn_params[i], ch_idx))
            else:
                out_modules.append(copy.deepcopy(m))
        # columns of `end`: drop removed inputs (absorbing constant ones into the bias), scale
        if end is not None:
            w = W[end]
            dead = ~alive_end
            if bool((const[dead] != 0).any()):
                cd = torch.where(dead, const, torch.zeros_like(const))
                if w.dim() == 2:
                    B[end] = B[end] + w @ cd
                else:
                    interior = w.sum(dim=tuple(range(2, w.dim()))) @ cd
                    B[end] = B[end] + interior
                    conv = chain[end][1]
                    pad = conv.padding  # "valid", "same" or a tuple
                    if pad == "same" or (not isinstance(pad, str) and any(p != 0 for p in pad)):
                        border[end] = _border_correction(conv, w, cd, shapes[end], interior)
            cols = alive_end.nonzero().view(-1)
            W[end] = w[:, cols] * fscale[cols].view((1, -1) + (1,) * (w.dim() - 2))
    return nn.Sequential(*out_modules)


def _border_correction(conv: nn.Module, w: torch.Tensor, const: torch.Tensor,
                       in_shape: tuple[int, ...], interior: torch.Tensor) -> torch.Tensor:
    """Exact output of a zero-padded ``conv`` for inputs constant per channel (``const``),
    minus its interior value: non-zero only where the padding enters the receptive field."""
    x = const.view((1, -1) + (1,) * (len(in_shape) - 2)).expand((1, -1) + tuple(in_shape[2:]))
    with torch.no_grad():
        full = conv._conv_forward(x.contiguous(), w, None)[0]
    return full - interior.view((-1,) + (1,) * (full.dim() - 1))


def _feat_index(keep_ch: torch.Tensor, spatial: int) -> torch.Tensor:
    """Flat feature indices (in the unpruned layout) of the kept channels."""
    base = keep_ch.nonzero().view(-1, 1) * spatial
    return (base + torch.arange(spatial).view(1, -1)).view(-1)


def _make_producer(m: nn.Module, w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    dtype = m.weight.dtype
    if isinstance(m, nn.Linear):
        new: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=True)
    else:
        new = type(m)(w.shape[1], w.shape[0], m.kernel_size, stride=m.stride, padding=m.padding,
                      dilation=m.dilation, bias=True)
    new = new.to(dtype=dtype)
    with torch.no_grad():
        new.weight.copy_(w.to(dtype))
        new.bias.copy_(b.to(dtype))
    return new


def _make_bn(m: nn.Module, p: dict[str, torch.Tensor], idx: torch.Tensor) -> nn.Module:
    dtype = m.running_mean.dtype
    new = type(m)(idx.numel(), eps=m.eps, momentum=m.momentum, affine=True,
                  track_running_stats=True, dtype=dtype)
    with torch.no_grad():
        new.running_mean.copy_(m.running_mean.cpu()[idx])
        new.running_var.copy_(m.running_var.cpu()[idx])
        new.weight.copy_(p["g"][idx].to(dtype))
        new.bias.copy_(p["b"][idx].to(dtype))
    return new
