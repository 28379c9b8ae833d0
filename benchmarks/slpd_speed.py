"""SLPD pretraining speed at the paper's size: histobench's trainer vs the bare SLPD step, plus clustering.

The paper-size setting (spec section 3; the plugin's defaults): HIPT's ViT-4K (192-d, 6 blocks, 6 heads) over
``[384, 16, 16]`` grids of patch embeddings, the 65536-prototype head, 2 global 14x14 and 8 local 6x6 grid
crops, K = 4 prototypes per slide from ``n_min`` = 32 regions, one nearest slide, batch 512 (``--batch-size``).
The cohort is :func:`histobench_slpd.data.synthetic_grid_cohort`: ``--slides`` slides of
``--regions-per-slide`` regions with planted tissue types and slide classes (patch-feature level: the frozen
patch encoder's cost is the extraction benchmark's).

* bare: the SLPD pretext's own ``training_step`` (DINO + intra- and inter-slide prototype distillation, after
  one clustering pass), backward, clipping, fused AdamW and the EMA update, on one batch of grids already on
  the device; no data loading, no schedules, no host sync.
* histobench: :func:`histobench.pretrain.trainer.pretrain` on the in-memory grid dataset for two epochs with
  ``warm_epoch`` 0, so the second epoch starts with the per-epoch re-clustering (teacher embedding of every
  region, per-slide k-means, slide matching); its steps are timed from the trainer's progress callbacks.
* clustering: seconds of that re-clustering pass (the trainer's ``cluster_seconds`` diagnostic), which
  histobench runs once per epoch; its share of an epoch is reported.

Target (as for DINO): histobench / bare >= 0.9 in regions per second on a GPU.

    python benchmarks/slpd_speed.py --device cuda                 # paper size -> results/slpd_speed.json
    python benchmarks/slpd_speed.py --quick --device cpu --out /tmp/slpd_speed_cpu_quick.json
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_run_options, bare_setup, finish, peak_memory, release_cuda, resolve_device, speed_parser, step_clock, timed_steps)

# A few-second CPU smoke run of the script: small grids, model and head.
QUICK = {"encoder": {"in_dim": 32, "dim": 32, "depth": 1, "num_heads": 2, "grid_size": 8, "pos_grid": 6},
         "pretext": {"out_dim": 256, "hidden_dim": 64, "bottleneck_dim": 32, "n_local_crops": 2,
                     "global_crop_size": 6, "local_crop_size": 3, "n_prototypes": 2, "min_regions": 4}}


def _components(a):
    from histobench.registry import create

    enc = dict(QUICK["encoder"]) if a.quick else {}
    pre = dict(QUICK["pretext"]) if a.quick else {}
    pre.update(warm_epoch=0, freeze_last_layer_epochs=0)  # cluster from the second epoch; every parameter trains
    return create("pretext", "slpd", pre), create("encoder", "hipt-vit4k", enc)


def _cohort(a, enc):
    from histobench_slpd.data import synthetic_grid_cohort

    o = enc.options
    return synthetic_grid_cohort(n_slides=a.slides, regions_per_slide=a.regions_per_slide, dim=o.in_dim,
                                 grid=o.grid_size, seed=0)


def bare_throughput(a, device, data) -> dict:
    """Regions/s of the bare SLPD step on one batch of grids on the device (after one clustering pass)."""
    import numpy as np
    import torch

    pre, enc = _components(a)
    params, opt = bare_setup(pre, enc, a, device)
    pre.on_epoch_start(1, data)  # prototypes and cross-slide targets, as from the second epoch on
    rows = np.random.default_rng(0).choice(len(data), size=a.batch_size, replace=False)
    batch = {"grids": data.grids[rows].to(device),
             "slide_index": torch.as_tensor(data.slide_index[rows], device=device),
             "tile_index": torch.as_tensor(data.region_index[rows], device=device)}
    bf16 = device.type == "cuda"
    state = {"step": 0}

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = pre.training_step(batch, state["step"])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        pre.after_optimizer_step(state["step"])
        state["step"] += 1

    per_step = timed_steps(step, device, a.warmup, a.steps)
    return {"regions_per_second": a.batch_size / per_step, "seconds_per_step": per_step, **peak_memory(device)}


def histobench_throughput(a, device, data) -> dict:
    """Regions/s of the same SLPD step through ``pretrain``; the re-clustering pass timed on its own."""
    import torch

    from histobench.pretrain.trainer import pretrain

    class Diagnostics:
        """The trainer's tracker interface, keeping the per-epoch metrics (clustering time among them)."""

        def __init__(self):
            self.epochs: dict[int, dict] = {}

        def metrics(self, values, step=None):
            if any(k.startswith("epoch/") for k in values):
                self.epochs.setdefault(step, {}).update(values)

    pre, enc = _components(a)
    per_epoch = a.warmup + a.steps
    opts = type(pre).train_options(None, epochs=2, batch_size=a.batch_size, num_workers=a.workers,
                                   steps_per_epoch=per_epoch, warmup_epochs=0, checkpoint_every=0,
                                   compile=a.compile, precision="bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock, diag = step_clock(), Diagnostics()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pretrain(pre, enc, data, opts, out_dir=Path(tmp), seed=0, device=str(device), reporter=clock, tracker=diag,
                 resume=False)
    wall = time.perf_counter() - t0
    # time the second epoch's steps after its own warm-up: prototype distillation is on, clustering excluded
    n_steps, dt = clock.timing(per_epoch + max(a.warmup, 1))
    second = diag.epochs.get(1, {})
    cluster_s = float(second.get("epoch/cluster_seconds", float("nan")))
    step_s = dt / n_steps
    epoch_steps = len(data) // a.batch_size  # a full epoch of the cohort at this batch size
    out = {"regions_per_second": a.batch_size * n_steps / dt, "seconds_per_step": step_s, "timed_steps": n_steps,
           "cluster_seconds": cluster_s, "steps_per_full_epoch": epoch_steps,
           "cluster_share_of_full_epoch": cluster_s / (cluster_s + epoch_steps * step_s),
           "wall_seconds_two_short_epochs": wall,
           "eligible_slides": second.get("epoch/eligible_slides"), "nn_same_label": second.get("epoch/nn_same_label"),
           **peak_memory(device)}
    return out


