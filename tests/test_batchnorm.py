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


def _stats(bn):
    return bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)


def test_failed_refresh_leaves_statistics_unchanged():
    net = _net()
    net(torch.randn(16, 3) * 3 + 5)  # training-mode pass: non-default statistics
    before = _stats(net[1])
    for bad_loader, error in (([], ValueError), ([{"foo": torch.randn(4, 3)}], TypeError)):
        with pytest.raises(error):
            refresh_bn(net, bad_loader)
        after = _stats(net[1])
        assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
        assert after[2] == before[2] and net[1].momentum == 0.1


def test_untracked_batchnorm_is_left_alone_and_tracked_ones_refreshed():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4),
                        nn.BatchNorm1d(4, track_running_stats=False))
    refresh_bn(net, [torch.randn(8, 3) * 2 + 3])
    assert int(net[1].num_batches_tracked) == 1 and net[1].running_mean.abs().sum() > 0
    assert not has_batchnorm(nn.BatchNorm1d(4, track_running_stats=False))
    assert has_batchnorm(net)


def test_refresh_restores_every_module_mode():
    net = _net().train()
    net[1].eval()  # a frozen BN while fine-tuning the rest
    refresh_bn(net, [torch.randn(8, 3)])
    assert net.training and not net[1].training and net[0].training


def test_num_batches_draws_no_extra_batch():
    net = _net()
    it = iter([torch.randn(8, 3) for _ in range(5)])
    refresh_bn(net, it, num_batches=2)
    assert int(net[1].num_batches_tracked) == 2 and len(list(it)) == 3
    with pytest.raises(TypeError, match="num_batches"):
        refresh_bn(net, [torch.randn(8, 3)], num_batches=True)
