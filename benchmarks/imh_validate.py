"""Validation-only exploration behind the ``imh`` recipe's choices (no test data anywhere).

Two parts, the tidied form of the ad-hoc scripts that chose the recipe's discriminators on
2026-11-24 (05:00-05:30 UTC; their figures are in docs/results.md, issue 8):

* ``toy``: the 25-Gaussian grid. A GAN is trained as in the recipe; TV distance (0.1-wide
  histogram bins) of the chain's samples against a held-out draw of 200k target points.
  ``toy ind`` varies the independent sampler's discriminator (steps, widths; isotonic
  calibration), ``toy markov --scales 0.1,0.3`` the Markov (random-walk) sampler's pair
  discriminator.
* ``mnist --seed S --cands gan,ft,fresh_do``: the MNIST GAN (5 epochs) on 50k training images;
  5k further *training* images are the validation reference for a Frechet distance in the
  LeNet5 feature space (``bdlkit.metrics``), 5k more calibrate the discriminator. Candidates:
  the GAN's own discriminator (``gan``, the recipe's choice), the GAN discriminator fine-tuned
  against the frozen generator (``ft``, ``ft_wd``) and a fresh dropout MLP (``fresh_do``), each
  with logistic and isotonic calibration.

``--budget`` scales every step/epoch count (1.0 = the original runs; use e.g. 0.05 for a smoke
run). Run: ``python benchmarks/imh_validate.py toy ind`` (about 7 min at 1 thread).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch

from bdlkit import data
from bdlkit.generative.gan import (
    MLPDiscriminator,
    generate,
    grid_gaussians,
    mnist_gan,
    toy_gan,
    train_gan,
)
from bdlkit.generative.imh import (
    ImplicitMH,
    PairDiscriminator,
    calibrate_discriminator,
    discriminator_loss,
    random_walk_proposal,
    train_discriminator,
    train_pair_discriminator,
)
from bdlkit.metrics import MNISTFeatures, frechet_distance
from bdlkit.train import seed_everything


def _hist(x: torch.Tensor, width: float = 0.1, lo: float = -5.5, hi: float = 5.5
          ) -> torch.Tensor:
    """Normalised 2-D histogram; the last cell collects every point outside the box."""
    nb = int(round((hi - lo) / width))
    xd = x.double()
    ix = torch.floor((xd[:, 0] - lo) / width).long()
    iy = torch.floor((xd[:, 1] - lo) / width).long()
    inside = (ix >= 0) & (ix < nb) & (iy >= 0) & (iy < nb)
    cells = torch.where(inside, ix * nb + iy, torch.full_like(ix, nb * nb))
    h = torch.zeros(nb * nb + 1, dtype=torch.float64)
    h.index_add_(0, cells, torch.ones(len(x), dtype=torch.float64))
    return h / len(x)


def _steps(n: int, budget: float) -> int:
    return max(1, int(round(n * budget)))


def toy(args: argparse.Namespace) -> None:
    t0 = time.time()
    seed_everything(0)
    g, d = toy_gan(latent_dim=2)
    train_gan(g, d, grid_gaussians, steps=_steps(2000, args.budget), batch_size=256, lr=1e-3)

    def gen(k: int) -> torch.Tensor:
        return generate(g, k)

    val_real, val_fake = grid_gaussians(5000), gen(5000)
    ref = _hist(grid_gaussians(200000, generator=torch.Generator().manual_seed(999)))

    def val_tv(x: torch.Tensor) -> float:
        return round(0.5 * float((_hist(x) - ref).abs().sum()), 3)

    n = 10000
    print(f"generator valTV {val_tv(gen(n))}, target sample valTV {val_tv(grid_gaussians(n))}",
          flush=True)
    if args.sampler == "ind":
        for steps, hidden in ((2000, (256, 256)), (6000, (256, 256)), (6000, (512, 512))):
            seed_everything(1)
            disc = MLPDiscriminator((2,), hidden)
            kw = {"batch_size": 512, "val_real": val_real, "val_fake": val_fake,
                  "val_every": 250}
            h1 = train_discriminator(disc, grid_gaussians, gen, steps=_steps(steps, args.budget),
                                     lr=1e-3, **kw)
            h2 = train_discriminator(disc, grid_gaussians, gen,
                                     steps=_steps(steps // 3, args.budget), lr=1e-4, **kw)
            cal = calibrate_discriminator(disc, grid_gaussians(5000), gen(5000), "isotonic")
            res = ImplicitMH(cal, gen).run(gen(n), n_steps=1000, thin=100)
            print(steps, hidden, "val BCE", round(min(h1["val_loss"]), 4),
                  round(min(h2["val_loss"]), 4), "acceptance",
                  round(float(res.acceptance.mean()), 3), "valTV at steps 0..1000 by 100:",
                  [val_tv(s) for s in res.samples], f"t={time.time() - t0:.0f}s", flush=True)
        return
    for scale in args.scales:
        seed_everything(2)
        walk = random_walk_proposal(scale)
        pair = PairDiscriminator((2,), (256, 256))
        for steps in (3000, 5000):  # cumulative: 3000 steps, then 5000 more
            h = train_pair_discriminator(pair, grid_gaussians, walk,
                                         steps=_steps(steps, args.budget), batch_size=512,
                                         lr=1e-3, val_real=val_real, val_every=250)
            res = ImplicitMH(pair, walk, markov=True).run(gen(n), n_steps=600, thin=100)
            print(scale, steps, "val pair loss", round(min(h["val_loss"]), 4), "acceptance",
                  round(float(res.acceptance.mean()), 3), "valTV at steps 0..600 by 100:",
                  [val_tv(s) for s in res.samples], f"t={time.time() - t0:.0f}s", flush=True)


def mnist(args: argparse.Namespace) -> None:
    train, _ = data.mnist()
    x_all = train.tensors[0]
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(1234))
    val_x, cal_x, train_x = x_all[perm[:5000]], x_all[perm[5000:10000]], x_all[perm[10000:]]
    ext = MNISTFeatures.pretrained()
    ref = ext.features(torch.cat([val_x, cal_x]))
    t0 = time.time()
    seed_everything(args.seed)
    g, d = mnist_gan(latent_dim=64)
    loader = data.loader(torch.utils.data.TensorDataset(train_x), 128, shuffle=True,
                         seed=args.seed)
    train_gan(g, d, loader, epochs=max(1, round(5 * args.budget)))
    print(f"GAN trained in {time.time() - t0:.0f}s", flush=True)

    def gen(k: int) -> torch.Tensor:
        return generate(g, k)

    def real(k: int) -> torch.Tensor:
        return train_x[torch.randint(len(train_x), (k,))]

    def val_fid(xs: torch.Tensor) -> float:
        return round(frechet_distance(ext.features(xs), ref), 2)

    n = 5000
    torch.manual_seed(100 + args.seed)
    print(f"seed {args.seed} generator valFID {val_fid(gen(n))}", flush=True)
    cands: dict[str, Callable[[], tuple[torch.nn.Module, dict[str, float]]]] = {
        "ft": lambda: (copy.deepcopy(d), {"steps": 2000, "lr": 2e-4}),
        "ft_wd": lambda: (copy.deepcopy(d), {"steps": 2000, "lr": 2e-4, "weight_decay": 1e-2}),
        "fresh_do": lambda: (MLPDiscriminator((1, 28, 28), (512, 256), dropout=0.5),
                             {"steps": 3000, "lr": 2e-4, "weight_decay": 1e-4}),
    }
    for name in args.cands:
        torch.manual_seed(1000 + args.seed)
        if name == "gan":
            disc = copy.deepcopy(d).eval()
            print(name, "val BCE", round(discriminator_loss(disc, val_x, gen(len(val_x)))[0], 4),
                  flush=True)
        else:
            disc, kw = cands[name]()
            kw["steps"] = _steps(int(kw["steps"]), args.budget)
            h = train_discriminator(disc, real, gen, batch_size=128, val_real=val_x,
                                    val_fake=gen(len(val_x)), val_every=100, **kw)
            best = min(range(len(h["val_loss"])), key=lambda i: h["val_loss"][i])
            print(name, "best val BCE", round(h["val_loss"][best], 4), "at step",
                  h["step"][best], flush=True)
        for method in ("logistic", "isotonic"):
            cal = calibrate_discriminator(disc, cal_x, gen(len(cal_x)), method=method)
            res = ImplicitMH(cal, gen).run(gen(n), n_steps=100, thin=10)
            print("  ", name, method, "acceptance", round(float(res.acceptance.mean()), 3),
                  "valFID at steps 0, 10, 20, 50, 100:",
                  [val_fid(res.samples[i]) for i in (0, 1, 2, 5, 10)],
                  f"t={time.time() - t0:.0f}s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="part", required=True)
    t = sub.add_parser("toy")
    t.add_argument("sampler", choices=("ind", "markov"))
    t.add_argument("--scales", type=lambda s: [float(v) for v in s.split(",")], default=[0.1])
    m = sub.add_parser("mnist")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--cands", type=lambda s: s.split(","), default=["gan", "ft", "fresh_do"])
    for p in (t, m):
        p.add_argument("--budget", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    (toy if args.part == "toy" else mnist)(args)


if __name__ == "__main__":
    main()
