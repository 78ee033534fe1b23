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
    assert recipe.QUICK["epochs"] < full["epochs"]


def test_select_on_validation_rejects_bad_grid(tmp_path: Path):
    with pytest.raises(ValueError, match="grid"):
        recipe.select_on_validation(tmp_path, grid=[(0.01, 0.1)])
    with pytest.raises(ValueError, match="grid"):
        recipe.select_on_validation(tmp_path, grid=[(0.1, 0)])
    assert recipe.select_on_validation(tmp_path / "x", grid=[])["runs"] == []
    assert not (tmp_path / "x").exists()
