"""Recipe ``trip``: TRIP priors in an MNIST VAE and an MNIST GAN (Kuznetsov et al., 2019).

VAE part: the same MLP VAE trained with three priors (standard normal, learnable diagonal
Gaussian mixture, TRIP) over several seeds; test ELBO and importance-weighted NLL (k samples).
GAN part: the shared MNIST GAN (``generative/gan.py``) with a standard-normal latent prior and
with a TRIP prior trained by REINFORCE on the discriminator score; MNIST-FID of each.

Each (prior, seed) VAE result is cached as ``vae_<prior>_s<seed>.json`` in ``out_dir`` (keyed
by the configuration), so independent runs can be computed in parallel processes with
``python -m bdlkit.experiments.trip OUT --vae-prior trip --seed 1`` (GAN: ``--gan-prior trip``)
and then assembled by ``run``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from .. import data, plots
from ..generative.trip import TRIP
from ..generative.vae import (
    VAE,
    GaussianMixturePrior,
    StandardNormalPrior,
    evaluate_vae,
    fit_vae,
)
from ..train import seed_everything
from ._common import progress

PRIORS = ("normal", "gmm", "trip")

VAE_FULL: dict[str, Any] = {
    "latent_dim": 16,
    "hidden": [256, 256],
    # epochs and the prior learning rates chosen on a 50k/10k validation split of MNIST-train
    # (benchmarks/trip_vae_validate.py; docs/results.md, TRIP section)
    "epochs": 10,
    "batch_size": 100,
    "lr": 1e-3,
    "prior_lr": 3e-2,  # mixture prior (validated 1e-3 / 1e-2 / 3e-2)
    # epoch after which the learnable prior is re-fitted to encoder samples: mixture 2,
    # TRIP 3 (each validated over 1 / 2 / 3 / 5 / 7)
    "prior_init_epoch": 2,
    "trip_prior_init_epoch": 3,
    "gmm_components": 100,
    "trip_components": 10,
    "trip_rank": 20,
    "trip_cluster_init": True,
    "trip_prior_lr": 1e-1,  # validated 3e-2 / 1e-1 at 10 epochs
    "lr_schedule": "constant",  # every rate fixed ("cosine": all decay to 0; fit_vae)
    "train_points": 60000,
    "iw_k": 1000,
    "iw_test_points": 500,
    "n_seeds": 3,
}
VAE_QUICK: dict[str, Any] = {
    **VAE_FULL,
    "epochs": 2,
    "prior_init_epoch": 1,  # so that the 2-epoch quick run still exercises the re-fit
    "trip_prior_init_epoch": 1,
    "train_points": 6000,
    "iw_test_points": 50,
    "n_seeds": 1,
}
GAN_FULL: dict[str, Any] = {
    "latent_dim": 16,
    "steps": 2000,
    "batch_size": 64,
    "lr": 2e-4,
    "prior_lr": 1e-3,
    "trip_components": 10,
    "trip_rank": 10,
    "fid_samples": 10000,
}
GAN_QUICK: dict[str, Any] = {**GAN_FULL, "steps": 200, "fid_samples": 1000}


def _make_prior(name: str, cfg: dict[str, Any]) -> torch.nn.Module:
    D = cfg["latent_dim"]
    if name == "normal":
        return StandardNormalPrior(D)
    if name == "gmm":
        return GaussianMixturePrior(D, cfg["gmm_components"])
    if name == "trip":
        prior = TRIP(D, cfg["trip_components"], cfg["trip_rank"])
        if not cfg.get("trip_cluster_init", True):
            # init_from_data without the k-means core initialisation
            fit = prior.init_from_data
            prior.init_from_data = lambda z: fit(z, cluster_init=False)  # type: ignore
        return prior
    raise ValueError(f"unknown prior {name!r}; choose from {PRIORS}")


def _prior_key(prior_name: str, cfg: dict[str, Any], key: str) -> str:
    """``trip_<key>`` for TRIP when ``cfg`` sets it, else ``key`` (TRIP-only overrides)."""
    trip_key = f"trip_{key}"
    return trip_key if prior_name == "trip" and cfg.get(trip_key) is not None else key


def prior_lr_for(prior_name: str, cfg: dict[str, Any]) -> float:
    """Adam learning rate of the prior: ``trip_prior_lr`` for TRIP when set, else ``prior_lr``.

    Example:
        >>> prior_lr_for("trip", VAE_FULL), prior_lr_for("gmm", VAE_FULL)
        (0.1, 0.03)
    """
    return float(cfg[_prior_key(prior_name, cfg, "prior_lr")])


def prior_init_epoch_for(prior_name: str, cfg: dict[str, Any]) -> int | None:
    """Epoch of the prior re-fit: ``trip_prior_init_epoch`` for TRIP when set, else
    ``prior_init_epoch``.

    Example:
        >>> prior_init_epoch_for("trip", VAE_FULL), prior_init_epoch_for("gmm", VAE_FULL)
        (3, 2)
    """
    value = cfg.get(_prior_key(prior_name, cfg, "prior_init_epoch"))
    return None if value is None else int(value)


def _mnist_flat() -> tuple[torch.Tensor, torch.Tensor]:
    train, test = data.mnist()
    return train.tensors[0].reshape(-1, 784), test.tensors[0].reshape(-1, 784)


def _test_subset(test_x: torch.Tensor, n: int) -> torch.Tensor:
    idx = torch.randperm(test_x.shape[0], generator=torch.Generator().manual_seed(1234))[:n]
    return test_x[idx]


def _relevant(cfg: dict[str, Any], prior_name: str) -> dict[str, Any]:
    """The configuration keys that affect a run with ``prior_name`` (cache key)."""
    other = [p for p in PRIORS if p != prior_name]
    return {k: v for k, v in cfg.items()
            if k != "n_seeds" and not any(k.startswith(f"{o}_") for o in other)}


def vae_run(out_dir: Path, prior_name: str, seed: int, cfg: dict[str, Any],
            log: Any = None) -> dict[str, Any]:
    """Train and evaluate one VAE; cached in ``out_dir/vae_<prior>_s<seed>.json``.

    Example:
        >>> r = vae_run(Path("runs/trip"), "trip", seed=0, cfg=VAE_QUICK)  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    path = out_dir / f"vae_{prior_name}_s{seed}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if _relevant(cached.get("config", {}), prior_name) == _relevant(cfg, prior_name):
            return cached
    train_x, test_x = _mnist_flat()
    train_x = train_x[: cfg["train_points"]]
    seed_everything(seed, deterministic=False)
    vae = VAE(cfg["latent_dim"], _make_prior(prior_name, cfg), hidden=tuple(cfg["hidden"]))
    start = time.perf_counter()
    hist = fit_vae(vae, train_x, cfg["epochs"], lr=cfg["lr"],
                   prior_lr=prior_lr_for(prior_name, cfg),
                   batch_size=cfg["batch_size"],
                   prior_init_epoch=prior_init_epoch_for(prior_name, cfg), seed=seed, log=log,
                   lr_schedule=cfg.get("lr_schedule", "constant"))
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluate_vae(vae, _test_subset(test_x, cfg["iw_test_points"]), k=cfg["iw_k"],
                           seed=seed)
    eval_s = time.perf_counter() - start
    result = {"prior": prior_name, "seed": seed, "config": cfg, **metrics,
              "train_elbo": hist["train_elbo"], "train_s": train_s, "eval_s": eval_s}
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(vae.state_dict(), out_dir / f"vae_{prior_name}_s{seed}.pt")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return result


