"""HLSS pretraining speed at the paper's size: histobench's trainer vs the bare HLSS step.

The paper-size setting (spec ``/work/shared/methods/hlss.md`` §2.6): the CLIP ResNet-50 image tower
(``clip-rn50``, timm ``resnet50_clip.cc12m`` with CLIP's attention pool, 1024-d; random init here, weights do not
change the speed), 224 px views of 256 px uint8 tiles, B = 32 patients x S = 2 slides x P = 2 tiles x T = 2 views
= 256 images per step, three text-initialised heads over the shipped ``tcga-nsclc`` descriptions, SupCon per level
and the alignment term with gradient. The text bank comes from the ``hashing`` encoder at width 1024 with the
adapter off, so the heads and the alignment have the shapes of CLIP's joint space (the bank's values do not
change the speed); the text tower itself runs once at setup and is not timed.

* bare: the pretext's own ``training_step`` (views on the device, backbone, heads, losses), backward and AdamW
  (fused on CUDA) on one batch of tiles already on the device; bf16 autocast on CUDA.
* histobench: :func:`histobench.pretrain.trainer.pretrain` on an in-memory tile dataset with the core's
  ``PatientSampler`` (whole patients), DataLoader workers, schedules and logging; steps timed from the
  trainer's progress callbacks after the warm-up steps.

Target (as for DINO and SLPD): histobench / bare >= 0.9 in images per second on a GPU.

    python benchmarks/hlss_speed.py --device cuda                 # paper size -> results/hlss_speed.json
    python benchmarks/hlss_speed.py --quick --device cpu --out /tmp/hlss_speed_cpu_quick.json
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_run_options, finish, peak_memory, release_cuda, resolve_device, speed_parser, step_clock, timed_steps)

S, P, T = 2, 2, 2


def _components(a):
    from histobench.registry import create

    if a.quick:
        enc = create("encoder", "clip-rn50", None, preset="demo")
        pre = create("pretext", "hlss", {"descriptions": "tcga-nsclc", "view_size": a.view_size})
        text = create("text_encoder", "hashing", {"dim": 64})
    else:
        enc = create("encoder", "clip-rn50", {"pretrained": False})
        pre = create("pretext", "hlss", {"descriptions": "tcga-nsclc", "view_size": a.view_size, "adapter": "off"})
        text = create("text_encoder", "hashing", {"dim": 1024})
    return pre, enc, text


class TileData:
    """``n_patients`` x 2 slides x ``tiles`` random uint8 tiles of ``size`` px (slide-major), in memory."""

    def __init__(self, n_patients: int, tiles: int, size: int):
        import numpy as np

        from histobench.components import CohortMeta

        n_slides = n_patients * S
        self.array = np.random.default_rng(0).integers(0, 256, size=(n_slides * tiles, 3, size, size), dtype=np.uint8)
        self.slide_index = np.repeat(np.arange(n_slides), tiles)
        self.tile_index = np.tile(np.arange(tiles), n_slides)
        self.cohort = CohortMeta(tuple(f"s{i}" for i in range(n_slides)), tuple(f"p{i // S}" for i in range(n_slides)))

    def __len__(self):
        return len(self.array)

    def __getitem__(self, idx):
        import torch

        return torch.from_numpy(self.array[idx]), int(self.slide_index[idx]), int(self.tile_index[idx])


def bare_throughput(a, device, data) -> dict:
    import numpy as np
    import torch

    from histobench.components import PretrainContext
    from histobench.pretrain.trainer import _param_groups

    pre, enc, text = _components(a)
    torch.manual_seed(0)
    encoder = enc.build().to(device)
    if a.compile:
        encoder.compile()
    total = a.warmup + a.steps
    pre.setup(encoder, PretrainContext(device=device, total_steps=total, steps_per_epoch=total, epochs=1,
                                       batch_size=a.batch_size, encoder_component=enc, cohort=data.cohort,
                                       text_encoder=text))
    groups = _param_groups(pre.student_modules())
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "apply_wd"} for g in groups], lr=1e-3,
                            fused=device.type == "cuda")
    rows = np.arange(a.batch_size * S * P) * (len(data) // (a.batch_size * S * P))
    batch = {"images": torch.from_numpy(data.array[rows]).to(device)}
    bf16 = device.type == "cuda"
    state = {"step": 0}

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = pre.training_step(batch, state["step"])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        state["step"] += 1

    per_step = timed_steps(step, device, a.warmup, a.steps)
    images = a.batch_size * S * P * T
    return {"images_per_second": images / per_step, "patients_per_second": a.batch_size / per_step,
            "seconds_per_step": per_step, **peak_memory(device)}


def histobench_throughput(a, device, data) -> dict:
    import torch

    from histobench.pretrain.trainer import pretrain

    pre, enc, text = _components(a)
    per_epoch = a.warmup + a.steps
    opts = type(pre).train_options(None, epochs=1, batch_size=a.batch_size, num_workers=a.workers,
                                   steps_per_epoch=per_epoch, warmup_epochs=0, checkpoint_every=0,
                                   compile=a.compile, precision="bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = step_clock()
    with tempfile.TemporaryDirectory() as tmp:
        pretrain(pre, enc, data, opts, out_dir=Path(tmp), seed=0, device=str(device), reporter=clock, resume=False,
                 cohort=data.cohort, text_encoder=text)
    n_steps, dt = clock.timing(max(a.warmup, 1))
    images = a.batch_size * S * P * T
    return {"images_per_second": images * n_steps / dt, "patients_per_second": a.batch_size * n_steps / dt,
            "seconds_per_step": dt / n_steps, "timed_steps": n_steps, **peak_memory(device)}


def main() -> None:
    ap = speed_parser(__doc__, "Small CNN, 32 px views, 2 patients: a CPU smoke run.")
    ap.add_argument("--batch-size", type=int, default=32, help="Patients per step (paper: 32 per GPU).")
    ap.add_argument("--tile-size", type=int, default=256, help="Side of the stored uint8 tiles.")
    ap.add_argument("--view-size", type=int, default=224, help="Side of each view (paper: 224).")
    add_run_options(ap, "hlss_speed", warmup=3, steps=10, compile_help="torch.compile the backbone on both sides.")
    a = ap.parse_args()
    if a.quick:
        a.batch_size, a.tile_size, a.view_size = min(a.batch_size, 2), min(a.tile_size, 64), min(a.view_size, 32)
        a.warmup, a.steps, a.workers = min(a.warmup, 1), min(a.steps, 2), 0
    device = resolve_device(a.device)
    data = TileData(a.batch_size * (a.warmup + a.steps), 2, a.tile_size)
    bare = bare_throughput(a, device, data)
    release_cuda(device)
    hb = histobench_throughput(a, device, data)
    pre, enc, text = _components(a)
    setting = {"encoder": f"{enc.name} {enc.options.arch}", "tile": a.tile_size, "view": a.view_size,
               "batch": f"{a.batch_size} patients x {S} slides x {P} tiles x {T} views",
               "images_per_step": a.batch_size * S * P * T, "text_bank": f"{text.name} d={text.dim}",
               "precision": "bf16 autocast" if device.type == "cuda" else "fp32 (cpu)", "compile": a.compile,
               "warmup_steps": a.warmup, "timed_steps": a.steps, "trainer_workers": a.workers, "quick": a.quick}
    finish({"benchmark": "hlss_speed", "setting": setting, "bare": bare, "histobench": hb,
            "ratio": hb["images_per_second"] / bare["images_per_second"], "target_ratio": 0.9}, device, a.out)


if __name__ == "__main__":
    main()
