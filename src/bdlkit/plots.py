"""PNG plots: reliability diagrams, line plots along a path, sample grids, 2-D scatters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: plots are always written to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .metrics import ece, reliability_data  # noqa: E402

__all__ = ["reliability_diagram", "line_plot", "sample_grid", "scatter_2d"]


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def reliability_diagram(
    predictions: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    path: str | Path,
    n_bins: int = 15,
    title: str = "Reliability diagram",
) -> Path:
    """Plot accuracy minus confidence per confidence bin for one or more methods.

    The difference view (as in the SWAG paper) keeps well-calibrated methods readable: a
    perfectly calibrated model lies on zero. Each legend entry shows the method's ECE.

    Example:
        >>> p = torch.softmax(torch.randn(100, 10), 1); y = torch.randint(0, 10, (100,))
        >>> reliability_diagram({"model": (p, y)}, "/tmp/rel.png")  # doctest: +SKIP
    """
    if not predictions:
        raise ValueError("predictions must name at least one method")
    fig, (ax_gap, ax_hist) = plt.subplots(
        2, 1, figsize=(6.4, 6.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    for name, (probs, labels) in predictions.items():
        rel = reliability_data(probs, labels, n_bins)
        centers = (np.array(rel["bin_lower"]) + np.array(rel["bin_upper"])) / 2
        used = np.array(rel["count"]) > 0
        gap = np.array(rel["accuracy"]) - np.array(rel["confidence"])
        label = f"{name} (ECE {ece(probs, labels, n_bins):.3f})"
        ax_gap.plot(centers[used], gap[used], marker="o", label=label)
        ax_hist.plot(centers[used], np.array(rel["count"])[used] / len(labels), marker=".")
    ax_gap.axhline(0.0, color="k", lw=0.8, ls="--")
    ax_gap.set_ylabel("accuracy - confidence")
    ax_gap.set_title(title)
    ax_gap.legend(fontsize=8)
    ax_hist.set_yscale("log")
    ax_hist.set_xlabel("confidence (max probability)")
    ax_hist.set_ylabel("fraction")
    return _save(fig, path)


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    logy: bool = False,
) -> Path:
    """Plot named ``(xs, ys)`` series on one axis.

    Example:
        >>> line_plot({"a": ([0, 1], [1, 2])}, "/tmp/line.png")  # doctest: +SKIP
    """
    if not series:
        raise ValueError("series must hold at least one (xs, ys) pair")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise ValueError(f"series {name!r}: xs and ys differ in length")
        ax.plot(list(xs), list(ys), marker="." if len(xs) < 80 else None, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def sample_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, title: str = "") -> Path:
    """Tile grey-scale images (N x 1 x H x W or N x H x W, values in [0, 1]) into one PNG.

    Example:
        >>> sample_grid(torch.rand(16, 1, 28, 28), "/tmp/grid.png", nrow=4)  # doctest: +SKIP
    """
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
        raise ValueError("images must be an N x 1 x H x W or N x H x W tensor")
    if not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be a positive int, got {nrow!r}")
    imgs = images.detach().float().cpu()
    imgs = imgs[:, 0] if imgs.dim() == 4 else imgs
    n, h, w = imgs.shape
    rows = (n + nrow - 1) // nrow
    canvas = torch.ones(rows * (h + 2), nrow * (w + 2))
    for i in range(n):
        top, left = (i // nrow) * (h + 2) + 1, (i % nrow) * (w + 2) + 1
        canvas[top : top + h, left : left + w] = imgs[i]
    fig, ax = plt.subplots(figsize=(nrow * 0.6 + 0.4, rows * 0.6 + 0.6))
    ax.imshow(canvas.clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def scatter_2d(points: Mapping[str, torch.Tensor], path: str | Path, title: str = "",
               ncols: int | None = None) -> Path:
    """One scatter panel per named (N, 2) point set, sharing axes.

    Example:
        >>> scatter_2d({"x": torch.randn(100, 2)}, "/tmp/sc.png")  # doctest: +SKIP
    """
    if not points:
        raise ValueError("points must hold at least one (N, 2) tensor")
    n = len(points)
    ncols = ncols or n
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.2 * nrows), squeeze=False,
                             sharex=True, sharey=True)
    for ax, (name, pts) in zip(axes.flat, points.items(), strict=False):
        pts = torch.as_tensor(pts).detach().cpu()
        if pts.dim() != 2 or pts.shape[1] != 2:
            raise ValueError(f"points[{name!r}] must be an (N, 2) tensor")
        ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=2, alpha=0.4)
        ax.set_title(name, fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
