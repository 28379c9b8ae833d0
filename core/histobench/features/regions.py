"""Region-level data for hierarchical encoders (HIPT, SLPD): regions of a slide as grids of patch embeddings.

A region is ``grid x grid`` adjacent patches of ``patch_px`` pixels at ``patch_mpp`` µm/px (HIPT: 16 x 16
patches of 256 px at 20x, a 4096 px region). Regions are laid on a non-overlapping grid and kept when
enough of their area is tissue; every patch of a kept region is embedded, background patches included, so
a region's grid is spatially complete. Patches are stored region-major, row-major inside a region, so a
slide's patch features ``[R * grid * grid, D]`` reshape to grids ``[R, D, grid, grid]``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from histobench.errors import HistobenchError
from histobench.slides.tiling import TileSet, tile_slide


def region_tiles(slide, *, patch_mpp: float, patch_px: int, grid: int, min_tissue: float) -> TileSet:
    """The kept regions of one slide (a :class:`TileSet` whose tiles are whole regions).

    A slide narrower or shorter than one region at ``patch_mpp`` cannot hold any region, whatever its tissue:
    that raises ``HistobenchError("slide smaller than one region (W×H px at X µm/px vs a region of R px)")``
    (W×H the slide's size at ``patch_mpp``), which the pipeline records as the slide's reason in the status
    table, so it is never reported as "no tissue region".
    """
    region = patch_px * grid
    if patch_mpp > 0 and getattr(slide, "mpp", None):
        w0, h0 = slide.dimensions
        side0 = region * patch_mpp / slide.mpp  # a region's side in level-0 px, as tile_slide lays the grid
        if min(w0, h0) / side0 + 1e-9 < 1:
            w, h = w0 * slide.mpp / patch_mpp, h0 * slide.mpp / patch_mpp
            raise HistobenchError(f"slide smaller than one region ({w:.0f}×{h:.0f} px at {patch_mpp:g} µm/px "
                                  f"vs a region of {region} px)")
    return tile_slide(slide, mpp=patch_mpp, tile_size=region, min_tissue=min_tissue)


def patches_of(regions: TileSet, grid: int, patch_px: int) -> TileSet:
    """Every patch of the regions, region-major and row-major inside a region."""
    side0 = regions.tile_size_level0 / grid  # a patch's side in level-0 pixels
    cols, rows = np.meshgrid(np.arange(grid), np.arange(grid), indexing="xy")
    offs = np.stack([cols.ravel(), rows.ravel()], -1)  # (x, y) offsets in patches, row-major
    coords = (regions.coords[:, None, :] + np.round(offs[None] * side0).astype(np.int64)).reshape(-1, 2)
    return replace(
        regions,
        coords=coords,
        read_size=max(1, int(round(regions.read_size / grid))),
        tile_size=patch_px,
        tissue_fraction=np.repeat(regions.tissue_fraction, grid * grid).astype(np.float32),
        tile_size_level0=side0,
    )


def to_grids(patch_features: np.ndarray, grid: int) -> np.ndarray:
    """Region-major patch features ``[R * grid * grid, D]`` -> channels-first grids ``[R, D, grid, grid]``."""
    n, d = patch_features.shape
    if n % (grid * grid):
        raise ValueError(f"{n} patch features are not a whole number of {grid}x{grid} regions")
    return patch_features.reshape(-1, grid, grid, d).transpose(0, 3, 1, 2).astype(np.float32, copy=False)


class GridDataset:
    """Region grids of a cohort, slides contiguous: ``dataset[i] -> (grid [D, g, g], slide_index, region_index)``."""

    input_key = "grids"

    def __init__(self, grids: np.ndarray, slide_index: np.ndarray, slide_labels=None):
        import torch

        self.grids = torch.as_tensor(grids, dtype=torch.float32)
        self.slide_index = np.asarray(slide_index, dtype=np.int64)
        if np.any(np.diff(self.slide_index) < 0):
            raise ValueError("regions of a slide must be contiguous and slides in order")
        starts = np.searchsorted(self.slide_index, np.arange(self.slide_index.max() + 1 if len(self.slide_index) else 0))
        self.tile_index = np.arange(len(self.slide_index)) - starts[self.slide_index]
        self.slide_labels = slide_labels

    def __len__(self) -> int:
        return len(self.slide_index)

    def __getitem__(self, idx: int):
        return self.grids[idx], int(self.slide_index[idx]), int(self.tile_index[idx])
