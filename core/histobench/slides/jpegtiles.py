"""Direct JPEG-tile reads: compressed tile bytes straight from a TIFF-family slide, decoded with torchvision.

OpenSlide decodes every JPEG tile itself (about 400 tiles/s per CPU core), through its tile cache and cairo. For
slides whose pyramid levels are tiled, JPEG-compressed TIFF pages (Aperio SVS, OpenSlide's ``generic-tiff``,
e.g. the synthetic slides of :mod:`histobench.slides.synthetic`) the compressed bytes of a file tile can be read
with one ``os.pread`` and decoded by ``torchvision.io.decode_jpeg`` (libjpeg-turbo on the CPU, nvJPEG on CUDA).

:func:`open_jpeg_tiles` maps each OpenSlide level of a :class:`~histobench.slides.reader.Slide` to the TIFF page
of the same dimensions and checks that it can be read this way. Everything else goes back to OpenSlide: a slide
that is not eligible comes with a short reason (:class:`NotEligible`), and a single read that cannot be served
exactly (a level position that is not a whole pixel, a missing tile, a stream that does not decode to the
page's tile size) returns ``None`` so that the caller reads it with OpenSlide.

Pixels agree with OpenSlide's because the stream handed to libjpeg is made to decode in the colour space OpenSlide
forces (OpenSlide sets ``jpeg_color_space`` from the TIFF photometric tag: RGB for photometric RGB, as in Aperio
SVS whose JPEG data are not colour-transformed, YCbCr for photometric YCbCr): the JFIF/Adobe markers of the
stream are replaced by an Adobe APP14 marker whose transform flag says exactly that (0 = RGB, 1 = YCbCr), and
libjpeg(-turbo) then chooses that colour space. Pixels outside a level (beyond its width or height, including
the padding of the partial tiles at the right and bottom edges) are white, as OpenSlide's transparent pixels
become white in :meth:`Slide.read_region`.

Heavy imports (tifffile, torch, torchvision) happen inside functions.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# OpenSlide formats whose levels are plain TIFF pages that OpenSlide paints tile by tile, without overlaps,
# sparse tiles or vendor-specific stream tricks. Others (hamamatsu NDPI with its restart-marker tiling, Ventana
# overlaps, Philips sparse tiles, Leica multi-image files, DICOM) always use OpenSlide.
SUPPORTED_VENDORS = ("aperio", "generic-tiff")

_JPEG = 7  # TIFF Compression tag value of "new-style" JPEG
_PHOTOMETRIC_TRANSFORM = {2: 0, 6: 1}  # TIFF Photometric RGB / YCbCr -> Adobe APP14 colour transform flag

# Decoded file tiles kept per process: about two rows of file tiles at the level read, within these bounds, so
# that row-ordered reads decode each file tile about once.
_CACHE_MIN_TILES = 32
_CACHE_MAX_TILES = 512


class NotEligible(Exception):
    """The direct path does not apply; ``str(exc)`` is a short reason for a log line."""


def _adobe_app14(transform: int) -> bytes:
    """An Adobe APP14 segment (``FF EE``, length 14): ``Adobe``, version 100, flags 0, 0, colour transform."""
    return b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + bytes([transform])


def _header_segments(buf: bytes, start: int) -> tuple[list[tuple[int, int, int]], int]:
    """Marker segments of a JPEG header from ``start`` (just after SOI) up to, not including, SOS or EOI.

    Returns ``([(marker, begin, end), ...], stop)`` with byte ranges of whole segments (marker included) and the
    offset of the SOS/EOI marker (``len(buf)`` if neither). Raises ValueError on anything that is not a header.
    """
    out = []
    i, n = start, len(buf)
    while i < n:
        if buf[i] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {i}")
        while i + 1 < n and buf[i + 1] == 0xFF:  # fill bytes
            i += 1
        if i + 1 >= n:
            raise ValueError("truncated JPEG header")
        marker = buf[i + 1]
        if marker in (0xDA, 0xD9):
            return out, i
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            raise ValueError(f"unexpected JPEG marker FF{marker:02X} in a header")
        if i + 4 > n:
            raise ValueError("truncated JPEG segment")
        length = (buf[i + 2] << 8) | buf[i + 3]
        if length < 2 or i + 2 + length > n:
            raise ValueError("bad JPEG segment length")
        out.append((marker, i, i + 2 + length))
        i += 2 + length
    return out, n


def _is_colour_marker(buf: bytes, marker: int, begin: int, end: int) -> bool:
    """JFIF APP0 and Adobe APP14 segments: the ones that steer libjpeg's choice of colour space."""
    body = buf[begin + 4:end]
    return (marker == 0xE0 and body.startswith(b"JFIF\x00")) or (marker == 0xEE and body.startswith(b"Adobe"))


