"""Lightning callback that collects SWAG statistics during ``Trainer.fit`` (needs ``lightning``)."""

from __future__ import annotations

from typing import Any

import torch

from bdlkit.integrations._lightning_api import Callback, LightningModule, Trainer
from bdlkit.posterior.swag import SWAG

__all__ = ["SWAGCallback"]


class SWAGCallback(Callback):
    """Collect SWAG moments at the end of every training epoch with index >= ``swa_start``.

    The :class:`~bdlkit.posterior.swag.SWAG` object is built in ``on_fit_start`` from the
    LightningModule (after ``configure_model``, so layers created there are included) and
    exposed as :attr:`swag`. Its state is stored in Lightning checkpoints
    (``state_dict``/``load_state_dict``), so ``trainer.fit(..., ckpt_path=...)`` resumes the
    collection where it stopped. Under ``strategy="ddp"`` every rank holds identical weights
    and therefore collects identical statistics; no communication is needed. The learning
    rate schedule is left to the LightningModule (see :func:`bdlkit.posterior.swa_scheduler`).

    Args:
        swa_start: first epoch (0-based) whose final weights are collected.
        max_rank: K, deviation columns kept.
        device: where the statistics live.
        dtype: statistics dtype (float32 or float64).

    Example:
        >>> cb = SWAGCallback(swa_start=5, max_rank=20)
        >>> # trainer = lightning.Trainer(max_epochs=10, callbacks=[cb]); trainer.fit(module, data)
        >>> # probs = cb.swag.predict(test_loader, bn_loader=train_loader)
        >>> cb.swag is None
        True
    """

    def __init__(
        self,
        swa_start: int,
        max_rank: int = 20,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if isinstance(swa_start, bool) or not isinstance(swa_start, int) or swa_start < 0:
            raise ValueError(f"swa_start must be an int >= 0, got {swa_start!r}")
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
            raise ValueError(f"max_rank must be an int >= 1, got {max_rank!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
        self.swa_start = swa_start
        self.max_rank = max_rank
        self.device = torch.device(device)
        self.dtype = dtype
        self.swag: SWAG | None = None
        self._pending: dict[str, Any] | None = None
        self._last_collected_epoch = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(swa_start=self.swa_start, max_rank=self.max_rank)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.swag is None:
            self.swag = SWAG(pl_module, max_rank=self.max_rank, device=self.device,
                             dtype=self.dtype)
        if self._pending is not None:
            self._apply(self._pending)
            self._pending = None

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch < self.swa_start or epoch == self._last_collected_epoch:
            return
        assert self.swag is not None, "on_fit_start() was not called"
        self.swag.collect(pl_module)
        self._last_collected_epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        return {
            "swa_start": self.swa_start,
            "last_collected_epoch": self._last_collected_epoch,
            "swag": None if self.swag is None else self.swag.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.swag is None:
            self._pending = dict(state_dict)
        else:
            self._apply(state_dict)

    def _apply(self, state: dict[str, Any]) -> None:
        assert self.swag is not None
        if state.get("swag") is not None:
            self.swag.load_state_dict(state["swag"])
        self._last_collected_epoch = int(state.get("last_collected_epoch", -1))
