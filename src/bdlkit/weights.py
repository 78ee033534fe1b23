"""Flatten a module's parameters into one vector and write a vector back.

Uses ``reshape``/``copy_`` instead of :func:`torch.nn.utils.parameters_to_vector`, which
raises on channels-last parameters (see PERF.md).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["flatten_params", "assign_params", "param_spec", "num_params"]


def _params(module_or_params: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(module_or_params, nn.Module):
        return list(module_or_params.parameters())
    params = list(module_or_params)
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params must hold tensors, got {type(p).__name__}")
    return params


def param_spec(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Return ``[(name, shape), ...]`` of a module's parameters in ``parameters()`` order.

    Example:
        >>> param_spec(nn.Linear(2, 3))
        [('weight', (3, 2)), ('bias', (3,))]
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    return [(n, tuple(p.shape)) for n, p in module.named_parameters()]


def num_params(module: nn.Module) -> int:
    """Number of scalar parameters of ``module``.

    Example:
        >>> num_params(nn.Linear(2, 3))
        9
    """
    return sum(p.numel() for p in _params(module))


def flatten_params(
    module_or_params: nn.Module | Iterable[torch.Tensor], *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Concatenate parameters into one detached 1-D tensor (any memory format).

    Example:
        >>> flatten_params(nn.Linear(2, 3)).shape
        torch.Size([9])
    """
    params = _params(module_or_params)
    if not params:
        raise ValueError("module_or_params has no parameters to flatten")
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return flat if dtype is None else flat.to(dtype)


def assign_params(
    module_or_params: nn.Module | Iterable[torch.Tensor], vector: torch.Tensor
) -> None:
    """Copy ``vector`` into the parameters in place (inverse of :func:`flatten_params`).

    The length is checked before anything is written, so a bad vector leaves the module intact.

    Example:
        >>> m = nn.Linear(2, 3); assign_params(m, torch.zeros(9)); m.weight.abs().sum().item()
        0.0
    """
    params = _params(module_or_params)
    if not isinstance(vector, torch.Tensor) or vector.dim() != 1:
        raise TypeError("vector must be a 1-D tensor")
    total = sum(p.numel() for p in params)
    if vector.numel() != total:
        raise ValueError(f"vector has {vector.numel()} elements, the parameters need {total}")
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(vector[offset : offset + n].view_as(p.reshape(p.shape)).to(p.dtype))
            offset += n
