"""Pretraining speed: DINO through histobench's trainer vs the bare model step.

Both sides train the same modules: the DINO pretext's student (timm ViT-S/16 with stochastic depth 0.1 and
the paper's 65536-prototype head), its EMA teacher and its loss, with bf16 autocast on CUDA, fused AdamW,
gradient clipping 3.0 and the EMA update, at the same batch size and crops (2 x 224 + 8 x 96).

* histobench: ``histobench.pretrain.trainer.pretrain`` on uint8 tiles held in memory
  (``SyntheticTileDataset``), so it includes the DataLoader, the host-to-device copy, the multi-crop views
  and augmentation made on the device, the schedules, the per-step host sync and logging.
* bare: a minimal loop over the same pretext's modules with views that are random float tensors already
  on the device (made once), no data loading, no augmentation, no host sync.

Throughput is images per second over ``--steps`` steps after ``--warmup`` steps (the trainer's steps are
timed from its progress callbacks). The target ratio histobench / bare is >= 0.9 on a GPU.

    python benchmarks/pretrain_speed.py --device cuda                 # ViT-S/16, batch 256 -> results/pretrain_speed.json
    python benchmarks/pretrain_speed.py --quick --device cpu --out /tmp/pretrain_speed_cpu_quick.json
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_run_options, bare_setup, finish, peak_memory, release_cuda, resolve_device, speed_parser, step_clock, timed_steps)


def _components(a):
    from histobench.registry import create

    if a.quick:
        dino = {"out_dim": 1024, "hidden_dim": 128, "bottleneck_dim": 32, "n_local_crops": 2,
                "global_crop_size": 32, "local_crop_size": 16}
        enc = {"arch": "vit_small_patch16_224", "img_size": 32,
               "model_kwargs": {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}}
    else:
        dino = {"n_local_crops": a.local_crops, "global_crop_size": 224, "local_crop_size": 96}
        enc = {"arch": a.arch, "img_size": 224}
    dino["freeze_last_layer_epochs"] = 0  # both sides update every parameter at every step
    return create("pretext", "dino", dino), create("encoder", "timm", enc)


def bare_throughput(a, device) -> dict:
    """Images/s of the bare DINO step on random views already on the device."""
    import torch

    pre, enc = _components(a)
    params, opt = bare_setup(pre, enc, a, device)
    o = pre.options
    sizes = [o.global_crop_size] * 2 + [o.local_crop_size] * o.n_local_crops
    g = torch.Generator(device=device).manual_seed(0)
    views = [torch.randn(a.batch_size, 3, s, s, device=device, generator=g) for s in sizes]
    bf16 = device.type == "cuda"
    teacher_params = list(pre.teacher.parameters())
    student_params = list(pre.student.parameters())

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                t_out = pre.teacher.forward_views(views[:2])
            s_out = pre.student.forward_views(views)
            loss, _ = pre.loss(s_out, t_out, o.teacher_temp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(teacher_params, [p.detach() for p in student_params], 1.0 - 0.996)

    per_step = timed_steps(step, device, a.warmup, a.steps)
    return {"images_per_second": a.batch_size / per_step, "seconds_per_step": per_step, **peak_memory(device)}


def histobench_throughput(a, device) -> dict:
    """Images/s of the same DINO step through ``pretrain`` on uint8 tiles in memory."""
    import torch

    from histobench.pretrain.data import SyntheticTileDataset
    from histobench.pretrain.trainer import pretrain

    pre, enc = _components(a)
    total = a.warmup + a.steps
    tile = 32 if a.quick else a.tile
    data = SyntheticTileDataset(a.batch_size * total, tile, seed=0)
    opts = type(pre).train_options(None, epochs=1, batch_size=a.batch_size, num_workers=a.workers,
                                   steps_per_epoch=total, warmup_epochs=0, checkpoint_every=0,
                                   compile=a.compile, precision="bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = step_clock()
    with tempfile.TemporaryDirectory() as tmp:
        pretrain(pre, enc, data, opts, out_dir=Path(tmp), seed=0, device=str(device), reporter=clock, resume=False)
    n_steps, dt = clock.timing(a.warmup)
    return {"images_per_second": a.batch_size * n_steps / dt, "seconds_per_step": dt / n_steps, "timed_steps": n_steps,
            **peak_memory(device)}


def main() -> None:
    ap = speed_parser(__doc__, "Tiny model and crops: a CPU smoke run of the script.")
    ap.add_argument("--arch", default="vit_small_patch16_224")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--local-crops", type=int, default=8)
    ap.add_argument("--tile", type=int, default=224, help="Side of the in-memory uint8 tiles (histobench side).")
    add_run_options(ap, "pretrain_speed", warmup=10, steps=30, compile_help="torch.compile the encoder on both sides.")
    a = ap.parse_args()
    if a.quick:
        a.batch_size, a.warmup, a.steps, a.workers = min(a.batch_size, 8), min(a.warmup, 2), min(a.steps, 4), 0
    device = resolve_device(a.device)

    bare = bare_throughput(a, device)
    release_cuda(device)
    hb = histobench_throughput(a, device)
    setting = {"arch": "demo-vit (quick)" if a.quick else a.arch, "batch_size": a.batch_size,
               "crops": "2x32 + 2x16 (quick)" if a.quick else f"2x224 + {a.local_crops}x96",
               "precision": "bf16 autocast" if device.type == "cuda" else "fp32 (cpu)", "compile": a.compile,
               "warmup_steps": a.warmup, "timed_steps": a.steps, "trainer_workers": a.workers, "tile": 32 if a.quick else a.tile,
               "quick": a.quick}
    finish({"benchmark": "pretrain_speed", "setting": setting, "bare": bare, "histobench": hb,
            "ratio": hb["images_per_second"] / bare["images_per_second"], "target_ratio": 0.9}, device, a.out)


if __name__ == "__main__":
    main()