def _load_vae(out_dir: Path, prior_name: str, seed: int, cfg: dict[str, Any]) -> VAE:
    vae = VAE(cfg["latent_dim"], _make_prior(prior_name, cfg), hidden=tuple(cfg["hidden"]))
    state = torch.load(out_dir / f"vae_{prior_name}_s{seed}.pt", weights_only=True)
    vae.load_state_dict(state)
    return vae.eval()


def _r(x: float, nd: int = 3) -> float | None:
    return round(x, nd) if math.isfinite(x) else None


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(values) > 1 else float("nan"))


def _conditional_figure(vae: VAE, test_x: torch.Tensor, path: Path, n_fixed: int,
                        n_rows: int = 6, n_cols: int = 8) -> Path:
    """Each row: the encoded test image's first ``n_fixed`` latent dims fixed, rest sampled."""
    prior = vae.prior
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        mu, _ = vae.encode(test_x[:n_rows])
    rows = []
    for i in range(n_rows):
        cond = mu[i].clone()
        cond[n_fixed:] = float("nan")
        z = prior.sample(n_cols - 1, condition=cond, generator=gen)
        imgs = vae.decode_images(torch.cat([mu[i : i + 1], z]))
        rows.append(imgs)
    return plots.sample_grid(torch.cat(rows), path, nrow=n_cols,
                             title=f"TRIP-VAE: col 1 = reconstruction; others keep latent dims "
                                   f"1-{n_fixed}, sample the rest")


