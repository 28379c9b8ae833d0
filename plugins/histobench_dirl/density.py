"""Nuclei density of one slide and an overlay picture of a segmenter's nuclei, logged to MLflow.

A sanity check for a nuclei segmenter on real H&E before it feeds DiRL's cell prior (Kapse et al., arXiv
2309.06439; spec ``shared/methods/dirl.md`` §3): segment the slide's tissue tiles at a µm/px, count the nuclei,
and give the count per mm² of tile area and per mm² of tissue (tile area times the tile's tissue fraction from
the tissue mask). Published densities of nuclei in H&E tissue lie roughly between 1,000 and 6,000 /mm² at
20x-40x, which is what "plausible" means here. The picture is a strip of tiles with every nucleus outlined
(:func:`histobench_dirl.segmenters.overlay`), so that a person can see what was counted.

:func:`slide_density` does the work; :func:`log_density` writes ``density.json`` and ``overlay.png`` and logs
them, the options and the numbers as an MLflow run with the stage tag ``segmentation`` (never on a
leaderboard). ``scripts/nuclei_density.py`` is the command line around both.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histobench.errors import HistobenchError

STAGE = "segmentation"
EXPERIMENT = "segmentation-checks"


@dataclass
class SlideDensity:
    """Nuclei of one slide's tissue tiles: counts, densities, the tiles drawn in the overlay."""

    slide: str
    segmenter: str
    options: dict[str, Any]
    mpp: float
    tile_size: int
    tiles: int  # tissue tiles segmented (a sample when the slide has more than max_tiles)
    slide_tiles: int  # tissue tiles of the slide
    failed: list[dict[str, Any]]  # tiles the segmenter failed on: index and reason
    nuclei: int
    tile_area_mm2: float
    tissue_area_mm2: float
    nuclei_per_mm2: float  # per mm² of tile area
    nuclei_per_mm2_tissue: float
    nucleus_fraction: float  # share of tile pixels inside a nucleus
    mean_nucleus_um2: float  # nucleus pixels over nuclei, in µm²
    empty_tiles: int  # tiles without a nucleus
    seconds: float
    overlay: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)  # (tile, instances)

    def summary(self) -> dict[str, Any]:
        """Everything but the pixels (JSON-able)."""
        out = asdict(self)
        out.pop("overlay")
        return out

    def line(self) -> str:
        return (f"{self.segmenter} on {self.slide}: {self.nuclei:,} nuclei in {self.tiles} tiles of {self.tile_size} px at "
                f"{self.mpp:g} µm/px: {self.nuclei_per_mm2:,.0f} nuclei/mm² of tile area "
                f"({self.nuclei_per_mm2_tissue:,.0f} /mm² of tissue), {100 * self.nucleus_fraction:.0f} % of pixels in "
                f"nuclei, {len(self.failed)} tiles failed")


