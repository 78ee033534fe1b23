"""Mode-connecting curves (Garipov et al. 2018) for any ``nn.Module``.

A curve ``phi(t), t in [0, 1]`` in weight space joins two trained networks (the frozen
endpoints) through trainable "bends". The network is evaluated at ``phi(t)`` with
:func:`torch.func.functional_call`, so no curve-specific layers are needed: any module works,
including BatchNorm (buffers) and non-sequential graphs.

Floating-point buffers (BatchNorm running statistics) are interpolated linearly between the
endpoints; they are only a starting point: refresh them with :func:`bdlkit.batchnorm.refresh_bn`
on ``curve.model_at(t)`` (as :func:`evaluate_path` does) before evaluating an inner point.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bdlkit.batchnorm import has_batchnorm, refresh_bn

__all__ = ["Curve", "Bezier", "PolyChain", "train_curve", "evaluate_path", "linear_path"]


class _TensorStore(nn.Module):
    """Holds a list of tensors as buffers ``"0", "1", ...`` (moves with ``.to()``)."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(str(i), t)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._buffers[str(i)]  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self._buffers)


def _check_t(t: Any) -> float:
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"t must be a scalar, got a tensor of shape {tuple(t.shape)}")
        t = t.item()
    if isinstance(t, numbers.Real) and not isinstance(t, (int, float)):
        t = float(t)  # numpy scalars
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"t must be a float in [0, 1], got {type(t).__name__}")
    t = float(t)
    if not (0.0 <= t <= 1.0):
        raise ValueError(f"t must lie in [0, 1], got {t}")
    return t


def _signature(module: nn.Module) -> tuple[Any, ...]:
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters())
    buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in module.named_buffers())
    kinds = tuple((n, type(m).__name__) for n, m in module.named_modules())
    return params, buffers, kinds


def _aliases(module: nn.Module, kind: str) -> list[tuple[str, str]]:
    """``(alias, canonical)`` names of tied parameters or buffers (``kind``)."""
    named = getattr(module, f"named_{kind}")(remove_duplicate=False)
    first: dict[int, str] = {}
    out = []
    for name, tensor in named:
        canonical = first.setdefault(id(tensor), name)
        if canonical != name:
            out.append((name, canonical))
    return out


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


