"""Tests for the ``swag`` recipe's data split and validation sweep (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bdlkit.experiments import swag as recipe


def test_datasets_split_is_disjoint_and_uses_no_test_data_for_selection():
    cfg = dict(recipe.QUICK, n_train=500, n_val=200, n_test=300, n_ood=100, n_val_ood=150)
    sets = recipe._datasets(cfg, seed=0)
    assert [len(sets[k]) for k in ("train", "val", "test", "ood", "val_ood")] == [
        500, 200, 300, 100, 150]
    def rows(x: torch.Tensor) -> set[bytes]:
        return {r.numpy().tobytes() for r in x.flatten(1)}

    # the validation split is carved from the training pool: no image appears in both
    assert not rows(sets["val"].tensors[0]) & rows(sets["train"].tensors[0])
    # validation OOD images are MNIST *training* images (the MNIST test set is the test OOD)
    from bdlkit import data

    mnist_train, _ = data.mnist()
    assert rows(sets["val_ood"].tensors[0]) <= rows(mnist_train.tensors[0])

def test_full_config_is_the_honest_recipe():
    full = recipe.FULL
    assert full["n_train"] + full["n_val"] == 60000
    assert full["n_test"] == 10000 and full["n_ood"] == 10000 and full["n_samples"] == 30
    assert full["swa_start"] < full["epochs"]
    # SWA over (at least) the second half of the run, enough iterates to fill rank K
    assert full["epochs"] - full["swa_start"] >= full["epochs"] / 2
    assert (full["epochs"] - full["swa_start"]) * full["collects_per_epoch"] >= full["max_rank"]
    assert recipe.QUICK["epochs"] < full["epochs"]


def test_select_on_validation_rejects_bad_grid(tmp_path: Path):
    with pytest.raises(ValueError, match="grid"):
        recipe.select_on_validation(tmp_path, grid=[(0.01, 0.1)])
    with pytest.raises(ValueError, match="grid"):
        recipe.select_on_validation(tmp_path, grid=[(0.1, 0)])
    assert recipe.select_on_validation(tmp_path / "x", grid=[])["runs"] == []
    assert not (tmp_path / "x").exists()


def _m(nll: float, ece: float = 0.01, acc: float = 0.9, auroc: float = 0.8) -> dict[str, float]:
    return {"nll": nll, "ece": ece, "accuracy": acc, "ood_auroc": auroc}


def test_acceptance_checks_each_line():
    sgd, swa = _m(0.30, ece=0.02, acc=0.900, auroc=0.80), _m(0.25)
    ok = recipe.acceptance_checks(sgd, swa, _m(0.20, ece=0.01, acc=0.899, auroc=0.81))
    assert all(ok.values()) and len(ok) == 4
    bad = recipe.acceptance_checks(sgd, swa, _m(0.26, ece=0.0101, acc=0.897, auroc=0.80))
    assert not any(bad.values())
    # SWA must sit strictly between SWAG and SGD
    assert not recipe.acceptance_checks(sgd, _m(0.31), _m(0.2, ece=0.01))[
        "SWAG NLL < SWA NLL < SGD NLL"]


def _run(lr_init: float, nlls: dict[float, float], met: dict[float, int]) -> dict:
    return {"lr_init": lr_init, "swa_lr": lr_init / 5,
            "scores": {f"SWAG scale {s}": {"nll": v} for s, v in nlls.items()},
            "checks": {f"SWAG scale {s}": {str(i): i < met[s] for i in range(4)}
                       for s in nlls}}


def test_choose_setting_prefers_lines_met_then_lowest_nll():
    runs = [_run(0.1, {0.25: 0.20, 0.5: 0.22}, {0.25: 3, 0.5: 4}),
            _run(0.05, {0.25: 0.21, 0.5: 0.19}, {0.25: 4, 0.5: 2})]
    # two candidates meet all four lines: the lower SWAG validation NLL wins (0.21 < 0.22)
    got = recipe.choose_setting(runs)
    assert (got["lr_init"], got["scale"], got["lines_met"]) == (0.05, 0.25, 4)
    # none meets all: most lines met, then lowest NLL
    runs = [_run(0.1, {0.25: 0.20, 1.0: 0.18}, {0.25: 3, 1.0: 3}),
            _run(0.05, {0.25: 0.15}, {0.25: 2})]
    got = recipe.choose_setting(runs)
    assert (got["lr_init"], got["scale"], got["swag_val_nll"]) == (0.1, 1.0, 0.18)
    with pytest.raises(ValueError, match="no candidate"):
        recipe.choose_setting([])
