"""Diagnostic: how much of LeNet5's CPU latency is torch's NCHW max-pooling kernel?

Loads the saved ``lenet5_pretrained.pt`` / ``lenet5_pruned.pt`` of an ``sbp`` run, prints the
per-layer median latency (batch 100, 1 thread), and re-times the pair with every
``nn.MaxPool2d(2)`` of *both* networks replaced by an exactly equal element-wise maximum of the
four strided 2x2 sub-grids (:class:`StridedMax2x2`). Not part of the recipe; the acceptance
figures use the networks as they are.

Run:  flock /tmp/s3/timing.lock benchmarks/pause_idle_jobs.sh nice -n 0 .venv/bin/python \\
          benchmarks/sbp_pool_diag.py /tmp/sbp5/final/sbp [--out result.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn

from bdlkit.compress.speed import measure_speedup
from bdlkit.experiments.sbp import load_network


class StridedMax2x2(nn.Module):
    """``nn.MaxPool2d(2)`` (stride 2, no padding, floor mode) as a maximum of 4 strided views."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        return torch.maximum(torch.maximum(x[..., 0:h:2, 0:w:2], x[..., 0:h:2, 1:w:2]),
                             torch.maximum(x[..., 1:h:2, 0:w:2], x[..., 1:h:2, 1:w:2]))


def swap_pools(model: nn.Module) -> nn.Module:
    """Copy of ``model`` with each plain 2x2/stride-2 ``nn.MaxPool2d`` replaced."""
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, nn.MaxPool2d) and m.kernel_size in (2, (2, 2)) and m.stride in (
                2, (2, 2)) and m.padding in (0, (0, 0)) and not m.ceil_mode:
            parent_name, _, attr = name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            setattr(parent, attr, StridedMax2x2())
    return out


def per_layer_ms(model: nn.Module, x: torch.Tensor, repeats: int = 30) -> list[list]:
    """Median latency of every leaf module applied in order (Sequential-style models)."""
    leaves = [m for m in model.modules() if not list(m.children())]
    times: list[list[float]] = [[] for _ in leaves]
    with torch.inference_mode():
        for r in range(repeats + 3):
            h = x
            for i, m in enumerate(leaves):
                t = time.perf_counter()
                h = m(h)
                if r >= 3:
                    times[i].append(time.perf_counter() - t)
    return [[type(m).__name__, round(1e3 * sorted(t)[len(t) // 2], 3)]
            for m, t in zip(leaves, times, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    orig, pruned = (load_network(args.folder / f"lenet5_{k}.pt")
                    for k in ("pretrained", "pruned"))
    x = torch.randn(100, 1, 28, 28)
    fast_o, fast_p = swap_pools(orig), swap_pools(pruned)
    with torch.inference_mode():
        diff = max(float((fast_o(x) - orig(x)).abs().max()),
                   float((fast_p(x) - pruned(x)).abs().max()))
    report = {"max_abs_diff_after_swap": diff, "layers": {}}
    for name, m in (("original", orig), ("pruned", pruned), ("original_fastpool", fast_o),
                    ("pruned_fastpool", fast_p)):
        report["layers"][name] = per_layer_ms(m, x)
        print(name, report["layers"][name])
    for tag, (a, b) in (("torch MaxPool2d", (orig, pruned)), ("strided max", (fast_o, fast_p))):
        r = measure_speedup(a, b, (1, 28, 28), batch_sizes=(100,), threads=(1,),
                            repeats=args.repeats)
        row = r["rows"][0]
        report[tag] = row
        print(f"{tag}: original {row['original_ms']:.3f} ms, pruned {row['pruned_ms']:.3f} ms, "
              f"speed-up {row['speedup']:.2f} ({row['speedup_min']:.2f}-{row['speedup_max']:.2f})"
              f", fastest vs fastest {row['speedup_of_minima']:.2f}")
    print(f"max |output difference| after the swap: {diff:.1e}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