class Curve(nn.Module):
    """Base class: a parametric curve between two networks with the same architecture.

    Subclasses implement :meth:`coefficients` (``num_bends`` weights summing to one, the first
    being 1 at ``t = 0`` and the last 1 at ``t = 1``). ``num_bends`` counts all control points,
    endpoints included (3 = one trainable bend). Only the bends are ``nn.Parameter``s; the
    endpoints are frozen buffers. The endpoints are copied, so the input modules are untouched.

    Call ``curve(x, t)`` to run the network at ``phi(t)``; ``curve.model_at(t)`` returns an
    independent plain module with those weights.

    Example (a straight line written as a curve with no bend):
        >>> class Line(Curve):
        ...     def coefficients(self, t: float) -> list[float]:
        ...         return [1.0 - t, t]
        >>> line = Line(nn.Linear(4, 2), nn.Linear(4, 2), num_bends=2)
        >>> line.model_at(0.5).weight.shape
        torch.Size([2, 4])
    """

    def __init__(self, start: nn.Module, end: nn.Module, num_bends: int = 3) -> None:
        super().__init__()
        if not isinstance(start, nn.Module):
            raise TypeError(f"start must be an nn.Module, got {type(start).__name__}")
        if not isinstance(end, nn.Module):
            raise TypeError(f"end must be an nn.Module, got {type(end).__name__}")
        if isinstance(num_bends, bool) or not isinstance(num_bends, int):
            raise TypeError(f"num_bends must be an int, got {type(num_bends).__name__}")
        if num_bends < 2:
            raise ValueError(
                f"num_bends must be >= 2 (control points incl. endpoints), got {num_bends}"
            )
        if type(start) is not type(end) or _signature(start) != _signature(end):
            raise ValueError(
                "end must have the same architecture as start (same class, parameter and buffer "
                f"names, shapes and dtypes); got {type(start).__name__} and {type(end).__name__}"
            )
        if not any(True for _ in start.parameters()):
            raise ValueError("start has no parameters")
        self.num_bends = num_bends
        self._param_names = [n for n, _ in start.named_parameters()]
        self._buffer_names = [n for n, _ in start.named_buffers()]
        # Tied tensors (one tensor under several names) stay tied in the template and in
        # model_at; a parameter frozen in the endpoints stays frozen on the whole curve.
        self._aliases = {"parameters": _aliases(start, "parameters"),
                         "buffers": _aliases(start, "buffers")}
        self._requires_grad = [p.requires_grad for p in start.parameters()]
        sp = [p.detach().clone() for p in start.parameters()]
        ep = [p.detach().clone() for _, p in end.named_parameters()]
        self.start_params = _TensorStore(sp)
        self.end_params = _TensorStore(ep)
        self.start_buffers = _TensorStore([b.detach().clone() for b in start.buffers()])
        self.end_buffers = _TensorStore([b.detach().clone() for b in end.buffers()])
        # Bends start on the straight line between the endpoints (evenly spaced).
        bends = []
        for j in range(1, num_bends - 1):
            a = j / (num_bends - 1)
            bends.append(
                nn.ParameterList(
                    [nn.Parameter(torch.lerp(s, e, a), requires_grad=g)
                     for s, e, g in zip(sp, ep, self._requires_grad, strict=True)]
                )
            )
        self.bends = nn.ModuleList(bends)
        # Architecture template on the meta device: it owns no data; every tensor it uses is
        # passed in through functional_call.
        base = copy.deepcopy(start).to("meta")
        self._retie(base)  # .to() gives each alias its own tensor
        self.__dict__["_base"] = base  # not a registered submodule: no parameters, no buffers

    def _retie(self, model: nn.Module) -> None:
        for alias, canonical in self._aliases["parameters"]:
            owner, attr = _owner(model, alias)
            owner._parameters[attr] = model.get_parameter(canonical)
        for alias, canonical in self._aliases["buffers"]:
            owner, attr = _owner(model, alias)
            owner._buffers[attr] = model.get_buffer(canonical)

    def coefficients(self, t: float) -> list[float]:
        """Weights of the ``num_bends`` control points at ``t`` (Python floats)."""
        raise NotImplementedError

    def _points(self, i: int) -> list[torch.Tensor]:
        return [self.start_params[i], *(b[i] for b in self.bends), self.end_params[i]]

    def _device(self) -> torch.device:
        return self.start_params[0].device

    def weights_at(self, t: float) -> dict[str, torch.Tensor]:
        """Parameters ``phi(t)`` by name (differentiable w.r.t. the bends).

        Example:
            >>> c = Bezier(nn.Linear(2, 2), nn.Linear(2, 2))
            >>> sorted(c.weights_at(0.5))
            ['bias', 'weight']
        """
        t = _check_t(t)
        coeffs = self.coefficients(t)
        nz = [(j, c) for j, c in enumerate(coeffs) if c != 0.0]
        out: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self._param_names):
            pts = self._points(i)
            j0, c0 = nz[0]
            w = pts[j0].clone() if c0 == 1.0 else pts[j0] * c0  # never the stored tensor
            for j, c in nz[1:]:
                w = w + pts[j] * c
            out[name] = w
        return out

    def buffers_at(self, t: float) -> dict[str, torch.Tensor]:
        """Buffers at ``t``: floating ones interpolated linearly, others from the nearer end.

        Fresh tensors are returned, so in-place updates (BatchNorm in train mode) never touch
        the stored endpoint buffers.
        """
        t = _check_t(t)
        out: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self._buffer_names):
            a, b = self.start_buffers[i], self.end_buffers[i]
            if t == 0.0:
                out[name] = a.clone()
            elif t == 1.0:
                out[name] = b.clone()
            elif a.is_floating_point():
                out[name] = torch.lerp(a, b, t)
            else:
                out[name] = (a if t < 0.5 else b).clone()
        return out

    def forward(self, x: Any, t: float, *args: Any, **kwargs: Any) -> Any:
        """Run the network at ``phi(t)`` on ``x`` (extra arguments go to its forward).

        In training mode the network runs in training mode (BatchNorm uses batch statistics);
        in eval mode it uses the interpolated buffers.
        """
        state = {**self.weights_at(t), **self.buffers_at(t)}
        base = self._base
        base.train(self.training)
        return functional_call(base, state, (x, *args), kwargs)

    def regularizer(self, t: float) -> torch.Tensor:
        """``||phi(t)||^2`` (the curve's L2 penalty is ``wd / 2`` times this)."""
        return sum(w.pow(2).sum() for w in self.weights_at(t).values())  # type: ignore[return-value]

    @torch.no_grad()
    def model_at(self, t: float) -> nn.Module:
        """An independent plain module with the weights and buffers at ``t``.

        Its training flag mirrors the curve's. At ``t = 0`` / ``t = 1`` it equals the endpoints.

        Example:
            >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
            >>> torch.equal(Bezier(a, b).model_at(1.0).weight, b.weight)
            True
        """
        weights = self.weights_at(t)
        buffers = self.buffers_at(t)
        model = copy.deepcopy(self._base)  # on meta: only the structure is copied
        # New tensors in the curve's own dtype and device (the template keeps the dtypes the
        # endpoints had, which curve.double() does not change).
        for name, grad in zip(self._param_names, self._requires_grad, strict=True):
            owner, attr = _owner(model, name)
            owner._parameters[attr] = nn.Parameter(weights[name].detach().clone(),
                                                   requires_grad=grad)
        for name in self._buffer_names:
            owner, attr = _owner(model, name)
            owner._buffers[attr] = buffers[name]
        self._retie(model)
        return model.train(self.training)

    def extra_repr(self) -> str:
        return f"architecture={type(self._base).__name__}, num_bends={self.num_bends}"


