"""Evaluation speed: padded, masked mini-batches vs one bag per optimizer step.

A 10-fold evaluation over 1000 synthetic bags (ABMIL, default width, ``eval.epochs`` epochs per fold, 900
training bags per fold). The batched protocol (``eval.batch_size`` bags per step) is timed end to end on all
folds. The one-bag-per-step loop is the same ``fit_aggregator`` with ``batch_size=1``; as it is slow, it is
timed on ``--single-steps`` steps of fold 0 and its 10-fold time is extrapolated from the time per step
(steps = folds x epochs x training bags). Prediction is identical in both and is included in neither.

    python benchmarks/eval_speed.py [--bags 1000 --folds 10 --epochs 5 --dim 384 --device auto]

Prints JSON and writes results/eval_speed.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bags", type=int, default=1000)
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--min-tiles", type=int, default=100)
    ap.add_argument("--max-tiles", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--single-steps", type=int, default=300, help="Steps of the one-bag loop actually timed.")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("results/eval_speed.json"))
    a = ap.parse_args()

    import torch

    from histobench.evaluate.options import EvalOptions
    from histobench.device import resolve_device
    from histobench.evaluate.train import fit_aggregator
    from histobench_mil.abmil import ABMIL

    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(int(rng.integers(a.min_tiles, a.max_tiles + 1)), a.dim)).astype(np.float32) for _ in range(a.bags)]
    labels = rng.integers(0, 2, a.bags)
    fold_of = rng.permutation(a.bags) % a.folds
    device = resolve_device(a.device)
    head = ABMIL()

    def fit(train_idx, opts):
        torch.manual_seed(0)
        fit_aggregator(head.build(a.dim, 2), [bags[i] for i in train_idx], labels[train_idx], opts, n_outputs=2)
        if device.type == "cuda":
            torch.cuda.synchronize()

    base = dict(epochs=a.epochs, device=str(device), max_tiles=512)
    t0 = time.perf_counter()
    for k in range(a.folds):
        fit(np.flatnonzero(fold_of != k), EvalOptions(batch_size=a.batch_size, **base))
    batched = time.perf_counter() - t0

    train0 = np.flatnonzero(fold_of != 0)
    sub = train0[: a.single_steps]  # one epoch over `single_steps` bags = that many one-bag steps
    fit(sub[:8], EvalOptions(batch_size=1, **{**base, "epochs": 1}))  # warm-up
    t0 = time.perf_counter()
    fit(sub, EvalOptions(batch_size=1, **{**base, "epochs": 1}))
    per_step = (time.perf_counter() - t0) / len(sub)
    total_steps = sum(int((fold_of != k).sum()) for k in range(a.folds)) * a.epochs
    single = per_step * total_steps

    out = {
        "benchmark": "eval_speed",
        "ratio": round(single / batched, 2),
        "batched_seconds": round(batched, 2),
        "single_bag_seconds_extrapolated": round(single, 1),
        "single_bag_seconds_per_step": round(per_step, 5),
        "single_bag_steps_timed": int(len(sub)),
        "single_bag_steps_total": int(total_steps),
        "bags": a.bags, "folds": a.folds, "epochs": a.epochs, "dim": a.dim,
        "tiles_per_bag": [a.min_tiles, a.max_tiles], "batch_size": a.batch_size, "aggregator": "abmil (default options)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
