"""CPU speed-up of networks with the SBP paper's pruned layer sizes over the originals.

Independent of training: the pruned shapes are those reported by Neklyudov et al. (2017)
(LeNet5-Caffe 3-18-284-283, LeNet-500-300 245-160-55), built the way ``bk.sbp.prune`` builds
them (``IndexSelect`` for dropped inputs), with random weights. Timing: ``measure_speedup``
(warm-up, interleaved repeats, medians + min/max), fp32, NCHW, ``torch.inference_mode``.

Run:  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sbp_bench.py [--repeats 30] \
          [--lenet5-sizes 4-9-143-146 5-9-143-146]   (extra LeNet5 sizes, batch 100, 1 thread)
Writes benchmarks/results/sbp.json and benchmarks/results/sbp.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
from torch import nn

from bdlkit.compress.sbp import IndexSelect
from bdlkit.compress.speed import measure_speedup
from bdlkit.models import LeNet5, LeNet500_300


def pruned_lenet5(sizes: tuple[int, int, int, int] = (3, 18, 284, 283)) -> nn.Sequential:
    """LeNet5-Caffe pruned to conv1 / conv2 channels, fc1 inputs / units (default: paper's)."""
    c1, c2, f_in, f_out = sizes
    if not 0 < f_in <= c2 * 16:
        raise ValueError(f"fc1 inputs must lie in (0, {c2 * 16}] for {c2} conv2 channels")
    keep = torch.randperm(c2 * 16, generator=torch.Generator().manual_seed(0))[:f_in].sort()[0]
    return nn.Sequential(nn.Conv2d(1, c1, 5), nn.MaxPool2d(2), nn.Conv2d(c1, c2, 5),
                         nn.MaxPool2d(2), nn.Flatten(), IndexSelect(keep), nn.Linear(f_in, f_out),
                         nn.ReLU(), nn.Linear(f_out, 10))


def _sizes(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(v) for v in text.split("-"))
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected c1-c2-fc1in-fc1out, got {text!r}")
    return parts  # type: ignore[return-value]


def pruned_lenet500_300() -> nn.Sequential:
    keep = torch.randperm(784, generator=torch.Generator().manual_seed(0))[:245].sort()[0]
    return nn.Sequential(nn.Flatten(), IndexSelect(keep), nn.Linear(245, 160), nn.ReLU(),
                         nn.Linear(160, 55), nn.ReLU(), nn.Linear(55, 10))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--lenet5-sizes", type=_sizes, nargs="*", default=[], metavar="C1-C2-IN-OUT",
                    help="extra pruned LeNet5 sizes to time (batch 100, 1 thread), "
                    "e.g. 4-9-143-146")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    results = {}
    nets = [("LeNet5-Caffe", LeNet5(), pruned_lenet5(), (1, 100), (1, 2)),
            ("LeNet-500-300", LeNet500_300(), pruned_lenet500_300(), (1, 100), (1, 2))]
    nets += [(f"LeNet5 {'-'.join(map(str, s))}", LeNet5(), pruned_lenet5(s), (100,), (1,))
             for s in args.lenet5_sizes]
    for name, big, small, batches, threads in nets:
        r = measure_speedup(big, small, (1, 28, 28), batch_sizes=batches, threads=threads,
                            repeats=args.repeats)
        results[name] = r
        print(name, f"FLOP reduction {r['flop_reduction']:.2f}x")
        for x in r["rows"]:
            print(f"  threads {x['threads']} batch {x['batch']:3d}: {x['original_ms']:.3f} ms -> "
                  f"{x['pruned_ms']:.3f} ms, speed-up {x['speedup']:.2f} "
                  f"({x['speedup_min']:.2f}-{x['speedup_max']:.2f}), "
                  f"of minima {x['speedup_of_minima']:.2f}")
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "repeats": args.repeats, "results": results}
    (args.out / "sbp.json").write_text(json.dumps(meta, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels, vals, errs = [], [], []
    for name, r in results.items():
        for x in r["rows"]:
            labels.append(f"{name}\n{x['threads']}t b{x['batch']}")
            vals.append(x["speedup"])
            errs.append([[x["speedup"] - x["speedup_min"]], [x["speedup_max"] - x["speedup"]]])
    err = [[e[0][0] for e in errs], [e[1][0] for e in errs]]
    ax.bar(range(len(vals)), vals, yerr=err, capsize=3)
    ax.set_xticks(range(len(vals)), labels, fontsize=6)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_ylabel("CPU speed-up (median)")
    ax.set_title("Paper's SBP layer sizes vs original (CPU, fp32)")
    fig.tight_layout()
    fig.savefig(args.out / "sbp.png", dpi=120)


if __name__ == "__main__":
    main()
