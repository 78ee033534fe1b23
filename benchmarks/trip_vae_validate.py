"""Choose the TRIP-VAE setting on a validation split of MNIST-train (never the test set).

The training images are split by a fixed permutation (seed 1234): 10000 validation images and
50000 for training. Every run trains the recipe's VAE (``bdlkit.experiments.trip.VAE_FULL``
with the ``--set`` overrides) on the 50000 images and reports ELBO and IW-NLL on a fixed
binarisation of ``--val-points`` validation images. One JSON line per run is appended to
``--out`` so that a sweep can be run one setting after the other and compared afterwards.

Run:  chrt --idle 0 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trip_vae_validate.py \\
          --prior trip --set trip_rank=32 --set prior_lr=3e-3 --out /tmp/tripval/runs.jsonl
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from pathlib import Path
from typing import Any

import torch

from bdlkit import data
from bdlkit.experiments.trip import (
    PRIORS,
    VAE_FULL,
    _make_prior,
    prior_init_epoch_for,
    prior_lr_for,
)
from bdlkit.generative.vae import VAE, evaluate_vae, fit_vae
from bdlkit.train import seed_everything


def split(n_val: int = 10000) -> tuple[torch.Tensor, torch.Tensor]:
    """(training images, validation images) of MNIST-train, flattened, permutation seed 1234."""
    train, _ = data.mnist()
    x = train.tensors[0].reshape(-1, 784)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1234))
    return x[perm[n_val:]], x[perm[:n_val]]


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in VAE_FULL:
            raise ValueError(f"--set expects KEY=VALUE with KEY in VAE_FULL, got {item!r}")
        out[key] = ast.literal_eval(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", choices=PRIORS, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--val-points", type=int, default=500)
    ap.add_argument("--k", type=int, default=1000, help="IW samples on the validation images")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cfg = {**VAE_FULL, **_parse_set(args.set)}
    train_x, val_x = split()
    val_x = val_x[: args.val_points]
    seed_everything(args.seed, deterministic=False)
    vae = VAE(cfg["latent_dim"], _make_prior(args.prior, cfg), hidden=tuple(cfg["hidden"]))
    start = time.perf_counter()
    hist = fit_vae(vae, train_x, cfg["epochs"], lr=cfg["lr"],
                   prior_lr=prior_lr_for(args.prior, cfg),
                   batch_size=cfg["batch_size"],
                   prior_init_epoch=prior_init_epoch_for(args.prior, cfg), seed=args.seed,
                   log=lambda m: print(f"[{args.prior} {args.set}] {m}", flush=True),
                   lr_schedule=cfg["lr_schedule"])
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluate_vae(vae, val_x, k=args.k, seed=args.seed)
    eval_s = time.perf_counter() - start
    row = {"prior": args.prior, "seed": args.seed, "set": args.set, "val_points": args.val_points,
           "k": args.k, **metrics, "train_elbo": hist["train_elbo"], "train_s": train_s,
           "eval_s": eval_s, "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
