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

from histobench.errors import HistobenchError


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
    """Write one slide's features atomically."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=np.asarray(features, dtype=np.float32))
            f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
            for k, v in attrs.items():
                f.attrs[k] = v
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind, not even the temporary file
    return path


def read_features(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(features [N, D], coords [N, 2], attrs)`` of one file; also reads CLAM/TRIDENT files."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise HistobenchError(f"feature file {path} has no 'features' dataset (keys: {', '.join(f.keys())})")
            feats = np.asarray(f["features"][()], dtype=np.float32)
            if feats.ndim == 3 and feats.shape[0] == 1:  # TRIDENT writes [1, N, D] for some encoders
                feats = feats[0]
            coords = np.asarray(f["coords"][()]) if "coords" in f else np.zeros((len(feats), 2), np.int64)
            if coords.ndim == 3 and coords.shape[0] == 1:
                coords = coords[0]
            attrs = dict(f.attrs)
    except OSError as err:
        raise HistobenchError(f"cannot read feature file {path}: {err}") from None
    return feats, coords, attrs


def is_complete(path: Path, expected: Mapping[str, Any]) -> bool:
    """True if ``path`` exists and its attributes equal ``expected`` (a stale file is never reused)."""
    import h5py

    if not Path(path).exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            return all(str(f.attrs.get(k)) == str(v) for k, v in expected.items()) and "features" in f
    except OSError:
        return False


class FeatureDir(Mapping[str, np.ndarray]):
    """A folder of ``<slide_id>.h5`` files, read as ``slide_id -> features`` (loaded on access)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise HistobenchError(f"feature folder {self.root} does not exist")
        self._paths = {p.stem: p for p in sorted(self.root.glob("*.h5"))}

    def __getitem__(self, slide_id: str) -> np.ndarray:
        return read_features(self._paths[slide_id])[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, slide_id: str) -> Path:
        return self._paths[slide_id]
