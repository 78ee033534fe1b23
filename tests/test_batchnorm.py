import pytest
import torch
from torch import nn

from bdlkit import refresh_bn
from bdlkit.batchnorm import has_batchnorm


def _net():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def test_refresh_equals_full_data_statistics():
    net = _net()
    x = torch.randn(400, 3) * 3 + 1
    batches = list(x.split(100))
    net[1].running_mean.fill_(5.0)
    refresh_bn(net, [(b, torch.zeros(len(b))) for b in batches])
    h = net[0](x).detach()
    # Equal-size batches: cumulative average of batch means = overall mean.
    assert torch.allclose(net[1].running_mean, h.mean(0), atol=1e-5)
    per_batch_var = torch.stack([net[0](b).detach().var(0, unbiased=True) for b in batches])
    assert torch.allclose(net[1].running_var, per_batch_var.mean(0), atol=1e-5)
    assert net[1].momentum == 0.1  # restored


def test_refresh_restores_mode_and_handles_dicts_and_num_batches():
    net = _net().eval()
    batches = [{"x": torch.randn(8, 3)} for _ in range(5)]
    refresh_bn(net, batches, num_batches=2, call_fn=lambda m, b: m(b["x"]))
    assert not net.training
    assert int(net[1].num_batches_tracked) == 2
    refresh_bn(net, [{"input": torch.randn(8, 3)}])
    assert int(net[1].num_batches_tracked) == 1


def test_refresh_errors():
    net = _net()
    with pytest.raises(ValueError, match="num_batches"):
        refresh_bn(net, [torch.randn(4, 3)], num_batches=0)
    with pytest.raises(ValueError, match="no batches"):
        refresh_bn(net, [])
    with pytest.raises(TypeError, match="call_fn"):
        refresh_bn(net, [{"weird": torch.randn(4, 3)}])
    assert not has_batchnorm(nn.Linear(2, 2))
    refresh_bn(nn.Linear(2, 2), [])  # nothing to do, no error
