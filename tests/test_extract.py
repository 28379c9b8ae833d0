"""Feature extraction from slide files: values, coords, attributes, skipping, staleness, crash safety."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import histobench
from histobench.features import extract as extract_mod
from histobench.features.cache import read_features, weights_hash
from histobench.features.extract import extract_features, prepare_pixels
from histobench.pretrain.data import SlideTiles
from histobench.registry import create
from histobench.slides.reader import open_slide
from histobench.slides.tiling import read_tile, tile_slide

TILE = 32
_ENCODER = {"img_size": TILE, "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}}


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    from histobench.slides.synthetic import write_synthetic_slide

    root = tmp_path_factory.mktemp("slides")
    out = []
    for i, size in enumerate([(256, 256), (320, 192), (192, 256)]):
        path = root / f"s{i}.tiff"
        write_synthetic_slide(path, class_index=i % 2, n_classes=2, seed=10 + i, size=size, mpp=0.5)
        with open_slide(path) as s:
            tiles = tile_slide(s, mpp=1.0, tile_size=TILE, min_tissue=0.0)  # read 64 px, resized to 32
        out.append(SlideTiles(f"s{i}", path, tiles))
    return out


@pytest.fixture(scope="module")
def encoder():
    enc = create("encoder", "timm", _ENCODER, preset="demo")
    torch.manual_seed(0)
    return enc, enc.build().eval()


def _extract(enc, module, slides, out, weights=None, **kw):
    return extract_features(module, enc.transform(), slides, out, encoder_name="timm-test",
                            weights=weights or weights_hash(module), batch_size=kw.pop("batch_size", 7),
                            num_workers=kw.pop("num_workers", 0), device="cpu", **kw)


def test_features_match_a_direct_forward(slides, encoder, tmp_path):
    enc, module = encoder
    res = _extract(enc, module, slides, tmp_path, num_workers=2)  # batches straddle slide boundaries
    assert res.extracted == 3 and res.skipped == 0 and res.tiles == sum(len(s.tiles) for s in slides)
    for s in slides:
        feats, coords, attrs = read_features(tmp_path / f"{s.slide_id}.h5")
        with open_slide(s.path) as handle:
            tiles = np.stack([read_tile(handle, s.tiles, i) for i in range(len(s.tiles))])
        x = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
        with torch.inference_mode():
            ref = module(prepare_pixels(x, enc.transform())).numpy()
        assert feats.shape == (len(s.tiles), module.embed_dim)
        np.testing.assert_allclose(feats, ref, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(coords, s.tiles.coords)
        assert attrs["encoder"] == "timm-test" and attrs["weights_hash"] == weights_hash(module)
        assert attrs["mpp"] == pytest.approx(1.0) and attrs["tile_size"] == TILE
        assert attrs["histobench_version"] == histobench.__version__ and attrs["slide_id"] == s.slide_id


def test_rerun_skips_and_new_weights_reextract(slides, encoder, tmp_path):
    enc, module = encoder
    _extract(enc, module, slides, tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.h5")}
    again = _extract(enc, module, slides, tmp_path)
    assert (again.extracted, again.skipped, again.tiles) == (0, 3, 0)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.h5")} == stamps
    changed = _extract(enc, module, slides, tmp_path, weights="0123456789abcdef")
    assert (changed.extracted, changed.skipped) == (3, 0)
    assert read_features(tmp_path / "s0.h5")[2]["weights_hash"] == "0123456789abcdef"


class _Boom:
    def __array__(self, *args, **kwargs):
        raise OSError("disk full")


def test_crash_mid_write_leaves_no_partial_file(slides, encoder, tmp_path, monkeypatch):
    enc, module = encoder
    real = extract_mod.write_features
    calls = []

    def crashing(path, features, coords, attrs):
        calls.append(path.name)
        if len(calls) == 2:  # the second slide's write dies after its file was opened
            return real(path, _Boom(), coords, attrs)
        return real(path, features, coords, attrs)

    monkeypatch.setattr(extract_mod, "write_features", crashing)
    with pytest.raises(OSError, match="disk full"):
        _extract(enc, module, slides, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0.h5"]  # no s1.h5, no leftover temporary file
    monkeypatch.setattr(extract_mod, "write_features", real)
    res = _extract(enc, module, slides, tmp_path)
    assert (res.extracted, res.skipped) == (2, 1)


def test_reader_keeps_few_slides_open(slides):
    from histobench.pretrain.data import SlideTileDataset

    ds = SlideTileDataset(slides, max_open=2)
    for i in range(len(ds)):
        ds[i]
    assert len(ds._handles) == 2