def main() -> None:
    ap = speed_parser(__doc__, "Tiny grids, model and head: a CPU smoke run of the script.")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--slides", type=int, default=272,
                    help="Slides of the synthetic grid cohort (272 x 48 regions cover the 25 default steps of batch 512).")
    ap.add_argument("--regions-per-slide", type=int, default=48, help="Regions per slide (paper: n_min = 32).")
    add_run_options(ap, "slpd_speed", warmup=5, steps=20,
                    compile_help="torch.compile the region encoder on both sides.")
    a = ap.parse_args()
    if a.quick:
        a.batch_size, a.slides, a.regions_per_slide = min(a.batch_size, 16), min(a.slides, 8), min(a.regions_per_slide, 8)
        a.warmup, a.steps, a.workers = min(a.warmup, 1), min(a.steps, 3), 0
    device = resolve_device(a.device)
    _, enc = _components(a)
    data = _cohort(a, enc)
    if a.batch_size * (a.warmup + a.steps) > len(data):
        raise SystemExit(f"{len(data)} regions are fewer than batch {a.batch_size} x {a.warmup + a.steps} steps: "
                         "raise --slides or --regions-per-slide")

    bare = bare_throughput(a, device, data)
    release_cuda(device)
    hb = histobench_throughput(a, device, data)
    o = enc.options
    setting = {"encoder": f"hipt-vit4k dim {o.dim} depth {o.depth} heads {o.num_heads}",
               "grids": f"[{o.in_dim}, {o.grid_size}, {o.grid_size}]", "batch_size": a.batch_size,
               "cohort": f"{a.slides} slides x {a.regions_per_slide} regions ({len(data)})",
               "precision": "bf16 autocast" if device.type == "cuda" else "fp32 (cpu)", "compile": a.compile,
               "warmup_steps": a.warmup, "timed_steps": a.steps, "trainer_workers": a.workers, "quick": a.quick}
    finish({"benchmark": "slpd_speed", "setting": setting, "bare": bare, "histobench": hb,
            "ratio": hb["regions_per_second"] / bare["regions_per_second"], "target_ratio": 0.9}, device, a.out)


if __name__ == "__main__":
    main()
