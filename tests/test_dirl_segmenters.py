"""DiRL's nuclei segmenters: hed-watershed on real H&E and on synthetic truth, stardist's errors and (where the
``histobench[stardist]`` extra is installed) a tiny StarDist model trained by the plugin's script."""

import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from histobench.components import TileRef
from histobench.errors import HistobenchError
from histobench.registry import create
from histobench.slides.reader import open_slide
from histobench.slides.synthetic import write_synthetic_slide
from histobench.slides.tiling import read_tile, tile_slide
from histobench.testing import check_segmenter
from histobench_dirl.segmenters import STARDIST_EXTRA, overlay, stardist_missing

ROOT = Path(__file__).resolve().parents[1]
CMU = ROOT / "tests" / "data" / "slides" / "CMU-1-Small-Region.svs"
SCRIPT = ROOT / "plugins" / "histobench_dirl" / "scripts" / "train_tiny_stardist.py"
NO_EXTRA = stardist_missing()
needs_extra = pytest.mark.skipif(NO_EXTRA is not None, reason=f"{NO_EXTRA}; CI does not install this extra "
                                                              f"(TensorFlow takes too long to install)")


def match_iou(pred: np.ndarray, true: np.ndarray, thr: float = 0.5) -> tuple[int, int, int]:
    """(matches at IoU > thr, predicted nuclei, true nuclei); above 0.5 a match is one-to-one."""
    p, t = pred.astype(np.int64), true.astype(np.int64)
    n_p, n_t = int(p.max()), int(t.max())
    if n_p == 0 or n_t == 0:
        return 0, n_p, n_t
    inter = np.bincount((p * (n_t + 1) + t).ravel(), minlength=(n_p + 1) * (n_t + 1)).reshape(n_p + 1, n_t + 1)
    area_p, area_t = inter.sum(1), inter.sum(0)
    iou = inter[1:, 1:] / (area_p[1:, None] + area_t[None, 1:] - inter[1:, 1:])
    return int((iou > thr).sum()), n_p, n_t


def refs_and_tiles(path: Path, mpp: float, size: int):
    with open_slide(path) as slide:
        tiles = tile_slide(slide, mpp=mpp, tile_size=size)
        for i in range(len(tiles)):
            x, y = (int(v) for v in tiles.coords[i])
            ref = TileRef(slide_id=path.stem, path=path, x=x, y=y, level=tiles.level, read_size=tiles.read_size,
                          tile_size=size, mpp=mpp)
            yield ref, read_tile(slide, tiles, i)


@pytest.fixture(scope="module")
def synthetic_slides(tmp_path_factory):
    """One synthetic slide per tissue class (glandular, solid, clear cell), 512 px at 0.5 µm/px."""
    root = tmp_path_factory.mktemp("dirl-syn")
    paths = []
    for c in range(3):
        p = root / f"syn-{c}.tiff"
        write_synthetic_slide(p, class_index=c, n_classes=3, seed=7 + c, size=(512, 512), mpp=0.5,
                              signal_fraction=0.6)
        paths.append(p)
    return paths


def recall_precision(segmenter, paths, **oracle) -> tuple[float, float, int]:
    truth = create("segmenter", "oracle", {"min_area": 32, **oracle})
    tp = n_pred = n_true = 0
    for path in paths:
        for ref, tile in refs_and_tiles(path, 0.5, 256):
            a, b, c = match_iou(segmenter.segment(tile, ref)[0], truth.segment(tile, ref)[0])
            tp, n_pred, n_true = tp + a, n_pred + b, n_true + c
    return tp / n_true, tp / max(n_pred, 1), n_true


# ------------------------------------------------------------------------------------------ hed-watershed
def test_hed_watershed_contract():
    inst, types_ = check_segmenter("hed-watershed")
    assert types_ is None and inst.max() > 0


