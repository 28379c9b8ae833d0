"""Train a tiny StarDist 2D model on histobench's synthetic nuclei: about a minute of CPU time.

The result is a StarDist model folder (``config.json``, ``weights_best.h5``, ``thresholds.json``) that the
``stardist`` segmenter loads with ``-o segmenter.model_dir=PATH``. It lets the StarDist path run end to end
where the pretrained ``2D_versatile_he`` cannot be fetched (offline machines, CI) and gives the StarDist test
a model it can check against the truth.

Data: synthetic slides (``histobench.slides.synthetic``; glandular, solid and clear-cell tissue) written at
``--mpp`` µm/px, cut into ``--patch`` px squares; the labels are the slides' true nuclei (the sidecar the
``oracle`` segmenter reads). Inputs are normalised by the (1, 99.8) percentiles over all channels, as the
segmenter does. The model is small (U-Net depth 2, 16 base filters, 16 rays, grid 1): a plumbing model, not a
segmenter for real tissue. ``scale`` is the tile's µm/px over the training µm/px: trained at 0.5 µm/px, the
model takes ``-o segmenter.scale=1.0`` on 0.5 µm/px tiles, and the default 2.0 on the demo's 1 µm/px tiles.

Needs the extra: ``pip install 'histobench[stardist]'``. TensorFlow 2.21 needs ``train_tensorboard=False``,
which the config sets. Prints the validation matching at IoU 0.5 and the wall time, and writes them to
``train_summary.json`` in the model folder. Measured with TF 2.21 on CPU: ~72 s of CPU time (the wall time
was 200-265 s on a 2-core machine under a load average of 13-17), validation precision 0.83, recall 0.61-0.63.

    python plugins/histobench_dirl/scripts/train_tiny_stardist.py --out models/tiny-stardist
    histobench segment --task tcga-nsclc --demo --segmenter stardist -o segmenter.model_dir=models/tiny-stardist
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_patches(n_slides: int, slide_px: int, patch: int, mpp: float, seed: int,
                      workdir: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Image patches (uint8 [patch, patch, 3]) and their true instance maps, from ``n_slides`` synthetic slides
    of ``slide_px`` px at ``mpp`` µm/px (patches with at least one nucleus only)."""
    from histobench.slides.reader import open_slide
    from histobench.slides.synthetic import nuclei_sidecar, read_nuclei, write_synthetic_slide

    images, labels = [], []
    for k in range(n_slides):
        path = workdir / f"train-{k}.tiff"
        write_synthetic_slide(path, class_index=k % 3, n_classes=3, seed=seed + k, size=(slide_px, slide_px),
                              mpp=mpp, signal_fraction=0.6)
        inst, _, _ = read_nuclei(nuclei_sidecar(path))
        with open_slide(path) as slide:
            pixels = slide.read_region(0, 0, 0, slide_px, slide_px)
        for y in range(0, slide_px - patch + 1, patch):
            for x in range(0, slide_px - patch + 1, patch):
                lab = inst[y:y + patch, x:x + patch].astype(np.int64)
                if not lab.any():
                    continue
                ids, inverse = np.unique(lab, return_inverse=True)
                images.append(pixels[y:y + patch, x:x + patch])
                labels.append(inverse.reshape(lab.shape).astype(np.uint16))  # 0 stays 0: ids[0] == 0
    return images, labels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="model folder to write (its parent must be writable)")
    ap.add_argument("--mpp", type=float, default=0.5, help="µm/px of the synthetic training slides")
    ap.add_argument("--slides", type=int, default=3, help="synthetic slides (one per tissue class, cycling)")
    ap.add_argument("--slide-px", type=int, default=512)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20, help="steps per epoch")
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="show Keras' progress bars")
    ap.add_argument("--no-thresholds", action="store_true", help="skip optimising the probability/NMS thresholds")
    args = ap.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        from csbdeep.utils import normalize
        from stardist import fill_label_holes
        from stardist.matching import matching_dataset
        from stardist.models import Config2D, StarDist2D
    except ImportError as err:
        print(f"error: StarDist and TensorFlow are needed ({err}): pip install 'histobench[stardist]'",
              file=sys.stderr)
        return 2
    import tensorflow as tf

    t0 = time.perf_counter()
    np.random.seed(args.seed)
    tf.random.set_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = synthetic_patches(args.slides, args.slide_px, args.patch, args.mpp, args.seed, Path(tmp))
    if len(images) < 4:
        print(f"error: only {len(images)} patches with nuclei; use more or larger slides", file=sys.stderr)
        return 2
    X = [normalize(im.astype(np.float32), 1, 99.8, axis=(0, 1, 2)) for im in images]
    Y = [fill_label_holes(lab) for lab in labels]
    order = np.random.default_rng(args.seed).permutation(len(X))
    n_val = max(2, len(X) // 5)
    val, train = order[:n_val], order[n_val:]
    X_tr, Y_tr = [X[i] for i in train], [Y[i] for i in train]
    X_val, Y_val = [X[i] for i in val], [Y[i] for i in val]

    conf = Config2D(n_rays=16, grid=(1, 1), n_channel_in=3, unet_n_depth=2, unet_n_filter_base=16,
                    train_patch_size=(min(args.patch, 64), min(args.patch, 64)), train_batch_size=8,
                    train_learning_rate=args.lr,
                    train_epochs=args.epochs, train_steps_per_epoch=args.steps, train_tensorboard=False,
                    train_reduce_lr=None, use_gpu=False)
    out = Path(args.out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    model = StarDist2D(conf, name=out.name, basedir=str(out.parent))

    def flip(x, y):  # histology has no canonical orientation: random flips and 90° turns, same for both
        k = np.random.randint(4)
        x, y = np.rot90(x, k, axes=(0, 1)), np.rot90(y, k)
        if np.random.rand() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        return np.ascontiguousarray(x), np.ascontiguousarray(y)

    quiet = contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:  # Keras prints a progress bar per step (StarDist fixes verbose=1)
        model.train(X_tr, Y_tr, validation_data=(X_val, Y_val), augmenter=flip, seed=args.seed,
                    epochs=args.epochs, steps_per_epoch=args.steps)
        if not args.no_thresholds:
            model.optimize_thresholds(X_val, Y_val, nms_threshs=[0.3, 0.5], iou_threshs=[0.5])
    pred = [model.predict_instances(x, verbose=False, show_tile_progress=False)[0] for x in X_val]
    stats = matching_dataset(Y_val, pred, thresh=0.5, show_progress=False)
    summary = {"seconds": round(time.perf_counter() - t0, 1), "train_patches": len(X_tr), "val_patches": len(X_val),
               "mpp": args.mpp, "precision": round(float(stats.precision), 3),
               "recall": round(float(stats.recall), 3), "f1": round(float(stats.f1), 3),
               "thresholds": {"prob": float(model.thresholds.prob), "nms": float(model.thresholds.nms)}}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    print(f"model folder: {out}  (use: -o segmenter.model_dir={out} -o segmenter.scale=S with S = tile µm/px / "
          f"{args.mpp:g}: {0.5 / args.mpp:g} on 0.5 µm/px tiles, {1.0 / args.mpp:g} on the 1 µm/px demo tiles)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
