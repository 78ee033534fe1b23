import math

import pytest
import torch

from bdlkit import metrics


def _random_preds(n=500, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, c, generator=g) * 2, 1)
    labels = torch.randint(0, c, (n,), generator=g)
    return probs, labels


def test_nll_brier_accuracy_closed_forms():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    labels = torch.tensor([0, 1])
    assert metrics.accuracy(probs, labels) == 0.5
    assert math.isclose(metrics.nll(probs, labels), -(math.log(0.7) + math.log(0.1)) / 2,
                        rel_tol=1e-6)
    expected_brier = ((0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.9**2 + 0.8**2)) / 2
    assert math.isclose(metrics.brier(probs, labels), expected_brier, rel_tol=1e-6)


def test_ece_matches_manual_binning():
    probs, labels = _random_preds()
    rel = metrics.reliability_data(probs, labels, n_bins=15)
    n = len(labels)
    manual = sum(c / n * abs(a - f) for c, a, f in
                 zip(rel["count"], rel["accuracy"], rel["confidence"], strict=True))
    assert math.isclose(metrics.ece(probs, labels), manual, abs_tol=1e-5)
    assert sum(rel["count"]) == n


def test_ood_auroc_matches_rank_statistic():
    g = torch.Generator().manual_seed(1)
    s_in, s_out = torch.randn(200, generator=g), torch.randn(150, generator=g) + 1
    pairs = (s_out[:, None] > s_in[None, :]).double().mean()
    assert math.isclose(metrics.ood_auroc(s_in, s_out), float(pairs), abs_tol=1e-6)
    with pytest.raises(ValueError, match="score_in"):
        metrics.ood_auroc(torch.tensor([float("nan")]), s_out)


def test_predictive_entropy():
    h = metrics.predictive_entropy(torch.full((2, 4), 0.25))
    assert torch.allclose(h, torch.full((2,), math.log(4)))


def test_metric_validation():
    with pytest.raises(ValueError, match="labels"):
        metrics.nll(torch.ones(3, 2) / 2, torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        metrics.accuracy(torch.ones(3, 2) / 2, torch.zeros(3))
    with pytest.raises(ValueError, match="n_bins"):
        metrics.ece(*_random_preds(), n_bins=0)


def test_frechet_distance_closed_form():
    # Two Gaussians with diagonal covariances: FD = |mu1-mu2|^2 + sum (s1 - s2)^2.
    g = torch.Generator().manual_seed(0)
    n = 200_000
    s1, s2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([2.0, 1.0, 0.5])
    a = torch.randn(n, 3, generator=g) * s1
    b = torch.randn(n, 3, generator=g) * s2 + torch.tensor([1.0, 0.0, -1.0])
    expected = 2.0 + float(((s1 - s2) ** 2).sum())
    assert math.isclose(metrics.frechet_distance(a, b), expected, rel_tol=0.02)
    assert metrics.frechet_distance(a, a) < 1e-6
    with pytest.raises(ValueError, match="same feature"):
        metrics.frechet_distance(a, b[:, :2])


@pytest.mark.slow
def test_mnist_fid_separates_real_from_noise(mnist_data, tmp_path):
    ext = metrics.MNISTFeatures.pretrained(cache_dir=tmp_path, epochs=1)
    test_x = mnist_data[1].tensors[0]
    real = metrics.mnist_fid(test_x[:2000], test_x[2000:4000], ext)
    blurred = metrics.mnist_fid(torch.nn.functional.avg_pool2d(test_x[:2000], 3, 1, 1),
                                test_x[2000:4000], ext)
    noise = metrics.mnist_fid(torch.rand(2000, 1, 28, 28), test_x[2000:4000], ext)
    assert real < blurred < noise
    # Cached: a second call loads the same weights.
    again = metrics.MNISTFeatures.pretrained(cache_dir=tmp_path, epochs=1)
    assert torch.equal(again.net.classifier[1].weight, ext.net.classifier[1].weight)
