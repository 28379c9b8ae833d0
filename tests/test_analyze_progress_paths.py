"""`histobench analyze`: the reporter reaches the analysis, and the held-out tile set works from any folder.

Two things the attention analysis depends on: its per-tile loops (attention of each encoder, segmentation of the
tiles, the overlays) draw progress bars through the reporter the runner hands it in ``AnalysisInputs``; and the
held-out tile set's ``TileRef`` paths are absolute, so that the oracle segmenter (which reads each synthetic
slide's nuclei side file next to the slide) still finds them when the analysis runs from another folder than
the one that drew and cached the tile set.
"""

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from histobench.reporting import Reporter, Stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASK_OPTIONS = {"demo_patients": 4, "demo_slide_px": 1024}
N_TILES = 20


class RecordingReporter(Reporter):
    """A silent reporter that records every stage: ``[description, total, unit, advanced]``."""

    def __init__(self):
        super().__init__()
        self.stages: list[list] = []

    @contextmanager
    def stage(self, description, total=None, unit="it"):
        self.stages.append([description, total, unit, 0])
        yield Stage(self, len(self.stages) - 1, total, unit)

    def _advance(self, stage, n):
        self.stages[stage.task_id][3] += n


def _task():
    from histobench.registry import create

    return create("task", "tcga-nsclc", TASK_OPTIONS, "demo")


def _vit(seed):
    from histobench.analyze import AnalysedEncoder
    from histobench.registry import create

    comp = create("encoder", "timm", None, "demo")
    torch.manual_seed(seed)
    return AnalysedEncoder(f"vit{seed}", comp.build().eval(), comp, f"vit{seed}.pt")


def test_the_attention_analysis_draws_its_loops_through_the_runners_reporter(tmp_path, monkeypatch):
    from histobench.analyze.runner import run_analysis
    from histobench.analyze.tiles import held_out_tiles
    from histobench.registry import create

    monkeypatch.chdir(tmp_path)
    rep = RecordingReporter()
    tiles, refs, h = held_out_tiles(_task(), True, None, Path("w"), N_TILES, seed=0, reporter=rep)
    analysis = create("analysis", "attention", {"segmenter": "oracle", "overlay_tiles": 2, "batch_size": 8})
    run_analysis(analysis, [_vit(0), _vit(1)], tiles, refs, h, task="tcga-nsclc", workdir=Path("w"),
                 device=torch.device("cpu"), track=False, reporter=rep)
    by_name = {d: (total, unit, done) for d, total, unit, done in rep.stages}
    # one bar per encoder over every tile (in batches of 8: 8 + 8 + 4), one for the segmentation, one for overlays
    assert by_name["attention of vit0"] == (N_TILES, "tiles", N_TILES)
    assert by_name["attention of vit1"] == (N_TILES, "tiles", N_TILES)
    assert by_name["segment held-out tiles (oracle)"] == (N_TILES, "tiles", N_TILES)
    assert by_name["attention overlays"] == (2, "encoders", 2)
    assert any(m.startswith("analysis attention: 2 encoders × 20 tiles") for m in rep.messages)
    assert any(m.startswith("entropy: vit0 ") and "Wilcoxon p" in m for m in rep.messages)


def test_the_held_out_tile_set_and_the_oracle_work_from_another_folder(tmp_path, monkeypatch):
    """Draw (and cache) the tile set with a relative work directory from folder ``a``, then use the same work
    directory from folder ``b`` (through another relative path): same tiles, absolute paths that exist, and the
    oracle prior segments every tile."""
    from histobench.analyses.attention import segment_tiles
    from histobench.analyze.tiles import held_out_tiles
    from histobench.segment.oracle import OracleSegmenter

    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    first, refs_a, h = held_out_tiles(_task(), True, None, Path("w"), N_TILES, seed=0)
    assert all(r.path.is_absolute() and r.path.is_file() for r in refs_a)
    monkeypatch.chdir(tmp_path / "b" / "deeper")
    assert not Path("w").exists()
    again, refs_b, h2 = held_out_tiles(_task(), True, None, Path("../../a/w"), N_TILES, seed=0)
    assert h2 == h and torch.equal(again, first)
    assert len(list((tmp_path / "a" / "w" / "analysis-tiles").glob("*.npz"))) == 1  # served from the cache
    assert all(r.path.is_absolute() and r.path.is_file() for r in refs_b)
    assert [(r.slide_id, r.x, r.y) for r in refs_b] == [(r.slide_id, r.x, r.y) for r in refs_a]
    maps, failed = segment_tiles(OracleSegmenter(), again.permute(0, 2, 3, 1).numpy(), refs_b)
    assert failed == [] and all(m is not None for m in maps)
    assert sum(int(inst.max()) for inst, _ in maps) > N_TILES  # synthetic tiles hold several nuclei each


def test_a_cache_written_with_relative_paths_is_still_usable(tmp_path, monkeypatch):
    """A tile-set cache from before the fix stored the slide paths as given (relative to the folder it ran in):
    the refs come from this call's slides, not from the cache, so the oracle still finds the slides."""
    import numpy as np

    from histobench.analyze import tiles as T

    monkeypatch.chdir(tmp_path)
    pixels, refs, h = T.held_out_tiles(_task(), True, None, Path("w"), N_TILES, seed=0)
    cache = tmp_path / "w" / "analysis-tiles" / f"{h}.npz"
    stale = [r.__class__(r.slide_id, Path(os.path.relpath(r.path, tmp_path / "w")), r.x, r.y, r.level, r.read_size,
                         r.tile_size, r.mpp) for r in refs]
    T._save(cache, pixels.numpy(), stale)
    with np.load(cache) as z:
        assert not Path(str(z["path"][0])).is_absolute()
    again, refs2, h2 = T.held_out_tiles(_task(), True, None, Path("w"), N_TILES, seed=0)
    assert h2 == h and torch.equal(again, pixels) and refs2 == refs
    assert all(r.path.is_absolute() and r.path.is_file() for r in refs2)
