"""Recipe ``swag``: SGD vs SWA vs SWAG-Diag vs SWAG (and temperature-scaled SGD) on Fashion-MNIST.

One SGD run with the reference SWAG schedule (momentum 0.9, lr constant for the first half of
the pre-SWA budget, linear decay to ``swa_lr`` by 90 %, constant ``swa_lr`` while collecting).
The SGD baseline branches off that run at ``swa_start`` (an exact copy of model and optimizer)
and spends the same remaining epochs with the lr decaying on to 1 % of ``lr_init``, so both
arms have the same total budget. Temperature scaling is fitted on a held-out validation split.
OOD: Fashion-MNIST test (in) vs MNIST test (out), scored by predictive entropy.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .. import data, plots
from ..metrics import classification_metrics, ood_auroc, predictive_entropy
from ..models import VGGSmall
from ..posterior.swag import SWAG, swa_scheduler
from ..train import fit, predict_proba, seed_everything

# FULL: the whole Fashion-MNIST training set minus a 10k validation split, the full 10k test
# set, the full 10k MNIST test set as OOD, 30 samples. Budget (a method decision, not tuned):
# 12 epochs with SWA over the second half (swa_start 6), as the reference SWAG runs ("SWA 1.5
# budgets": --epochs 300 --swa_start 161) collect over 46 % of the run; 7 collections per epoch
# give 42 >= K = 20 iterates. lr_init / swa_lr / scale were chosen by
# `select_on_validation` (rule in its docstring; see docs/results.md), never on test figures.
FULL = {
    "n_train": 50000, "n_val": 10000, "n_test": 10000, "n_ood": 10000,
    "epochs": 12, "swa_start": 6, "collects_per_epoch": 7, "max_rank": 20,
    "n_samples": 30, "bn_batches": 4, "bn_batch_size": 256,
    "batch_size": 128, "lr_init": 0.05, "swa_lr": 0.01, "weight_decay": 5e-4, "scale": 1.0,
}
QUICK = dict(FULL, n_train=3000, n_val=1000, n_test=2000, n_ood=1000, epochs=4, swa_start=2,
             n_samples=4, bn_batches=4)


class _Collector:
    """fit() callback: collect into ``swag`` every ``every`` optimisation steps."""

    def __init__(self, swag: SWAG, every: int) -> None:
        self.swag, self.every = swag, every

    def on_batch_end(self, model: torch.nn.Module, step: int, loss: float) -> None:
        if step % self.every == 0:
            self.swag.collect(model)


def _fit_temperature(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature minimising validation NLL of ``softmax(log p / T)`` (LBFGS on log T)."""
    logits = probs.clamp_min(1e-12).log()
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def _scaled(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(probs.clamp_min(1e-12).log() / temperature, dim=1)


def _datasets(cfg: dict[str, Any], seed: int) -> dict[str, TensorDataset]:
    """Train / validation split of Fashion-MNIST train, the test set, MNIST test (OOD) and a
    validation OOD set of MNIST *training* images (used only for selection, never the test)."""
    fm_train, fm_test = data.fashion_mnist()
    mnist_train, mnist_test = data.mnist()
    pool = data.subset(fm_train, cfg["n_train"] + cfg["n_val"], seed=seed)
    x, y = pool.tensors
    return {
        "train": TensorDataset(x[: cfg["n_train"]], y[: cfg["n_train"]]),
        "val": TensorDataset(x[cfg["n_train"]:], y[cfg["n_train"]:]),
        "test": fm_test if cfg["n_test"] >= len(fm_test)
        else data.subset(fm_test, cfg["n_test"], seed),
        "ood": mnist_test if cfg["n_ood"] >= len(mnist_test)
        else data.subset(mnist_test, cfg["n_ood"], seed=seed),
        "val_ood": data.subset(mnist_train, cfg.get("n_val_ood", cfg["n_ood"]), seed=seed),
    }


def _joined(a: TensorDataset, b: TensorDataset) -> TensorDataset:
    return TensorDataset(torch.cat([a.tensors[0], b.tensors[0]]),
                         torch.cat([a.tensors[1], b.tensors[1]]))


def _train_sgd_branch(sgd: torch.nn.Module, opt: torch.optim.Optimizer, cfg: dict[str, Any],
                      train_loader: Any, rest: int) -> None:
    """SGD baseline: continue from ``opt``'s state for ``rest`` epochs, lr decaying linearly
    from ``swa_lr`` to 1 % of ``lr_init`` (the same budget as the SWA phase)."""
    steps = len(train_loader)
    sgd_opt = torch.optim.SGD(sgd.parameters(), lr=cfg["swa_lr"], momentum=0.9,
                              weight_decay=cfg["weight_decay"])
    sgd_opt.load_state_dict(opt.state_dict())
    lr_end = 0.01 * cfg["lr_init"]
    for g in sgd_opt.param_groups:
        g["lr"] = cfg["swa_lr"]
        g.pop("initial_lr", None)
    sgd_sched = torch.optim.lr_scheduler.LambdaLR(
        sgd_opt,
        lambda s: (cfg["swa_lr"] + (lr_end - cfg["swa_lr"]) * min(1.0, s / (rest * steps)))
        / cfg["swa_lr"],
    )
    fit(sgd, train_loader, rest, sgd_opt, sgd_sched, scheduler_step="batch")


def _train_arms(cfg: dict[str, Any], train: TensorDataset, seed: int,
                timings: dict[str, float]) -> tuple[torch.nn.Module, SWAG, int, int]:
    """Shared pre-SWA phase, then the SGD branch and the SWA phase (collecting into SWAG).

    Returns ``(sgd_model, swag, steps_per_epoch, collect_every)``; fills ``timings``.
    """
    train_loader = data.loader(train, cfg["batch_size"], shuffle=True, seed=seed)
    steps = len(train_loader)

    # ---- shared pre-SWA phase (reference schedule, per-batch lr)
    t = time.perf_counter()
    seed_everything(seed)
    model = VGGSmall().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr_init"], momentum=0.9,
                          weight_decay=cfg["weight_decay"])
    sched = swa_scheduler(opt, swa_start=cfg["swa_start"], swa_lr=cfg["swa_lr"],
                          steps_per_epoch=steps)
    fit(model, train_loader, cfg["swa_start"], opt, sched, scheduler_step="batch")
    timings["pre-SWA training"] = time.perf_counter() - t

    # ---- SGD branch: same model/optimizer state, lr decays on to 1 % of lr_init
    t = time.perf_counter()
    rest = cfg["epochs"] - cfg["swa_start"]
    sgd = copy.deepcopy(model)
    _train_sgd_branch(sgd, opt, cfg, train_loader, rest)
    timings["SGD branch training"] = time.perf_counter() - t

    # ---- SWA phase: constant swa_lr, collect several times per epoch
    t = time.perf_counter()
    swag = SWAG(model, max_rank=cfg["max_rank"])
    for g in opt.param_groups:
        g["lr"] = cfg["swa_lr"]
    every = max(1, steps // cfg["collects_per_epoch"])
    collect_s = [0.0]
    collector = _Collector(swag, every)
    orig = collector.on_batch_end

    def timed(model_: torch.nn.Module, step: int, loss: float) -> None:
        c = time.perf_counter()
        orig(model_, step, loss)
        collect_s[0] += time.perf_counter() - c

    collector.on_batch_end = timed  # type: ignore[method-assign]
    fit(model, train_loader, rest, opt, None, callbacks=[collector])
    timings["SWA phase training (incl. collect)"] = time.perf_counter() - t
    timings["collect total"] = collect_s[0]
    return sgd, swag, steps, every


def _scores(p: torch.Tensor, labels: torch.Tensor, n_in: int) -> dict[str, float]:
    """Classification metrics on the first ``n_in`` rows, entropy OOD AUROC against the rest."""
    m = classification_metrics(p[:n_in], labels[:n_in])
    ent = predictive_entropy(p)
    m["ood_auroc"] = ood_auroc(ent[:n_in], ent[n_in:])
    m["entropy_in"] = float(ent[:n_in].mean())
    m["entropy_out"] = float(ent[n_in:].mean())
    return m


def acceptance_checks(sgd: dict[str, float], swa: dict[str, float],
                      swag: dict[str, float]) -> dict[str, bool]:
    """The issue's four method-comparison acceptance lines, from ``_scores`` dicts.

    Used for the test figures in :func:`run` and for the validation figures in
    :func:`select_on_validation` (there ``ood_auroc`` is the validation-OOD AUROC).

    Example:
        >>> m = {"nll": 0.2, "ece": 0.01, "accuracy": 0.9, "ood_auroc": 0.8}
        >>> sorted(acceptance_checks(m, m, m).values())
        [False, False, False, True]
    """
    return {
        "SWAG NLL < SWA NLL < SGD NLL": swag["nll"] < swa["nll"] < sgd["nll"],
        "SWAG ECE <= 0.5 x SGD ECE": swag["ece"] <= 0.5 * sgd["ece"],
        "SWAG acc >= SGD acc - 0.2 pp": swag["accuracy"] >= sgd["accuracy"] - 0.002,
        "SWAG OOD AUROC > SGD OOD AUROC": swag["ood_auroc"] > sgd["ood_auroc"],
    }


def choose_setting(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Selection rule of :func:`select_on_validation` (fixed before the sweep was run).

    Every candidate is one ``(lr_init, swa_lr, scale)``; its validation ``checks`` are the
    acceptance lines of :func:`acceptance_checks` computed on the validation split. Rule: the
    candidate meeting the **most** lines; ties (in particular: among candidates meeting every
    line) broken by the **lowest SWAG validation NLL**. ``runs`` is the ``"runs"`` list written by
    :func:`select_on_validation` (each with ``lr_init``, ``swa_lr``, ``scores`` and
    ``checks`` keyed ``"SWAG scale <s>"``). Returns ``{"lr_init", "swa_lr", "scale",
    "lines_met", "swag_val_nll"}``.

    Example:
        >>> run = {"lr_init": 0.1, "swa_lr": 0.05,
        ...        "scores": {"SWAG scale 0.5": {"nll": 0.3}, "SWAG scale 1.0": {"nll": 0.2}},
        ...        "checks": {"SWAG scale 0.5": {"a": True, "b": True},
        ...                   "SWAG scale 1.0": {"a": True, "b": False}}}
        >>> choose_setting([run])["scale"]
        0.5
    """
    best: dict[str, Any] | None = None
    for r in runs:
        for key, checks in r["checks"].items():
            if not key.startswith("SWAG scale "):
                raise ValueError(f"unexpected checks key {key!r}")
            cand = {"lr_init": r["lr_init"], "swa_lr": r["swa_lr"],
                    "scale": float(key.removeprefix("SWAG scale ")),
                    "lines_met": sum(bool(v) for v in checks.values()),
                    "swag_val_nll": float(r["scores"][key]["nll"])}
            if best is None or (cand["lines_met"], -cand["swag_val_nll"]) > (
                    best["lines_met"], -best["swag_val_nll"]):
                best = cand
    if best is None:
        raise ValueError("no candidate to choose from (empty runs or no scales)")
    return best


def select_on_validation(out_dir: Path, grid: list[tuple[float, float]] | None = None,
                         scales: tuple[float, ...] = (0.25, 0.5, 1.0), n_samples: int = 10,
                         n_train: int = 25000, n_eval: int = 5000, seed: int = 0,
                         **overrides: Any) -> dict[str, Any]:
    """Validation sweep used to choose ``lr_init`` / ``swa_lr`` / ``scale`` of the FULL config.

    Trains the FULL schedule (epochs, swa_start, collection rate: the shared pre-SWA phase, the
    **SGD branch** and the SWA phase, exactly as :func:`run`) once per ``(lr_init, swa_lr)`` in
    ``grid`` on the first ``n_train`` images of the FULL training split (a proxy, to fit the
    compute budget) and scores SGD, SWA and SWAG (each ``scale``, ``n_samples`` samples) on
    ``n_eval`` images of the FULL validation split (held out of the Fashion-MNIST *training*
    set); validation OOD = ``n_eval`` MNIST *training* images, scored by predictive entropy.
    Test data are never scored. For every SWAG ``scale`` the issue's acceptance lines
    (:func:`acceptance_checks`) are evaluated on these validation figures, and the setting is
    chosen by :func:`choose_setting`: **most acceptance lines met on validation, ties broken by
    the lowest SWAG validation NLL** (rule fixed before the sweep was run). Writes
    ``out_dir/sweep.json`` (after every grid point) and returns its content, with the choice
    under ``"selected"``.

    Example:
        >>> select_on_validation(Path("/tmp/s"), grid=[], scales=())["runs"]
        []
    """
    grid = [(0.05, 0.01), (0.1, 0.05)] if grid is None else grid
    if any(not (isinstance(a, float) and isinstance(b, float) and a >= b > 0) for a, b in grid):
        raise ValueError(f"grid must hold (lr_init, swa_lr) float pairs, 0 < swa_lr <= lr_init, "
                         f"got {grid!r}")
    result: dict[str, Any] = {
        "runs": [], "scales": list(scales), "n_samples": n_samples,
        "rule": "most acceptance lines met on validation, ties -> lowest SWAG validation NLL"}
    if not grid:
        return result
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = {**FULL, "n_val_ood": n_eval, **overrides}
    sets = _datasets(base, seed)
    x, y = sets["train"].tensors
    sets["train"] = TensorDataset(x[:n_train], y[:n_train])
    x, y = sets["val"].tensors
    sets["val"] = TensorDataset(x[:n_eval], y[:n_eval])
    n_in = len(sets["val"])
    eval_loader = data.loader(_joined(sets["val"], sets["val_ood"]), 500)
    result.update(n_train=len(sets["train"]), n_eval=n_eval,
                  config={k: base[k] for k in ("epochs", "swa_start", "collects_per_epoch",
                                               "max_rank", "bn_batches", "bn_batch_size")})
    for lr_init, swa_lr in grid:
        cfg = dict(base, lr_init=lr_init, swa_lr=swa_lr)
        timings: dict[str, float] = {}
        sgd, swag, _, _ = _train_arms(cfg, sets["train"], seed, timings)
        bn_loader = data.loader(sets["train"], cfg["bn_batch_size"], shuffle=True, seed=seed + 1)
        common = {"bn_loader": bn_loader, "bn_batches": cfg["bn_batches"], "seed": seed}
        sgd_p, labels = predict_proba(sgd, eval_loader)
        scores = {"SGD": _scores(sgd_p, labels, n_in),
                  "SWA": _scores(swag.predict(eval_loader, n_samples=1, scale=0.0, **common),
                                 labels, n_in)}
        checks: dict[str, dict[str, bool]] = {}
        for s in scales:
            p = swag.predict(eval_loader, n_samples=n_samples, scale=s, **common)
            key = f"SWAG scale {s}"
            scores[key] = _scores(p, labels, n_in)
            checks[key] = acceptance_checks(scores["SGD"], scores["SWA"], scores[key])
        result["runs"].append({"lr_init": lr_init, "swa_lr": swa_lr, "scores": scores,
                               "checks": checks, "timings": timings})
        if scales:
            result["selected"] = choose_setting(result["runs"])
        (out_dir / "sweep.json").write_text(json.dumps(result, indent=2))
    return result


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Train, collect, evaluate the five methods; returns the report dict.

    What ``bdlkit run swag [--quick]`` calls; the CLI writes the report.

    Example:
        >>> report = run(Path("runs/swag"), quick=True)  # doctest: +SKIP
        >>> report["headline"]  # doctest: +SKIP
    """
    cfg = dict(QUICK if quick else FULL)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    sets = _datasets(cfg, seed)
    train, val, test, ood = sets["train"], sets["val"], sets["test"], sets["ood"]
    # one evaluation pass covers the in-distribution test set and the OOD set
    eval_loader = data.loader(_joined(test, ood), 500)
    n_in = len(test)
    val_loader = data.loader(val, 500)
    bn_loader = data.loader(train, cfg["bn_batch_size"], shuffle=True, seed=seed + 1)
    sgd, swag, steps, every = _train_arms(cfg, train, seed, timings)
    rest = cfg["epochs"] - cfg["swa_start"]
    lr_end = 0.01 * cfg["lr_init"]

    # ---- evaluation
    preds: dict[str, torch.Tensor] = {}
    t = time.perf_counter()
    sgd_eval, labels = predict_proba(sgd, eval_loader)
    sgd_val, val_labels = predict_proba(sgd, val_loader)
    temperature = _fit_temperature(sgd_val, val_labels)
    preds["SGD"] = sgd_eval
    preds["SGD + temp. scaling"] = _scaled(sgd_eval, temperature)
    timings["SGD eval"] = time.perf_counter() - t
    common = {"bn_loader": bn_loader, "bn_batches": cfg["bn_batches"]}
    t = time.perf_counter()
    preds["SWA"] = swag.predict(eval_loader, n_samples=1, scale=0.0, seed=seed, **common)
    timings["SWA eval"] = time.perf_counter() - t
    epistemic: dict[str, torch.Tensor] = {}
    for name, cov in (("SWAG-Diag", False), ("SWAG", True)):
        t = time.perf_counter()
        u = swag.predict_uncertainty(eval_loader, n_samples=cfg["n_samples"],
                                     scale=cfg["scale"], cov=cov, seed=seed, **common)
        preds[name], epistemic[name] = u["probs"], u["epistemic"]
        timings[f"{name} eval ({cfg['n_samples']} samples)"] = time.perf_counter() - t

    labels_in = labels[:n_in]
    metrics = {name: _scores(p, labels, n_in) for name, p in preds.items()}
    for name, mi in epistemic.items():  # the Bayesian OOD score; single networks have none
        metrics[name]["ood_auroc_mutual_info"] = ood_auroc(mi[:n_in], mi[n_in:])
    plots.reliability_diagram({k: (p[:n_in], labels_in) for k, p in preds.items()},
                              out_dir / "reliability.png",
                              title="Fashion-MNIST test: reliability of SGD / SWA / SWAG")

    sgd_m, swa_m, swag_m = metrics["SGD"], metrics["SWA"], metrics["SWAG"]
    checks = acceptance_checks(sgd_m, swa_m, swag_m)
    rows = [[name, round(m["accuracy"], 4), round(m["nll"], 4), round(m["ece"], 4),
             round(m["brier"], 4), round(m["ood_auroc"], 4), round(m["entropy_in"], 4),
             round(m["entropy_out"], 4),
             round(m["ood_auroc_mutual_info"], 4) if "ood_auroc_mutual_info" in m else "-"]
            for name, m in metrics.items()]
    timings["total"] = time.perf_counter() - t0
    epoch_s = timings["SWA phase training (incl. collect)"] / max(rest, 1)
    return {
        "title": "SWA / SWAG on Fashion-MNIST (VGGSmall with BatchNorm)",
        "tables": [
            {"title": "Fashion-MNIST test (OOD: MNIST test, predictive entropy)",
             "columns": ["method", "acc", "NLL", "ECE", "Brier", "OOD AUROC",
                         "mean entropy in", "mean entropy OOD",
                         "OOD AUROC (mutual information)"], "rows": rows},
            {"title": "Acceptance checks", "columns": ["check", "met"],
             "rows": [[k, bool(v)] for k, v in checks.items()]},
            {"title": "Timings (s)", "columns": ["phase", "seconds"],
             "rows": [[k, round(v, 2)] for k, v in timings.items()]},
        ],
        "figures": [{"path": "reliability.png",
                     "caption": "Accuracy minus confidence per confidence bin, "
                                "Fashion-MNIST test"}],
        "notes": [
            "OOD AUROC scores each input by its predictive entropy (the acceptance line). The "
            "last column scores SWAG / SWAG-Diag by the mutual information between prediction "
            "and weights (predictive entropy minus the mean entropy of the draws, "
            "SWAG.predict_uncertainty), the epistemic part; a single network has none.",
            "lr_init / swa_lr / scale were chosen on a validation split of the training set "
            "(select_on_validation), never on the test figures.",
            f"Temperature fitted on {len(val)} held-out training images: T = {temperature:.3f}.",
            f"SWAG: {swag.n_collected} collections ({cfg['collects_per_epoch']} per epoch over "
            f"{rest} epochs), rank {swag.rank}, scale {cfg['scale']}, {cfg['n_samples']} samples, "
            f"BN refreshed on {cfg['bn_batches']} x {cfg['bn_batch_size']} training images per "
            "sample.",
            f"collect costs {timings['collect total'] / max(swag.n_collected, 1) * 1e3:.2f} ms "
            f"per call = {100 * timings['collect total'] / max(rest, 1) / epoch_s:.3f} % of an "
            "epoch.",
            "SGD baseline: branched off at swa_start with the same optimizer state, lr decayed "
            f"linearly from swa_lr to {lr_end:g} over the remaining {rest} epochs (same budget).",
        ],
        "headline": {"swag_nll": swag_m["nll"], "swa_nll": swa_m["nll"], "sgd_nll": sgd_m["nll"],
                     "swag_ece": swag_m["ece"], "sgd_ece": sgd_m["ece"],
                     "all_checks_met": all(checks.values())},
        "metrics": metrics,
        "checks": {k: bool(v) for k, v in checks.items()},
        "config": dict(cfg, quick=quick, seed=seed, temperature=temperature,
                       steps_per_epoch=steps, collect_every_steps=every,
                       model="VGGSmall(widths=(16, 32, 64)), channels_last",
                       sqrt_scale=math.sqrt(cfg["scale"])),
    }
