import pytest


@pytest.fixture(scope="session")
def mnist_data():
    from bdlkit import data

    return data.mnist()


@pytest.fixture(scope="session")
def fashion_data():
    from bdlkit import data

    return data.fashion_mnist()
