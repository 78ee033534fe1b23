"""TRIP: the tensor-ring induced prior (Kuznetsov et al., 2019).

A TRIP over ``z in R^D`` attaches ``d`` one-dimensional Gaussians ``N(mu_kj, sigma_kj^2)`` to every
latent dimension ``k`` and a non-negative core ``Q_k in R^{d x m x m}`` (``m`` is the ring rank).
The density is a mixture of ``d^D`` Gaussians whose weights form a tensor ring::

    p(z) = Tr(prod_k sum_j Q_k[j] N(z_k | mu_kj, sigma_kj^2)) / Tr(prod_k sum_j Q_k[j])

Everything is computed in ``O(D (d m^2 + m^3))`` per point without enumerating components.
Because all factors are non-negative there is no cancellation: the Gaussian weights are shifted
so every factor's largest entry lies in ``[1, d]``, the running product is rescaled by its
maximum after every step and the logs of the scales are accumulated, which keeps float32
accurate to rounding at large ``D``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bdlkit._checks import check_positive_int

__all__ = ["TRIP"]

_LOG_2PI = math.log(2.0 * math.pi)




def _normalise(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide each trailing ``m x m`` matrix by its max entry; return (matrix, log scale)."""
    scale = mat.detach().amax(dim=(-2, -1)).clamp_min(torch.finfo(mat.dtype).tiny)
    return mat / scale[..., None, None], scale.log()


def _log_trace_of_chain(mats: torch.Tensor) -> torch.Tensor:
    """``log Tr(mats[0] @ mats[1] @ ... @ mats[K-1])`` for non-negative matrices.

    ``mats`` has shape ``(K, B, m, m)``; returns shape ``(B,)``. Neighbouring factors are
    multiplied pairwise (a tree: ``ceil(log2 K)`` batched matmuls, few Python-level ops) and
    every partial product is renormalised by its max entry, accumulating the log scales.
    The pairs are taken with ``unflatten``/``unbind`` (and the odd factor with ``split``)
    rather than strided slices: their backward is one stack/cat instead of zero-filling a
    full-size gradient per slice, which made the backward ~25 % slower.
    """
    log_scale = torch.zeros(mats.shape[1], dtype=mats.dtype, device=mats.device)
    while mats.shape[0] > 1:
        k = mats.shape[0]
        half = k // 2
        last: torch.Tensor | None = None
        if k % 2:
            mats, last = mats.split([2 * half, 1])
        left, right = mats.unflatten(0, (half, 2)).unbind(1)
        prod, ls = _normalise(torch.matmul(left, right))
        log_scale = log_scale + ls.sum(0)
        mats = prod if last is None else torch.cat([prod, last])
    trace = torch.diagonal(mats[0], dim1=-2, dim2=-1).sum(-1)
    return log_scale + trace.log()


