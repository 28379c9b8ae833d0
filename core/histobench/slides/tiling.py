"""Tile coordinates at a target resolution: where to read, at which pyramid level, and how much tissue each holds.

A :class:`TileSet` stores coordinates only (level-0 top-left corners), never pixels; :func:`read_tile` turns one
into a ``tile_size`` x ``tile_size`` RGB array at the target µm/px.
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from histobench.errors import HistobenchError
from histobench.faults import fault_point
from histobench.slides.reader import Slide
from histobench.slides.tissue import tissue_mask

# Pyramid levels whose downsample exceeds the wanted scale factor by less than this (relative) still count as
# "<=": scanners store e.g. 2.0003 for a nominal 2x level, and reading it costs a 0.02% upsampling at most.
_LEVEL_TOLERANCE = 1e-2

_FORMAT_VERSION = 1


@dataclass
class TileSet:
    """Non-overlapping tiles of one slide at a target resolution.

    ``coords`` are level-0 (x, y) top-left corners; each tile is ``read_size`` px square at pyramid ``level`` and
    is resized to ``tile_size`` px, which makes it ``mpp`` µm/px. ``tissue_fraction`` is the fraction of each tile
    covered by the tissue mask.
    """

    slide_id: str
    coords: np.ndarray  # int64 [N, 2], level-0 x, y
    level: int
    read_size: int
    tile_size: int
    mpp: float
    tissue_fraction: np.ndarray  # float32 [N]
    min_tissue: float = 0.5
    tile_size_level0: float = 0.0  # side of a tile in level-0 pixels (tile_size * mpp / slide mpp)
    source: str = ""  # slide_fingerprint() of the file the tiles were computed on ("" if unknown)

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.int64).reshape(-1, 2)
        self.tissue_fraction = np.asarray(self.tissue_fraction, dtype=np.float32).reshape(-1)
        if len(self.coords) != len(self.tissue_fraction):
            raise ValueError(
                f"TileSet {self.slide_id}: {len(self.coords)} coords but {len(self.tissue_fraction)} tissue fractions"
            )

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @staticmethod
    def make_key(mpp: float, tile_size: int, min_tissue: float) -> str:
        """The cache key of a tiling: ``mpp0.5_px256_tis0.5``. Stable across runs and platforms."""
        return f"mpp{float(mpp):g}_px{int(tile_size)}_tis{float(min_tissue):g}"

    def key(self) -> str:
        """A short stable string of the tiling parameters (µm/px, tile size, minimum tissue) for cache paths."""
        return self.make_key(self.mpp, self.tile_size, self.min_tissue)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write this tile set to ``path`` (.npz) atomically: a temporary file in the same folder, then a rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    format_version=np.int64(_FORMAT_VERSION),
                    slide_id=np.array(self.slide_id),
                    coords=self.coords,
                    level=np.int64(self.level),
                    read_size=np.int64(self.read_size),
                    tile_size=np.int64(self.tile_size),
                    mpp=np.float64(self.mpp),
                    tissue_fraction=self.tissue_fraction,
                    min_tissue=np.float64(self.min_tissue),
                    tile_size_level0=np.float64(self.tile_size_level0),
                    source=np.array(self.source),
                )
            fault_point("tile.rename")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TileSet:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(
                    slide_id=str(z["slide_id"]),
                    coords=z["coords"],
                    level=int(z["level"]),
                    read_size=int(z["read_size"]),
                    tile_size=int(z["tile_size"]),
                    mpp=float(z["mpp"]),
                    tissue_fraction=z["tissue_fraction"],
                    min_tissue=float(z["min_tissue"]),
                    tile_size_level0=float(z["tile_size_level0"]),
                    source=str(z["source"]) if "source" in z.files else "",
                )
        except FileNotFoundError as exc:
            raise HistobenchError(f"tile file {path} does not exist") from exc
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # truncated, damaged, foreign
            raise HistobenchError(f"tile file {path} is unreadable or not a histobench tile set: {exc}") from exc


def slide_fingerprint(path: str | os.PathLike[str]) -> str:
    """A cheap content fingerprint of a slide file: its size and a hash of its first and last MiB.

    Caches derived from a slide (tile sets, feature files) store it, so that a file replaced by other
    content under the same name (a regenerated synthetic cohort, a re-scanned slide) is never served stale
    tiles or features, while a copy of the same file (another mount, new modification time) still matches.
    A DICOM folder is fingerprinted by its sorted files.
    """
    import hashlib

    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    chunk = 1 << 20
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size};".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(chunk))
            if size > chunk:
                fh.seek(max(size - chunk, chunk))
                h.update(fh.read(chunk))
    return h.hexdigest()[:16]


def choose_level(level_downsamples: tuple[float, ...] | list[float], scale: float) -> int:
    """The pyramid level with the largest downsample that is <= ``scale`` (within a 1% tolerance); 0 if none."""
    best = 0
    for i, ds in enumerate(level_downsamples):
        if ds <= scale * (1 + _LEVEL_TOLERANCE) and ds > level_downsamples[best]:
            best = i
    return best


def _box_fractions(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """Exact mean of a 0/1 ``mask`` over axis-aligned boxes with fractional corners (in mask pixel units).

    The integral of a piecewise-constant image over [0, x] x [0, y] is bilinear inside each pixel, so bilinear
    interpolation of the summed-area table at fractional points is exact.
    """
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), dtype=np.float64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1)

    def integral(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x = np.clip(x, 0, w)
        y = np.clip(y, 0, h)
        xi = np.minimum(np.floor(x).astype(np.int64), w - 1)
        yi = np.minimum(np.floor(y).astype(np.int64), h - 1)
        fx = x - xi
        fy = y - yi
        a = sat[yi, xi]
        b = sat[yi, xi + 1]
        c = sat[yi + 1, xi]
        d = sat[yi + 1, xi + 1]
        return a * (1 - fx) * (1 - fy) + b * fx * (1 - fy) + c * (1 - fx) * fy + d * fx * fy

    total = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
    area = np.maximum((x1 - x0) * (y1 - y0), 1e-12)
    return np.clip(total / area, 0.0, 1.0)


def tile_slide(
    slide: Slide,
    *,
    mpp: float,
    tile_size: int,
    min_tissue: float = 0.5,
    thumbnail_side: int = 1024,
) -> TileSet:
    """Tile ``slide`` into non-overlapping ``tile_size`` px tiles at ``mpp`` µm/px, keeping tiles with tissue.

    The tissue mask is computed on a thumbnail (longer side ``thumbnail_side``). A tile covers
    ``tile_size * mpp / slide.mpp`` level-0 pixels; it is read from the pyramid level with the largest downsample
    that does not exceed that scale factor (so it is read at the target resolution or finer and downsampled).
    Only whole tiles inside the slide are made; those with a tissue fraction >= ``min_tissue`` are kept.
    """
    if not (mpp > 0 and math.isfinite(mpp)):
        raise HistobenchError(f"tiling slide {slide.slide_id}: target mpp must be positive, got {mpp}")
    if tile_size <= 0:
        raise HistobenchError(f"tiling slide {slide.slide_id}: tile size must be positive, got {tile_size}")
    if not 0.0 <= min_tissue <= 1.0:
        raise HistobenchError(f"tiling slide {slide.slide_id}: min_tissue must be in [0, 1], got {min_tissue}")

    scale = mpp / slide.mpp
    side0 = tile_size * scale
    level = choose_level(slide.level_downsamples, scale)
    read_size = max(1, int(round(side0 / slide.level_downsamples[level])))

    w0, h0 = slide.dimensions
    nx = int(math.floor(w0 / side0 + 1e-9))
    ny = int(math.floor(h0 / side0 + 1e-9))
    if nx == 0 or ny == 0:
        coords = np.zeros((0, 2), dtype=np.int64)
        frac = np.zeros(0, dtype=np.float32)
    else:
        thumb, _ = slide.thumbnail(thumbnail_side)
        mask = tissue_mask(thumb).astype(np.float64)
        mh, mw = mask.shape
        sx, sy = w0 / mw, h0 / mh  # level-0 px per mask px along each axis
        gx = np.round(np.arange(nx) * side0).astype(np.int64)
        gy = np.round(np.arange(ny) * side0).astype(np.int64)
        yy, xx = np.meshgrid(gy, gx, indexing="ij")  # row-major: tiles ordered by y, then x
        xs = xx.ravel()
        ys = yy.ravel()
        frac_all = _box_fractions(mask, xs / sx, ys / sy, (xs + side0) / sx, (ys + side0) / sy)
        keep = frac_all >= min_tissue - 1e-9
        coords = np.stack([xs[keep], ys[keep]], axis=1).astype(np.int64)
        frac = frac_all[keep].astype(np.float32)

    return TileSet(
        slide_id=slide.slide_id,
        coords=coords,
        level=level,
        read_size=read_size,
        tile_size=int(tile_size),
        mpp=float(mpp),
        tissue_fraction=frac,
        min_tissue=float(min_tissue),
        tile_size_level0=float(side0),
    )


def read_tile(slide: Slide, tileset: TileSet, i: int) -> np.ndarray:
    """Tile ``i`` of ``tileset`` as uint8 RGB [tile_size, tile_size, 3] at the tile set's µm/px."""
    n = len(tileset)
    if not -n <= i < n:
        raise IndexError(f"tile {i} out of range for {tileset.slide_id} ({n} tiles)")
    x, y = (int(v) for v in tileset.coords[i])
    rs = tileset.read_size
    region = slide.read_region(x, y, tileset.level, rs, rs)
    return resize_tile(region, tileset.tile_size)


def resize_tile(region: np.ndarray, tile_size: int) -> np.ndarray:
    """A square uint8 RGB region resized to ``tile_size`` px as :func:`read_tile` does: PIL BOX when shrinking,
    BILINEAR when enlarging, unchanged when already that size."""
    from PIL import Image

    rs = region.shape[1]
    if rs == tile_size and region.shape[0] == tile_size:
        return region
    method = Image.Resampling.BOX if rs > tile_size else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(region).resize((tile_size, tile_size), method))


def select_tiles(tileset: TileSet, max_tiles: int, seed: int) -> TileSet:
    """A deterministic random subset of at most ``max_tiles`` tiles, in their original order.

    ``max_tiles <= 0`` or a tile set that is already small enough returns the tile set unchanged.
    """
    n = len(tileset)
    if max_tiles <= 0 or n <= max_tiles:
        return tileset
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=max_tiles, replace=False))
    return replace(tileset, coords=tileset.coords[idx], tissue_fraction=tileset.tissue_fraction[idx])
