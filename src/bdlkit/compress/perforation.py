"""Perforated convolutions (Figurnov et al., "PerforatedCNNs", NIPS 2016).

A perforated convolution evaluates the convolution only at a subset of its output positions
(the *kept* positions of a mask) and fills every skipped position with the value of the
nearest kept position (Euclidean distance, ties broken at random). The perforation rate ``r``
is the fraction of skipped positions; the theoretical speed-up of the layer is ``1 / (1 - r)``.

Four exact kernels compute the kept values; all return the same numbers up to float rounding
and :class:`PerforatedConv2d` picks the fastest one per (batch size, dtype) by timing them on the
first call (``kernel="auto"``):

* ``"strided"`` (only when the kept set is a regular lattice ``{oh + a*sh} x {ow + b*sw}``, e.g.
  most grid masks): one dense convolution with stride ``stride * step`` on the lattice
  (lattices that start at an odd offset need zeros below the input: a padded copy).
* ``"strided_pad"`` (regular lattices): the same strided convolution over the whole input with
  a larger symmetric padding and the lattice sliced from its output: no input copy, at the
  price of one extra output row/column for offset lattices.
* ``"gather"`` (any mask): gather the input patches of the kept positions (precomputed indices,
  channels-last rows) and multiply them with the weight as one 1x1 convolution (oneDNN is
  much faster than MKL ``mm`` on this hardware, see PERF.md).
* ``"dense"`` (any mask, the fallback for tiny layers): the full convolution, then the fill.

The fill is one row gather on the channels-last output, so outputs are channels-last.

Masks (``mask=``): ``"uniform"`` (random positions), ``"grid"`` (the paper's pseudo-random
grid), ``"structure"`` (positions covered by most windows of the next pooling layer),
``"impact"`` (``|dL/dV * V|`` summed over channels, averaged over data; see
:func:`impact_scores`) or a boolean tensor of the output size.

Network-level tools: :func:`perforate` (replace named convs), :func:`search_rates` (the paper's
greedy search minimising loss increase per measured time saved), :func:`fine_tune`,
:func:`fuse_for_inference` (fold eval BatchNorm into convs and apply ReLU before the fill).
Whole-network latency: ``bdlkit.compress.speed.measure_speedup``.

Example:
    >>> conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    >>> pconv = PerforatedConv2d.from_conv(conv, input_size=(12, 12), rate=0.5, mask="grid", seed=0)
    >>> pconv(torch.randn(2, 8, 12, 12)).shape
    torch.Size([2, 16, 12, 12])
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PerforatedConv2d",
    "perforation_mask",
    "nearest_fill_index",
    "impact_scores",
    "perforate",
    "search_rates",
    "fine_tune",
    "fuse_for_inference",
    "MASK_TYPES",
    "KERNELS",
]

MASK_TYPES = ("uniform", "grid", "structure", "impact")
KERNELS = ("auto", "strided", "strided_pad", "gather", "dense")
_CL = torch.channels_last


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _pair(name: str, value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def _size(name: str, value: Any) -> tuple[int, int]:
    """Parse a spatial size ``(H, W)`` (a trailing pair of a longer shape is accepted)."""
    if isinstance(value, torch.Size | tuple | list) and len(value) > 2:
        value = tuple(value)[-2:]
    h, w = _pair(name, value)
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return h, w


def _check_rate(rate: Any) -> float:
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise TypeError(f"rate must be a float in [0, 1), got {rate!r}")
    rate = float(rate)
    if not (0.0 <= rate < 1.0) or math.isnan(rate):
        raise ValueError(f"rate must be in [0, 1), got {rate!r}")
    return rate


def _num_kept(rate: float, hw: int) -> int:
    """Requested number of kept positions: ``round((1 - rate) * H * W)``, at least 1."""
    return max(1, min(hw, int(math.floor((1.0 - rate) * hw + 0.5))))


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        g.manual_seed(seed)
    return g


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _grid_counts(h: int, w: int, target: int) -> tuple[int, int]:
    """Per-axis grid counts ``(n_h, n_w)`` with ``n_h * n_w`` closest to ``target``.

    Ties prefer lattices whose step divides the side (they run as one strided convolution),
    then balanced densities ``n_h / H ~ n_w / W``.
    """
    best: tuple[tuple[float, ...], tuple[int, int]] | None = None
    for nh in range(1, h + 1):
        for nw in {max(1, min(w, target // nh)), max(1, min(w, -(-target // nh)))}:
            regular = (h % nh == 0) and (w % nw == 0)
            key = (abs(nh * nw - target), 0 if regular else 1,
                   abs(math.log((nh / h) / (nw / w))), -nh)
            if best is None or key < best[0]:
                best = (key, (nh, nw))
    assert best is not None
    return best[1]


def perforation_mask(
    kind: str | torch.Tensor,
    output_size: Sequence[int],
    rate: float | None = None,
    seed: int | None = None,
    *,
    pool: nn.Module | Sequence[int] | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask of the output positions to compute (``True`` = kept).

    Args:
        kind: ``"uniform"``, ``"grid"``, ``"structure"``, ``"impact"`` or a tensor of shape
            ``output_size`` (non-zero = kept), returned as bool.
        output_size: ``(H, W)`` of the convolution output.
        rate: fraction of skipped positions in ``[0, 1)``. Uniform, structure and impact masks
            keep exactly ``round((1 - rate) * H * W)`` positions; grid masks keep ``n_h * n_w``
            with the product closest to that count (exact whenever such a factorisation exists).
        seed: random seed (uniform positions, grid offsets, tie noise).
        pool: for ``"structure"``: the next pooling layer (``nn.MaxPool2d``/``nn.AvgPool2d``) or
            ``(kernel, stride, padding)``.
        scores: for ``"impact"``: ``H x W`` importance scores (higher = keep), e.g. from
            :func:`impact_scores`.

    Example:
        >>> int(perforation_mask("uniform", (10, 10), rate=0.75, seed=0).sum())
        25
    """
    h, w = _size("output_size", output_size)
    hw = h * w
    if isinstance(kind, torch.Tensor):
        if tuple(kind.shape) != (h, w):
            raise ValueError(f"mask tensor must have shape {(h, w)}, got {tuple(kind.shape)}")
        m = kind.detach().to("cpu").bool().clone()
        if not bool(m.any()):
            raise ValueError("mask tensor must keep at least one position")
        if rate is not None and int(m.sum()) != _num_kept(_check_rate(rate), hw):
            raise ValueError(
                f"mask tensor keeps {int(m.sum())} positions but rate={rate} asks for "
                f"{_num_kept(float(rate), hw)}; pass rate=None with a tensor mask"
            )
        return m
    if not isinstance(kind, str):
        raise TypeError(f"mask must be one of {MASK_TYPES} or a bool tensor, got {kind!r}")
    if kind not in MASK_TYPES:
        raise ValueError(f"mask must be one of {MASK_TYPES} or a bool tensor, got {kind!r}")
    if rate is None:
        raise ValueError(f"rate is required for mask={kind!r}")
    rate = _check_rate(rate)
    k = _num_kept(rate, hw)
    g = _generator(seed)
    m = torch.zeros(hw, dtype=torch.bool)
    if kind == "uniform":
        m[torch.randperm(hw, generator=g)[:k]] = True
        return m.view(h, w)
    if kind == "grid":
        nh, nw = _grid_counts(h, w, k)
        u = torch.rand(2, generator=g, dtype=torch.float64).clamp_min(1e-9)
        rows = [math.ceil((h / nh) * (i + float(u[0]))) - 1 for i in range(nh)]
        cols = [math.ceil((w / nw) * (j + float(u[1]))) - 1 for j in range(nw)]
        m = m.view(h, w)
        m[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = True
        return m
    if kind == "structure":
        if pool is None:
            raise ValueError("mask='structure' needs pool= (the next pooling layer)")
        if isinstance(pool, nn.MaxPool2d | nn.AvgPool2d):
            pk, ps, pp = _pair("pool.kernel_size", pool.kernel_size), pool.stride, pool.padding
            ps = _pair("pool.stride", ps if ps is not None else pool.kernel_size)
            pp = _pair("pool.padding", pp)
            if isinstance(pool, nn.MaxPool2d) and _pair("pool.dilation", pool.dilation) != (1, 1):
                raise ValueError("pool with dilation != 1 is not supported")
        elif isinstance(pool, Sequence) and len(pool) == 3:
            pk, ps, pp = (_pair("pool[0]", pool[0]), _pair("pool[1]", pool[1]),
                          _pair("pool[2]", pool[2]))
        else:
            raise TypeError(f"pool must be a MaxPool2d/AvgPool2d or (kernel, stride, padding), "
                            f"got {pool!r}")
        counts = []
        for size, kk, ss, pd in ((h, pk[0], ps[0], pp[0]), (w, pk[1], ps[1], pp[1])):
            c = torch.zeros(size, dtype=torch.float64)
            for start in range(-pd, size + pd - kk + 1, ss):
                c[max(start, 0):max(min(start + kk, size), 0)] += 1
            counts.append(c)
        sc = (counts[0][:, None] * counts[1][None, :]).flatten()
        sc = sc + 1e-3 * torch.rand(hw, generator=g, dtype=torch.float64)
    else:  # impact
        if scores is None:
            raise ValueError("mask='impact' needs scores= (see impact_scores)")
        if tuple(scores.shape) != (h, w):
            raise ValueError(f"scores must have shape {(h, w)}, got {tuple(scores.shape)}")
        sc = scores.detach().to("cpu", torch.float64).flatten()
        if not bool(torch.isfinite(sc[sc > -math.inf]).all()):
            raise ValueError("scores must be finite (or -inf for excluded positions)")
        # random tie breaking: a noise far below the smallest gap between distinct scores
        finite = sc[torch.isfinite(sc)]
        uniq = torch.unique(finite)
        gap = float((uniq[1:] - uniq[:-1]).min()) if uniq.numel() > 1 else 1.0
        sc = sc + 0.25 * gap * torch.rand(hw, generator=g, dtype=torch.float64)
    m[torch.topk(sc, k).indices] = True
    return m.view(h, w)


def nearest_fill_index(mask: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    """For every position of ``mask`` the index (into the row-major list of kept positions)
    of its nearest kept position, Euclidean distance, ties broken at random.

    Example:
        >>> m = torch.tensor([[True, False, False, True]])
        >>> nearest_fill_index(m, seed=0)[[0, 3]].tolist()
        [0, 1]
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError("mask must be a 2-D bool tensor")
    m = mask.to("cpu").bool()
    h, w = m.shape
    kept = m.flatten().nonzero().squeeze(1)
    if kept.numel() == 0:
        raise ValueError("mask keeps no position")
    kr, kc = (kept // w).double(), (kept % w).double()
    g = _generator(seed)
    out = torch.empty(h * w, dtype=torch.long)
    pos = torch.arange(h * w)
    chunk = max(1, (1 << 22) // kept.numel())
    for s in range(0, h * w, chunk):
        p = pos[s:s + chunk]
        d2 = (p // w).double()[:, None].sub(kr).square_()
        d2 += (p % w).double()[:, None].sub(kc).square_()
        # squared distances are integers: noise < 0.5 breaks ties only
        d2 += 0.49 * torch.rand(d2.shape, generator=g, dtype=torch.float64)
        out[s:s + chunk] = d2.argmin(1)
    return out


def _regular_lattice(mask: torch.Tensor) -> tuple[int, int, int, int, int, int] | None:
    """``(oh, sh, nh, ow, sw, nw)`` if the kept set is ``{oh + a sh} x {ow + b sw}``."""
    rows = mask.any(1).nonzero().squeeze(1)
    cols = mask.any(0).nonzero().squeeze(1)
    if int(mask.sum()) != rows.numel() * cols.numel():
        return None
    if not bool(mask[rows][:, cols].all()):
        return None
    out = []
    for idx, size in ((rows, mask.shape[0]), (cols, mask.shape[1])):
        if idx.numel() == 1:
            out += [int(idx[0]), size, 1]
            continue
        steps = idx[1:] - idx[:-1]
        if not bool((steps == steps[0]).all()):
            return None
        out += [int(idx[0]), int(steps[0]), idx.numel()]
    return tuple(out)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# the layer
# --------------------------------------------------------------------------------------------
class PerforatedConv2d(nn.Module):
    """A 2-D convolution evaluated only at the kept output positions of a mask.

    Skipped positions copy the value of their nearest kept position. The module holds
    ``weight``/``bias`` like ``nn.Conv2d`` (gradients flow through kept positions) and the
    precomputed gather/fill indices for one input size; calling it with another spatial size
    raises a ``ValueError`` (call :meth:`prepare` to re-make the mask for a new size).
    ``groups`` must be 1 and ``padding_mode`` ``"zeros"``; stride, padding and dilation are free.

    ``activation`` (optional, e.g. ``nn.ReLU()``) is applied to the kept values before the fill;
    this equals applying it after the layer for any elementwise function and saves work.

    Example:
        >>> pconv = PerforatedConv2d(3, 8, 3, input_size=(16, 16), rate=0.75, mask="uniform",
        ...                          padding=1, seed=0)
        >>> y = pconv(torch.randn(4, 3, 16, 16))
        >>> y.shape, pconv.num_kept
        (torch.Size([4, 8, 16, 16]), 64)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        input_size: Sequence[int],
        rate: float | None = 0.0,
        mask: str | torch.Tensor = "uniform",
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        seed: int | None = None,
        *,
        pool: nn.Module | Sequence[int] | None = None,
        scores: torch.Tensor | None = None,
        kernel: str = "auto",
        activation: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if groups != 1:
            raise ValueError(f"groups must be 1 for a perforated convolution, got {groups!r}")
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode must be 'zeros', got {padding_mode!r}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if activation is not None and not isinstance(activation, nn.Module):
            raise TypeError(f"activation must be an nn.Module or None, got {activation!r}")
        ks = _pair("kernel_size", kernel_size)
        st = _pair("stride", stride)
        dl = _pair("dilation", dilation)
        if min(ks) < 1 or min(st) < 1 or min(dl) < 1:
            raise ValueError("kernel_size, stride and dilation must be >= 1")
        if isinstance(padding, str):
            if padding == "valid":
                pd = (0, 0)
            elif padding == "same":
                tot = [dl[i] * (ks[i] - 1) for i in range(2)]
                if st != (1, 1) or any(t % 2 for t in tot):
                    raise ValueError("padding='same' needs stride 1 and symmetric padding")
                pd = (tot[0] // 2, tot[1] // 2)
            else:
                raise ValueError(
                    f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
        else:
            pd = _pair("padding", padding)
            if min(pd) < 0:
                raise ValueError(f"padding must be >= 0, got {padding!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = ks, st, pd, dl
        self.groups = 1
        self.kernel = kernel
        self.activation = activation
        self.fused_pool: nn.MaxPool2d | None = None  # set by fuse_pool
        fk = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *ks, **fk))
        self.bias = nn.Parameter(torch.empty(out_channels, **fk)) if bias else None
        ref = nn.Conv2d(in_channels, out_channels, ks, bias=bias, **fk)  # default init
        with torch.no_grad():
            self.weight.copy_(ref.weight)
            if self.bias is not None:
                self.bias.copy_(ref.bias)
        self.register_buffer("mask", torch.ones(1, 1, dtype=torch.bool), persistent=True)
        self.register_buffer("fill_index", torch.zeros(1, dtype=torch.long), persistent=True)
        self.prepare(input_size, rate=rate, mask=mask, seed=seed, pool=pool, scores=scores)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        input_size: Sequence[int],
        rate: float | None = 0.0,
        mask: str | torch.Tensor = "uniform",
        seed: int | None = None,
        **kwargs: Any,
    ) -> PerforatedConv2d:
        """A perforated copy of ``conv`` (weights copied, same device/dtype/memory format).

        ``kwargs`` go to the constructor (``pool``, ``scores``, ``kernel``, ``activation``).

        Example:
            >>> conv = nn.Conv2d(4, 4, 3, padding=1)
            >>> p = PerforatedConv2d.from_conv(conv, (8, 8), rate=0.5, mask="grid", seed=1)
            >>> p.num_kept, p.output_size
            (32, (8, 8))
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        p = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, input_size, rate=rate,
            mask=mask, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
            groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            seed=seed, device=conv.weight.device, dtype=conv.weight.dtype, **kwargs,
        )
        with torch.no_grad():
            cl = not conv.weight.is_contiguous() and conv.weight.is_contiguous(memory_format=_CL)
            fmt = _CL if cl else torch.contiguous_format
            p.weight.data = conv.weight.detach().clone(memory_format=fmt)
            if conv.bias is not None:
                p.bias.data = conv.bias.detach().clone()  # type: ignore[union-attr]
        p.weight.requires_grad_(conv.weight.requires_grad)
        return p

    def prepare(
        self,
        input_size: Sequence[int],
        rate: float | None = None,
        mask: str | torch.Tensor | None = None,
        seed: int | None = None,
        *,
        pool: nn.Module | Sequence[int] | None = None,
        scores: torch.Tensor | None = None,
        fill_index: torch.Tensor | None = None,
    ) -> PerforatedConv2d:
        """(Re)build mask and indices for ``input_size``; atomic (nothing changes on error).

        ``rate``/``mask`` default to the current ones (a tensor mask must be given again when
        the output size changes). ``fill_index`` overrides the nearest-kept assignment (as
        saved in a state dict). Returns ``self``.

        Example:
            >>> p = PerforatedConv2d(1, 2, 3, (8, 8), rate=0.5, padding=1, seed=0)
            >>> p.prepare((10, 10)).output_size
            (10, 10)
        """
        h, w = _size("input_size", input_size)
        ks, st, pd, dl = self.kernel_size, self.stride, self.padding, self.dilation
        ho, wo = _conv_out(h, ks[0], st[0], pd[0], dl[0]), _conv_out(w, ks[1], st[1], pd[1], dl[1])
        if ho < 1 or wo < 1:
            raise ValueError(f"input_size {(h, w)} is too small for this convolution")
        if mask is None:
            mask = getattr(self, "mask_kind", "uniform")
            if mask == "tensor":
                if tuple(self.mask.shape) != (ho, wo):
                    raise ValueError("this layer has a tensor mask; pass mask= for the new size")
                mask = self.mask
        if rate is None and not isinstance(mask, torch.Tensor):
            rate = getattr(self, "requested_rate", None)
        m = perforation_mask(mask, (ho, wo), rate, seed, pool=pool, scores=scores)
        kept_n = int(m.sum())
        if fill_index is not None:
            fill = fill_index.detach().to("cpu", torch.long).reshape(-1)
            if fill.numel() != m.numel() or int(fill.min()) < 0 or int(fill.max()) >= kept_n:
                raise ValueError("fill_index does not match the mask")
        else:
            fill = nearest_fill_index(m, None if seed is None else seed + 1)
        kept = m.flatten().nonzero().squeeze(1)
        lattice = _regular_lattice(m)
        if self.kernel in ("strided", "strided_pad") and lattice is None \
                and int(m.sum()) < m.numel():
            raise ValueError(f"kernel={self.kernel!r} needs a regular-lattice mask "
                             "(e.g. mask='grid')")
        # patch indices into the zero-padded input, channels-last rows
        hp, wp = h + 2 * pd[0], w + 2 * pd[1]
        kr, kc = kept // wo, kept % wo
        ta = torch.arange(ks[0]) * dl[0]
        tb = torch.arange(ks[1]) * dl[1]
        rows = (kr * st[0])[:, None, None] + ta[None, :, None]
        cols = (kc * st[1])[:, None, None] + tb[None, None, :]
        patch = (rows * wp + cols).reshape(-1)
        # ---- commit
        dev = self.weight.device
        self.input_size, self.output_size = (h, w), (ho, wo)
        self.mask_kind = "tensor" if isinstance(mask, torch.Tensor) else mask
        self.num_kept = int(kept.numel())
        self.rate = 1.0 - self.num_kept / (ho * wo)
        self.requested_rate = None if isinstance(mask, torch.Tensor) else float(rate)  # type: ignore[arg-type]
        self.mask = m.to(dev)
        self.lattice = lattice
        self._kept = kept.to(dev)
        self.fill_index = fill.to(dev)
        self._fill_dense = kept[fill].to(dev)
        self._patch = patch.to(dev)
        self._padded = (hp, wp)
        self._caches: dict[bool, dict[Any, Any]] = {False: {}, True: {}}
        self._choice: dict[Any, str] = {}
        return self

    @property
    def _cache(self) -> dict[Any, Any]:
        """Buffers/index caches; tensors made under ``inference_mode`` are kept apart."""
        return self._caches[torch.is_inference_mode_enabled()]

    @property
    def theoretical_speedup(self) -> float:
        """``1 / (1 - rate)`` with the realised rate."""
        return 1.0 / (1.0 - self.rate)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"input_size={self.input_size}, rate={self.rate:.3f}, mask={self.mask_kind}, "
                f"kept={self.num_kept}, kernel={self.kernel}")

    def to_conv(self) -> nn.Conv2d:
        """A dense ``nn.Conv2d`` with the same weights (activation not included)."""
        c = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                      self.padding, self.dilation, bias=self.bias is not None,
                      device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            c.weight.copy_(self.weight)
            if self.bias is not None:
                c.bias.copy_(self.bias)
        return c

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> PerforatedConv2d:
        super()._apply(fn, recurse)
        for name in ("_kept", "_fill_dense", "_patch"):
            t = getattr(self, name)
            setattr(self, name, t.to(self.weight.device))
        self._caches, self._choice = {False: {}, True: {}}, {}
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        m, f = state_dict.get(prefix + "mask"), state_dict.get(prefix + "fill_index")
        if m is not None and f is not None and (
                m.shape != self.mask.shape or f.shape != self.fill_index.shape
                or not torch.equal(m.cpu(), self.mask.cpu())
                or not torch.equal(f.cpu(), self.fill_index.cpu())):
            if tuple(m.shape) != self.output_size:
                raise ValueError(f"state dict mask has shape {tuple(m.shape)}, this layer's "
                                 f"output is {self.output_size}; prepare() the right size first")
            self.prepare(self.input_size, mask=m.to("cpu").bool(), fill_index=f)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------- kernels
    def available_kernels(self) -> list[str]:
        """Kernels that can compute this layer's mask."""
        ks = ["gather", "dense"]
        if self.lattice is not None:
            ks[:0] = ["strided", "strided_pad"]
        return ks

    def _buf(self, key: Any, shape: Sequence[int], like: torch.Tensor, zero: bool = False
             ) -> torch.Tensor:
        k = (key, tuple(shape), like.dtype)
        b = self._cache.get(k)
        if b is None:
            b = (torch.zeros if zero else torch.empty)(shape, dtype=like.dtype, device=like.device)
            self._cache[k] = b
        return b

    def _batch_index(self, name: Any, idx: torch.Tensor, n: int, stride: int) -> torch.Tensor:
        key = (name, n)
        t = self._cache.get(key)
        if t is None:
            t = (idx[None, :] + stride * torch.arange(n, device=idx.device)[:, None]).reshape(-1)
            self._cache[key] = t
        return t

    def _gemm_weight(self, no_grad: bool) -> torch.Tensor:
        w = self.weight
        if no_grad:
            key = ("w1x1", w.data_ptr(), w._version, w.dtype)
            c = self._cache.get("w1x1")
            if c is not None and c[0] == key:
                return c[1]
        w1 = w.permute(0, 2, 3, 1).reshape(self.out_channels, -1, 1, 1)
        if no_grad:
            self._cache["w1x1"] = (key, w1)
        return w1

    def _fill_out(self, y_rows: torch.Tensor, n: int, no_grad: bool) -> torch.Tensor:
        """``y_rows``: (n * K, C_out) kept values -> (n, C_out, H, W) channels-last."""
        ho, wo = self.output_size
        c = y_rows.shape[1]
        if isinstance(self.activation, nn.ReLU) and no_grad:
            y_rows = torch.relu_(y_rows)  # the kernels' fresh output: no extra pass over memory
        elif self.activation is not None:
            y_rows = self.activation(y_rows)
        if self.fused_pool is not None:
            return self._pool_out(y_rows, n)
        if self.num_kept == ho * wo:
            out = y_rows
        else:
            idx = self._batch_index("fill", self.fill_index, n, self.num_kept)
            out = torch.index_select(y_rows, 0, idx)
        return out.view(n, ho, wo, c).permute(0, 3, 1, 2)

    def fuse_pool(self, pool: nn.MaxPool2d | None) -> PerforatedConv2d:
        """Apply ``pool`` (the max-pooling layer that follows) inside this layer, reading the
        kept values through the fill indices instead of materialising the filled map: the
        paper's implicit interpolation. The output is then the pooled map (equal to
        ``pool(self(x))`` without fusion). Inference only; ``None`` undoes it. Returns ``self``.

        Example:
            >>> p = PerforatedConv2d(2, 3, 3, (8, 8), rate=0.75, mask="grid", padding=1, seed=0)
            >>> x = torch.randn(1, 2, 8, 8)
            >>> ref = nn.MaxPool2d(2)(p(x))
            >>> torch.allclose(p.fuse_pool(nn.MaxPool2d(2))(x), ref)
            True
        """
        if pool is not None:
            if not isinstance(pool, nn.MaxPool2d):
                raise TypeError(f"pool must be an nn.MaxPool2d or None, got {type(pool).__name__}")
            if _pair("pool.dilation", pool.dilation) != (1, 1) or pool.ceil_mode \
                    or pool.return_indices:
                raise ValueError("fuse_pool supports MaxPool2d with dilation 1, ceil_mode=False "
                                 "and return_indices=False")
            self._pool_geometry(pool)  # validates the sizes before anything changes
        self.fused_pool = pool
        self._caches = {False: {}, True: {}}
        self._choice = {}
        return self

    def _pool_geometry(self, pool: nn.MaxPool2d) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(P, window)`` kept-row indices of every pooling window and the pooled size.

        Window cells in the padding take a valid cell of the same window (max unchanged)."""
        ho, wo = self.output_size
        k, st, pd = (_pair("pool.kernel_size", pool.kernel_size),
                     _pair("pool.stride", pool.stride if pool.stride else pool.kernel_size),
                     _pair("pool.padding", pool.padding))
        if 2 * pd[0] > k[0] or 2 * pd[1] > k[1]:
            raise ValueError("pool padding must be at most half the pool kernel")
        ph, pw = (ho + 2 * pd[0] - k[0]) // st[0] + 1, (wo + 2 * pd[1] - k[1]) // st[1] + 1
        if ph < 1 or pw < 1:
            raise ValueError(f"pool {pool} does not fit this layer's output {self.output_size}")
        r = (torch.arange(ph) * st[0] - pd[0])[:, None] + torch.arange(k[0])[None, :]
        c = (torch.arange(pw) * st[1] - pd[1])[:, None] + torch.arange(k[1])[None, :]
        rv, cv = (r >= 0) & (r < ho), (c >= 0) & (c < wo)
        # replace out-of-map cells by the first valid cell of the window
        r = torch.where(rv, r, r.gather(1, rv.float().argmax(1, keepdim=True)))
        c = torch.where(cv, c, c.gather(1, cv.float().argmax(1, keepdim=True)))
        pos = r[:, None, :, None] * wo + c[None, :, None, :]  # (ph, pw, kh, kw)
        fill = self.fill_index.to("cpu")
        return fill[pos.reshape(ph * pw, -1)], (ph, pw)

    def _pool_out(self, y_rows: torch.Tensor, n: int) -> torch.Tensor:
        """Max over each pooling window of the (implicitly filled) kept rows."""
        assert self.fused_pool is not None
        geo = self._cache.get("pool_geometry")
        if geo is None:
            win, size = self._pool_geometry(self.fused_pool)
            cols: list[torch.Tensor] = []
            for j in range(win.shape[1]):  # windows often read one kept row twice: dedupe
                col = win[:, j].contiguous().to(y_rows.device)
                if not any(torch.equal(col, u) for u in cols):
                    cols.append(col)
            geo = self._cache["pool_geometry"] = (cols, size)
        cols, (ph, pw) = geo
        idx = [self._batch_index(("pool", j), col, n, self.num_kept) for j, col in enumerate(cols)]
        out = torch.index_select(y_rows, 0, idx[0])
        for ix in idx[1:]:
            if y_rows.requires_grad and torch.is_grad_enabled():
                out = torch.maximum(out, torch.index_select(y_rows, 0, ix))
            else:
                torch.maximum(out, torch.index_select(y_rows, 0, ix), out=out)
        return out.view(n, ph, pw, y_rows.shape[1]).permute(0, 3, 1, 2)

    def _forward_dense(self, x: torch.Tensor, no_grad: bool) -> torch.Tensor:
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        if self.fused_pool is not None:  # compact kept rows, then the shared pooled fill
            n, c = y.shape[:2]
            rows = y.permute(0, 2, 3, 1).reshape(n, -1, c)[:, self._kept].reshape(-1, c)
            return self._fill_out(rows, n, no_grad)
        n, c, ho, wo = y.shape
        if y.is_contiguous(memory_format=_CL) and not y.is_contiguous():
            rows = y.permute(0, 2, 3, 1).reshape(n * ho * wo, c)
            idx = self._batch_index("fill_dense", self._fill_dense, n, ho * wo)
            if self.activation is not None:
                rows = self.activation(rows)
            out = torch.index_select(rows, 0, idx)
            return out.view(n, ho, wo, c).permute(0, 3, 1, 2)
        if self.activation is not None:
            y = self.activation(y)
        return y.flatten(2).index_select(2, self._fill_dense).view(n, c, ho, wo)

    def _lattice_spans(self) -> list[tuple[int, int, int, int]]:
        """Per axis ``(start, end, input size, stride * step)``: the input rows/columns (in
        unpadded coordinates, may lie outside the input) that the lattice's outputs read."""
        assert self.lattice is not None
        oh, sh, nh, ow, sw, nw = self.lattice
        spans = []
        for o, step, n, axis in ((oh, sh, nh, 0), (ow, sw, nw, 1)):
            s, d = self.stride[axis], self.dilation[axis]
            start = o * s - self.padding[axis]
            end = start + (n - 1) * step * s + d * (self.kernel_size[axis] - 1) + 1
            spans.append((start, end, self.input_size[axis], step * s))
        return spans

    def _strided_plan(self) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
        """Input slice ``(r0, r1, c0, c1)`` and padding ``(top, bottom, left, right)`` whose
        convolution with stride ``stride * step`` and no further padding yields the lattice."""
        span, pad = [], []
        for start, end, size, _ in self._lattice_spans():
            span += [max(start, 0), min(end, size)]
            pad += [max(-start, 0), max(end - size, 0)]
        return tuple(span), tuple(pad)  # type: ignore[return-value]

    def _forward_strided(self, x: torch.Tensor, no_grad: bool) -> torch.Tensor:
        assert self.lattice is not None
        oh, sh, nh, ow, sw, nw = self.lattice
        (r0, r1, c0, c1), (pt, pb, pl, pr) = self._strided_plan()
        st = (self.stride[0] * sh, self.stride[1] * sw)
        x = x.contiguous(memory_format=_CL)
        if (r0, r1, c0, c1) != (0, x.shape[2], 0, x.shape[3]):
            x = x[:, :, r0:r1, c0:c1]
        if pb <= pt and pr <= pl:  # extra bottom/right zeros only add rows we slice away
            y = F.conv2d(x, self.weight, self.bias, st, (pt, pl), self.dilation)
            if y.shape[2] != nh or y.shape[3] != nw:
                y = y[:, :, :nh, :nw]
        else:
            n, c, h, w = x.shape
            if no_grad:
                buf = self._buf("spad", (n, h + pt + pb, w + pl + pr, c), x, zero=True)
                buf[:, pt:pt + h, pl:pl + w].copy_(x.permute(0, 2, 3, 1))
                xp = buf.permute(0, 3, 1, 2)
            else:
                xp = F.pad(x, (pl, pr, pt, pb)).contiguous(memory_format=_CL)
            y = F.conv2d(xp, self.weight, self.bias, st, 0, self.dilation)
        n = y.shape[0]
        y = y.contiguous(memory_format=_CL)
        return self._fill_out(y.permute(0, 2, 3, 1).reshape(n * nh * nw, -1), n, no_grad)

    def _pad_plan(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Symmetric padding ``(P_h, P_w)`` and first output index ``(b_h, b_w)`` such that
        the convolution of the whole input with stride ``stride * step`` and padding ``P``
        has the lattice at outputs ``b .. b + n - 1``: no input slice or padded copy, at the
        price of ``b`` extra output rows/columns (the offset-1 lattices of the paper's grid)."""
        pads, firsts = [], []
        for start, end, size, big_s in self._lattice_spans():
            need = max(0, end - size)  # zeros needed below/right of the input
            first = max(0, -(-(start + need) // big_s))
            pads.append(first * big_s - start)
            firsts.append(first)
        return (pads[0], pads[1]), (firsts[0], firsts[1])

    def _forward_strided_pad(self, x: torch.Tensor, no_grad: bool) -> torch.Tensor:
        assert self.lattice is not None
        _, sh, nh, _, sw, nw = self.lattice
        (ph, pw), (bh, bw) = self._pad_plan()
        st = (self.stride[0] * sh, self.stride[1] * sw)
        y = F.conv2d(x.contiguous(memory_format=_CL), self.weight, self.bias, st, (ph, pw),
                     self.dilation)
        y = y[:, :, bh:bh + nh, bw:bw + nw].contiguous(memory_format=_CL)
        n = y.shape[0]
        return self._fill_out(y.permute(0, 2, 3, 1).reshape(n * nh * nw, -1), n, no_grad)

    def _forward_gather(self, x: torch.Tensor, no_grad: bool) -> torch.Tensor:
        n, c = x.shape[:2]
        h, w = self.input_size
        hp, wp = self._padded
        pd = self.padding
        k = self.num_kept
        taps = self.kernel_size[0] * self.kernel_size[1]
        xl = x.permute(0, 2, 3, 1)  # NHWC view
        if no_grad:
            if pd != (0, 0):
                xp = self._buf("pad", (n, hp, wp, c), x, zero=True)
                xp[:, pd[0]:pd[0] + h, pd[1]:pd[1] + w].copy_(xl)
            else:
                xp = xl.contiguous()
            rows_in = xp.reshape(n * hp * wp, c)
            patches = self._buf("patch", (n * k * taps, c), x)
            torch.index_select(rows_in, 0, self._batch_index("patch", self._patch, n, hp * wp),
                               out=patches)
        else:
            if pd != (0, 0):
                xp = F.pad(xl, (0, 0, pd[1], pd[1], pd[0], pd[0]))
            else:
                xp = xl.contiguous()
            rows_in = xp.reshape(n * hp * wp, c)
            patches = torch.index_select(
                rows_in, 0, self._batch_index("patch", self._patch, n, hp * wp))
        inp = patches.view(n, k, 1, taps * c).permute(0, 3, 1, 2)  # (n, D, K, 1) channels-last
        y = F.conv2d(inp, self._gemm_weight(no_grad), self.bias)
        y = y.contiguous(memory_format=_CL)
        return self._fill_out(y.permute(0, 2, 3, 1).reshape(n * k, -1), n, no_grad)

    def _run(self, name: str, x: torch.Tensor, no_grad: bool) -> torch.Tensor:
        return getattr(self, "_forward_" + name)(x, no_grad)

    def _autotune(self, x: torch.Tensor) -> str:
        cands = self.available_kernels()
        times: dict[str, list[float]] = {c: [] for c in cands}
        with torch.no_grad():
            for c in cands:  # warm-up (allocations, oneDNN primitive creation)
                self._run(c, x, True)
            t0 = time.perf_counter()
            self._run(cands[-1], x, True)
            # more rounds for fast layers (<= ~50 ms of timing in all), at least 3
            rounds = max(3, min(15, int(0.05 / max(time.perf_counter() - t0, 1e-6))))
            for r in range(rounds):  # interleaved, rotating order; min is robust to preemption
                for j in range(len(cands)):
                    c = cands[(j + r) % len(cands)]
                    t0 = time.perf_counter()
                    self._run(c, x, True)
                    times[c].append(time.perf_counter() - t0)
        return min(cands, key=lambda c: min(times[c]))

    def kernel_for(self, x: torch.Tensor, training: bool = False) -> str:
        """The kernel used for an input like ``x``: for inference autotuned and cached per
        (batch size, dtype, device) on first use; for training (autograd) ``"strided"`` when
        the mask is a regular lattice, else ``"gather"``."""
        if self.kernel != "auto":
            return self.kernel
        if training:
            return "strided" if self.lattice is not None else "gather"
        key = (x.shape[0], x.dtype, x.device.type)
        c = self._choice.get(key)
        if c is None:
            c = self._autotune(x)
            self._choice[key] = c
        return c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if tuple(x.shape[2:]) != self.input_size:
            raise ValueError(
                f"input spatial size {tuple(x.shape[2:])} differs from the prepared size "
                f"{self.input_size}; call .prepare(new_size) to re-make the mask")
        if self.num_kept == self.output_size[0] * self.output_size[1]:
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
            y = y if self.activation is None else self.activation(y)
            return y if self.fused_pool is None else self.fused_pool(y)
        no_grad = not (torch.is_grad_enabled() and (
            x.requires_grad or self.weight.requires_grad
            or (self.bias is not None and self.bias.requires_grad)))
        return self._run(self.kernel_for(x, training=not no_grad), x, no_grad)


# --------------------------------------------------------------------------------------------
# network level
# --------------------------------------------------------------------------------------------
def _conv_inputs(model: nn.Module, input_size: Sequence[int]) -> dict[str, tuple[int, int]]:
    """Spatial input size of every Conv2d/PerforatedConv2d (one forward with a zero input)."""
    if isinstance(input_size, Sequence) and len(input_size) == 3:
        c, h, w = (int(v) for v in input_size)
    else:
        h, w = _size("input_size", input_size)
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d | PerforatedConv2d)),
                     None)
        if first is None:
            raise ValueError("model has no Conv2d")
        c = first.in_channels
    sizes: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | PerforatedConv2d):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: sizes.__setitem__(name, tuple(args[0].shape[2:]))))
    p = next(model.parameters())
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, c, h, w, device=p.device, dtype=p.dtype))
    finally:
        model.train(was)
        for hk in hooks:
            hk.remove()
    return sizes


