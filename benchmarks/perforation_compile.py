"""Does ``torch.compile`` help perforated or dense VGGSmall inference? (one process per mode)

Modes: ``eager`` (both eager), ``compiled`` (both compiled), ``mixed`` (compiled dense vs eager
perforated: each side at its best, as measured by the first two modes).

Builds VGGSmall (random weights: timing only), the perforated net with the rates the
``perforation`` recipe's search chose for seed 0, both through ``fuse_for_inference``,
channels-last, batch 256, 2 threads, and times them interleaved (31 rounds, median and min) either
eagerly or after ``torch.compile`` (inductor). Run each mode in its own process, with the same
allocator settings as the CLI::

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824 TORCHINDUCTOR_COMPILE_THREADS=1 \\
        python benchmarks/perforation_compile.py eager|compiled|mixed
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bdlkit.compress.perforation import fuse_for_inference, perforate
from bdlkit.models import VGGSmall

RATES = {"features.3": 0.75, "features.7": 0.75, "features.10": 0.875, "features.14": 0.75,
         "features.17": 0.875}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=("eager", "compiled", "mixed"))
    ap.add_argument("--rounds", type=int, default=31)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = VGGSmall().eval()
    x = torch.randn(256, 1, 28, 28).to(memory_format=torch.channels_last)
    nets = {"dense": fuse_for_inference(model).to(memory_format=torch.channels_last),
            "perforated": fuse_for_inference(perforate(model, RATES, (28, 28), mask="grid",
                                                       seed=0).eval())
            .to(memory_format=torch.channels_last)}
    times: dict[str, list[float]] = {k: [] for k in nets}
    with torch.no_grad():
        nets["perforated"](x)  # eager kernel autotuning before any compilation
        if args.mode == "compiled":
            nets = {k: torch.compile(v) for k, v in nets.items()}
        elif args.mode == "mixed":
            nets["dense"] = torch.compile(nets["dense"])
        for net in nets.values():
            for _ in range(3):
                net(x)
        for _ in range(args.rounds):
            for k, net in nets.items():
                t0 = time.perf_counter()
                net(x)
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(args.mode, {k: f"median {med[k]:.2f} ms, min {min(v) * 1e3:.2f} ms"
                      for k, v in times.items()},
          f"speed-up (medians) {med['dense'] / med['perforated']:.2f}x")


if __name__ == "__main__":
    main()
