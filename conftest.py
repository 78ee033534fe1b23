"""Root pytest configuration: every test and doctest starts from the same torch seed."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