def slide_density(path: Path, segmenter: str = "hed-watershed", options: dict[str, Any] | None = None, mpp: float = 0.5,
                  tile_size: int = 256, max_tiles: int = 0, overlay_tiles: int = 4, reporter=None) -> SlideDensity:
    """Segment the tissue tiles of the slide at ``path`` (all, or ``max_tiles`` evenly spaced ones) with the named
    segmenter and count its nuclei. A tile the segmenter fails on is recorded in ``failed`` and left out of the
    counts; a user mistake (an unknown segmenter, a bad option, a missing extra) is a :class:`HistobenchError`."""
    from histobench.analyses.attention import segment_tiles
    from histobench.components import TileRef
    from histobench.registry import create
    from histobench.reporting import Reporter
    from histobench.slides.reader import open_slide
    from histobench.slides.tiling import read_tile, tile_slide

    reporter = reporter or Reporter()
    path = Path(path)
    if not path.is_file():
        raise HistobenchError(f"slide {path} does not exist")
    seg = create("segmenter", segmenter, options)
    t0 = time.perf_counter()
    with open_slide(path) as slide:
        grid = tile_slide(slide, mpp=mpp, tile_size=tile_size)
        total = len(grid)
        if total == 0:
            raise HistobenchError(f"slide {path} has no tissue tile at {mpp:g} µm/px, {tile_size} px")
        rows = np.arange(total) if not max_tiles or max_tiles >= total else \
            np.unique(np.linspace(0, total - 1, max_tiles).round().astype(int))
        refs, tiles = [], np.empty((len(rows), tile_size, tile_size, 3), np.uint8)
        with reporter.stage(f"read {path.name}", total=len(rows), unit="tiles") as st:
            for k, i in enumerate(rows):
                x, y = (int(v) for v in grid.coords[i])
                refs.append(TileRef(path.stem, path.absolute(), x, y, grid.level, grid.read_size, tile_size, mpp))
                tiles[k] = read_tile(slide, grid, int(i))
                st.advance()
        tissue = grid.tissue_fraction[rows].astype(np.float64)
    maps, failures = segment_tiles(seg, tiles, refs, reporter, what=f"{path.name}'s tiles")
    ok = [k for k, m in enumerate(maps) if m is not None]
    counts = np.array([int(maps[k][0].max()) for k in ok], dtype=np.int64)
    fg = np.array([float((maps[k][0] > 0).mean()) for k in ok])
    px_um2 = mpp * mpp
    nucleus_px = sum(int((maps[k][0] > 0).sum()) for k in ok)
    tile_mm2 = (tile_size * mpp * 1e-3) ** 2
    area = tile_mm2 * len(ok)
    tissue_area = tile_mm2 * float(tissue[ok].sum()) if ok else 0.0
    nuclei = int(counts.sum())
    shown = [k for k in ok if maps[k][0].max() > 0]
    if overlay_tiles and shown:
        shown = [shown[int(j)] for j in np.unique(np.linspace(0, len(shown) - 1, overlay_tiles).round().astype(int))]
    return SlideDensity(
        slide=str(path), segmenter=seg.name, options=seg.options.model_dump(mode="json"), mpp=float(mpp),
        tile_size=int(tile_size), tiles=len(ok), slide_tiles=int(total),
        failed=[{"tile": int(rows[k]), "reason": r} for k, r in failures], nuclei=nuclei, tile_area_mm2=area,
        tissue_area_mm2=tissue_area, nuclei_per_mm2=nuclei / area if area else 0.0,
        nuclei_per_mm2_tissue=nuclei / tissue_area if tissue_area else 0.0,
        nucleus_fraction=float(fg.mean()) if len(fg) else 0.0,
        mean_nucleus_um2=nucleus_px * px_um2 / nuclei if nuclei else 0.0,
        empty_tiles=int((counts == 0).sum()), seconds=time.perf_counter() - t0,
        overlay=[(tiles[k], maps[k][0]) for k in (shown[:overlay_tiles] if overlay_tiles else [])])


def overlay_strip(density: SlideDensity, path: Path) -> Path:
    """``path`` (PNG): the overlay tiles side by side, every nucleus outlined in green."""
    from PIL import Image

    from histobench_dirl.segmenters import overlay

    if not density.overlay:
        raise HistobenchError(f"{density.segmenter} found no nucleus on {density.slide}: nothing to draw")
    gap = np.full((density.tile_size, 4, 3), 255, np.uint8)
    parts = []
    for tile, inst in density.overlay:
        parts += [overlay(tile, inst), gap]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(parts[:-1], axis=1)).save(path)
    return path


def log_density(density: SlideDensity, out_dir: Path, tracking_uri: str | None = None,
                experiment: str = EXPERIMENT) -> tuple[str | None, list[Path]]:
    """Write ``density.json`` and ``overlay.png`` under ``out_dir`` and log them as an MLflow run (stage tag
    ``segmentation``) with the options as params and the counts as metrics; returns ``(run id, files)``."""
    from histobench.tracking import Tracker

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = density.summary()
    report = out_dir / "density.json"
    report.write_text(json.dumps(summary, indent=2))
    files = [report]
    if density.overlay:
        files.append(overlay_strip(density, out_dir / "overlay.png"))
    tracker = Tracker(tracking_uri)
    name = f"nuclei {density.segmenter} {Path(density.slide).stem}"
    with tracker.run(experiment, name, stage=STAGE, tags={"histobench.segmenter": density.segmenter}) as run_id:
        tracker.params({"slide": density.slide, "segmenter": {"name": density.segmenter, **density.options},
                        "tiles": {"mpp": density.mpp, "size": density.tile_size, "n": density.tiles,
                                  "slide_tiles": density.slide_tiles}})
        tracker.metrics({k: float(summary[k]) for k in ("nuclei", "nuclei_per_mm2", "nuclei_per_mm2_tissue",
                                                         "nucleus_fraction", "mean_nucleus_um2", "empty_tiles",
                                                         "tiles", "seconds")} | {"failed_tiles": float(len(density.failed))})
        for f in files:
            tracker.artifact(f)
    return run_id, files


__all__ = ["SlideDensity", "slide_density", "overlay_strip", "log_density"]
