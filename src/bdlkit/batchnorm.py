"""Recompute BatchNorm running statistics of a model on data (SWAG, FGE and curves need it)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["refresh_bn", "has_batchnorm", "default_call"]


def has_batchnorm(model: nn.Module) -> bool:
    """True if ``model`` contains any ``_BatchNorm`` layer.

    Example:
        >>> has_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
        True
    """
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


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
    over all batches or the first ``num_batches``. Under an initialised ``torch.distributed``
    process group the statistics are averaged over ranks, weighted by each rank's batch count,
    which equals one process refreshing on all ranks' batches.
    The model's training flag is restored afterwards. Models without BatchNorm are returned as is.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> _ = refresh_bn(net, [torch.randn(8, 3) for _ in range(4)])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    call = call_fn or default_call
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    saved_momentum = {bn: bn.momentum for bn in bns}
    was_training = model.training
    for bn in bns:
        if bn.running_mean is None:
            raise ValueError("refresh_bn needs BatchNorm layers with track_running_stats=True")
        bn.reset_running_stats()
        bn.momentum = None  # None = cumulative moving average over the batches seen
    model.train()
    seen = 0
    try:
        for i, batch in enumerate(loader):
            if num_batches is not None and i >= num_batches:
                break
            call(model, batch)
            seen += 1
    finally:
        for bn in bns:
            bn.momentum = saved_momentum[bn]
        model.train(was_training)
    if seen == 0:
        raise ValueError("loader yielded no batches; BatchNorm statistics cannot be refreshed")
    if dist.is_available() and dist.is_initialized():
        _all_reduce_stats(bns)
    return model


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
        bn.running_mean.copy_(mean / total)
        bn.running_var.copy_(var / total)
        bn.num_batches_tracked.copy_(total.to(bn.num_batches_tracked.dtype))
