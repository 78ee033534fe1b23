import pytest
import torch


@pytest.fixture(scope="session")
def mnist_data():
    from bdlkit import data

    return data.mnist()


@pytest.fixture(scope="session")
def fashion_data():
    from bdlkit import data

    return data.fashion_mnist()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
