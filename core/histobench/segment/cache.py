"""The segmentation cache: one file per slide with every tile's nuclei, and the reader the training loop uses.

Layout: ``WORKDIR/segment/<segmenter identity>/<tile set key>/<slide_id>.npz``. The folder names what changes
the masks: the segmenter's name, version and options (:meth:`histobench.components.Segmenter.identity`) and the
tiling (µm/px, tile size, minimum tissue: :meth:`histobench.slides.tiling.TileSet.key`). Inside, each file
records the slide file's content fingerprint (``TileSet.source``) and the tile coordinates; a file whose
fingerprint, coordinates, identity or structure do not match is segmented again, never trusted.

A file is a valid ``.npz`` (numpy can open it) of small members, so that one tile is read without the others
and a slide of any size is written tile by tile:

* ``meta``: a JSON string (format version, segmenter name, version, options and identity, slide id, tile set
  key, source fingerprint, tile count, tile size and µm/px, whether there are type maps, nucleus count);
* ``coords`` int64 [N, 2]: level-0 (x, y) of each tile, as in the tile set;
* ``inst_000123`` uint16 [H, W] per tile (0 = background) and ``type_000123`` uint8 [H, W] when the segmenter
  gives types; a failed tile has all-zero maps;
* ``tbl_<column>``: the per-nucleus table of :mod:`histobench.segment.features` (one array per column);
* ``failed_index`` int64 and ``failed_reason`` (strings): the tiles the segmenter failed on and why.

Members are deflate-compressed (label maps shrink ~20x). The file is written under a temporary name and
renamed when complete (:class:`SlideWriter`), so a killed run leaves only whole files. Reading a member checks
its CRC; a damaged member is a one-line :class:`~histobench.errors.HistobenchError` naming the file.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from histobench.errors import HistobenchError
from histobench.segment.features import COLUMNS, concat_tables, empty_table

FORMAT_VERSION = 1


def cache_root(workdir: str | os.PathLike[str], identity: str, tiles_key: str) -> Path:
    """``WORKDIR/segment/<identity>/<tiles_key>``: the folder of one segmenter setting on one tiling."""
    return Path(workdir) / "segment" / identity / tiles_key


def _member(name: str) -> str:
    return f"{name}.npy"


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    arr = np.asarray(arr)
    np.lib.format.write_array(buf, arr if arr.flags.c_contiguous else arr.copy(order="C"), allow_pickle=False)
    return buf.getvalue()


class SlideWriter:
    """Write one slide's segmentation tile by tile; :meth:`close` renames the finished file into place.

    ``meta`` must hold at least ``slide_id`` and the keys the reader checks (see :func:`slide_meta`).
    Tiles may arrive in any order; every tile of ``coords`` must be added (or failed) before ``close``.
    """

    def __init__(self, path: str | os.PathLike[str], meta: dict[str, Any], coords: np.ndarray, tile_size: int,
                 reporter: Any = None):
        from histobench.locks import OutputLock, remove_temporaries

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One process writes a slide's file (histobench.locks); temporary files of killed writers are removed
        # only under the lock, never those of a live one. A writer that waited for another process and then
        # finds the slide's file written by it, for the same segmenter and tiles, keeps that file
        # (``reused``): its own tiles are dropped, and close() leaves the file as it is.
        self._lock = OutputLock(self.path, reporter).acquire()
        self.reused = _written_for(self.path, meta, coords)
        remove_temporaries(self.path, (".{name}.*.tmp",))
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.meta = dict(meta)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.tile_size = int(tile_size)
        self.n = len(self.coords)
        self.done = np.zeros(self.n, dtype=bool)
        self.typed = np.zeros(self.n, dtype=bool)
        self.tables: list[dict[str, np.ndarray]] = []
        self.failed: dict[int, str] = {}
        self._zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6)

    def _put(self, name: str, arr: np.ndarray) -> None:
        if not self.reused:
            self._zip.writestr(_member(name), _npy_bytes(arr))

    def add(self, index: int, instances: np.ndarray, types: np.ndarray | None, table: dict[str, np.ndarray]) -> None:
        """Tile ``index``'s maps (already validated: uint16-able, [tile_size, tile_size]) and its nuclei rows."""
        if self.done[index]:
            raise ValueError(f"tile {index} of {self.path.name} written twice")
        self._put(f"inst_{index:06d}", instances.astype(np.uint16, copy=False))
        if types is not None:
            self._put(f"type_{index:06d}", types.astype(np.uint8, copy=False))
            self.typed[index] = True
        self.tables.append(table)
        self.done[index] = True

    def fail(self, index: int, reason: str) -> None:
        """Tile ``index`` could not be segmented: all-zero maps, and the reason."""
        if self.done[index]:
            raise ValueError(f"tile {index} of {self.path.name} written twice")
        self._put(f"inst_{index:06d}", np.zeros((self.tile_size, self.tile_size), np.uint16))
        self.failed[index] = reason
        self.done[index] = True

    def close(self) -> Path:
        if not self.done.all():
            self.abort()
            raise ValueError(f"{self.path.name}: {int((~self.done).sum())} of {self.n} tiles missing")
        has_types = bool(self.typed.any())
        if has_types:  # failed tiles (and any tile given without types) get an all-zero type map
            zero = np.zeros((self.tile_size, self.tile_size), np.uint8)
            for i in np.flatnonzero(~self.typed):
                self._put(f"type_{int(i):06d}", zero)
        table = concat_tables(self.tables)
        order = np.lexsort((table["instance"], table["tile"]))
        for k in COLUMNS:
            self._put(f"tbl_{k}", table[k][order])
        idx = np.array(sorted(self.failed), dtype=np.int64)
        self._put("failed_index", idx)
        self._put("failed_reason", np.array([self.failed[int(i)] for i in idx], dtype=str).reshape(-1))
        self._put("coords", self.coords)
        meta = {**self.meta, "format_version": FORMAT_VERSION, "n_tiles": self.n, "tile_size": self.tile_size,
                "has_types": has_types, "nuclei": int(len(table["tile"])), "failed": int(len(idx))}
        self._put("meta", np.array(json.dumps(meta, sort_keys=True)))
        self._zip.close()
        if self.reused:
            self.tmp.unlink(missing_ok=True)
        else:
            os.replace(self.tmp, self.path)
        self._lock.release()
        return self.path

    def abort(self) -> None:
        try:
            self._zip.close()
        finally:
            self.tmp.unlink(missing_ok=True)
            self._lock.release()


