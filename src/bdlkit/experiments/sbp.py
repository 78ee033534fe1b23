"""Recipe ``sbp``: Structured Bayesian Pruning of LeNet-500-300 and LeNet5-Caffe on MNIST.

For each network: pretrain (Adam + one-cycle), insert SBP noise layers, fine-tune on the SGVLB
(Adam; the SBP parameters μ, log σ get their own, larger learning rate so that pruning
converges within the time budget; all learning rates are held for the first ``hold`` fraction
of the steps, then decay with a cosine to ``floor`` times their value, a low-noise end phase),
prune units with SNR ≤ 1 into a physically smaller ``nn.Sequential``, and report test error,
units per layer, FLOP reduction and the measured CPU speed-up of the pruned network over the
pretrained one, next to the paper's table. The networks train one after the other (one
process); after each one its pretrained and pruned modules are saved to ``out_dir`` as
``<net>_pretrained.pt`` / ``<net>_pruned.pt`` (``torch.save`` of the module) with a partial
``<net>_result.json``, so that ``benchmarks/sbp_remeasure.py`` can re-time them later.

:func:`validate` runs the same training on a training/validation split of the MNIST training
set (the hyper-parameters of ``FULL`` were chosen on it, not on test error).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import data, plots
from .._checks import check_positive_int
from ..compress import sbp
from ..compress.speed import count_flops, measure_speedup
from ..models import LeNet5, LeNet500_300
from ..train import evaluate, fit, seed_everything
from ._common import progress

# Paper / README numbers (Neklyudov et al. 2017): error %, units, CPU speed-up, FLOP reduction.
PAPER = {
    "LeNet-500-300": {"orig_err": 1.54, "orig_units": "784-500-300-10", "err": 1.55,
                      "units": "245-160-55-10", "speedup": 2.33, "flops": 11.23},
    "LeNet5-Caffe": {"orig_err": 0.80, "orig_units": "20-50-800-500", "err": 0.86,
                     "units": "3-18-284-283", "speedup": 5.41, "flops": 10.49},
}

FULL = {
    # LeNet-500-300: mu/log_sigma lr 0.05 chosen on the validation split with noise before the
    # bias (docs/results.md: the lowest validation error among runs with >= 10x FLOP reduction;
    # 0.1 gave 1.94 % at 17.4x, 0.05 1.72 % at 10.7x, 0.03 fell below 10x)
    "LeNet-500-300": {"pretrain_epochs": 10, "pretrain_lr": 3e-3, "sbp_epochs": 36,
                      "lr": 1e-3, "sbp_lr": 5e-2, "hold": 0.5, "floor": 0.01},
    # LeNet5: larger learning rates, each chosen on the validation split (docs/results.md, SBP
    # section): weights 1e-2 and mu/log_sigma 0.5 on conv2's channels (run J); conv1's at 2.0
    # with a 15-epoch SBP phase (config Q15: conv1 keeps 3-4 channels, which the >= 5x CPU
    # speed-up needs; at 0.5-1.0 it kept 5-6); the dense features (fc1 inputs/units) at 0.015
    # (config C: ~180 fc1 outputs instead of ~145 at 0.03, lower error; 0.3 crushed fc1 to ~30).
    "LeNet5-Caffe": {"pretrain_epochs": 3, "pretrain_lr": 3e-3, "sbp_epochs": 15,
                     "lr": 1e-2, "sbp_lr": 5e-1, "sbp_lr_linear": 1.5e-2, "sbp_lr_first": 2.0,
                     "hold": 0.5, "floor": 0.01},
}
# Keys a config may add to those of FULL (see param_groups and lr_lambdas), with their types.
OPTIONAL_KEYS = {"sbp_lr_linear": float, "sbp_lr_first": float, "sbp_freeze_epochs": int,
                 "post_epochs": int, "post_lr": float}
QUICK = {
    "LeNet-500-300": {"pretrain_epochs": 1, "pretrain_lr": 3e-3, "sbp_epochs": 2,
                      "lr": 1e-3, "sbp_lr": 1e-1, "hold": 0.5, "floor": 0.01},
    "LeNet5-Caffe": {"pretrain_epochs": 1, "pretrain_lr": 3e-3, "sbp_epochs": 2,
                     "lr": 1e-3, "sbp_lr": 1e-1, "hold": 0.5, "floor": 0.01},
}
BATCH = 100
INPUT_SHAPE = (1, 28, 28)


NETS = {"LeNet-500-300": LeNet500_300, "LeNet5-Caffe": LeNet5}
SLUGS = {"LeNet-500-300": "lenet500_300", "LeNet5-Caffe": "lenet5"}


def with_overrides(cfg: dict[str, Any], items: Sequence[str]) -> dict[str, Any]:
    """A copy of ``cfg`` with ``KEY=VALUE`` strings applied (keys of ``cfg`` or ``OPTIONAL_KEYS``).

    Values take the type of the entry they replace (int or float). The benchmark scripts'
    ``--set`` options use it, so that a candidate's validation runs and acceptance runs read
    the same configuration.

    Example:
        >>> with_overrides(FULL["LeNet5-Caffe"], ["sbp_epochs=25"])["sbp_epochs"]
        25
    """
    if isinstance(items, str) or not all(isinstance(i, str) for i in items):
        raise TypeError(f"items must be a sequence of 'KEY=VALUE' strings, got {items!r}")
    out = dict(cfg)
    types = {**{k: type(v) for k, v in cfg.items()}, **OPTIONAL_KEYS}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or key not in types:
            raise ValueError(f"override must be KEY=VALUE with KEY one of {sorted(types)}, "
                             f"got {item!r}")
        try:
            number = float(val)
        except ValueError:
            raise ValueError(f"override {item!r}: {val!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"override {item!r}: the value must be finite")
        if types[key] is int and not number.is_integer():
            raise ValueError(f"override {item!r}: {key} takes an integer")
        out[key] = int(number) if types[key] is int else number
    return out


class _Clip:
    """Callback: clip μ / log σ to [-20, 5] after every step (the paper's clipping)."""

    def on_batch_end(self, model: torch.nn.Module, step: int, loss: float) -> None:
        sbp.clip_(model)


class _Track:
    """Callback: per-epoch eval-set error (noisy model, eval mode) and FLOP reduction."""

    def __init__(self, test_loader: Any, flops_full: int, example: torch.Tensor,
                 name: str = "") -> None:
        self.test_loader, self.flops_full, self.example = test_loader, flops_full, example
        self.name = name
        self.epochs: list[int] = []
        self.err: list[float] = []
        self.flop_red: list[float] = []
        self.units: list[str] = []

    def on_epoch_end(self, model: torch.nn.Module, epoch: int) -> None:
        self.epochs.append(epoch + 1)
        self.err.append(100.0 * (1.0 - evaluate(model, self.test_loader)["accuracy"]))
        self.units.append("-".join(str(k) for _, k, _ in sbp.kept_units(model)))
        try:
            small = sbp.prune(model, 1.0, example_input=self.example)
            self.flop_red.append(self.flops_full / count_flops(small, self.example[:1]))
        except ValueError:  # a layer fully pruned at this point of training
            self.flop_red.append(float("nan"))
        progress("sbp", f"{self.name} epoch {epoch + 1}: error {self.err[-1]:.2f} %, FLOP "
                 f"reduction {self.flop_red[-1]:.2f}x, units {self.units[-1]}")
        model.train()


def _units(model: torch.nn.Module, net: str) -> str:
    """Units per layer in the paper's notation (input features / channels, hidden units)."""
    kept = [str(k) for _, k, _ in sbp.kept_units(model)]
    # LeNet-500-300: input pixels - hidden1 - hidden2 - 10 outputs;
    # LeNet5: conv1 channels - conv2 channels - fc1 inputs (of 800) - fc1 outputs (of 500)
    return "-".join(kept + ["10"]) if net == "LeNet-500-300" else "-".join(kept)


def lr_factor(step: int, total: int, hold: float, floor: float) -> float:
    """Learning-rate multiplier: 1 for the first ``hold·total`` steps, then cosine to ``floor``.

    Example:
        >>> lr_factor(0, 100, 0.5, 0.01), lr_factor(100, 100, 0.5, 0.01)
        (1.0, 0.01)
    """
    if not isinstance(total, int) or total < 1:
        raise ValueError(f"total must be a positive int, got {total!r}")
    if not 0.0 <= hold <= 1.0 or not 0.0 <= floor <= 1.0:
        raise ValueError(f"hold and floor must lie in [0, 1], got {hold!r}, {floor!r}")
    start = hold * total
    if step <= start:
        return 1.0
    t = min(1.0, (step - start) / max(total - start, 1e-12))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def lr_lambdas(cfg: dict[str, Any], steps_per_epoch: int,
               n_groups: int) -> list[Callable[[int], float]]:
    """Per-group ``LambdaLR`` factors for the groups of :func:`param_groups` (weights first).

    Every group follows :func:`lr_factor` over ``cfg["sbp_epochs"]`` epochs. With the optional
    key ``sbp_freeze_epochs`` = k, the μ / log σ groups get factor 0 in the last k epochs: the
    kept units are then fixed, and the weights keep training under the (fixed) noise, so a unit
    cut late in the schedule does not leave the rest of the network without time to adapt.

    Example:
        >>> f = lr_lambdas({"sbp_epochs": 2, "hold": 0.5, "floor": 0.01,
        ...                 "sbp_freeze_epochs": 1}, steps_per_epoch=10, n_groups=2)
        >>> [round(g(15), 3) for g in f], [g(5) for g in f]
        ([0.505, 0.0], [1.0, 1.0])
    """
    epochs, freeze = cfg["sbp_epochs"], cfg.get("sbp_freeze_epochs", 0)
    if isinstance(freeze, bool) or not isinstance(freeze, int) or not 0 <= freeze < epochs:
        raise ValueError(f"sbp_freeze_epochs must be an int in [0, sbp_epochs={epochs}), "
                         f"got {freeze!r}")
    check_positive_int("steps_per_epoch", steps_per_epoch)
    check_positive_int("n_groups", n_groups)
    total = epochs * steps_per_epoch
    frozen_from = (epochs - freeze) * steps_per_epoch
    hold, floor = cfg.get("hold", 1.0), cfg.get("floor", 1.0)

    def weights(step: int) -> float:
        return lr_factor(step, total, hold, floor)

    def noise(step: int) -> float:
        return 0.0 if freeze and step >= frozen_from else weights(step)

    return [weights] + [noise] * (n_groups - 1)


def param_groups(noisy: torch.nn.Module, cfg: dict[str, Any],
                 example: torch.Tensor) -> list[dict[str, Any]]:
    """Adam parameter groups: weights at ``cfg["lr"]``, μ / log σ at ``cfg["sbp_lr"]``.

    With the optional key ``sbp_lr_linear``, the μ / log σ of SBP layers on *dense* features
    (input of shape ``(N, F)``: the units of linear layers and the flattened input features of
    the first dense layer) use that rate instead; those on conv channels keep ``sbp_lr``. Which
    layers are dense is found by one forward pass of ``example`` (no gradient). With the optional
    key ``sbp_lr_first``, the first SBP layer (LeNet5's conv1, whose channels cost the most
    latency per FLOP: the largest feature maps, each pooled) uses that rate instead.

    Example:
        >>> net = sbp.add_noise(LeNet5())
        >>> groups = param_groups(net, {"lr": 1e-2, "sbp_lr": 0.3, "sbp_lr_linear": 0.1},
        ...                       torch.zeros(1, 1, 28, 28))
        >>> [(len(g["params"]), g["lr"]) for g in groups]
        [(8, 0.01), (4, 0.3), (4, 0.1)]
        >>> groups = param_groups(net, {"lr": 1e-2, "sbp_lr": 0.3, "sbp_lr_first": 2.0},
        ...                       torch.zeros(1, 1, 28, 28))
        >>> [(len(g["params"]), g["lr"]) for g in groups]
        [(8, 0.01), (6, 0.3), (2, 2.0)]
    """
    layers = sbp.sbp_layers(noisy)
    lin_lr, first_lr = cfg.get("sbp_lr_linear"), cfg.get("sbp_lr_first")
    for key, value in (("sbp_lr_linear", lin_lr), ("sbp_lr_first", first_lr)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not value > 0):
            raise ValueError(f"{key} must be a positive number, got {value!r}")
    dense: set[int] = set()
    if lin_lr is not None:
        hooks = [m.register_forward_hook(
            lambda mod, inp, out: dense.add(id(mod)) if inp[0].dim() == 2 else None)
            for _, m in layers]
        was_training = noisy.training
        try:
            noisy.eval()
            with torch.no_grad():
                noisy(example)
        finally:
            noisy.train(was_training)
            for h in hooks:
                h.remove()
    first = {id(layers[0][1])} if first_lr is not None and layers else set()
    main_p = [p for _, m in layers if id(m) not in dense | first for p in (m.mu, m.log_sigma)]
    dense_p = [p for _, m in layers if id(m) in dense - first for p in (m.mu, m.log_sigma)]
    first_p = [p for _, m in layers if id(m) in first for p in (m.mu, m.log_sigma)]
    ids = {id(p) for p in main_p + dense_p + first_p}
    groups = [{"params": [p for p in noisy.parameters() if id(p) not in ids], "lr": cfg["lr"]}]
    for params, lr in ((main_p, cfg["sbp_lr"]), (dense_p, lin_lr), (first_p, first_lr)):
        if params:
            groups.append({"params": params, "lr": lr})
    return groups


def pretrain(model: torch.nn.Module, cfg: dict[str, Any], train: Any, seed: int) -> None:
    """The recipe's dense pretraining of ``model`` in place: Adam with a one-cycle lr
    (``cfg["pretrain_lr"]``, 15 % warm-up) for ``cfg["pretrain_epochs"]`` epochs on ``train``,
    shuffled with ``seed``.

    Example:
        >>> pretrain(LeNet500_300(), QUICK["LeNet-500-300"], train_set, seed=0)  # doctest: +SKIP
    """
    opt = torch.optim.Adam(model.parameters(), lr=cfg["pretrain_lr"])
    steps = cfg["pretrain_epochs"] * len(data.loader(train, BATCH))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["pretrain_lr"],
                                                total_steps=steps, pct_start=0.15)
    fit(model, data.loader(train, BATCH, shuffle=True, seed=seed), cfg["pretrain_epochs"], opt,
        sched, scheduler_step="batch", quiet=True)


