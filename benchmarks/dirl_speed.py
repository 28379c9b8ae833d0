"""DiRL-R step speed against the DINO step at the same size, and nuclei segmentation speed.

* step: the bare ``training_step`` of the ``dirl`` pretext (DINO image loss + the dense group-pooled loss with
  its own 65536-prototype head and centre, joint image + group-map augmentation) and of the ``dino`` pretext
  with the same encoder, head, crops (2 global, no local: the lab recipe DiRL builds on) and batch, each with
  backward, clipping, AdamW and the EMA update(s), on one batch already on the device. ``overhead`` is DiRL's
  seconds per step over DINO's: the price of the dense term. Masks are the contract checks' random nuclei
  (types 1-3, ``grouping=types``), so the step has K = 4 groups.
* segmentation: tiles per second of :func:`histobench.segment.segment_cohort` (in this process) with the
  ``oracle`` and ``hed-watershed`` segmenters on a few synthetic slides, each into a fresh cache.

Paper size (spec §2.7): ViT-S/16 at 224 px, batch ``--batch-size`` (default 128 per device), tiles of 224 px at
0.5 µm/px for segmentation.

    python benchmarks/dirl_speed.py --device cuda                 # -> results/dirl_speed.json
    python benchmarks/dirl_speed.py --quick --device cpu --out /tmp/dirl_speed_cpu_quick.json
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_run_options, bare_setup, finish, peak_memory, resolve_device, speed_parser, timed_steps)

QUICK_HEAD = {"out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 32}


def _components(a, name):
    from histobench.registry import create

    common = {"n_local_crops": 0, "freeze_last_layer_epochs": 0}
    if a.quick:
        pre = create("pretext", name, {**common, **QUICK_HEAD, "global_crop_size": 64,
                                       **({"dense_out_dim": 256, "grouping": "types", "a_min": 0.5} if name == "dirl" else {})})
        enc = create("encoder", "timm", None, preset="demo")
    else:
        pre = create("pretext", name, {**common, **({"grouping": "types"} if name == "dirl" else {})})
        enc = create("encoder", "timm", {"arch": "vit_small_patch16_224", "img_size": 224})
    return pre, enc


def _batch(a, size, device):
    import torch

    from histobench.pretrain.data import SyntheticTileDataset
    from histobench.testing import SyntheticMaskedTiles

    data = SyntheticMaskedTiles(SyntheticTileDataset(a.batch_size, size, seed=0), seed=0)
    items = [data[i] for i in range(a.batch_size)]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]).to(device) for k in items[0]}


def step_speed(a, device, name) -> dict:
    """Images/s of the bare step of pretext ``name`` on one batch on the device."""
    import torch

    pre, enc = _components(a, name)
    params, opt = bare_setup(pre, enc, a, device)
    batch = _batch(a, enc.transform().size, device)
    bf16 = device.type == "cuda"
    state = {"step": 0, "out": {}}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = pre.training_step(batch, state["step"])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        pre.after_optimizer_step(state["step"])
        state["step"] += 1
        state["out"] = out

    per_step = timed_steps(step, device, a.warmup, a.steps)
    res = {"images_per_second": a.batch_size / per_step, "seconds_per_step": per_step, **peak_memory(device)}
    if name == "dirl":
        res["valid_groups_per_pair"] = float(state["out"]["valid_groups"])
    return res


def segmentation_speed(a) -> dict:
    """Tiles/s of the oracle and hed-watershed segmenters on a few synthetic slides."""
    from histobench.pipeline.stages import tile_cohort
    from histobench.registry import create
    from histobench.reporting import Reporter
    from histobench.segment import segment_cohort

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        geometry = {"mpp": 1.0, "tile_size": 64} if a.quick else {"mpp": 0.5, "tile_size": 224}
        task = create("task", "tcga-nsclc", {"demo_patients": 4, "demo_slide_px": a.slide_px, **geometry}, preset="demo")
        manifest = task.demo_cohort(tmp / "demo", seed=0).head(a.seg_slides)
        slides = tile_cohort(manifest, task, tmp / "work", Reporter())
        for name in ("oracle", "hed-watershed"):
            try:
                res = segment_cohort(create("segmenter", name), slides, tmp / f"seg-{name}", Reporter(), workers=0)
            except Exception as err:  # noqa: BLE001 - e.g. scikit-image missing on a bare GPU machine: say so, go on
                out[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
                continue
            out[name] = {"tiles": res.segmented, "tiles_per_second": res.tiles_per_second,
                         "nuclei_per_tile": res.nuclei_per_tile, "failed": res.failed}
        out["tile_px"], out["tile_mpp"] = geometry["tile_size"], geometry["mpp"]
    return out


def main() -> None:
    ap = speed_parser(__doc__, "The demo ViT, small heads and slides: a CPU smoke run.")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seg-slides", type=int, default=2, help="Synthetic slides to segment.")
    ap.add_argument("--slide-px", type=int, default=2048, help="Level-0 side of each synthetic slide (0.25 µm/px).")
    add_run_options(ap, "dirl_speed", warmup=2, steps=8, workers=None, compile_help="torch.compile the encoder.")
    a = ap.parse_args()
    if a.quick:
        a.batch_size, a.warmup, a.steps = min(a.batch_size, 16), min(a.warmup, 1), min(a.steps, 3)
        a.seg_slides, a.slide_px = min(a.seg_slides, 2), min(a.slide_px, 1024)
    device = resolve_device(a.device)
    dino = step_speed(a, device, "dino")
    dirl = step_speed(a, device, "dirl")
    seg = segmentation_speed(a)
    _, enc = _components(a, "dirl")
    setting = {"encoder": f"{enc.options.arch} {enc.options.img_size} px", "batch_size": a.batch_size,
               "crops": "2 global, 0 local", "groups": 4, "precision": "bf16 autocast" if device.type == "cuda" else "fp32 (cpu)",
               "compile": a.compile, "warmup_steps": a.warmup, "timed_steps": a.steps, "quick": a.quick}
    finish({"benchmark": "dirl_speed", "setting": setting, "dino": dino, "dirl": dirl,
            "overhead": dirl["seconds_per_step"] / dino["seconds_per_step"], "segmentation": seg}, device, a.out)


if __name__ == "__main__":
    main()
