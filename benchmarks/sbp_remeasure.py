"""Re-time the networks saved by ``bdlkit run sbp`` (pretrained vs pruned), standalone.

The recipe saves ``<net>_pretrained.pt`` / ``<net>_pruned.pt`` (whole modules) in its output
folder and times them right after training; when that timing ran under SCHED_IDLE next to other
jobs, this script re-measures the same saved models in a short separate process, e.g. at normal
priority on a quieter machine. Timing: ``bk.measure_speedup`` (warm-up, interleaved repeats,
medians with min/max, fastest-vs-fastest), fp32, NCHW, ``torch.inference_mode``.

Run:  nice -n 0 .venv/bin/python benchmarks/sbp_remeasure.py /tmp/sbp_full/sbp \\
          [--repeats 50] [--out benchmarks/results/sbp_remeasure.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch

from bdlkit.compress.speed import measure_speedup
from bdlkit.experiments.sbp import load_network

NETS = {"LeNet-500-300": "lenet500_300", "LeNet5-Caffe": "lenet5"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="output folder of `bdlkit run sbp` (…/sbp)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 100])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    report: dict = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "torch": torch.__version__, "load_avg_start": os.getloadavg(),
                    "folder": str(args.folder), "repeats": args.repeats, "nets": {}}
    for name, slug in NETS.items():
        paths = [args.folder / f"{slug}_{kind}.pt" for kind in ("pretrained", "pruned")]
        if not all(p.is_file() for p in paths):
            print(f"{name}: saved models not found in {args.folder}, skipped")
            continue
        original, pruned = (load_network(p) for p in paths)
        r = measure_speedup(original, pruned, (1, 28, 28), batch_sizes=tuple(args.batches),
                            threads=tuple(args.threads), repeats=args.repeats)
        report["nets"][name] = r
        print(f"{name}: FLOP reduction {r['flop_reduction']:.2f}x")
        for x in r["rows"]:
            print(f"  threads {x['threads']} batch {x['batch']:4d}: original "
                  f"{x['original_ms']:.3f} ms, pruned {x['pruned_ms']:.3f} ms, speed-up "
                  f"{x['speedup']:.2f} ({x['speedup_min']:.2f}-{x['speedup_max']:.2f}), "
                  f"fastest vs fastest {x['speedup_of_minima']:.2f}")
    report["load_avg_end"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