class Bezier(Curve):
    """Bezier curve: ``phi(t) = sum_j C(n-1, j) t^j (1-t)^(n-1-j) w_j`` (n = ``num_bends``).

    Example:
        >>> curve = Bezier(nn.Linear(4, 2), nn.Linear(4, 2), num_bends=3)
        >>> curve.coefficients(0.25)
        [0.5625, 0.375, 0.0625]
        >>> curve(torch.randn(5, 4), t=0.3).shape
        torch.Size([5, 2])
    """

    def coefficients(self, t: float) -> list[float]:
        t = _check_t(t)
        n = self.num_bends - 1
        return [math.comb(n, j) * t**j * (1.0 - t) ** (n - j) for j in range(n + 1)]


class PolyChain(Curve):
    """Polygonal chain through the control points: coefficient ``max(0, 1 - |t(n-1) - j|)``.

    Example:
        >>> curve = PolyChain(nn.Linear(4, 2), nn.Linear(4, 2), num_bends=3)
        >>> curve.coefficients(0.25)
        [0.5, 0.5, 0.0]
    """

    def coefficients(self, t: float) -> list[float]:
        t = _check_t(t)
        n = self.num_bends - 1
        return [max(0.0, 1.0 - abs(t * n - j)) for j in range(n + 1)]


def linear_path(start: nn.Module, end: nn.Module) -> Curve:
    """The straight line ``(1-t) start + t end`` as a curve without bends (the baseline).

    Example:
        >>> line = linear_path(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> len(list(line.parameters()))
        0
    """
    return PolyChain(start, end, num_bends=2)


