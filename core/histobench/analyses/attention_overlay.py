"""Overlay images of a ViT's [CLS] attention thresholded at mass p, drawn on the tiles (one grid per encoder).

DINO (Caron et al., ICCV 2021, §4.2.1 and Fig. 3) shows attention maps by keeping the smallest set of patches
that holds 60 % of the [CLS] attention mass. Each row of the grid is one tile; its columns are the tile, the
mean of the heads' maps ("mean"), then every head. In an attention panel the kept patches are shown as they
are, the others darkened, with the kept region's outline and ``F(p)`` (the kept fraction) in its title.
Drawn with matplotlib's object API (``Figure``, Agg canvas): no pyplot state, no display needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from histobench.analyses.attention_metrics import as_rows, threshold_mask

DARKEN = 0.65  # opacity of the black layer over the patches outside the thresholded mask
OUTLINE = "#00e5ff"


def _upsample(cells: np.ndarray, size: int) -> np.ndarray:
    """A ``[h, w]`` cell map stretched to ``[size, size]`` pixels (nearest cell under each pixel centre)."""
    h, w = cells.shape
    rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(int), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(int), w - 1)
    return cells[np.ix_(rows, cols)]


def _panel(ax, tile: np.ndarray, keep: np.ndarray, title: str) -> None:
    size = tile.shape[0]
    ax.imshow(tile, interpolation="nearest")
    shade = np.zeros(keep.shape + (4,))
    shade[..., 3] = np.where(keep, 0.0, DARKEN)
    ax.imshow(shade, interpolation="nearest", extent=(0, size, size, 0))
    if keep.any() and not keep.all():
        fine = _upsample(keep.astype(float), size)
        ax.contour(np.arange(size) + 0.5, np.arange(size) + 0.5, fine, levels=[0.5], colors=OUTLINE, linewidths=0.8)
    ax.set_xlim(0, size)
    ax.set_ylim(size, 0)
    ax.set_title(title, fontsize=6, pad=2)
    ax.set_xticks([])
    ax.set_yticks([])


def overlay_grid(tiles: Any, attention: Any, grid: tuple[int, int], path: Path, title: str = "",
                 p: float = 0.6, row_labels: list[str] | None = None) -> Path:
    """Write the overlay grid of ``tiles`` (uint8 ``[n, S, S, 3]``) and their attention (``[n, heads, h*w]``,
    row-major patches of the ``grid``) to ``path`` (PNG) and return it."""
    from matplotlib.figure import Figure

    tiles = np.asarray(tiles)
    a = as_rows(attention)
    n, heads = a.shape[0], a.shape[1]
    h, w = grid
    maps = np.concatenate([a.mean(axis=1, keepdims=True), a], axis=1)  # [n, 1 + heads, N]
    keep = threshold_mask(maps, p).reshape(n, heads + 1, h, w)
    kept = keep.reshape(n, heads + 1, -1).mean(axis=-1)
    cols = heads + 2
    fig = Figure(figsize=(1.15 * cols, 1.2 * n + 0.4), dpi=110, layout="constrained")
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        ax = axes[i][0]
        ax.imshow(tiles[i], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(row_labels[i] if row_labels else f"tile {i}", fontsize=5, pad=2)
        for j in range(heads + 1):
            name = "mean" if j == 0 else f"head {j - 1}"
            _panel(axes[i][j + 1], tiles[i], keep[i, j], f"{name}: F({p:g})={kept[i, j]:.2f}")
    if title:
        fig.suptitle(title, fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


__all__ = ["overlay_grid"]
