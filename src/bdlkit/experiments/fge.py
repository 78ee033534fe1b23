"""FGE recipe: Fast Geometric Ensembling vs one model vs two independent models (Fashion-MNIST).

One VGGSmall (BN) is trained with SGD for ``E`` epochs (cost 1x). As in Garipov et al. (2018),
FGE branches off that same run at 80 % of its schedule (the saved weights after ``0.8 E``
epochs) and runs the cyclic learning rate from there, ensembling the mid-cycle snapshots; the
number of snapshots is the largest that keeps branch + FGE passes <= ``1.3 E`` (total cost
<= 1.3x). A second, independently seeded model gives the 2-model ensemble (cost 2x). All are
scored on the test set (accuracy, NLL, ECE, Brier). The FGE settings (branch point, cycle
length, lr_1, lr_2, start model in or out) were chosen on a 5k validation split carved from the
training set (docs/results.md), never on the test set.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import torch

from .. import data, plots
from ..ensemble import Ensemble, collect_fge, fge_lr
from ..metrics import classification_metrics
from ..models import VGGSmall
from ..train import fit, predict_proba, seed_everything
from ._common import garipov_schedule


def fge_plan(epochs: int, branch: int, cycle_passes: float, budget: float = 1.3,
             ) -> tuple[int, float]:
    """Snapshots that fit the budget, and the passes they cost (branch + FGE phase).

    Snapshot ``k`` is taken ``(k - 1/2) * cycle_passes`` passes after the branch point, so
    the largest ``k`` with ``branch + (k - 1/2) cycle_passes <= budget * epochs`` is used.

    Example:
        >>> fge_plan(10, 8, 2.0)
        (3, 13.0)
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch <= epochs:
        raise ValueError(f"branch must be an int in [0, epochs], got {branch!r}")
    if not cycle_passes > 0 or not budget > 0:
        raise ValueError("cycle_passes and budget must be positive")
    spare = budget * epochs - branch
    k = math.floor(spare / cycle_passes + 0.5 + 1e-9)
    if k < 1:
        raise ValueError(f"no snapshot fits: {spare:g} spare passes, cycle {cycle_passes:g}")
    return k, branch + (k - 0.5) * cycle_passes


