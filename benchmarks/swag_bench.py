"""SWAG bookkeeping cost vs torch.optim.swa_utils.AveragedModel and torch-uncertainty's SWAG.

Measures, interleaved (A B C A B C ...), medians with min/max:
  * ``collect`` time, also as a fraction of one training epoch (step time x steps/epoch,
    measured in the same run) — for bdlkit.SWAG, AveragedModel.update_parameters and
    torch-uncertainty's SWAG.update_wrapper (with num_estimators=1, i.e. its update plus the
    one posterior sample it draws after every update);
  * ``sample`` time (one posterior draw loaded into a model);
  * ``predict`` time per posterior sample (BN refresh on ``--bn-batches`` batches + one pass
    over ``--n-test`` images);
  * memory held by each method's state (bytes of its tensors, counted from the objects).

torch-uncertainty is optional: its ``methods/swag.py`` and ``methods/swa.py`` use only torch,
but the package ``__init__`` imports torchvision and the Lightning CLI. If the package is on
``--tu-path`` (a site-packages directory) those two files are loaded without running the
package ``__init__`` (see docs/results/swag.md for why a full install is not possible here).

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/swag_bench.py \
        --tu-path /tmp/tu/lib/python3.11/site-packages
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, update_bn

from bdlkit.batchnorm import refresh_bn
from bdlkit.models import VGGSmall
from bdlkit.posterior.swag import SWAG
from bdlkit.weights import flatten_params

HERE = Path(__file__).resolve().parent


def load_tu_swag(site: str | None):
    """Import torch_uncertainty.methods.swag without the package __init__ (or None)."""
    if not site:
        return None
    root = Path(site) / "torch_uncertainty"
    if not (root / "methods" / "swag.py").is_file():
        return None
    for name, path in (("torch_uncertainty", root), ("torch_uncertainty.methods",
                                                     root / "methods")):
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]  # namespace-like parent: its __init__ is not executed
        sys.modules[name] = mod
    sys.path.insert(0, site)
    try:
        return importlib.import_module("torch_uncertainty.methods.swag").SWAG
    finally:
        sys.path.remove(site)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def timeit(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def run_model(label: str, widths: tuple[int, ...], args, TUSWAG) -> dict:
    torch.manual_seed(0)
    model = VGGSmall(widths=widths).to(memory_format=torch.channels_last)
    d = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    bn_data = [(torch.rand(args.batch, 1, 28, 28), y) for _ in range(args.bn_batches)]
    test = [(torch.rand(500, 1, 28, 28), torch.zeros(500, dtype=torch.long))
            for _ in range(args.n_test // 500)]

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    swag = SWAG(model, max_rank=args.rank)
    avg = AveragedModel(model)
    tu, tu_note = None, None
    if TUSWAG is not None:
        probe = TUSWAG(copy.deepcopy(model), cycle_start=0, cycle_length=1, num_estimators=1)
        try:
            probe.update_wrapper(1)
        except RuntimeError as exc:  # .view(-1, 1) on a channels-last parameter
            tu_note = f"fails on a channels_last model: {str(exc)[:80]}; timed on an NCHW copy"
        tu_model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        tu = TUSWAG(tu_model, cycle_start=0, cycle_length=1, scale=0.5, max_num_models=args.rank,
                    num_estimators=1)
    # warm-up and fill to rank K so collect runs in the steady state (ring buffer full)
    tu_epoch = [0]

    def tu_collect() -> None:
        tu_epoch[0] += 1
        tu.update_wrapper(tu_epoch[0])

    for _ in range(args.rank + 1):
        train_step()
        swag.collect(model)
        avg.update_parameters(model)
        if tu is not None:
            tu_collect()

    variants: dict[str, Callable[[], object]] = {
        "train step": train_step,
        "collect bdlkit.SWAG": lambda: swag.collect(model),
        "collect AveragedModel": lambda: avg.update_parameters(model),
        "sample bdlkit.SWAG": lambda: swag.sample(seed=0),
        "sample bdlkit.SWAG into one copy": lambda: swag.sample(seed=0, into=holder),
    }
    holder = copy.deepcopy(model)
    if tu is not None:
        variants["collect torch-uncertainty SWAG (+1 sample)"] = tu_collect
        variants["sample torch-uncertainty SWAG"] = lambda: tu.sample(0.5)

    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):  # interleaved
        for name, fn in variants.items():
            times[name].append(timeit(fn))

    # prediction per sample (fewer repeats: each is a full pass)
    n_s = args.predict_samples

    def bdlkit_predict() -> None:
        swag.predict(test, n_samples=n_s, bn_loader=bn_data, seed=0)

    def bdlkit_predict_uncertainty() -> None:  # + per-draw entropies (mutual information)
        swag.predict_uncertainty(test, n_samples=n_s, bn_loader=bn_data, seed=0)

    def averaged_predict() -> None:  # SWA path: one model, update_bn + pass (per "sample")
        for _ in range(n_s):
            update_bn(bn_data, avg.module)
            avg.module.eval()
            with torch.no_grad():
                for xb, _ in test:
                    torch.softmax(avg.module(xb), -1)

    def tu_predict() -> None:  # its API: n samples held at once, update_bn each, forward all
        tu.samples = [tu.sample(0.5) for _ in range(n_s)]
        tu.need_bn_update = True
        tu.bn_update(bn_data, device="cpu")
        tu.eval()
        with torch.no_grad():
            for xb, _ in test:
                torch.softmax(tu.eval_forward(xb), -1)
        model.train()
        tu_model.train()

    pvariants = {"predict bdlkit.SWAG": bdlkit_predict,
                 "predict_uncertainty bdlkit.SWAG": bdlkit_predict_uncertainty,
                 "predict AveragedModel (SWA)": averaged_predict}
    if tu is not None:
        pvariants["predict torch-uncertainty SWAG"] = tu_predict
    ptimes: dict[str, list[float]] = {k: [] for k in pvariants}
    for _ in range(args.predict_repeats):
        for name, fn in pvariants.items():
            ptimes[name].append(timeit(fn) / n_s)

    # a bdlkit refresh_bn vs torch update_bn sanity check (same statistics)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    refresh_bn(a, bn_data)
    update_bn(bn_data, b)
    bn_match = all(torch.allclose(p, q, atol=1e-5) for p, q in zip(a.buffers(), b.buffers(),
                                                                   strict=True)
                   if p.dtype.is_floating_point)

    step = statistics.median(times["train step"])
    epoch = step * args.steps_per_epoch
    res = {name: summary(v) for name, v in times.items()}
    res.update({name: summary(v) for name, v in ptimes.items()})
    frac = {name: statistics.median(v) / epoch for name, v in times.items()
            if name.startswith("collect")}
    memory = {
        "bdlkit.SWAG state (mean, sq_mean, K deviation rows)":
            tensor_bytes([swag._mean, swag._sq_mean, swag._dev]),
        "AveragedModel (one model copy + counter)": tensor_bytes(
            list(avg.module.parameters()) + list(avg.module.buffers())),
        "one model's parameters": tensor_bytes(model.parameters()),
    }
    if tu is not None:
        memory["torch-uncertainty SWAG stats"] = tensor_bytes(tu.swag_stats.values())
        memory[f"torch-uncertainty SWAG samples held ({n_s} models)"] = tensor_bytes(
            p for m in tu.samples for p in m.parameters())
    # check the SWA means agree (same iterates)
    mean_diff = float((swag.mean - flatten_params(avg.module)).abs().max())
    return {"label": label, "widths": widths, "num_params": d, "times_s": res,
            "collect_fraction_of_epoch": frac, "epoch_s_estimate": epoch,
            "memory_bytes": memory, "swa_mean_max_abs_diff_vs_AveragedModel": mean_diff,
            "refresh_bn_matches_update_bn": bn_match, "torch_uncertainty_note": tu_note}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5))
    axes = [axes] if len(results) == 1 else list(axes)
    for ax, r in zip(axes, results, strict=True):
        names = [n for n in r["times_s"] if n != "train step"]
        med = [r["times_s"][n]["median"] * 1e3 for n in names]
        lo = [m - r["times_s"][n]["min"] * 1e3 for m, n in zip(med, names, strict=True)]
        hi = [r["times_s"][n]["max"] * 1e3 - m for m, n in zip(med, names, strict=True)]
        ax.barh(range(len(names)), med, xerr=[lo, hi], color="tab:blue")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("ms (median, min-max); predict = per sample")
        ax.set_title(f"{r['label']} ({r['num_params']:,} params); "
                     f"train step {r['times_s']['train step']['median'] * 1e3:.0f} ms", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tu-path", default=None, help="site-packages holding torch_uncertainty")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--predict-repeats", type=int, default=3)
    p.add_argument("--predict-samples", type=int, default=3)
    p.add_argument("--rank", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--bn-batches", type=int, default=4)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--steps-per-epoch", type=int, default=469, help="60k / 128")
    p.add_argument("--out", default=str(HERE / "results" / "swag"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    TUSWAG = load_tu_swag(args.tu_path)
    results = [run_model("VGGSmall (recipe)", (16, 32, 64), args, TUSWAG),
               run_model("VGGSmall wide", (64, 128, 256), args, TUSWAG)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch": torch.__version__, "threads": args.threads, "args": vars(args),
            "torch_uncertainty": TUSWAG is not None, "results": results}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    plot(results, out.with_suffix(".png"))
    for r in results:
        print(f"== {r['label']} d={r['num_params']}  epoch~{r['epoch_s_estimate']:.1f}s")
        for k, v in r["times_s"].items():
            print(f"  {k:48s} {v['median'] * 1e3:9.2f} ms  [{v['min'] * 1e3:.2f}, "
                  f"{v['max'] * 1e3:.2f}]")
        for k, v in r["collect_fraction_of_epoch"].items():
            print(f"  {k:48s} {100 * v:.4f} % of an epoch")
        for k, v in r["memory_bytes"].items():
            print(f"  {k:48s} {v / 2**20:.2f} MiB")
        print("  SWA mean diff vs AveragedModel", r["swa_mean_max_abs_diff_vs_AveragedModel"],
              " refresh_bn == update_bn:", r["refresh_bn_matches_update_bn"])


if __name__ == "__main__":
    main()