def _kmeans(x: torch.Tensor, k: int, n_iter: int, generator: torch.Generator | None
            ) -> torch.Tensor:
    """Labels of a k-means++ seeded Lloyd clustering of the rows of ``x``, shape ``(N,)``."""
    n = x.shape[0]
    first = torch.randint(0, n, (1,), generator=generator)
    centres = x[first]
    d2 = ((x - centres) ** 2).sum(-1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / n)
        nxt = torch.multinomial(probs, 1, generator=generator)
        centres = torch.cat([centres, x[nxt]])
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(-1))
    labels = torch.cdist(x, centres).argmin(-1)
    for _ in range(n_iter):
        onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)
        counts = onehot.sum(0)
        new = (onehot.T @ x) / counts.clamp_min(1)[:, None]
        centres = torch.where(counts[:, None] > 0, new, centres)
        new_labels = torch.cdist(x, centres).argmin(-1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels


class TRIP(nn.Module):
    """Tensor-ring induced prior: a learnable mixture of ``d^D`` diagonal Gaussians.

    Args:
        dim: latent dimension ``D``.
        n_components: Gaussians per dimension ``d``.
        rank: tensor-ring rank ``m``.
        mean_range: initial means are spread uniformly over ``[-mean_range, mean_range]``.
        init_std: initial standard deviation of every Gaussian (a *standard deviation*, not a
            variance).

    Parameters are ``raw_means`` (D x d), ``log_stds`` (D x d) and ``log_cores`` (D x d x m x m);
    the cores are ``exp(log_cores)``, a smooth positive parametrisation. The effective mixture
    parameters are exposed as :attr:`means`, :attr:`stds` and :attr:`cores`.

    Missing dimensions (NaN in ``z`` or ``observed=False``) are marginalised exactly by
    replacing their factor with ``sum_j Q_k[j]``; the caller's tensor is never modified.

    Example:
        >>> prior = TRIP(dim=4, n_components=3, rank=2)
        >>> z = prior.sample(5)
        >>> prior.log_prob(z).shape
        torch.Size([5])
        >>> zc = z.clone(); zc[:, 2:] = float("nan")
        >>> torch.allclose(prior.sample(5, condition=zc)[:, :2], z[:, :2])
        True
    """

    def __init__(
        self,
        dim: int,
        n_components: int,
        rank: int,
        *,
        mean_range: float = 2.0,
        init_std: float = 0.5,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.n_components = check_positive_int("n_components", n_components)
        self.rank = check_positive_int("rank", rank)
        if not (math.isfinite(mean_range) and mean_range >= 0):
            raise ValueError(f"mean_range must be finite and >= 0, got {mean_range}")
        if not (math.isfinite(init_std) and init_std > 0):
            raise ValueError(f"init_std must be finite and > 0, got {init_std}")
        D, d, m = dim, n_components, rank
        # (linspace(-r, r, 1) would be [-r]: a single component starts at 0)
        means = (torch.linspace(-mean_range, mean_range, d) if d > 1 else torch.zeros(1))
        means = means.expand(D, d).clone()
        self.raw_means = nn.Parameter(means)
        self.log_stds = nn.Parameter(torch.full((D, d), math.log(init_std)))
        # Identity-dominated cores with a little noise: close to a product of independent
        # mixtures at the start, with off-diagonal mass so the ring can learn correlations.
        base = torch.eye(m) + 0.1
        noise = 0.1 * torch.randn(D, d, m, m)
        self.log_cores = nn.Parameter(base.log().expand(D, d, m, m) + noise)

    # ------------------------------------------------------------------ parameters
    @property
    def means(self) -> torch.Tensor:
        """Component means, shape ``(D, d)``."""
        return self.raw_means

    @property
    def stds(self) -> torch.Tensor:
        """Component standard deviations, shape ``(D, d)``."""
        return self.log_stds.exp()

    @property
    def cores(self) -> torch.Tensor:
        """Non-negative tensor-ring cores, shape ``(D, d, m, m)``."""
        return self.log_cores.exp()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_components={self.n_components}, rank={self.rank}"

    def _check_parameters(self) -> None:
        for name, p in (
            ("raw_means", self.raw_means),
            ("log_stds", self.log_stds),
            ("log_cores", self.log_cores),
        ):
            if not bool(torch.isfinite(p).all()):
                raise ValueError(f"TRIP parameter {name} contains non-finite values")

    def _scaled_cores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cores divided by their per-dimension maximum; returns (cores, log scale per dim)."""
        lc = self.log_cores
        mx = lc.detach().amax(dim=(1, 2, 3))
        return (lc - mx[:, None, None, None]).exp(), mx

    # ------------------------------------------------------------------ validation
    def _prepare(
        self, z: torch.Tensor, observed: torch.Tensor | None, name: str
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """Validate ``z``; return (flattened filled z, flattened observed mask, batch shape)."""
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if not z.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {z.dtype}")
        if z.dim() < 1 or z.shape[-1] != self.dim:
            raise ValueError(
                f"{name} must have shape (..., {self.dim}), got {tuple(z.shape)}"
            )
        nan = torch.isnan(z)
        if bool(torch.isinf(z).any()):
            raise ValueError(f"{name} contains infinite values")
        if observed is not None:
            if not isinstance(observed, torch.Tensor) or observed.dtype != torch.bool:
                raise TypeError("observed must be a bool tensor")
            try:
                observed = torch.broadcast_to(observed, z.shape)
            except RuntimeError:
                raise ValueError(
                    f"observed of shape {tuple(observed.shape)} does not broadcast to "
                    f"{name} of shape {tuple(z.shape)}"
                ) from None
            obs = observed & ~nan
        else:
            obs = ~nan
        batch_shape = tuple(z.shape[:-1])
        z_flat = torch.where(obs, z, torch.zeros((), dtype=z.dtype, device=z.device))
        return z_flat.reshape(-1, self.dim), obs.reshape(-1, self.dim), batch_shape

    # ------------------------------------------------------------------ densities
    def _component_log_density(self, z: torch.Tensor) -> torch.Tensor:
        """``log N(z_k | mu_kj, sigma_kj^2)``, shape ``(B, D, d)``."""
        diff = (z[:, :, None] - self.means) / self.stds
        return -0.5 * (diff * diff + _LOG_2PI) - self.log_stds

    def _chunk_rows(self) -> int:
        """Rows per block of :meth:`_log_weighted_chain`: about ``2**21`` chain entries.

        The chain's working set is ``D * rows * m * m`` floats; keeping it near cache size
        is 2-3x faster per point than one huge block (e.g. the 8192-row blocks of an
        importance-weighted evaluation), and bounds memory. Results do not depend on it:
        every row is computed independently.
        """
        return max(64, (1 << 21) // (self.dim * self.rank * self.rank))

    def _log_weighted_chain(self, log_w: torch.Tensor) -> torch.Tensor:
        """``log Tr(prod_k sum_j exp(log_w[:, k, j]) Q_k[j])`` for a batch of weights (B, D, d)."""
        q, q_log_scale = self._scaled_cores()  # (D, d, m, m), max entry 1 per dimension
        log_qmax = q.detach().amax(dim=(-2, -1)).log()  # (D, d)
        D, m = self.dim, self.rank
        q_flat = q.reshape(D, self.n_components, m * m)

        def block(lw: torch.Tensor) -> torch.Tensor:
            # shift so that max_j w_kj * max(Q_k[j]) = 1: every factor's max entry is in [1, d]
            shift = (lw.detach() + log_qmax).amax(-1)  # (b, D)
            # A dimension whose every component density underflowed (z far from all means)
            # has shift -inf: shift by 0 instead, so the row's density is 0, not 0 / 0 = NaN.
            shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
            w = (lw - shift[..., None]).exp()
            mats = torch.bmm(w.transpose(0, 1), q_flat).reshape(D, -1, m, m)  # (D, b, m, m)
            return _log_trace_of_chain(mats) + shift.sum(-1)

        rows = self._chunk_rows()
        if log_w.shape[0] <= rows:
            out = block(log_w)
        else:
            out = torch.cat([block(lw) for lw in log_w.split(rows)])
        return out + q_log_scale.sum()

    def log_normaliser(self) -> torch.Tensor:
        """``log Tr(prod_k sum_j Q_k[j])`` (a scalar tensor)."""
        self._check_parameters()
        q, q_log_scale = self._scaled_cores()
        out = _log_trace_of_chain(q.sum(1)[:, None])[0] + q_log_scale.sum()
        if not bool(torch.isfinite(out)):
            raise ValueError(
                f"the ring's normaliser is not finite in {q.dtype}: the log-cores of one "
                "dimension span too many orders of magnitude (use .double(), or keep the "
                "cores closer to each other)")
        return out

    def log_prob(self, z: torch.Tensor, observed: torch.Tensor | None = None) -> torch.Tensor:
        """Log density of ``z`` (shape ``(..., D)``), marginalising NaN / unobserved dims.

        Args:
            z: points, shape ``(..., D)``. NaN entries are treated as missing.
            observed: optional bool mask broadcastable to ``z``; ``False`` marks missing dims.

        Returns:
            Tensor of shape ``z.shape[:-1]``: the (marginal) log density of the observed dims.

        Raises:
            ValueError: wrong last dimension, infinite values, a row with no observed dim,
                or non-finite parameters.
        """
        self._check_parameters()
        z_flat, obs, batch_shape = self._prepare(z, observed, "z")
        if z_flat.shape[0] and not bool(obs.any(-1).all()):
            raise ValueError("z has rows in which every dimension is missing (NaN/unobserved)")
        z_flat = z_flat.to(self.raw_means.dtype)
        log_n = self._component_log_density(z_flat)
        log_n = torch.where(obs[:, :, None], log_n, torch.zeros_like(log_n))
        out = self._log_weighted_chain(log_n) - self.log_normaliser()
        return out.reshape(batch_shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`log_prob`."""
        return self.log_prob(z)

    # ------------------------------------------------------------------ sampling
    def _sample_indices(
        self,
        n: int,
        log_w: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Exact ancestral sampling of component indices ``(n, D)``.

        With ``log_w`` (shape ``(n, D, d)``) indices are drawn from the distribution
        proportional to ``Tr(prod_k w[k, j_k] Q_k[j_k])`` (the posterior over components given
        observed dims); without it from ``Tr(prod_k Q_k[j_k])``.
        """
        q, _ = self._scaled_cores()
        D, d, m = self.dim, self.n_components, self.rank
        eye = torch.eye(m, dtype=q.dtype, device=q.device)
        if log_w is None:
            w = None
            sums = q.sum(1)  # (D, m, m)
        else:
            top = log_w.amax(-1, keepdim=True)
            if not bool(torch.isfinite(top).all()):
                raise ValueError("condition has zero density under every component (a fixed "
                                 "value too far from all means for this dtype)")
            w = (log_w - top).exp()  # (n, D, d)
            sums = torch.einsum("nkj,kjxy->nkxy", w, q)
        # suffix[k] = S_k S_{k+1} ... S_{D-1} (normalised); suffix[D] = I.
        suffix: list[torch.Tensor] = [eye if w is None else eye.repeat(n, 1, 1)]
        for k in range(D - 1, -1, -1):
            suffix.append(_normalise(sums[..., k, :, :] @ suffix[-1])[0])
        suffix.reverse()
        left: torch.Tensor | None = None  # prefix product Q_0[j_0] ... Q_{k-1}[j_{k-1}], (n, m, m)
        idx = torch.empty(n, D, dtype=torch.long, device=q.device)
        for k in range(D):
            # p[n, j] = Tr(left_n Q_k[j] suffix_{k+1}) (times w[n, k, j])
            if w is None:
                qr = q[k] @ suffix[k + 1]  # (d, m, m), shared by all samples
                if left is None:
                    p = torch.diagonal(qr, dim1=-2, dim2=-1).sum(-1).expand(n, d)
                else:
                    p = left.reshape(n, m * m) @ qr.transpose(-2, -1).reshape(d, m * m).T
            else:
                rl = suffix[k + 1] if left is None else torch.bmm(suffix[k + 1], left)
                p = rl.transpose(-2, -1).reshape(n, m * m) @ q[k].reshape(d, m * m).T
                p = p * w[:, k, :]
            p = p.clamp_min(0)
            u = torch.rand(n, 1, dtype=p.dtype, device=p.device, generator=generator)
            cdf = p.cumsum(-1)
            total = cdf[:, -1]
            if not bool((torch.isfinite(total) & (total > 0)).all()):
                raise ValueError(f"component probabilities underflowed in {p.dtype} at "
                                 f"dimension {k}; sample in float64 (.double())")
            j = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max(d - 1).squeeze(-1)
            idx[:, k] = j
            qj = q[k][j]  # (n, m, m), contiguous
            left = _normalise(qj if left is None else torch.bmm(left, qj))[0]
        return idx

    @torch.no_grad()
    def sample(
        self,
        n: int,
        condition: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        return_indices: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Exact samples, optionally conditioned on some coordinates.

        Args:
            n: number of samples.
            condition: optional tensor of shape ``(D,)`` or ``(n, D)``; finite entries are kept
                fixed and NaN entries are generated from the conditional distribution.
            generator: optional ``torch.Generator`` for reproducibility.
            return_indices: also return the sampled component indices ``(n, D)``.

        Returns:
            Samples of shape ``(n, D)`` (and the indices if requested).
        """
        n = check_positive_int("n", n)
        self._check_parameters()
        dtype, device = self.raw_means.dtype, self.raw_means.device
        log_w = None
        cond = None
        if condition is not None:
            z_flat, obs, batch_shape = self._prepare(condition, None, "condition")
            if len(batch_shape) == 0:
                z_flat, obs = z_flat.expand(n, -1), obs.expand(n, -1)
            elif batch_shape != (n,):
                raise ValueError(
                    f"condition must have shape ({self.dim},) or ({n}, {self.dim}), "
                    f"got {tuple(condition.shape)}"
                )
            z_flat = z_flat.to(dtype=dtype, device=device)
            obs = obs.to(device)
            log_n = self._component_log_density(z_flat)
            log_w = torch.where(obs[:, :, None], log_n, torch.zeros_like(log_n))
            cond = (z_flat, obs)
        if log_w is None:
            idx = self._sample_indices(n, None, generator)
        else:
            # per-sample suffix products cost n*D*m*m memory: chunk to keep it bounded
            chunk = max(1, (1 << 24) // max(1, self.dim * self.rank * self.rank))
            idx = torch.cat(
                [
                    self._sample_indices(w.shape[0], w, generator)
                    for w in log_w.split(chunk)
                ]
            )
        mu = torch.gather(self.means.expand(n, -1, -1), 2, idx[:, :, None]).squeeze(-1)
        sd = torch.gather(self.stds.expand(n, -1, -1), 2, idx[:, :, None]).squeeze(-1)
        eps = torch.randn(n, self.dim, dtype=dtype, device=device, generator=generator)
        z = mu + sd * eps
        if cond is not None:
            z = torch.where(cond[1], cond[0], z)
        return (z, idx) if return_indices else z

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_from_data(self, z: torch.Tensor, n_iter: int = 50, min_std: float = 1e-2,
                       cluster_init: bool = True, generator: torch.Generator | None = None
                       ) -> TRIP:
        """Initialise from data by fitting a 1-D Gaussian mixture to each dimension (EM).

        Means and stds are set to the fitted components. Cores:

        - ``cluster_init=True`` (default): the data are split into ``rank`` clusters by
          k-means and core ``k`` becomes ``diag_r(P(j | cluster r, dim k))`` (times the cluster
          weight at ``k = 0``) plus a small off-diagonal floor, so the prior starts as a mixture
          of ``rank`` products of per-dimension mixtures, which captures correlations between
          dimensions;
        - ``cluster_init=False``: ``pi_kj * (I + 0.1)`` (plus slight noise), close to the
          product of the fitted per-dimension mixtures (no correlations).

        Args:
            z: data of shape ``(N, D)``, finite, with ``N >= max(n_components, rank)``.
            n_iter: EM (and k-means) iterations.
            min_std: lower bound on each fitted std, relative to the dimension's data std.
            cluster_init: initialise the cores from k-means clusters (see above).
            generator: random generator for the k-means seeding and the noise.

        Returns:
            ``self``.
        """
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError("z must be a floating-point torch.Tensor")
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must have shape (N, {self.dim}), got {tuple(z.shape)}")
        need = max(2, self.n_components, self.rank if cluster_init else 1)  # 2: a std
        if z.shape[0] < need:
            raise ValueError(
                f"z needs at least {need} rows (n_components={self.n_components}"
                + (f", rank={self.rank}" if cluster_init else "") + f"), got {z.shape[0]}"
            )
        if not bool(torch.isfinite(z).all()):
            raise ValueError("z must be finite")
        check_positive_int("n_iter", n_iter)
        if isinstance(min_std, bool) or not isinstance(min_std, (int, float)) \
                or not (math.isfinite(min_std) and min_std > 0):
            raise ValueError(f"min_std must be a finite float > 0, got {min_std!r}")
        x = z.detach().to(torch.float64)
        d = self.n_components
        data_std = x.std(0).clamp_min(1e-6)  # (D,)
        qs = (torch.arange(d, dtype=x.dtype) + 0.5) / d
        xq = x[:: max(1, (x.numel() + (1 << 24) - 1) >> 24)]  # torch.quantile size limit
        mu = torch.quantile(xq, qs, dim=0).T.contiguous()  # (D, d)
        sd = (data_std / d)[:, None].expand(-1, d).clone()
        logpi = torch.full_like(mu, -math.log(d))
        floor = (min_std * data_std)[:, None]
        for _ in range(n_iter):
            diff = (x[:, :, None] - mu) / sd
            logr = logpi - 0.5 * diff * diff - sd.log()
            r = torch.softmax(logr, dim=-1)  # (N, D, d)
            nk = r.sum(0) + 1e-10
            mu = (r * x[:, :, None]).sum(0) / nk
            var = (r * (x[:, :, None] - mu) ** 2).sum(0) / nk
            sd = torch.maximum(var.sqrt(), floor)
            logpi = (nk / nk.sum(-1, keepdim=True)).log()
        m, D = self.rank, self.dim
        noise = 0.01 * torch.randn(D, d, m, m, dtype=x.dtype, generator=generator)
        if cluster_init:
            diff = (x[:, :, None] - mu) / sd
            resp = torch.softmax(logpi - 0.5 * diff * diff - sd.log(), dim=-1)  # (N, D, d)
            labels = _kmeans(x / data_std, m, n_iter, generator)
            onehot = torch.nn.functional.one_hot(labels, m).to(x.dtype)  # (N, m)
            counts = onehot.sum(0)  # (m,)
            # P(j | cluster r, dim k), shape (D, d, m); empty clusters fall back to pi
            cond = torch.einsum("nr,nkj->kjr", onehot, resp) / counts.clamp_min(1)
            cond = torch.where(counts > 0, cond, logpi.exp()[:, :, None])
            cond = cond.clamp_min(1e-4)
            weight = (counts + 1.0) / (counts.sum() + m)  # cluster weights, smoothed
            diag = cond.clone()
            diag[0] = diag[0] * weight
            floor = 1e-3 * diag.mean(dim=(1, 2), keepdim=True)  # (D, 1, 1)
            cores = floor[..., None].expand(D, d, m, m).clone()
            cores = cores + torch.diag_embed(diag)
            log_cores = cores.log() + noise
        else:
            base = (torch.eye(m, dtype=x.dtype) + 0.1).log()
            log_cores = logpi[:, :, None, None] + base + noise
        dt = self.raw_means.dtype
        self.raw_means.copy_(mu.to(dt))
        self.log_stds.copy_(sd.log().to(dt))
        self.log_cores.copy_(log_cores.to(dt))
        return self