def _train(train_ds, epochs: int, lr: float, wd: float, seed: int, batch_size: int,
           branch: int | None = None) -> tuple[torch.nn.Module, float, dict[str, Any]]:
    """Train one VGGSmall; with ``branch`` also keep its weights and time after that epoch."""
    seed_everything(seed)
    model = VGGSmall().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    dl = data.loader(train_ds, batch_size, shuffle=True, seed=seed)
    total = epochs * len(dl)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, garipov_schedule(total))
    start = time.perf_counter()
    kept: dict[str, Any] = {}

    class _Keep:
        def on_epoch_end(self, net: torch.nn.Module, epoch: int) -> None:
            if branch is not None and epoch + 1 == branch:
                kept["state"] = copy.deepcopy(net.state_dict())
                kept["seconds"] = time.perf_counter() - start

    fit(model, dl, epochs, opt, sched, scheduler_step="batch", quiet=True, callbacks=[_Keep()])
    return model, time.perf_counter() - start, kept


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the FGE comparison; writes ``reliability.png`` and ``fge_lr.png``.

    What ``bdlkit run fge [--quick]`` calls; the CLI writes the report.

    Example:
        >>> report = run(Path("runs/fge"), quick=True)  # doctest: +SKIP
        >>> report["headline"]  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    train_ds, test_ds = data.fashion_mnist()
    if quick:
        train_ds, test_ds = data.subset(train_ds, 6000, seed), data.subset(test_ds, 2000, seed)
    epochs = 5 if quick else 10
    batch_size, lr, wd = 128, 0.05, 5e-4
    # FGE settings chosen on a 5k validation split of the training set (docs/results.md).
    # A cycle is 2 FGE "epochs" of cycle_passes / 2 passes over the data each.
    branch = round(0.8 * epochs)
    # (quick: one-pass cycles so that the short run still gets an ensemble of snapshots).
    cycle_passes = 1.0 if quick else 2.0
    lr_1, lr_2, include_start = 0.05, 5e-4, False
    num_snapshots, _ = fge_plan(epochs, branch, cycle_passes)
    test_dl = data.loader(test_ds, 1000)

    model_a, t_a, kept = _train(train_ds, epochs, lr, wd, seed, batch_size, branch=branch)
    model_b, t_b, _ = _train(train_ds, epochs, lr, wd, seed + 1000, batch_size)

    start_model = VGGSmall().to(memory_format=torch.channels_last)
    start_model.load_state_dict(kept["state"])
    seed_everything(seed + 1)
    fge_dl = data.loader(train_ds, batch_size, shuffle=True, seed=seed + 1)
    # Rounded down so that the FGE phase never exceeds the pass budget of fge_plan.
    fge_epoch = max(1, math.floor(len(fge_dl) * cycle_passes / 2))
    start = time.perf_counter()
    fge = collect_fge(start_model, fge_dl, num_snapshots=num_snapshots, cycle=2, lr_1=lr_1,
                      lr_2=lr_2, weight_decay=wd, steps_per_epoch=fge_epoch,
                      include_start=include_start, inplace=True)
    t_fge = kept["seconds"] + time.perf_counter() - start
    fge_passes = branch + (2 * num_snapshots - 1) * fge_epoch / len(fge_dl)

    preds = {
        "single model": predict_proba(model_a, test_dl),
        "FGE": fge.predict(test_dl, return_labels=True),
        "2 independent models": Ensemble([model_a, model_b]).predict(test_dl,
                                                                     return_labels=True),
    }
    costs = {"single model": (t_a, 1.0), "FGE": (t_fge, fge_passes / epochs),
             "2 independent models": (t_a + t_b, 2.0)}
    members = {"single model": 1, "FGE": len(fge), "2 independent models": 2}
    metrics = {k: classification_metrics(*v) for k, v in preds.items()}
    rows = []
    for name, m in metrics.items():
        secs, epochs_ratio = costs[name]
        rows.append([name, members[name], round(m["accuracy"], 4), round(m["nll"], 4),
                     round(m["ece"], 4), round(m["brier"], 4), round(secs, 1),
                     round(secs / t_a, 3), round(epochs_ratio, 3)])
    # Individual FGE members, to show that the ensemble gain is not a better single member.
    snap_rows = []
    for i, member in enumerate(fge.members):
        m = classification_metrics(*predict_proba(member, test_dl))
        first = 0 if include_start else 1
        snap_rows.append([f"start (epoch {branch})" if i + first == 0 else f"snapshot {i + first}",
                          round(m["accuracy"], 4), round(m["nll"], 4)])

    plots.reliability_diagram(preds, out_dir / "reliability.png",
                              title="FGE vs single vs 2-ensemble (Fashion-MNIST, VGGSmall)")
    its = list(range(4 * fge_epoch + 1))
    plots.line_plot({"FGE lr": (its, [fge_lr(i, 2, lr_1, lr_2, fge_epoch) for i in its])},
                    out_dir / "fge_lr.png", xlabel="FGE iteration", ylabel="learning rate",
                    title=f"FGE cyclic learning rate (cycle = 2 x {fge_epoch} steps)")
    fge_m, one, two = metrics["FGE"], metrics["single model"], metrics["2 independent models"]
    return {
        "title": "Fast Geometric Ensembling on Fashion-MNIST (VGGSmall)",
        "tables": [
            {"title": "Test metrics at matched budget (cost = wall time / one run; epochs ratio "
                      "= passes over the data / one run)",
             "columns": ["method", "members", "acc", "NLL", "ECE", "Brier", "train s",
                         "cost (time)", "cost (epochs)"],
             "rows": rows},
            {"title": "FGE members on their own", "columns": ["member", "acc", "NLL"],
             "rows": snap_rows},
        ],
        "figures": [
            {"path": "reliability.png", "caption": "Reliability (accuracy - confidence)"},
            {"path": "fge_lr.png", "caption": "FGE learning rate over two cycles"},
        ],
        "notes": [
            f"FGE - single: acc {100 * (fge_m['accuracy'] - one['accuracy']):+.2f} pp, "
            f"NLL {fge_m['nll'] - one['nll']:+.4f}",
            f"FGE - 2 independent: acc {100 * (fge_m['accuracy'] - two['accuracy']):+.2f} pp, "
            f"NLL {fge_m['nll'] - two['nll']:+.4f}",
            f"FGE branches off the single model's run after epoch {branch} of {epochs}; "
            f"ensemble = {num_snapshots} mid-cycle snapshots"
            f"{' + the branch-point model' if include_start else ''}; no BN refresh "
            "(as in the reference implementation).",
        ],
        "headline": {"fge_acc": fge_m["accuracy"], "single_acc": one["accuracy"],
                     "ensemble2_acc": two["accuracy"], "fge_nll": fge_m["nll"],
                     "single_nll": one["nll"], "ensemble2_nll": two["nll"],
                     "fge_cost_time": t_fge / t_a, "fge_cost_passes": fge_passes / epochs},
        "config": {"quick": quick, "seed": seed, "epochs": epochs, "batch_size": batch_size,
                   "lr": lr, "weight_decay": wd, "fge_branch_epoch": branch,
                   "fge_cycle_passes": cycle_passes, "lr_1": lr_1, "lr_2": lr_2,
                   "num_snapshots": num_snapshots, "fge_include_start": include_start,
                   "train_size": len(train_ds), "test_size": len(test_ds)},
    }
