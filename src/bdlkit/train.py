"""Minimal training and evaluation loops with progress bars, seeding and checkpoints."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "seed_everything",
    "fit",
    "evaluate",
    "predict_proba",
    "save_checkpoint",
    "load_checkpoint",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` ask torch for deterministic kernels.

    Example:
        >>> seed_everything(0); a = torch.rand(1); seed_everything(0); bool(a == torch.rand(1))
        True
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def _show_progress(quiet: bool | None) -> bool:
    if quiet is None:
        return sys.stderr.isatty()
    return not quiet


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and "input" in batch and "target" in batch:
        return batch["input"], batch["target"]
    raise TypeError("batches must be (input, target) tuples or dicts with 'input' and 'target'")


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def fit(
    model: nn.Module,
    loader: Iterable[Any],
    epochs: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    loss_fn: LossFn = F.cross_entropy,
    callbacks: Sequence[Any] = (),
    quiet: bool | None = None,
    scheduler_step: str = "epoch",
    start_epoch: int = 0,
    checkpoint: str | Path | None = None,
) -> dict[str, list[float]]:
    """Train ``model`` for ``epochs`` epochs; returns ``{"loss": [mean loss per epoch]}``.

    ``scheduler`` steps once per epoch (``scheduler_step="epoch"``) or per batch ("batch").
    Callbacks may define ``on_batch_end(model, step, loss)`` and ``on_epoch_end(model, epoch)``.
    With ``checkpoint`` the model, optimizer and scheduler state are saved after every epoch
    and training resumes from that file if it exists.

    Example:
        >>> net = nn.Linear(2, 2); opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> data = [(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))]
        >>> len(fit(net, data, epochs=2, optimizer=opt, quiet=True)["loss"])
        2
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if scheduler_step not in ("epoch", "batch"):
        raise ValueError(f"scheduler_step must be 'epoch' or 'batch', got {scheduler_step!r}")
    if checkpoint is not None and Path(checkpoint).is_file():
        start_epoch = load_checkpoint(checkpoint, model, optimizer, scheduler)
    device = _device_of(model)
    history: dict[str, list[float]] = {"loss": []}
    step = 0
    bar = tqdm(range(start_epoch, epochs), disable=not _show_progress(quiet), desc="train",
               unit="epoch")
    for epoch in bar:
        model.train()
        total, count = 0.0, 0
        for batch in loader:
            x, y = _split_batch(batch)
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            if scheduler is not None and scheduler_step == "batch":
                scheduler.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
            step += 1
            for cb in callbacks:
                if hasattr(cb, "on_batch_end"):
                    cb.on_batch_end(model, step, float(loss.detach()))
        if scheduler is not None and scheduler_step == "epoch":
            scheduler.step()
        history["loss"].append(total / max(count, 1))
        bar.set_postfix(loss=f"{history['loss'][-1]:.4f}")
        for cb in callbacks:
            if hasattr(cb, "on_epoch_end"):
                cb.on_epoch_end(model, epoch)
        if checkpoint is not None:
            save_checkpoint(checkpoint, model, optimizer, scheduler, epoch + 1)
    return history


@torch.no_grad()
def predict_proba(model: nn.Module, loader: Iterable[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and labels over a loader, model in eval mode.

    Example:
        >>> p, y = predict_proba(nn.Linear(2, 3), [(torch.randn(4, 2), torch.zeros(4).long())])
        >>> p.shape, y.shape
        (torch.Size([4, 3]), torch.Size([4]))
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    probs, labels = [], []
    try:
        for batch in loader:
            x, y = _split_batch(batch)
            probs.append(torch.softmax(model(x.to(device)).float(), dim=-1).cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    if not probs:
        raise ValueError("loader yielded no batches")
    return torch.cat(probs), torch.cat(labels)


def evaluate(model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
    """Accuracy, mean NLL, Brier score and ECE of ``model`` on ``loader``.

    Example:
        >>> evaluate(nn.Linear(2, 3), [(torch.randn(4, 2), torch.zeros(4).long())])["accuracy"] <= 1
        True
    """
    from .metrics import classification_metrics

    probs, labels = predict_proba(model, loader)
    return classification_metrics(probs, labels)


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: Any = None,
                    scheduler: Any = None, epoch: int = 0) -> None:
    """Save model/optimizer/scheduler state and the epoch atomically (tensors only).

    Example:
        >>> save_checkpoint("/tmp/ck.pt", nn.Linear(2, 2))  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "epoch": int(epoch)}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: Any = None,
                    scheduler: Any = None, map_location: Any = "cpu") -> int:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Returns the epoch to resume from.

    Example:
        >>> load_checkpoint("/tmp/ck.pt", nn.Linear(2, 2))  # doctest: +SKIP
        0
    """
    state = torch.load(Path(path), map_location=map_location, weights_only=True)
    model.load_state_dict(state["model"])
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"])