def _strip_colour_markers(buf: bytes, start: int) -> tuple[bytes, int]:
    """The header of ``buf`` from ``start`` without JFIF/Adobe segments, and the offset where the header ends."""
    segments, stop = _header_segments(buf, start)
    kept = b"".join(buf[b:e] for m, b, e in segments if not _is_colour_marker(buf, m, b, e))
    return kept, stop


@dataclass
class _Level:
    """One eligible pyramid level: its TIFF page's tile grid and where each tile's bytes are."""

    page: int
    width: int
    height: int
    tile_w: int
    tile_h: int
    cols: int
    rows: int
    offsets: np.ndarray  # int64 [rows * cols]
    counts: np.ndarray  # int64 [rows * cols]
    prefix: bytes  # SOI + APP14 + the page's JPEGTables without SOI/EOI and colour markers


def _page_reason(page: Any) -> str | None:
    """Why this TIFF page cannot be read tile by tile as JPEG, or None."""
    if not page.is_tiled:
        return "stored in strips, not tiles"
    if int(getattr(page, "imagedepth", 1) or 1) != 1 or int(getattr(page, "tiledepth", 1) or 1) != 1:
        return "volumetric tiles"
    if int(page.compression) != _JPEG:
        return f"compression {int(page.compression)} is not JPEG"
    if int(page.photometric) not in _PHOTOMETRIC_TRANSFORM:
        return f"photometric {int(page.photometric)} is neither RGB nor YCbCr"
    if int(page.samplesperpixel) != 3 or int(page.planarconfig) != 1:
        return "not 3 interleaved samples per pixel"
    if np.dtype(page.dtype) != np.uint8:
        return f"{page.dtype} samples"
    return None


