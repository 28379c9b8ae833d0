"""Feature extraction from slide files: values, coords, attributes, skipping, staleness, crash safety."""

from __future__ import annotations

from pathlib import Path

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


def test_crash_mid_write_leaves_no_partial_file(slides, encoder, tmp_path, monkeypatch):
    enc, module = encoder
    real = extract_mod.FeatureWriter.append

    def crashing(self, features):
        if self.path.name == "s1.h5" and self.pos > 0:  # the second slide dies part-way through its rows
            raise OSError("disk full")
        return real(self, features)

    monkeypatch.setattr(extract_mod.FeatureWriter, "append", crashing)
    with pytest.raises(OSError, match="disk full"):
        _extract(enc, module, slides, tmp_path, batch_size=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0.h5"]  # no s1.h5, no leftover temporary file
    monkeypatch.setattr(extract_mod.FeatureWriter, "append", real)
    res = _extract(enc, module, slides, tmp_path)
    assert (res.extracted, res.skipped) == (2, 1)


def test_features_are_written_batch_by_batch(slides, encoder, tmp_path, monkeypatch):
    """Memory does not grow with slide size: rows reach the file as their batch is encoded, never a whole slide."""
    enc, module = encoder
    real = extract_mod.FeatureWriter.append
    rows: dict[str, list[int]] = {}

    def recording(self, features):
        rows.setdefault(self.path.stem, []).append(len(features))
        return real(self, features)

    monkeypatch.setattr(extract_mod.FeatureWriter, "append", recording)
    _extract(enc, module, slides, tmp_path, batch_size=5)
    for s in slides:
        assert sum(rows[s.slide_id]) == len(s.tiles) and max(rows[s.slide_id]) <= 5
        assert len(rows[s.slide_id]) >= len(s.tiles) // 5
        assert read_features(tmp_path / f"{s.slide_id}.h5")[0].shape == (len(s.tiles), 32)


def test_feature_writer_refuses_a_short_slide(tmp_path):
    from histobench.features.cache import FeatureWriter

    w = FeatureWriter(tmp_path / "s.h5", np.zeros((3, 2), np.int64), {"encoder": "x"})
    w.append(np.ones((2, 4)))
    with pytest.raises(ValueError, match="2 feature rows written for 3 tiles"):
        w.close()
    assert not list(tmp_path.iterdir())
    empty = FeatureWriter(tmp_path / "e.h5", np.zeros((0, 2), np.int64), {"encoder": "x"})
    assert read_features(empty.close())[0].shape == (0, 0)


def test_reader_keeps_few_slides_open(slides):
    from histobench.pretrain.data import SlideTileDataset

    ds = SlideTileDataset(slides, max_open=2)
    for i in range(len(ds)):
        ds[i]
    assert len(ds._handles) == 2


def _cosines(a_dir, b_dir, slides):
    out = []
    for s in slides:
        a, ca, _ = read_features(a_dir / f"{s.slide_id}.h5")
        b, cb, _ = read_features(b_dir / f"{s.slide_id}.h5")
        np.testing.assert_array_equal(ca, cb)
        out.append((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    return np.concatenate(out)


def test_direct_jpeg_decode_gives_the_same_features(slides, encoder, tmp_path):
    """decode="jpeg" (direct JPEG tiles, libjpeg-turbo in the workers) against decode="openslide": the pixels are
    identical in this environment, so the features agree to float noise; cosine > 0.9999 allows a differently
    built libjpeg (a pixel or two off)."""
    from histobench.reporting import Reporter

    enc, module = encoder
    cmu = Path(__file__).parent / "data" / "slides" / "CMU-1-Small-Region.svs"
    with open_slide(cmu) as s:
        tiles = tile_slide(s, mpp=s.mpp * 8, tile_size=TILE, min_tissue=0.0)  # 256 px read, resized to 32
    cohort = [*slides, SlideTiles("cmu", cmu, tiles)]
    reporter = Reporter()
    _extract(enc, module, cohort, tmp_path / "jpeg", decode="jpeg", num_workers=2, reporter=reporter)
    _extract(enc, module, cohort, tmp_path / "openslide", decode="openslide")
    cos = _cosines(tmp_path / "jpeg", tmp_path / "openslide", cohort)
    assert len(cos) == sum(len(s.tiles) for s in cohort) and cos.min() > 0.9999
    assert "direct JPEG-tile decoding for 4 of 4 slides" in reporter.messages


def test_decode_auto_falls_back_for_ndpi_and_nvjpeg_needs_cuda(encoder, tmp_path):
    from histobench.errors import HistobenchError
    from histobench.reporting import Reporter

    enc, module = encoder
    ndpi = Path(__file__).parent / "data" / "slides" / "ndpi-fluorescence" / "test3-DAPI-2.ndpi"
    with open_slide(ndpi) as s:
        tiles = tile_slide(s, mpp=s.mpp * 4, tile_size=TILE, min_tissue=0.0)
    cohort = [SlideTiles("ndpi", ndpi, tiles)]
    reporter = Reporter()
    _extract(enc, module, cohort, tmp_path / "auto", reporter=reporter)  # decode="auto"
    _extract(enc, module, cohort, tmp_path / "openslide", decode="openslide")
    assert _cosines(tmp_path / "auto", tmp_path / "openslide", cohort).min() > 0.99999
    assert any(m.startswith("openslide decodes ndpi: hamamatsu") for m in reporter.messages)
    with pytest.raises(HistobenchError, match="needs a CUDA device"):
        _extract(enc, module, cohort, tmp_path / "nv", decode="nvjpeg")
    with pytest.raises(HistobenchError, match="decode must be one of"):
        _extract(enc, module, cohort, tmp_path / "nv", decode="pil")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_extraction_matches_openslide(encoder, tmp_path):
    from histobench.reporting import Reporter
    from histobench.slides.synthetic import render_synthetic, write_tiff_pyramid

    enc, module = encoder
    rgb, _, _ = render_synthetic(class_index=0, n_classes=2, seed=5, size=(1024, 768), mpp=0.5)
    path = tmp_path / "syn.tiff"
    write_tiff_pyramid(path, rgb, mpp=0.5, tile=256)
    with open_slide(path) as s:
        tiles = tile_slide(s, mpp=0.5, tile_size=256, min_tissue=0.0)  # whole file tiles
    cohort = [SlideTiles("syn", path, tiles)]
    reporter = Reporter()
    kw = {"encoder_name": "timm-test", "weights": weights_hash(module), "batch_size": 5, "num_workers": 2,
          "device": "cuda"}
    extract_features(module, enc.transform(), cohort, tmp_path / "nv", decode="nvjpeg", reporter=reporter, **kw)
    extract_features(module, enc.transform(), cohort, tmp_path / "os", decode="openslide", **kw)
    assert any("nvJPEG decodes" in m for m in reporter.messages)
    assert not any("disagree" in m or "failed" in m for m in reporter.messages), reporter.messages
    assert _cosines(tmp_path / "nv", tmp_path / "os", cohort).min() > 0.99


def test_nvjpeg_plumbing_with_a_stand_in_decoder(monkeypatch, tmp_path):
    """The GPU path's logic on the CPU: nvJPEG replaced by a CPU decoder (and by one that swaps colours, which
    the agreement check must catch). nvJPEG itself is only exercised by the gpu-marked test."""
    from histobench.pretrain.data import SlideTileDataset, collate_tiles
    from histobench.reporting import Reporter
    from histobench.slides import jpegtiles
    from histobench.slides.synthetic import render_synthetic, write_tiff_pyramid

    def stand_in(tiles, device, swap=False):
        out = [torch.from_numpy(np.ascontiguousarray(jpegtiles.decode_cpu(t.numpy().tobytes()).transpose(2, 0, 1)))
               if t.dim() == 1 else t for t in tiles]
        out = [o.flip(0) if swap and t.dim() == 1 else o for o, t in zip(out, tiles)]
        return torch.stack(out)

    rgb, _, _ = render_synthetic(class_index=0, n_classes=2, seed=5, size=(768, 512), mpp=0.5)
    path = tmp_path / "syn.tiff"
    write_tiff_pyramid(path, rgb, mpp=0.5, tile=256)
    with open_slide(path) as s:
        whole = tile_slide(s, mpp=0.5, tile_size=256, min_tissue=0.0)
        resized = tile_slide(s, mpp=1.0, tile_size=128, min_tissue=0.0)
    cohort = [SlideTiles("whole", path, whole), SlideTiles("resized", path, resized)]

    monkeypatch.setattr(jpegtiles, "decode_batch_cuda", stand_in)
    reporter = Reporter()
    assert extract_mod._dataset_mode("nvjpeg", True, cohort, reporter, "cpu") == ("jpeg-bytes", {0})
    # "auto" keeps to the CPU decode until nvJPEG has been measured on a GPU
    assert extract_mod._dataset_mode("auto", True, cohort, reporter, "cpu") == ("jpeg", set())
    assert extract_mod._dataset_mode("auto", False, cohort, reporter, "cpu") == ("jpeg", set())
    ds = SlideTileDataset(cohort[:1], decode="jpeg-bytes", stream_slides={0})
    tiles, _, _ = collate_tiles([ds[i] for i in range(len(ds))])
    assert all(t.dim() == 1 for t in tiles)
    batch = extract_mod._GpuDecoder("cpu", reporter)(tiles)
    ref = SlideTileDataset(cohort[:1])
    np.testing.assert_array_equal(batch.numpy(), torch.stack([ref[i][0] for i in range(len(ref))]).numpy())

    monkeypatch.setattr(jpegtiles, "decode_batch_cuda", lambda t, d: stand_in(t, d, swap=True))
    reporter = Reporter()
    assert extract_mod._dataset_mode("nvjpeg", True, cohort, reporter, "cpu") == ("jpeg", set())
    assert any("disagree on slide whole" in m for m in reporter.messages)
