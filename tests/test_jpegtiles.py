"""Direct JPEG-tile reads (histobench.slides.jpegtiles) against openslide: pixels, edges, eligibility, caching.

Measured on this project's environment (torchvision 0.29 and openslide-bin 4.0.1, both libjpeg-turbo): the direct
path gives bit-identical pixels to openslide, on the synthetic YCbCr 4:2:0 TIFF and on CMU-1's RGB (Adobe-less)
Aperio JPEG, edges included (max |difference| 0). The tolerances below (max 2 levels, mean 0.05) leave room for
a differently built libjpeg only; decoding CMU-1's tiles in the wrong colour space (no APP14 marker) differs by
about 50 levels on average, which the negative control checks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from histobench.pretrain.data import SlideTileDataset, SlideTiles, collate_tiles
from histobench.slides.jpegtiles import JpegTiles, NotEligible, decode_cpu, jpeg_tiles_or_reason, open_jpeg_tiles
from histobench.slides.reader import open_slide
from histobench.slides.tiling import TileSet, read_tile, tile_slide

DATA = Path(__file__).parent / "data" / "slides"
CMU = DATA / "CMU-1-Small-Region.svs"
MAX_DIFF, MEAN_DIFF = 2, 0.05


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """1300 x 1100 px, 256 px JPEG tiles, levels 1300x1100, 650x550, 325x275, 162x137 (downsample 8.03)."""
    from histobench.slides.synthetic import render_synthetic, write_tiff_pyramid

    rgb, _, _ = render_synthetic(class_index=1, n_classes=2, seed=3, size=(1300, 1100), mpp=0.5)
    path = tmp_path_factory.mktemp("jpegtiles") / "syn.tiff"
    write_tiff_pyramid(path, rgb, mpp=0.5, tile=256)
    return path


def _tileset(coords, level: int, read_size: int, tile_size: int | None = None) -> TileSet:
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    return TileSet(slide_id="t", coords=coords, level=level, read_size=read_size,
                   tile_size=tile_size or read_size, mpp=1.0, tissue_fraction=np.ones(len(coords)))


def _compare(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(d.max()), float(d.mean())


def _assert_same_tiles(path: Path, tiles: TileSet) -> JpegTiles:
    with open_slide(path) as slide:
        reader = open_jpeg_tiles(slide)
        for i in range(len(tiles)):
            direct = reader.read_tile(tiles, i)
            assert direct is not None, f"tile {i} at {tiles.coords[i]} fell back"
            ref = read_tile(slide, tiles, i)
            assert direct.shape == ref.shape == (tiles.tile_size, tiles.tile_size, 3)
            worst, mean = _compare(direct, ref)
            assert worst <= MAX_DIFF and mean <= MEAN_DIFF, (i, tiles.coords[i], worst, mean)
    return reader


# -------------------------------------------------------------------------------------------------- mapping


def test_levels_map_to_tiff_pages(synthetic):
    with open_slide(synthetic) as slide:
        reader = open_jpeg_tiles(slide)
    assert sorted(reader.levels) == [0, 1, 2, 3]
    assert [(lv.width, lv.height) for lv in reader.levels.values()] == [(1300, 1100), (650, 550), (325, 275), (162, 137)]
    assert all(reader.tile_shape(k) == (256, 256) for k in range(4))
    assert (reader.levels[0].cols, reader.levels[0].rows) == (6, 5)
    with open_slide(CMU) as slide:
        cmu = open_jpeg_tiles(slide)
    assert sorted(cmu.levels) == [0] and cmu.tile_shape(0) == (240, 240)
    assert (cmu.levels[0].cols, cmu.levels[0].rows) == (10, 13)  # 2220 x 2967 px: partial tiles on both edges


def test_streams_are_complete_and_marked_with_the_colour_space(synthetic):
    with open_slide(CMU) as slide:
        cmu = open_jpeg_tiles(slide)
    stream = cmu.jpeg_stream(0, 2, 3)
    assert stream[:2] == b"\xff\xd8" and stream[-2:] == b"\xff\xd9"
    assert stream[2:18] == b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"  # transform 0: RGB, as openslide
    assert stream.count(b"\xff\xdb") >= 1 and stream.count(b"\xff\xc4") >= 2  # the page's JPEGTables merged in
    with open_slide(synthetic) as slide:
        syn = open_jpeg_tiles(slide)
    stream = syn.jpeg_stream(1, 0, 0)
    assert stream[2:18] == b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x01"  # photometric YCbCr: transform 1
    assert b"JFIF\x00" not in stream[:200]
    assert decode_cpu(stream).shape == (256, 256, 3)


def test_wrong_colour_space_would_be_far_off():
    """Negative control for the tolerances: CMU-1's RGB JPEG decoded as libjpeg guesses by default (YCbCr)."""
    with open_slide(CMU) as slide:
        reader = open_jpeg_tiles(slide)
        stream = reader.jpeg_stream(0, 3, 4)
        guessed = decode_cpu(b"\xff\xd8" + stream[18:])  # without the APP14 marker
        right = decode_cpu(stream)
        ref = slide.read_region(3 * 240, 4 * 240, 0, 240, 240)
    assert _compare(right, ref)[1] <= MEAN_DIFF
    assert _compare(guessed, ref)[1] > 20


