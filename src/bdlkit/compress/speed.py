"""Real CPU latency and FLOP comparison of two networks (e.g. original vs pruned/perforated).

``measure_speedup`` times both models on the same random input, interleaving them (A B, B A,
A B, ...) after a warm-up so that load from other processes hits both alike, and reports
medians with min/max per (threads, batch size). FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` (matmul / convolution FLOPs, 2 per multiply-add;
pooling, activations and gathers are not counted).

Example:
    >>> from torch import nn
    >>> big = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4))
    >>> small = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> r = measure_speedup(big, small, (64,), batch_sizes=(8,), threads=(1,), repeats=3)
    >>> r["flop_reduction"] > 10
    True
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bdlkit._modes import kept_modes

__all__ = ["count_flops", "measure_speedup", "time_interleaved"]


def count_flops(model: nn.Module | Callable[[torch.Tensor], Any], example_input: torch.Tensor,
                ) -> int:
    """FLOPs of one forward pass on ``example_input`` (matmul/conv ops, 2 per MAC).

    Example:
        >>> count_flops(torch.nn.Linear(10, 5), torch.zeros(3, 10))
        300
    """
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError("example_input must be a tensor")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example_input)
    return int(counter.get_total_flops())


def time_interleaved(fns: Sequence[Callable[[], Any]], repeats: int = 20, warmup: int = 3,
                     min_seconds: float = 0.02) -> list[list[float]]:
    """Per-call seconds of each function, interleaved; returns ``repeats`` samples per function.

    Each sample times ``n`` back-to-back calls (``n`` chosen in the warm-up so that a sample
    lasts at least ``min_seconds``) and divides by ``n``. The order of the functions is
    rotated every repeat so no function always runs first.

    Example:
        >>> ts = time_interleaved([lambda: sum(range(100)), lambda: sum(range(10))], repeats=3)
        >>> len(ts), len(ts[0])
        (2, 3)
    """
    if not fns or not all(callable(f) for f in fns):
        raise TypeError("fns must be a non-empty sequence of callables")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not isinstance(min_seconds, (int, float)) or min_seconds < 0:
        raise ValueError(f"min_seconds must be >= 0, got {min_seconds!r}")
    inner = []
    for f in fns:
        for _ in range(warmup):
            f()
        t0 = time.perf_counter()
        f()
        one = max(time.perf_counter() - t0, 1e-7)
        inner.append(max(1, int(min_seconds / one)))
    samples: list[list[float]] = [[] for _ in fns]
    k = len(fns)
    for r in range(repeats):
        for j in range(k):
            i = (j + r) % k
            n = inner[i]
            t0 = time.perf_counter()
            for _ in range(n):
                fns[i]()
            samples[i].append((time.perf_counter() - t0) / n)
    return samples


def measure_speedup(original: nn.Module, pruned: nn.Module, input_shape: Sequence[int],
                    batch_sizes: Iterable[int] = (1, 100), threads: Iterable[int] = (1, 2),
                    repeats: int = 20, warmup: int = 5, min_seconds: float = 0.02,
                    channels_last: bool = False, seed: int = 0) -> dict[str, Any]:
    """Measured CPU inference speed-up and FLOP reduction of ``pruned`` over ``original``.

    Both models run in eval mode under ``torch.inference_mode`` on the same random input of
    shape ``(batch, *input_shape)``; ``torch.set_num_threads`` is set for each entry of
    ``threads`` and restored afterwards (as are the models' train/eval flags). The speed-up
    is the ratio of the median per-call latencies; ``speedup_min``/``speedup_max`` bracket
    it with the ratio of the slowest original to the fastest pruned sample and vice versa;
    ``speedup_of_minima`` (fastest vs fastest) is the estimate least affected by other load.

    Returns ``{"flops_original", "flops_pruned", "flop_reduction", "rows": [...]}`` with one
    row per (threads, batch): ``threads, batch, original_ms, pruned_ms`` (medians),
    ``original_ms_min/max``, ``pruned_ms_min/max``, ``speedup``, ``speedup_min/max``,
    ``speedup_of_minima``.
    FLOPs are per example (batch 1).

    Example:
        >>> big = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 300))
        >>> small = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 30))
        >>> r = measure_speedup(big, small, (1, 28, 28), (4,), (1,), repeats=3)
        >>> round(r["flop_reduction"])
        10
    """
    for name, m in (("original", original), ("pruned", pruned)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(m).__name__}")
    shape = tuple(input_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"input_shape must be positive ints (without the batch dim), "
                         f"got {input_shape!r}")
    batch_sizes, threads = tuple(batch_sizes), tuple(threads)  # iterators are read once
    for name, vals in (("batch_sizes", batch_sizes), ("threads", threads)):
        if not vals or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals):
            raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {vals!r}")
    dtype = next((p.dtype for p in original.parameters() if p.is_floating_point()),
                 torch.get_default_dtype())  # inputs in the models' own float type
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")

    old_threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(seed)
    with kept_modes(original, pruned):
        try:
            original.eval()
            pruned.eval()
            x1 = torch.rand((1, *shape), generator=gen).to(dtype)
            flops_o = count_flops(original, x1)
            flops_p = count_flops(pruned, x1)
            rows = []
            for t in threads:
                torch.set_num_threads(t)
                for bs in batch_sizes:
                    x = torch.rand((bs, *shape), generator=gen).to(dtype)
                    if channels_last and x.dim() == 4:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with torch.inference_mode():
                        so, sp = time_interleaved([lambda x=x: original(x), lambda x=x: pruned(x)],
                                                  repeats=repeats, warmup=warmup,
                                                  min_seconds=min_seconds)
                    mo, mp = statistics.median(so), statistics.median(sp)
                    rows.append({
                        "threads": t, "batch": bs,
                        "original_ms": 1e3 * mo, "pruned_ms": 1e3 * mp,
                        "original_ms_min": 1e3 * min(so), "original_ms_max": 1e3 * max(so),
                        "pruned_ms_min": 1e3 * min(sp), "pruned_ms_max": 1e3 * max(sp),
                        "speedup": mo / mp,
                        "speedup_min": min(so) / max(sp), "speedup_max": max(so) / min(sp),
                        "speedup_of_minima": min(so) / min(sp),
                    })
        finally:
            torch.set_num_threads(old_threads)
    return {"flops_original": flops_o, "flops_pruned": flops_p,
            "flop_reduction": flops_o / max(flops_p, 1), "rows": rows}
