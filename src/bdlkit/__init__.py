"""bdlkit: Bayesian deep learning methods as practical PyTorch tools.

Example:
    >>> import bdlkit as bk
    >>> net = bk.models.LeNet5()
    >>> bk.flatten_params(net).numel() == bk.num_params(net)
    True
"""

from . import data, metrics, models, plots, train
from .batchnorm import refresh_bn
from .metrics import MNISTFeatures, frechet_distance, mnist_fid
from .train import evaluate, fit, predict_proba, seed_everything
from .weights import assign_params, flatten_params, num_params, param_spec

__version__ = "0.1.0"

__all__ = [
    "data", "metrics", "models", "plots", "train",
    "refresh_bn",
    "fit", "evaluate", "predict_proba", "seed_everything",
    "flatten_params", "assign_params", "num_params", "param_spec",
    "MNISTFeatures", "frechet_distance", "mnist_fid",
]
