"""Recipe ``imh``: implicit Metropolis-Hastings on the 25-Gaussian grid and on MNIST.

(a) 2-D: target = 25 Gaussians on {-4,-2,0,2,4}^2 (std 0.05); imperfect generator = a briefly
trained MLP GAN. Compared: raw generator samples, DRS, iMH with the generator as independent
proposal (fresh density-ratio discriminator), iMH with a Gaussian random-walk Markov proposal
(pair discriminator trained with the paper's pair loss, chains started at generator samples),
and the random walk without accept/reject. Metrics: % high-quality samples (within 4 std of a
mode), modes covered, histogram TV distance to the exact target bin probabilities.

(b) MNIST: a small MLP GAN per seed; as in MH-GAN the GAN's own discriminator (not fine-tuned:
fine-tuning it against the frozen generator made it separate real from generated images almost
perfectly, which ruins the ratio estimate) is calibrated on a held-out split; the calibration
(logistic or isotonic) is chosen per seed by the validation FID of short iMH runs against
held-out *training* images, never the test set. Compared: raw generator, DRS, iMH with
independent proposals (image space) and iMH with a Markov proposal in latent space (pCN random
walk through the generator), by MNIST-FID (LeNet5 fc1 features) against the test set, mean +-
std over seeds.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from .. import data, plots
from ..generative.gan import (
    MLPDiscriminator,
    generate,
    grid_gaussians,
    grid_means,
    mnist_gan,
    toy_gan,
    train_gan,
)
from ..generative.imh import (
    ImplicitMH,
    PairDiscriminator,
    calibrate_discriminator,
    discriminator_loss,
    discriminator_rejection_sampling,
    pcn_proposal,
    random_walk_proposal,
    train_discriminator,
    train_pair_discriminator,
)
from ..metrics import MNISTFeatures, frechet_distance
from ..train import seed_everything

STD = 0.05
GRID_LEVELS = (-4.0, -2.0, 0.0, 2.0, 4.0)


# ------------------------------------------------------------------------------------------
# 2-D metrics
# ------------------------------------------------------------------------------------------


def _target_bin_probs(lo: float, width: float, nb: int) -> torch.Tensor:
    """Exact probability of each (nb x nb) histogram bin under the grid mixture."""
    edges = lo + width * torch.arange(nb + 1, dtype=torch.float64)
    mus = torch.tensor(GRID_LEVELS, dtype=torch.float64)
    cdf = torch.special.ndtr((edges[None, :] - mus[:, None]) / STD)
    pm = cdf[:, 1:] - cdf[:, :-1]  # (5, nb): mass of each 1-D Gaussian per bin
    return torch.einsum("ia,jb->ab", pm, pm) / len(GRID_LEVELS) ** 2


def hist_tv(x: torch.Tensor, width: float = 0.1, lo: float = -5.5, hi: float = 5.5) -> float:
    """TV distance between the histogram of ``x`` and the exact target bin probabilities.

    Everything outside ``[lo, hi]^2`` is one extra bin.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> exact = grid_means().repeat(400, 1) + STD * torch.randn(10000, 2, generator=g)
        >>> hist_tv(exact, width=0.5, lo=-5.25, hi=5.25) < 0.05
        True
    """
    nb = int(round((hi - lo) / width))
    P = _target_bin_probs(lo, width, nb).reshape(-1)
    xd = x.double()
    ix = torch.floor((xd[:, 0] - lo) / width).long()
    iy = torch.floor((xd[:, 1] - lo) / width).long()
    inside = (ix >= 0) & (ix < nb) & (iy >= 0) & (iy < nb)
    H = torch.zeros(nb * nb, dtype=torch.float64)
    ones = torch.ones(int(inside.sum()), dtype=torch.float64)
    H.index_add_(0, ix[inside] * nb + iy[inside], ones)
    H /= len(x)
    out_emp = 1.0 - float(inside.double().mean())
    out_tgt = 1.0 - float(P.sum())
    return 0.5 * (float((H - P).abs().sum()) + abs(out_emp - out_tgt))


def grid_metrics(x: torch.Tensor) -> dict[str, float]:
    """% high quality (within 4 std of a mode), modes covered, fine and coarse histogram TV.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = grid_means().repeat(40, 1) + STD * torch.randn(1000, 2, generator=g)
        >>> m = grid_metrics(x)
        >>> m["modes"], m["hq_pct"] > 99
        (25, True)
    """
    m = grid_means()
    d = torch.cdist(x.float(), m).min(1)
    hq = d.values < 4 * STD
    counts = torch.bincount(d.indices[hq], minlength=len(m))
    covered = int((counts >= 0.1 * len(x) / len(m)).sum())
    return {
        "hq_pct": 100.0 * float(hq.float().mean()),
        "modes": covered,
        "tv": hist_tv(x, width=0.1),
        "tv_coarse": hist_tv(x, width=0.5, lo=-5.25, hi=5.25),
    }


def _run_2d(out_dir: Path, quick: bool, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg = {
        "gan_steps": 300 if quick else 2000,
        "gan_lr": 1e-3,
        "disc_steps": 400 if quick else 6000,
        "pair_steps": 400 if quick else 8000,
        "n_chains": 2000 if quick else 10000,
        "mh_steps": 50 if quick else 200,
        "rw_scale": 0.1,
        "batch_size": 256,
        "disc_batch": 512,
        "calibration": "isotonic",
    }
    seed_everything(seed)
    t0 = time.perf_counter()
    G, D = toy_gan(latent_dim=2)
    train_gan(G, D, grid_gaussians, steps=cfg["gan_steps"], batch_size=cfg["batch_size"],
              lr=cfg["gan_lr"])
    n = cfg["n_chains"]

    def gen(k: int) -> torch.Tensor:
        return generate(G, k)  # type: ignore[return-value]

    val_real, val_fake = grid_gaussians(5000), gen(5000)
    Dr = MLPDiscriminator((2,), (256, 256))
    kw = {"batch_size": cfg["disc_batch"], "val_real": val_real, "val_fake": val_fake,
          "val_every": 250}
    train_discriminator(Dr, grid_gaussians, gen, steps=cfg["disc_steps"], lr=1e-3, **kw)
    h_ind = train_discriminator(Dr, grid_gaussians, gen, steps=max(1, cfg["disc_steps"] // 3),
                                lr=1e-4, **kw)
    # MH-GAN: calibrate on a separate held-out split; DRS gets the same calibrated ratio.
    disc = calibrate_discriminator(Dr, grid_gaussians(5000), gen(5000), cfg["calibration"])
    rw = random_walk_proposal(cfg["rw_scale"])
    fpair = PairDiscriminator((2,), (256, 256))
    h_pair = train_pair_discriminator(fpair, grid_gaussians, rw, steps=cfg["pair_steps"],
                                      batch_size=cfg["disc_batch"], lr=1e-3, val_real=val_real,
                                      val_every=250)
    samples: dict[str, torch.Tensor] = {"target": grid_gaussians(n), "generator": gen(n)}
    acc: dict[str, float] = {}
    drs = discriminator_rejection_sampling(disc, gen, n)
    samples["DRS"] = drs.samples
    acc["DRS"] = drs.acceptance_rate
    res = ImplicitMH(disc, gen).run(gen(n), n_steps=cfg["mh_steps"], keep="last")
    samples["iMH independent"] = res.final
    acc["iMH independent"] = float(res.acceptance.mean())
    res = ImplicitMH(fpair, rw, markov=True).run(gen(n), n_steps=cfg["mh_steps"], keep="last")
    samples["iMH Markov (RW)"] = res.final
    acc["iMH Markov (RW)"] = float(res.acceptance.mean())
    x = gen(n)
    with torch.no_grad():
        for _ in range(cfg["mh_steps"]):
            x = rw(x)
    samples["RW, no MH"] = x
    rows, metrics = [], {}
    for name, xs in samples.items():
        mt = grid_metrics(xs)
        metrics[name] = mt
        rows.append([name, round(mt["hq_pct"], 1), mt["modes"], round(mt["tv"], 3),
                     round(mt["tv_coarse"], 3),
                     round(acc[name], 3) if name in acc else ""])
    plots.scatter_2d({k: v[:3000] for k, v in samples.items()}, out_dir / "grid25.png",
                     title="25-Gaussian grid: 3000 samples per method", ncols=3)
    base = metrics["generator"]
    headline = {
        "2d_tv_generator": base["tv"],
        "2d_tv_imh_independent": metrics["iMH independent"]["tv"],
        "2d_tv_imh_markov": metrics["iMH Markov (RW)"]["tv"],
        "2d_tv_drs": metrics["DRS"]["tv"],
        "2d_tv_reduction_independent_pct":
            100 * (1 - metrics["iMH independent"]["tv"] / base["tv"]),
        "2d_tv_reduction_markov_pct": 100 * (1 - metrics["iMH Markov (RW)"]["tv"] / base["tv"]),
    }
    table = {
        "title": f"25-Gaussian grid (seed {seed}, {n} samples / chains, {cfg['mh_steps']} MH "
                 "steps): % high quality (<4 std from a mode), modes covered (>=10% of their "
                 "share), histogram TV to the exact target (0.1 and 0.5 bins)",
        "columns": ["method", "HQ %", "modes", "TV (0.1 bins)", "TV (0.5 bins)", "acceptance"],
        "rows": rows,
    }
    extra = {
        "table": table,
        "headline": headline,
        "config": cfg,
        "val_loss": {"independent": h_ind["val_loss"][-1] if h_ind["val_loss"] else None,
                     "pair": h_pair["val_loss"][-1] if h_pair["val_loss"] else None},
        "seconds": time.perf_counter() - t0,
    }
    return extra, metrics


# ------------------------------------------------------------------------------------------
# MNIST
# ------------------------------------------------------------------------------------------


def _run_mnist_seed(seed: int, quick: bool, cfg: dict[str, Any], train_x: torch.Tensor,
                    val_x: torch.Tensor, cal_x: torch.Tensor, test_x: torch.Tensor,
                    ext: MNISTFeatures, val_ref: torch.Tensor,
                    out_dir: Path | None) -> dict[str, Any]:
    seed_everything(seed)
    G, D = mnist_gan(latent_dim=cfg["latent_dim"])
    ld = data.loader(torch.utils.data.TensorDataset(train_x), cfg["batch_size"], shuffle=True,
                     seed=seed)
    t0 = time.perf_counter()
    if quick:
        train_gan(G, D, ld, steps=cfg["gan_steps"])
    else:
        train_gan(G, D, ld, epochs=cfg["gan_epochs"])
    gan_s = time.perf_counter() - t0

    def gen(k: int) -> torch.Tensor:
        return generate(G, k)  # type: ignore[return-value]

    def real(k: int) -> torch.Tensor:
        return train_x[torch.randint(len(train_x), (k,))]

    # Density-ratio discriminator: the GAN's D, optionally fine-tuned against the frozen
    # generator (disc_steps > 0, early stopping on held-out images).
    Dr = copy.deepcopy(D).eval()
    val_fake = gen(len(val_x))
    if cfg["disc_steps"] > 0:
        hist = train_discriminator(Dr, real, gen, steps=cfg["disc_steps"], batch_size=128,
                                   lr=2e-4, val_real=val_x, val_fake=val_fake, val_every=100)
        val_loss = min(hist["val_loss"])
    else:
        val_loss = discriminator_loss(Dr, val_x, val_fake, 1024)[0]
    n = cfg["n_samples"]
    out: dict[str, Any] = {"gan_s": gan_s, "val_loss": val_loss}
    # Calibration chosen on validation only: FID of short independent-iMH runs against
    # held-out training images (val + cal splits), lowest wins.
    cal_fake = gen(len(cal_x))
    cands = {m: calibrate_discriminator(Dr, cal_x, cal_fake, method=m)
             for m in cfg["calibrations"]}
    val_fid: dict[str, float] = {}
    if len(cands) > 1:
        for m, d in cands.items():
            r = ImplicitMH(d, gen).run(gen(cfg["n_select"]), n_steps=cfg["mh_steps"],
                                       keep="last")
            val_fid[m] = frechet_distance(ext.features(r.final), val_ref)
    chosen = min(val_fid, key=val_fid.__getitem__) if val_fid else next(iter(cands))
    disc = cands[chosen]
    out["calibration"] = chosen
    out["val_fid_select"] = val_fid
    samples: dict[str, torch.Tensor] = {}
    acc: dict[str, float] = {}
    samples["generator"] = gen(n)
    drs = discriminator_rejection_sampling(disc, gen, n, batch_size=1000)
    samples["DRS"] = drs.samples
    acc["DRS"] = drs.acceptance_rate
    res = ImplicitMH(disc, gen).run(gen(n), n_steps=cfg["mh_steps"], keep="last")
    samples["iMH independent"] = res.final
    acc["iMH independent"] = float(res.acceptance.mean())
    # Markov proposal in latent space: pCN is reversible w.r.t. N(0, I), so the exact pair
    # function for the target N(z) r(G(z)) is f(z, z') = log r(G(z)).
    with torch.no_grad():
        def f_latent(z: torch.Tensor, _z2: torch.Tensor) -> torch.Tensor:
            return disc(G(z))

        z0 = torch.randn(n, cfg["latent_dim"])
        res = ImplicitMH(f_latent, pcn_proposal(cfg["pcn_rho"]), markov=True).run(
            z0, n_steps=cfg["mh_steps"], keep="last")
        samples["iMH Markov (latent pCN)"] = G(res.final)
    acc["iMH Markov (latent pCN)"] = float(res.acceptance.mean())
    fid = {}
    ref_feats = ext.features(test_x)
    for name, xs in samples.items():
        fid[name] = frechet_distance(ext.features(xs), ref_feats)
    fid["real (held-out train)"] = frechet_distance(ext.features(val_x[:n]), ref_feats)
    out["fid"] = fid
    out["acceptance"] = acc
    if out_dir is not None:
        for name, xs in samples.items():
            slug = name.split(" (")[0].replace(" ", "_").lower()
            if "Markov" in name:
                slug = "imh_markov"
            plots.sample_grid(xs[:64], out_dir / f"mnist_{slug}.png", nrow=8, title=name)
    return out


def _run_mnist(out_dir: Path, quick: bool, seed: int) -> dict[str, Any]:
    cfg = {
        "latent_dim": 64,
        "batch_size": 128,
        "gan_steps": 300,
        "gan_epochs": 5,
        "disc_steps": 0,
        "calibrations": ["logistic", "isotonic"],
        "n_select": 500 if quick else 2000,
        "n_samples": 1000 if quick else 5000,
        "mh_steps": 20 if quick else 100,
        "pcn_rho": 0.5,
        "seeds": [seed] if quick else [seed, seed + 1, seed + 2],
    }
    train, test = data.mnist()
    x_all = train.tensors[0]
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(1234))
    val_x, cal_x, train_x = x_all[perm[:5000]], x_all[perm[5000:10000]], x_all[perm[10000:]]
    test_x = test.tensors[0]
    ext = MNISTFeatures.pretrained()
    val_ref = ext.features(torch.cat([val_x, cal_x]))
    per_seed = []
    for i, s in enumerate(cfg["seeds"]):
        per_seed.append(_run_mnist_seed(s, quick, cfg, train_x, val_x, cal_x, test_x, ext,
                                        val_ref, out_dir if i == 0 else None))
    names = list(per_seed[0]["fid"])
    rows = []
    for name in names:
        v = torch.tensor([r["fid"][name] for r in per_seed], dtype=torch.float64)
        a = [r["acceptance"].get(name) for r in per_seed]
        acc_s = "" if a[0] is None else round(sum(a) / len(a), 3)
        std = float(v.std()) if len(v) > 1 else 0.0
        rows.append([name, round(float(v.mean()), 3), round(std, 3),
                     " / ".join(f"{x:.3f}" for x in v.tolist()), acc_s])
    return {"cfg": cfg, "per_seed": per_seed, "rows": rows}


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run both experiments; returns the report dict (see module docstring).

    What ``bdlkit run imh [--quick]`` calls; the CLI writes the report.

    Example:
        >>> report = run(Path("runs/imh"), quick=True)  # doctest: +SKIP
        >>> report["headline"]  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    two_d, metrics2d = _run_2d(out_dir, quick, seed)
    t2d = time.perf_counter() - t0
    mn = _run_mnist(out_dir, quick, seed)
    tm = time.perf_counter() - t0 - t2d
    fid_mean = {r[0]: r[1] for r in mn["rows"]}
    headline = dict(two_d["headline"])
    headline.update({f"mnist_fid_{k}": v for k, v in fid_mean.items()})
    mnist_table = {
        "title": f"MNIST-FID vs the test set ({mn['cfg']['n_samples']} samples, "
                 f"seeds {mn['cfg']['seeds']}); MH: {mn['cfg']['mh_steps']} steps, last state",
        "columns": ["method", "FID mean", "FID std", "per seed", "acceptance"],
        "rows": mn["rows"],
    }
    sel = []
    for r in mn["per_seed"]:
        vf = ", ".join(f"{k} {v:.1f}" for k, v in r["val_fid_select"].items())
        sel.append(f"{r['calibration']} (val FID {vf})")
    notes = [
        "2-D iMH independent (and DRS) use a fresh MLP discriminator trained on target vs "
        "generator samples, isotonic-calibrated on held-out data (MH-GAN); iMH Markov uses "
        "a Gaussian random walk (scale "
        f"{two_d['config']['rw_scale']}) and a pair discriminator trained with the pair loss; "
        "all chains start at generator samples.",
        f"2-D discriminator validation losses: {two_d['val_loss']}.",
        "MNIST discriminator: the GAN's own discriminator (fine-tuning steps: "
        f"{mn['cfg']['disc_steps']}), calibrated on 5k held-out images (MH-GAN); calibration "
        "chosen per seed from " + "/".join(mn["cfg"]["calibrations"]) + " by the FID of "
        f"{mn['cfg']['n_select']}-chain iMH runs against the 10k held-out training images "
        "(val + cal), not the test set: chosen "
        + "; ".join(sel) + ". Markov proposal: pCN random walk in latent space (rho "
        f"{mn['cfg']['pcn_rho']}); its MH ratio is the calibrated discriminator's ratio.",
        "MNIST per-seed best discriminator validation loss (BCE, ln 2 = chance): "
        + ", ".join(f"{r['val_loss']:.4f}" for r in mn["per_seed"]) + ".",
        "DRS: gamma = 95th percentile of F per batch, epsilon 1e-6 (Azadi et al.).",
        f"Wall time: 2-D {t2d:.0f} s, MNIST {tm:.0f} s.",
    ]
    return {
        "title": "Implicit Metropolis-Hastings (25-Gaussian grid, MNIST)",
        "tables": [two_d["table"], mnist_table],
        "figures": [
            {"path": "grid25.png", "caption": "25-Gaussian grid: samples of every method"},
            {"path": "mnist_generator.png", "caption": "MNIST: raw generator samples"},
            {"path": "mnist_imh_independent.png", "caption": "MNIST: iMH, independent proposal"},
            {"path": "mnist_imh_markov.png", "caption": "MNIST: iMH, latent pCN proposal"},
            {"path": "mnist_drs.png", "caption": "MNIST: DRS samples"},
        ],
        "headline": headline,
        "notes": notes,
        "config": {"quick": quick, "seed": seed, "2d": two_d["config"],
                   "mnist": mn["cfg"]},
    }