def _next_pool(model: nn.Module, name: str) -> nn.Module | tuple[int, int, int]:
    """The first pooling layer after conv ``name`` in module order, before any other conv or
    linear layer; ``(1, 1, 0)`` (every position counted once: ties -> random) if none."""
    seen = False
    for n, m in model.named_modules():
        if n == name:
            seen = True
        elif seen and isinstance(m, nn.MaxPool2d | nn.AvgPool2d):
            return m
        elif seen and isinstance(m, nn.Conv2d | PerforatedConv2d | nn.Linear):
            break
    return (1, 1, 0)


def _following(model: nn.Module, name: str) -> list[nn.Module]:
    """The BatchNorm / ReLU / max-pooling layers right after conv ``name`` in its parent
    ``nn.Sequential`` (up to the next other layer): :func:`fuse_for_inference` folds them into
    a perforated conv, so the rate search times the conv together with them."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return []
    keys = list(parent._modules)
    out: list[nn.Module] = []
    for k in keys[keys.index(child) + 1:]:
        m = parent._modules[k]
        if not isinstance(m, nn.BatchNorm2d | nn.ReLU | nn.MaxPool2d | nn.Identity):
            break
        out.append(m)
    return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def impact_scores(
    model: nn.Module,
    loader: Iterable[Any],
    layers: Sequence[str],
    num_batches: int | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> dict[str, torch.Tensor]:
    """Impact of each output position of the named conv layers (Figurnov et al., eq. 3).

    ``impact[h, w] = mean over images of sum_c |dL/dV[c, h, w] * V[c, h, w]|`` with ``V`` the
    layer output and ``L`` the summed loss; computed in eval mode (BN statistics frozen).
    Batches are ``(inputs, targets)`` pairs.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 3))
        >>> data = [(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,)))]
        >>> impact_scores(net, data, ["0"])["0"].shape
        torch.Size([4, 4])
    """
    mods = dict(model.named_modules())
    for name in layers:
        if name not in mods or not isinstance(mods[name], nn.Conv2d | PerforatedConv2d):
            raise ValueError(f"layers: {name!r} is not a Conv2d/PerforatedConv2d of the model")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    acts: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    count = 0

    def hook(mod: nn.Module, args: Any, out: torch.Tensor, name: str) -> None:
        out.retain_grad()
        acts[name] = out

    hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n in layers]
    was = model.training
    dev = next(model.parameters()).device
    try:
        model.eval()
        for i, batch in enumerate(loader):
            if num_batches is not None and i >= num_batches:
                break
            x, y = batch[0].to(dev), batch[1].to(dev)
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y) * x.shape[0] if loss_fn is F.cross_entropy else \
                loss_fn(model(x), y)
            loss.backward()
            for n in layers:
                v = acts[n]
                s = (v.grad * v).abs().sum(1).sum(0).detach().double().cpu()
                sums[n] = sums[n] + s if n in sums else s
            count += x.shape[0]
    finally:
        model.train(was)
        model.zero_grad(set_to_none=True)
        for hk in hooks:
            hk.remove()
    if count == 0:
        raise ValueError("loader yielded no batch")
    return {n: (sums[n] / count).float() for n in layers}


def perforate(
    model: nn.Module,
    rates: Mapping[str, float],
    input_size: Sequence[int],
    mask: str | Mapping[str, str | torch.Tensor] = "grid",
    seed: int | None = 0,
    *,
    loader: Iterable[Any] | None = None,
    num_batches: int | None = None,
    impact_steps: int = 1,
    kernel: str = "auto",
    inplace: bool = False,
) -> nn.Module:
    """Replace the named ``nn.Conv2d`` layers by :class:`PerforatedConv2d` layers.

    Args:
        model: any module; convs are addressed by their ``named_modules`` names.
        rates: ``{conv name: rate}``; rate 0 keeps a perforated layer that computes everything.
            Already perforated layers named here are re-perforated from their dense weights.
        input_size: model input ``(H, W)`` or ``(C, H, W)``; layer sizes come from one forward.
        mask: a mask type for all layers or ``{name: type or tensor}``. Structure masks use
            the next pooling layer in module order (a conv without one gets random ties).
        seed: seed of the random masks (layer ``i`` uses ``seed + 1000 i``).
        loader: data for impact masks (``(x, y)`` batches); ``num_batches`` limits it.
        impact_steps: impact masks are grown in this many steps, recomputing the impact of the
            partially perforated network after each step (the paper's iterative variant).
        kernel: kernel of the new layers (``"auto"`` times the candidates).
        inplace: modify ``model`` instead of a deep copy.

    Example:
        >>> from bdlkit.models import VGGSmall
        >>> net = perforate(VGGSmall(), {"features.3": 0.5}, (28, 28), mask="grid")
        >>> type(net.features[3]).__name__
        'PerforatedConv2d'
    """
    if not isinstance(rates, Mapping) or not rates:
        raise ValueError("rates must be a non-empty mapping {conv name: rate}")
    mods = dict(model.named_modules())
    for name, r in rates.items():
        if name not in mods or not isinstance(mods[name], nn.Conv2d | PerforatedConv2d):
            raise ValueError(f"rates: {name!r} is not a Conv2d of the model")
        _check_rate(r)
    masks = dict(mask) if isinstance(mask, Mapping) else {n: mask for n in rates}
    for name in rates:
        mk = masks.get(name)
        if mk is None:
            raise ValueError(f"mask: no mask given for {name!r}")
        if isinstance(mk, str) and mk not in MASK_TYPES:
            raise ValueError(f"mask must be one of {MASK_TYPES} or a tensor, got {mk!r}")
        if isinstance(mk, str) and mk == "impact" and loader is None:
            raise ValueError("mask='impact' needs loader=")
    if not isinstance(impact_steps, int) or impact_steps < 1:
        raise ValueError(f"impact_steps must be a positive int, got {impact_steps!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    net = model if inplace else copy.deepcopy(model)
    sizes = _conv_inputs(net, input_size)
    names = list(rates)
    order = {n: i for i, n in enumerate(sizes)}

    def build(name: str, rate: float, mk: Any, scores: torch.Tensor | None) -> None:
        old = net.get_submodule(name)
        conv = old.to_conv() if isinstance(old, PerforatedConv2d) else old
        act = old.activation if isinstance(old, PerforatedConv2d) else None
        s = None if seed is None else seed + 1000 * order[name]
        new = PerforatedConv2d.from_conv(
            conv, sizes[name], rate=None if isinstance(mk, torch.Tensor) else rate, mask=mk,
            seed=s, pool=_next_pool(net, name) if mk == "structure" else None,
            scores=scores, kernel=kernel, activation=act)
        if isinstance(old, PerforatedConv2d):
            new.weight.data = old.weight.data
            if old.bias is not None:
                new.bias.data = old.bias.data  # type: ignore[union-attr]
        _set_module(net, name, new)

    impact = [n for n in names if isinstance(masks[n], str) and masks[n] == "impact"]
    for name in names:
        if name not in impact:
            build(name, float(rates[name]), masks[name], None)
    for step in range(1, impact_steps + 1):
        if not impact:
            break
        sc = impact_scores(net, loader, impact, num_batches=num_batches)  # type: ignore[arg-type]
        for name in impact:
            cur = net.get_submodule(name)
            if isinstance(cur, PerforatedConv2d) and step > 1:
                sc[name] = sc[name].masked_fill(~cur.mask.cpu(), -math.inf)
            build(name, float(rates[name]) * step / impact_steps, "impact", sc[name])
    return net


def _min_time(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of ``repeats`` calls: the least disturbed sample on a shared machine."""
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def _time_pair(
    baseline: nn.Module,
    candidate: nn.Module,
    example_input: torch.Tensor,
    repeats: int = 20,
    warmup: int = 3,
) -> dict[str, float]:
    """Interleaved (A B A B ...) timing of two models' forward passes under ``no_grad``.

    Returns median times, min/max, ``speedup = median(baseline) / median(candidate)`` and
    ``speedup_best = min(baseline) / min(candidate)`` (robust to preemption by other processes).
    Both models are put in eval mode for the measurement and restored afterwards.

    Example:
        >>> a = nn.Conv2d(3, 8, 3)
        >>> r = _time_pair(a, a, torch.randn(2, 3, 16, 16), repeats=3)
        >>> sorted(r)[:3]
        ['baseline_max', 'baseline_min', 'baseline_s']
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    modes = (baseline.training, candidate.training)
    baseline.eval()
    candidate.eval()
    ta: list[float] = []
    tb: list[float] = []
    try:
        with torch.no_grad():
            for _ in range(warmup):
                baseline(example_input)
                candidate(example_input)
            for _ in range(repeats):
                for model, ts in ((baseline, ta), (candidate, tb)):
                    t0 = time.perf_counter()
                    model(example_input)
                    ts.append(time.perf_counter() - t0)
    finally:
        baseline.train(modes[0])
        candidate.train(modes[1])
    a, b = statistics.median(ta), statistics.median(tb)
    return {"baseline_s": a, "candidate_s": b, "speedup": a / b,
            "speedup_best": min(ta) / min(tb),
            "baseline_min": min(ta), "baseline_max": max(ta),
            "candidate_min": min(tb), "candidate_max": max(tb)}


def _eval_loss(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
               loss_fn: Callable[..., torch.Tensor]) -> float:
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            tot += float(loss_fn(model(x), y)) * x.shape[0]
            n += x.shape[0]
    model.train(was)
    return tot / n


def search_rates(
    model: nn.Module,
    loader: Iterable[Any],
    input_size: Sequence[int],
    target_speedup: float,
    *,
    layers: Sequence[str] | None = None,
    levels: Sequence[float] = (1.0, 1 / 1.5, 1 / 2, 1 / 3, 1 / 4, 1 / 5),
    mask: str = "grid",
    batch_size: int = 64,
    num_batches: int = 4,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    repeats: int = 7,
    seed: int | None = 0,
    max_steps: int = 100,
    mask_trials: int = 4,
) -> dict[str, Any]:
    """Greedy per-layer rate search of the paper: repeatedly move the layer whose next
    perforation level costs the least loss increase per second of **measured** time saved.

    ``levels`` are kept fractions (``rate = 1 - level``). Layer times are measured once per
    level on this machine (input batch ``batch_size``, eval, no grad, fastest of ``repeats``
    calls) in deployment form: the conv with the mask :func:`perforate` will give it (same
    ``seed``) and the BatchNorm / ReLU / max-pooling that follow it in its ``nn.Sequential``,
    through :func:`fuse_for_inference`; when the predicted speed-up reaches the target, the
    network speed-up is measured (interleaved with ``model``, ratio of the fastest calls) and
    the search continues while it is below ``target_speedup``. Time ``model`` as you will
    deploy it (e.g. after :func:`fuse_for_inference`, channels-last); the candidates inherit
    its layout and are measured after :func:`fuse_for_inference` too. The loss
    is measured on the first ``num_batches`` batches of ``loader``.

    Masks are random (the grid's phase, the uniform positions) and equally good in
    expectation, but not equally fast: a grid lattice that starts at row or column 1 needs
    zeros below the input (a padded copy or an extra output row). For every layer and level
    the search draws ``mask_trials`` masks (seeds ``seed + 1000 i + t``, ``t < mask_trials``;
    ``t = 0`` is the mask :func:`perforate` gives with ``seed``) and keeps the fastest;
    ``result["masks"]`` holds them: pass them to :func:`perforate` as ``mask=``.

    Returns ``{"rates", "masks", "predicted_speedup", "measured_speedup", "loss",
    "base_loss", "history", "layer_times"}`` (``layer_times[name][level]`` in seconds). Moves
    to a level that was not measured faster are never taken; the search stops when none is
    left.

    Example:
        >>> from bdlkit.models import VGGSmall
        >>> data = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))]
        >>> out = search_rates(VGGSmall(), data, (28, 28), 1.2, batch_size=8, repeats=1)
        >>> sorted(out)[:3]
        ['base_loss', 'history', 'layer_times']
    """
    if isinstance(target_speedup, bool) or not isinstance(target_speedup, int | float) \
            or not target_speedup >= 1.0:
        raise ValueError(f"target_speedup must be >= 1, got {target_speedup!r}")
    lv = [float(v) for v in levels]
    if not lv or lv[0] != 1.0 or any(not (0 < b < a) for a, b in zip(lv, lv[1:], strict=False)):
        raise ValueError("levels must start at 1.0 and decrease strictly within (0, 1]")
    if mask not in ("uniform", "grid", "structure"):
        raise ValueError("mask must be 'uniform', 'grid' or 'structure' for the search")
    if isinstance(mask_trials, bool) or not isinstance(mask_trials, int) or mask_trials < 1:
        raise ValueError(f"mask_trials must be a positive int, got {mask_trials!r}")
    mods = dict(model.named_modules())
    if layers is None:
        layers = [n for n, m in mods.items() if isinstance(m, nn.Conv2d)]
    for n in layers:
        if n not in mods or not isinstance(mods[n], nn.Conv2d):
            raise ValueError(f"layers: {n!r} is not a Conv2d of the model")
    if not layers:
        raise ValueError("model has no Conv2d to perforate")
    dev = next(model.parameters()).device
    batches = []
    for i, (x, y) in enumerate(loader):
        if i >= num_batches:
            break
        batches.append((x.to(dev), y.to(dev)))
    if not batches:
        raise ValueError("loader yielded no batch")
    sizes = _conv_inputs(model, input_size)
    order = {n: i for i, n in enumerate(sizes)}
    c0 = mods[layers[0]].in_channels if len(input_size) != 3 else input_size[0]
    # per-layer time per level (measured in deployment form, with the same masks as perforate)
    ltime: dict[str, list[float]] = {}
    lmask: dict[str, list[torch.Tensor]] = {}
    for n in layers:
        conv = mods[n]
        x = torch.randn(batch_size, conv.in_channels, *sizes[n], device=dev)
        if conv.weight.is_contiguous(memory_format=_CL) and not conv.weight.is_contiguous():
            x = x.contiguous(memory_format=_CL)
        ltime[n], lmask[n] = [], []
        with torch.no_grad():
            for lvl in lv:
                fastest: tuple[float, torch.Tensor] | None = None
                for t in range(1 if lvl == 1.0 else mask_trials):
                    p = PerforatedConv2d.from_conv(
                        conv, sizes[n], rate=1 - lvl, mask=mask,
                        seed=None if seed is None else seed + 1000 * order[n] + t,
                        pool=_next_pool(model, n))
                    block = fuse_for_inference(
                        nn.Sequential(p, *copy.deepcopy(_following(model, n))), inplace=True)
                    block.eval()(x)
                    tm = _min_time(lambda b=block, x=x: b(x), repeats)
                    if fastest is None or tm < fastest[0]:
                        fastest = (tm, p.mask.cpu())
                assert fastest is not None
                ltime[n].append(fastest[0])
                lmask[n].append(fastest[1])
    base_loss = _eval_loss(model, batches, loss_fn)
    xin = torch.randn(batch_size, c0, *_size("input_size", input_size), device=dev)
    dense_net = min(_time_pair(model, model, xin, repeats=repeats)[k]
                    for k in ("baseline_min", "candidate_min"))
    state = {n: 0 for n in layers}
    history: list[dict[str, Any]] = []
    cur_loss = base_loss

    def rates_of(st: Mapping[str, int]) -> dict[str, float]:
        return {n: 1.0 - lv[i] for n, i in st.items() if i > 0}

    def masks_of(st: Mapping[str, int]) -> dict[str, torch.Tensor]:
        return {n: lmask[n][i] for n, i in st.items() if i > 0}

    def predicted(st: Mapping[str, int]) -> float:
        saved = sum(ltime[n][0] - ltime[n][i] for n, i in st.items())
        return dense_net / max(dense_net - saved, 1e-12)

    measured = 1.0
    for _ in range(max_steps):
        if predicted(state) >= target_speedup:
            # deployment form: ReLU and max-pooling read the kept values (fuse_for_inference)
            net = fuse_for_inference(perforate(model, rates_of(state), input_size,
                                               mask=masks_of(state), seed=seed),
                                     inplace=True) \
                if rates_of(state) else model
            measured = _time_pair(model, net, xin, repeats=repeats)["speedup_best"]
            if measured >= target_speedup:
                break
        best = None
        for n in layers:
            i = state[n]
            if i + 1 >= len(lv):
                continue
            dt = ltime[n][i] - ltime[n][i + 1]
            if dt <= 0:  # a level that is not faster on this machine is never worth its loss
                continue
            trial = dict(state)
            trial[n] = i + 1
            # loss only: the exact "dense" kernel needs no autotuning
            net = perforate(model, rates_of(trial), input_size, mask=masks_of(trial), seed=seed,
                            kernel="dense")
            loss = _eval_loss(net, batches, loss_fn)
            score = (loss - cur_loss) / dt
            if best is None or score < best[0]:
                best = (score, n, loss)
        if best is None:
            break
        state[best[1]] += 1
        cur_loss = best[2]
        history.append({"layer": best[1], "rate": 1.0 - lv[state[best[1]]], "loss": cur_loss,
                        "predicted_speedup": predicted(state)})
    return {"rates": rates_of(state), "masks": masks_of(state),
            "predicted_speedup": predicted(state),
            "measured_speedup": measured, "loss": cur_loss, "base_loss": base_loss,
            "history": history, "layer_times": ltime}


def fine_tune(
    model: nn.Module,
    loader: Iterable[Any],
    epochs: int = 1,
    lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    max_steps: int | None = None,
) -> list[float]:
    """Fine-tune a (perforated) network with SGD + cosine learning rate; returns batch losses.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> data = [(torch.randn(8, 1, 2, 2), torch.randint(0, 2, (8,)))]
        >>> len(fine_tune(net, data, epochs=2))
        2
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    try:
        per_epoch = len(loader)  # type: ignore[arg-type]
    except TypeError:
        per_epoch = None
    total = max_steps or (per_epoch * epochs if per_epoch else None)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                          weight_decay=weight_decay)
    dev = next(model.parameters()).device
    losses: list[float] = []
    model.train()
    step = 0
    for _ in range(epochs):
        for x, y in loader:
            if total:
                for gr in opt.param_groups:
                    gr["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x.to(dev)), y.to(dev))
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if max_steps is not None and step >= max_steps:
                return losses
    return losses


def _next_non_identity(seq: nn.Sequential, keys: Sequence[str], start: int) -> str | None:
    """The first key from ``keys[start:]`` whose module is not an ``nn.Identity``."""
    return next((k for k in keys[start:] if not isinstance(seq._modules[k], nn.Identity)), None)


def fuse_for_inference(model: nn.Module, inplace: bool = False, fuse_pools: bool = True
                       ) -> nn.Module:
    """Fold eval-mode BatchNorm2d into the preceding conv, move a following ReLU into
    perforated convs (applied to kept values before the fill) and, with ``fuse_pools``, a
    following ``nn.MaxPool2d`` too (:meth:`PerforatedConv2d.fuse_pool`: the pool reads the kept
    values through the fill indices, the paper's implicit interpolation). Works on
    ``nn.Sequential`` containers (conv, BN, ReLU, pool as consecutive children). Use for
    inference only.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()).eval()
        >>> x = torch.randn(1, 1, 5, 5)
        >>> torch.allclose(fuse_for_inference(net)(x), net(x), atol=1e-6)
        True
    """
    net = model if inplace else copy.deepcopy(model)
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        keys = list(seq._modules)
        for i, k in enumerate(keys[:-1]):
            conv, bn = seq._modules[k], seq._modules[keys[i + 1]]
            if not isinstance(conv, nn.Conv2d | PerforatedConv2d):
                continue
            if isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats \
                    and bn.running_var is not None:
                if isinstance(conv, PerforatedConv2d) and conv.activation is not None:
                    continue
                with torch.no_grad():
                    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
                        1 / torch.sqrt(bn.running_var + bn.eps)
                    shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
                    w = conv.weight * scale.view(-1, 1, 1, 1)
                    conv.weight.data = w.contiguous(
                        memory_format=_CL if conv.weight.is_contiguous(memory_format=_CL)
                        and not conv.weight.is_contiguous() else torch.contiguous_format)
                    b = shift if conv.bias is None else conv.bias * scale + shift
                    conv.bias = nn.Parameter(b.detach().clone())
                    if isinstance(conv, PerforatedConv2d):
                        conv._caches = {False: {}, True: {}}
                seq._modules[keys[i + 1]] = nn.Identity()
            # Identity layers (e.g. BN folded by an earlier call) do not separate conv and ReLU
            nxt = _next_non_identity(seq, keys, i + 1)
            if isinstance(conv, PerforatedConv2d) and nxt is not None and conv.activation is None \
                    and isinstance(seq._modules[nxt], nn.ReLU):
                conv.activation = nn.ReLU(inplace=False)
                seq._modules[nxt] = nn.Identity()
                nxt = _next_non_identity(seq, keys, keys.index(nxt) + 1)
            if fuse_pools and isinstance(conv, PerforatedConv2d) and conv.fused_pool is None \
                    and conv.num_kept < conv.mask.numel() and nxt is not None \
                    and isinstance(seq._modules[nxt], nn.MaxPool2d):
                try:
                    conv.fuse_pool(seq._modules[nxt])  # atomic: unchanged if it raises
                except ValueError:
                    continue  # a pool fuse_pool cannot take stays a separate layer
                seq._modules[nxt] = nn.Identity()
    return net

