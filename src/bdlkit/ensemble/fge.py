"""Fast Geometric Ensembling (Garipov et al. 2018): cyclic learning rate + snapshot ensembles.

Starting from a trained network, SGD is run with a per-iteration triangular learning-rate
cycle between ``lr_1`` (large) and ``lr_2`` (small); a copy of the weights is taken every time
the rate reaches ``lr_2`` in the middle of a cycle, and the copies are ensembled by averaging
their softmax outputs.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from bdlkit._checks import check_positive_int
from bdlkit._modes import kept_modes
from bdlkit.batchnorm import _first_device as _device_of
from bdlkit.batchnorm import refresh_bn
from bdlkit.metrics import predictive_entropy

__all__ = ["FGESchedule", "Ensemble", "collect_fge", "fge_lr"]


def _check_cycle(cycle: Any) -> int:
    if isinstance(cycle, bool) or not isinstance(cycle, int):
        raise TypeError(f"cycle must be an int (epochs per cycle), got {type(cycle).__name__}")
    if cycle < 2 or cycle % 2:
        raise ValueError(f"cycle must be an even int >= 2 (epochs per cycle), got {cycle}")
    return cycle


def _check_lr(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite float, got {value}")
    return float(value)




def fge_lr(iteration: int, cycle: int, lr_1: float, lr_2: float, steps_per_epoch: int) -> float:
    """FGE learning rate at a 0-based training ``iteration`` (METHODS.md §2).

    With ``I = steps_per_epoch``, epoch ``e = iteration // I`` and ``i = iteration % I``:
    ``t = ((e mod cycle) + i / I) / cycle``; the rate is ``(1-2t) lr_1 + 2t lr_2`` for
    ``t < 1/2`` and ``(2-2t) lr_2 + (2t-1) lr_1`` otherwise.

    Example:
        >>> fge_lr(0, 4, 0.05, 1e-4, 100), fge_lr(200, 4, 0.05, 1e-4, 100)
        (0.05, 0.0001)
    """
    cycle = _check_cycle(cycle)
    lr_1, lr_2 = _check_lr("lr_1", lr_1), _check_lr("lr_2", lr_2)
    steps_per_epoch = check_positive_int("steps_per_epoch", steps_per_epoch)
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration must be a non-negative int, got {iteration!r}")
    epoch, i = divmod(iteration, steps_per_epoch)
    t = ((epoch % cycle) + i / steps_per_epoch) / cycle
    if t < 0.5:
        return (1.0 - 2.0 * t) * lr_1 + 2.0 * t * lr_2
    return (2.0 - 2.0 * t) * lr_2 + (2.0 * t - 1.0) * lr_1


class FGESchedule(LRScheduler):
    """Per-iteration cyclic learning rate of FGE; call ``step()`` after every optimizer step.

    The rate starts at ``lr_1``, falls linearly to ``lr_2`` at mid-cycle (after
    ``cycle / 2`` epochs) and rises back to ``lr_1``. All parameter groups get the same rate.
    ``should_snapshot`` is True right after the iteration that completes the first half of a
    cycle, i.e. when the rate for the next iteration is exactly ``lr_2``: take a snapshot then.

    Args:
        optimizer: the optimizer whose learning rate is driven.
        cycle: cycle length in epochs; an even int >= 2 (paper: 4, or 2 on CIFAR-100).
        lr_1: the largest rate (paper: 0.05).
        lr_2: the smallest rate, reached at mid-cycle (paper: 1e-4).
        steps_per_epoch: optimizer steps per epoch (``len(loader)``).

    Example:
        >>> net = nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> sched = FGESchedule(opt, cycle=2, lr_1=0.05, lr_2=1e-4, steps_per_epoch=10)
        >>> for _ in range(10):
        ...     opt.step(); sched.step()
        >>> sched.should_snapshot, opt.param_groups[0]["lr"]
        (True, 0.0001)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        cycle: int,
        lr_1: float = 0.05,
        lr_2: float = 1e-4,
        steps_per_epoch: int = 1,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch Optimizer, got {type(optimizer).__name__}")
        self.cycle = _check_cycle(cycle)
        self.lr_1 = _check_lr("lr_1", lr_1)
        self.lr_2 = _check_lr("lr_2", lr_2)
        self.steps_per_epoch = check_positive_int("steps_per_epoch", steps_per_epoch)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, iteration: int) -> float:
        """Learning rate for the 0-based ``iteration`` of the FGE phase.

        Example:
            >>> opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1.0)
            >>> FGESchedule(opt, 2, 0.05, 1e-4, 4).lr_at(4)
            0.0001
        """
        return fge_lr(iteration, self.cycle, self.lr_1, self.lr_2, self.steps_per_epoch)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        # ``last_epoch`` counts completed scheduler steps = index of the next iteration.
        lr = self.lr_at(max(self.last_epoch, 0))
        return [lr for _ in self.optimizer.param_groups]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    @property
    def iterations_per_cycle(self) -> int:
        """Optimizer steps in one cycle (``cycle * steps_per_epoch``)."""
        return self.cycle * self.steps_per_epoch

    @property
    def should_snapshot(self) -> bool:
        """True when the iterations done so far end exactly at a mid-cycle minimum."""
        done = self.last_epoch
        half = self.iterations_per_cycle // 2
        return done > 0 and done % self.iterations_per_cycle == half

    @property
    def snapshots_so_far(self) -> int:
        """How many mid-cycle minima have been passed."""
        done = max(self.last_epoch, 0)
        half = self.iterations_per_cycle // 2
        return 0 if done < half else (done - half) // self.iterations_per_cycle + 1


