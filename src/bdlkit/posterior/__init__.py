"""Posterior approximations over network weights (SWA, SWAG)."""

from bdlkit.posterior.swag import SWAG, swa_learning_rate, swa_scheduler

__all__ = ["SWAG", "swa_learning_rate", "swa_scheduler"]
