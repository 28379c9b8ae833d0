"""Segment every tile of a cohort with one segmenter, in worker processes, into the segmentation cache.

:func:`segment_cohort` skips every slide whose cache file is valid for this segmenter setting and tiling (a
rerun with the same options is a 100 % hit), splits the other slides' tiles into chunks and runs them:

* in this process when ``workers == 0`` and the segmenter allows it;
* otherwise in ``workers`` fresh processes started with multiprocessing's ``spawn`` context, never forked:
  each gets the segmenter's class path and options, imports the class, builds it and calls ``setup()`` once.
  A segmenter with ``own_process = True`` (TensorFlow's StarDist, which can crash next to torch's triton)
  always runs this way, with at least one worker.

Workers decode the tiles themselves with :class:`histobench.pretrain.data.SlideTileDataset` (openslide by
default, which keeps torch out of the worker), call ``segment(tile, TileRef)``, check the maps and compute
the per-nucleus table (:mod:`histobench.segment.features`). A tile that fails (the segmenter raises, or
returns maps of the wrong shape or type) is recorded with a one-line reason and the run goes on; a
:class:`~histobench.errors.HistobenchError` (a user mistake, such as the ``oracle`` on a slide without its
nuclei file) stops the run with that one line. Results are
streamed into one file per slide (:class:`histobench.segment.cache.SlideWriter`), renamed into place when the
slide is complete, so a killed run keeps every finished slide.
"""

from __future__ import annotations

import importlib
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from histobench.components import Segmenter, TileRef
from histobench.errors import HistobenchError

CHUNK_TILES = 32  # tiles per work item: small enough for a smooth progress bar, large enough to amortise IPC


@dataclass
class SegmentResult:
    """What :func:`segment_cohort` did. Tile counts are over every slide given; ``failed`` counts failed tiles
    in the cache (cached and new), ``failures`` lists the new ones as ``(slide_id, tile index, reason)``."""

    identity: str
    root: Path
    slides: int = 0
    tiles: int = 0
    cached: int = 0
    segmented: int = 0
    failed: int = 0
    nuclei: int = 0
    seconds: float = 0.0
    slides_cached: int = 0
    failures: list[tuple[str, int, str]] = field(default_factory=list)

    @property
    def tiles_per_second(self) -> float:
        """Tiles segmented (not cached) per second of the segmentation stage."""
        return self.segmented / self.seconds if self.seconds > 0 else 0.0

    @property
    def nuclei_per_tile(self) -> float:
        return self.nuclei / self.tiles if self.tiles else 0.0

    @property
    def hit_rate(self) -> float:
        return self.cached / self.tiles if self.tiles else 0.0

    @property
    def info(self) -> dict[str, Any]:
        """The counts as a JSON-able dict (for run records and the pretext's context)."""
        return {"root": str(self.root), "slides": self.slides, "tiles": self.tiles, "cached": self.cached,
                "segmented": self.segmented, "failed": self.failed, "nuclei": self.nuclei,
                "nuclei_per_tile": round(self.nuclei_per_tile, 3), "seconds": round(self.seconds, 3)}


def class_path(cls: type) -> str:
    """``module:QualName`` of a segmenter class, importable in a fresh process."""
    if "<locals>" in cls.__qualname__ or cls.__module__ == "__main__":
        raise HistobenchError(f"segmenter {cls.name!r} ({cls.__qualname__}) must be a module-level class of an "
                              f"importable module to run in its own process")
    return f"{cls.__module__}:{cls.__qualname__}"


