"""Save and restore the train/eval flag of every submodule (shared by BN refresh and FGE)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def kept_modes(*models: nn.Module) -> Iterator[None]:
    """Inside the block, modes may change freely; on exit every submodule's flag is restored.

    ``model.train(flag)`` alone would overwrite a flag the user set on one submodule (e.g. a
    BatchNorm kept in eval mode while the rest fine-tunes).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
        >>> _ = net[1].eval()
        >>> with kept_modes(net):
        ...     _ = net.eval()
        >>> net.training, net[1].training
        (True, False)
    """
    flags = {m: m.training for model in models for m in model.modules()}
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag
