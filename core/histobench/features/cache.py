"""The per-slide HDF5 feature cache, in the layout CLAM and TRIDENT use.

One file per slide and encoder: datasets ``features [N, D]`` (float32) and ``coords [N, 2]`` (level-0
x, y), attributes ``encoder``, ``weights_hash``, ``mpp``, ``tile_size``, ``histobench_version``. Files are
written to a temporary name and renamed, so a crash never leaves a half-written file under the real name.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from histobench.errors import HistobenchError, disk_full_reason


def weights_hash(module: Any) -> str:
    """sha256 (first 16 hex digits) over a module's state dict: names, shapes, dtypes and values."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.float().numpy().tobytes() if t.is_floating_point() else t.numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(encoder: str, weights: str, mpp: float, tile_size: int) -> str:
    """Folder name of one feature set: every attribute that changes the features is in it."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", encoder)
    return f"{safe}-{weights[:12]}-mpp{mpp:g}-px{tile_size}"


def write_features(path: Path, features: np.ndarray, coords: np.ndarray, attrs: Mapping[str, Any]) -> Path:
    """Write one slide's features atomically (all rows at once, through :class:`FeatureWriter`)."""
    features = np.asarray(features, dtype=np.float32)
    writer = FeatureWriter(path, coords, attrs, dim=features.shape[1] if features.ndim == 2 else None)
    try:
        writer.append(features)
    except BaseException:
        writer.abort()  # a failed write leaves nothing behind, not even the temporary file
        raise
    return writer.close()


_ABANDONED: list = []  # HDF5 handles whose write failed for want of space: closing them would crash the process


_HOOKS_QUIETED = False


def _quiet_hdf5_deallocs() -> None:
    """When a write fails for want of space, h5py frees the objects of that write with a traceback each on
    stderr, printed through ``sys.excepthook`` and ``sys.unraisablehook`` from ``ObjectID.__dealloc__``, before
    the one-line error says the same. Those alone are silenced (a RuntimeError from h5py's object code whose
    message is a full disk or a file-size limit); everything else reaches the previous hooks."""
    import sys

    global _HOOKS_QUIETED
    if _HOOKS_QUIETED:
        return
    _HOOKS_QUIETED = True

    def from_a_full_disk(exc) -> bool:
        return isinstance(exc, RuntimeError) and disk_full_reason(exc) is not None and "id ref count" in str(exc)

    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def unraisable_hook(unraisable):
        if not (from_a_full_disk(unraisable.exc_value) and "ObjectID" in repr(unraisable.object)):
            previous_unraisable(unraisable)

    def except_hook(kind, value, tb):
        frames, step = [], tb
        while step is not None:
            frames.append(step.tb_frame.f_code.co_filename)
            step = step.tb_next
        if not (from_a_full_disk(value) and frames and all(f.startswith("h5py/") for f in frames)):
            previous_except(kind, value, tb)

    sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook


def hdf5_abandoned() -> bool:
    """True once a feature file's HDF5 handle was abandoned after a failed write: the process must then end
    with ``os._exit`` (the interpreter's own shutdown would close the handle and crash)."""
    return bool(_ABANDONED)


