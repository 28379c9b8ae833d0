"""GPU smoke tests: bf16 training with fused AdamW, memory logging, extraction on CUDA. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


class _Tracker:
    def __init__(self):
        self.rows = []

    def metrics(self, values, step=None):
        self.rows.append(dict(values))


def test_pretrain_on_cuda_bf16_fused_adamw(tmp_path, monkeypatch):
    from histobench.pretrain.data import SyntheticTileDataset
    from histobench.pretrain.trainer import pretrain
    from histobench.registry import create

    made = []
    real = torch.optim.AdamW

    class Recording(real):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self.defaults.get("fused"))

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    pre = create("pretext", "dino", None, preset="demo")
    enc = create("encoder", "timm", None, preset="demo")
    opts = type(pre).train_options("demo", epochs=1, batch_size=32, num_workers=2, steps_per_epoch=4, warmup_epochs=0)
    tracker = _Tracker()
    res = pretrain(pre, enc, SyntheticTileDataset(128, 64), opts, out_dir=tmp_path, seed=0, device="cuda",
                   tracker=tracker)
    assert made == [True]
    assert len(res.history) == 4 and np.isfinite([h["loss"] for h in res.history]).all()
    assert next(res.encoder.parameters()).is_cuda
    keys = set().union(*tracker.rows)
    assert {"train/max_memory_gb", "epoch/max_memory_gb", "train/images_per_second"} <= keys
    # exact resume on the GPU too
    part_dir = tmp_path / "part"
    pre2, enc2 = create("pretext", "dino", None, preset="demo"), create("encoder", "timm", None, preset="demo")
    pretrain(pre2, enc2, SyntheticTileDataset(128, 64), opts, out_dir=part_dir, seed=0, device="cuda", max_steps=2)
    pre3, enc3 = create("pretext", "dino", None, preset="demo"), create("encoder", "timm", None, preset="demo")
    again = pretrain(pre3, enc3, SyntheticTileDataset(128, 64), opts, out_dir=part_dir, seed=0, device="cuda")
    assert again.resumed_from == 2
    np.testing.assert_allclose([h["loss"] for h in again.history], [h["loss"] for h in res.history], rtol=1e-2)  # GPU kernels are not bitwise deterministic


def test_extract_on_cuda_matches_cpu(tmp_path):
    from histobench.features.cache import read_features
    from histobench.features.extract import extract_features
    from histobench.pretrain.data import SlideTiles
    from histobench.registry import create
    from histobench.slides.reader import open_slide
    from histobench.slides.synthetic import write_synthetic_slide
    from histobench.slides.tiling import tile_slide

    slides = []
    for i in range(2):
        p = tmp_path / f"s{i}.tiff"
        write_synthetic_slide(p, class_index=i, n_classes=2, seed=i, size=(512, 512), mpp=0.5)
        with open_slide(p) as s:
            slides.append(SlideTiles(p.stem, p, tile_slide(s, mpp=0.5, tile_size=64, min_tissue=0.0)))
    enc = create("encoder", "timm", None, preset="demo")
    torch.manual_seed(0)
    module = enc.build()
    gpu = extract_features(module, enc.transform(), slides, tmp_path / "gpu", encoder_name="t", weights="w",
                           batch_size=16, num_workers=2, device="cuda")
    cpu = extract_features(module.cpu(), enc.transform(), slides, tmp_path / "cpu", encoder_name="t", weights="w",
                           batch_size=16, num_workers=0, device="cpu")
    assert gpu.tiles == cpu.tiles == sum(len(s.tiles) for s in slides)
    for s in slides:
        a = read_features(tmp_path / "gpu" / f"{s.slide_id}.h5")[0]
        b = read_features(tmp_path / "cpu" / f"{s.slide_id}.h5")[0]
        assert a.shape == b.shape
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cos.min() > 0.99  # bf16 on the GPU vs fp32 on the CPU


def test_cuda_oom_is_a_histobench_error(tmp_path):
    from histobench.errors import HistobenchError
    from histobench.pretrain.data import SyntheticTileDataset
    from histobench.pretrain.trainer import pretrain
    from histobench.registry import create

    pre = create("pretext", "dino", {"global_crop_size": 224, "local_crop_size": 96, "n_local_crops": 8}, preset="demo")
    enc = create("encoder", "timm", {"arch": "vit_large_patch16_224", "model_kwargs": {}, "img_size": 224})
    free, _ = torch.cuda.mem_get_info()
    batch = 4096 if free < 200 * 2**30 else 16384
    opts = type(pre).train_options("demo", epochs=1, batch_size=batch, num_workers=0, steps_per_epoch=1, warmup_epochs=0)
    with pytest.raises(HistobenchError, match=f"train.batch_size={batch}"):
        pretrain(pre, enc, SyntheticTileDataset(batch, 224), opts, out_dir=tmp_path, seed=0, device="cuda")