class JpegTiles:
    """Direct JPEG-tile reads of one slide file; create it with :func:`open_jpeg_tiles`.

    Picklable: a DataLoader worker gets a copy without the file descriptor and the decoded-tile cache and opens
    its own on first use (``os.pread`` on a descriptor per process, like :class:`SlideTileDataset`'s handles).
    ``decodes`` counts the file tiles this process has decoded (cache misses).
    """

    def __init__(self, path: Path, levels: dict[int, _Level], reasons: dict[int, str],
                 level_downsamples: tuple[float, ...]):
        self.path = Path(path)
        self.levels = levels
        self.reasons = reasons
        self.level_downsamples = tuple(float(d) for d in level_downsamples)
        self.decodes = 0
        self._fd: int | None = None
        self._pid = os.getpid()
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()

    # -- eligibility and geometry ----------------------------------------------------------------------------
    def level_reason(self, level: int) -> str | None:
        """Why ``level`` is read with OpenSlide, or None when it is read directly."""
        if level in self.levels:
            return None
        return self.reasons.get(level, f"no level {level}")

    def tile_shape(self, level: int) -> tuple[int, int]:
        """File tile (width, height) of ``level``."""
        lv = self.levels[level]
        return lv.tile_w, lv.tile_h

    def level_position(self, x: int, y: int, level: int) -> tuple[int, int] | None:
        """The level pixel where level-0 (x, y) falls, as OpenSlide computes it (x / downsample), when it is a
        whole pixel; None otherwise (OpenSlide would resample a fractional position through cairo)."""
        ds = self.level_downsamples[level]
        fx, fy = x / ds, y / ds
        lx, ly = round(fx), round(fy)
        if abs(fx - lx) > 1e-6 or abs(fy - ly) > 1e-6:
            return None
        return int(lx), int(ly)

    def is_aligned(self, tileset: Any) -> bool:
        """Whether every tile of ``tileset`` is exactly one whole file tile: the level is direct, ``read_size``
        equals the file tile width and height, and each tile starts on the file tile grid and lies inside the
        level (so no white edge and no mosaic is needed)."""
        lv = self.levels.get(int(tileset.level))
        rs = int(tileset.read_size)
        if lv is None or rs != lv.tile_w or rs != lv.tile_h:
            return False
        coords = np.asarray(tileset.coords, dtype=np.int64).reshape(-1, 2)
        f = coords / self.level_downsamples[int(tileset.level)]  # as level_position, vectorised
        pos = np.round(f)
        if np.any(np.abs(f - pos) > 1e-6):
            return False
        lx, ly = pos[:, 0].astype(np.int64), pos[:, 1].astype(np.int64)
        return bool(np.all((lx % rs == 0) & (ly % rs == 0) & (lx >= 0) & (ly >= 0)
                           & (lx + rs <= lv.width) & (ly + rs <= lv.height)))

    # -- bytes -------------------------------------------------------------------------------------------------
    def _descriptor(self) -> int:
        if self._pid != os.getpid():  # forked into a worker: never share a descriptor or a cache
            self._fd, self._pid, self._cache = None, os.getpid(), OrderedDict()
            self.decodes = 0
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def jpeg_stream(self, level: int, col: int, row: int) -> bytes | None:
        """The complete JPEG stream of file tile (``col``, ``row``) of ``level``: the page's tables merged in,
        colour space marked as OpenSlide decodes it. None for a tile stored with no bytes (OpenSlide draws a
        missing tile transparent; the caller falls back to it). Raises ValueError for a malformed stream."""
        lv = self.levels[level]
        k = row * lv.cols + col
        offset, count = int(lv.offsets[k]), int(lv.counts[k])
        if count <= 0 or offset <= 0:
            return None
        buf = os.pread(self._descriptor(), count, offset)
        if len(buf) != count or buf[:2] != b"\xff\xd8":
            raise ValueError(f"tile ({col}, {row}) of level {level} is not a JPEG stream")
        header, stop = _strip_colour_markers(buf, 2)
        return lv.prefix + header + buf[stop:]

    # -- pixels ------------------------------------------------------------------------------------------------
    def _decoded(self, level: int, col: int, row: int) -> np.ndarray | None:
        """File tile (col, row) decoded, uint8 [tile_h, tile_w, 3], from the per-process cache if there."""
        self._descriptor()  # resets the cache after a fork
        key = (level, col, row)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        stream = self.jpeg_stream(level, col, row)
        if stream is None:
            return None
        lv = self.levels[level]
        img = decode_cpu(stream)
        if img.shape != (lv.tile_h, lv.tile_w, 3):
            raise ValueError(f"tile ({col}, {row}) of level {level} decodes to {img.shape[1]}x{img.shape[0]}, "
                             f"not the page's {lv.tile_w}x{lv.tile_h} tiles")
        self.decodes += 1
        capacity = min(_CACHE_MAX_TILES, max(_CACHE_MIN_TILES, 2 * lv.cols + 8))
        while len(self._cache) >= capacity:
            self._cache.popitem(last=False)
        self._cache[key] = img
        return img

    def read_region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray | None:
        """Like :meth:`Slide.read_region`: uint8 RGB [h, w, 3] of ``level`` whose top-left is level-0 (x, y),
        white outside the level. None when this read must go to OpenSlide (level not direct, fractional level
        position, missing or malformed tile)."""
        lv = self.levels.get(level)
        if lv is None or w <= 0 or h <= 0:
            return None
        pos = self.level_position(x, y, level)
        if pos is None:
            return None
        lx, ly = pos
        tw, th = lv.tile_w, lv.tile_h
        # Fast case: exactly one whole file tile inside the level.
        if w == tw and h == th and lx % tw == 0 and ly % th == 0 and 0 <= lx and 0 <= ly \
                and lx + w <= lv.width and ly + h <= lv.height:
            try:
                img = self._decoded(level, lx // tw, ly // th)
            except (ValueError, RuntimeError):
                return None
            return None if img is None else img.copy()
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        # The part of the request inside the level; everything else stays white.
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, lv.width), min(ly + h, lv.height)
        if x0 >= x1 or y0 >= y1:
            return out
        try:
            for row in range(y0 // th, (y1 - 1) // th + 1):
                for col in range(x0 // tw, (x1 - 1) // tw + 1):
                    img = self._decoded(level, col, row)
                    if img is None:
                        return None
                    # intersection of this file tile (clipped to the level) with the request, in level pixels
                    ax, ay = max(x0, col * tw), max(y0, row * th)
                    bx, by = min(x1, (col + 1) * tw), min(y1, (row + 1) * th)
                    out[ay - ly:by - ly, ax - lx:bx - lx] = img[ay - row * th:by - row * th, ax - col * tw:bx - col * tw]
        except (ValueError, RuntimeError):
            return None
        return out

    def read_tile(self, tileset: Any, i: int) -> np.ndarray | None:
        """Tile ``i`` of ``tileset`` like :func:`histobench.slides.tiling.read_tile`, or None (use OpenSlide)."""
        from histobench.slides.tiling import resize_tile

        x, y = (int(v) for v in tileset.coords[i])
        rs = int(tileset.read_size)
        region = self.read_region(x, y, int(tileset.level), rs, rs)
        if region is None:
            return None
        return resize_tile(region, int(tileset.tile_size))

    def tile_jpeg(self, tileset: Any, i: int) -> bytes | None:
        """The JPEG stream of tile ``i`` when it is exactly one whole file tile (see :meth:`is_aligned`) and
        needs no resize (``read_size == tile_size``); None otherwise. For decoding batches on the GPU."""
        lv = self.levels.get(int(tileset.level))
        rs = int(tileset.read_size)
        if lv is None or rs != int(tileset.tile_size) or rs != lv.tile_w or rs != lv.tile_h:
            return None
        x, y = (int(v) for v in tileset.coords[i])
        pos = self.level_position(x, y, int(tileset.level))
        if pos is None:
            return None
        lx, ly = pos
        if lx % rs or ly % rs or lx < 0 or ly < 0 or lx + rs > lv.width or ly + rs > lv.height:
            return None
        try:
            return self.jpeg_stream(int(tileset.level), lx // rs, ly // rs)
        except ValueError:
            return None

    # -- lifetime ------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
        self._cache = OrderedDict()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"], state["_cache"], state["decodes"] = None, OrderedDict(), 0
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError, TypeError):  # pragma: no cover - interpreter shutdown
            return


def _torchvision_decode(data: Any, **kw: Any) -> Any:
    """``torchvision.io.decode_jpeg(data, mode=RGB, **kw)``. torchvision >= 0.29 warns on every call that its
    image codecs are deprecated in favour of TorchCodec (not a dependency); that warning is silenced here."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, **kw)


def decode_cpu(stream: bytes) -> np.ndarray:
    """Decode a JPEG stream with torchvision (libjpeg-turbo) into uint8 RGB [h, w, 3]."""
    import torch

    data = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
    return _torchvision_decode(data).permute(1, 2, 0).numpy()


def decode_batch_cuda(tiles: list, device: Any):
    """A batch of tiles as uint8 ``[B, 3, S, S]`` on CUDA ``device``: JPEG streams (1-D uint8 CPU tensors) are
    decoded together with nvJPEG (``torchvision.io.decode_jpeg(..., device=...)``), pixel tiles (3-D) are copied.
    All tiles must have the same size. Only for CUDA devices: raises ValueError otherwise."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"nvJPEG decoding needs a CUDA device, got {device}")
    out: list[Any] = [None] * len(tiles)
    streams = [i for i, t in enumerate(tiles) if t.dim() == 1]
    if streams:
        decoded = _torchvision_decode([tiles[i] for i in streams], device=device)
        for i, img in zip(streams, decoded):
            out[i] = img
    for i, t in enumerate(tiles):
        if out[i] is None:
            out[i] = t.to(device, non_blocking=True)
    return torch.stack(out)


def open_jpeg_tiles(slide: Any) -> JpegTiles:
    """Map ``slide``'s levels to TIFF pages and check which can be read directly.

    Raises :class:`NotEligible` (with a short reason) when no level can: an unsupported vendor (NDPI, DICOM,
    ...), a file tifffile cannot parse, levels without a page of their size, pages that are not tiled JPEG.
    Levels that are not eligible while others are keep their reason in :meth:`JpegTiles.level_reason`.
    """
    vendor = slide.vendor
    if vendor not in SUPPORTED_VENDORS:
        raise NotEligible(f"{vendor or 'unknown'} slides are read with openslide")
    path = Path(slide.path)
    if not path.is_file():
        raise NotEligible("not a single TIFF file")
    try:
        import tifffile
    except ImportError as exc:  # pragma: no cover - tifffile is a dependency
        raise NotEligible(f"tifffile is not installed ({exc})") from exc
    levels: dict[int, _Level] = {}
    reasons: dict[int, str] = {}
    try:
        with tifffile.TiffFile(path) as tif:
            pages = [p for p in tif.pages]
            for level, (w, h) in enumerate(slide.level_dimensions):
                same = [p for p in pages if (int(p.imagewidth), int(p.imagelength)) == (int(w), int(h))]
                tiled = [p for p in same if p.is_tiled]
                if not same:
                    reasons[level] = f"level {level} has no TIFF page of its size"
                    continue
                if len(tiled) > 1:
                    reasons[level] = f"level {level}: several tiled TIFF pages of its size"
                    continue
                page = tiled[0] if tiled else same[0]
                why = _page_reason(page)
                if why is not None:
                    reasons[level] = f"level {level}: {why}"
                    continue
                tw, th = int(page.tilewidth), int(page.tilelength)
                cols, rows = math.ceil(int(w) / tw), math.ceil(int(h) / th)
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                if len(offsets) != cols * rows or len(counts) != cols * rows:
                    reasons[level] = f"level {level}: {len(offsets)} tile offsets for a {cols}x{rows} grid"
                    continue
                transform = _PHOTOMETRIC_TRANSFORM[int(page.photometric)]
                tables = page.jpegtables or b""
                if tables:
                    if tables[:2] != b"\xff\xd8":
                        reasons[level] = f"level {level}: JPEGTables do not start with SOI"
                        continue
                    body, _ = _strip_colour_markers(bytes(tables), 2)
                else:
                    body = b""
                levels[level] = _Level(page=int(page.index), width=int(w), height=int(h), tile_w=tw, tile_h=th,
                                       cols=cols, rows=rows, offsets=offsets, counts=counts,
                                       prefix=b"\xff\xd8" + _adobe_app14(transform) + body)
    except NotEligible:
        raise
    except Exception as exc:  # tifffile.TiffFileError, a malformed JPEGTables header, OSError
        raise NotEligible(f"cannot parse as TIFF ({type(exc).__name__}: {exc})") from exc
    if not levels:
        raise NotEligible("; ".join(reasons[k] for k in sorted(reasons)) or "no levels")
    return JpegTiles(path, levels, reasons, slide.level_downsamples)


def jpeg_tiles_or_reason(slide: Any) -> tuple[JpegTiles | None, str | None]:
    """:func:`open_jpeg_tiles`, or ``(None, reason)`` when the slide is read with OpenSlide."""
    try:
        return open_jpeg_tiles(slide), None
    except NotEligible as exc:
        return None, str(exc)
