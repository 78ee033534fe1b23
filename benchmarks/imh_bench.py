"""Chain throughput of ImplicitMH.run.

Compares, for several numbers of parallel chains, (A) ``ImplicitMH.run`` (independent and
Markov) with (B) the bare cost of the same proposal + discriminator calls without any MH
bookkeeping, which is a lower bound for any implementation. Reports chain-steps per second
and the overhead ratio A/B. Warm-up, interleaved A/B repeats, medians and min/max.

Usage: OMP_NUM_THREADS=1 python benchmarks/imh_bench.py [--repeats 5] [--steps 50]
Writes benchmarks/results/imh.json and imh.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from bdlkit import plots
from bdlkit.generative.gan import MLPDiscriminator, toy_gan
from bdlkit.generative.imh import ImplicitMH, PairDiscriminator, random_walk_proposal


def _timed(fa, fb, repeats: int) -> tuple[list[float], list[float]]:  # noqa: ANN001
    fa(), fb()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):  # interleaved A B A B ...
        t = time.perf_counter()
        fa()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        fb()
        tb.append(time.perf_counter() - t)
    return ta, tb


def _bench_chains(n: int, steps: int, repeats: int, D, f, prop, rw) -> list[dict]:  # noqa: ANN001
    x0 = prop(n)
    mh_ind, mh_mk = ImplicitMH(D, prop), ImplicitMH(f, rw, markov=True)

    def a_ind() -> None:
        mh_ind.run(x0, steps, keep="last")

    def b_ind() -> None:
        with torch.no_grad():
            D(x0)
            for _ in range(steps):
                D(prop(n))

    def a_mk() -> None:
        mh_mk.run(x0, steps, keep="last")

    def b_mk() -> None:
        with torch.no_grad():
            x = x0
            for _ in range(steps):
                y = rw(x)
                f(torch.cat([x, y]), torch.cat([y, x]))

    rows = []
    for kind, fa, fb in (("independent", a_ind, b_ind), ("markov", a_mk, b_mk)):
        ta, tb = _timed(fa, fb, repeats)
        ratios = [a / b for a, b in zip(ta, tb, strict=True)]
        row = {
            "kind": kind, "n_chains": n, "steps": steps,
            "imh_chain_steps_per_s": n * steps / statistics.median(ta),
            "bare_chain_steps_per_s": n * steps / statistics.median(tb),
            "imh_s_median": statistics.median(ta), "imh_s_min": min(ta), "imh_s_max": max(ta),
            "bare_s_median": statistics.median(tb), "bare_s_min": min(tb),
            "bare_s_max": max(tb),
            "overhead_ratio_median": statistics.median(ratios),
            "overhead_ratio_min": min(ratios), "overhead_ratio_max": max(ratios),
        }
        print(json.dumps(row))
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--chains", type=str, default="100,1000,10000")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    G, _ = toy_gan()
    D = MLPDiscriminator((2,), (256, 256)).eval()
    f = PairDiscriminator((2,), (256, 256)).eval()
    rw = random_walk_proposal(0.1)

    def prop(n: int) -> torch.Tensor:
        with torch.no_grad():
            return G(torch.randn(n, 2))

    results = []
    for n in [int(c) for c in args.chains.split(",")]:
        results += _bench_chains(n, args.steps, args.repeats, D, f, prop, rw)
    out = Path(__file__).parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads,
            "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (out / "imh.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    series = {}
    for kind in ("independent", "markov"):
        rows = [r for r in results if r["kind"] == kind]
        series[f"iMH {kind}"] = ([r["n_chains"] for r in rows],
                                 [r["imh_chain_steps_per_s"] for r in rows])
        series[f"bare calls {kind}"] = ([r["n_chains"] for r in rows],
                                        [r["bare_chain_steps_per_s"] for r in rows])
    plots.line_plot(series, out / "imh.png", xlabel="parallel chains",
                    ylabel="chain-steps / s", title="ImplicitMH throughput (2-D, MLP 256x256)")


if __name__ == "__main__":
    main()