def _batch_xy(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        x = next((batch[k] for k in ("input", "inputs", "x", "image") if k in batch), None)
        y = next((batch[k] for k in ("target", "targets", "y", "label", "labels") if k in batch),
                 None)
        if x is not None and y is not None:
            return x, y
    raise TypeError(f"batches must be (input, target) pairs, got {type(batch).__name__}")


def _garipov_lr(base: float, progress: float) -> float:
    """Reference schedule: constant for 50 %, linear down to 1 % by 90 %, then 1 %."""
    if progress <= 0.5:
        return base
    if progress <= 0.9:
        return base * (1.0 - (progress - 0.5) / 0.4 * 0.99)
    return base * 0.01


def train_curve(
    curve: Curve,
    loader: Iterable[Any],
    epochs: int,
    lr: float = 0.015,
    wd: float = 5e-4,
    momentum: float = 0.9,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    schedule: str = "garipov",
    generator: torch.Generator | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> dict[str, list[float]]:
    """Train the bends with SGD, one ``t ~ U(0, 1)`` per minibatch.

    Loss = ``loss_fn(curve(x, t), y) + wd/2 * ||phi(t)||^2``. ``schedule="garipov"`` keeps
    ``lr`` for half the epochs, decays it linearly to 1 % by 90 %, then holds it (per epoch);
    ``"constant"`` keeps it. ``callback(epoch, mean_loss)`` runs after each epoch.
    Returns ``{"loss": [mean loss per epoch], "lr": [...]}``.

    Example:
        >>> c = Bezier(nn.Linear(4, 2), nn.Linear(4, 2))
        >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
        >>> len(train_curve(c, data, epochs=2)["loss"])
        2
    """
    if not isinstance(curve, Curve):
        raise TypeError(f"curve must be a Curve, got {type(curve).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive float, got {lr!r}")
    if not (isinstance(wd, (int, float)) and wd >= 0):
        raise ValueError(f"wd must be a non-negative float, got {wd!r}")
    if schedule not in ("garipov", "constant"):
        raise ValueError(f"schedule must be 'garipov' or 'constant', got {schedule!r}")
    params = [p for p in curve.parameters() if p.requires_grad]
    if not params:
        raise ValueError("curve has no trainable bends (num_bends=2); nothing to train")
    device = params[0].device
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
    history: dict[str, list[float]] = {"loss": [], "lr": []}
    was_training = curve.training
    curve.train()
    curve._base.train(True)
    try:
        for epoch in range(epochs):
            cur = lr if schedule == "constant" else _garipov_lr(lr, epoch / epochs)
            for g in optimizer.param_groups:
                g["lr"] = cur
            total, count = 0.0, 0
            for batch in loader:
                x, y = _batch_xy(batch)
                x, y = x.to(device), y.to(device)
                t = 0.0
                while t == 0.0:  # t = 0 exactly would leave the bends out of the graph
                    t = float(torch.rand((), generator=generator))
                weights = curve.weights_at(t)
                out = functional_call(curve._base, {**weights, **curve.buffers_at(t)}, (x,))
                loss = loss_fn(out, y)
                if wd > 0:
                    loss = loss + 0.5 * wd * sum(w.pow(2).sum() for w in weights.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(y)
                count += len(y)
            if count == 0:
                raise ValueError("loader yielded no batches")
            history["loss"].append(total / count)
            history["lr"].append(cur)
            if callback is not None:
                callback(epoch, total / count)
    finally:
        curve.train(was_training)
    return history


@torch.no_grad()
def _eval_model(
    model: nn.Module, loader: Iterable[Any], device: torch.device
) -> dict[str, float]:
    nll_sum, correct, n = 0.0, 0, 0
    for batch in loader:
        x, y = _batch_xy(batch)
        logits = model(x.to(device))
        y = y.to(device)
        nll_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        n += len(y)
    if n == 0:
        raise ValueError("loader yielded no batches")
    return {"nll": nll_sum / n, "accuracy": correct / n, "error": 1.0 - correct / n}


def evaluate_path(
    curve: Curve,
    loader: Iterable[Any] | Mapping[str, Iterable[Any]],
    ts: Sequence[float] | torch.Tensor | int = 61,
    bn_loader: Iterable[Any] | None = None,
    num_bn_batches: int | None = None,
) -> dict[str, list[float]]:
    """Evaluate the network along the curve, refreshing BatchNorm statistics at each ``t``.

    ``ts`` is a sequence of points in [0, 1] or a count of evenly spaced ones (default 61).
    ``bn_loader`` (training data) is needed when the model has BatchNorm: its statistics are
    recomputed on it at every ``t`` (over ``num_bn_batches`` batches or all). ``loader`` may be
    one loader or a mapping ``{name: loader}``; metrics are then prefixed ``"<name>_"``.
    Returns ``{"t": [...], "nll": [...], "accuracy": [...], "error": [...]}`` (plus
    ``"l2"``: ``||phi(t)||^2``).

    Example:
        >>> c = linear_path(nn.Linear(4, 2), nn.Linear(4, 2))
        >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
        >>> evaluate_path(c, data, ts=3)["t"]
        [0.0, 0.5, 1.0]
    """
    if not isinstance(curve, Curve):
        raise TypeError(f"curve must be a Curve, got {type(curve).__name__}")
    if isinstance(ts, numbers.Integral) and not isinstance(ts, bool):
        ts = int(ts)  # numpy integers count too
    elif hasattr(ts, "tolist") and not isinstance(ts, torch.Tensor):
        ts = ts.tolist()  # numpy arrays (a 0-d one becomes a scalar and is refused below)
    if isinstance(ts, bool) or not isinstance(ts, (int, Sequence, torch.Tensor)) \
            or (isinstance(ts, torch.Tensor) and ts.dim() != 1):
        raise TypeError("ts must be an int (a count) or a 1-D sequence / tensor of floats, got "
                        f"{type(ts).__name__}")
    if isinstance(ts, int):
        if ts < 2:
            raise ValueError(f"ts must be >= 2 when given as a count, got {ts}")
        t_values = [i / (ts - 1) for i in range(ts)]
    else:
        t_values = [_check_t(t) for t in (ts.tolist() if isinstance(ts, torch.Tensor) else ts)]
        if not t_values:
            raise ValueError("ts is empty")
    loaders = dict(loader) if isinstance(loader, Mapping) else {"": loader}
    probe = curve.model_at(0.0)
    needs_bn = has_batchnorm(probe)
    if needs_bn and bn_loader is None:
        raise ValueError("the model has BatchNorm: pass bn_loader (training data) to refresh it")
    device = curve._device()
    result: dict[str, list[float]] = {"t": t_values, "l2": []}
    for t in t_values:
        model = curve.model_at(t)
        if needs_bn:
            refresh_bn(model, bn_loader, num_batches=num_bn_batches)  # type: ignore[arg-type]
        model.eval()
        result["l2"].append(float(sum(p.detach().pow(2).sum() for p in model.parameters())))
        for name, ld in loaders.items():
            prefix = f"{name}_" if name else ""
            for k, v in _eval_model(model, ld, device).items():
                result.setdefault(prefix + k, []).append(v)
    return result