def _written_for(path: Path, meta: dict[str, Any], coords: np.ndarray) -> bool:
    """Whether ``path`` is a whole, valid slide file for the same segmenter setting, slide file and tiles."""
    if not path.exists():
        return False
    try:
        seg = open_slide_file(path, verify=True)
    except HistobenchError:
        return False
    m = seg.meta
    return (all(m.get(k) == meta.get(k) for k in ("identity", "slide_id", "tiles_key", "source"))
            and np.array_equal(seg.coords, np.asarray(coords, dtype=np.int64).reshape(-1, 2)))


def slide_meta(segmenter, tiles) -> dict[str, Any]:
    """What a slide file must record for ``segmenter`` (a Segmenter) on ``tiles`` (a TileSet)."""
    return {
        "identity": segmenter.identity(),
        "segmenter": segmenter.name,
        "version": str(type(segmenter).version),
        "options": segmenter.options.model_dump(mode="json"),
        "slide_id": tiles.slide_id,
        "tiles_key": tiles.key(),
        "source": tiles.source,
        "tile_mpp": float(tiles.mpp),
    }


class SlideSegmentation:
    """One slide's cached nuclei, read lazily tile by tile (see the module docstring for the file).

    * ``meta``: the file's metadata (segmenter, identity, tile set key, source, counts);
    * ``coords`` int64 [N, 2]: level-0 (x, y) of the tiles, in this object's tile order;
    * ``table``: per-nucleus columns (``tile`` is this object's tile index), :meth:`frame` as a DataFrame;
    * ``failed`` int64 [F] and ``failed_reasons``: the tiles the segmenter failed on (all-zero maps);
    * ``instances`` uint16 [N, H, W] and ``types`` uint8 [N, H, W] or ``None`` (every tile, read on access);
      :meth:`tile` and :meth:`batch` read only the tiles asked for.

    :meth:`subset` re-indexes it to another tile order (e.g. the capped tile set the training loop uses).
    Open files are closed by :meth:`close` or a ``with`` block; pickling (DataLoader workers) reopens lazily.
    """

    def __init__(self, path: Path, meta: dict[str, Any], coords: np.ndarray, table: dict[str, np.ndarray],
                 failed: np.ndarray, failed_reasons: list[str], rows: np.ndarray | None = None):
        self.path, self.meta = Path(path), meta
        self._rows = np.arange(len(coords), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self._file_coords = np.asarray(coords, dtype=np.int64)
        self.coords = self._file_coords[self._rows]
        self._file_table, self._file_failed, self._file_reasons = table, failed, failed_reasons
        pos = np.full(int(meta["n_tiles"]), -1, dtype=np.int64)
        pos[self._rows] = np.arange(len(self._rows))
        keep = pos[table["tile"].astype(np.int64)] >= 0
        self.table = {k: v[keep] for k, v in table.items()}
        self.table["tile"] = pos[table["tile"][keep].astype(np.int64)].astype(np.int32)
        fkeep = pos[failed] >= 0 if len(failed) else np.zeros(0, bool)
        self.failed = pos[failed[fkeep]] if len(failed) else np.zeros(0, np.int64)
        self.failed_reasons = [r for r, k in zip(failed_reasons, fkeep) if k]
        self._zip: zipfile.ZipFile | None = None

    # -- file access -----------------------------------------------------------------------------------
    def _open(self) -> zipfile.ZipFile:
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        return self._zip

    def _read(self, name: str) -> np.ndarray:
        try:
            return _read_member(self._open(), name)
        except HistobenchError:
            raise
        except Exception as err:  # noqa: BLE001 - BadZipFile (CRC), zlib.error, a truncated member
            raise HistobenchError(f"segmentation cache file {self.path} is damaged ({name}: {err}); run "
                                  f"histobench segment again to redo it") from None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self) -> "SlideSegmentation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"] = None
        return state

    # -- contents --------------------------------------------------------------------------------------
    @property
    def slide_id(self) -> str:
        return str(self.meta["slide_id"])

    @property
    def has_types(self) -> bool:
        return bool(self.meta["has_types"])

    def __len__(self) -> int:
        return len(self._rows)

    def tile(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``(instances uint16 [H, W], types uint8 [H, W] or None)`` of tile ``i``."""
        r = int(self._rows[i])
        inst = self._read(f"inst_{r:06d}")
        return inst, (self._read(f"type_{r:06d}") if self.has_types else None)

    def batch(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """``(instances [B, H, W], types [B, H, W] or None)`` of the tiles ``indices``."""
        s = int(self.meta["tile_size"])
        inst = np.zeros((len(indices), s, s), np.uint16)
        types = np.zeros((len(indices), s, s), np.uint8) if self.has_types else None
        for j, i in enumerate(indices):
            a, t = self.tile(int(i))
            inst[j] = a
            if types is not None:
                types[j] = t
        return inst, types

    @property
    def instances(self) -> np.ndarray:
        return self.batch(range(len(self)))[0]

    @property
    def types(self) -> np.ndarray | None:
        return self.batch(range(len(self)))[1] if self.has_types else None

    def frame(self):
        """The per-nucleus table as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.table)

    def subset(self, coords: np.ndarray) -> "SlideSegmentation":
        """This slide's segmentation in the order of the tiles at ``coords`` (level-0 x, y), e.g. a capped tile
        set; a tile that this file does not hold is an error."""
        rows = rows_for(self._file_coords, coords, self.path)
        return SlideSegmentation(self.path, self.meta, self._file_coords, self._file_table, self._file_failed,
                                 self._file_reasons, rows)


