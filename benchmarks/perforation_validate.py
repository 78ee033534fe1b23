"""Validation runs that chose the fine-tuning of the ``perforation`` recipe (no test data).

Fashion-MNIST training images only: a 20k subset split 15k (train) / 5k (validation). The dense
VGGSmall is trained exactly as in the recipe (Adam one-cycle, max lr 1e-2, 4 epochs); each row
then perforates it (grid masks), fine-tunes on the 15k images and reports validation accuracy.
The last row fine-tunes the dense net itself: how much of the recovery is just more training.

Run: ``python benchmarks/perforation_validate.py [--out FILE]`` (about 10 min at 2 threads).

``--search-target T`` instead runs the recipe's greedy rate search (``SEARCH_LEVELS``, grid
masks, measured times: run it on a quiet machine) on the dense net and fine-tunes the searched
net, and the dense net as a control, for each of ``--ft-epochs`` (Adam one-cycle 3e-3).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bdlkit import data
from bdlkit.compress.perforation import fine_tune, fuse_for_inference, perforate, search_rates
from bdlkit.experiments.perforation import SEARCH_LEVELS, SPEED_BATCH, _adam_one_cycle
from bdlkit.models import VGGSmall
from bdlkit.train import evaluate, seed_everything


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "perforation_validate.json")
    ap.add_argument("--search-target", type=float, default=None)
    ap.add_argument("--ft-epochs", type=int, nargs="+", default=[6])
    args = ap.parse_args()
    seed_everything(0)
    train, _ = data.fashion_mnist()
    train = data.subset(train, 20000, seed=0)
    tr = torch.utils.data.Subset(train, range(15000))
    va = torch.utils.data.Subset(train, range(15000, 20000))
    tdl, vdl = data.loader(tr, 128, shuffle=True, seed=0), data.loader(va, 1000)
    dense = VGGSmall().to(memory_format=torch.channels_last)
    _adam_one_cycle(dense, tdl, 4, 1e-2)
    dense.eval()
    dense_acc = evaluate(dense, vdl)["accuracy"]
    print(f"dense validation accuracy {dense_acc:.4f}", flush=True)
    convs = [n for n, m in dense.named_modules() if isinstance(m, nn.Conv2d)]
    if args.search_target is not None:
        search_and_tune(dense, dense_acc, train, tdl, vdl, args)
        return
    every, no_first = dict.fromkeys(convs, 0.75), dict.fromkeys(convs[1:], 0.75)
    rows: list[tuple[str, dict[str, float], str, Callable[[nn.Module], object]]] = [
        ("all convs", every, "SGD lr 0.01, 2 epochs", lambda m: fine_tune(m, tdl, 2, lr=0.01)),
        ("all convs", every, "Adam 3e-3, 4 epochs", lambda m: _adam_one_cycle(m, tdl, 4, 3e-3)),
        ("all convs", every, "Adam 6e-3, 4 epochs", lambda m: _adam_one_cycle(m, tdl, 4, 6e-3)),
        ("all convs", every, "Adam 3e-3, 6 epochs", lambda m: _adam_one_cycle(m, tdl, 6, 3e-3)),
        ("convs 2-6", no_first, "SGD lr 0.05, 4 epochs", lambda m: fine_tune(m, tdl, 4, lr=0.05)),
        ("convs 2-6", no_first, "Adam 3e-3, 4 epochs",
         lambda m: _adam_one_cycle(m, tdl, 4, 3e-3)),
        ("none (dense)", {}, "SGD lr 0.05, 4 epochs", lambda m: fine_tune(m, tdl, 4, lr=0.05)),
    ]
    results = []
    for where, rates, how, tune in rows:
        seed_everything(0)
        net = perforate(dense, rates, (28, 28), mask="grid", seed=0) if rates \
            else copy.deepcopy(dense)
        t0 = time.perf_counter()
        tune(net)
        net.eval()
        acc = evaluate(net, vdl)["accuracy"]
        results.append({"perforated": where, "rate": 0.75 if rates else 0.0, "fine_tuning": how,
                        "val_acc": acc, "loss_pp": 100 * (dense_acc - acc),
                        "seconds": time.perf_counter() - t0})
        print(f"grid r=0.75 on {where:12s} {how:22s} val acc {acc:.4f} "
              f"(loss {100 * (dense_acc - acc):+.2f} pp)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                    "dense_val_acc": dense_acc, "rows": results}, indent=1))


def search_and_tune(dense: nn.Module, dense_acc: float, train: torch.utils.data.Dataset,
                    tdl: torch.utils.data.DataLoader, vdl: torch.utils.data.DataLoader,
                    args: argparse.Namespace) -> None:
    """The recipe's search (on training images) then fine-tuning for each ``args.ft_epochs``."""
    search_dl = data.loader(torch.utils.data.Subset(train, range(2048)), 256)
    res = search_rates(fuse_for_inference(dense), search_dl, (28, 28), args.search_target,
                       mask="grid", levels=SEARCH_LEVELS, batch_size=SPEED_BATCH, num_batches=4,
                       repeats=7, seed=0)
    print(f"search: {res['rates']} measured {res['measured_speedup']:.2f}x", flush=True)
    results = []
    for epochs in args.ft_epochs:
        for label, rates in (("searched", res["rates"]), ("dense control", {})):
            seed_everything(0)
            net = perforate(dense, rates, (28, 28), mask="grid", seed=0) if rates \
                else copy.deepcopy(dense)
            _adam_one_cycle(net, tdl, epochs, 3e-3)
            net.eval()
            acc = evaluate(net, vdl)["accuracy"]
            results.append({"net": label, "ft_epochs": epochs, "val_acc": acc,
                            "loss_pp": 100 * (dense_acc - acc)})
            print(f"{label:14s} Adam 3e-3 x {epochs:2d} epochs: val acc {acc:.4f} "
                  f"(loss {100 * (dense_acc - acc):+.2f} pp)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dense_val_acc": dense_acc,
         "target": args.search_target, "rates": res["rates"],
         "measured_speedup": res["measured_speedup"], "rows": results}, indent=1))


if __name__ == "__main__":
    main()
