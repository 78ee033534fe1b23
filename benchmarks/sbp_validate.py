"""Hyper-parameter check for the ``sbp`` recipe on a validation split of MNIST-train.

Trains one network with the recipe's ``FULL`` config (or overrides) on 50000 training images
and reports the eval-mode error of the SBP model on the 10000 held-out training images after
every epoch, with the FLOP reduction; the test set is never touched.

Run:  chrt --idle 0 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sbp_validate.py \\
          LeNet-500-300 [--set sbp_epochs=36 --set hold=0.5] [--out result.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from bdlkit.experiments import sbp as recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("net", choices=sorted(recipe.NETS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one FULL config entry (numbers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        cfg = recipe.with_overrides(recipe.FULL[args.net], args.set)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    res = recipe.validate(args.net, cfg, seed=args.seed)
    print(json.dumps({k: v for k, v in res.items() if k != "track"}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
