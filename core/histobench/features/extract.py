"""Feature extraction: tiles -> encoder -> one HDF5 file per slide.

Tiles are decoded in DataLoader workers (each with its own slide handles), collated as uint8 into pinned
memory, moved to the device, resized and normalised there, and encoded in batches under bf16 autocast on
CUDA. On CUDA the loop runs one batch ahead: batch k+1 is copied on a side stream and its forward is queued
before the features of batch k are read back, so the device never waits for the host between batches.
Each slide's features ``[N, D]`` are written to ``<slide_id>.h5`` atomically as soon as its last tile is
encoded; only the current slide's features are held in memory. Slides whose file is already complete (same
encoder, weights hash, µm/px and tile size) are skipped; under ``torchrun`` slide ``i`` goes to rank
``i % world`` and each rank writes only its own slides.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from histobench import __version__
from histobench.components import InputTransform
from histobench.device import resolve_device
from histobench.features.cache import is_complete, write_features
from histobench.pretrain.data import SlideTileDataset, SlideTiles
from histobench.reporting import Reporter


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
) -> ExtractResult:
    """Encode every tile of ``slides`` into ``out_dir/<slide_id>.h5``.

    ``num_workers`` tile-decoding processes; ``None`` picks the CPU cores of this rank's share of the
    machine less one (at most 16): decoding, not the model, usually sets the pace.
    """
    import time

    import torch
    import torch.distributed as dist

    from histobench.pretrain.trainer import init_distributed

    reporter = reporter or Reporter()
    rank, world = init_distributed()  # under torchrun: join the group (and pick this rank's GPU) if not yet done
    dev = resolve_device(device)
    encoder = encoder.to(dev).eval()
    if num_workers is None:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        num_workers = max(1, min(16, (os.cpu_count() or 2) // max(local_world, 1) - 1))
    use_bf16 = dev.type == "cuda"
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    todo: list[SlideTiles] = []
    skipped = 0
    for i, s in enumerate(slides):
        path = out_dir / f"{s.slide_id}.h5"
        paths[s.slide_id] = path
        attrs = {"encoder": encoder_name, "weights_hash": weights, "mpp": s.tiles.mpp, "tile_size": s.tiles.tile_size}
        if is_complete(path, attrs):
            skipped += 1
        elif i % world == rank:
            todo.append(s)
    n_tiles = sum(len(s.tiles) for s in todo)
    t0, done_tiles = time.perf_counter(), 0

    def flush(slide: SlideTiles, chunks: list[np.ndarray]) -> None:
        dim = getattr(encoder, "embed_dim", 0)
        features = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
        write_features(paths[slide.slide_id], features, slide.tiles.coords, {
            "encoder": encoder_name, "weights_hash": weights, "mpp": slide.tiles.mpp,
            "tile_size": slide.tiles.tile_size, "histobench_version": __version__, "slide_id": slide.slide_id,
        })

    # One loader over every tile of every slide to do, in order: workers stay busy across slide boundaries,
    # and a slide's file is written as soon as its last tile is encoded.
    dataset = SlideTileDataset(todo, max_open=2)
    cuda = dev.type == "cuda"
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                                         pin_memory=cuda, prefetch_factor=4 if num_workers else None,
                                         persistent_workers=False)
    copy_stream = torch.cuda.Stream(dev) if cuda else None
    state = {"current": 0, "chunks": []}

    def consume(f, ready, slide_idx: np.ndarray) -> None:
        if ready is not None:
            ready.synchronize()
        f = f.numpy()
        for s_i in np.unique(slide_idx):
            while state["current"] < s_i:  # slides before s_i are complete (slides without tiles are written empty)
                flush(todo[state["current"]], state["chunks"])
                state["current"], state["chunks"] = state["current"] + 1, []
            state["chunks"].append(f[slide_idx == s_i])

    pending = None
    with reporter.stage(f"extract {encoder_name}", total=n_tiles, unit="tiles") as st, torch.inference_mode():
        for images, slide_idx, _ in loader:
            if cuda:
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
            done_tiles += len(images)
        if pending is not None:
            consume(*pending)
            st.advance(len(pending[2]))
        while state["current"] < len(todo):
            flush(todo[state["current"]], state["chunks"])
            state["current"], state["chunks"] = state["current"] + 1, []
    if world > 1:
        dist.barrier()
    rate = done_tiles / max(time.perf_counter() - t0, 1e-9)
    return ExtractResult(paths=paths, extracted=len(todo), skipped=skipped, tiles=done_tiles, tiles_per_second=rate)