def test_hed_watershed_density_on_real_he_with_an_overlay_in_mlflow(tmp_path, tracking_uri):
    """CMU-1-Small-Region, every tissue tile at 0.5 µm/px, 256 px: nuclei per mm² of tile area, and the overlay
    picture logged to MLflow (``histobench_dirl.density``, the ``nuclei_density.py`` script). Measured 4,253 /mm²
    (2,230 nuclei in 32 tiles, 4,593 /mm² of tissue, 13 % of pixels in nuclei, mean nucleus 31 µm²)."""
    from PIL import Image

    from histobench.tracking import download_artifact, get_run
    from histobench_dirl.density import log_density, slide_density

    d = slide_density(CMU, "hed-watershed", mpp=0.5, tile_size=256, overlay_tiles=3)
    print(d.line(), f"({d.tiles / d.seconds:.1f} tiles/s)")
    assert d.tiles == d.slide_tiles == 32 and d.failed == []
    assert d.tile_area_mm2 == pytest.approx(32 * (256 * 0.5e-3) ** 2)
    assert d.nuclei_per_mm2 == pytest.approx(d.nuclei / d.tile_area_mm2)
    assert 3000 < d.nuclei_per_mm2 < 5500, d.nuclei_per_mm2     # H&E: roughly 1,000-6,000 /mm²
    assert d.nuclei_per_mm2_tissue >= d.nuclei_per_mm2            # tissue is at most the tile area
    assert 0.05 < d.nucleus_fraction < 0.25                       # neither empty nor all foreground
    assert 20 < d.mean_nucleus_um2 < 60                           # µm² per nucleus: lymphocyte to epithelial size
    assert d.empty_tiles <= 2                                     # nearly every tissue tile has nuclei

    tile, inst = d.overlay[0]
    pic = overlay(tile, inst)
    assert pic.shape == tile.shape and pic.dtype == np.uint8
    changed = (pic != tile).any(axis=2)
    assert changed.any() and not changed[inst == 0].any()  # outlines lie on nuclei pixels, inside them
    assert (pic[changed] == (0, 255, 0)).all()
    assert changed.sum() < (inst > 0).sum()               # outlines, not filled nuclei

    run_id, files = log_density(d, tmp_path / "out", tracking_uri)
    run = get_run(run_id, tracking_uri)
    assert run["tags"]["histobench.stage"] == "segmentation"  # never a leaderboard row
    assert run["metrics"]["nuclei"] == d.nuclei and run["metrics"]["nuclei_per_mm2"] == pytest.approx(d.nuclei_per_mm2)
    assert run["params"]["segmenter.name"] == "hed-watershed" and run["params"]["tiles.mpp"] == "0.5"
    png = download_artifact(run_id, "overlay.png", tmp_path / "dl", tracking_uri)
    strip = np.asarray(Image.open(png))
    assert strip.shape == (256, 3 * 256 + 2 * 4, 3)        # three tiles, 4 px gaps
    assert np.array_equal(strip[:, :256], pic)             # the first panel is the first tile's overlay
    report = json.loads(download_artifact(run_id, "density.json", tmp_path / "dl", tracking_uri).read_text())
    assert report["nuclei"] == d.nuclei and "overlay" not in report


def test_nuclei_density_script_logs_a_run_and_names_a_missing_slide(tmp_path, tracking_uri):
    """The command line around it: a few tiles of the real slide, then a missing slide as one error line."""
    from histobench.tracking import get_run

    script = ROOT / "plugins" / "histobench_dirl" / "scripts" / "nuclei_density.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, str(script), str(CMU), "--max-tiles", "4", "--overlay-tiles", "2",
                         "--tracking-uri", tracking_uri, "--out", str(tmp_path / "out")],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    m = re.search(r"([\d,]+) nuclei in 4 tiles .*: ([\d,]+) nuclei/mm² of tile area", ok.stdout)
    assert m, ok.stdout
    run = get_run(re.search(r"MLflow run (\w+)", ok.stdout).group(1), tracking_uri)
    assert run["metrics"]["nuclei"] == int(m.group(1).replace(",", "")) > 0
    assert (tmp_path / "out" / "overlay.png").is_file()
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "nope.svs"), "--tracking-uri", tracking_uri],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: slide {tmp_path / 'nope.svs'} does not exist"


def test_hed_watershed_overlaps_synthetic_truth(synthetic_slides):
    """Object recall / precision at IoU 0.5 against the oracle (true nuclei of >= 32 px, i.e. 8 µm²) on the three
    tissue classes. Measured 0.61 / 0.74 here (253 true nuclei; 0.75 / 0.83 on three 1024 px slides)."""
    recall, precision, n_true = recall_precision(create("segmenter", "hed-watershed"), synthetic_slides)
    print(f"hed-watershed vs oracle: recall {recall:.3f}, precision {precision:.3f} ({n_true} true nuclei)")
    assert n_true > 200
    assert recall > 0.5 and precision > 0.65


def test_hed_watershed_units_follow_the_tile_mpp(synthetic_slides):
    """The same tile read as 0.5 µm/px and as 2 µm/px: µm options become 16x fewer pixels of area at 2 µm/px,
    so more (small) objects pass; without a TileRef the default 0.5 µm/px applies."""
    seg = create("segmenter", "hed-watershed", {"min_area_um2": 30})
    ref, tile = next(iter(refs_and_tiles(synthetic_slides[1], 0.5, 256)))
    at_05 = int(seg.segment(tile, ref)[0].max())
    coarse = TileRef(**{**ref.__dict__, "mpp": 2.0})
    at_2 = int(seg.segment(tile, coarse)[0].max())
    assert at_2 > at_05 > 0
    assert int(seg.segment(tile, None)[0].max()) == at_05


