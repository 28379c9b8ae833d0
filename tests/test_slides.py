"""Slide reading, tissue detection, tiling and synthetic slides (histobench.slides)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from histobench.errors import HistobenchError
from histobench.slides.reader import Slide, open_slide
from histobench.slides.synthetic import (
    file_digest,
    make_demo_cohort,
    render_synthetic,
    tumor_mask,
    write_synthetic_slide,
)
from histobench.slides.tiling import TileSet, choose_level, read_tile, select_tiles, tile_slide
from histobench.slides.tissue import otsu_threshold, tissue_mask

REAL = Path(__file__).resolve().parent / "data" / "slides"  # copied from the shared data; see tests/data/README.md
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real test slides not found at {REAL}")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("synth") / "SYN-1.tiff"
    info = write_synthetic_slide(path, class_index=1, n_classes=3, seed=5, size=(1024, 768), mpp=0.25, tile=128)
    return path, info


# ---------------------------------------------------------------------------------------------------------------
# synthetic slides through openslide
# ---------------------------------------------------------------------------------------------------------------
def test_synthetic_slide_opens_as_generic_tiff_pyramid(synth):
    path, info = synth
    with open_slide(path) as s:
        assert isinstance(s, Slide)
        assert s.vendor == "generic-tiff"
        assert s.slide_id == "SYN-1"
        assert s.dimensions == (1024, 768)
        assert s.level_count >= 3 and s.level_count == info["levels"]
        assert s.level_dimensions[:3] == ((1024, 768), (512, 384), (256, 192))
        assert s.level_downsamples[:3] == pytest.approx((1.0, 2.0, 4.0))
        assert s.mpp == pytest.approx(0.25, abs=1e-3)
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25, abs=1e-3)
        assert s.objective_power is None
        region = s.read_region(0, 0, 0, 1024, 768)
        assert region.shape == (768, 1024, 3) and region.dtype == np.uint8
        # pixels survive JPEG: compare with the rendered array
        rgb, tissue, _ = render_synthetic(class_index=1, n_classes=3, seed=5, size=(1024, 768), mpp=0.25)
        assert np.abs(region.astype(int) - rgb).mean() < 4
        # glass is near-white, tissue is stained
        assert region[~tissue].mean() > 235
        assert region[tissue].mean() < 215
    assert 0.35 <= info["tissue_fraction"] <= 0.65
    assert info["tumor_fraction"] == pytest.approx(0.35, abs=0.05)
    assert info["mpp"] == 0.25


def test_synthetic_is_deterministic(tmp_path, synth):
    path, _ = synth
    again = tmp_path / "again.tiff"
    write_synthetic_slide(again, class_index=1, n_classes=3, seed=5, size=(1024, 768), mpp=0.25, tile=128)
    assert file_digest(again) == file_digest(path)
    other = tmp_path / "other.tiff"
    write_synthetic_slide(other, class_index=1, n_classes=3, seed=6, size=(1024, 768), mpp=0.25, tile=128)
    assert file_digest(other) != file_digest(path)


def test_synthetic_layout_is_class_independent_and_signal_is_morphological():
    kw = dict(n_classes=3, seed=3, size=(512, 512), mpp=0.25)
    imgs = [render_synthetic(class_index=c, **kw) for c in range(3)]
    tum = tumor_mask(seed=3, size=(512, 512), mpp=0.25)
    for rgb, tissue, tumour in imgs:
        assert np.array_equal(tumour, tum)
        assert np.array_equal(tissue, imgs[0][1])
    # outside the tumour region the classes are pixel-identical; inside they differ
    normal = imgs[0][1] & ~tum
    assert np.array_equal(imgs[0][0][normal], imgs[1][0][normal])
    assert np.array_equal(imgs[0][0][normal], imgs[2][0][normal])
    assert np.abs(imgs[0][0][tum].astype(int) - imgs[1][0][tum]).mean() > 10
    # same stains: mean tumour colours of the classes stay within a modest distance of each other
    means = np.array([rgb[tum].mean(0) for rgb, _, _ in imgs])
    assert np.abs(means[:, None] - means[None]).max() < 80


def test_synthetic_rejects_bad_classes(tmp_path):
    with pytest.raises(HistobenchError, match="class_index"):
        write_synthetic_slide(tmp_path / "x.tiff", class_index=3, n_classes=3, seed=0, size=(128, 128))
    with pytest.raises(HistobenchError, match="classes"):
        write_synthetic_slide(tmp_path / "x.tiff", class_index=0, n_classes=7, seed=0, size=(128, 128))


def test_synthetic_2048_generates_quickly(tmp_path):
    t = time.perf_counter()
    info = write_synthetic_slide(tmp_path / "big.tiff", class_index=0, n_classes=2, seed=1)
    elapsed = time.perf_counter() - t
    assert info["levels"] == 4 and info["level_dimensions"][-1] == (256, 256)
    assert elapsed < 4.0  # about 1 s on a 2-core CPU; generous for loaded CI machines


# ---------------------------------------------------------------------------------------------------------------
# reader errors and mpp fallbacks
# ---------------------------------------------------------------------------------------------------------------
def test_open_missing_or_invalid_file(tmp_path):
    with pytest.raises(HistobenchError, match=r"cannot open slide .*nope\.svs: no such file"):
        open_slide(tmp_path / "nope.svs")
    bad = tmp_path / "bad.tiff"
    bad.write_bytes(b"this is not a slide")
    with pytest.raises(HistobenchError, match=r"cannot open slide .*bad\.tiff"):
        open_slide(bad)
    with pytest.raises(HistobenchError, match="mpp"):
        open_slide(bad, mpp=-1)


def test_mpp_override_and_unknown_mpp(tmp_path, synth):
    path, _ = synth
    with open_slide(path, mpp=0.5) as s:
        assert s.mpp == 0.5
    # a tiled TIFF without resolution tags: no mpp, a helpful error naming the slide
    import tifffile

    plain = tmp_path / "plain.tiff"
    data = np.full((256, 256, 3), 200, np.uint8)
    with tifffile.TiffWriter(plain) as tw:
        tw.write(data, tile=(128, 128), photometric="rgb", compression="jpeg", metadata=None)
    with open_slide(plain) as s:
        with pytest.raises(HistobenchError, match=r"plain\.tiff.*--mpp"):
            _ = s.mpp
    with open_slide(plain, mpp=0.3) as s:
        assert s.mpp == 0.3


def test_read_region_composites_transparent_on_white(synth):
    path, _ = synth
    with open_slide(path) as s:
        outside = s.read_region(2000, 2000, 0, 16, 16)  # beyond the image: transparent
        assert outside.shape == (16, 16, 3)
        assert (outside == 255).all()
        thumb, ds = s.thumbnail(300)
        assert max(thumb.shape[:2]) == 300 and thumb.shape[2] == 3
        assert ds == pytest.approx(1024 / 300, rel=1e-2)


# ---------------------------------------------------------------------------------------------------------------
# tissue
# ---------------------------------------------------------------------------------------------------------------
def test_otsu_threshold_splits_two_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(30, 5, 1000), rng.normal(150, 10, 1000)])
    t = otsu_threshold(values)
    assert 40 < t < 130
    assert (values[:1000] < t).mean() > 0.99 and (values[1000:] >= t).all()
    assert otsu_threshold(np.full(100, 7.0)) is None or otsu_threshold(np.full(100, 7.0)) >= 7
    assert otsu_threshold(np.array([])) is None


def test_tissue_mask_on_synthetic_thumbnail(synth):
    path, info = synth
    with open_slide(path) as s:
        thumb, _ = s.thumbnail(512)
    mask = tissue_mask(thumb)
    assert mask.shape == thumb.shape[:2] and mask.dtype == bool
    assert abs(mask.mean() - info["tissue_fraction"]) < 0.05


def test_tissue_mask_background_only():
    white = np.full((200, 300, 3), 255, np.uint8)
    assert not tissue_mask(white).any()
    rng = np.random.default_rng(1)
    glass = np.clip(242 + rng.normal(0, 3, (200, 300, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass).any()
    assert not tissue_mask(np.zeros((50, 50, 3), np.uint8)).any()
    assert tissue_mask(np.zeros((0, 0, 3), np.uint8)).shape == (0, 0)


def test_tissue_mask_drops_small_specks():
    img = np.full((400, 400, 3), 245, np.uint8)
    img[100:300, 100:300] = (200, 120, 180)  # tissue
    img[10:13, 10:13] = (200, 120, 180)  # dust: 9 px < 0.1% of 160000
    mask = tissue_mask(img)
    assert mask[150:250, 150:250].all()
    assert not mask[:50, :50].any()


# ---------------------------------------------------------------------------------------------------------------
# tiling
# ---------------------------------------------------------------------------------------------------------------
def test_choose_level():
    ds = (1.0, 2.0, 4.0, 8.0)
    assert choose_level(ds, 2.0) == 1
    assert choose_level(ds, 3.9) == 1  # never read coarser than the target
    assert choose_level(ds, 4.1) == 2
    assert choose_level(ds, 0.5) == 0
    assert choose_level((1.0, 2.0003, 4.001), 2.0) == 1  # scanner rounding


def test_tile_slide_at_half_micron(synth):
    path, _ = synth
    with open_slide(path) as s:
        ts = tile_slide(s, mpp=0.5, tile_size=64, min_tissue=0.5)
        # slide 0.25 µm/px, pyramid downsamples 1, 2, 4: a 64 px tile at 0.5 µm/px is read from level 1 as 64 px
        assert ts.level == 1
        assert ts.read_size == 64
        assert ts.tile_size_level0 == pytest.approx(128)
        assert len(ts) > 0
        assert ts.coords.dtype == np.int64 and ts.coords.shape == (len(ts), 2)
        assert ts.tissue_fraction.dtype == np.float32
        assert (ts.tissue_fraction >= 0.5).all()
        assert (ts.coords % 128 == 0).all()  # non-overlapping grid
        assert (ts.coords[:, 0] + 128 <= 1024).all() and (ts.coords[:, 1] + 128 <= 768).all()
        assert len({tuple(c) for c in ts.coords}) == len(ts)
        assert ts.key() == "mpp0.5_px64_tis0.5"
        tile = read_tile(s, ts, 0)
        assert tile.shape == (64, 64, 3) and tile.dtype == np.uint8
        # a tile with tissue is not white
        best = int(np.argmax(ts.tissue_fraction))
        assert read_tile(s, ts, best).mean() < 230

        loose = tile_slide(s, mpp=0.5, tile_size=64, min_tissue=0.0)
        assert len(loose) == (1024 // 128) * (768 // 128)
        assert len(loose) > len(ts)

        # 1 µm/px, 48 px: read from level 2 (ds 4) at 48 px; 0.75 µm/px: level 1 at 72 px, downsampled to 48
        t1 = tile_slide(s, mpp=1.0, tile_size=48)
        assert (t1.level, t1.read_size) == (2, 48)
        t2 = tile_slide(s, mpp=0.75, tile_size=48)
        assert (t2.level, t2.read_size) == (1, 72)
        assert read_tile(s, t2, 0).shape == (48, 48, 3)


def test_tileset_save_load_roundtrip(tmp_path, synth):
    path, _ = synth
    with open_slide(path) as s:
        ts = tile_slide(s, mpp=0.5, tile_size=64)
    out = ts.save(tmp_path / "tiles" / f"{ts.slide_id}.{ts.key()}.npz")
    assert out.exists() and not list(out.parent.glob("*.tmp"))
    back = TileSet.load(out)
    assert back.slide_id == ts.slide_id
    assert np.array_equal(back.coords, ts.coords) and back.coords.dtype == np.int64
    assert np.array_equal(back.tissue_fraction, ts.tissue_fraction)
    assert (back.level, back.read_size, back.tile_size, back.mpp, back.min_tissue) == (
        ts.level, ts.read_size, ts.tile_size, ts.mpp, ts.min_tissue)
    assert back.key() == ts.key()
    with pytest.raises(HistobenchError, match="does not exist"):
        TileSet.load(tmp_path / "missing.npz")


def test_select_tiles_is_deterministic_and_ordered():
    n = 50
    ts = TileSet("s", np.arange(2 * n).reshape(n, 2), 0, 64, 64, 0.5, np.linspace(0.5, 1, n))
    a = select_tiles(ts, 10, seed=1)
    b = select_tiles(ts, 10, seed=1)
    c = select_tiles(ts, 10, seed=2)
    assert len(a) == 10 and np.array_equal(a.coords, b.coords)
    assert not np.array_equal(a.coords, c.coords)
    assert (np.diff(a.coords[:, 0]) > 0).all()  # original order kept
    assert select_tiles(ts, 0, seed=1) is ts and select_tiles(ts, 100, seed=1) is ts


# ---------------------------------------------------------------------------------------------------------------
# demo cohort
# ---------------------------------------------------------------------------------------------------------------
def test_make_demo_cohort(tmp_path):
    out = tmp_path / "demo"
    kw = dict(classes=["LUAD", "LUSC"], n_patients=6, seed=3, size=(256, 256), mpp=0.25)
    df = make_demo_cohort(out, **kw)
    assert list(df.columns) == ["slide_id", "case_id", "path", "label"]
    assert df["case_id"].nunique() == 6
    per_patient = df.groupby("case_id").size()
    assert sorted(per_patient.tolist()) == [1, 1, 1, 1, 2, 3]  # pattern (1, 1, 1, 2, 3) cycled
    labels = df.groupby("case_id")["label"].agg(lambda s: s.iloc[0] if s.nunique() == 1 else "MIXED")
    assert "MIXED" not in set(labels)
    assert labels.value_counts().to_dict() == {"LUAD": 3, "LUSC": 3}
    assert df["slide_id"].iloc[0] == "DEMO-0001-01" and df["case_id"].iloc[0] == "DEMO-0001"
    assert (df["slide_id"].str.slice(0, 9) == df["case_id"]).all()
    for rel in df["path"]:
        assert (out / rel).exists() and rel.startswith("slides/")
    with open_slide(out / df["path"].iloc[0]) as s:
        assert s.level_count >= 3 and s.mpp == pytest.approx(0.25, abs=1e-3)
    assert (out / "manifest.csv").exists()
    params = json.loads((out / "demo_params.json").read_text())
    assert params["n_patients"] == 6

    # idempotent: same parameters, nothing rewritten
    mtimes = {p: (out / p).stat().st_mtime_ns for p in df["path"]}
    again = make_demo_cohort(out, **kw)
    assert again.equals(df)
    assert {p: (out / p).stat().st_mtime_ns for p in df["path"]} == mtimes

    # forced classes
    forced = make_demo_cohort(tmp_path / "forced", **{**kw, "n_patients": 3}, class_indices=[1, 1, 0])
    assert forced.groupby("case_id")["label"].first().tolist() == ["LUSC", "LUSC", "LUAD"]
    with pytest.raises(HistobenchError, match="class_indices"):
        make_demo_cohort(tmp_path / "bad", **{**kw, "n_patients": 2}, class_indices=[0])


# ---------------------------------------------------------------------------------------------------------------
# real slides (tests/data/slides)
# ---------------------------------------------------------------------------------------------------------------
@needs_real
def test_real_aperio_svs():
    with open_slide(REAL / "CMU-1-Small-Region.svs") as s:
        assert s.vendor == "aperio"
        assert s.mpp == pytest.approx(0.499, abs=1e-3)
        assert s.dimensions == (2220, 2967)
        assert s.objective_power == 20
        thumb, ds = s.thumbnail(512)
        mask = tissue_mask(thumb)
        assert 0.15 < mask.mean() < 0.6
        ts = tile_slide(s, mpp=1.0, tile_size=64)
        assert ts.level == 0 and ts.read_size == 128  # single-level SVS: read 128 px and downsample
        assert len(ts) > 20
        assert read_tile(s, ts, len(ts) // 2).shape == (64, 64, 3)


@needs_real
def test_real_dicom_one_file():
    dcm = sorted((REAL / "CMU-1-Small-Region-dicom").glob("*.dcm"))[0]
    with open_slide(dcm) as s:
        assert s.vendor == "dicom"
        assert s.mpp == pytest.approx(0.499, abs=1e-3)
        assert s.dimensions == (2220, 2967)
        assert s.level_count > 3
        assert s.objective_power is None
        assert s.read_region(0, 0, 1, 32, 32).shape == (32, 32, 3)


@needs_real
def test_real_ndpi_fluorescence():
    with open_slide(REAL / "ndpi-fluorescence" / "test3-DAPI-2.ndpi") as s:
        assert s.vendor == "hamamatsu"
        assert s.mpp == pytest.approx(0.228, abs=1e-3)
        assert s.level_count == 7
        thumb, _ = s.thumbnail(256)
        mask = tissue_mask(thumb)  # dark background, not H&E: must not crash, nor call everything tissue
        assert mask.mean() < 0.9


# ---------------------------------------------------------------------------------------------------------------
# slide info, vendor formats, DICOM folders, tissue edge cases, the slides CLI
# ---------------------------------------------------------------------------------------------------------------
@needs_real
@pytest.mark.parametrize(
    "rel, vendor, levels, mpp, mag",
    [
        ("CMU-1-Small-Region.svs", "aperio", 1, 0.499, (20.0, "openslide.objective-power")),
        ("CMU-1-Small-Region-dicom", "dicom", 12, 0.499, (20.0, "estimated from µm/px")),
        ("ndpi-fluorescence/test3-DAPI-2.ndpi", "hamamatsu", 7, 0.228, (40.0, "openslide.objective-power")),
    ],
)
def test_real_slide_info(rel, vendor, levels, mpp, mag):
    with open_slide(REAL / rel) as s:
        info = s.info()
    assert info["vendor"] == vendor and info["levels"] == levels
    assert info["mpp"] == pytest.approx(mpp, abs=1e-3) and info["mpp_source"] == "openslide.mpp-x/y"
    assert (info["magnification"], info["magnification_source"]) == mag
    if vendor == "aperio":
        assert set(info["associated_images"]) == {"label", "macro", "thumbnail"}
    assert (info["colour_warning"] is not None) == (vendor == "dicom")


@needs_real
def test_dicom_folder_opens_as_one_slide_and_tiles_like_the_svs():
    with open_slide(REAL / "CMU-1-Small-Region-dicom") as d, open_slide(REAL / "CMU-1-Small-Region.svs") as a:
        assert d.slide_id == "CMU-1-Small-Region-dicom" and d.dimensions == a.dimensions
        td = tile_slide(d, mpp=1.0, tile_size=64)
        ta = tile_slide(a, mpp=1.0, tile_size=64)
        # same physical tile on both: the pyramid's 2x level is read as is, the single-level SVS is downsampled
        assert td.tile_size_level0 == pytest.approx(ta.tile_size_level0)
        assert td.level == 1 and td.read_size == 64 and ta.level == 0 and ta.read_size == 128
        assert read_tile(d, td, 0).shape == read_tile(a, ta, 0).shape == (64, 64, 3)


def test_open_folder_without_dicom(tmp_path):
    with pytest.raises(HistobenchError, match="folder without .dcm files"):
        open_slide(tmp_path)


def test_mpp_fallbacks_from_vendor_keys():
    from histobench.slides.reader import _mpp_from_tiff_resolution, _mpp_from_vendor_keys

    assert _mpp_from_vendor_keys({"aperio.MPP": "0.2520"}) == pytest.approx(0.252)
    key = "dicom.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[{}]"
    assert _mpp_from_vendor_keys({key.format(0): "0.00025", key.format(1): "0.00025"}) == pytest.approx(0.25)
    assert _mpp_from_vendor_keys({}) is None
    assert _mpp_from_tiff_resolution({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "72"}) is None  # a screen dpi


def test_pen_marks_and_black_borders_are_not_tissue():
    from histobench.slides.tissue import pen_mask, slide_kind

    img = np.full((200, 200, 3), 240, dtype=np.uint8)
    img[50:150, 50:150] = (200, 120, 170)  # H&E-ish tissue
    img[10:30, :] = (40, 60, 200)  # blue pen line
    img[170:190, :] = (40, 160, 60)  # green pen line
    img[:, :8] = 5  # black slide edge
    mask = tissue_mask(img)
    assert mask[60:140, 60:140].all()
    assert not mask[10:30, 60:140].any() and not mask[170:190].any() and not mask[:, :8].any()
    assert pen_mask(img)[20, 100] and not pen_mask(img)[100, 100]
    assert slide_kind(img) == "brightfield"
    assert slide_kind(np.full((20, 20, 3), 250, np.uint8)) == "empty"


@needs_real
def test_fluorescence_slide_is_detected_and_masked():
    from histobench.slides.tissue import slide_kind

    with open_slide(REAL / "ndpi-fluorescence" / "test3-DAPI-2.ndpi") as s:
        thumb, _ = s.thumbnail(512)
    assert slide_kind(thumb) == "fluorescence"
    mask = tissue_mask(thumb)
    assert 0.4 < mask.mean() < 0.95  # the nuclei-stained section, not the black background
    assert not mask[-5:, -5:].any()


@needs_real
def test_real_svs_tissue_mask_is_the_section():
    from histobench.slides.tissue import slide_kind

    with open_slide(REAL / "CMU-1-Small-Region.svs") as s:
        thumb, _ = s.thumbnail(512)
    assert slide_kind(thumb) == "brightfield"
    mask = tissue_mask(thumb)
    assert 0.25 < mask.mean() < 0.5 and not mask[:40, :40].any()  # glass in the top-left corner


@needs_real
def test_slides_cli_info_and_tile(tmp_path):
    from typer.testing import CliRunner

    from histobench.cli.app import build_app

    runner = CliRunner()
    res = runner.invoke(build_app(), ["slides", "info", str(REAL / "ndpi-fluorescence" / "test3-DAPI-2.ndpi")])
    assert res.exit_code == 0, res.output
    for text in ("vendor: hamamatsu", "levels: 7", "mpp: 0.2282", "magnification: 40x", "fluorescence"):
        assert text in res.output
    res = runner.invoke(build_app(), ["slides", "info", str(REAL / "CMU-1-Small-Region-dicom")])
    assert "vendor: dicom" in res.output and "levels: 12" in res.output and "mpp: 0.499" in res.output
    out = tmp_path / "grid.png"
    res = runner.invoke(build_app(), ["slides", "tile", str(REAL / "CMU-1-Small-Region.svs"), "--mpp", "0.5",
                                      "--size", "256", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "32 tiles of 256 px at 0.5 µm/px" in res.output and out.exists()
    res = runner.invoke(build_app(), ["slides", "info", str(tmp_path / "none.svs")])
    assert res.exit_code == 2 and "no such file" in res.output


def test_slide_fingerprint_follows_content_not_name_or_time(tmp_path):
    import shutil

    from histobench.slides.tiling import slide_fingerprint

    a, b = tmp_path / "a.tiff", tmp_path / "b.tiff"
    write_synthetic_slide(a, class_index=0, n_classes=2, seed=1, size=(512, 512), mpp=0.5)
    write_synthetic_slide(b, class_index=0, n_classes=2, seed=2, size=(512, 512), mpp=0.5)
    copy = tmp_path / "copy" / "a.tiff"
    copy.parent.mkdir()
    shutil.copy(a, copy)  # new modification time, same bytes
    assert slide_fingerprint(copy) == slide_fingerprint(a) != slide_fingerprint(b)
    dicom = REAL / "CMU-1-Small-Region-dicom"
    if dicom.is_dir():
        assert len(slide_fingerprint(dicom)) == 16


def test_tile_set_keeps_its_source_and_old_files_load_without_one(tmp_path):
    ts = TileSet("s", np.zeros((2, 2)), 0, 64, 64, 1.0, np.ones(2), source="abc")
    assert TileSet.load(ts.save(tmp_path / "t.npz")).source == "abc"
    with np.load(tmp_path / "t.npz") as z:  # a tile file written before sources were recorded
        np.savez(tmp_path / "old.npz", **{k: z[k] for k in z.files if k != "source"})
    assert TileSet.load(tmp_path / "old.npz").source == ""