class FeatureWriter:
    """One slide's features written batch by batch, so that memory does not grow with the slide's size.

    The file is built under a temporary name (``coords`` first, ``features [N, D]`` allocated at the first
    batch) and renamed into place by :meth:`close` once all ``N`` rows are written, with its attributes: a
    crash never leaves a half-written file under the real name. :meth:`abort` removes the temporary file.
    """

    def __init__(self, path: Path, coords: np.ndarray, attrs: Mapping[str, Any], dim: int | None = None):
        import h5py

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.n, self.pos, self.attrs = len(coords), 0, dict(attrs)
        self._file = None
        _quiet_hdf5_deallocs()
        self._check_space(0 if dim is None else self.n * int(dim) * 4)
        self._file = h5py.File(self.tmp, "w")
        self._file.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        self._features = None
        if dim is not None and self.n == 0:
            self._allocate(int(dim))

    def _allocate(self, dim: int) -> None:
        self._features = self._file.create_dataset("features", shape=(self.n, dim), dtype=np.float32,
                                                   chunks=(min(max(self.n, 1), 1024), dim) if self.n else None)

    def append(self, features: np.ndarray) -> None:
        features = np.asarray(features, dtype=np.float32)
        if self.pos + len(features) > self.n:
            raise ValueError(f"{self.path.name}: {self.pos + len(features)} feature rows for {self.n} tiles")
        try:
            if self._features is None:  # the width is known now: the space too (the constructor had only coords)
                self._check_space(self.n * features.shape[1] * 4)
                self._allocate(features.shape[1])
            self._features[self.pos:self.pos + len(features)] = features
        except (OSError, RuntimeError) as err:
            raise self._write_failed(err) from err
        self.pos += len(features)

    def _check_space(self, nbytes: int) -> None:
        """Refuse, before writing, a file that cannot fit: HDF5 does not recover from a write that fails for want
        of space (closing such a file can crash the process), so a full disk or a file-size limit is found
        here, with room to spare, and the temporary file is removed."""
        import resource
        import shutil

        need = nbytes + 16 * self.n + (1 << 20)  # features, coords, and a MiB for HDF5's own structures
        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        try:
            free = shutil.disk_usage(self.tmp.parent).free
        except OSError:
            free = None
        if soft != resource.RLIM_INFINITY and need > soft:
            why = f"this process may write files of at most {soft} bytes (ulimit -f)"
        elif free is not None and need > free:
            why = f"{free / 2**20:.1f} MiB free on its disk"
        else:
            return
        if self._file is not None:
            self.abort()
        raise HistobenchError(f"cannot write feature file {self.path}: it needs about {need / 2**20:.1f} MiB and "
                              f"{why}; the slides written before it are kept")

    def _write_failed(self, err: BaseException) -> BaseException:
        """A write that failed anyway (the space went between the check and the write): the temporary file
        goes and one line names the file. HDF5 crashes the process when such a file is closed, even at exit,
        so the handle is abandoned, never closed, and the CLI leaves with ``os._exit`` after its error line
        (:func:`hdf5_abandoned`)."""
        reason = disk_full_reason(err)
        if reason is None:
            return err
        _ABANDONED.append((self._file, self._features))
        self._file = self._features = None
        self.tmp.unlink(missing_ok=True)
        return HistobenchError(f"cannot write feature file {self.path}: {reason}; the slides written before it "
                               f"are kept")

    def close(self) -> Path:
        if self._features is None and self.n == 0:
            self._allocate(0)  # a slide without tiles, of an encoder that does not state its width
        if self.pos != self.n or self._features is None:
            self.abort()
            raise ValueError(f"{self.path.name}: {self.pos} feature rows written for {self.n} tiles")
        try:
            for k, v in self.attrs.items():
                self._file.attrs[k] = v
            self._file.close()
        except (OSError, RuntimeError) as err:
            raise self._write_failed(err) from err
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            if self._file is not None:
                self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def read_features(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(features [N, D], coords [N, 2], attrs)`` of one file; also reads CLAM/TRIDENT files."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or not isinstance(f["features"], h5py.Dataset):
                raise HistobenchError(
                    f"feature file {path} has no 'features' dataset (has: {', '.join(f.keys()) or 'nothing'}); "
                    f"expected 'features' [N, D] and 'coords' [N, 2], the CLAM/TRIDENT layout")
            feats = np.asarray(f["features"][()], dtype=np.float32)
            if feats.ndim == 3 and feats.shape[0] == 1:  # TRIDENT writes [1, N, D] for some encoders
                feats = feats[0]
            coords = np.asarray(f["coords"][()]) if "coords" in f else np.zeros((len(feats), 2), np.int64)
            if coords.ndim == 3 and coords.shape[0] == 1:
                coords = coords[0]
            attrs = dict(f.attrs)
    except OSError as err:
        raise HistobenchError(f"cannot read feature file {path}: {' '.join(str(err).split())}") from None
    except (TypeError, ValueError) as err:  # a dataset of strings or compound records
        raise HistobenchError(f"feature file {path}: 'features' is not numeric ({' '.join(str(err).split())})") from None
    if feats.ndim != 2:
        raise HistobenchError(f"feature file {path}: 'features' has shape {list(feats.shape)}, expected [N, D]")
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(feats):
        raise HistobenchError(f"feature file {path}: 'coords' has shape {list(coords.shape)}, expected "
                              f"[{len(feats)}, 2] (one x, y per feature row)")
    return feats, coords, attrs


def is_complete(path: Path, expected: Mapping[str, Any]) -> bool:
    """True if ``path`` exists, its attributes equal ``expected`` (a stale file is never reused) and it is
    whole: ``features [N, D]`` and ``coords [N, 2]`` with one row per tile, the last row readable. A damaged
    or partial file is False, so it is written again rather than trusted."""
    import h5py

    if not Path(path).exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            if not all(str(f.attrs.get(k)) == str(v) for k, v in expected.items()):
                return False
            if "features" not in f or "coords" not in f:
                return False
            feats, coords = f["features"], f["coords"]
            if feats.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2 or feats.shape[0] != coords.shape[0]:
                return False
            if feats.shape[0]:  # the last chunk is where a cut-short write would show
                np.asarray(feats[-1])
                np.asarray(coords[-1])
            return True
    except (OSError, ValueError, KeyError):
        return False


class FeatureDir(Mapping[str, np.ndarray]):
    """A folder of ``<slide_id>.h5`` files, read as ``slide_id -> features`` (loaded on access)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise HistobenchError(f"feature folder {self.root} does not exist")
        self._paths = {p.stem: p for p in sorted(self.root.glob("*.h5"))}
        self._width: tuple[int, Path] | None = None  # the first file's feature width, and that file

    def __getitem__(self, slide_id: str) -> np.ndarray:
        path = self._paths[slide_id]
        feats = read_features(path)[0]
        if len(feats):
            if self._width is None:
                self._width = (feats.shape[1], path)
            elif feats.shape[1] != self._width[0]:
                raise HistobenchError(
                    f"feature file {path} has {feats.shape[1]}-wide features but {self._width[1].name} has "
                    f"{self._width[0]}: the folder {self.root} mixes encoders")
        return feats

    def __contains__(self, slide_id: object) -> bool:  # without reading the file
        return slide_id in self._paths

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, slide_id: str) -> Path:
        return self._paths[slide_id]
