"""Feature extraction: tiles -> encoder -> one HDF5 file per slide.

Tiles are decoded in DataLoader workers, moved to the device as uint8, resized and normalised there, and
encoded in batches under bf16 autocast on CUDA. Slides whose file is already complete (same encoder,
weights hash, µm/px and tile size) are skipped; under ``torchrun`` slides are sharded across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from histobench import __version__
from histobench.components import InputTransform
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
    num_workers: int = 2,
    device: str | None = None,
    reporter: Reporter | None = None,
) -> ExtractResult:
    """Encode every tile of ``slides`` into ``out_dir/<slide_id>.h5``."""
    import time

    import torch
    import torch.distributed as dist

    reporter = reporter or Reporter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = encoder.to(dev).eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
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
    dataset = SlideTileDataset(todo)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                                         pin_memory=dev.type == "cuda",
                                         prefetch_factor=4 if num_workers else None)
    current, chunks = 0, []
    with reporter.stage(f"extract {encoder_name}", total=n_tiles, unit="tiles") as st, torch.inference_mode():
        for images, slide_idx, _ in loader:
            x = prepare_pixels(images.to(dev, non_blocking=True), transform)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                f = encoder(x).float().cpu().numpy()
            slide_idx = slide_idx.numpy()
            for s_i in np.unique(slide_idx):
                while current < s_i:  # slides before s_i are complete (slides without tiles are written empty)
                    flush(todo[current], chunks)
                    current, chunks = current + 1, []
                chunks.append(f[slide_idx == s_i])
            st.advance(len(images))
            done_tiles += len(images)
        while current < len(todo):
            flush(todo[current], chunks)
            current, chunks = current + 1, []
    if world > 1:
        dist.barrier()
    rate = done_tiles / max(time.perf_counter() - t0, 1e-9)
    return ExtractResult(paths=paths, extracted=len(todo), skipped=skipped, tiles=done_tiles, tiles_per_second=rate)
