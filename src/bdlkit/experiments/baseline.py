"""Baseline recipe: LeNet5 on MNIST and the BN VGG-style net on Fashion-MNIST."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .. import data, plots
from ..metrics import classification_metrics
from ..models import LeNet5, VGGSmall
from ..train import fit, predict_proba, seed_everything


def _train_and_score(model: torch.nn.Module, train, test, epochs: int, lr: float, seed: int,
                     ) -> tuple[dict[str, float], tuple[torch.Tensor, torch.Tensor], float]:
    seed_everything(seed)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * len(data.loader(train, 128))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.15)
    start = time.perf_counter()
    fit(model, data.loader(train, 128, shuffle=True, seed=seed), epochs, opt, sched,
        scheduler_step="batch")
    seconds = time.perf_counter() - start
    probs, labels = predict_proba(model, data.loader(test, 1000))
    return classification_metrics(probs, labels), (probs, labels), seconds


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Train both baselines and write a reliability diagram; returns the report dict.

    What ``bdlkit run baseline [--quick]`` calls; the CLI writes the report.

    Example:
        >>> report = run(Path("runs/baseline"), quick=True)  # doctest: +SKIP
        >>> report["headline"]  # doctest: +SKIP
    """
    epochs_lenet, epochs_vgg = (1, 1) if quick else (10, 15)
    mnist_train, mnist_test = data.mnist()
    fmnist_train, fmnist_test = data.fashion_mnist()
    lenet, lenet_preds, lenet_s = _train_and_score(LeNet5(), mnist_train, mnist_test,
                                                   epochs_lenet, 3e-3, seed)
    vgg, vgg_preds, vgg_s = _train_and_score(VGGSmall(), fmnist_train, fmnist_test,
                                             epochs_vgg, 1e-2, seed)
    plots.reliability_diagram(
        {"LeNet5 / MNIST": lenet_preds, "VGGSmall / Fashion-MNIST": vgg_preds},
        out_dir / "reliability.png", title="Baselines: reliability (accuracy - confidence)",
    )
    columns = ["model", "data", "epochs", "test acc", "NLL", "ECE", "Brier", "train s"]

    def row(name: str, ds: str, epochs: int, m: dict[str, float], s: float) -> list[Any]:
        return [name, ds, epochs, round(m["accuracy"], 4), round(m["nll"], 4),
                round(m["ece"], 4), round(m["brier"], 4), round(s, 1)]

    return {
        "title": "Baselines (plain training)",
        "tables": [{
            "title": "Test metrics",
            "columns": columns,
            "rows": [row("LeNet5 (Caffe)", "MNIST", epochs_lenet, lenet, lenet_s),
                     row("VGGSmall (BN)", "Fashion-MNIST", epochs_vgg, vgg, vgg_s)],
        }],
        "figures": [{"path": "reliability.png",
                     "caption": "Reliability diagram of both baselines on their test sets"}],
        "headline": {"lenet5_mnist_test_acc": lenet["accuracy"],
                     "vgg_fashion_test_acc": vgg["accuracy"]},
        "config": {"quick": quick, "seed": seed, "optimizer": "Adam + one-cycle",
                   "batch_size": 128, "epochs": [epochs_lenet, epochs_vgg]},
    }