def load_class(path: str) -> type:
    module, _, qual = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def check_maps(instances: Any, types: Any, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate a segmenter's output for a ``size`` x ``size`` tile; returns ``(uint16, uint8 or None)`` maps.

    Raises ValueError with a one-line reason: wrong shape, not integer, negative labels, more than 65535, or a
    type map of another shape or outside 0..255.
    """
    inst = np.asarray(instances)
    if inst.shape != (size, size):
        raise ValueError(f"instances have shape {inst.shape}, expected ({size}, {size})")
    if not (np.issubdtype(inst.dtype, np.integer) or inst.dtype == bool):
        raise ValueError(f"instances are {inst.dtype}, expected an integer label map")
    if inst.size and (int(inst.min()) < 0 or int(inst.max()) > 0xFFFF):
        raise ValueError(f"instance labels span {int(inst.min())}..{int(inst.max())}, expected 0..65535")
    if types is None:
        return inst.astype(np.uint16, copy=False), None
    t = np.asarray(types)
    if t.shape != (size, size):
        raise ValueError(f"types have shape {t.shape}, expected ({size}, {size})")
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"types are {t.dtype}, expected integer type ids")
    if t.size and (int(t.min()) < 0 or int(t.max()) > 255):
        raise ValueError(f"type ids span {int(t.min())}..{int(t.max())}, expected 0..255")
    return inst.astype(np.uint16, copy=False), t.astype(np.uint8, copy=False)


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip().rstrip(":")[:300]


# ------------------------------------------------------------------------------------------- the worker
class _Worker:
    """The state of one worker (or of this process): the set-up segmenter and a tile reader."""

    def __init__(self, segmenter: Segmenter, slides: Sequence, decode: str):
        from histobench.pretrain.data import SlideTileDataset

        self.segmenter = segmenter
        self.dataset = SlideTileDataset(slides, max_open=4, decode=decode)
        counts = [len(s.tiles) for s in self.dataset.slides]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def run(self, slide: int, indices: Sequence[int]) -> dict[str, Any]:
        from histobench.segment.features import nucleus_features

        s = self.dataset.slides[slide]
        tiles = s.tiles
        out: dict[str, Any] = {"slide": slide, "done": [], "failed": [], "pid": os.getpid()}
        for i in indices:
            i = int(i)
            try:
                tile = self.dataset.read(int(self.offsets[slide]) + i)
            except Exception as err:  # noqa: BLE001 - an unreadable tile is recorded, not fatal
                out["failed"].append((i, "read: " + _reason(err)))
                continue
            x, y = (int(v) for v in tiles.coords[i])
            ref = TileRef(slide_id=s.slide_id, path=Path(s.path), x=x, y=y, level=int(tiles.level),
                          read_size=int(tiles.read_size), tile_size=int(tiles.tile_size), mpp=float(tiles.mpp))
            try:
                inst, types = self.segmenter.segment(tile, ref)
                inst, types = check_maps(inst, types, tiles.tile_size)
                table = nucleus_features(tile, inst, types, float(tiles.mpp), i)
            except HistobenchError:  # a user mistake (e.g. the oracle on a slide without nuclei file): stop
                raise
            except Exception as err:  # noqa: BLE001 - one bad tile must not stop the cohort
                out["failed"].append((i, _reason(err)))
                continue
            out["done"].append((i, inst, types, table))
        return out


_WORKER: _Worker | None = None
_WORKER_ERROR: str | None = None


def _init_worker(path: str, options: dict, slides: list, decode: str) -> None:
    """Pool initializer (a fresh spawned process): build the segmenter from its class path and set it up."""
    global _WORKER, _WORKER_ERROR
    try:
        cls = load_class(path)
        segmenter = cls(options)
        segmenter.setup()
        _WORKER = _Worker(segmenter, slides, decode)
    except Exception as err:  # noqa: BLE001 - reported by the first chunk, with the segmenter's name
        _WORKER_ERROR = f"setup in worker process {os.getpid()} failed: {_reason(err)}"


def _run_chunk(slide: int, indices: list[int]) -> dict[str, Any]:
    if _WORKER is None:
        raise RuntimeError(_WORKER_ERROR or "worker not initialised")
    return _WORKER.run(slide, indices)


# ------------------------------------------------------------------------------------------- the runner
def segment_cohort(segmenter: Segmenter, slides: Sequence, workdir: str | os.PathLike[str], reporter=None,
                   workers: int | None = None, decode: str = "openslide",
                   chunk_tiles: int = CHUNK_TILES, verify: bool = True) -> SegmentResult:
    """Segment every tile of ``slides`` (``[SlideTiles]``, e.g. from ``tile_cohort``) into the cache under
    ``workdir`` (``WORKDIR/segment/<identity>/<tiles key>/<slide_id>.npz``).

    ``workers``: 0 runs in this process (a segmenter with ``own_process`` still gets one spawned worker);
    ``N > 0`` spawns N worker processes; ``None`` picks 0 for small jobs (under 256 tiles) and up to
    ``min(cpu count, 8)`` otherwise. ``decode``: how workers read tiles (``SlideTileDataset``'s modes;
    ``"openslide"`` keeps torch out of the workers, ``"jpeg"`` gives the same pixels faster but imports
    torchvision). ``verify``: check every member of a cached file (CRC) before trusting it, not only its
    structure (decompresses the file; about 0.1 s per 1000 tiles of 224 px). Returns a :class:`SegmentResult`.
    """
    from histobench.reporting import Reporter
    from histobench.segment.cache import SlideWriter, cache_root, matches, open_slide_file, slide_meta

    reporter = reporter or Reporter()
    t0 = time.perf_counter()
    slides = list(slides)
    identity = segmenter.identity()
    keys = sorted({s.tiles.key() for s in slides})
    result = SegmentResult(identity=identity, root=cache_root(workdir, identity, keys[0] if keys else ""),
                           slides=len(slides), tiles=sum(len(s.tiles) for s in slides))

    todo = []
    for s in slides:
        path = cache_root(workdir, identity, s.tiles.key()) / f"{s.slide_id}.npz"
        if path.exists():
            try:
                seg = open_slide_file(path, verify=verify)
            except HistobenchError as err:
                reporter.warn(f"slide {s.slide_id}: {err}; segmenting it again")
                seg = None
            if seg is not None and matches(seg, identity, s.tiles):
                result.cached += len(s.tiles)
                result.slides_cached += 1
                result.nuclei += int(seg.meta["nuclei"])
                result.failed += int(seg.meta["failed"])
                continue
        todo.append((s, path))
    n_todo = sum(len(s.tiles) for s, _ in todo)
    if result.cached:
        reporter.info(f"segmentation cache: {result.slides_cached} slides ({result.cached} tiles) already done "
                      f"with {identity}")
    if not todo:
        result.seconds = time.perf_counter() - t0
        return result

    if workers is None:
        workers = 0 if n_todo < 256 else min(os.cpu_count() or 1, 8)
    workers = max(int(workers), 1 if type(segmenter).own_process else 0)
    work_slides = [s for s, _ in todo]
    jobs = [(j, list(range(a, min(a + chunk_tiles, len(s.tiles)))))
            for j, s in enumerate(work_slides) for a in range(0, len(s.tiles), chunk_tiles)]
    writers: dict[int, SlideWriter] = {}
    remaining = {j: len(s.tiles) for j, s in enumerate(work_slides)}

    def consume(out: dict[str, Any]) -> int:
        j = out["slide"]
        s, path = todo[j]
        w = writers.get(j)
        if w is None:
            w = writers[j] = SlideWriter(path, slide_meta(segmenter, s.tiles), s.tiles.coords, s.tiles.tile_size,
                                         reporter=reporter)
        for i, inst, types, table in out["done"]:
            w.add(i, inst, types, table)
            result.nuclei += len(table["tile"])
        for i, reason in out["failed"]:
            w.fail(i, reason)
            result.failures.append((s.slide_id, i, reason))
        n = len(out["done"]) + len(out["failed"])
        result.segmented += len(out["done"])
        result.failed += len(out["failed"])
        remaining[j] -= n
        if remaining[j] == 0:
            writers.pop(j).close()
        return n

    def finish(n_fail_before: int) -> None:
        new = result.failures[n_fail_before:]
        for slide_id, i, reason in new[:5]:
            reporter.warn(f"slide {slide_id}, tile {i}: {reason}")
        if len(new) > 5:
            reporter.warn(f"... and {len(new) - 5} more failed tiles (listed in each slide's cache file)")

    n_fail = len(result.failures)
    where = "in this process" if workers == 0 else f"in {workers} spawned worker process{'es' * (workers > 1)}"
    reporter.info(f"segmenting {n_todo} tiles of {len(todo)} slides with {segmenter.name} ({identity}) {where}")
    try:
        with reporter.stage(f"segment {segmenter.name}", total=n_todo, unit="tiles") as st:
            if workers == 0:
                try:
                    segmenter.setup()
                except Exception as err:  # noqa: BLE001
                    raise HistobenchError(f"segmenter {segmenter.name!r}: setup failed: {_reason(err)}") from None
                worker = _Worker(segmenter, work_slides, decode)
                for j, idx in jobs:
                    st.advance(consume(worker.run(j, idx)))
                    st.set(failed=result.failed)
            else:
                _run_pool(segmenter, work_slides, decode, workers, jobs, consume, st, result)
    except BaseException:
        for w in writers.values():  # unfinished slides leave nothing behind; finished ones stay
            w.abort()
        raise
    finish(n_fail)
    result.seconds = time.perf_counter() - t0
    return result


def _run_pool(segmenter: Segmenter, slides: list, decode: str, workers: int, jobs: list, consume, st,
              result: SegmentResult) -> None:
    """Run ``jobs`` in ``workers`` spawned processes, consuming results as they complete."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    path = class_path(type(segmenter))
    options = segmenter.options.model_dump(mode="json")
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(path, options, slides, decode))
    try:
        # at most 2 chunks per worker in flight, so that results (label maps) never pile up in memory
        pending, queue = set(), deque(jobs)
        while queue or pending:
            while queue and len(pending) < 2 * workers:
                pending.add(pool.submit(_run_chunk, *queue.popleft()))
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                try:
                    out = fut.result()
                except BrokenProcessPool:
                    raise HistobenchError(f"segmenter {segmenter.name!r}: a worker process died (crash or out of "
                                          f"memory); finished slides are cached, run again to resume") from None
                except RuntimeError as err:
                    raise HistobenchError(f"segmenter {segmenter.name!r}: {err}") from None
                st.advance(consume(out))
                st.set(failed=result.failed)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


__all__ = ["SegmentResult", "segment_cohort", "check_maps", "class_path", "load_class"]