def rows_for(file_coords: np.ndarray, coords: np.ndarray, path: Path) -> np.ndarray:
    """Row of each of ``coords`` in ``file_coords``; a missing tile is a one-line error naming the file."""
    index = {(int(x), int(y)): i for i, (x, y) in enumerate(np.asarray(file_coords).reshape(-1, 2))}
    rows = []
    for x, y in np.asarray(coords).reshape(-1, 2):
        r = index.get((int(x), int(y)))
        if r is None:
            raise HistobenchError(f"segmentation cache file {path} has no tile at ({int(x)}, {int(y)}); run "
                                  f"histobench segment on the same tiling")
        rows.append(r)
    return np.asarray(rows, dtype=np.int64)


def _read_member(zf: zipfile.ZipFile, name: str) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(zf.read(_member(name))), allow_pickle=False)


def open_slide_file(path: str | os.PathLike[str], verify: bool = False) -> SlideSegmentation:
    """Open and validate one slide file (structure, members, shapes; with ``verify`` also every member's CRC,
    which decompresses the whole file). Raises :class:`HistobenchError` naming the file when it is missing,
    damaged or not a histobench segmentation file."""
    path = Path(path)
    if not path.exists():
        raise HistobenchError(f"segmentation cache file {path} does not exist")
    try:
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(str(_read_member(zf, "meta").reshape(-1)[0]))
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
            n, s = int(meta["n_tiles"]), int(meta["tile_size"])
            names = set(zf.namelist())
            need = {_member(f"inst_{i:06d}") for i in range(n)}
            if meta["has_types"]:
                need |= {_member(f"type_{i:06d}") for i in range(n)}
            need |= {_member(f"tbl_{k}") for k in COLUMNS}
            missing = need - names
            if missing:
                raise ValueError(f"{len(missing)} members missing (e.g. {sorted(missing)[0]})")
            coords = _read_member(zf, "coords")
            table = {k: _read_member(zf, f"tbl_{k}") for k in COLUMNS}
            failed = _read_member(zf, "failed_index").astype(np.int64)
            reasons = [str(r) for r in _read_member(zf, "failed_reason")]
            info = {i.filename: i.file_size for i in zf.infolist()}
            bad = zf.testzip() if verify else None
            if bad is not None:
                raise ValueError(f"{bad} fails its CRC check")
        if coords.shape != (n, 2) or len(reasons) != len(failed):
            raise ValueError(f"coords {coords.shape} / failed lists do not fit {n} tiles")
        if len({len(v) for v in table.values()}) > 1 or int(meta["nuclei"]) != len(table["tile"]):
            raise ValueError("the nucleus table's columns disagree")
        if len(table["tile"]) and (table["tile"].min() < 0 or table["tile"].max() >= n):
            raise ValueError("the nucleus table names tiles that do not exist")
        if len(failed) and (failed.min() < 0 or failed.max() >= n):
            raise ValueError("failed tiles out of range")
        sizes = {"inst_": len(_npy_bytes(np.zeros((s, s), np.uint16))),
                 "type_": len(_npy_bytes(np.zeros((s, s), np.uint8)))}
        bad = [k for k, v in info.items() if k[:5] in sizes and v != sizes[k[:5]]]
        if bad:
            raise ValueError(f"{bad[0]} is not a {s}x{s} map")
    except HistobenchError:
        raise
    except Exception as err:  # noqa: BLE001 - BadZipFile, zlib.error, KeyError, ValueError, JSON errors
        raise HistobenchError(f"segmentation cache file {path} is damaged or not a histobench segmentation "
                              f"file: {type(err).__name__}: {err}") from None
    table = {k: table[k].astype(v, copy=False) for k, v in COLUMNS.items()}
    return SlideSegmentation(path, meta, coords, table, failed, reasons)


