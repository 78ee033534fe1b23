"""Benchmark: TRIP log_prob / sample throughput vs an explicit (brute-force) mixture.

For small D the d^D mixture components are enumerated once (weights, means, stds) and the
brute-force mixture evaluates ``logsumexp`` over all of them (log_prob) or draws a component
from the flat categorical (sample). TRIP never enumerates: O(D (d m^2 + m^3)) per point.
Also times TRIP alone at D=64, d=10, m=20, batch 1024 (10^64 components: no brute force).

Variants are interleaved (A B A B ...), after a warm-up; medians and min/max are reported.
Writes ``benchmarks/results/trip.json`` and ``.png``.

Usage: ``python benchmarks/trip_bench.py [--repeats 7] [--threads 1]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bdlkit.generative.trip import TRIP

OUT = Path(__file__).resolve().parent / "results"


class BruteForceMixture:
    """The same distribution as a TRIP, as an explicit list of d^D diagonal Gaussians."""

    def __init__(self, prior: TRIP) -> None:
        q = prior.cores.detach().double()
        D, d = prior.dim, prior.n_components
        combos = torch.tensor(list(itertools.product(range(d), repeat=D)))  # (C, D)
        mats = q[torch.arange(D), combos]  # (C, D, m, m)
        prod = mats[:, 0]
        for k in range(1, D):
            prod = prod @ mats[:, k]
        w = torch.diagonal(prod, dim1=-2, dim2=-1).sum(-1)
        self.log_w = (w / w.sum()).log().float()  # (C,)
        ar = torch.arange(D)
        self.mu = prior.means.detach()[ar, combos]  # (C, D)
        self.sd = prior.stds.detach()[ar, combos]

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        out = []
        for zc in z.split(max(1, (1 << 22) // self.mu.numel())):
            diff = (zc[:, None, :] - self.mu) / self.sd
            comp = (-0.5 * diff * diff - self.sd.log()).sum(-1) - 0.5 * self.mu.shape[1] * \
                torch.log(torch.tensor(2 * torch.pi))
            out.append(torch.logsumexp(comp + self.log_w, -1))
        return torch.cat(out)

    def sample(self, n: int) -> torch.Tensor:
        idx = torch.multinomial(self.log_w.exp(), n, replacement=True)
        return self.mu[idx] + self.sd[idx] * torch.randn(n, self.mu.shape[1])


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(_time(fn))
    return times


def _summary(ts: list[float], n: int) -> dict[str, float]:
    med = statistics.median(ts)
    return {"median_s": med, "min_s": min(ts), "max_s": max(ts), "per_point_us": med / n * 1e6,
            "points_per_s": n / med}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B = args.batch
    results: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__, "threads": args.threads, "batch": B,
        "repeats": args.repeats, "small": [], "large": {},
    }
    small = results["small"]
    for D, d, m in [(3, 4, 4), (4, 4, 4), (5, 4, 4), (6, 4, 4), (4, 8, 4), (5, 8, 4)]:
        prior = TRIP(D, d, m)
        with torch.no_grad():
            prior.log_cores.normal_(0, 1)
        bf = BruteForceMixture(prior)
        z = prior.sample(B)
        err = (prior.log_prob(z).detach().double() - bf.log_prob(z).double()).abs().max().item()
        with torch.no_grad():
            t = _interleaved({
                "trip_log_prob": lambda p=prior, z=z: p.log_prob(z),
                "brute_log_prob": lambda b=bf, z=z: b.log_prob(z),
                "trip_sample": lambda p=prior: p.sample(B),
                "brute_sample": lambda b=bf: b.sample(B),
            }, args.repeats)
        row = {"D": D, "d": d, "m": m, "components": d**D, "max_abs_logprob_diff": err,
               **{k: _summary(v, B) for k, v in t.items()}}
        row["log_prob_speedup"] = (row["brute_log_prob"]["median_s"]
                                   / row["trip_log_prob"]["median_s"])
        row["sample_speedup"] = row["brute_sample"]["median_s"] / row["trip_sample"]["median_s"]
        small.append(row)
        print(f"D={D} d={d} m={m} ({d**D} comps): log_prob TRIP "
              f"{row['trip_log_prob']['per_point_us']:.2f} us/pt vs brute "
              f"{row['brute_log_prob']['per_point_us']:.2f} (x{row['log_prob_speedup']:.2f}); "
              f"sample TRIP {row['trip_sample']['per_point_us']:.2f} vs brute "
              f"{row['brute_sample']['per_point_us']:.2f} (x{row['sample_speedup']:.2f}); "
              f"max |diff| {err:.1e}", flush=True)

    prior = TRIP(64, 10, 20)
    z = prior.sample(B)

    def fwd_bwd() -> None:
        prior.zero_grad(set_to_none=True)
        prior.log_prob(z).sum().backward()

    def fwd() -> None:
        with torch.no_grad():
            prior.log_prob(z)

    t = _interleaved({"log_prob": fwd, "log_prob_fwd_bwd": fwd_bwd,
                      "sample": lambda: prior.sample(B)}, args.repeats)
    results["large"] = {"D": 64, "d": 10, "m": 20, **{k: _summary(v, B) for k, v in t.items()}}
    for k in t:
        s = results["large"][k]
        print(f"D=64 d=10 m=20 batch {B}: {k} median {s['median_s'] * 1e3:.1f} ms "
              f"[{s['min_s'] * 1e3:.1f}, {s['max_s'] * 1e3:.1f}] = {s['points_per_s']:.0f} pts/s",
              flush=True)

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "trip.json").write_text(json.dumps(results, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    comps = [r["components"] for r in small]
    for ax, what in zip(axes, ("log_prob", "sample"), strict=True):
        for name, key in (("TRIP", f"trip_{what}"), ("brute-force mixture", f"brute_{what}")):
            med = [r[key]["per_point_us"] for r in small]
            lo = [r[key]["min_s"] / B * 1e6 for r in small]
            hi = [r[key]["max_s"] / B * 1e6 for r in small]
            ax.errorbar(comps, med, yerr=[[a - b for a, b in zip(med, lo, strict=True)],
                                          [b - a for a, b in zip(med, hi, strict=True)]],
                        marker="o", ls="", label=name, capsize=2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of mixture components d^D")
        ax.set_ylabel("us per point (median, min-max)")
        ax.set_title(f"{what}, batch {B}, {args.threads} thread(s)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "trip.png", dpi=120)
    print(f"wrote {OUT / 'trip.json'} and {OUT / 'trip.png'}")


if __name__ == "__main__":
    main()
