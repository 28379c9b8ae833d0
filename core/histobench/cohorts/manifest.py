"""Cohort manifests: one row per slide (``slide_id, case_id, path`` and the task's label columns).

Slide paths are confined to the data root: a path that resolves outside it (``../../etc/passwd``, an absolute
path elsewhere, a symlink pointing out) is refused in one line naming the slide, unless the user passes
``--allow-outside-data-root`` (or sets ``HISTOBENCH_ALLOW_OUTSIDE_DATA_ROOT=1``). A manifest found in a shared
folder then cannot make histobench read, or write next to, files its author chose elsewhere on the machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from histobench.errors import HistobenchError

REQUIRED = ("slide_id", "case_id", "path")
ALLOW_OUTSIDE_FLAG = "--allow-outside-data-root"


def data_root(explicit: str | Path | None = None) -> Path:
    """The data root: ``--data-root``, else ``HISTOBENCH_DATA_ROOT``; a clear error if neither is set."""
    root = explicit or os.environ.get("HISTOBENCH_DATA_ROOT")
    if not root:
        raise HistobenchError("no data root: pass --data-root DIR or set HISTOBENCH_DATA_ROOT (or use --demo)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise HistobenchError(f"data root {root} is not a folder")
    return root


def validate_manifest(df, columns: Iterable[str] = (), source: str = "manifest"):
    """Check required and task columns and unique slide ids; returns the frame with string ids."""
    missing = [c for c in (*REQUIRED, *columns) if c not in df.columns]
    if missing:
        raise HistobenchError(f"{source} is missing column(s) {', '.join(missing)} (has: {', '.join(map(str, df.columns))})")
    df = df.copy()
    df["slide_id"] = df["slide_id"].astype(str)
    df["case_id"] = df["case_id"].astype(str)
    dup = df["slide_id"][df["slide_id"].duplicated()]
    if len(dup):
        raise HistobenchError(f"{source} lists slide {dup.iloc[0]!r} more than once")
    return df.reset_index(drop=True)


def _within(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def check_paths(df, roots: Iterable[str | Path], *, allow_outside: bool = False, source: str = "manifest") -> None:
    """Refuse the first slide whose path resolves (symlinks followed) outside every one of ``roots``.

    ``df`` holds ``slide_id`` and ``path`` (relative paths already joined to their base). Rows without a path
    are left to the row checks. ``allow_outside`` turns the check off.
    """
    if allow_outside:
        return
    bases = [os.path.realpath(Path(r).expanduser()) for r in roots if r is not None]
    if not bases:
        return
    for sid, raw in zip(df["slide_id"], df["path"]):
        if raw is None or (isinstance(raw, float) and raw != raw) or not str(raw).strip():
            continue
        real = os.path.realpath(Path(str(raw)).expanduser())
        if not any(_within(real, b) for b in bases):
            where = " or ".join(bases)
            raise HistobenchError(
                f"{source}: slide {sid} has path {str(raw)!r}, which resolves to {real}, outside the data root "
                f"{where}; pass {ALLOW_OUTSIDE_FLAG} to read slides outside it"
            )


def allow_outside_from_env() -> bool:
    """``HISTOBENCH_ALLOW_OUTSIDE_DATA_ROOT`` set to 1/true/yes."""
    return os.environ.get("HISTOBENCH_ALLOW_OUTSIDE_DATA_ROOT", "").strip().lower() in ("1", "true", "yes")


def load_manifest(path: Path, columns: Iterable[str] = (), *, data_root: str | Path | None = None,
                  allow_outside: bool = False):
    """Read and validate a manifest CSV; relative slide paths are resolved against its folder.

    Every slide path must then lie inside the manifest's folder or ``data_root`` (see :func:`check_paths`),
    unless ``allow_outside``.
    """
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise HistobenchError(f"manifest {path} does not exist")
    try:
        raw = pd.read_csv(path, dtype={"slide_id": str, "case_id": str, "path": str})
    except Exception as exc:  # pandas raises several kinds on a file that is not a CSV
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HistobenchError(f"manifest {path} is not a readable CSV: {first}") from None
    df = validate_manifest(raw, columns, source=f"manifest {path}")
    df["path"] = [str(p if Path(p).is_absolute() else (path.parent / p)) for p in df["path"].astype(str)]
    check_paths(df, [path.parent, data_root], allow_outside=allow_outside or allow_outside_from_env(),
                source=f"manifest {path}")
    return df