def finetune_pruned(pruned: torch.nn.Module, cfg: dict[str, Any], train: Any,
                    seed: int) -> float:
    """Optional post-pruning fine-tune of the pruned plain network, in place; returns seconds.

    With ``cfg["post_epochs"]`` = k > 0, trains ``pruned`` for k epochs on ``train`` with
    cross-entropy only (no noise, no KL: the kept units are fixed, so its FLOPs and latency do
    not change), Adam at ``cfg["post_lr"]`` with a cosine to 0, shuffled with ``seed``. The
    paper does not do this; pruning toolkits do, to win back accuracy lost in pruning. For
    LeNet5 (3 epochs, lr 1e-3) it raised the validation error, so FULL leaves it off
    (docs/results.md, SBP round 5). Without the key (or with 0) nothing happens.

    Example:
        >>> finetune_pruned(net, {"post_epochs": 3, "post_lr": 1e-3}, data, 0)  # doctest: +SKIP
    """
    epochs = cfg.get("post_epochs", 0)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"post_epochs must be a non-negative int, got {epochs!r}")
    if not epochs:
        return 0.0
    lr = cfg.get("post_lr")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
        raise ValueError(f"post_lr must be a positive number when post_epochs > 0, got {lr!r}")
    loader = data.loader(train, BATCH, shuffle=True, seed=seed)
    opt = torch.optim.Adam(pruned.parameters(), lr=lr)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, 0.0, 0.0))
    t0 = time.perf_counter()
    fit(pruned, loader, epochs, opt, sched, scheduler_step="batch", quiet=True)
    pruned.eval()
    return time.perf_counter() - t0