def _batch_input(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, dict):
        for key in ("input", "inputs", "x", "image", "images"):
            if key in batch:
                return batch[key]
    raise TypeError(f"cannot find the input in a batch of type {type(batch).__name__}")


def _batch_target(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    if isinstance(batch, dict):
        for key in ("target", "targets", "y", "label", "labels"):
            if key in batch:
                return batch[key]
    return None


def _fit_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` on ``model``'s device and, if floating, in its float dtype (members may differ)."""
    ref = next((t for t in model.parameters() if t.is_floating_point()), None)
    if ref is None:
        return x.to(_device_of(model))
    return x.to(device=ref.device, dtype=ref.dtype) if x.is_floating_point() else x.to(ref.device)


class Ensemble(nn.Module):
    """An equally weighted ensemble: ``forward`` returns the mean of the members' softmaxes.

    Args:
        models: the members (any ``nn.Module`` returning logits); they are not copied.

    Example:
        >>> ens = Ensemble([nn.Linear(4, 3), nn.Linear(4, 3)])
        >>> torch.allclose(ens(torch.randn(5, 4)).sum(-1), torch.ones(5))
        True
    """

    def __init__(self, models: Iterable[nn.Module] = ()) -> None:
        super().__init__()
        members = list(models)
        for i, m in enumerate(members):
            if not isinstance(m, nn.Module):
                raise TypeError(f"models[{i}] must be an nn.Module, got {type(m).__name__}")
        self.members = nn.ModuleList(members)

    def __len__(self) -> int:
        return len(self.members)

    def add(self, model: nn.Module) -> Ensemble:
        """Append a member (not copied) and return ``self``.

        Example:
            >>> len(Ensemble().add(nn.Linear(2, 2)))
            1
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.members.append(model)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the members' softmax probabilities over the last dimension."""
        if len(self.members) == 0:
            raise ValueError("the ensemble has no members")
        probs = F.softmax(self.members[0](_fit_input(self.members[0], x)), dim=-1)
        for m in self.members[1:]:
            probs = probs + F.softmax(m(_fit_input(m, x)), dim=-1).to(probs)
        return probs / len(self.members)

    def refresh_bn(self, loader: Iterable[Any], num_batches: int | None = None) -> Ensemble:
        """Recompute every member's BatchNorm statistics on ``loader`` (training data).

        Example:
            >>> ens = Ensemble([nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))])
            >>> _ = ens.refresh_bn([torch.randn(8, 3)])
        """
        for m in self.members:
            refresh_bn(m, loader, num_batches=num_batches)
        return self

    @torch.no_grad()
    def predict(
        self,
        loader: Iterable[Any],
        return_labels: bool = False,
        bn_loader: Iterable[Any] | None = None,
        num_bn_batches: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Mean softmax of the members over ``loader`` (members in eval mode), on the CPU.

        Batches may be tensors, ``(x, y, ...)`` tuples or dicts with an ``"input"`` key.
        ``bn_loader`` first refreshes each member's BatchNorm statistics on it.
        With ``return_labels=True`` returns ``(probs, labels)`` (labels must be in the batches).

        Example:
            >>> ens = Ensemble([nn.Linear(4, 3)])
            >>> ens.predict([torch.randn(5, 4)]).shape
            torch.Size([5, 3])
        """
        self._prepare(bn_loader, num_bn_batches)
        probs: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        with self._members_in_eval():
            for batch in loader:
                x = _batch_input(batch)
                probs.append(self(x).float().cpu())
                if return_labels:
                    y = _batch_target(batch)
                    if y is None:
                        raise ValueError("return_labels=True but the batches carry no labels")
                    labels.append(y.cpu())
        if not probs:
            raise ValueError("loader yielded no batches")
        out = torch.cat(probs)
        return (out, torch.cat(labels)) if return_labels else out

    @torch.no_grad()
    def predict_uncertainty(
        self,
        loader: Iterable[Any],
        bn_loader: Iterable[Any] | None = None,
        num_bn_batches: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """:meth:`predict` plus the split of its predictive entropy (nats, per example).

        Returns ``{"probs", "total", "aleatoric", "epistemic"}``: ``total`` is the entropy of
        the mean softmax, ``aleatoric`` the members' mean entropy, and ``epistemic = total -
        aleatoric`` the mutual information (>= 0; zero when the members agree), the usual
        ensemble out-of-distribution score. ``bn_loader`` / ``num_bn_batches`` as in
        :meth:`predict`.

        Example:
            >>> ens = Ensemble([nn.Linear(4, 3), nn.Linear(4, 3)])
            >>> u = ens.predict_uncertainty([torch.randn(5, 4)])
            >>> bool((u["epistemic"] >= 0).all()), u["probs"].shape
            (True, torch.Size([5, 3]))
        """
        self._prepare(bn_loader, num_bn_batches)
        probs: list[torch.Tensor] = []
        aleatoric: list[torch.Tensor] = []
        with self._members_in_eval():
            for batch in loader:
                x = _batch_input(batch)
                each = [F.softmax(m(_fit_input(m, x)), dim=-1).float().cpu()
                        for m in self.members]
                probs.append(torch.stack(each).mean(0))
                aleatoric.append(torch.stack([predictive_entropy(q) for q in each]).mean(0))
        if not probs:
            raise ValueError("loader yielded no batches")
        mean, ale = torch.cat(probs), torch.cat(aleatoric)
        total = predictive_entropy(mean)
        return {"probs": mean, "total": total, "aleatoric": ale,
                "epistemic": (total - ale).clamp_min_(0.0)}

    def _prepare(self, bn_loader: Iterable[Any] | None, num_bn_batches: int | None) -> None:
        """Check there are members and refresh their BatchNorm statistics if asked."""
        if len(self.members) == 0:
            raise ValueError("the ensemble has no members")
        if bn_loader is not None:
            self.refresh_bn(bn_loader, num_bn_batches)

    @contextlib.contextmanager
    def _members_in_eval(self) -> Iterator[None]:
        """Members in eval mode inside the block; their own train/eval flags restored after."""
        with kept_modes(*self.members):
            for m in self.members:
                m.eval()
            yield


def collect_fge(
    model: nn.Module,
    loader: Iterable[Any] | Sequence[Any],
    num_snapshots: int,
    cycle: int = 4,
    lr_1: float = 0.05,
    lr_2: float = 1e-4,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    steps_per_epoch: int | None = None,
    include_start: bool = False,
    bn_loader: Iterable[Any] | None = None,
    num_bn_batches: int | None = None,
    inplace: bool = False,
) -> Ensemble:
    """Run FGE from a trained ``model`` and return the ensemble of mid-cycle snapshots.

    SGD (``momentum``, ``weight_decay``) is driven by :class:`FGESchedule`; training stops
    right after the ``num_snapshots``-th snapshot, i.e. after
    ``cycle/2 + (num_snapshots-1)*cycle`` epochs. ``loader`` must yield ``(x, y)`` batches;
    ``steps_per_epoch`` defaults to ``len(loader)``. ``include_start`` adds a copy of the
    starting model. ``bn_loader`` refreshes each snapshot's BatchNorm statistics (the paper
    does not). Trains a copy of ``model`` unless ``inplace=True``.

    Example:
        >>> net = nn.Linear(4, 2)
        >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3)]
        >>> len(collect_fge(net, data, num_snapshots=2, cycle=2))
        2
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    num_snapshots = check_positive_int("num_snapshots", num_snapshots)
    _check_cycle(cycle)
    _check_lr("lr_1", lr_1)
    _check_lr("lr_2", lr_2)
    if steps_per_epoch is None:
        if not hasattr(loader, "__len__"):
            raise TypeError("loader has no len(); pass steps_per_epoch")
        steps_per_epoch = len(loader)  # type: ignore[arg-type]
    steps_per_epoch = check_positive_int("steps_per_epoch", steps_per_epoch)
    if momentum < 0 or weight_decay < 0:
        raise ValueError("momentum and weight_decay must be non-negative")
    net = model if inplace else copy.deepcopy(model)
    ensemble = Ensemble([copy.deepcopy(net).eval()] if include_start else [])
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    optimizer = torch.optim.SGD(params, lr=lr_1, momentum=momentum, weight_decay=weight_decay)
    schedule = FGESchedule(optimizer, cycle, lr_1, lr_2, steps_per_epoch)
    with kept_modes(net):
        net.train()
        _run_fge(net, loader, ensemble, num_snapshots + int(include_start), optimizer, schedule,
                 loss_fn, steps_per_epoch, bn_loader, num_bn_batches)
    return ensemble


def _run_fge(net: nn.Module, loader: Iterable[Any], ensemble: Ensemble, size: int,
             optimizer: torch.optim.Optimizer, schedule: FGESchedule,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], steps_per_epoch: int,
             bn_loader: Iterable[Any] | None, num_bn_batches: int | None) -> None:
    """The training loop of :func:`collect_fge`: cycles until the ensemble has ``size`` members."""
    device = _device_of(net)
    while len(ensemble) < size:
        n_batches = 0
        # islice: no batch beyond steps_per_epoch is drawn (and lost) from an iterator.
        for batch in itertools.islice(loader, steps_per_epoch):
            x, y = _batch_input(batch), _batch_target(batch)
            if y is None:
                raise ValueError("collect_fge needs (input, target) batches")
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            schedule.step()
            n_batches += 1
            if schedule.should_snapshot:
                snap = copy.deepcopy(net)
                if bn_loader is not None:
                    refresh_bn(snap, bn_loader, num_batches=num_bn_batches)
                ensemble.add(snap.eval())
                if len(ensemble) == size:
                    break
        if n_batches == 0:
            raise ValueError("loader yielded no batches")
