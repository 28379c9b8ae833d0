"""Top-k fine-tuning speed: the ``topk-finetune`` protocol's training step vs the bare step of the same model.

Both sides train the same modules on the same batch: a timm encoder (``--arch``, random init; ResNet18 by
default, as HistoTransfer) and the ABMIL head on ``--slides`` bags of ``--top-k`` tiles per optimizer step
(the paper: one slide of 64 tiles), Adam, fp32, BatchNorm in eval mode.

* protocol: :func:`histobench.evaluate.topk.finetune_step` on uint8 tiles in host memory, as stage 2 holds
  them: the host-to-device copy, the resize/normalisation (:func:`histobench.features.extract.prepare_pixels`),
  one encoder forward over the batch's tiles, the split into bags, padding and masking, the head, the
  class-weighted loss, the finiteness check and the step.
* bare: the encoder and head on a float tensor already normalised and on the device, one bag per slide
  stacked without padding, cross-entropy, backward, step.

Throughput is tiles per second over ``--steps`` steps after ``--warmup`` steps (device synchronised); the
ratio is protocol / bare.

    python benchmarks/finetune_speed.py --device cuda                      # ResNet18, 224 px, 1 x 64 tiles
    python benchmarks/finetune_speed.py --device cuda --tile 512           # the paper's tile size
    python benchmarks/finetune_speed.py --quick --device cpu --out /tmp/finetune_speed_quick.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_run_options, finish, peak_memory, resolve_device, speed_parser, timed_steps  # noqa: E402


def _models(a, device):
    import torch

    from histobench.registry import create
    from histobench_mil.abmil import ABMIL

    enc_opts = {"arch": a.arch, "img_size": a.tile}
    if a.truncate_at:
        enc_opts["truncate_at"] = a.truncate_at
    component = create("encoder", "timm", enc_opts)
    torch.manual_seed(0)
    encoder = component.build().to(device)
    head = ABMIL(dropout=0.0).build(int(encoder.embed_dim), 2).to(device)
    return component, encoder, head


def _batch(a):
    import numpy as np

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(a.slides, a.top_k, 3, a.tile, a.tile), dtype=np.uint8)
    labels = np.arange(a.slides) % 2
    return tiles, labels


def protocol_throughput(a, device) -> dict:
    """Tiles/s of ``finetune_step`` on uint8 host tiles."""
    import numpy as np
    import torch

    from histobench.evaluate import topk
    from histobench.evaluate.train import _cross_entropy, class_weights

    component, encoder, head = _models(a, device)
    tiles, labels = _batch(a)
    bags = [torch.from_numpy(t) for t in tiles]
    if device.type == "cuda":
        bags = [b.pin_memory() for b in bags]
    target = torch.as_tensor(labels, dtype=torch.long)
    weight = torch.from_numpy(class_weights(labels, 2, "balanced")).to(device)
    loss_fn = _cross_entropy(weight)
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=1e-5)
    topk.train_mode(encoder, head, bn_eval=True)
    transform = component.transform()
    per_step = timed_steps(lambda: topk.finetune_step(encoder, head, opt, bags, target, loss_fn, transform, device),
                           device, a.warmup, a.steps)
    return {"tiles_per_second": a.slides * a.top_k / per_step, "seconds_per_step": per_step,
            "batchnorm_layers_in_eval": topk.set_batchnorm_eval(encoder), **peak_memory(device)}


def bare_throughput(a, device) -> dict:
    """Tiles/s of the bare step on normalised float tiles already on the device."""
    import torch
    import torch.nn.functional as F

    from histobench.evaluate import topk
    from histobench.features.extract import prepare_pixels

    component, encoder, head = _models(a, device)
    tiles, labels = _batch(a)
    x = prepare_pixels(torch.from_numpy(tiles.reshape(-1, *tiles.shape[2:])).to(device), component.transform())
    target = torch.as_tensor(labels, dtype=torch.long, device=device)
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=1e-5)
    topk.train_mode(encoder, head, bn_eval=True)

    def step():
        feats = encoder(x).view(a.slides, a.top_k, -1)
        out, _ = head(feats, None)
        loss = F.cross_entropy(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    per_step = timed_steps(step, device, a.warmup, a.steps)
    return {"tiles_per_second": a.slides * a.top_k / per_step, "seconds_per_step": per_step, **peak_memory(device)}


def main() -> None:
    ap = speed_parser(__doc__, "Small tiles and bags: a CPU smoke run of the script.")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--truncate-at", default=None, help="Cut the encoder after this stage (encoder.truncate_at).")
    ap.add_argument("--tile", type=int, default=224, help="Tile side in pixels (the paper: 512).")
    ap.add_argument("--top-k", type=int, default=64, help="Tiles per slide (the paper: 64).")
    ap.add_argument("--slides", type=int, default=1, help="Slides per optimizer step (the paper: 1).")
    add_run_options(ap, "finetune_speed", warmup=5, steps=20, workers=None)
    a = ap.parse_args()
    if a.quick:  # 3 warm-up steps: with 1, the side measured first (bare) still paid first-use costs on a CPU
        a.tile, a.top_k, a.slides, a.warmup, a.steps = min(a.tile, 32), min(a.top_k, 8), 2, 3, 5
    device = resolve_device(a.device)

    import torch

    torch.backends.cudnn.benchmark = device.type == "cuda"
    bare = bare_throughput(a, device)
    proto = protocol_throughput(a, device)
    result = {
        "benchmark": "finetune_speed",
        "ratio": proto["tiles_per_second"] / bare["tiles_per_second"],
        "protocol": proto,
        "bare": bare,
        "setting": {"quick": a.quick, "arch": a.arch, "truncate_at": a.truncate_at, "tile": a.tile, "top_k": a.top_k,
                    "slides_per_step": a.slides, "warmup": a.warmup, "steps": a.steps, "precision": "fp32",
                    "optimizer": "Adam", "head": "abmil (dropout 0)"},
    }
    finish(result, device, a.out)


if __name__ == "__main__":
    main()
