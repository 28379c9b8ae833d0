"""Tile datasets for pretraining and extraction.

:class:`SlideTileDataset` decodes tiles from slide files; each worker process opens its own openslide
handles. :func:`cache_uint8` decodes every tile once into a uint8 ``.npy`` file so that repeated epochs read
memory instead of slides (:class:`ArrayTileDataset`). Both yield uint8 ``[3, S, S]`` tensors, the slide
index and the tile index; augmentation and normalisation happen on the training device.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from histobench.slides.tiling import TileSet


@dataclass(frozen=True)
class SlideTiles:
    """One slide's file and its tiles."""

    slide_id: str
    path: Path
    tiles: TileSet
    mpp: float | None = None  # level-0 µm/px override


def _import_torch():
    import torch

    return torch


class SlideTileDataset:
    """All tiles of several slides, decoded on demand (a ``torch.utils.data.Dataset``).

    Each process (each DataLoader worker) opens its own slide handles and keeps at most ``max_open`` of
    them (least recently used closed first), so that memory does not grow with the number of slides;
    extraction reads slides in order and needs two.
    """

    def __init__(self, slides: Sequence[SlideTiles], max_open: int = 32):
        self.slides = list(slides)
        self.max_open = max(1, int(max_open))
        counts = [len(s.tiles) for s in self.slides]
        self.slide_index = np.repeat(np.arange(len(self.slides)), counts).astype(np.int64)
        self.tile_index = np.concatenate([np.arange(c) for c in counts]).astype(np.int64) if counts else np.zeros(0, np.int64)
        self._handles: OrderedDict[int, object] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.slide_index)

    def _slide(self, i: int):
        from histobench.slides.reader import open_slide

        if self._pid != os.getpid():  # forked into a worker: never share a handle across processes
            self._handles, self._pid = OrderedDict(), os.getpid()
        if i in self._handles:
            self._handles.move_to_end(i)
        else:
            while len(self._handles) >= self.max_open:
                _, old = self._handles.popitem(last=False)
                close = getattr(old, "close", None)
                if close is not None:
                    close()
            s = self.slides[i]
            self._handles[i] = open_slide(s.path, mpp=s.mpp)
        return self._handles[i]

    def read(self, idx: int) -> np.ndarray:
        """The uint8 ``[S, S, 3]`` tile ``idx``."""
        from histobench.slides.tiling import read_tile

        s = int(self.slide_index[idx])
        return read_tile(self._slide(s), self.slides[s].tiles, int(self.tile_index[idx]))

    def __getitem__(self, idx: int):
        torch = _import_torch()
        tile = self.read(idx)
        return torch.from_numpy(np.ascontiguousarray(tile.transpose(2, 0, 1))), int(self.slide_index[idx]), int(self.tile_index[idx])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()
        return state


class ArrayTileDataset:
    """Tiles from a uint8 array ``[N, 3, S, S]`` (usually a memory-mapped ``.npy``)."""

    def __init__(self, array: np.ndarray, slide_index: np.ndarray, tile_index: np.ndarray):
        self.array, self.slide_index, self.tile_index = array, slide_index, tile_index

    def __len__(self) -> int:
        return len(self.slide_index)

    def __getitem__(self, idx: int):
        torch = _import_torch()
        return torch.from_numpy(np.array(self.array[idx])), int(self.slide_index[idx]), int(self.tile_index[idx])


def cache_uint8(dataset: SlideTileDataset, path: Path, reporter=None, num_workers: int = 0) -> ArrayTileDataset:
    """Decode every tile once into ``path`` (``.npy``, uint8 ``[N, 3, S, S]``); reuse it when it is complete."""
    from histobench.reporting import Reporter

    reporter = reporter or Reporter()
    path = Path(path)
    n = len(dataset)
    if n == 0:
        raise ValueError("no tiles to cache")
    size = dataset.slides[0].tiles.tile_size
    done_marker = path.with_suffix(".done")
    if path.exists() and done_marker.exists():
        arr = np.load(path, mmap_mode="r")
        if arr.shape == (n, 3, size, size):
            return ArrayTileDataset(arr, dataset.slide_index, dataset.tile_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
    torch = _import_torch()
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=num_workers, shuffle=False)
    with reporter.stage("decode tiles", total=n, unit="tiles") as st:
        pos = 0
        for images, _, _ in loader:
            arr[pos:pos + len(images)] = images.numpy()
            pos += len(images)
            st.advance(len(images))
    arr.flush()
    del arr
    os.replace(tmp, path)
    done_marker.write_text(str(n))
    return ArrayTileDataset(np.load(path, mmap_mode="r"), dataset.slide_index, dataset.tile_index)


class SyntheticTileDataset:
    """Random uint8 tiles with a fixed seed: for contract checks and benchmarks."""

    def __init__(self, n: int, size: int, n_slides: int = 4, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.array = rng.integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)
        self.slide_index = np.arange(n) % n_slides
        self.tile_index = np.arange(n) // n_slides

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, idx: int):
        torch = _import_torch()
        return torch.from_numpy(self.array[idx]), int(self.slide_index[idx]), int(self.tile_index[idx])


class SyntheticGridDataset:
    """Random float patch-embedding grids ``[D, g, g]`` with contiguous slides: for region-level contract checks."""

    input_key = "grids"

    def __init__(self, n: int, dim: int, grid: int, n_slides: int = 4, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.grids = rng.normal(size=(n, dim, grid, grid)).astype(np.float32)
        self.slide_index = np.sort(np.arange(n) % n_slides)
        starts = np.searchsorted(self.slide_index, np.arange(n_slides))
        self.tile_index = np.arange(n) - starts[self.slide_index]

    def __len__(self) -> int:
        return len(self.grids)

    def __getitem__(self, idx: int):
        torch = _import_torch()
        return torch.from_numpy(self.grids[idx]), int(self.slide_index[idx]), int(self.tile_index[idx])
