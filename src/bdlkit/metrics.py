"""Predictive metrics (accuracy, NLL, Brier, ECE, OOD AUROC, reliability data) and MNIST-FID."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import binary_auroc, multiclass_calibration_error

__all__ = [
    "accuracy",
    "nll",
    "brier",
    "ece",
    "predictive_entropy",
    "ood_auroc",
    "reliability_data",
    "classification_metrics",
    "frechet_distance",
    "MNISTFeatures",
    "mnist_fid",
]

_EPS = 1e-12


def _check_probs(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        raise ValueError("probs must be an (N, C) tensor of class probabilities")
    if not isinstance(labels, torch.Tensor) or labels.shape != probs.shape[:1]:
        raise ValueError(f"labels must have shape ({probs.shape[0]},), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
    if probs.shape[0] == 0:
        raise ValueError("probs is empty")


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of correct argmax predictions.

    Example:
        >>> accuracy(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 0]))
        0.5
    """
    _check_probs(probs, labels)
    return float((probs.argmax(1) == labels).float().mean())


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class (a mean, not a sum).

    Example:
        >>> round(nll(torch.tensor([[0.5, 0.5]]), torch.tensor([0])), 4)
        0.6931
    """
    _check_probs(probs, labels)
    picked = probs.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    return float(-picked.double().clamp_min(_EPS).log().mean())


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score: mean over samples of sum_k (p_k - 1[y=k])^2.

    Example:
        >>> brier(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
        0.0
    """
    _check_probs(probs, labels)
    onehot = F.one_hot(labels.long(), probs.shape[1]).to(probs.dtype)
    return float(((probs - onehot) ** 2).sum(1).mean())


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error (L1, equal-width confidence bins), via torchmetrics.

    Example:
        >>> ece(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
        0.0
    """
    _check_probs(probs, labels)
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    return float(multiclass_calibration_error(probs.float(), labels.long(), probs.shape[1],
                                              n_bins=n_bins, norm="l1"))


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each predictive distribution (nats); a standard OOD score.

    Example:
        >>> predictive_entropy(torch.tensor([[0.5, 0.5]]))
        tensor([0.6931])
    """
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        raise ValueError("probs must be an (N, C) tensor")
    return -(probs * probs.clamp_min(_EPS).log()).sum(1)


def ood_auroc(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    """AUROC of telling out-of-distribution from in-distribution inputs by a score.

    Higher scores must mean "more likely OOD" (e.g. predictive entropy).

    Example:
        >>> ood_auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.8, 0.9]))
        1.0
    """
    for name, s in (("score_in", score_in), ("score_out", score_out)):
        if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 1-D tensor")
        if not torch.isfinite(s).all():
            raise ValueError(f"{name} holds non-finite values")
    scores = torch.cat([score_in, score_out]).double()
    target = torch.cat([torch.zeros(len(score_in)), torch.ones(len(score_out))]).long()
    return float(binary_auroc(scores, target, thresholds=None))


def reliability_data(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15,
                     ) -> dict[str, list[float]]:
    """Per-bin confidence, accuracy and counts for a reliability diagram.

    Bins are equal-width on the max-probability confidence, (lo, hi] as in torchmetrics.

    Example:
        >>> d = reliability_data(torch.tensor([[0.9, 0.1]]), torch.tensor([0]), n_bins=2)
        >>> d["count"]
        [0, 1]
    """
    _check_probs(probs, labels)
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = torch.bucketize(conf.double(), edges[1:-1], right=False)
    count = torch.bincount(idx, minlength=n_bins).double()
    conf_sum = torch.bincount(idx, weights=conf.double(), minlength=n_bins)
    acc_sum = torch.bincount(idx, weights=correct, minlength=n_bins)
    safe = count.clamp_min(1)
    return {
        "bin_lower": edges[:-1].tolist(),
        "bin_upper": edges[1:].tolist(),
        "confidence": (conf_sum / safe).tolist(),
        "accuracy": (acc_sum / safe).tolist(),
        "count": [int(c) for c in count.tolist()],
    }


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15,
                           ) -> dict[str, float]:
    """Accuracy, NLL, Brier and ECE in one dict.

    Example:
        >>> sorted(classification_metrics(torch.tensor([[0.7, 0.3]]), torch.tensor([0])))
        ['accuracy', 'brier', 'ece', 'nll']
    """
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
        "ece": ece(probs, labels, n_bins),
    }


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})``, computed in float64 through the
    symmetric matrix ``S_a^{1/2} S_b S_a^{1/2}`` so no non-symmetric square root is needed.

    Example:
        >>> x = torch.randn(500, 3); round(frechet_distance(x, x), 6)
        0.0
    """
    for name, f in (("feats_a", feats_a), ("feats_b", feats_b)):
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} must be an (N, K) tensor with N >= 2")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError("feats_a and feats_b must have the same feature dimension")
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    dist = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt
    return float(dist.clamp_min(0))


class MNISTFeatures(nn.Module):
    """Feature extractor for an "MNIST-FID": the 500-d fc1 activations of a LeNet5 we train.

    Inception weights are not available offline, so the Fréchet distance uses a LeNet5
    classifier trained by :meth:`pretrained` (cached under the bdlkit cache directory).

    Example:
        >>> ext = MNISTFeatures.pretrained()  # doctest: +SKIP
        >>> ext.features(torch.rand(8, 1, 28, 28)).shape  # doctest: +SKIP
        torch.Size([8, 500])
    """

    def __init__(self) -> None:
        super().__init__()
        from .models import LeNet5

        self.net = LeNet5()

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """fc1 + ReLU activations of images in [0, 1], shape (N, 1, 28, 28) or (N, 784)."""
        if not isinstance(x, torch.Tensor) or x.shape[-1] * (x.shape[-2] if x.dim() > 2 else 1) \
                != 784:
            raise ValueError("x must hold 28x28 images: (N, 1, 28, 28), (N, 28, 28) or (N, 784)")
        x = x.reshape(-1, 1, 28, 28).float()
        self.eval()
        head = self.net.classifier[:3]  # Flatten, Linear(800, 500), ReLU
        out = [head(self.net.features(chunk)) for chunk in x.split(batch_size)]
        return torch.cat(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @classmethod
    def pretrained(cls, cache_dir: str | Path | None = None, epochs: int = 3, seed: int = 0,
                   quiet: bool = True) -> MNISTFeatures:
        """Load the cached classifier, or train it on MNIST (a few epochs, ~99 % accuracy)."""
        from . import data
        from .train import fit

        path = Path(cache_dir or data.cache_dir()) / f"mnist_fid_lenet5_e{epochs}_s{seed}.pt"
        model = cls()
        if path.is_file():
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        train, _ = data.mnist()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            fit(model, data.loader(train, 128, shuffle=True, seed=seed), epochs, opt, quiet=quiet)
        finally:
            torch.random.set_rng_state(gen_state)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
        return model.eval()


def mnist_fid(samples: torch.Tensor, reference: torch.Tensor,
              extractor: MNISTFeatures | None = None) -> float:
    """MNIST-FID between generated ``samples`` and ``reference`` images in [0, 1].

    Example:
        >>> real = data.mnist()[1].tensors[0][:1000]  # doctest: +SKIP
        >>> mnist_fid(real[:500], real[500:])  # doctest: +SKIP
    """
    ext = extractor if extractor is not None else MNISTFeatures.pretrained()
    return frechet_distance(ext.features(samples), ext.features(reference))
