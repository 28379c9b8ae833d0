"""Extraction speed from pyramidal slide files: histobench vs encoder-only, the CPU decode ceiling, CLAM-style.

Slides: ``--slides`` synthetic SVS-like pyramidal TIFFs (tiled 256 px, JPEG q90, 2x pyramid levels) of
``--size`` x ``--size`` pixels at ``--slide-mpp`` µm/px, written once with
``histobench.slides.synthetic.write_tiff_pyramid`` into ``--slides-dir`` and reused. Their level 0 is a
2048 px synthetic H&E rendering repeated, so that JPEG decoding costs what it costs on real tissue. Every
whole ``--tile`` px tile of level 0 is extracted (tiling at the slide's own µm/px: one read per tile, no
resize), the usual 20x setting for ViT-S/16 at 224 px.

Measured, each in tiles per second, with the same encoder (timm ``--arch``, random weights):

* ``encoder_only``: ``model(x)`` on random normalised tensors already on the device, batch ``--batch-size``,
  bf16 autocast on CUDA (the model's ceiling);
* ``decode_ceiling``: a DataLoader with ``--workers`` workers over histobench's ``SlideTileDataset`` with the
  decoding extraction uses by default (``decode="jpeg"``: JPEG tiles read straight from the TIFF and decoded
  with torchvision's libjpeg-turbo, mosaicked and cropped to the tiles, :mod:`histobench.slides.jpegtiles`),
  no model: the CPU ceiling of this machine;
* ``decode_ceiling_openslide``: the same with openslide reads (``decode="openslide"``);
* ``histobench``: ``histobench.features.extract.extract_features`` with its default decoding, end to end
  (decode, transfer, inference, one HDF5 file per slide), wall time of the call;
* ``histobench_openslide``: the same with ``decode="openslide"``;
* on CUDA only, ``aligned``: the slides tiled again with tiles of the file's tile size (256 px, on the file's
  tile grid, so each tile is exactly one JPEG tile), with ``decode_ceiling``, ``histobench`` and
  ``histobench_nvjpeg`` (``decode="nvjpeg"``: workers only read the JPEG bytes; the main process decodes each
  batch on the GPU with nvJPEG) on that tiling; the encoder input is still ``--tile`` px (resized on the GPU);
* ``clam_style``: the CLAM recipe written here: per slide a DataLoader (``--workers`` workers, batch
  ``--clam-batch-size``, pinned memory) whose dataset reads each tile with ``openslide.read_region`` into a
  PIL image and applies torchvision ``ToTensor`` + ``Normalize`` on the CPU; fp32 inference; features
  appended to an HDF5 file after every batch.

Targets: histobench / min(encoder_only, decode_ceiling) >= 0.8 and histobench / clam_style >= 5. The same
ratios are reported for the openslide path (against its own decode ceiling), with the decode speed-up of the
direct path over openslide at the same worker count.

    python benchmarks/extract_speed.py --device cuda                         # -> results/extract_speed.json
    python benchmarks/extract_speed.py --quick --device cpu --out /tmp/extract_speed_cpu_quick.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import finish, resolve_device, synchronize, timed_steps  # noqa: E402


def _write_slide(path: Path, i: int, size: int, mpp: float) -> None:
    from histobench.slides.synthetic import render_synthetic, write_tiff_pyramid

    t0 = time.perf_counter()
    block = min(2048, size)
    rgb, _, _ = render_synthetic(class_index=i % 2, n_classes=2, seed=100 + i, size=(block, block), mpp=mpp)
    reps = -(-size // block)
    big = np.tile(rgb, (reps, reps, 1))[:size, :size]
    write_tiff_pyramid(path, np.ascontiguousarray(big), mpp=mpp, tile=256)
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def make_slides(a) -> list[Path]:
    """``--slides`` pyramidal TIFFs of ``--size`` px, made once (atomic writes, ``--write-workers`` processes
    at a time) and reused."""
    root = Path(a.slides_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"bench_{a.size}px_mpp{a.slide_mpp:g}_{i}.tiff" for i in range(a.slides)]
    jobs = [(path, i, a.size, a.slide_mpp) for i, path in enumerate(paths) if not path.exists()]
    workers = min(getattr(a, "write_workers", 1), len(jobs))
    if workers > 1:  # the pyramid's downsampling is single-threaded numpy: one process per slide
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            for f in [pool.submit(_write_slide, *job) for job in jobs]:
                f.result()
    else:
        for job in jobs:
            _write_slide(*job)
    return paths


def tile_all(paths: list[Path], a, tile: int | None = None):
    from histobench.pretrain.data import SlideTiles
    from histobench.slides.reader import open_slide
    from histobench.slides.tiling import tile_slide

    slides = []
    for p in paths:
        with open_slide(p) as s:
            tiles = tile_slide(s, mpp=a.slide_mpp, tile_size=tile or a.tile, min_tissue=0.0)
        slides.append(SlideTiles(p.stem, p, tiles))
    return slides


def build_encoder(a):
    import torch

    from histobench.registry import create

    if a.quick:
        enc = create("encoder", "timm", None, preset="demo")
    else:
        enc = create("encoder", "timm", {"arch": a.arch, "img_size": a.tile})
    torch.manual_seed(0)
    return enc, enc.build().eval()


def encoder_only(module, a, device) -> float:
    import torch

    module = module.to(device)
    x = torch.randn(a.batch_size, 3, a.tile, a.tile, device=device)

    def step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            module(x)

    return a.batch_size / timed_steps(step, device, a.warmup, a.steps)


def decode_ceiling(slides, a, device, decode: str = "openslide") -> float:
    import torch

    from histobench.pretrain.data import SlideTileDataset

    ds = SlideTileDataset(slides, max_open=2, decode=decode)
    loader = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, num_workers=a.workers, shuffle=False,
                                         pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if a.workers else None)
    t0, n = time.perf_counter(), 0
    for images, _, _ in loader:
        n += len(images)
    return n / (time.perf_counter() - t0)


def histobench_extract(module, enc, slides, a, device, out_dir: Path, decode: str = "openslide") -> dict:
    from histobench.features.extract import extract_features

    t0 = time.perf_counter()
    res = extract_features(module, enc.transform(), slides, out_dir, encoder_name="bench", weights="random",
                           batch_size=a.batch_size, num_workers=a.workers, device=str(device), decode=decode)
    synchronize(device)
    dt = time.perf_counter() - t0
    return {"tiles_per_second": res.tiles / dt, "tiles": res.tiles, "seconds": dt}


# ------------------------------------------------------------------------------------------------ CLAM-style


class _ClamBag:
    """CLAM's ``Whole_Slide_Bag_FP``: openslide ``read_region`` -> PIL RGB -> torchvision transforms."""

    def __init__(self, path: Path, coords: np.ndarray, level: int, size: int, target: int, mean, std):
        from torchvision import transforms

        self.path, self.coords, self.level, self.size = str(path), coords, level, size
        steps = [transforms.ToTensor(), transforms.Normalize(mean, std)]
        if target != size:
            steps.insert(0, transforms.Resize(target))
        self.transform = transforms.Compose(steps)
        self.wsi, self.pid = None, None

    def __len__(self):
        return len(self.coords)

    def __getitem__(self, i):
        import openslide

        if self.wsi is None or self.pid != os.getpid():
            self.wsi, self.pid = openslide.OpenSlide(self.path), os.getpid()
        x, y = (int(v) for v in self.coords[i])
        img = self.wsi.read_region((x, y), self.level, (self.size, self.size)).convert("RGB")
        return self.transform(img), self.coords[i]

    def __getstate__(self):
        return {**self.__dict__, "wsi": None}


