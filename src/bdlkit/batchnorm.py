"""Recompute BatchNorm running statistics of a model on data (SWAG, FGE and curves need it)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bdlkit._checks import check_positive_int
from bdlkit._modes import kept_modes

__all__ = ["refresh_bn", "has_batchnorm", "default_call"]


def _tracked_bns(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics (the ones a refresh recomputes)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None]


def has_batchnorm(model: nn.Module) -> bool:
    """True if ``model`` has a BatchNorm layer that keeps running statistics.

    Layers built with ``track_running_stats=False`` always normalise with the statistics of
    the current batch, so there is nothing to refresh and they do not count.

    Example:
        >>> has_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
        True
        >>> has_batchnorm(nn.BatchNorm1d(2, track_running_stats=False))
        False
    """
    return bool(_tracked_bns(model))


def _first_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def default_call(model: nn.Module, batch: Any) -> Any:
    """Feed a batch to ``model``: a tensor, the first item of a tuple/list, or ``batch['input']``.

    Example:
        >>> default_call(nn.Identity(), (torch.ones(1), torch.zeros(1)))
        tensor([1.])
    """
    device = _first_device(model)
    if isinstance(batch, torch.Tensor):
        return model(batch.to(device))
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return model(batch[0].to(device))
    if isinstance(batch, dict):
        for key in ("input", "inputs", "x", "image", "images"):
            if key in batch:
                return model(batch[key].to(device))
    raise TypeError(
        "refresh_bn cannot find the input in a batch of type "
        f"{type(batch).__name__}; pass call_fn=lambda model, batch: model(...)"
    )


@torch.no_grad()
def refresh_bn(
    model: nn.Module,
    loader: Iterable[Any],
    num_batches: int | None = None,
    call_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> nn.Module:
    """Reset and recompute BatchNorm running statistics as a cumulative (equal-weight) average.

    Works for tensor, tuple and dict batches (``call_fn(model, batch)`` for anything else),
    over all batches or the first ``num_batches`` (no further batch is drawn from ``loader``).
    Under an initialised ``torch.distributed`` process group the statistics are averaged over
    ranks, weighted by each rank's batch count, which equals one process refreshing on all
    ranks' batches; a rank without batches contributes nothing. Every module's training flag
    and every layer's momentum are restored afterwards, and if the refresh fails (no batch,
    a batch ``call_fn`` cannot feed) the old statistics are put back. Layers with
    ``track_running_stats=False`` have no statistics and are left alone; models without
    tracked BatchNorm are returned as is.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> _ = refresh_bn(net, [torch.randn(8, 3) for _ in range(4)])
        >>> int(net[1].num_batches_tracked)
        4
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if num_batches is not None:
        check_positive_int("num_batches", num_batches)
    call = call_fn or default_call
    bns = _tracked_bns(model)
    if not bns:
        return model
    with kept_modes(model):
        _refresh(model, bns, loader, num_batches, call)
    return model


def _refresh(model: nn.Module, bns: list[nn.modules.batchnorm._BatchNorm], loader: Iterable[Any],
             num_batches: int | None, call: Callable[[nn.Module, Any], Any]) -> None:
    """The body of :func:`refresh_bn`; on any failure the old statistics are put back."""
    saved_momentum = {bn: bn.momentum for bn in bns}
    saved_stats = {bn: (bn.running_mean.clone(), bn.running_var.clone(),
                        bn.num_batches_tracked.clone()) for bn in bns}
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # None = cumulative moving average over the batches seen
        model.train()
        seen = 0
        for batch in itertools.islice(loader, num_batches):
            call(model, batch)
            seen += 1
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:  # every rank takes part, so none is left waiting in a collective
            seen_all = torch.tensor(float(seen), device=bns[0].running_mean.device)
            dist.all_reduce(seen_all)
            seen = int(seen_all.item())
        if seen == 0:
            raise ValueError("loader yielded no batches; BatchNorm statistics cannot be refreshed")
        if distributed:
            _all_reduce_stats(bns)
    except BaseException:
        for bn, (mean, var, count) in saved_stats.items():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(count)
        raise
    finally:
        for bn in bns:
            bn.momentum = saved_momentum[bn]


def _all_reduce_stats(bns: list[nn.modules.batchnorm._BatchNorm]) -> None:
    """Pool running mean/var over ranks, weighted by the batches each rank saw.

    Each rank holds the equal-weight average of its per-batch means and variances, so the
    batch-weighted average of both is exactly what one process would compute over all ranks'
    batches (the same cumulative average; no between-rank spread is added).
    """
    for bn in bns:
        w = bn.num_batches_tracked.to(bn.running_mean.dtype).clone()
        total = w.clone()
        dist.all_reduce(total)
        mean = bn.running_mean * w
        var = bn.running_var * w
        dist.all_reduce(mean)
        dist.all_reduce(var)
        # A layer no rank's forward pass reached keeps its reset values (no 0 / 0).
        used = total > 0
        bn.running_mean.copy_(torch.where(used, mean / total.clamp(min=1), bn.running_mean))
        bn.running_var.copy_(torch.where(used, var / total.clamp(min=1), bn.running_var))
        bn.num_batches_tracked.copy_(total.to(bn.num_batches_tracked.dtype))
