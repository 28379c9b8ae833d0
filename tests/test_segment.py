"""The segmentation stage: synthetic nuclei sidecars, the oracle, the per-slide cache and its runner, the CLI."""

import json
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from pydantic import Field
from typer.testing import CliRunner

from histobench import hookimpl
from histobench.components import Segmenter, TileRef
from histobench.errors import HistobenchError
from histobench.pretrain.data import SlideTiles
from histobench.registry import create
from histobench.segment import SegmentationCache, segment_cohort
from histobench.segment.cache import cache_root
from histobench.slides import synthetic
from histobench.slides.reader import open_slide
from histobench.slides.tiling import tile_slide


# ------------------------------------------------------------------------------------------ test segmenters
class FlakySegmenter(Segmenter):
    """Thresholds dark pixels into one nucleus; raises on the tile at (fail_x, fail_y) of slide fail_slide."""

    name = "test-flaky"

    class Options(Segmenter.Options):
        fail_slide: str = ""
        fail_x: int = -1
        fail_y: int = -1

    def segment(self, tile, ref=None):
        if (ref.slide_id, ref.x, ref.y) == (self.options.fail_slide, self.options.fail_x, self.options.fail_y):
            raise RuntimeError("simulated failure\nwith a second line that must not be kept")
        return (tile.mean(axis=2) < 120).astype(np.uint16), None


class PidSegmenter(Segmenter):
    """An own-process segmenter that records, at setup, its process id and whether torch is imported there."""

    name = "test-pid"
    own_process = True

    class Options(Segmenter.Options):
        record_dir: str = Field("", description="where setup() writes <pid>.json")

    def setup(self):
        Path(self.options.record_dir, f"{os.getpid()}.json").write_text(
            json.dumps({"pid": os.getpid(), "torch": "torch" in sys.modules}))

    def segment(self, tile, ref=None):
        return (tile.mean(axis=2) < 120).astype(np.uint16), None


class StopSegmenter(Segmenter):
    """Raises a HistobenchError (which stops the run) on slide ``stop_on`` (a class attribute, not an option,
    so the identity, and so the cache folder, stays the same when it is changed)."""

    name = "test-stop"
    stop_on: ClassVar[str] = ""

    def segment(self, tile, ref=None):
        if ref.slide_id == type(self).stop_on:
            raise HistobenchError(f"stopped at {ref.slide_id}")
        return (tile.mean(axis=2) < 120).astype(np.uint16), None


