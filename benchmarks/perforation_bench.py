"""Layer-level benchmark of PerforatedConv2d vs the best dense 3x3 convolution.

VGG-16-style layer shapes (C_in = C_out = C, 3x3, padding 1) at 56/28/14, batch 1 and 32,
rates 0.5 and 0.75, masks grid / uniform / impact (impact = top positions of random scores:
speed depends only on the positions, not on how they were chosen), 2 threads, float32.
The dense baseline is the faster of NCHW and NHWC ``F.conv2d`` per shape (medians).
Every variant of a shape is timed interleaved (rotating order), after a warm-up that also
lets ``kernel="auto"`` pick its kernel; we report medians, min-max and the ideal 1/(1-r).

The harness sets glibc ``mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB)`` (see PERF.md: fresh
memory page faults are expensive here); the library itself never touches the allocator.
Pass ``--no-mallopt`` to measure without it.

Run: ``python benchmarks/perforation_bench.py [--quick] [--repeats N]``; writes
``benchmarks/results/perforation.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bdlkit.compress.perforation import PerforatedConv2d

SHAPES = [(64, 56), (128, 56), (128, 28), (256, 28), (256, 14), (512, 14)]
QUICK_SHAPES = [(64, 28), (128, 14)]
RATES = (0.5, 0.75)
MASKS = ("grid", "uniform", "impact")


def _timeit(fn, n: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def bench_shape(c: int, s: int, batch: int, repeats: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, c, 3, 3, generator=g) * (2 / (9 * c)) ** 0.5
    b = torch.randn(c, generator=g) * 0.01
    x = torch.randn(batch, c, s, s, generator=g)
    xc = x.contiguous(memory_format=torch.channels_last)
    wc = w.contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(c, c, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(b)
    conv = conv.to(memory_format=torch.channels_last)
    variants = {
        "dense_nchw": lambda: F.conv2d(x, w, b, 1, 1),
        "dense_nhwc": lambda: F.conv2d(xc, wc, b, 1, 1),
    }
    layers = {}
    for rate in RATES:
        for mask in MASKS:
            scores = torch.rand(s, s, generator=g) if mask == "impact" else None
            p = PerforatedConv2d.from_conv(conv, (s, s), rate=rate, mask=mask, seed=seed,
                                           scores=scores).eval()
            layers[(mask, rate)] = p
            variants[f"{mask}@{rate}"] = (lambda p=p: p(xc))
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for n in names:  # warm-up; the perforated layers autotune their kernel here
            variants[n]()
            variants[n]()
        one = _timeit(variants["dense_nhwc"])
        inner = max(1, int(0.02 / max(one, 1e-7)))
        for r in range(repeats):
            for j in range(len(names)):
                n = names[(j + r) % len(names)]
                times[n].append(_timeit(variants[n], inner))
    med = {n: statistics.median(t) for n, t in times.items()}
    best_dense = min(("dense_nchw", "dense_nhwc"), key=lambda n: med[n])
    rows = []
    for (mask, rate), p in layers.items():
        n = f"{mask}@{rate}"
        rows.append({
            "C": c, "HW": s, "batch": batch, "mask": mask, "rate": rate,
            "realised_rate": p.rate, "ideal": p.theoretical_speedup,
            "kernel": p.kernel_for(xc),
            "dense_nchw_ms": 1e3 * med["dense_nchw"], "dense_nhwc_ms": 1e3 * med["dense_nhwc"],
            "best_dense": best_dense, "perforated_ms": 1e3 * med[n],
            "perforated_ms_min": 1e3 * min(times[n]), "perforated_ms_max": 1e3 * max(times[n]),
            "speedup": med[best_dense] / med[n],
            "speedup_min": min(times[best_dense]) / max(times[n]),
            "speedup_max": max(times[best_dense]) / min(times[n]),
            # min/min: the least disturbed samples (robust when other processes preempt)
            "speedup_best": min(min(times["dense_nchw"]), min(times["dense_nhwc"]))
            / min(times[n]),
        })
        rows[-1]["fraction_of_ideal"] = rows[-1]["speedup"] / rows[-1]["ideal"]
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        for mask in MASKS:
            for rate in RATES:
                sel = [r for r in rows if r["batch"] == batch and r["mask"] == mask
                       and r["rate"] == rate]
                if not sel:
                    continue
                sp = [r["speedup"] for r in sel]
                fr = [r["fraction_of_ideal"] for r in sel]
                bs = [r["speedup_best"] for r in sel]
                out.append({"batch": batch, "mask": mask, "rate": rate,
                            "ideal": 1 / (1 - rate), "median_speedup": statistics.median(sp),
                            "min_speedup": min(sp), "max_speedup": max(sp),
                            "median_fraction_of_ideal": statistics.median(fr),
                            "median_speedup_best": statistics.median(bs),
                            "median_fraction_of_ideal_best":
                                statistics.median(bs) / (1 / (1 - rate))})
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(7 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        shapes = sorted({(r["C"], r["HW"]) for r in rows if r["batch"] == batch})
        labels = [f"C{c}@{s}" for c, s in shapes]
        k = 0
        width = 0.8 / (len(MASKS) * len(RATES))
        for rate in RATES:
            for mask in MASKS:
                ys = []
                for c, s in shapes:
                    m = [r for r in rows if (r["batch"], r["C"], r["HW"], r["mask"], r["rate"])
                         == (batch, c, s, mask, rate)]
                    ys.append(m[0]["speedup"] if m else 0.0)
                xs = [i - 0.4 + width * (k + 0.5) for i in range(len(shapes))]
                ax.bar(xs, ys, width, label=f"{mask} r={rate}")
                k += 1
        for rate, ls in zip(RATES, ("--", ":"), strict=True):
            ax.axhline(1 / (1 - rate), color="k", ls=ls, lw=1, label=f"ideal r={rate}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(range(len(shapes)), labels)
        ax.set_ylabel("speed-up vs best dense conv (median)")
        ax.set_title(f"PerforatedConv2d, batch {batch}, {torch.get_num_threads()} threads")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two small shapes only")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--no-mallopt", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if not args.no_mallopt:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)
        libc.mallopt(-1, 1 << 30)
    torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rows: list[dict] = []
    t0 = time.perf_counter()
    for batch in args.batches:
        for c, s in shapes:
            rows += bench_shape(c, s, batch, args.repeats)
            last = rows[-len(MASKS) * len(RATES):]
            print(f"batch {batch} C={c} {s}x{s}: " + ", ".join(
                f"{r['mask']}@{r['rate']}={r['speedup']:.2f}({r['kernel']})" for r in last),
                flush=True)
    summary = summarise(rows)
    for r in summary:
        print(f"batch {r['batch']:>2} {r['mask']:>7} r={r['rate']}: median "
              f"{r['median_speedup']:.2f}x (min {r['min_speedup']:.2f}, max "
              f"{r['max_speedup']:.2f}), ideal {r['ideal']:.1f}, "
              f"{r['median_fraction_of_ideal']:.2f} of ideal; min/min "
              f"{r['median_speedup_best']:.2f}x = {r['median_fraction_of_ideal_best']:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    name = "perforation_quick" if args.quick else "perforation"
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "mallopt": not args.no_mallopt, "repeats": args.repeats,
            "seconds": time.perf_counter() - t0}
    (args.out / f"{name}.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    plot(rows, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.json/.png in {meta['seconds']:.0f} s")


if __name__ == "__main__":
    main()
