"""Ensembles in weight space: Fast Geometric Ensembling and mode-connecting curves."""

from bdlkit.ensemble.curves import Bezier, Curve, PolyChain, evaluate_path, linear_path, train_curve
from bdlkit.ensemble.fge import Ensemble, FGESchedule, collect_fge, fge_lr

__all__ = [
    "Bezier",
    "Curve",
    "Ensemble",
    "FGESchedule",
    "PolyChain",
    "collect_fge",
    "evaluate_path",
    "fge_lr",
    "linear_path",
    "train_curve",
]