def _train(name: str, cfg: dict[str, Any], seed: int, train: Any, eval_set: Any,
           threads: int | None = None) -> dict[str, Any]:
    """Pretrain + SBP fine-tune one network on ``train``; per-epoch error on ``eval_set``."""
    if threads is not None:
        torch.set_num_threads(threads)
    seed_everything(seed)
    eval_loader = data.loader(eval_set, 1000)
    model = NETS[name]()
    t0 = time.perf_counter()
    pretrain(model, cfg, train, seed)
    pre_s = time.perf_counter() - t0
    pre_err = 100.0 * (1.0 - evaluate(model, eval_loader)["accuracy"])
    pre_state = {k: v.clone() for k, v in model.state_dict().items()}
    progress("sbp", f"{name}: pretrained in {pre_s:.0f} s, error {pre_err:.2f} %")

    noisy = sbp.add_noise(model)
    n_train = len(train)
    example = eval_set.tensors[0][:256]
    opt = torch.optim.Adam(param_groups(noisy, cfg, example[:1]))
    train_loader = data.loader(train, BATCH, shuffle=True, seed=seed + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambdas(cfg, len(train_loader), len(opt.param_groups)))
    track = _Track(eval_loader, count_flops(model, example[:1]), example, name)

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sbp.sgvlb(logits, y, noisy, n_train) / n_train  # per-example SGVLB

    t0 = time.perf_counter()
    fit(noisy, train_loader, cfg["sbp_epochs"], opt, sched, scheduler_step="batch",
        loss_fn=loss_fn, callbacks=[_Clip(), track], quiet=True)
    return {"name": name, "pre_state": pre_state, "noisy_state": noisy.state_dict(),
            "pretrain_err": pre_err, "pretrain_s": pre_s, "sbp_s": time.perf_counter() - t0,
            "track": {"epochs": track.epochs, "err": track.err, "flop_red": track.flop_red,
                      "units": track.units}}


