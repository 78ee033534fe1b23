"""Overhead of functional_call curves vs a plain model (VGGSmall, batch 128, channels-last).

Interleaves A/B (plain model step vs Bezier curve step at a random t; plain eval forward vs
curve eval forward) and reports medians, min/max and the ratios. Also times ``model_at`` and
FGE's snapshot (deepcopy). Writes ``results/fge.json`` and ``results/fge.png``.
Tunes glibc malloc (mallopt) in this benchmark process only, as PERF.md recommends.

Run: ``python benchmarks/fge_bench.py [--repeats 30] [--threads 2]``
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from bdlkit.ensemble import Bezier
from bdlkit.models import VGGSmall

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cl = torch.channels_last
    model = VGGSmall().to(memory_format=cl)
    curve = Bezier(model, VGGSmall().to(memory_format=cl), num_bends=3)
    x = torch.randn(128, 1, 28, 28).to(memory_format=cl)
    y = torch.randint(0, 10, (128,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    copt = torch.optim.SGD(curve.parameters(), lr=1e-3, momentum=0.9)
    wd = 5e-4

    def plain_step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def curve_step() -> None:
        t = float(torch.rand(()))
        w = curve.weights_at(t)
        curve._base.train(True)
        out = functional_call(curve._base, {**w, **curve.buffers_at(t)}, (x,))
        loss = F.cross_entropy(out, y) + 0.5 * wd * sum(v.pow(2).sum() for v in w.values())
        copt.zero_grad(set_to_none=True)
        loss.backward()
        copt.step()

    @torch.no_grad()
    def plain_fwd() -> None:
        model.eval()
        model(x)

    @torch.no_grad()
    def curve_fwd() -> None:
        curve.eval()
        curve(x, 0.37)

    def model_at() -> None:
        curve.model_at(0.37)

    def snapshot() -> None:
        copy.deepcopy(model)

    fns = [plain_step, curve_step, plain_fwd, curve_fwd, model_at, snapshot]
    for f in fns:  # warm-up
        for _ in range(3):
            f()
    times: dict[str, list[float]] = {f.__name__: [] for f in fns}
    for _ in range(args.repeats):
        for f in fns:
            start = time.perf_counter()
            f()
            times[f.__name__].append(time.perf_counter() - start)
    summary = {k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v),
                   "max_ms": 1e3 * max(v)} for k, v in times.items()}
    ratios = {
        "curve_step / plain_step": statistics.median(
            c / p for c, p in zip(times["curve_step"], times["plain_step"], strict=True)),
        "curve_fwd / plain_fwd": statistics.median(
            c / p for c, p in zip(times["curve_fwd"], times["plain_fwd"], strict=True)),
    }
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "threads": args.threads,
              "repeats": args.repeats, "batch": 128, "model": "VGGSmall channels_last",
              "timings": summary, "ratios (median of paired ratios)": ratios}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "fge.json").write_text(json.dumps(result, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(summary)
    med = [summary[n]["median_ms"] for n in names]
    lo = [summary[n]["median_ms"] - summary[n]["min_ms"] for n in names]
    hi = [summary[n]["max_ms"] - summary[n]["median_ms"] for n in names]
    ax.bar(names, med, yerr=[lo, hi], capsize=3)
    ax.set_ylabel("ms (median, min-max)")
    ax.set_title("Curve (functional_call) vs plain VGGSmall, batch 128")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(out / "fge.png", dpi=110)
    print(json.dumps(result, indent=2))


def _tune_malloc() -> None:
    """M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB for this benchmark process only (PERF.md)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)
        libc.mallopt(-1, 1 << 30)
    except OSError:
        pass


if __name__ == "__main__":
    _tune_malloc()
    main()
