"""The ``oracle`` segmenter: the true nuclei of histobench's synthetic slides, read from their sidecar files.

Synthetic slides (:mod:`histobench.slides.synthetic`) are written with ``<slide>.nuclei.npz`` beside them: the
level-0 instance and type maps of every painted nucleus (types :data:`~histobench.slides.synthetic.NUCLEUS_TYPES`:
1 tumour, 2 lymphocyte, 3 fibroblast). For a tile the oracle crops the tile's level-0 square
(``tile_size * tile µm/px / slide µm/px`` pixels at ``(x, y)``) and resizes it to the tile with nearest
neighbour, then numbers the nuclei in the tile 1..n. It needs no model, so CPU tests and the DiRL fidelity
checks get exact cell priors (the DiRL spec's oracle, ``shared/methods/dirl.md`` §3.4).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
from pydantic import Field

from histobench.components import Segmenter, TileRef
from histobench.errors import HistobenchError


class OracleSegmenter(Segmenter):
    """True nuclei of synthetic slides (from each slide's .nuclei.npz sidecar); for tests and the demo."""

    name = "oracle"
    version = "1"

    class Options(Segmenter.Options):
        min_area: int = Field(0, ge=0, description="Nuclei with fewer pixels in the tile are dropped (0 keeps all).")
        types: bool = Field(True, description="Return the true type map (1 tumour, 2 lymphocyte, 3 fibroblast); "
                                              "false: instances only, like StarDist.")

    _CACHED_SLIDES = 2  # sidecars kept in memory per process (tiles arrive slide by slide)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._maps: OrderedDict[Path, tuple[np.ndarray, np.ndarray, float]] = OrderedDict()

    def _sidecar(self, ref: TileRef) -> tuple[np.ndarray, np.ndarray, float]:
        from histobench.slides.synthetic import nuclei_sidecar, read_nuclei

        path = nuclei_sidecar(ref.path)
        if path in self._maps:
            self._maps.move_to_end(path)
            return self._maps[path]
        if not path.exists():
            raise HistobenchError(f"slide {ref.slide_id}: the oracle segmenter needs the synthetic slide's nuclei "
                                  f"file {path.name}, which does not exist (only histobench's synthetic slides have one)")
        maps = read_nuclei(path)
        self._maps[path] = maps
        while len(self._maps) > self._CACHED_SLIDES:
            self._maps.popitem(last=False)
        return maps

    def segment(self, tile: np.ndarray, ref: TileRef | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        if ref is None:
            raise HistobenchError("the oracle segmenter needs the tile's TileRef (slide path and coordinates)")
        inst0, types0, mpp0 = self._sidecar(ref)
        size = int(tile.shape[0]) if tile is not None else int(ref.tile_size)
        side = max(1, int(round(ref.tile_size * ref.mpp / mpp0)))  # the tile's side in level-0 pixels
        # nearest neighbour: output pixel k samples the level-0 pixel under its centre
        pick = np.floor((np.arange(size) + 0.5) * side / size).astype(np.int64)
        ys, xs = ref.y + pick, ref.x + pick
        h, w = inst0.shape
        inside_y, inside_x = (ys >= 0) & (ys < h), (xs >= 0) & (xs < w)
        ys, xs = np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)
        inst = inst0[np.ix_(ys, xs)].astype(np.int64)
        types = types0[np.ix_(ys, xs)]
        outside = ~(inside_y[:, None] & inside_x[None, :])
        inst[outside] = 0
        types = np.where(outside, 0, types)
        # number the tile's nuclei 1..n (in order of their slide ids), dropping the small ones
        ids, inverse, counts = np.unique(inst, return_inverse=True, return_counts=True)
        keep = (ids > 0) & (counts >= max(self.options.min_area, 1))
        new = np.cumsum(keep) * keep
        inst = new[inverse.reshape(inst.shape)].astype(np.uint16)
        types = np.where(inst > 0, types, 0).astype(np.uint8)
        return inst, (types if self.options.types else None)
