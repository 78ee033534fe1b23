"""Cheap exploration of the LeNet5 SBP fine-tuning on the validation split (why conv1 stays).

Same split as :func:`bdlkit.experiments.sbp.validate` (50000 training / 10000 validation images
of MNIST-train, permutation seed 1234); the test set is never touched. The pretrained network
(the recipe's pretraining, ``pretrain_epochs`` / ``pretrain_lr``) is cached in ``--cache`` so
that several fine-tuning settings can start from the same weights. Every ``--log-every``
steps it prints the kept units per SBP layer and the sorted SNRs of conv1; after every epoch
the validation error and the FLOP reduction of the pruned network.

For diagnosis only: to choose a ``FULL`` configuration use ``benchmarks/sbp_validate.py`` (the
recipe's own :func:`~bdlkit.experiments.sbp.validate`). This script re-implements the set-up, and
its SBP-phase noise draws differ from the recipe's (docs/results.md, SBP, fifth session).

Run:  chrt --idle 0 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sbp_lenet5_explore.py \\
          --set lr=3e-3 --set sbp_lr=0.1 --set sbp_epochs=6 --set hold=1 [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bdlkit import data
from bdlkit.compress import sbp
from bdlkit.compress.speed import count_flops
from bdlkit.experiments import sbp as recipe
from bdlkit.train import evaluate, fit, seed_everything

NET = "LeNet5-Caffe"


def split(n_val: int = 10000) -> tuple[Any, Any]:
    """The validation split of :func:`bdlkit.experiments.sbp.validate`."""
    train, _ = data.mnist()
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(1234))
    x, y = train.tensors
    val = torch.utils.data.TensorDataset(x[perm[:n_val]], y[perm[:n_val]])
    fit_set = torch.utils.data.TensorDataset(x[perm[n_val:]], y[perm[n_val:]])
    return fit_set, val


def pretrained(cfg: dict[str, Any], seed: int, train: Any, cache: Path) -> torch.nn.Module:
    """The recipe's pretraining (Adam one-cycle), cached on disk.

    The network is built after seeding, as in the recipe's ``_train``. (Until 2026-11-24
    13:50 UTC it was built before, so every seed started from the same initial weights; those
    caches lack the ``_seeded`` suffix and are not reused.)
    """
    seed_everything(seed)
    model = recipe.NETS[NET]()
    path = cache / (f"lenet5_pre_e{cfg['pretrain_epochs']}_lr{cfg['pretrain_lr']}"
                    f"_s{seed}_seeded.pt")
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    recipe.pretrain(model, cfg, train, seed)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


class _Log:
    """Callback: clip after each step, log conv1 SNRs every ``every`` steps, track epochs."""

    def __init__(self, every: int, val_loader: Any, example: torch.Tensor, flops: int) -> None:
        self.every, self.val_loader, self.example, self.flops = every, val_loader, example, flops
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()

    def on_batch_end(self, model: torch.nn.Module, step: int, loss: float) -> None:
        sbp.clip_(model)
        if step % self.every == 0:
            layer = sbp.sbp_layers(model)[0][1]
            snr = sorted(round(float(s), 2) for s in layer.snr().detach())
            units = "-".join(str(k) for _, k, _ in sbp.kept_units(model))
            print(f"  step {step}: loss {loss:.4f} units {units} conv1 SNR {snr[:4]}...{snr[-8:]}",
                  flush=True)

    def on_epoch_end(self, model: torch.nn.Module, epoch: int) -> None:
        err = 100.0 * (1.0 - evaluate(model, self.val_loader)["accuracy"])
        units = "-".join(str(k) for _, k, _ in sbp.kept_units(model))
        try:
            red = self.flops / count_flops(sbp.prune(model, 1.0, example_input=self.example),
                                           self.example[:1])
        except ValueError:
            red = float("nan")
        self.rows.append({"epoch": epoch + 1, "val_err": err, "flop_red": red, "units": units,
                          "t": time.perf_counter() - self.t0})
        print(f"epoch {epoch + 1}: val error {err:.2f} %, FLOP reduction {red:.2f}x, units "
              f"{units} ({time.perf_counter() - self.t0:.0f} s)", flush=True)
        model.train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/sbp5"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        cfg: dict[str, Any] = recipe.with_overrides(recipe.FULL[NET], args.set)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    train, val = split()
    model = pretrained(cfg, args.seed, train, args.cache)
    val_loader = data.loader(val, 1000)
    pre_err = 100.0 * (1.0 - evaluate(model, val_loader)["accuracy"])
    print(f"cfg {cfg} beta1 {args.beta1}; pretrained val error {pre_err:.2f} %", flush=True)
    seed_everything(args.seed + 1)
    noisy = sbp.add_noise(model)
    opt = torch.optim.Adam(recipe.param_groups(noisy, cfg, val.tensors[0][:1]),
                           betas=(args.beta1, 0.999))
    loader = data.loader(train, recipe.BATCH, shuffle=True, seed=args.seed + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, recipe.lr_lambdas(cfg, len(loader), len(opt.param_groups)))
    example = val.tensors[0][:256]
    log = _Log(args.log_every, val_loader, example, count_flops(model, example[:1]))
    n_train = len(train)

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sbp.sgvlb(logits, y, noisy, n_train) / n_train

    fit(noisy, loader, cfg["sbp_epochs"], opt, sched, scheduler_step="batch", loss_fn=loss_fn,
        callbacks=[log], quiet=True)
    if args.out:
        args.out.write_text(json.dumps({"cfg": cfg, "beta1": args.beta1, "seed": args.seed,
                                        "pretrain_val_err": pre_err, "epochs": log.rows},
                                       indent=1))


if __name__ == "__main__":
    main()
