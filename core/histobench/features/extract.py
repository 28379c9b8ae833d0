"""Feature extraction: tiles -> encoder -> one HDF5 file per slide.

Tiles are decoded in DataLoader workers (each with its own slide handles), collated as uint8 into pinned
memory, moved to the device, resized and normalised there, and encoded in batches under bf16 autocast on
CUDA. On CUDA the loop runs one batch ahead: batch k+1 is copied on a side stream and its forward is queued
before the features of batch k are read back, so the device never waits for the host between batches.
Each slide's features ``[N, D]`` go to a temporary file batch by batch, renamed to ``<slide_id>.h5`` when
its last tile is encoded: memory does not grow with slide size, and a crash leaves no partial file. Slides whose file is already complete (same
encoder, weights hash, µm/px and tile size) are skipped; under ``torchrun`` slide ``i`` goes to rank
``i % world`` and each rank writes only its own slides. Each file is written under its lock
(:mod:`histobench.locks`): slides that another process is writing are left to it and waited for at the end,
and one it did not finish (it died) is done here.

Decoding (``decode=``): openslide, or the direct JPEG-tile path of :mod:`histobench.slides.jpegtiles` (tiled JPEG
TIFF slides: Aperio SVS, generic pyramidal TIFF) decoded with libjpeg-turbo in the workers, or, on CUDA, for
slides whose tiles are exactly one file tile each, decoded in batches on the GPU with nvJPEG in the main
process. Slides and reads the direct path cannot serve use openslide; the reasons are reported once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from histobench import __version__
from histobench.components import InputTransform
from histobench.device import channels_last, resolve_device
from histobench.errors import HistobenchError
from histobench.faults import fault_point
from histobench.features.cache import FeatureWriter, is_complete
from histobench.locks import OutputLock
from histobench.pretrain.data import SlideTileDataset, SlideTiles, collate_tiles
from histobench.reporting import Reporter

DECODE_CHOICES = ("auto", "openslide", "jpeg", "nvjpeg")

# nvJPEG and libjpeg-turbo may round the IDCT and chroma upsampling differently by a few levels; a stream decoded
# in the wrong colour space differs by tens of levels on average. Above this mean absolute difference (uint8
# levels) on a slide's first tile, that slide's tiles are decoded on the CPU (in the workers) instead.
_NVJPEG_MAX_MEAN_DIFF = 3.0


@dataclass
class ExtractResult:
    paths: dict[str, Path]
    extracted: int
    skipped: int
    tiles: int
    tiles_per_second: float


def prepare_pixels(images, transform: InputTransform):
    """uint8 ``[B, 3, H, W]`` on any device -> normalised float ``[B, 3, S, S]`` on the same device."""
    import torch
    import torch.nn.functional as F

    x = images.float().div_(255.0)
    if x.shape[-1] != transform.size or x.shape[-2] != transform.size:
        x = F.interpolate(x, size=(transform.size, transform.size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(transform.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(transform.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def extract_features(
    encoder: Any,
    transform: InputTransform,
    slides: Sequence[SlideTiles],
    out_dir: Path,
    *,
    encoder_name: str,
    weights: str,
    batch_size: int = 256,
    num_workers: int | None = None,
    device: str | None = None,
    reporter: Reporter | None = None,
    decode: str = "auto",
) -> ExtractResult:
    """Encode every tile of ``slides`` into ``out_dir/<slide_id>.h5``.

    ``num_workers`` tile-decoding processes; ``None`` picks the CPU cores of this rank's share of the
    machine less one (at most 16): decoding, not the model, usually sets the pace.

    ``decode``: ``"openslide"`` reads every tile with openslide; ``"jpeg"`` reads the JPEG tiles of eligible
    slides directly and decodes them in the workers (the same libjpeg-turbo decoding as openslide's, so the same
    pixels); ``"nvjpeg"`` (CUDA only) also sends the JPEG stream of each tile that is exactly one file tile
    (``read_size == tile_size ==`` the file's tile size, on its grid) to the main process, which decodes a
    batch of them at once on the GPU; ``"auto"`` (the default) is ``"jpeg"``: the nvJPEG path has not yet been
    measured on a GPU, so it is only taken when asked for. Every mode falls back to openslide per slide (NDPI, DICOM,
    non-JPEG or stripped levels, ...) and per tile (fractional level positions, missing tiles).
    """
    import time

    import torch
    import torch.distributed as dist

    from histobench.pretrain.trainer import init_distributed

    reporter = reporter or Reporter()
    if decode not in DECODE_CHOICES:
        raise HistobenchError(f"decode must be one of {', '.join(DECODE_CHOICES)}, got {decode!r}")
    rank, world = init_distributed()  # under torchrun: join the group (and pick this rank's GPU) if not yet done
    dev = resolve_device(device)
    encoder = channels_last(encoder.to(dev).eval(), dev)
    if num_workers is None:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        num_workers = max(1, min(16, (os.cpu_count() or 2) // max(local_world, 1) - 1))
    use_bf16 = dev.type == "cuda"
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    expected: dict[str, dict[str, Any]] = {}
    todo: list[SlideTiles] = []
    skipped = 0
    for i, s in enumerate(slides):
        path = out_dir / f"{s.slide_id}.h5"
        paths[s.slide_id] = path
        attrs = {"encoder": encoder_name, "weights_hash": weights, "mpp": s.tiles.mpp, "tile_size": s.tiles.tile_size,
                 "slide_fingerprint": s.tiles.source}
        expected[s.slide_id] = attrs
        if is_complete(path, attrs):
            skipped += 1
        elif i % world == rank:
            todo.append(s)
    t0 = time.perf_counter()

    def writer(slide: SlideTiles) -> FeatureWriter:
        return FeatureWriter(paths[slide.slide_id], slide.tiles.coords, {
            "encoder": encoder_name, "weights_hash": weights, "mpp": slide.tiles.mpp,
            "tile_size": slide.tiles.tile_size, "histobench_version": __version__, "slide_id": slide.slide_id,
            "slide_fingerprint": slide.tiles.source,
        }, dim=getattr(encoder, "embed_dim", None))

    cuda = dev.type == "cuda"
    if decode == "nvjpeg" and not cuda:
        raise HistobenchError(f"decode='nvjpeg' decodes on the GPU and needs a CUDA device, not {dev}")

    def encode(todo: list[SlideTiles], locks: dict[str, OutputLock]) -> int:
        """Encode ``todo`` (their locks held), each file renamed into place and unlocked when complete."""
        n_tiles = sum(len(s.tiles) for s in todo)
        # One loader over every tile of every slide to do, in order: workers stay busy across slide boundaries,
        # and a slide's file is written as soon as its last tile is encoded.
        reasons: dict[int, str] = {}
        mode, stream_slides = _dataset_mode(decode, cuda, todo, reporter, dev, reasons)
        dataset = SlideTileDataset(todo, max_open=2, decode=mode, stream_slides=stream_slides, jpeg_reasons=reasons)
        nvjpeg = mode == "jpeg-bytes"
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                                             pin_memory=cuda, prefetch_factor=4 if num_workers else None,
                                             persistent_workers=False, collate_fn=collate_tiles if nvjpeg else None)
        copy_stream = torch.cuda.Stream(dev) if cuda else None
        gpu_decode = _GpuDecoder(dev, reporter) if nvjpeg else None
        # The slide being written: its rows go to its file batch by batch (memory does not grow with slide size),
        # and the file is renamed into place when the first tile of a later slide arrives (or at the end).
        state: dict[str, Any] = {"current": 0, "writer": writer(todo[0]) if todo else None}

        def next_slide() -> None:
            state["writer"].close()
            locks.pop(todo[state["current"]].slide_id).release()
            state["current"] += 1
            state["writer"] = writer(todo[state["current"]]) if state["current"] < len(todo) else None

        def consume(f, ready, slide_idx: np.ndarray) -> None:
            if ready is not None:
                ready.synchronize()
            f = f.numpy()
            for s_i in np.unique(slide_idx):
                while state["current"] < s_i:  # slides before s_i are complete (slides without tiles are written empty)
                    next_slide()
                state["writer"].append(f[slide_idx == s_i])
                fault_point("extract.batch")  # rows of an unfinished feature file are written

        try:
            done = _extract_batches(loader, encoder, transform, dev, use_bf16, copy_stream, gpu_decode, consume,
                                    reporter.stage(f"extract {encoder_name}", total=n_tiles, unit="tiles"))
            while state["current"] < len(todo):
                next_slide()
        except BaseException:
            if state["writer"] is not None:
                state["writer"].abort()  # the slide being written leaves no temporary file; finished ones stay
            raise
        return done

    # Each slide's file is made under its lock (histobench.locks): slides another process is writing are left
    # to it and waited for at the end; one it did not finish (it died) is done here, in a next round.
    locks: dict[str, OutputLock] = {}
    done_tiles, extracted, pending = 0, 0, list(todo)
    try:
        while pending:
            mine, busy = [], []
            for s in pending:
                lock = OutputLock(paths[s.slide_id], reporter)
                if not lock.try_acquire():
                    busy.append(s)
                elif is_complete(paths[s.slide_id], expected[s.slide_id]):  # finished meanwhile by another process
                    lock.release()
                    locks.pop(s.slide_id, None)
                    skipped += 1
                else:
                    locks[s.slide_id] = lock
                    mine.append(s)
            if mine:
                done_tiles += encode(mine, locks)
                extracted += len(mine)
            pending = []
            for s in busy:  # wait for each; one left unfinished (its writer died) goes to the next round
                with OutputLock(paths[s.slide_id], reporter):  # held only while looking: no lock-order cycles
                    done = is_complete(paths[s.slide_id], expected[s.slide_id])
                if done:
                    skipped += 1
                else:
                    pending.append(s)
    finally:
        for lock in locks.values():
            lock.release()
    if world > 1:
        dist.barrier()
    rate = done_tiles / max(time.perf_counter() - t0, 1e-9)
    return ExtractResult(paths=paths, extracted=extracted, skipped=skipped, tiles=done_tiles, tiles_per_second=rate)


def _extract_batches(loader, encoder, transform, dev, use_bf16, copy_stream, gpu_decode, consume, stage) -> int:
    """Encode every batch of ``loader``, one batch ahead on CUDA, handing features to ``consume``; returns the
    number of tiles encoded."""
    import torch

    cuda = dev.type == "cuda"
    pending, done = None, 0
    with stage as st, torch.inference_mode():
        for images, slide_idx, _ in loader:
            if gpu_decode is not None:  # a list of JPEG streams and pixel tiles, decoded on this (current) stream
                x = gpu_decode(images)
            elif cuda:
                with torch.cuda.stream(copy_stream):
                    x = images.to(dev, non_blocking=True)
                torch.cuda.current_stream(dev).wait_stream(copy_stream)
                x.record_stream(torch.cuda.current_stream(dev))
            else:
                x = images
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                f = encoder(prepare_pixels(x, transform))
            f = f.float()
            if cuda:
                f = f.to("cpu", non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
            else:
                ready = None
            if pending is not None:
                consume(*pending)
                st.advance(len(pending[2]))
            pending = (f, ready, slide_idx.numpy())
            done += len(slide_idx)
        if pending is not None:
            consume(*pending)
            st.advance(len(pending[2]))
    return done


def _dataset_mode(decode: str, cuda: bool, slides: Sequence[SlideTiles], reporter: Reporter, dev=None,
                  reasons: dict[int, str] | None = None) -> tuple[str, set[int]]:
    """The :class:`SlideTileDataset` decode mode for ``extract_features(decode=...)`` and the slides whose tiles
    go to nvJPEG as JPEG streams; reports, once, which slides openslide reads and why, and puts those reasons
    into ``reasons`` (slide index -> reason) so that the extraction dataset does not probe them again."""
    if decode == "openslide" or not slides:
        return "openslide", set()
    probe = SlideTileDataset(slides, max_open=1, decode="jpeg")
    checks = probe.check_jpeg()
    if reasons is not None:
        reasons.update(probe.jpeg_reasons)
    by_reason: dict[str, list[str]] = {}
    for s, (reason, _) in zip(slides, checks):
        if reason is not None:
            by_reason.setdefault(reason, []).append(s.slide_id)
    direct = sum(reason is None for reason, _ in checks)
    reporter.info(f"direct JPEG-tile decoding for {direct} of {len(slides)} slides")
    for reason, ids in by_reason.items():
        more = f" and {len(ids) - 3} more" if len(ids) > 3 else ""
        reporter.info(f"openslide decodes {', '.join(ids[:3])}{more}: {reason}")
    whole = [i for i, (_, w) in enumerate(checks) if w]
    if cuda and decode == "nvjpeg" and whole:
        streams = _nvjpeg_agreeing(slides, whole, dev, reporter)
        if streams:
            reporter.info(f"nvJPEG decodes the tiles of {len(streams)} slides on the GPU (whole file tiles)")
            return "jpeg-bytes", streams
    elif decode == "nvjpeg":
        reporter.info("nvJPEG needs tiles that are whole file tiles (read size = tile size = file tile size, on "
                      "the file's tile grid); no slide has them, so tiles are decoded on the CPU")
    return "jpeg", set()


def _nvjpeg_agreeing(slides: Sequence[SlideTiles], candidates: list[int], dev, reporter: Reporter) -> set[int]:
    """The candidate slides whose first tile decodes on the GPU (nvJPEG) like on the CPU (libjpeg-turbo, as
    openslide): mean absolute difference at most ``_NVJPEG_MAX_MEAN_DIFF``. The others are decoded on the CPU,
    with a warning; if nvJPEG cannot decode at all (torchvision without it), none is sent to the GPU."""
    import torch

    from histobench.slides.jpegtiles import decode_batch_cuda, decode_cpu, open_jpeg_tiles
    from histobench.slides.reader import open_slide

    ok: set[int] = set()
    for i in candidates:
        s = slides[i]
        with open_slide(s.path, mpp=s.mpp) as slide:
            reader = open_jpeg_tiles(slide)
            stream = reader.tile_jpeg(s.tiles, 0)
            reader.close()
        if stream is None:
            continue
        try:
            gpu = decode_batch_cuda([torch.frombuffer(bytearray(stream), dtype=torch.uint8)], dev)[0].cpu()
        except RuntimeError as exc:
            reporter.warn(f"nvJPEG cannot decode ({exc}); JPEG tiles are decoded on the CPU")
            return set()
        cpu = torch.from_numpy(np.ascontiguousarray(decode_cpu(stream).transpose(2, 0, 1)))
        diff = (gpu.int() - cpu.int()).abs().float().mean().item() if gpu.shape == cpu.shape else float("inf")
        if diff <= _NVJPEG_MAX_MEAN_DIFF:
            ok.add(i)
        else:
            reporter.warn(f"nvJPEG and libjpeg-turbo disagree on slide {s.slide_id} (mean |difference| {diff:.1f} "
                          "levels); its tiles are decoded on the CPU")
    return ok


class _GpuDecoder:
    """Batches from :func:`collate_tiles` -> uint8 ``[B, 3, S, S]`` on the GPU, JPEG streams decoded by nvJPEG
    (pixel tiles copied). Should nvJPEG fail mid-run, the streams are decoded on the CPU here, with a warning."""

    def __init__(self, dev, reporter: Reporter):
        self.dev, self.reporter, self.gpu_ok = dev, reporter, True

    def __call__(self, tiles: list):
        import torch

        from histobench.slides.jpegtiles import decode_batch_cuda, decode_cpu

        if self.gpu_ok:
            try:
                return decode_batch_cuda(tiles, self.dev)
            except RuntimeError as exc:
                self.gpu_ok = False
                self.reporter.warn(f"nvJPEG decoding failed ({exc}); decoding JPEG tiles on the CPU instead")
        tiles = [torch.from_numpy(np.ascontiguousarray(decode_cpu(t.numpy().tobytes()).transpose(2, 0, 1)))
                 if t.dim() == 1 else t for t in tiles]
        return decode_batch_cuda(tiles, self.dev)