def validate(name: str, cfg: dict[str, Any] | None = None, seed: int = 0,
             n_val: int = 10000) -> dict[str, Any]:
    """Train ``name`` with ``cfg`` (default ``FULL[name]``) on MNIST-train minus ``n_val``
    held-out training images and report the validation error of the pruned network.

    This is how the hyper-parameters of ``FULL`` were chosen (never on the test set).

    Example:
        >>> r = validate("LeNet-500-300", QUICK["LeNet-500-300"])  # doctest: +SKIP
    """
    if name not in NETS:
        raise ValueError(f"unknown network {name!r}; expected one of {sorted(NETS)}")
    if isinstance(n_val, bool) or not isinstance(n_val, int) or not 0 < n_val < 60000:
        raise ValueError(f"n_val must be an int in (0, 60000), got {n_val!r}")
    cfg = dict(FULL[name] if cfg is None else cfg)
    train, _ = data.mnist()
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(1234))
    x, y = train.tensors
    val = torch.utils.data.TensorDataset(x[perm[:n_val]], y[perm[:n_val]])
    fit_set = torch.utils.data.TensorDataset(x[perm[n_val:]], y[perm[n_val:]])
    res = _train(name, cfg, seed, fit_set, val)
    out = {"name": name, "cfg": cfg, "n_val": n_val, "pretrain_val_err": res["pretrain_err"],
           "val_err": res["track"]["err"][-1] if res["track"]["err"] else res["pretrain_err"],
           "flop_reduction": res["track"]["flop_red"][-1] if res["track"]["flop_red"] else 1.0,
           "units": res["track"]["units"][-1] if res["track"]["units"] else "",
           "track": res["track"], "pretrain_s": res["pretrain_s"], "sbp_s": res["sbp_s"]}
    if cfg.get("post_epochs", 0):
        _, pruned = _noisy_and_pruned(res, val.tensors[0][:256])
        val_loader = data.loader(val, 1000)
        out["val_err_before_post"] = 100.0 * (1.0 - evaluate(pruned, val_loader)["accuracy"])
        out["post_s"] = finetune_pruned(pruned, cfg, fit_set, seed + 2)
        out["val_err"] = 100.0 * (1.0 - evaluate(pruned, val_loader)["accuracy"])
    return out