@pytest.mark.parametrize("path, reason", [
    (DATA / "ndpi-fluorescence" / "test3-DAPI-2.ndpi", "hamamatsu"),
    (DATA / "CMU-1-Small-Region-dicom", "dicom"),
])
def test_other_formats_are_refused_with_a_reason(path, reason):
    with open_slide(path) as slide:
        reader, why = jpeg_tiles_or_reason(slide)
        assert reader is None and reason in why and "openslide" in why
        with pytest.raises(NotEligible):
            open_jpeg_tiles(slide)


def test_non_jpeg_pages_are_refused(tmp_path):
    import tifffile

    rgb = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    path = tmp_path / "deflate.tiff"
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, tile=(256, 256), compression="zlib", photometric="rgb", metadata=None)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.vendor == "generic-tiff"
        reader, why = jpeg_tiles_or_reason(slide)
    assert reader is None and "compression 8 is not JPEG" in why


# ------------------------------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("level", [0, 1, 2])
def test_aligned_tiles_match_openslide(synthetic, level):
    with open_slide(synthetic) as slide:
        w, h = slide.level_dimensions[level]
        ds = round(slide.level_downsamples[level])
    coords = [(c * 256 * ds, r * 256 * ds) for r in range(h // 256) for c in range(w // 256)]
    tiles = _tileset(coords, level, 256)
    reader = _assert_same_tiles(synthetic, tiles)
    assert reader.is_aligned(tiles)


def test_unaligned_tiles_and_edges_match_openslide(synthetic):
    # level 0: offsets inside a tile, straddling 4 file tiles, touching and crossing the right/bottom edges
    # (1300 x 1100; the last file column/row is partial: 20 and 76 px of 256)
    coords = [(0, 0), (37, 11), (200, 230), (1300 - 192, 1100 - 192), (1300 - 100, 1100 - 50), (1250, 0),
              (0, 1000), (1024, 768), (1290, 1090)]
    _assert_same_tiles(synthetic, _tileset(coords, 0, 192))
    # level 1 (650 x 550, downsample 2): even level-0 coordinates are whole level-1 pixels
    coords = [(2 * 13, 2 * 7), (2 * 500, 2 * 400), (2 * 600, 2 * 520), (2 * 255, 2 * 255)]
    _assert_same_tiles(synthetic, _tileset(coords, 1, 128))
    # resized like read_tile: BOX when shrinking, BILINEAR when enlarging
    _assert_same_tiles(synthetic, _tileset([(10, 20), (1000, 900)], 0, 300, 224))
    _assert_same_tiles(synthetic, _tileset([(10, 20), (1200, 1000)], 0, 100, 128))


def test_cmu1_tiles_match_openslide():
    with open_slide(CMU) as slide:
        tiles = tile_slide(slide, mpp=slide.mpp, tile_size=240, min_tissue=0.0)  # one file tile each
    assert len(tiles) == 9 * 12
    reader = _assert_same_tiles(CMU, tiles)
    assert reader.is_aligned(tiles)
    # unaligned, with the partial last column (2220 = 9 * 240 + 60) and row (2967 = 12 * 240 + 87)
    coords = [(100, 50), (2220 - 224, 2967 - 224), (2220 - 50, 1000), (500, 2967 - 10), (2100, 2900)]
    _assert_same_tiles(CMU, _tileset(coords, 0, 224))


def test_fractional_level_positions_fall_back(synthetic):
    """Level 3 has downsample 8.027: level-0 coordinates land between level pixels, where openslide resamples
    through cairo; the direct path declines those reads and the dataset reads them with openslide."""
    tiles = _tileset([(0, 0), (80, 40)], 3, 64)
    with open_slide(synthetic) as slide:
        reader = open_jpeg_tiles(slide)
        assert reader.read_tile(tiles, 1) is None
        assert reader.read_tile(tiles, 0) is not None  # (0, 0) is a whole pixel at every level
        ref = [read_tile(slide, tiles, i) for i in range(2)]
    ds = SlideTileDataset([SlideTiles("syn", synthetic, tiles)], decode="jpeg")
    got = [ds.read(i) for i in range(2)]
    assert ds.fallbacks == 1
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


def test_is_aligned(synthetic):
    with open_slide(synthetic) as slide:
        reader = open_jpeg_tiles(slide)
    assert reader.is_aligned(_tileset([(0, 0), (256, 512)], 0, 256))
    assert reader.is_aligned(_tileset([(512, 512)], 1, 256))  # level 1 pixel (256, 256)
    assert not reader.is_aligned(_tileset([(0, 0), (16, 0)], 0, 256))  # off the grid
    assert not reader.is_aligned(_tileset([(0, 0)], 0, 128))  # smaller than a file tile
    assert not reader.is_aligned(_tileset([(1280, 0)], 0, 256))  # the partial last column: white beyond 1300
    assert not reader.is_aligned(_tileset([(0, 0)], 3, 256))  # larger than the level


# -------------------------------------------------------------------------------------------------- cache


def test_row_ordered_reads_decode_each_file_tile_once(synthetic):
    with open_slide(synthetic) as slide:
        reader = open_jpeg_tiles(slide)
    aligned = _tileset([(c * 256, r * 256) for r in range(4) for c in range(5)], 0, 256)
    for i in range(len(aligned)):
        reader.read_tile(aligned, i)
    assert reader.decodes == 20
    for i in range(len(aligned)):  # all cached now
        reader.read_tile(aligned, i)
    assert reader.decodes == 20

    reader = JpegTiles(reader.path, reader.levels, reader.reasons, reader.level_downsamples)
    # 200 px tiles from (50, 30): 6 columns x 5 rows straddling file tile borders, covering 5 x 5 file tiles
    coords = [(50 + 200 * c, 30 + 200 * r) for r in range(5) for c in range(6)]
    tiles = _tileset(coords, 0, 200)
    needed = {((x + dx) // 256, (y + dy) // 256) for x, y in coords for dx in (0, 199) for dy in (0, 199)
              if x + dx < 1300 and y + dy < 1100}
    for i in range(len(tiles)):
        assert reader.read_tile(tiles, i) is not None
    assert reader.decodes == len(needed) == 25  # each once, though most are read by 2 to 4 tiles


# ------------------------------------------------------------------------------------------------ dataset


def test_dataset_jpeg_mode_matches_openslide_and_falls_back_per_slide(synthetic):
    ndpi = DATA / "ndpi-fluorescence" / "test3-DAPI-2.ndpi"
    slides = []
    for sid, path in (("syn", synthetic), ("cmu", CMU), ("ndpi", ndpi)):
        with open_slide(path) as s:
            tiles = tile_slide(s, mpp=s.mpp * 2, tile_size=96, min_tissue=0.0)
        slides.append(SlideTiles(sid, path, TileSet(**{**tiles.__dict__, "coords": tiles.coords[:12],
                                                       "tissue_fraction": tiles.tissue_fraction[:12]})))
    ref = SlideTileDataset(slides)
    direct = SlideTileDataset(slides, decode="jpeg")
    checks = direct.check_jpeg()
    assert checks[0] == (None, False) and checks[1] == (None, False)
    assert "hamamatsu" in checks[2][0] and 2 in direct.jpeg_reasons
    loader = torch.utils.data.DataLoader(direct, batch_size=8, num_workers=2)  # pickled into workers
    got = torch.cat([b[0] for b in loader])
    want = torch.stack([ref[i][0] for i in range(len(ref))])
    assert got.shape == want.shape
    d = (got.int() - want.int()).abs()
    assert d.max().item() <= MAX_DIFF and d.float().mean().item() <= MEAN_DIFF
    for i in range(len(direct)):
        direct[i]
    assert direct.fallbacks == 12  # only the NDPI slide's tiles


def test_dataset_jpeg_bytes_mode(synthetic):
    with open_slide(synthetic) as s:
        whole = tile_slide(s, mpp=s.mpp, tile_size=256, min_tissue=0.0)  # 5 x 4 whole file tiles
        resized = tile_slide(s, mpp=s.mpp * 2, tile_size=128, min_tissue=0.0)  # 256 px read, resized
    slides = [SlideTiles("whole", synthetic, whole), SlideTiles("resized", synthetic, resized)]
    ds = SlideTileDataset(slides, decode="jpeg-bytes")
    assert [w for _, w in ds.check_jpeg()] == [True, False]
    ref = SlideTileDataset(slides)
    items = [ds[i] for i in range(len(ds))]
    tiles, slide_idx, _ = collate_tiles(items)
    assert slide_idx.tolist() == ref.slide_index.tolist()
    n_whole = len(whole)
    assert all(t.dim() == 1 for t in tiles[:n_whole]) and all(t.dim() == 3 for t in tiles[n_whole:])
    for i, t in enumerate(tiles):
        pixels = torch.from_numpy(decode_cpu(t.numpy().tobytes())).permute(2, 0, 1) if t.dim() == 1 else t
        assert (pixels.int() - ref[i][0].int()).abs().max().item() <= MAX_DIFF


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("which", ["synthetic", "cmu"])
def test_nvjpeg_matches_cpu_and_openslide(synthetic, which):
    """nvJPEG rounds its IDCT and chroma upsampling its own way: a few levels apart from libjpeg-turbo, never
    tens (a wrong colour space). These bounds are not measured yet (no GPU where this was written)."""
    from histobench.slides.jpegtiles import decode_batch_cuda

    path, size = (synthetic, 256) if which == "synthetic" else (CMU, 240)
    with open_slide(path) as slide:
        tiles = tile_slide(slide, mpp=slide.mpp, tile_size=size, min_tissue=0.0)
        reader = open_jpeg_tiles(slide)
        streams = [reader.tile_jpeg(tiles, i) for i in range(len(tiles))]
        assert all(s is not None for s in streams)
        ref = np.stack([read_tile(slide, tiles, i) for i in range(len(tiles))])
    cpu = np.stack([reader.read_tile(tiles, i) for i in range(len(tiles))])
    batch = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
    batch[-1] = torch.from_numpy(np.ascontiguousarray(ref[-1].transpose(2, 0, 1)))  # a pixel tile among streams
    gpu = decode_batch_cuda(batch, "cuda").permute(0, 2, 3, 1).cpu().numpy()
    assert gpu.shape == ref.shape
    np.testing.assert_array_equal(gpu[-1], ref[-1])
    for other in (cpu, ref):
        worst, mean = _compare(gpu[:-1], other[:-1])
        assert mean <= 1.5 and worst <= 48, (worst, mean)
