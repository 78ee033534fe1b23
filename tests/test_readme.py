"""The README's library examples run top to bottom, exactly as written.

Only the data size is cut (MNIST is patched to small subsets) so that the whole walk-through
fits in the test budget; every call and argument is the README's own.
"""

import re
from pathlib import Path

import torch
from torch import nn

import bdlkit as bk

README = Path(__file__).resolve().parents[1] / "README.md"


def _library_blocks() -> list[str]:
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text[text.index("## Library"):], re.S)


def test_readme_has_the_library_blocks():
    blocks = _library_blocks()
    assert len(blocks) == 2
    assert "bk.SWAG(" in blocks[1] and "bk.ImplicitMH(" in blocks[1]


def test_readme_library_examples_run(monkeypatch, mnist_data):
    train, test = mnist_data
    small = (bk.data.subset(train, 192, seed=0), bk.data.subset(test, 64, seed=0))
    monkeypatch.setattr(bk.data, "mnist", lambda *args, **kwargs: small)
    torch.manual_seed(0)
    namespace: dict = {}
    for i, block in enumerate(_library_blocks()):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    probs = namespace["probs"]
    assert probs.shape == (64, 10) and torch.allclose(probs.sum(1), torch.ones(64), atol=1e-5)
    assert isinstance(namespace["sample"], nn.Module) and isinstance(namespace["mid"], nn.Module)
    assert len(namespace["ens"].members) == 4
    x = namespace["x"]
    assert torch.allclose(namespace["small"](x), namespace["noisy"].eval()(x), atol=1e-4)
    assert namespace["result"].samples.shape[-1] == 2