def _vae_part(out_dir: Path, quick: bool, seed: int, log: Any) -> dict[str, Any]:
    cfg = VAE_QUICK if quick else VAE_FULL
    seeds = [seed + i for i in range(cfg["n_seeds"])]
    results = {p: [vae_run(out_dir, p, s, cfg, log) for s in seeds] for p in PRIORS}
    rows, summary = [], {}
    for p in PRIORS:
        nll = [r["iw_nll"] for r in results[p]]
        elbo = [r["elbo"] for r in results[p]]
        (nm, ns), (em, es) = _mean_std(nll), _mean_std(elbo)
        summary[p] = {"iw_nll_mean": nm, "iw_nll_std": ns, "elbo_mean": em, "elbo_std": es,
                      "iw_nll_per_seed": nll}
        rows.append([p, _r(em), _r(es), _r(nm), _r(ns),
                     " ".join(f"{v:.2f}" for v in nll),
                     round(sum(r["train_s"] for r in results[p]) / len(seeds), 1)])
    gain = summary["normal"]["iw_nll_mean"] - summary["trip"]["iw_nll_mean"]
    gain_gmm = summary["gmm"]["iw_nll_mean"] - summary["trip"]["iw_nll_mean"]
    gains = [a["iw_nll"] - b["iw_nll"] for a, b in zip(results["normal"], results["trip"],
                                                        strict=True)]
    _, test_x = _mnist_flat()
    figures = []
    for p in PRIORS:
        vae = _load_vae(out_dir, p, seeds[0], cfg)
        torch.manual_seed(0)
        plots.sample_grid(vae.sample(64), out_dir / f"vae_samples_{p}.png", nrow=8,
                          title=f"VAE samples (prior: {p}), pixel means")
        figures.append({"path": f"vae_samples_{p}.png",
                        "caption": f"VAE samples with the {p} prior (seed {seeds[0]})"})
    trip_vae = _load_vae(out_dir, "trip", seeds[0], cfg)
    _conditional_figure(trip_vae, test_x, out_dir / "trip_vae_conditional.png",
                        n_fixed=cfg["latent_dim"] // 2)
    figures.append({"path": "trip_vae_conditional.png",
                    "caption": "Conditional generation with the TRIP prior: first half of the "
                               "latent dims fixed to a test image's code, the rest sampled"})
    table = {
        "title": f"VAE on dynamically binarised MNIST ({len(seeds)} seed(s); ELBO and IW-NLL "
                 f"with k={cfg['iw_k']} on a fixed {cfg['iw_test_points']}-image test subset)",
        "columns": ["prior", "test ELBO", "ELBO std", "IW-NLL (nats)", "IW-NLL std",
                    "IW-NLL per seed", "train s/run"],
        "rows": rows,
    }
    notes = [
        f"IW-NLL gain of TRIP over N(0,I): {gain:.3f} nats (per seed: "
        + ", ".join(f"{g:.2f}" for g in gains) + f"); over the mixture prior: {gain_gmm:.3f}.",
        "The N(0,I) VAE uses the analytic KL; learnable priors use the single-sample "
        "estimate log q - log p. Learnable priors are re-initialised from posterior samples "
        f"after epoch {prior_init_epoch_for('gmm', cfg)} (mixture) / "
        f"{prior_init_epoch_for('trip', cfg)} (TRIP) (TRIP: 1-D GMM per dim, cores from k-means "
        f"into {cfg['trip_rank']} clusters; mixture: random codes). Prior Adam lr: "
        f"mixture {prior_lr_for('gmm', cfg):g}, TRIP {prior_lr_for('trip', cfg):g} "
        f"(TRIP d={cfg['trip_components']}, m={cfg['trip_rank']}).",
    ]
    return {"table": table, "figures": figures, "notes": notes, "config": cfg,
            "summary": summary, "gain_vs_normal": gain, "gain_vs_gmm": gain_gmm}


def gan_run(out_dir: Path, prior_name: str, seed: int, cfg: dict[str, Any],
            log: Any = None) -> dict[str, Any]:
    """Train one MNIST GAN with a ``normal`` or REINFORCE-trained ``trip`` prior; MNIST-FID.

    Cached in ``out_dir/gan_<prior>_s<seed>.json``; writes ``gan_samples_<prior>.png``.

    Example:
        >>> r = gan_run(Path("runs/trip"), "trip", seed=0, cfg=GAN_QUICK)  # doctest: +SKIP
    """
    from ..generative.gan import ReinforcePriorStep, generate, mnist_gan, train_gan
    from ..metrics import MNISTFeatures, mnist_fid

    out_dir = Path(out_dir)
    path = out_dir / f"gan_{prior_name}_s{seed}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("config") == cfg and (out_dir / f"gan_samples_{prior_name}.png").is_file():
            return cached
    train_x, test_x = _mnist_flat()
    train_img = train_x.reshape(-1, 1, 28, 28)
    reference = _test_subset(test_x, cfg["fid_samples"]).reshape(-1, 1, 28, 28)
    extractor = MNISTFeatures.pretrained()
    seed_everything(seed, deterministic=False)
    G, Dnet = mnist_gan(latent_dim=cfg["latent_dim"])
    data_gen = torch.Generator().manual_seed(seed)

    def sample_data(n: int) -> torch.Tensor:
        return train_img[torch.randint(0, train_img.shape[0], (n,), generator=data_gen)]

    prior: Any = None
    prior_step = None
    if prior_name == "trip":
        prior = TRIP(cfg["latent_dim"], cfg["trip_components"], cfg["trip_rank"])
        # start near N(0, I): fit the per-dimension mixtures to standard-normal draws
        prior.init_from_data(torch.randn(20000, cfg["latent_dim"]), cluster_init=False)
        prior_step = ReinforcePriorStep(prior, torch.optim.Adam(prior.parameters(),
                                                                lr=cfg["prior_lr"]))
    elif prior_name != "normal":
        raise ValueError(f"GAN prior must be 'normal' or 'trip', got {prior_name!r}")
    start = time.perf_counter()
    train_gan(G, Dnet, sample_data, steps=cfg["steps"], batch_size=cfg["batch_size"],
              prior=prior, prior_step=prior_step, lr=cfg["lr"], log_every=100)
    train_s = time.perf_counter() - start
    torch.manual_seed(seed + 1)
    samples = generate(G, cfg["fid_samples"], prior=prior)
    fid = mnist_fid(samples, reference, extractor)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots.sample_grid(samples[:64], out_dir / f"gan_samples_{prior_name}.png", nrow=8,
                      title=f"GAN samples (prior: {prior_name}), MNIST-FID {fid:.2f}")
    result = {"prior": prior_name, "seed": seed, "config": cfg, "fid": fid, "train_s": train_s}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    if log:
        log(f"GAN {prior_name}: MNIST-FID {fid:.3f} ({train_s:.0f}s)")
    return result


def _gan_part(out_dir: Path, quick: bool, seed: int, log: Any) -> dict[str, Any]:
    cfg = GAN_QUICK if quick else GAN_FULL
    rows, figures, fids = [], [], {}
    for name in ("normal", "trip"):
        r = gan_run(out_dir, name, seed, cfg, log)
        fids[name] = r["fid"]
        figures.append({"path": f"gan_samples_{name}.png",
                        "caption": f"GAN samples with the {name} prior"})
        rows.append([name, round(r["fid"], 3), cfg["steps"], round(r["train_s"], 1)])
    table = {"title": f"Non-saturating MLP GAN on MNIST (seed {seed}); MNIST-FID of "
                      f"{cfg['fid_samples']} samples vs {cfg['fid_samples']} test images "
                      "(LeNet5 fc1 features)",
             "columns": ["prior", "MNIST-FID", "steps", "train s"], "rows": rows}
    notes = ["TRIP-GAN: the prior is trained jointly by REINFORCE on the discriminator logit "
             "(score-function estimator, moving-average baseline, normalised advantage); "
             "it starts from a per-dimension GMM fit to N(0, I) draws."]
    return {"table": table, "figures": figures, "notes": notes, "config": cfg, "fid": fids}


def run(out_dir: Path, quick: bool = False, seed: int = 0, parts: tuple[str, ...] = ("vae", "gan"),
        ) -> dict[str, Any]:
    """Run the TRIP recipe; returns the report dict (see ``docs/CORE_API.md``).

    What ``bdlkit run trip [--quick]`` calls; the CLI writes the report.

    Example:
        >>> report = run(Path("runs/trip"), quick=True)  # doctest: +SKIP
        >>> report["headline"]  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        progress("trip", msg)

    tables, figures, notes, config, headline = [], [], [], {"quick": quick, "seed": seed}, {}
    if "vae" in parts:
        v = _vae_part(out_dir, quick, seed, log)
        tables.append(v["table"])
        figures += v["figures"]
        notes += v["notes"]
        config["vae"] = v["config"]
        headline.update({f"vae_iw_nll_{p}": s["iw_nll_mean"] for p, s in v["summary"].items()})
        headline["vae_trip_gain_vs_normal"] = v["gain_vs_normal"]
        headline["vae_trip_gain_vs_gmm"] = v["gain_vs_gmm"]
    if "gan" in parts:
        g = _gan_part(out_dir, quick, seed, log)
        tables.append(g["table"])
        figures += g["figures"]
        notes += g["notes"]
        config["gan"] = g["config"]
        headline.update({f"gan_fid_{k}": f for k, f in g["fid"].items()})
    headline = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in headline.items()}
    return {"title": "TRIP: tensor-ring induced prior (VAE and GAN on MNIST)",
            "tables": tables, "figures": figures, "notes": notes, "config": config,
            "headline": headline}


def _main() -> None:
    ap = argparse.ArgumentParser(description="Compute cached parts of the trip recipe.")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-prior", choices=PRIORS, action="append")
    ap.add_argument("--gan-prior", choices=("normal", "trip"), action="append")
    ap.add_argument("--parts", default="vae,gan")
    args = ap.parse_args()
    if args.vae_prior:
        cfg = VAE_QUICK if args.quick else VAE_FULL
        for p in args.vae_prior:
            r = vae_run(args.out_dir, p, args.seed, cfg,
                        log=lambda m, p=p: print(f"[{p} s{args.seed}] {m}", flush=True))
            print(json.dumps({k: r[k] for k in ("prior", "seed", "elbo", "iw_nll", "train_s",
                                                "eval_s")}), flush=True)
        return
    if args.gan_prior:
        cfg = GAN_QUICK if args.quick else GAN_FULL
        for p in args.gan_prior:
            r = gan_run(args.out_dir, p, args.seed, cfg, log=print)
            print(json.dumps({k: r[k] for k in ("prior", "seed", "fid", "train_s")}), flush=True)
        return
    res = run(args.out_dir, quick=args.quick, seed=args.seed,
              parts=tuple(args.parts.split(",")))
    (args.out_dir / "result.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res["headline"], indent=1))


if __name__ == "__main__":
    _main()