def matches(seg: SlideSegmentation, identity: str, tiles) -> bool:
    """Whether ``seg`` is the segmentation of exactly ``tiles`` (same key, source and coordinates) by the
    segmenter setting ``identity``."""
    m = seg.meta
    return (m.get("identity") == identity and m.get("tiles_key") == tiles.key() and m.get("source") == tiles.source
            and int(m.get("tile_size", -1)) == int(tiles.tile_size)
            and np.array_equal(seg.coords, np.asarray(tiles.coords, dtype=np.int64)))


class SegmentationCache:
    """The slide files of one segmenter setting on one tiling: ``SegmentationCache(root).slide(slide_id)``.

    ``root`` is ``WORKDIR/segment/<identity>/<tiles key>`` (:func:`cache_root`, or
    :meth:`for_segmenter`). :meth:`slide` validates the file it opens; with ``tiles`` (a TileSet) it also
    checks the file belongs to that slide file and tiling, and returns it in ``tiles``' order.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    @classmethod
    def for_segmenter(cls, workdir: str | os.PathLike[str], segmenter, tiles_key: str) -> "SegmentationCache":
        return cls(cache_root(workdir, segmenter.identity(), tiles_key))

    def path(self, slide_id: str) -> Path:
        return self.root / f"{slide_id}.npz"

    def slide_ids(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.npz")) if self.root.is_dir() else []

    def __contains__(self, slide_id: str) -> bool:
        return self.path(slide_id).exists()

    def __iter__(self) -> Iterator[str]:
        return iter(self.slide_ids())

    def slide(self, slide_id: str, tiles=None) -> SlideSegmentation:
        seg = open_slide_file(self.path(slide_id))
        if tiles is None:
            return seg
        m = seg.meta
        if m.get("tiles_key") != tiles.key() or (tiles.source and m.get("source") != tiles.source):
            raise HistobenchError(f"segmentation cache file {seg.path} was made for another tiling or slide file "
                                  f"({m.get('tiles_key')}, source {m.get('source')}); run histobench segment again")
        if np.array_equal(seg.coords, np.asarray(tiles.coords, dtype=np.int64)):
            return seg
        return seg.subset(tiles.coords)


__all__ = ["SegmentationCache", "SlideSegmentation", "SlideWriter", "cache_root", "open_slide_file", "matches",
           "slide_meta", "empty_table"]