def test_no_nuclei_is_a_zero_not_an_error():
    seg = create("segmenter", "hed-watershed")
    white = np.full((128, 128, 3), 255, np.uint8)
    inst, types_ = seg.segment(white)
    assert inst.shape == (128, 128) and inst.dtype == np.uint16 and inst.max() == 0 and types_ is None
    pink = np.zeros((128, 128, 3), np.uint8) + np.array([235, 160, 200], np.uint8)  # eosin only
    noisy = np.clip(pink + np.random.default_rng(0).normal(0, 4, pink.shape), 0, 255).astype(np.uint8)
    assert seg.segment(noisy)[0].max() == 0
    purple = np.zeros((128, 128, 3), np.uint8) + np.array([60, 30, 110], np.uint8)  # flat, dark haematoxylin
    for method in ("otsu", "percentile", "fixed"):
        seg = create("segmenter", "hed-watershed", {"threshold": method})
        assert seg.segment(white)[0].max() == 0 and seg.segment(purple)[0].max() == 0


def test_cli_segment_demo_with_hed_watershed(tmp_path):
    from histobench.cli.app import build_app
    from histobench.segment import SegmentationCache

    args = ["segment", "--task", "tcga-nsclc", "--demo", "--segmenter", "hed-watershed", "--workdir", str(tmp_path),
            "-o", "task.demo_patients=4", "-o", "task.demo_slide_px=1024"]
    result = CliRunner().invoke(build_app(), args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    m = re.search(r"(\d+) slides, (\d+) tiles: (\d+) cached \(\d+ %\), (\d+) segmented, (\d+) failed; "
                  r"([\d.]+) nuclei/tile", result.output)
    assert m, result.output
    slides, tiles, cached, segmented, failed = map(int, m.groups()[:5])
    per_tile = float(m.group(6))
    assert slides >= 4 and tiles == segmented > 0 and cached == 0 and failed == 0
    assert per_tile > 1.0
    root = Path(re.search(r"cache: (\S+)", result.output).group(1))
    cache = SegmentationCache(root)
    assert len(cache.slide_ids()) == slides
    with cache.slide(cache.slide_ids()[0]) as seg:
        assert seg.meta["segmenter"] == "hed-watershed" and not seg.has_types
        assert len(seg.table["tile"]) > 0 and (seg.table["area_um2"] >= 8.0 - 1e-3).all()


# ------------------------------------------------------------------------------------------------ stardist
def test_missing_tensorflow_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "stardist", None)  # `import stardist` now raises ImportError
    assert STARDIST_EXTRA in stardist_missing()
    seg = create("segmenter", "stardist")
    with pytest.raises(HistobenchError) as err:
        seg.setup()
    msg = str(err.value)
    assert "pip install 'histobench[stardist]'" in msg and "\n" not in msg


def test_stardist_blank_tile_is_zero_without_the_model():
    """Glass: per-tile percentile normalisation would stretch its noise to 0..1 (a tiny model then found 99
    "nuclei" on a white tile); under min_contrast grey levels the model is not run. Needs no TensorFlow."""
    seg = create("segmenter", "stardist")
    seg._model = object()  # never called: a blank tile returns before the model (and before any import)
    glass = np.clip(250 + np.random.default_rng(1).normal(0, 2, (64, 64, 3)), 0, 255).astype(np.uint8)
    inst, types_ = seg.segment(glass)
    assert inst.shape == (64, 64) and inst.dtype == np.uint16 and inst.max() == 0 and types_ is None


def _fake_stardist(monkeypatch, from_pretrained):
    """A stand-in ``stardist.models`` whose StarDist2D.from_pretrained is ``from_pretrained``."""
    pkg, models = types.ModuleType("stardist"), types.ModuleType("stardist.models")
    models.StarDist2D = type("StarDist2D", (), {"from_pretrained": staticmethod(from_pretrained)})
    pkg.models = models
    monkeypatch.setitem(sys.modules, "stardist", pkg)
    monkeypatch.setitem(sys.modules, "stardist.models", models)


