"""Cohort manifests: one row per slide (``slide_id, case_id, path`` and the task's label columns)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from histobench.errors import HistobenchError

REQUIRED = ("slide_id", "case_id", "path")


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


def load_manifest(path: Path, columns: Iterable[str] = ()):
    """Read and validate a manifest CSV; relative slide paths are resolved against its folder."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise HistobenchError(f"manifest {path} does not exist")
    df = validate_manifest(pd.read_csv(path), columns, source=f"manifest {path}")
    df["path"] = [str(p if Path(p).is_absolute() else (path.parent / p)) for p in df["path"].astype(str)]
    return df
