"""Lightning callback running Fast Geometric Ensembling in ``Trainer.fit`` (needs ``lightning``)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from bdlkit.ensemble.fge import Ensemble, _check_cycle, _check_lr, fge_lr
from bdlkit.integrations._lightning_api import Callback, LightningModule, Trainer

__all__ = ["FGECallback"]


class FGECallback(Callback):
    """Drive the FGE cyclic learning rate from epoch ``start_epoch`` on and collect snapshots.

    From the first training batch of epoch ``start_epoch`` the rate of every parameter group of
    every optimizer is set before each batch to the FGE formula (see
    :func:`bdlkit.ensemble.fge_lr`), counted in optimizer steps (``trainer.global_step``, so
    gradient accumulation is respected); this overrides any scheduler of the module. Whenever a
    cycle reaches its mid-point (rate ``lr_2``) a deep copy of the module (or of its attribute
    ``attr``) is stored in :attr:`snapshots`; :meth:`ensemble` returns them as an
    :class:`~bdlkit.ensemble.Ensemble`. Snapshots are saved in Lightning checkpoints as
    state dicts and rebuilt on resume.

    Args:
        cycle: cycle length in epochs (even int >= 2).
        lr_1: largest rate; lr_2: smallest rate.
        start_epoch: first epoch (0-based) of the FGE phase (train normally before it).
        attr: snapshot ``getattr(pl_module, attr)`` instead of the whole LightningModule.

    Example:
        >>> cb = FGECallback(cycle=2, lr_1=0.05, lr_2=1e-4, start_epoch=10, attr="net")
        >>> # lightning.Trainer(max_epochs=16, callbacks=[cb]).fit(module, data)
        >>> # probs = cb.ensemble().predict(test_loader)
        >>> len(cb.snapshots)
        0
    """

    def __init__(
        self,
        cycle: int = 4,
        lr_1: float = 0.05,
        lr_2: float = 1e-4,
        start_epoch: int = 0,
        attr: str | None = None,
    ) -> None:
        super().__init__()
        self.cycle = _check_cycle(cycle)
        self.lr_1 = _check_lr("lr_1", lr_1)
        self.lr_2 = _check_lr("lr_2", lr_2)
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch must be an int >= 0, got {start_epoch!r}")
        if attr is not None and not isinstance(attr, str):
            raise TypeError(f"attr must be a str or None, got {type(attr).__name__}")
        self.start_epoch = start_epoch
        self.attr = attr
        self.snapshots: list[nn.Module] = []
        self.start_step: int | None = None
        self._last_snapshot_step = -1
        self._pending_states: list[dict[str, torch.Tensor]] = []

    def _target(self, pl_module: LightningModule) -> nn.Module:
        if self.attr is None:
            return pl_module
        target = getattr(pl_module, self.attr, None)
        if not isinstance(target, nn.Module):
            raise ValueError(f"attr={self.attr!r} does not name an nn.Module of the module")
        return target

    @staticmethod
    def _steps_per_epoch(trainer: Trainer) -> int:
        batches = trainer.num_training_batches
        if not isinstance(batches, int) or batches < 1:
            raise ValueError("FGECallback needs a training dataloader with a finite length")
        # Lightning also steps on a last, partial accumulation window: ceil, not floor.
        return math.ceil(batches / max(1, trainer.accumulate_grad_batches))

    def _rebuild_pending(self, pl_module: LightningModule) -> None:
        if not self._pending_states:
            return
        target = self._target(pl_module)
        for state in self._pending_states:
            snap = copy.deepcopy(target)
            snap.load_state_dict(state)
            self.snapshots.append(snap.eval())
        self._pending_states = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rebuild_pending(pl_module)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch < self.start_epoch:
            return
        if self.start_step is None:
            self.start_step = trainer.global_step
        it = trainer.global_step - self.start_step
        lr = fge_lr(it, self.cycle, self.lr_1, self.lr_2, self._steps_per_epoch(trainer))
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        if self.start_step is None:
            return
        done = trainer.global_step - self.start_step
        per_cycle = self.cycle * self._steps_per_epoch(trainer)
        if done > 0 and done % per_cycle == per_cycle // 2 and done != self._last_snapshot_step:
            self._last_snapshot_step = done
            snap = copy.deepcopy(self._target(pl_module))  # the live model's modes untouched
            self.snapshots.append(snap.eval())

    def ensemble(self) -> Ensemble:
        """The snapshots collected so far as an :class:`~bdlkit.ensemble.Ensemble`."""
        if self._pending_states:
            raise ValueError("snapshots from a checkpoint are rebuilt when training starts")
        if not self.snapshots:
            raise ValueError("no FGE snapshot has been collected yet")
        return Ensemble(self.snapshots)

    def state_dict(self) -> dict[str, Any]:
        return {
            "start_step": self.start_step,
            "last_snapshot_step": self._last_snapshot_step,
            "snapshots": [
                {k: v.detach().cpu().clone() for k, v in s.state_dict().items()}
                for s in self.snapshots
            ] + list(self._pending_states),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start_step = state_dict["start_step"]
        self._last_snapshot_step = state_dict["last_snapshot_step"]
        self.snapshots = []
        self._pending_states = list(state_dict["snapshots"])
