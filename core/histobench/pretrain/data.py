"""Tile datasets for pretraining and extraction.

:class:`SlideTileDataset` decodes tiles from slide files; each worker process opens its own openslide
handles. :func:`cache_uint8` decodes every tile once into a uint8 ``.npy`` file so that repeated epochs read
memory instead of slides (:class:`ArrayTileDataset`). Both yield uint8 ``[3, S, S]`` tensors, the slide
index and the tile index; augmentation and normalisation happen on the training device.

``SlideTileDataset(decode="jpeg")`` reads the JPEG tiles of eligible TIFF-family slides directly
(:mod:`histobench.slides.jpegtiles`) and everything else with openslide; ``decode="jpeg-bytes"`` hands out the
compressed stream of tiles that are exactly one file tile (a 1-D uint8 tensor, to be decoded in a batch on the
GPU; collate with :func:`collate_tiles`) and decoded pixels for the others.
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
    case_id: str | None = None  # the patient (pretraining's hierarchy; never a label)


def _import_torch():
    import torch

    return torch


DECODE_MODES = ("openslide", "jpeg", "jpeg-bytes")


class SlideTileDataset:
    """All tiles of several slides, decoded on demand (a ``torch.utils.data.Dataset``).

    Each process (each DataLoader worker) opens its own slide handles and keeps at most ``max_open`` of
    them (least recently used closed first), so that memory does not grow with the number of slides;
    extraction reads slides in order and needs two.

    ``decode`` chooses how tiles are decoded:

    * ``"openslide"`` (the default): :func:`~histobench.slides.tiling.read_tile` through openslide;
    * ``"jpeg"``: tiled JPEG TIFF slides (Aperio SVS, generic pyramidal TIFF) read their compressed tiles
      directly and decode them with torchvision (:mod:`histobench.slides.jpegtiles`), with the same pixels as
      openslide's libjpeg-turbo; other slides, and single reads the direct path cannot serve exactly, use
      openslide;
    * ``"jpeg-bytes"``: like ``"jpeg"``, but a tile that is exactly one file tile with no resize comes out as its
      JPEG stream, a 1-D uint8 tensor, for batched GPU decoding (:func:`collate_tiles` keeps a batch as a list).

    :meth:`check_jpeg` (main process) records which slides cannot use the direct path and why, so that workers
    do not try them again.
    """

    def __init__(self, slides: Sequence[SlideTiles], max_open: int = 32, decode: str = "openslide",
                 stream_slides: set[int] | None = None, jpeg_reasons: dict[int, str] | None = None):
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        self.slides = list(slides)
        self.max_open = max(1, int(max_open))
        self.decode = decode
        counts = [len(s.tiles) for s in self.slides]
        self.slide_index = np.repeat(np.arange(len(self.slides)), counts).astype(np.int64)
        self.tile_index = np.concatenate([np.arange(c) for c in counts]).astype(np.int64) if counts else np.zeros(0, np.int64)
        # slide index -> why openslide reads it (known in advance, e.g. from check_jpeg on another dataset)
        self.jpeg_reasons: dict[int, str] = dict(jpeg_reasons or {})
        self.fallbacks = 0  # tiles this process read with openslide although decode != "openslide"
        self.stream_slides = stream_slides  # "jpeg-bytes": the slides whose tiles may be streams (None: all)
        self._handles: OrderedDict[int, object] = OrderedDict()
        self._readers: OrderedDict[int, object] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.slide_index)

    def _slide(self, i: int):
        from histobench.slides.reader import open_slide

        self._check_pid()
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

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked into a worker: never share a handle across processes
            self._handles, self._readers, self._pid = OrderedDict(), OrderedDict(), os.getpid()
            self.fallbacks = 0

    def _reader(self, i: int):
        """The direct JPEG-tile reader of slide ``i`` in this process, or None when openslide reads it."""
        from histobench.slides.jpegtiles import jpeg_tiles_or_reason

        self._check_pid()
        if i in self.jpeg_reasons:
            return None
        if i in self._readers:
            self._readers.move_to_end(i)
            return self._readers[i]
        while len(self._readers) >= self.max_open:
            _, old = self._readers.popitem(last=False)
            if old is not None:
                old.close()
        reader, reason = jpeg_tiles_or_reason(self._slide(i))
        if reader is None:
            self.jpeg_reasons[i] = reason or "not eligible"
        self._readers[i] = reader
        return reader

    def check_jpeg(self) -> list[tuple[str | None, bool]]:
        """Per slide: why openslide reads it (a short reason, or None when its tiles are read directly), and
        whether every tile is exactly one whole file tile with no resize (so that ``"jpeg-bytes"`` hands out
        only JPEG streams for it).

        Opens each slide once in this process; the reasons travel to the workers with the dataset.
        """
        from histobench.slides.jpegtiles import jpeg_tiles_or_reason
        from histobench.slides.reader import open_slide

        out: list[tuple[str | None, bool]] = []
        for i, s in enumerate(self.slides):
            whole = False
            with open_slide(s.path, mpp=s.mpp) as slide:
                reader, reason = jpeg_tiles_or_reason(slide)
                if reader is not None:
                    level = int(s.tiles.level)
                    reason = reader.level_reason(level)
                    if reason is None and len(s.tiles) and reader.level_position(
                            *(int(v) for v in s.tiles.coords[0]), level) is None:
                        reason = f"tiles do not start on whole pixels of level {level}"
                    whole = reason is None and s.tiles.read_size == s.tiles.tile_size and reader.is_aligned(s.tiles)
                    reader.close()
            if reason is not None:
                self.jpeg_reasons[i] = reason
            out.append((reason, whole))
        return out

    def read(self, idx: int) -> np.ndarray:
        """The uint8 ``[S, S, 3]`` tile ``idx``."""
        from histobench.slides.tiling import read_tile

        s = int(self.slide_index[idx])
        tiles, t = self.slides[s].tiles, int(self.tile_index[idx])
        if self.decode != "openslide":
            reader = self._reader(s)
            if reader is not None:
                tile = reader.read_tile(tiles, t)
                if tile is not None:
                    return tile
            self.fallbacks += 1
        return read_tile(self._slide(s), tiles, t)

    def __getitem__(self, idx: int):
        torch = _import_torch()
        s = int(self.slide_index[idx])
        if self.decode == "jpeg-bytes" and (self.stream_slides is None or s in self.stream_slides):
            reader = self._reader(s)
            stream = reader.tile_jpeg(self.slides[s].tiles, int(self.tile_index[idx])) if reader is not None else None
            if stream is not None:
                return torch.frombuffer(bytearray(stream), dtype=torch.uint8), s, int(self.tile_index[idx])
        tile = self.read(idx)
        return torch.from_numpy(np.ascontiguousarray(tile.transpose(2, 0, 1))), int(self.slide_index[idx]), int(self.tile_index[idx])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"], state["_readers"] = OrderedDict(), OrderedDict()
        return state


def collate_tiles(batch):
    """Collate ``(tile, slide_idx, tile_idx)`` items whose tiles may be JPEG streams (1-D) or pixels (3-D):
    ``(list of uint8 tensors, slide_idx int64 [B], tile_idx int64 [B])``."""
    torch = _import_torch()
    tiles = [b[0] for b in batch]
    slide_idx = torch.tensor([b[1] for b in batch], dtype=torch.int64)
    tile_idx = torch.tensor([b[2] for b in batch], dtype=torch.int64)
    return tiles, slide_idx, tile_idx


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


class MaskedTileDataset:
    """Tiles with their nuclei maps (the ``masks`` batch contract): items are dicts with ``images`` uint8
    ``[3, S, S]``, ``instances`` int32 ``[S, S]`` (0 = no nucleus), ``types`` uint8 ``[S, S]`` (0 where the
    segmenter gives no type), ``slide_index`` and ``tile_index``."""

    def __init__(self, tiles: ArrayTileDataset, instances: np.ndarray, types: np.ndarray):
        if len(instances) != len(tiles) or len(types) != len(tiles):
            raise ValueError(f"{len(tiles)} tiles but {len(instances)} instance and {len(types)} type maps")
        self.tiles, self.instances, self.types = tiles, instances, types
        self.slide_index, self.tile_index = tiles.slide_index, tiles.tile_index

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, idx: int):
        torch = _import_torch()
        x, s, t = self.tiles[idx]
        return {"images": x, "slide_index": s, "tile_index": t,
                "instances": torch.from_numpy(np.asarray(self.instances[idx], dtype=np.int32)),
                "types": torch.from_numpy(np.array(self.types[idx], dtype=np.uint8))}


def cache_masks(tiles: ArrayTileDataset, slides: Sequence[SlideTiles], segmentation, folder: Path,
                reporter=None) -> MaskedTileDataset:
    """Every tile's nuclei maps from the segmentation cache, in the tile cache's order, as two memory-mapped
    arrays under ``folder`` (``instances.npy`` uint16, ``types.npy`` uint8); reused when complete.

    ``segmentation`` is the segmentation stage's result (:class:`histobench.segment.SegmentResult`): its
    ``root`` holds one file per slide for the cohort's full tile sets; ``slides`` may be capped subsets of
    them (``train.max_tiles_per_slide``). A tile the segmenter failed on has all-zero maps.
    """
    from histobench.errors import HistobenchError
    from histobench.reporting import Reporter
    from histobench.segment import SegmentationCache

    reporter = reporter or Reporter()
    folder = Path(folder)
    n, size = len(tiles), tiles.array.shape[-1]
    done = folder / "done"
    if done.exists() and done.read_text().strip() == str(n):
        inst, types = np.load(folder / "instances.npy", mmap_mode="r"), np.load(folder / "types.npy", mmap_mode="r")
        if inst.shape == (n, size, size) and types.shape == (n, size, size):
            return MaskedTileDataset(tiles, inst, types)
    folder.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    tmp_inst = np.lib.format.open_memmap(folder / "instances.partial.npy", mode="w+", dtype=np.uint16, shape=(n, size, size))
    tmp_types = np.lib.format.open_memmap(folder / "types.partial.npy", mode="w+", dtype=np.uint8, shape=(n, size, size))
    cache = SegmentationCache(segmentation.root)
    pos = 0
    with reporter.stage("load nuclei masks", total=n, unit="tiles") as st:
        for s in slides:
            if s.slide_id not in cache:
                raise HistobenchError(f"slide {s.slide_id} has no segmentation in {cache.root}; run histobench segment")
            with cache.slide(s.slide_id) as seg:
                if s.tiles.source and seg.meta.get("source") != s.tiles.source:
                    raise HistobenchError(f"segmentation of slide {s.slide_id} ({seg.path}) was made from another "
                                          f"slide file; run histobench segment again")
                if not np.array_equal(seg.coords, np.asarray(s.tiles.coords, dtype=np.int64)):
                    seg = seg.subset(s.tiles.coords)
                inst, types = seg.batch(range(len(s.tiles)))
            if inst.shape[-1] != size:
                raise HistobenchError(f"segmentation of slide {s.slide_id} has {inst.shape[-1]} px maps, tiles are {size} px")
            tmp_inst[pos:pos + len(inst)] = inst
            if types is not None:
                tmp_types[pos:pos + len(inst)] = types
            pos += len(inst)
            st.advance(len(inst))
    if pos != n:
        raise HistobenchError(f"the segmentation covers {pos} tiles but pretraining has {n}")
    tmp_inst.flush(), tmp_types.flush()
    del tmp_inst, tmp_types
    os.replace(folder / "instances.partial.npy", folder / "instances.npy")
    os.replace(folder / "types.partial.npy", folder / "types.npy")
    done.write_text(str(n))
    return cache_masks(tiles, slides, segmentation, folder, reporter)
