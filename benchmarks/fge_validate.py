"""FGE hyper-parameter selection on a validation split of the Fashion-MNIST training set.

The 60k training images are split (fixed permutation, seed 12345) into 55k for training and
5k for validation; the test set is never touched. ``base`` trains one VGGSmall exactly as the
``fge`` recipe does (seed 0, ``--epochs`` epochs, default 10, SGD lr 0.05 with Garipov's
schedule) and saves its weights after the last 40 % of the epochs (6-10 of 10). ``fge`` runs FGE
from one of those checkpoints and prints the validation accuracy / NLL / ECE of the single model
(last epoch), the branch-point model, every snapshot and the ensembles of the first k snapshots
(with and without the branch model), with the cost in passes relative to one full run. ``pair``
scores the 2-model ensemble of two base runs (the recipe's "2 independent models"). Pass the
same ``--epochs`` to every step of one study.

Usage (one heavy process at a time on the shared machine)::

    chrt --idle 0 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fge_validate.py base
    chrt --idle 0 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fge_validate.py \\
        fge --branch 8 --cycle-passes 2 --lr-1 0.05 --lr-2 5e-4 --snapshots 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from bdlkit import data
from bdlkit.ensemble import collect_fge
from bdlkit.experiments._common import garipov_schedule
from bdlkit.metrics import classification_metrics
from bdlkit.models import VGGSmall
from bdlkit.train import fit, predict_proba, seed_everything


def _split(work: Path) -> tuple[TensorDataset, TensorDataset]:
    train_full, _ = data.fashion_mnist()
    x, y = train_full.tensors
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(12345))
    tr, va = perm[5000:], perm[:5000]
    torch.save({"train_idx": tr, "val_idx": va}, work / "split.pt")
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va])


def base(work: Path, seed: int = 0, epochs: int = 10) -> None:
    """Train the validation base run and save checkpoints after the last 40 % of its epochs."""
    train_ds, _ = _split(work)
    seed_everything(seed)
    model = VGGSmall().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    dl = data.loader(train_ds, 128, shuffle=True, seed=seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, garipov_schedule(epochs * len(dl)))
    first_kept = epochs - (4 * epochs) // 10
    t0 = time.perf_counter()

    class _Save:
        def on_epoch_end(self, net: torch.nn.Module, epoch: int) -> None:
            print(f"epoch {epoch + 1} done at {time.perf_counter() - t0:.0f}s", flush=True)
            if epoch + 1 >= first_kept:
                torch.save(net.state_dict(), work / f"ckpt_{epoch + 1}.pt")

    fit(model, dl, epochs, opt, sched, scheduler_step="batch", quiet=True, callbacks=[_Save()])
    print("done", time.perf_counter() - t0, flush=True)


def _load(work: Path, epoch: int) -> torch.nn.Module:
    m = VGGSmall().to(memory_format=torch.channels_last)
    m.load_state_dict(torch.load(work / f"ckpt_{epoch}.pt", weights_only=True))
    return m.eval()


def _score(p: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float, float]:
    m = classification_metrics(*p)
    return round(m["accuracy"], 4), round(m["nll"], 4), round(m["ece"], 4)


def fge(work: Path, branch: int, cycle_passes: float, lr_1: float, lr_2: float, n: int,
        epochs: int = 10) -> None:
    """FGE from the epoch-``branch`` checkpoint of an ``epochs``-epoch base run, on validation."""
    train_ds, val_ds = _split(work)
    val_dl = data.loader(val_ds, 1000)
    print(f"single({epochs}ep)", _score(predict_proba(_load(work, epochs), val_dl)), flush=True)
    start = _load(work, branch)
    print(f"start(ckpt {branch})", _score(predict_proba(start, val_dl)), flush=True)
    seed_everything(1)
    dl = data.loader(train_ds, 128, shuffle=True, seed=1)
    units = round(2 / cycle_passes)  # FGE epochs per pass (a cycle is 2 FGE epochs)
    spe = len(dl) // units
    t0 = time.perf_counter()
    ens = collect_fge(start, dl, num_snapshots=n, cycle=2, lr_1=lr_1, lr_2=lr_2,
                      weight_decay=5e-4, steps_per_epoch=spe)
    print("fge time", round(time.perf_counter() - t0), flush=True)
    probs = []
    for i, m in enumerate(ens.members):
        probs.append(predict_proba(m, val_dl))
        print(f"snapshot {i + 1}", _score(probs[-1]), flush=True)
    ps = predict_proba(start, val_dl)
    labels = probs[0][1]
    for k in range(1, n + 1):
        passes = branch + (cycle_passes / 2 + (k - 1) * cycle_passes) * spe * units / len(dl)
        mean = torch.stack([q[0] for q in probs[:k]]).mean(0)
        mean_s = torch.stack([ps[0]] + [q[0] for q in probs[:k]]).mean(0)
        print(f"k={k} cost={passes / epochs:.3f}x ens", _score((mean, labels)),
              "ens+start", _score((mean_s, labels)), flush=True)


def pair(work: Path, other: Path, epochs: int = 10) -> None:
    """Validation scores of the two ``epochs``-epoch base runs in ``work`` and ``other`` and of
    their 2-model ensemble (the recipe's "2 independent models" reference)."""
    _, val_ds = _split(work)
    val_dl = data.loader(val_ds, 1000)
    a, b = (predict_proba(_load(w, epochs), val_dl) for w in (work, other))
    print("model A", _score(a), "model B", _score(b), flush=True)
    print("2 models", _score(((a[0] + b[0]) / 2, a[1])), flush=True)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["base", "fge", "pair"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fge_validate"))
    parser.add_argument("--branch", type=int, default=8)
    parser.add_argument("--cycle-passes", type=float, default=2.0)
    parser.add_argument("--lr-1", type=float, default=0.05)
    parser.add_argument("--lr-2", type=float, default=5e-4)
    parser.add_argument("--snapshots", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="base: training seed")
    parser.add_argument("--epochs", type=int, default=10, help="length of the base run")
    parser.add_argument("--other", type=Path, help="pair: work dir of the second base run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step == "base":
        base(args.work, args.seed, args.epochs)
    elif args.step == "pair":
        if args.other is None:
            parser.error("pair needs --other")
        pair(args.work, args.other, args.epochs)
    else:
        fge(args.work, args.branch, args.cycle_passes, args.lr_1, args.lr_2, args.snapshots,
            args.epochs)


if __name__ == "__main__":
    main()