def _noisy_and_pruned(res: dict[str, Any],
                      example: torch.Tensor) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The trained SBP model of a :func:`_train` result (eval mode) and its pruned network."""
    noisy = sbp.add_noise(NETS[res["name"]]())
    noisy.load_state_dict(res["noisy_state"])
    noisy.eval()
    return noisy, sbp.prune(noisy, 1.0, example_input=example)


def _equality(noisy: torch.nn.Module, pruned: torch.nn.Module,
              example: torch.Tensor) -> dict[str, float]:
    """Max |pruned - eval-mode noisy| logit difference, in float32 and in float64.

    float32 differences of ~1e-5 at logits of ~40 are rounding (another summation order);
    pruning a float64 copy the same way shows that the transformation itself is exact.
    """
    noisy64 = copy.deepcopy(noisy).double()
    pruned64 = sbp.prune(noisy64, 1.0, example_input=example.double())
    with torch.no_grad():
        ref = noisy(example)
        ref64 = noisy64(example.double())
        return {"max_abs_diff_pruned_vs_eval": float((pruned(example) - ref).abs().max()),
                "max_abs_diff_pruned_vs_eval_float64":
                    float((pruned64(example.double()) - ref64).abs().max()),
                "max_abs_logit": float(ref.abs().max())}


def _finish(res: dict[str, Any], test: Any, repeats: int, out_dir: Path,
            cfg: dict[str, Any], train: Any, seed: int) -> dict[str, Any]:
    """Prune, optionally fine-tune the pruned network, evaluate, save and time one network."""
    name = res["name"]
    test_loader = data.loader(test, 1000)
    model = NETS[name]()
    model.load_state_dict(res["pre_state"])
    example = test.tensors[0][:256]
    noisy, pruned = _noisy_and_pruned(res, example)
    noisy_err = 100.0 * (1.0 - evaluate(noisy, test_loader)["accuracy"])
    pruned_err = 100.0 * (1.0 - evaluate(pruned, test_loader)["accuracy"])
    equality = _equality(noisy, pruned, example)  # before the optional fine-tune changes it
    post = {}
    if cfg.get("post_epochs", 0):
        post["err_before_post"] = pruned_err
        post["post_s"] = finetune_pruned(pruned, cfg, train, seed + 2)
        pruned_err = 100.0 * (1.0 - evaluate(pruned, test_loader)["accuracy"])
        progress("sbp", f"{name}: fine-tuned after pruning in {post['post_s']:.0f} s, error "
                 f"{post['err_before_post']:.2f} -> {pruned_err:.2f} %")
    slug = SLUGS[name]
    torch.save(model, out_dir / f"{slug}_pretrained.pt")
    torch.save(pruned, out_dir / f"{slug}_pruned.pt")
    speed = measure_speedup(model, pruned, INPUT_SHAPE, batch_sizes=(1, BATCH), threads=(1, 2),
                            repeats=repeats)
    out = {**res, "noisy_err": noisy_err, "pruned_err": pruned_err,
           "units": _units(noisy, name), "speed": speed, "pruned_repr": repr(pruned),
           **equality, **post}
    summary = {k: v for k, v in out.items() if k not in ("pre_state", "noisy_state")}
    (out_dir / f"{slug}_result.json").write_text(json.dumps(summary, indent=1, default=str))
    return out


# Every class the recipe's saved networks may contain (pretrained LeNets and their pruned
# Sequentials), so that they load with weights_only=True: no arbitrary code is unpickled.
_SAVED_CLASSES = [LeNet5, LeNet500_300, sbp.IndexSelect, sbp.ChannelScale, sbp.PositionBias,
                  torch.nn.Sequential, torch.nn.Conv2d, torch.nn.Linear, torch.nn.ReLU,
                  torch.nn.MaxPool2d, torch.nn.Flatten]


def load_network(path: str | Path) -> torch.nn.Module:
    """Load a network saved by :func:`run` (``<net>_pretrained.pt`` / ``<net>_pruned.pt``).

    Uses ``torch.load(weights_only=True)`` with only the layer classes these networks are made
    of allowed, so a file holding anything else is refused instead of unpickled.

    Example:
        >>> pruned = load_network("runs/sbp/lenet5_pruned.pt")  # doctest: +SKIP
    """
    with torch.serialization.safe_globals(_SAVED_CLASSES):
        model = torch.load(path, weights_only=True)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{path} does not hold an nn.Module but a {type(model).__name__}")
    return model.eval()


def _lr_overrides(cfg: dict[str, Any]) -> str:
    """The optional per-layer μ / log σ rates of ``cfg``, for the report's notes."""
    parts = [f"{label} {cfg[key]}" for key, label in (("sbp_lr_first", "first SBP layer"),
                                                      ("sbp_lr_linear", "dense layers"))
             if key in cfg]
    return f" ({', '.join(parts)})" if parts else ""