class _Plugin:
    @hookimpl
    def register_segmenters(self, register):
        register(FlakySegmenter)
        register(PidSegmenter)
        register(StopSegmenter)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Three small synthetic slides (0.5 µm/px) tiled at 1 µm/px into 32 px tiles."""
    root = tmp_path_factory.mktemp("slides")
    out = []
    for i in range(3):
        path = root / f"slide-{'abc'[i]}.tiff"
        synthetic.write_synthetic_slide(path, class_index=i % 2, n_classes=2, seed=20 + i, size=(384, 320), mpp=0.5,
                                        signal_fraction=0.5)
        with open_slide(path) as s:
            tiles = tile_slide(s, mpp=1.0, tile_size=32, min_tissue=0.3)
        tiles.source = "fp-" + path.stem
        out.append(SlideTiles(path.stem, path, tiles))
    assert all(len(s.tiles) >= 3 for s in out)
    return out


# ------------------------------------------------------------------------------------------ synthetic truth
# sha256 of slides written by the generator before it recorded nuclei: the sidecars must not move a pixel
SLIDE_DIGESTS = {
    0: "ad82e62e91dc63075f759a7457a993aa8bdb767d977b68f31fc71f9441622974",
    1: "9c4c74e1c7ade8a8baf63d9d5f7f8591f617348a9f120ee8e7dd16395c47393e",
    2: "1832f2105db8cc5ef38e6c395f07b0c76e8f0d0d5f54a84495a07b3815fb9474",
}


@pytest.mark.parametrize("class_index", [0, 1, 2])
def test_sidecar_leaves_slide_bytes_unchanged(tmp_path, class_index):
    path = tmp_path / "s.tiff"
    info = synthetic.write_synthetic_slide(path, class_index=class_index, n_classes=3, seed=11 + class_index,
                                           size=(640, 512), mpp=0.5, signal_fraction=0.5)
    assert synthetic.file_digest(path) == SLIDE_DIGESTS[class_index]
    # and in this process: rendering with the nuclei recorder gives the very same pixels
    kw = dict(class_index=class_index, n_classes=3, seed=11 + class_index, size=(640, 512), mpp=0.5,
              signal_fraction=0.5)
    plain = synthetic.render_synthetic(**kw)[0]
    recorded = synthetic.render_synthetic(**kw, nuclei=synthetic.NucleusMap((512, 640)))[0]
    assert np.array_equal(plain, recorded)
    inst, types, mpp = synthetic.read_nuclei(synthetic.nuclei_sidecar(path))
    assert inst.shape == types.shape == (512, 640) and inst.dtype == np.uint16 and mpp == 0.5
    assert info["nuclei"] == inst.max() == len(np.unique(inst)) - 1 > 50  # ids 1..n, none hidden
    assert np.array_equal(inst > 0, types > 0)
    present = set(np.unique(types)) - {0}
    assert {1, 3} <= present <= {1, 2, 3}  # tumour and fibroblasts everywhere; lymphocytes where there is room
    # each nucleus has one type; nuclei are dark (haematoxylin) in the picture
    pairs = np.unique(np.stack([inst[inst > 0], types[inst > 0]]), axis=1)
    assert pairs.shape[1] == inst.max()
    gray = plain.mean(axis=2)
    assert gray[inst > 0].mean() < gray[(inst == 0) & (gray < 230)].mean() - 30


def test_cohort_regenerates_missing_sidecars_with_same_bytes(tmp_path):
    kw = dict(classes=["a", "b"], n_patients=2, seed=1, size=(256, 256), slides_per_patient=[1])
    df = synthetic.make_demo_cohort(tmp_path, **kw)
    slide = tmp_path / df["path"][0]
    digest = synthetic.file_digest(slide)
    synthetic.nuclei_sidecar(slide).unlink()  # a cohort made before sidecars existed
    synthetic.make_demo_cohort(tmp_path, **kw)
    assert synthetic.nuclei_sidecar(slide).exists() and synthetic.file_digest(slide) == digest


# ------------------------------------------------------------------------------------------------- oracle
def test_oracle_matches_sidecar(slides):
    s = slides[0]
    inst0, types0, mpp0 = synthetic.read_nuclei(synthetic.nuclei_sidecar(s.path))
    oracle = create("segmenter", "oracle")
    t = s.tiles
    side0 = int(round(t.tile_size * t.mpp / mpp0))
    assert side0 == 2 * t.tile_size  # 1 µm/px tiles of a 0.5 µm/px slide
    checked = 0
    for i in range(len(t)):
        x, y = (int(v) for v in t.coords[i])
        ref = TileRef(s.slide_id, s.path, x, y, t.level, t.read_size, t.tile_size, t.mpp)
        inst, types = oracle.segment(np.zeros((t.tile_size, t.tile_size, 3), np.uint8), ref)
        # nearest neighbour at 2x samples the level-0 pixel under each tile pixel's centre (as PIL does):
        # 2k + 1 for tile pixel k
        truth = inst0[y + 1:y + side0:2, x + 1:x + side0:2]
        ttruth = types0[y + 1:y + side0:2, x + 1:x + side0:2]
        assert inst.dtype == np.uint16 and inst.shape == truth.shape
        assert np.array_equal(inst > 0, truth > 0) and np.array_equal(types, ttruth)
        # the same partition, renumbered 1..n in the tile
        pairs = np.unique(np.stack([inst[inst > 0], truth[truth > 0]]), axis=1)
        assert pairs.shape[1] == len(np.unique(inst[inst > 0])) == len(np.unique(truth[truth > 0]))
        assert inst.max() == len(np.unique(inst)) - 1
        checked += int(inst.max() > 0)
    assert checked >= 2

    small = create("segmenter", "oracle", {"min_area": 12, "types": False})
    x, y = (int(v) for v in t.coords[0])
    ref = TileRef(s.slide_id, s.path, x, y, t.level, t.read_size, t.tile_size, t.mpp)
    full, _ = oracle.segment(np.zeros((32, 32, 3), np.uint8), ref)
    kept, none = small.segment(np.zeros((32, 32, 3), np.uint8), ref)
    assert none is None
    sizes = np.bincount(full.ravel())[1:]
    assert kept.max() == int((sizes >= 12).sum()) and np.bincount(kept.ravel())[1:].min(initial=99) >= 12


def test_oracle_without_sidecar_names_the_slide(tmp_path, slides):
    s = slides[0]
    lonely = tmp_path / "lonely.tiff"
    lonely.write_bytes(s.path.read_bytes())
    ref = TileRef("lonely-01", lonely, 0, 0, 0, 64, 32, 1.0)
    with pytest.raises(HistobenchError, match="slide lonely-01.*lonely.nuclei.npz"):
        create("segmenter", "oracle").segment(np.zeros((32, 32, 3), np.uint8), ref)
    # through the runner it stops the run with that line (it is a user mistake, not a bad tile)
    tiles = SlideTiles("lonely-01", lonely, s.tiles)
    with pytest.raises(HistobenchError, match="lonely-01"):
        segment_cohort(create("segmenter", "oracle"), [tiles], tmp_path / "w", workers=0)


def test_nucleus_features_agree_with_regionprops():
    from skimage.measure import regionprops

    from histobench.segment.features import COLUMNS, nucleus_features

    nuclei = synthetic.NucleusMap((256, 320))
    rgb = synthetic.render_synthetic(class_index=0, n_classes=2, seed=3, size=(320, 256), mpp=0.5,
                                     signal_fraction=0.6, nuclei=nuclei)[0]
    inst, types = nuclei.maps()
    f = nucleus_features(rgb, inst, types, 0.5, 7)
    props = regionprops(inst.astype(np.int32))
    assert set(f) == set(COLUMNS) and len(f["instance"]) == len(props) > 20
    assert (f["tile"] == 7).all() and f["instance"].tolist() == [r.label for r in props]
    np.testing.assert_array_equal(f["area_px"], [r.area for r in props])
    np.testing.assert_allclose(f["area_um2"], f["area_px"] * 0.25)
    np.testing.assert_allclose(np.stack([f["centroid_y"], f["centroid_x"]], 1), [r.centroid for r in props], atol=1e-3)
    np.testing.assert_array_equal(np.stack([f["bbox_y0"], f["bbox_x0"], f["bbox_y1"], f["bbox_x1"]], 1),
                                  [r.bbox for r in props])
    np.testing.assert_allclose(f["eccentricity"], [r.eccentricity for r in props], atol=1e-4)
    assert ((f["solidity"] > 0.3) & (f["solidity"] <= 1)).all()
    # the planted kinds differ as the DiRL grouping expects: lymphocytes round, fibroblasts elongated
    ecc = {k: f["eccentricity"][f["type"] == k].mean() for k in (2, 3)}
    assert ecc[2] < 0.6 < 0.9 < ecc[3]
    assert (f["h_od_mean"] > 0.05).all() and np.nanmean(f["e_ring_od_mean"]) > 0
    empty = nucleus_features(rgb, np.zeros_like(inst), None, 0.5, 0)
    assert all(len(v) == 0 for v in empty.values())


# --------------------------------------------------------------------------------------- cache and runner
def test_cache_roundtrip_hits_and_subset(tmp_path, slides):
    oracle = create("segmenter", "oracle")
    res = segment_cohort(oracle, slides, tmp_path, workers=0, chunk_tiles=4)
    n = sum(len(s.tiles) for s in slides)
    assert (res.slides, res.tiles, res.segmented, res.cached, res.failed) == (3, n, n, 0, 0)
    assert res.root == cache_root(tmp_path, oracle.identity(), slides[0].tiles.key())
    cache = SegmentationCache(res.root)
    assert cache.slide_ids() == sorted(s.slide_id for s in slides)

    s = slides[1]
    seg = cache.slide(s.slide_id, s.tiles)
    assert seg.instances.shape == (len(s.tiles), 32, 32) and seg.instances.dtype == np.uint16
    assert seg.types.dtype == np.uint8 and len(seg.failed) == 0
    for i in range(len(s.tiles)):  # exactly what the oracle gives for that tile
        x, y = (int(v) for v in s.tiles.coords[i])
        ref = TileRef(s.slide_id, s.path, x, y, s.tiles.level, s.tiles.read_size, 32, 1.0)
        inst, types = oracle.segment(np.zeros((32, 32, 3), np.uint8), ref)
        assert np.array_equal(seg.instances[i], inst) and np.array_equal(seg.types[i], types)
    # the nucleus table: one row per nucleus of every tile, with sane values
    table = seg.frame()
    per_tile = [int(seg.instances[i].max()) for i in range(len(s.tiles))]
    assert len(table) == sum(per_tile) == res.nuclei - sum(
        int(cache.slide(o.slide_id).meta["nuclei"]) for o in slides if o is not s)
    assert (table["area_px"] > 0).all() and np.allclose(table["area_um2"], table["area_px"] * 1.0)
    assert table["type"].isin([1, 2, 3]).all() and (table["h_od_mean"] > 0).all()
    assert table["eccentricity"].between(0, 1).all() and table["solidity"].between(0, 1.0001).all()
    first = table.iloc[0]
    mask = seg.instances[int(first["tile"])] == int(first["instance"])
    assert mask.sum() == first["area_px"]

    # a capped tile set (every other tile, reversed) reads the same maps by its own indices
    from dataclasses import replace

    capped = replace(s.tiles, coords=s.tiles.coords[::-2], tissue_fraction=s.tiles.tissue_fraction[::-2])
    sub = cache.slide(s.slide_id, capped)
    assert len(sub) == len(capped)
    inst, types = sub.batch([0, len(sub) - 1])
    assert np.array_equal(inst[0], seg.instances[len(s.tiles) - 1])
    assert set(sub.table["tile"]) <= set(range(len(sub)))

    again = segment_cohort(oracle, slides, tmp_path, workers=0)
    assert (again.cached, again.segmented, again.hit_rate, again.nuclei) == (n, 0, 1.0, res.nuclei)


def test_changed_option_resegments_every_tile(tmp_path, slides):
    n = sum(len(s.tiles) for s in slides)
    a = segment_cohort(create("segmenter", "oracle"), slides, tmp_path, workers=0)
    b = segment_cohort(create("segmenter", "oracle", {"min_area": 10}), slides, tmp_path, workers=0)
    assert a.root != b.root and b.segmented == n and b.cached == 0 and b.nuclei < a.nuclei
    c = segment_cohort(create("segmenter", "oracle", {"min_area": 10}), slides, tmp_path, workers=0)
    assert c.cached == n and c.segmented == 0


def test_changed_slide_file_is_segmented_again(tmp_path, slides):
    from dataclasses import replace

    oracle = create("segmenter", "oracle")
    segment_cohort(oracle, slides, tmp_path, workers=0)
    other = [slides[0], SlideTiles(slides[1].slide_id, slides[1].path, replace(slides[1].tiles, source="new")),
             slides[2]]
    res = segment_cohort(oracle, other, tmp_path, workers=0)
    assert res.segmented == len(slides[1].tiles) and res.cached == len(slides[0].tiles) + len(slides[2].tiles)


def test_corrupt_cache_files_are_redone(tmp_path, slides):
    oracle = create("segmenter", "oracle")
    res = segment_cohort(oracle, slides, tmp_path, workers=0)
    cache = SegmentationCache(res.root)
    truncated, flipped = cache.path(slides[0].slide_id), cache.path(slides[2].slide_id)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    # a flipped byte inside one tile's compressed map: the file opens, but reading that tile fails its CRC
    with zipfile.ZipFile(flipped) as zf:
        info = zf.getinfo("inst_000000.npy")
    data = bytearray(flipped.read_bytes())
    pos = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2
    data[pos] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with pytest.raises(HistobenchError, match="damaged"):
        cache.slide(slides[0].slide_id)
    with pytest.raises(HistobenchError, match="damaged.*inst_000000"):
        cache.slide(slides[2].slide_id).tile(0)

    again = segment_cohort(oracle, slides, tmp_path, workers=0)
    assert again.segmented == len(slides[0].tiles) + len(slides[2].tiles)
    assert again.cached == len(slides[1].tiles)
    assert cache.slide(slides[0].slide_id).instances.shape[0] == len(slides[0].tiles)
    cache.slide(slides[2].slide_id).tile(0)  # readable again


def test_failing_tile_is_recorded_and_the_run_goes_on(tmp_path, slides, register_plugin):
    register_plugin(_Plugin(), "segment-test")
    s = slides[1]
    x, y = (int(v) for v in s.tiles.coords[2])
    seg = create("segmenter", "test-flaky", {"fail_slide": s.slide_id, "fail_x": x, "fail_y": y})
    res = segment_cohort(seg, slides, tmp_path, workers=0)
    n = sum(len(t.tiles) for t in slides)
    assert (res.failed, res.segmented) == (1, n - 1)
    assert res.failures == [(s.slide_id, 2, "RuntimeError: simulated failure")]
    stored = SegmentationCache(res.root).slide(s.slide_id)
    assert stored.failed.tolist() == [2] and stored.failed_reasons == ["RuntimeError: simulated failure"]
    assert stored.instances[2].max() == 0 and stored.instances[[0, 1, 3]].max() == 1
    assert stored.types is None and (stored.table["type"] == -1).all()
    # a rerun trusts the file, failed tile included
    again = segment_cohort(seg, slides, tmp_path, workers=0)
    assert (again.cached, again.failed, again.segmented) == (n, 1, 0)


def test_interrupted_run_keeps_finished_slides(tmp_path, slides, register_plugin):
    register_plugin(_Plugin(), "segment-test")
    StopSegmenter.stop_on = slides[1].slide_id
    try:
        with pytest.raises(HistobenchError, match="stopped at"):
            segment_cohort(create("segmenter", "test-stop"), slides, tmp_path, workers=0)
    finally:
        StopSegmenter.stop_on = ""
    root = cache_root(tmp_path, create("segmenter", "test-stop").identity(), slides[0].tiles.key())
    assert sorted(p.name for p in root.iterdir()) == [f"{slides[0].slide_id}.npz"]  # no half-written file
    res = segment_cohort(create("segmenter", "test-stop"), slides, tmp_path, workers=0)
    assert res.cached == len(slides[0].tiles) and res.segmented == res.tiles - res.cached


def test_own_process_segmenter_runs_in_a_spawned_process(tmp_path, slides, register_plugin):
    register_plugin(_Plugin(), "segment-test")
    record = tmp_path / "pids"
    record.mkdir()
    seg = create("segmenter", "test-pid", {"record_dir": str(record)})
    res = segment_cohort(seg, slides[:2], tmp_path / "w", workers=0, chunk_tiles=2)
    assert res.segmented == res.tiles > 0 and res.failed == 0
    seen = [json.loads(p.read_text()) for p in record.iterdir()]
    assert len(seen) == 1  # one worker, set up once
    assert seen[0]["pid"] != os.getpid() and seen[0]["torch"] is False


def test_worker_pool_gives_the_same_cache_as_one_process(tmp_path, slides):
    oracle = create("segmenter", "oracle")
    one = segment_cohort(oracle, slides, tmp_path / "one", workers=0)
    two = segment_cohort(oracle, slides, tmp_path / "two", workers=2, chunk_tiles=2)  # chunks arrive out of order
    assert two.segmented == one.segmented and two.nuclei == one.nuclei
    for s in slides:
        a = SegmentationCache(one.root).slide(s.slide_id)
        b = SegmentationCache(two.root).slide(s.slide_id)
        assert np.array_equal(a.instances, b.instances) and np.array_equal(a.types, b.types)
        for k in a.table:
            np.testing.assert_array_equal(a.table[k], b.table[k])


# ----------------------------------------------------------------------------------------------------- CLI
def _summary(output: str) -> dict[str, int]:
    m = re.search(r"(\d+) slides, (\d+) tiles: (\d+) cached \(\d+ %\), (\d+) segmented, (\d+) failed", output)
    assert m, output
    return dict(zip(("slides", "tiles", "cached", "segmented", "failed"), map(int, m.groups())))


def test_cli_segment_demo_fills_hits_and_resegments(tmp_path):
    from histobench.cli.app import build_app

    runner = CliRunner()
    base = ["segment", "--task", "tcga-nsclc", "--demo", "--segmenter", "oracle", "--workdir", str(tmp_path),
            "-o", "task.demo_patients=4", "-o", "task.demo_slide_px=768"]

    def run(*extra):
        result = runner.invoke(build_app(), [*base, *extra], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        return _summary(result.output), result.output

    first, out = run()
    assert first["slides"] >= 4 and first["segmented"] == first["tiles"] > 0 and first["cached"] == 0
    folder = re.search(r"cache: (\S+)", out).group(1)
    assert Path(folder).is_dir() and len(list(Path(folder).glob("*.npz"))) == first["slides"]
    second, _ = run()
    assert second["cached"] == second["tiles"] == first["tiles"] and second["segmented"] == 0
    third, out3 = run("-o", "segmenter.min_area=8")
    assert third["segmented"] == third["tiles"] and third["cached"] == 0
    assert re.search(r"cache: (\S+)", out3).group(1) != folder

    bad = runner.invoke(build_app(), [*base, "-o", "segmenter.min_aera=3"])
    assert bad.exit_code == 2 and "min_aera" in bad.output and "min_area" in bad.output
    bad = runner.invoke(build_app(), [*base, "-o", "train.epochs=3"])
    assert bad.exit_code == 2 and "segmenter." in bad.output