def clam_style(module, enc, slides, a, device, out_dir: Path) -> dict:
    import h5py
    import torch

    t = enc.transform()
    module = module.to(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0, n = time.perf_counter(), 0
    for s in slides:
        bag = _ClamBag(s.path, s.tiles.coords, s.tiles.level, s.tiles.read_size, t.size, t.mean, t.std)
        loader = torch.utils.data.DataLoader(bag, batch_size=a.clam_batch_size, num_workers=a.workers,
                                             pin_memory=device.type == "cuda")
        path = out_dir / f"{s.slide_id}.h5"
        first = True
        for batch, coords in loader:
            with torch.inference_mode():
                feats = module(batch.to(device, non_blocking=True)).cpu().numpy()
            with h5py.File(path, "w" if first else "a") as f:  # CLAM's save_hdf5: append after every batch
                if first:
                    f.create_dataset("features", data=feats, maxshape=(None, feats.shape[1]), chunks=True)
                    f.create_dataset("coords", data=coords.numpy(), maxshape=(None, 2), chunks=True)
                else:
                    for key, val in (("features", feats), ("coords", coords.numpy())):
                        d = f[key]
                        d.resize(len(d) + len(val), axis=0)
                        d[-len(val):] = val
            first = False
            n += len(batch)
    synchronize(device)
    dt = time.perf_counter() - t0
    return {"tiles_per_second": n / dt, "tiles": n, "seconds": dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="Two small slides and the demo encoder: a CPU smoke run.")
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--size", type=int, default=20000, help="Level-0 side of each slide in pixels.")
    ap.add_argument("--slide-mpp", type=float, default=0.5)
    ap.add_argument("--tile", type=int, default=224)
    ap.add_argument("--arch", default="vit_small_patch16_224")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--clam-batch-size", type=int, default=256, help="CLAM's default batch size.")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--slides-dir", type=Path, default=Path(tempfile.gettempdir()) / "histobench-bench-slides")
    ap.add_argument("--write-workers", type=int, default=1, help="Processes writing missing slides at a time.")
    ap.add_argument("--skip-clam", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("results/extract_speed.json"))
    a = ap.parse_args()
    if a.quick:
        a.slides, a.size, a.tile, a.batch_size, a.clam_batch_size = 2, 1024, 64, 32, 32
        a.workers, a.warmup, a.steps = min(a.workers, 2), 1, 3
    device = resolve_device(a.device)

    t0 = time.perf_counter()
    paths = make_slides(a)
    slides = tile_all(paths, a)
    setup_s = time.perf_counter() - t0
    enc, module = build_encoder(a)
    enc_ips = encoder_only(module, a, device)
    decode = decode_ceiling(slides, a, device, decode="jpeg")
    decode_os = decode_ceiling(slides, a, device)
    work = Path(tempfile.mkdtemp(prefix="histobench-extract-bench-"))
    aligned = None
    try:
        hb = histobench_extract(module, enc, slides, a, device, work / "histobench", decode="auto")
        hb_os = histobench_extract(module, enc, slides, a, device, work / "histobench_openslide")
        clam = None if a.skip_clam else clam_style(module, enc, slides, a, device, work / "clam")
        if device.type == "cuda":
            whole = tile_all(paths, a, tile=256)  # the file tile size of make_slides
            aligned = {
                "tile": 256,
                "decode_ceiling_tiles_per_second": decode_ceiling(whole, a, device, decode="jpeg"),
                "histobench": histobench_extract(module, enc, whole, a, device, work / "a_jpeg", decode="auto"),
                "histobench_nvjpeg": histobench_extract(module, enc, whole, a, device, work / "a_nv", decode="nvjpeg"),
            }
            aligned["nvjpeg_vs_default"] = (aligned["histobench_nvjpeg"]["tiles_per_second"]
                                            / aligned["histobench"]["tiles_per_second"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ceiling = min(enc_ips, decode)
    ceiling_os = min(enc_ips, decode_os)
    rate, rate_os = hb["tiles_per_second"], hb_os["tiles_per_second"]
    result = {
        "benchmark": "extract_speed",
        "setting": {"slides": a.slides, "slide_size_px": a.size, "slide_mpp": a.slide_mpp, "tile": a.tile,
                    "tiles": hb["tiles"], "arch": "timm demo ViT (quick)" if a.quick else a.arch,
                    "batch_size": a.batch_size, "clam_batch_size": a.clam_batch_size, "workers": a.workers,
                    "precision": "bf16 autocast" if device.type == "cuda" else "fp32 (cpu)",
                    "clam_precision": "fp32", "quick": a.quick, "slide_setup_seconds": round(setup_s, 1)},
        "encoder_only_tiles_per_second": enc_ips,
        "decode_ceiling_tiles_per_second": decode,
        "histobench": hb,
        "clam_style": clam,
        "ratio_vs_ceiling": rate / ceiling,
        "ceiling_is": "encoder" if enc_ips <= decode else "cpu_decode",
        "ratio_vs_encoder_only": rate / enc_ips,
        "ratio_vs_clam": rate / clam["tiles_per_second"] if clam else None,
        "decode_ceiling_openslide_tiles_per_second": decode_os,
        "direct_decode_speedup": decode / decode_os,
        "histobench_openslide": hb_os,
        "openslide_ratio_vs_ceiling": rate_os / ceiling_os,
        "openslide_ceiling_is": "encoder" if enc_ips <= decode_os else "cpu_decode",
        "openslide_ratio_vs_clam": rate_os / clam["tiles_per_second"] if clam else None,
        "default_vs_openslide": rate / rate_os,
        "aligned": aligned,
        "targets": {"ratio_vs_ceiling": 0.8, "ratio_vs_clam": 5.0},
    }
    finish(result, device, a.out)


if __name__ == "__main__":
    main()
