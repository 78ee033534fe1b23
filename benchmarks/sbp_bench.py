"""CPU speed-up of networks with the SBP paper's pruned layer sizes over the originals.

Independent of training: the pruned shapes are those reported by Neklyudov et al. (2017)
(LeNet5-Caffe 3-18-284-283, LeNet-500-300 245-160-55), built the way ``bk.sbp.prune`` builds
them (``IndexSelect`` for dropped inputs), with random weights. Timing: ``measure_speedup``
(warm-up, interleaved repeats, medians + min/max), fp32, NCHW, ``torch.inference_mode``.

Run:  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sbp_bench.py [--repeats 30]
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


def pruned_lenet5() -> nn.Sequential:
    keep = torch.randperm(18 * 16, generator=torch.Generator().manual_seed(0))[:284].sort()[0]
    return nn.Sequential(nn.Conv2d(1, 3, 5), nn.MaxPool2d(2), nn.Conv2d(3, 18, 5), nn.MaxPool2d(2),
                         nn.Flatten(), IndexSelect(keep), nn.Linear(284, 283), nn.ReLU(),
                         nn.Linear(283, 10))


def pruned_lenet500_300() -> nn.Sequential:
    keep = torch.randperm(784, generator=torch.Generator().manual_seed(0))[:245].sort()[0]
    return nn.Sequential(nn.Flatten(), IndexSelect(keep), nn.Linear(245, 160), nn.ReLU(),
                         nn.Linear(160, 55), nn.ReLU(), nn.Linear(55, 10))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    results = {}
    for name, big, small in [("LeNet5-Caffe", LeNet5(), pruned_lenet5()),
                             ("LeNet-500-300", LeNet500_300(), pruned_lenet500_300())]:
        r = measure_speedup(big, small, (1, 28, 28), batch_sizes=(1, 100), threads=(1, 2),
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
