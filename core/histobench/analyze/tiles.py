"""The fixed held-out tile set every analysis of a task runs on.

Analyses compare encoders on the same pixels, so the tile set is a pure function of the task's tiling
(µm/px, tile size, minimum tissue), the slides it is drawn from, the number of tiles and a seed. It is drawn
once, cached as ``WORKDIR/analysis-tiles/<hash>.npz`` (uint8 tiles ``[N, 3, S, S]`` and where each lies), and
its hash is logged with every analysis.

Which slides:

* ``--demo``: a separate synthetic cohort of the task, generated with another seed (:data:`HELD_OUT_SEED`)
  under ``WORKDIR/demo/<task>-held-out/`` and with its slide and patient ids prefixed ``HELDOUT-``. No demo
  run pretrains on it, so it is truly held out. At most :data:`DEMO_PATIENTS` patients are generated.
* real data: the test patients of fold 0 of the task's own splits (the splits :mod:`histobench.pipeline`
  evaluates on). With transductive pretraining (histobench's default: the pretext sees every slide of the
  cohort, without labels) these slides *were* seen during pretraining; they are held out from the
  supervised heads only.

Tiles are drawn uniformly without replacement from all tissue tiles of those slides with ``numpy``'s
``default_rng(seed)``, and kept in slide order. Their :class:`TileRef` paths are absolute, so that an analysis
started from another folder still finds the slides.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histobench.components import Task, TileRef
from histobench.errors import HistobenchError
from histobench.reporting import Reporter

if TYPE_CHECKING:  # pragma: no cover
    import torch

HELD_OUT_SEED = 7919  # the demo's held-out cohort; demo runs pretrain on the cohort made with seed 0
DEMO_PATIENTS = 8  # enough slides for a few hundred demo tiles, generated in seconds
PREFIX = "HELDOUT-"


def held_out_manifest(task: Task, demo: bool, data_root: Path | None, workdir: Path, reporter: Reporter):
    """The held-out slides (a manifest): the separate demo cohort, or fold 0's test patients of the task."""
    from histobench.pipeline import RunSpec, load_cohort

    workdir = Path(workdir)
    if demo:
        small = type(task)({**task.options.model_dump(), "demo_patients": min(task.options.demo_patients, DEMO_PATIENTS)}) \
            if hasattr(task.options, "demo_patients") else task
        out = workdir / "demo" / f"{task.name}-held-out"
        with reporter.stage(f"held-out demo cohort {task.name}", total=None, unit="slides"):
            df = small.demo_cohort(out, seed=HELD_OUT_SEED).copy()
        # other ids than the runs' demo cohort (seed 0), so that the per-slide tile caches never collide
        df["slide_id"] = PREFIX + df["slide_id"].astype(str)
        df["case_id"] = PREFIX + df["case_id"].astype(str)
        return df.reset_index(drop=True)

    from histobench.cohorts.splits import task_splits

    spec = RunSpec(task=task.name, demo=False, workdir=workdir, data_root=data_root)
    manifest = load_cohort(spec, task, reporter)
    splits = task_splits(task, manifest, workdir=workdir, seed=0)
    fold = int(splits.table["fold"].min())
    slides = splits.slides(fold, "test")
    if slides is not None:
        keep = manifest["slide_id"].isin(slides)
    else:
        keep = manifest["case_id"].isin(splits.cases(fold, "test"))
    held = manifest[keep].reset_index(drop=True)
    if held.empty:
        raise HistobenchError(f"fold {fold} of task {task.name}'s split {splits.name!r} has no test slide")
    reporter.info(f"held-out slides: {len(held)} of fold {fold}'s test patients (split {splits.name}, {splits.hash}); "
                  "transductive pretraining saw them without labels")
    return held


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save(path: Path, tiles: np.ndarray, refs: list[TileRef]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as f:
        np.savez(f, tiles=tiles, slide_id=np.array([r.slide_id for r in refs], dtype=str),
                 path=np.array([str(r.path) for r in refs], dtype=str),
                 geometry=np.array([[r.x, r.y, r.level, r.read_size, r.tile_size] for r in refs], dtype=np.int64).reshape(-1, 5),
                 mpp=np.array([r.mpp for r in refs], dtype=np.float64))
    os.replace(f.name, path)


def _load(path: Path) -> tuple[np.ndarray, list[TileRef]]:
    with np.load(path, allow_pickle=False) as z:
        tiles = z["tiles"]
        refs = [TileRef(str(s), Path(str(p)), int(g[0]), int(g[1]), int(g[2]), int(g[3]), int(g[4]), float(m))
                for s, p, g, m in zip(z["slide_id"], z["path"], z["geometry"], z["mpp"])]
    return tiles, refs


def held_out_tiles(task: Task, demo: bool, data_root: Path | None, workdir: Path, n_tiles: int, seed: int = 0,
                   reporter: Reporter | None = None) -> tuple["torch.Tensor", list[TileRef], str]:
    """The task's fixed held-out tile set: ``(uint8 tiles [N, 3, S, S], [TileRef] per tile, hash)``.

    Deterministic in (task tiling, held-out slides and their content, ``n_tiles``, ``seed``) and cached under
    ``WORKDIR/analysis-tiles/<hash>.npz``; fewer than ``n_tiles`` tiles when the slides have fewer.
    """
    import torch

    from histobench.cohorts.status import StatusTable
    from histobench.pipeline import RunSpec, tile_cohort
    from histobench.pretrain.data import SlideTileDataset, SlideTiles

    if n_tiles < 1:
        raise HistobenchError(f"--tiles must be at least 1 (got {n_tiles})")
    reporter = reporter or Reporter()
    workdir = Path(workdir)
    manifest = held_out_manifest(task, demo, data_root, workdir, reporter)
    # the slides' tile grids come from the shared per-slide tile cache; the status table of unusable slides
    # goes to the analysis folder, not the runs' WORKDIR/status.csv
    spec = RunSpec(task=task.name, demo=demo, workdir=workdir / "analysis-tiles", data_root=data_root)
    slides = tile_cohort(manifest, task, workdir, reporter, spec, StatusTable())

    counts = np.array([len(s.tiles) for s in slides])
    total = int(counts.sum())
    n = min(int(n_tiles), total)
    if n < n_tiles:
        reporter.warn(f"the held-out slides have {total} tiles; using all of them instead of {n_tiles}")
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    subset, refs = [], []
    for s, start, count in zip(slides, starts, counts):
        idx = chosen[(chosen >= start) & (chosen < start + count)] - start
        if not len(idx):
            continue
        t = s.tiles
        subset.append(SlideTiles(s.slide_id, s.path, replace(t, coords=t.coords[idx], tissue_fraction=t.tissue_fraction[idx]), s.mpp))
        # absolute: an analysis run from another folder (or a segmenter reading a slide's side files, as the
        # oracle does) must still find the slide
        where = Path(s.path).absolute()
        refs += [TileRef(s.slide_id, where, int(x), int(y), int(t.level), int(t.read_size), int(t.tile_size),
                         float(t.mpp)) for x, y in t.coords[idx]]
    o = task.options
    key = _digest({"task": task.name, "mpp": o.mpp, "tile_size": o.tile_size, "min_tissue": o.min_tissue,
                   "seed": int(seed), "n": n,
                   "slides": [(s.slide_id, s.tiles.source, s.tiles.coords.tolist()) for s in subset]})
    path = workdir / "analysis-tiles" / f"{key}.npz"
    if path.exists():
        try:
            tiles, cached_refs = _load(path)
            # the pixels come from the cache; where the tiles lie comes from this call's slides (the same tiles,
            # by the key), so a cache written from another folder, with relative slide paths, still works
            if len(tiles) == n and [(r.slide_id, r.x, r.y) for r in cached_refs] == [(r.slide_id, r.x, r.y) for r in refs]:
                return torch.from_numpy(tiles), refs, key
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: read the tiles again
    dataset = SlideTileDataset(subset, decode="jpeg")
    tiles = np.empty((n, 3, o.tile_size, o.tile_size), dtype=np.uint8)
    with reporter.stage("held-out tiles", total=n, unit="tiles") as st:
        for i in range(n):
            tiles[i] = dataset.read(i).transpose(2, 0, 1)
            st.advance()
    _save(path, tiles, refs)
    reporter.info(f"held-out tile set {key}: {n} tiles of {len(subset)} slides at {o.mpp:g} µm/px, {o.tile_size} px")
    return torch.from_numpy(tiles), refs, key