def _post_note(r: dict[str, Any], cfg: dict[str, Any]) -> str:
    """Report note on the optional post-pruning fine-tune of one network's result."""
    if "err_before_post" not in r:
        return ""
    return (f"; then the pruned network was fine-tuned ({cfg['post_epochs']} epochs, "
            f"cross-entropy, Adam lr {cfg['post_lr']} with a cosine to 0, {r['post_s']:.0f} s; "
            f"not in the paper): error {r['err_before_post']:.2f} -> {r['pruned_err']:.2f} %. "
            "The pruned-vs-eval differences above are measured before this fine-tune")


def _check_nets(nets: Sequence[str] | None) -> list[str]:
    """Validate a ``nets`` selection; ``None`` means every network, in the order of NETS."""
    if nets is None:
        return list(NETS)
    if isinstance(nets, str) or not all(isinstance(n, str) for n in nets):
        raise TypeError(f"nets must be a sequence of network names, got {nets!r}")
    unknown = [n for n in nets if n not in NETS]
    if unknown or not nets:
        raise ValueError(f"nets must name one or more of {list(NETS)}, got {list(nets)!r}")
    return [n for n in NETS if n in nets]


def run(out_dir: Path, quick: bool = False, seed: int = 0,
        nets: Sequence[str] | None = None,
        configs: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Pretrain, SBP fine-tune and prune the MNIST networks; returns the report dict.

    ``nets`` restricts the run to some of the networks (names of ``NETS``, default all); use
    :func:`merge_results` to combine such a partial report with an earlier one. ``configs``
    maps network names to the configuration to run instead of ``FULL`` / ``QUICK`` (a
    candidate, e.g. from :func:`with_overrides`); the report's config records what ran.

    Example:
        >>> report = run(Path("runs/sbp"), quick=True, nets=["LeNet5-Caffe"])  # doctest: +SKIP
        >>> report["headline"]["LeNet5-Caffe"]["flop_reduction"]  # doctest: +SKIP
    """
    names = _check_nets(nets)
    configs = {} if configs is None else configs
    if not isinstance(configs, dict) or not set(configs) <= set(names):
        raise ValueError(f"configs must be a dict keyed by networks of this run {names}, "
                         f"got {configs!r}")
    out_dir = Path(out_dir)
    cfgs = {n: configs.get(n, (QUICK if quick else FULL)[n]) for n in names}
    repeats = 5 if quick else 30
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = data.mnist()
    if quick:
        train = data.subset(train, 10000, seed=seed)
    # one network after the other, each trained, pruned, saved and timed before the next
    results = [_finish(_train(n, cfgs[n], seed, train, test), test, repeats, out_dir,
                       cfgs[n], train, seed) for n in names]
    plots.line_plot({r["name"]: (r["track"]["epochs"], r["track"]["flop_red"]) for r in results},
                    out_dir / "flop_reduction.png", xlabel="SBP epoch",
                    ylabel="FLOP reduction (x)", title="SBP: FLOP reduction during fine-tuning")
    plots.line_plot({r["name"]: (r["track"]["epochs"], r["track"]["err"]) for r in results},
                    out_dir / "test_error.png", xlabel="SBP epoch", ylabel="test error (%)",
                    title="SBP: test error (eval mode) during fine-tuning")

    def speed_row(r: dict[str, Any], threads: int, batch: int) -> dict[str, Any]:
        return next(x for x in r["speed"]["rows"] if x["threads"] == threads
                    and x["batch"] == batch)

    main_rows, speed_rows = [], []
    for r in results:
        p = PAPER[r["name"]]
        s2, s1 = speed_row(r, 2, BATCH), speed_row(r, 1, BATCH)
        main_rows.append([r["name"], "original (ours)", round(r["pretrain_err"], 2),
                          p["orig_units"], 1.0, 1.0, 1.0])
        if "err_before_post" in r:
            main_rows.append([r["name"], "SBP, before the post-pruning fine-tune (ours)",
                              round(r["err_before_post"], 2), r["units"],
                              round(r["speed"]["flop_reduction"], 2), "-", "-"])
        main_rows.append([r["name"], "SBP (ours)", round(r["pruned_err"], 2), r["units"],
                          round(r["speed"]["flop_reduction"], 2), round(s2["speedup"], 2),
                          round(s1["speedup"], 2)])
        main_rows.append([r["name"], "original (paper)", p["orig_err"], p["orig_units"],
                          1.0, 1.0, "-"])
        main_rows.append([r["name"], "SBP (paper)", p["err"], p["units"], p["flops"],
                          p["speedup"], "-"])
        for x in r["speed"]["rows"]:
            speed_rows.append([r["name"], x["threads"], x["batch"], round(x["original_ms"], 3),
                               round(x["pruned_ms"], 3), round(x["speedup"], 2),
                               f"{x['speedup_min']:.2f}-{x['speedup_max']:.2f}",
                               round(x["speedup_of_minima"], 2)])
    traj_rows = [[r["name"], e, round(err, 2), round(fr, 2), u]
                 for r in results for e, err, fr, u in zip(
                     r["track"]["epochs"], r["track"]["err"], r["track"]["flop_red"],
                     r["track"]["units"], strict=True)]
    notes = [
        "Error = test error (%) of the pruned network (it equals the noisy model's eval-mode "
        "error; max |pruned - eval| logits difference in float32 / in float64, "
        "the float64 copy pruned the same way, at max |logit|: "
        + ", ".join(f"{r['name']} {r['max_abs_diff_pruned_vs_eval']:.1e} / "
                    f"{r.get('max_abs_diff_pruned_vs_eval_float64', float('nan')):.1e} at "
                    f"{r.get('max_abs_logit', float('nan')):.1f}" for r in results)
        + "; the float32 difference is rounding).",
        "FLOPs: torch.utils.flop_counter (conv + matmul, 2 per MAC), per example. Speed-up: "
        "median CPU latency of the pretrained network / the pruned one, interleaved repeats, "
        "torch.inference_mode, fp32, NCHW; the paper's speed-up column is its own CPU timing.",
        "Units: LeNet-500-300 = input pixels kept - hidden1 - hidden2 - 10; LeNet5 = conv1 "
        "channels - conv2 channels - fc1 inputs (of 800) - fc1 outputs (of 500).",
        "Deviation from the paper: mu/log_sigma use Adam lr "
        + ", ".join(f"{n} {c['sbp_lr']}" + _lr_overrides(c) + f" (weights {c['lr']})"
                    for n, c in cfgs.items())
        + " so that pruning converges in the time budget; the paper fine-tunes longer at lr "
        "1e-3. All learning rates are held for the first `hold` fraction of the SBP steps, "
        "then decay with a cosine to `floor` times their value (config below).",
    ] + [f"{r['name']}: pretrain {r['pretrain_s']:.0f} s, SBP fine-tune {r['sbp_s']:.0f} s, "
         f"noisy eval-mode error {r['noisy_err']:.2f} %" + _post_note(r, cfgs[r["name"]])
         for r in results]
    return {
        "title": "Structured Bayesian Pruning on MNIST",
        "tables": [
            {"title": "Error, units per layer, FLOP reduction and CPU speed-up (batch 100)",
             "columns": ["network", "model", "error %", "units", "FLOP reduction",
                         "speed-up 2 thr", "speed-up 1 thr"],
             "rows": main_rows},
            {"title": "Measured CPU latency (median ms per batch)",
             "columns": ["network", "threads", "batch", "original ms", "pruned ms", "speed-up",
                         "speed-up range", "speed-up of minima"],
             "rows": speed_rows},
            {"title": "SBP fine-tuning trajectory (eval-mode error, FLOP reduction, SBP units)",
             "columns": ["network", "epoch", "error %", "FLOP reduction", "kept per SBP layer"],
             "rows": traj_rows},
        ],
        "figures": [
            {"path": "flop_reduction.png", "caption": "FLOP reduction of the pruned network "
                                                      "after each SBP epoch"},
            {"path": "test_error.png", "caption": "Test error of the SBP model (eval mode) "
                                                  "after each SBP epoch"},
        ],
        "notes": notes,
        "headline": {
            f"{r['name']}": {"error": r["pruned_err"], "flop_reduction":
                             r["speed"]["flop_reduction"],
                             "speedup_b100_2thr": speed_row(r, 2, BATCH)["speedup"],
                             "speedup_b100_1thr": speed_row(r, 1, BATCH)["speedup"],
                             "speedup_of_minima_b100_1thr":
                                 speed_row(r, 1, BATCH)["speedup_of_minima"],
                             "units": r["units"],
                             **({"error_before_post": r["err_before_post"]}
                                if "err_before_post" in r else {})}
            for r in results},
        "config": {"quick": quick, "seed": seed, "batch_size": BATCH, "nets": cfgs,
                   "pruned_models": {r["name"]: r["pruned_repr"] for r in results}},
    }


def merge_results(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Combine a report of :func:`run` on some networks (``new``) with an earlier one (``base``).

    Networks that ``new`` ran replace those of ``base``; the others (table rows, headline,
    config, pruned models, per-network notes) are copied from ``base`` and listed under
    ``merged_from_earlier_run``. Both reports must come from the same mode (quick or full)
    and seed. The figures stay those of ``new`` (its networks only).

    Example:
        >>> merged = merge_results(old_report, lenet5_only_report)  # doctest: +SKIP
    """
    for name, rep in (("base", base), ("new", new)):
        if not isinstance(rep, dict) or not {"tables", "headline", "config", "notes"} <= set(rep):
            raise TypeError(f"{name} must be a report dict of sbp.run, got {type(rep).__name__}")
    for key in ("quick", "seed"):
        if base["config"].get(key) != new["config"].get(key):
            raise ValueError(f"cannot merge reports with different {key!r}: "
                             f"{base['config'].get(key)!r} vs {new['config'].get(key)!r}")
    if [t["title"] for t in base["tables"]] != [t["title"] for t in new["tables"]]:
        raise ValueError("cannot merge reports whose tables differ")
    kept = [n for n in base["headline"] if n not in new["headline"]]
    order = {n: i for i, n in enumerate(NETS)}
    out = json.loads(json.dumps(new, default=str))
    for t_out, t_base in zip(out["tables"], base["tables"], strict=True):
        rows = [r for r in t_base["rows"] if r[0] in kept] + t_out["rows"]
        t_out["rows"] = sorted(rows, key=lambda r: order.get(r[0], len(order)))
    for key, src_out, src_base in (
            ("headline", out, base), ("nets", out["config"], base["config"]),
            ("pruned_models", out["config"], base["config"])):
        merged = {**{n: src_base[key][n] for n in kept if n in src_base.get(key, {})},
                  **src_out.get(key, {})}
        src_out[key] = dict(sorted(merged.items(), key=lambda kv: order.get(kv[0], len(order))))
    out["notes"] = out["notes"] + [
        f"{n}: copied from an earlier run of this recipe (same mode and seed); "
        + " ".join(x for x in base["notes"] if x.startswith(f"{n}:")) for n in kept]
    out["merged_from_earlier_run"] = kept
    return out
