"""SWA and SWAG: a Gaussian posterior over weights from the iterates of one SGD run.

Maddox et al. (2019), "A Simple Baseline for Bayesian Uncertainty in Deep Learning".
The state is three flat buffers: the running mean of the weights, their running second
moment, and the last ``K`` deviations ``theta - mean`` kept as rows of a preallocated
``K x d`` ring buffer. A d x d matrix is never formed.

A sample is ``mean + sqrt(s) * (sigma * z1 + D^T z2 / sqrt(k - 1))`` with
``sigma**2 = clamp(sq_mean - mean**2, min=var_clamp)``, ``z1 ~ N(0, I_d)``, ``z2 ~ N(0, I_k)``
and ``k`` the number of deviation rows collected so far, i.e. the covariance is
``s * (diag(sigma**2) + D^T D / (k - 1))``. ``cov=False`` gives SWAG-Diag, ``scale=0`` gives SWA.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from bdlkit.batchnorm import default_call, has_batchnorm, refresh_bn
from bdlkit.metrics import predictive_entropy
from bdlkit.weights import assign_params, param_spec

__all__ = ["SWAG", "swa_learning_rate", "swa_scheduler"]

_STATE_VERSION = 1
_STATE_KEYS = (
    "version",
    "max_rank",
    "var_clamp",
    "dtype",
    "spec",
    "n_collected",
    "n_deviations",
    "next_row",
    "mean",
    "sq_mean",
    "deviations",
)
_DTYPES = {"float32": torch.float32, "float64": torch.float64}



def _check_scale(scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
    return scale


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return seed


class SWAG:
    """SWA mean, diagonal and low-rank covariance of a model's weights (SWAG).

    Args:
        model: the network being trained. Only its parameter names/shapes are recorded, plus a
            reference used as the template for :meth:`sample` and :meth:`predict` (which copy
            it; the model itself is never modified).
        max_rank: K, the number of most recent deviation columns kept (>= 1; paper: 20).
        device: where the statistics live (e.g. ``"cpu"`` to spare GPU memory).
        dtype: ``torch.float32`` (default) or ``torch.float64`` for the statistics.
        var_clamp: lower clamp of the diagonal variance (> 0).

    The state is exactly ``(max_rank + 2) * d`` numbers of ``dtype``, preallocated.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> swag = SWAG(net, max_rank=5)
        >>> for _ in range(4):
        ...     with torch.no_grad():
        ...         _ = net.weight.add_(0.1 * torch.randn_like(net.weight))
        ...     swag.collect(net)
        >>> sample = swag.sample(scale=0.5, seed=0)   # a plain nn.Linear copy
        >>> swa = swag.sample(scale=0.0)              # the SWA mean
        >>> swag.n_collected, swag.rank
        (4, 4)
    """

    def __init__(
        self,
        model: nn.Module,
        max_rank: int = 20,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        var_clamp: float = 1e-30,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
            raise ValueError(f"max_rank must be an int >= 1, got {max_rank!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
        if isinstance(var_clamp, bool) or not isinstance(var_clamp, (int, float)):
            raise TypeError(f"var_clamp must be a float, got {type(var_clamp).__name__}")
        if not (math.isfinite(var_clamp) and var_clamp > 0):
            raise ValueError(f"var_clamp must be a finite float > 0, got {var_clamp!r}")
        spec = param_spec(model)
        if not spec:
            raise ValueError("model has no parameters")
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                raise TypeError(f"parameter {name!r} is not floating point ({p.dtype})")
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_rank = max_rank
        self.var_clamp = float(var_clamp)
        self._spec = spec
        self._sizes = [math.prod(s) for _, s in spec]
        self.num_params = sum(self._sizes)
        self._model = model
        d = self.num_params
        kw = {"device": self.device, "dtype": dtype}
        self._mean = torch.zeros(d, **kw)
        self._sq_mean = torch.zeros(d, **kw)
        self._dev = torch.zeros(max_rank, d, **kw)  # ring buffer of deviation rows
        self.n_collected = 0
        self._n_dev = 0
        self._next_row = 0

    # ------------------------------------------------------------------ collection
    @property
    def rank(self) -> int:
        """Number of deviation columns currently held (``min(n_collected, max_rank)``)."""
        return self._n_dev

    def _check_model(self, model: Any, argname: str = "model") -> list[torch.Tensor]:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{argname} must be an nn.Module, got {type(model).__name__}")
        named = list(model.named_parameters())
        spec = [(n, tuple(p.shape)) for n, p in named]
        if spec != self._spec:
            diff = _first_difference(self._spec, spec)
            raise ValueError(f"{argname} does not match the model SWAG was built for: {diff}")
        return [p for _, p in named]

    @torch.no_grad()
    def collect(self, model: nn.Module) -> None:
        """Add the current weights of ``model`` to the running moments and deviation buffer.

        Atomic: a model whose parameter names/shapes differ from the original, or whose
        weights are not all finite, raises ``ValueError`` and leaves the state unchanged.

        Example:
            >>> net = nn.Linear(2, 1); swag = SWAG(net); swag.collect(net); swag.n_collected
            1
        """
        params = self._check_model(model)
        bad = [name for (name, _), p in zip(self._spec, params, strict=True)
               if not bool(torch.isfinite(p).all())]
        if bad:
            raise ValueError(f"model has non-finite weights in {bad}; nothing was collected")
        n = self.n_collected
        # The row of the oldest deviation is the only scratch space: theta is written there,
        # so the state stays at (K + 2) * d numbers. Nothing below can fail.
        row = self._dev[self._next_row]
        offset = 0
        for p, size in zip(params, self._sizes, strict=True):
            row[offset : offset + size].copy_(p.detach().reshape(-1))
            offset += size
        self._sq_mean.mul_(n / (n + 1)).addcmul_(row, row, value=1.0 / (n + 1))
        # row <- theta - mean_old; mean_new = mean_old + row / (n + 1);
        # theta - mean_new = row * n / (n + 1)  (the deviation from the *updated* mean).
        row.sub_(self._mean)
        self._mean.add_(row, alpha=1.0 / (n + 1))
        row.mul_(n / (n + 1))
        self.n_collected = n + 1
        self._next_row = (self._next_row + 1) % self.max_rank
        self._n_dev = min(self._n_dev + 1, self.max_rank)

    # ------------------------------------------------------------------ moments
    def _require_collected(self) -> None:
        if self.n_collected == 0:
            raise RuntimeError("SWAG has no collected weights yet; call collect(model) first")

    @property
    def mean(self) -> torch.Tensor:
        """The SWA mean as a flat vector (a copy)."""
        self._require_collected()
        return self._mean.clone()

    @property
    def variance(self) -> torch.Tensor:
        """The diagonal variance ``clamp(sq_mean - mean**2, min=var_clamp)`` (flat vector)."""
        self._require_collected()
        return torch.clamp(self._sq_mean - self._mean**2, min=self.var_clamp)

    @property
    def deviations(self) -> torch.Tensor:
        """The deviation matrix D as a ``rank x d`` tensor, oldest row first (a copy)."""
        self._require_collected()
        k = self._n_dev
        if k < self.max_rank:
            return self._dev[:k].clone()
        return torch.roll(self._dev, -self._next_row, dims=0).clone()

    def covariance(self, scale: float = 0.5, cov: bool = True) -> torch.Tensor:
        """Dense ``d x d`` covariance of :meth:`sample_vector` (for tests on small models only).

        Example:
            >>> net = nn.Linear(1, 1); swag = SWAG(net); swag.collect(net)
            >>> swag.covariance().shape
            torch.Size([2, 2])
        """
        scale = _check_scale(scale)
        _check_bool("cov", cov)
        self._require_collected()
        c = torch.diag(self.variance)
        k = self._n_dev
        if cov and k >= 2:
            dk = self._dev[:k]
            c = c + dk.T @ dk / (k - 1)
        return scale * c

    # ------------------------------------------------------------------ sampling
    def sample_vector(
        self,
        scale: float = 0.5,
        cov: bool = True,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw one flat weight vector from the SWAG posterior.

        ``seed`` makes the draw reproducible; ``generator`` (on the statistics' device) lets
        callers draw a reproducible sequence. With fewer than two deviation columns the
        low-rank term is zero (the single deviation from a one-point mean is zero).

        Example:
            >>> net = nn.Linear(2, 1); swag = SWAG(net); swag.collect(net)
            >>> bool((swag.sample_vector(scale=0.0) == swag.mean).all())
            True
        """
        scale = _check_scale(scale)
        _check_bool("cov", cov)
        seed = _check_seed(seed)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self._require_collected()
        if scale == 0.0:
            return self._mean.clone()
        gen = generator
        if seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
        kw = {"device": self.device, "dtype": self.dtype, "generator": gen}
        z1 = torch.randn(self.num_params, **kw)
        noise = z1.mul_(self.variance.sqrt_())
        k = self._n_dev
        if cov and k >= 2:
            z2 = torch.randn(k, **kw)
            noise.add_(z2 @ self._dev[:k], alpha=1.0 / math.sqrt(k - 1))
        return self._mean.add(noise, alpha=math.sqrt(scale))

    def _template(self, model: nn.Module | None) -> nn.Module:
        if model is None:
            return copy.deepcopy(self._model)
        self._check_model(model)
        return model

    def sample(
        self,
        scale: float = 0.5,
        cov: bool = True,
        seed: int | None = None,
        into: nn.Module | None = None,
    ) -> nn.Module:
        """Return a model with weights drawn from the posterior (SWAG; ``cov=False``: SWAG-Diag;
        ``scale=0``: SWA).

        By default a deep copy of the original model is returned (on the original model's
        device); pass ``into=`` a module of the same architecture to write the weights into it
        instead. BatchNorm statistics are *not* refreshed: call :func:`bdlkit.refresh_bn`.

        Example:
            >>> net = nn.Linear(2, 1); swag = SWAG(net); swag.collect(net)
            >>> type(swag.sample(seed=0)).__name__
            'Linear'
        """
        vec = self.sample_vector(scale=scale, cov=cov, seed=seed)
        target = self._template(into)
        assign_params(target, vec)
        return target

    @torch.no_grad()
    def predict(
        self,
        loader: Iterable[Any],
        n_samples: int = 30,
        scale: float = 0.5,
        cov: bool = True,
        bn_loader: Iterable[Any] | None = None,
        bn_batches: int | None = None,
        seed: int | None = None,
        call_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        model: nn.Module | None = None,
    ) -> torch.Tensor:
        """Bayesian model average: the mean over ``n_samples`` draws of the softmax on ``loader``.

        For each draw the weights are sampled, BatchNorm statistics are recomputed on
        ``bn_loader`` (its first ``bn_batches`` batches; required when the model has
        BatchNorm), then the model predicts on ``loader`` (which must yield the same examples
        in the same order every pass). Only one model copy is used for all draws (or ``model``
        itself, if given). Returns an ``N x C`` tensor of probabilities.

        Example:
            >>> net = nn.Linear(2, 3); swag = SWAG(net); swag.collect(net)
            >>> swag.predict([torch.randn(4, 2)], n_samples=2).shape
            torch.Size([4, 3])
        """
        probs, _ = self._average(loader, n_samples, scale, cov, bn_loader, bn_batches, seed,
                                 call_fn, model, with_entropy=False)
        return probs

    @torch.no_grad()
    def predict_uncertainty(
        self,
        loader: Iterable[Any],
        n_samples: int = 30,
        scale: float = 0.5,
        cov: bool = True,
        bn_loader: Iterable[Any] | None = None,
        bn_batches: int | None = None,
        seed: int | None = None,
        call_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        model: nn.Module | None = None,
    ) -> dict[str, torch.Tensor]:
        """:meth:`predict` plus the split of its predictive entropy (nats, per example).

        Returns ``{"probs", "total", "aleatoric", "epistemic"}``: ``total`` is the entropy of
        the averaged probabilities, ``aleatoric`` the mean entropy of the single draws, and
        ``epistemic = total - aleatoric``, the mutual information between the prediction and
        the weights (>= 0; zero when all draws agree). The epistemic part is the usual
        Bayesian out-of-distribution score; it costs one entropy per draw, no extra memory.
        Arguments and draws are those of :meth:`predict` (same ``seed``, same ``probs``); the
        model must return ``(N, C)`` logits.

        Example:
            >>> net = nn.Linear(2, 3); swag = SWAG(net); swag.collect(net)
            >>> u = swag.predict_uncertainty([torch.randn(4, 2)], n_samples=2)
            >>> sorted(u), bool((u["epistemic"] >= 0).all())
            (['aleatoric', 'epistemic', 'probs', 'total'], True)
        """
        probs, aleatoric = self._average(loader, n_samples, scale, cov, bn_loader, bn_batches,
                                         seed, call_fn, model, with_entropy=True)
        assert aleatoric is not None
        total = predictive_entropy(probs)
        return {"probs": probs, "total": total, "aleatoric": aleatoric,
                "epistemic": (total - aleatoric).clamp_min_(0.0)}

    def _average(
        self, loader: Iterable[Any], n_samples: int, scale: float, cov: bool,
        bn_loader: Iterable[Any] | None, bn_batches: int | None, seed: int | None,
        call_fn: Callable[[nn.Module, Any], torch.Tensor] | None, model: nn.Module | None,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean softmax over the draws and, with ``with_entropy``, the mean per-draw entropy."""
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
        scale = _check_scale(scale)
        _check_bool("cov", cov)
        seed = _check_seed(seed)
        if bn_batches is not None and (
            isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 1
        ):
            raise ValueError(f"bn_batches must be a positive int or None, got {bn_batches!r}")
        if call_fn is not None and not callable(call_fn):
            raise TypeError("call_fn must be callable")
        self._require_collected()
        work = self._template(model)
        if bn_loader is None and has_batchnorm(work):
            raise ValueError(
                "the model has BatchNorm layers: pass bn_loader= (training data) so that their "
                "statistics are recomputed for every sampled weight vector"
            )
        call = call_fn or default_call
        gen = torch.Generator(device=self.device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        was_training = work.training
        total: list[torch.Tensor] | None = None
        ent: list[torch.Tensor] | None = None
        try:
            for _ in range(n_samples):
                assign_params(work, self.sample_vector(scale=scale, cov=cov, generator=gen))
                if bn_loader is not None:
                    refresh_bn(work, bn_loader, num_batches=bn_batches, call_fn=call_fn)
                work.eval()
                probs = [torch.softmax(call(work, b).float(), dim=-1) for b in loader]
                if not probs:
                    raise ValueError("loader yielded no batches")
                ents = [predictive_entropy(p) for p in probs] if with_entropy else []
                if total is None:
                    total, ent = probs, ents
                    continue
                if [p.shape for p in probs] != [t.shape for t in total]:
                    raise ValueError("loader must yield the same batches on every pass")
                for t, p in zip(total, probs, strict=True):
                    t.add_(p)
                for t, e in zip(ent or [], ents, strict=True):
                    t.add_(e)
        finally:
            work.train(was_training)
        assert total is not None
        mean_ent = torch.cat(ent).div_(n_samples) if with_entropy and ent else None
        return torch.cat(total).div_(n_samples), mean_ent

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """A dict of tensors/ints/strings that :meth:`load_state_dict` restores exactly.

        It holds no pickled objects, so ``torch.load(path, weights_only=True,
        map_location=...)`` reads it back.

        Example:
            >>> net = nn.Linear(2, 1); swag = SWAG(net); swag.collect(net)
            >>> sorted(swag.state_dict())[:3]
            ['deviations', 'dtype', 'max_rank']
        """
        return {
            "version": _STATE_VERSION,
            "max_rank": self.max_rank,
            "var_clamp": self.var_clamp,
            "dtype": str(self.dtype).removeprefix("torch."),
            "spec": [[name, list(shape)] for name, shape in self._spec],
            "n_collected": self.n_collected,
            "n_deviations": self._n_dev,
            "next_row": self._next_row,
            "mean": self._mean.clone(),
            "sq_mean": self._sq_mean.clone(),
            "deviations": self._dev.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (tensors are moved to this object's device and dtype).

        Everything is validated before anything is written.

        Example:
            >>> net = nn.Linear(2, 1); a = SWAG(net); a.collect(net)
            >>> b = SWAG(net); b.load_state_dict(a.state_dict()); b.n_collected
            1
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"state is missing keys {missing}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"unsupported SWAG state version {state['version']!r}")
        spec = [(str(n), tuple(int(s) for s in shape)) for n, shape in state["spec"]]
        if spec != self._spec:
            diff = _first_difference(self._spec, spec)
            raise ValueError(f"state was saved for a different model: {diff}")
        if state["max_rank"] != self.max_rank:
            raise ValueError(
                f"state has max_rank={state['max_rank']}, this SWAG has max_rank={self.max_rank}; "
                "use SWAG.from_state_dict(model, state)"
            )
        d, k = self.num_params, self.max_rank
        n, n_dev, nxt = state["n_collected"], state["n_deviations"], state["next_row"]
        for name, v in (("n_collected", n), ("n_deviations", n_dev), ("next_row", nxt)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"state[{name!r}] must be an int >= 0, got {v!r}")
        if n_dev != min(n, k) or nxt != n % k:
            raise ValueError("state counters are inconsistent (n_collected/n_deviations/next_row)")
        tensors = {}
        for name, shape in (("mean", (d,)), ("sq_mean", (d,)), ("deviations", (k, d))):
            t = state[name]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                raise ValueError(f"state[{name!r}] must be a tensor of shape {shape}")
            tensors[name] = t.to(device=self.device, dtype=self.dtype)
        var_clamp = state["var_clamp"]
        if isinstance(var_clamp, bool) or not isinstance(var_clamp, (int, float)) \
                or not (math.isfinite(var_clamp) and var_clamp > 0):
            raise ValueError(f"state['var_clamp'] must be a finite float > 0, got {var_clamp!r}")
        self._mean.copy_(tensors["mean"])
        self._sq_mean.copy_(tensors["sq_mean"])
        self._dev.copy_(tensors["deviations"])
        self.var_clamp = float(var_clamp)
        self.n_collected, self._n_dev, self._next_row = n, n_dev, nxt

    @classmethod
    def from_state_dict(
        cls,
        model: nn.Module,
        state: Mapping[str, Any],
        device: str | torch.device = "cpu",
    ) -> SWAG:
        """Build a SWAG for ``model`` from a saved :meth:`state_dict` (max_rank, dtype from it).

        Example:
            >>> net = nn.Linear(2, 1); a = SWAG(net, max_rank=3); a.collect(net)
            >>> SWAG.from_state_dict(net, a.state_dict()).max_rank
            3
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        for key in ("max_rank", "dtype", "var_clamp"):
            if key not in state:
                raise ValueError(f"state is missing key {key!r}")
        if state["dtype"] not in _DTYPES:
            raise ValueError(f"state['dtype'] must be one of {sorted(_DTYPES)}")
        swag = cls(
            model,
            max_rank=state["max_rank"],
            device=device,
            dtype=_DTYPES[state["dtype"]],
            var_clamp=state["var_clamp"],
        )
        swag.load_state_dict(state)
        return swag

    def __repr__(self) -> str:
        return (
            f"SWAG(num_params={self.num_params}, max_rank={self.max_rank}, "
            f"n_collected={self.n_collected}, rank={self.rank}, device={self.device})"
        )


def _first_difference(
    expected: list[tuple[str, tuple[int, ...]]], got: list[tuple[str, tuple[int, ...]]]
) -> str:
    for i, (a, b) in enumerate(zip(expected, got, strict=False)):
        if a != b:
            return f"parameter {i} is {b[0]!r} {b[1]}, expected {a[0]!r} {a[1]}"
    return f"{len(got)} parameters, expected {len(expected)}"


# ---------------------------------------------------------------------- learning rate
def swa_learning_rate(epoch: float, *, lr_init: float, swa_lr: float, swa_start: float) -> float:
    """Learning rate of the reference SWAG recipe at (possibly fractional) ``epoch``.

    Constant ``lr_init`` for the first half of the pre-SWA budget ``swa_start``, linear decay
    to ``swa_lr`` between 50 % and 90 % of it, then constant ``swa_lr`` (also during
    collection, epochs >= ``swa_start``).

    Example:
        >>> swa_learning_rate(0, lr_init=0.1, swa_lr=0.01, swa_start=10)
        0.1
        >>> round(swa_learning_rate(7, lr_init=0.1, swa_lr=0.01, swa_start=10), 6)
        0.055
        >>> swa_learning_rate(12, lr_init=0.1, swa_lr=0.01, swa_start=10)
        0.01
    """
    for name, v in (("epoch", epoch), ("lr_init", lr_init), ("swa_lr", swa_lr),
                    ("swa_start", swa_start)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TypeError(f"{name} must be a finite real number, got {v!r}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch!r}")
    if lr_init <= 0 or swa_lr < 0:
        raise ValueError(f"need lr_init > 0 and swa_lr >= 0, got {lr_init!r}, {swa_lr!r}")
    if swa_start <= 0:
        raise ValueError(f"swa_start must be > 0, got {swa_start!r}")
    ratio = swa_lr / lr_init
    t = epoch / swa_start
    if t <= 0.5:
        factor = 1.0
    elif t <= 0.9:
        factor = 1.0 - (1.0 - ratio) * (t - 0.5) / 0.4
    else:
        factor = ratio
    return lr_init * factor


def swa_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    swa_start: float,
    swa_lr: float,
    steps_per_epoch: int = 1,
) -> LambdaLR:
    """A ``LambdaLR`` following :func:`swa_learning_rate` for every parameter group.

    Each group's current ``lr`` is taken as its ``lr_init``. Call ``scheduler.step()`` once
    per epoch (``steps_per_epoch=1``) or once per batch (``steps_per_epoch=len(loader)``).

    Example:
        >>> opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1, momentum=0.9)
        >>> sched = swa_scheduler(opt, swa_start=10, swa_lr=0.01)
        >>> for _ in range(12):
        ...     opt.step(); sched.step()
        >>> opt.param_groups[0]["lr"]
        0.01
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch Optimizer, got {type(optimizer).__name__}")
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or (
        steps_per_epoch < 1
    ):
        raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
    lambdas = []
    for i, group in enumerate(optimizer.param_groups):
        lr0 = group.get("initial_lr", group["lr"])
        if not isinstance(lr0, (int, float)) or lr0 <= 0:
            raise ValueError(f"param group {i} needs lr > 0, got {lr0!r}")
        # validate once with the real arguments (raises before the scheduler is built)
        swa_learning_rate(0.0, lr_init=float(lr0), swa_lr=swa_lr, swa_start=swa_start)

        def fn(step: int, lr0: float = float(lr0)) -> float:
            lr = swa_learning_rate(step / steps_per_epoch, lr_init=lr0, swa_lr=swa_lr,
                                   swa_start=swa_start)
            return lr / lr0

        lambdas.append(fn)
    return LambdaLR(optimizer, lambdas)
