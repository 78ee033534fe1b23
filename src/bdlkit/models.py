"""Small reference networks used by the recipes and tests. All are plain ``nn.Module``s."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["LeNet5", "LeNet300_100", "LeNet500_300", "VGGSmall", "MLP"]


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class LeNet5(nn.Module):
    """LeNet5, Caffe variant: conv 20@5x5, pool, conv 50@5x5, pool, fc 800->500, fc 500->10.

    Layers are ``features`` (Sequential) and ``classifier`` (Sequential) so that pruning and
    perforation can address them by name.

    Example:
        >>> LeNet5()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        _check_positive("num_classes", num_classes)
        _check_positive("in_channels", in_channels)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(800, 500),
            nn.ReLU(inplace=True),
            nn.Linear(500, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _DenseNet(nn.Module):
    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


class LeNet300_100(_DenseNet):
    """Fully connected 784-300-100-10 network (LeCun et al. 1998).

    Example:
        >>> LeNet300_100()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_features: int = 784) -> None:
        _check_positive("num_classes", num_classes)
        _check_positive("in_features", in_features)
        super().__init__([in_features, 300, 100, num_classes])


class LeNet500_300(_DenseNet):
    """Fully connected 784-500-300-10 network used in the SBP paper.

    Example:
        >>> LeNet500_300()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_features: int = 784) -> None:
        _check_positive("num_classes", num_classes)
        _check_positive("in_features", in_features)
        super().__init__([in_features, 500, 300, num_classes])


class VGGSmall(nn.Module):
    """A small VGG-style network with BatchNorm for 28x28 (or 32x32) inputs.

    ``widths`` gives the channels of the three conv blocks (two 3x3 convs + BN + ReLU each,
    then 2x2 max pooling); the classifier is global average pooling + one linear layer.

    Example:
        >>> VGGSmall()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        _check_positive("num_classes", num_classes)
        _check_positive("in_channels", in_channels)
        if len(widths) < 1 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be positive ints, got {widths!r}")
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            for _ in range(2):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                           nn.ReLU(inplace=True)]
                c = w
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Multi-layer perceptron for regression or classification on flat features.

    Example:
        >>> MLP(13, 1, hidden=(50,))(torch.zeros(4, 13)).shape
        torch.Size([4, 1])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (50,),
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        _check_positive("in_features", in_features)
        _check_positive("out_features", out_features)
        if any(not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden must hold positive ints, got {hidden!r}")
        layers: list[nn.Module] = []
        c = in_features
        for h in hidden:
            layers += [nn.Linear(c, h), activation()]
            c = h
        layers.append(nn.Linear(c, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1) if x.dim() > 2 else x)