def test_pretrained_model_offline_names_model_dir(monkeypatch):
    def offline(name):
        raise Exception(f"URL fetch failure on https://example.invalid/{name}.zip: None -- [Errno -3] "
                        f"Temporary failure in name resolution")

    _fake_stardist(monkeypatch, offline)
    with pytest.raises(HistobenchError) as err:
        create("segmenter", "stardist").setup()
    msg = str(err.value)
    assert "2D_versatile_he" in msg and "-o segmenter.model_dir=PATH" in msg and "\n" not in msg

    _fake_stardist(monkeypatch, lambda name: None)  # StarDist's answer to an unknown name
    with pytest.raises(HistobenchError, match="no pretrained model named 'nope'"):
        create("segmenter", "stardist", {"model": "nope"}).setup()


def test_missing_model_dir_is_a_one_line_error(tmp_path):
    gone = tmp_path / "no-such-model"
    seg = create("segmenter", "stardist", {"model_dir": str(gone)})
    for call in (seg.setup, seg.identity):  # identity() runs first in `histobench segment`: fails early
        with pytest.raises(HistobenchError) as err:
            call()
        msg = str(err.value)
        assert str(gone) in msg and "segmenter.model_dir" in msg and "\n" not in msg
    gone.mkdir()
    with pytest.raises(HistobenchError, match="no config.json"):
        create("segmenter", "stardist", {"model_dir": str(gone)}).setup()


def test_stardist_unavailable_says_why(monkeypatch, tmp_path):
    """What the contract test skips on: no extra, or (offline) no cached pretrained model."""
    from histobench_dirl import segmenters

    cls = segmenters.StarDistSegmenter
    monkeypatch.setitem(sys.modules, "stardist", None)
    assert STARDIST_EXTRA in cls.unavailable()
    monkeypatch.setattr(segmenters, "stardist_missing", lambda: None)  # as if the extra were installed
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert "-o segmenter.model_dir=PATH" in cls.unavailable()
    cached = tmp_path / "models" / "StarDist2D" / "2D_versatile_he"
    cached.mkdir(parents=True)
    (cached / "2D_versatile_he.zip").write_bytes(b"zip")
    assert cls.unavailable() is None


def test_stardist_identity_follows_the_weights(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "weights_best.h5").write_bytes(b"one")
    seg = create("segmenter", "stardist", {"model_dir": str(folder), "scale": 1.0})
    first = seg.identity()
    assert first == seg.identity() and first.startswith("stardist-v1-")
    (folder / "weights_best.h5").write_bytes(b"two")
    assert seg.identity() != first  # retrained in place: a new cache folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The plugin's script trains a tiny StarDist model on synthetic nuclei (where the extra is installed);
    HISTOBENCH_TINY_STARDIST names a folder the script made before, to skip the training (a minute or more)."""
    import os

    made = os.environ.get("HISTOBENCH_TINY_STARDIST")
    if made:
        return Path(made)
    out = tmp_path_factory.mktemp("tiny-stardist") / "model"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"train_tiny_stardist: {time.perf_counter() - t0:.0f} s; {proc.stdout.strip().splitlines()[-2]}")
    assert (out / "config.json").is_file() and (out / "thresholds.json").is_file()
    return out


@needs_extra
def test_stardist_contract_with_tiny_model(tiny_model):
    inst, types_ = check_segmenter("stardist", {"model_dir": str(tiny_model), "scale": 1.0})
    assert types_ is None and inst.max() > 0


@needs_extra
def test_tiny_stardist_finds_synthetic_nuclei(tiny_model, synthetic_slides):
    """Run in a spawned process, as the runner does (TensorFlow stays out of the torch process)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        recall, precision, n_true = pool.submit(_stardist_recall, str(tiny_model),
                                                [str(p) for p in synthetic_slides]).result()
    print(f"tiny stardist vs oracle: recall {recall:.3f}, precision {precision:.3f} ({n_true} true nuclei)")
    assert recall > 0.35 and precision > 0.4  # two trainings measured 0.50 / 0.84 and 0.54 / 0.53 (253 nuclei)
    white = np.clip(250 + np.random.default_rng(1).normal(0, 2, (64, 64, 3)), 0, 255).astype(np.uint8)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(_stardist_max_label, str(tiny_model), white).result() == 0


def _stardist_recall(model_dir: str, paths: list[str]) -> tuple[float, float, int]:
    seg = create("segmenter", "stardist", {"model_dir": model_dir, "scale": 1.0})
    seg.setup()
    return recall_precision(seg, [Path(p) for p in paths])


def _stardist_max_label(model_dir: str, tile: np.ndarray) -> int:
    seg = create("segmenter", "stardist", {"model_dir": model_dir, "scale": 1.0})
    seg.setup()
    return int(seg.segment(tile)[0].max())
