import pytest
import torch
from torch import nn

from bdlkit import models
from bdlkit.weights import assign_params, flatten_params, num_params, param_spec


@pytest.mark.parametrize("cls", [models.LeNet5, models.LeNet300_100, models.LeNet500_300,
                                 models.VGGSmall])
def test_classifiers_output_shape(cls):
    assert cls()(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_lenet5_is_the_caffe_variant():
    net = models.LeNet5()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [20, 50]
    assert [c.kernel_size for c in convs] == [(5, 5), (5, 5)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(800, 500), (500, 10)]
    assert num_params(net) == 431080


def test_lenet500_300_sizes():
    fcs = [m for m in models.LeNet500_300().modules() if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(784, 500), (500, 300), (300, 10)]


def test_vgg_small_has_batchnorm_and_handles_32x32():
    net = models.VGGSmall(in_channels=3)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_mlp_regression():
    assert models.MLP(13, 1, hidden=(20, 20))(torch.zeros(5, 13)).shape == (5, 1)


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_model_validation(bad):
    with pytest.raises(ValueError, match="num_classes"):
        models.LeNet5(num_classes=bad)


def test_flatten_assign_round_trip_channels_last():
    net = models.VGGSmall().to(memory_format=torch.channels_last)
    vec = flatten_params(net)
    assert vec.numel() == num_params(net)
    target = torch.randn_like(vec)
    assign_params(net, target)
    assert torch.equal(flatten_params(net), target)
    # Memory format of the parameters is preserved.
    conv = net.features[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_flatten_order_matches_param_spec():
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    spec = param_spec(net)
    assert spec == [("0.weight", (3, 2)), ("0.bias", (3,)), ("1.weight", (1, 3)), ("1.bias", (1,))]
    vec = flatten_params(net)
    assert torch.equal(vec[:6], net[0].weight.detach().reshape(-1))


def test_assign_wrong_length_leaves_module_unchanged():
    net = nn.Linear(2, 2)
    before = flatten_params(net).clone()
    with pytest.raises(ValueError, match="vector has 3 elements"):
        assign_params(net, torch.zeros(3))
    assert torch.equal(flatten_params(net), before)
    with pytest.raises(TypeError):
        assign_params(net, torch.zeros(2, 3))
