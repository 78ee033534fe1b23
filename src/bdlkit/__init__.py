"""bdlkit: Bayesian deep learning methods as practical PyTorch tools.

Example:
    >>> import bdlkit as bk
    >>> net = bk.models.LeNet5()
    >>> bk.flatten_params(net).numel() == bk.num_params(net)
    True
"""

from . import data, metrics, models, plots, train
from .batchnorm import refresh_bn
from .compress import sbp
from .compress.perforation import PerforatedConv2d, perforate, search_rates
from .compress.speed import count_flops, measure_speedup
from .ensemble.curves import Bezier, PolyChain, evaluate_path, linear_path, train_curve
from .ensemble.fge import Ensemble, FGESchedule, collect_fge
from .generative.imh import ImplicitMH, train_discriminator, train_pair_discriminator
from .generative.trip import TRIP
from .metrics import MNISTFeatures, frechet_distance, mnist_fid
from .posterior.swag import SWAG, swa_learning_rate, swa_scheduler
from .train import evaluate, fit, predict_proba, seed_everything
from .weights import assign_params, flatten_params, num_params, param_spec

__version__ = "0.1.0"

__all__ = [
    # core
    "data", "metrics", "models", "plots", "train",
    "refresh_bn", "fit", "evaluate", "predict_proba", "seed_everything",
    "flatten_params", "assign_params", "num_params", "param_spec",
    "MNISTFeatures", "frechet_distance", "mnist_fid",
    # SWA / SWAG
    "SWAG", "swa_learning_rate", "swa_scheduler",
    # FGE and curves
    "FGESchedule", "Ensemble", "collect_fge",
    "Bezier", "PolyChain", "train_curve", "evaluate_path", "linear_path",
    # compression
    "sbp", "measure_speedup", "count_flops", "PerforatedConv2d", "perforate", "search_rates",
    # generative
    "TRIP", "ImplicitMH", "train_discriminator", "train_pair_discriminator",
]
