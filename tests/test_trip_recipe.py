"""Tests of the TRIP recipe's configuration helpers (no training)."""

from __future__ import annotations

from bdlkit.experiments import trip as recipe


def test_prior_lr_for_uses_trip_specific_rate_only_for_trip() -> None:
    cfg = {**recipe.VAE_FULL, "prior_lr": 1e-3, "trip_prior_lr": 5e-3}
    assert recipe.prior_lr_for("trip", cfg) == 5e-3
    assert recipe.prior_lr_for("gmm", cfg) == 1e-3
    assert recipe.prior_lr_for("normal", cfg) == 1e-3
    cfg["trip_prior_lr"] = None
    assert recipe.prior_lr_for("trip", cfg) == 1e-3


def test_cache_key_of_baselines_ignores_trip_settings() -> None:
    base = dict(recipe.VAE_FULL)
    changed = {**base, "trip_prior_lr": 1.0, "trip_rank": 7, "trip_components": 3}
    for prior in ("normal", "gmm"):
        assert recipe._relevant(base, prior) == recipe._relevant(changed, prior)
    assert recipe._relevant(base, "trip") != recipe._relevant(changed, "trip")
    # a shared key invalidates every prior's cache
    shared = {**base, "prior_lr": base["prior_lr"] * 2}
    for prior in recipe.PRIORS:
        assert recipe._relevant(base, prior) != recipe._relevant(shared, prior)


def test_prior_init_epoch_for_uses_trip_specific_epoch_only_for_trip() -> None:
    cfg = {**recipe.VAE_FULL, "prior_init_epoch": 2, "trip_prior_init_epoch": 3}
    assert recipe.prior_init_epoch_for("trip", cfg) == 3
    assert recipe.prior_init_epoch_for("gmm", cfg) == 2
    cfg["trip_prior_init_epoch"] = None
    assert recipe.prior_init_epoch_for("trip", cfg) == 2
    cfg["prior_init_epoch"] = None
    assert recipe.prior_init_epoch_for("gmm", cfg) is None
    # the TRIP-only key does not invalidate the baselines' cached runs
    changed = {**recipe.VAE_FULL, "trip_prior_init_epoch": 9}
    assert recipe._relevant(recipe.VAE_FULL, "gmm") == recipe._relevant(changed, "gmm")
    assert recipe._relevant(recipe.VAE_FULL, "trip") != recipe._relevant(changed, "trip")


def test_every_config_refits_the_learnable_priors_within_its_epochs() -> None:
    for cfg in (recipe.VAE_FULL, recipe.VAE_QUICK):
        for prior in ("gmm", "trip"):
            epoch = recipe.prior_init_epoch_for(prior, cfg)
            assert epoch is not None and 0 <= epoch < cfg["epochs"]
