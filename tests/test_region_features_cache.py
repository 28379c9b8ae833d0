"""Region features are cached apart when what shapes them changes besides the region encoder's weights: the
patch embeddings they were made from (a random region encoder has the same weights whatever the patch encoder
was), or a region-encoder option without parameters."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from histobench.pipeline.regions import PatchGrids, region_features  # noqa: E402
from histobench.registry import create  # noqa: E402
from histobench.reporting import Reporter  # noqa: E402


def _regions(n_slides: int = 2, n_regions: int = 3):
    return [SimpleNamespace(slide_id=f"S{i}", tiles=SimpleNamespace(coords=np.arange(2 * n_regions).reshape(-1, 2),
                                                                     source=f"fp{i}"))
            for i in range(n_slides)]


def _grids(seed: int, regions, enc) -> PatchGrids:
    g = enc.grid_geometry()
    rng = np.random.default_rng(seed)
    return {r.slide_id: rng.normal(size=(len(r.tiles.coords), g.in_dim, g.grid, g.grid)).astype(np.float32)
            for r in regions}


def test_region_features_are_keyed_by_the_patch_features_and_reused_when_nothing_changed(tmp_path):
    enc = create("encoder", "hipt-vit4k", None, "demo")
    torch.manual_seed(0)
    module = enc.build()
    spec = SimpleNamespace(workdir=tmp_path, device="cpu")
    comps = SimpleNamespace(encoder=enc)
    regions = _regions()
    a = PatchGrids(_grids(0, regions, enc), source="timm-random-aaaa-mpp0.25-px64")
    b = PatchGrids(_grids(1, regions, enc), source="timm-imagenet-bbbb-mpp0.25-px64")
    rep = Reporter()  # the base reporter prints nothing
    fa, wa = region_features(spec, comps, module, regions, a, rep, "random")
    fb, wb = region_features(spec, comps, module, regions, b, rep, "random")
    assert wa == wb  # the same region encoder ...
    assert fa.root != fb.root  # ... on other patch embeddings: another folder, never the first one's files
    from histobench.features.cache import read_features

    xa, xb = read_features(fa.path("S0"))[0], read_features(fb.path("S0"))[0]
    assert xa.shape == xb.shape and xa.shape[0] == 3
    assert not np.allclose(xa, xb)
    # the same inputs again: the same folder, and the files are not rewritten
    stamp = fa.path("S0").stat().st_mtime_ns
    fa2, _ = region_features(spec, comps, module, regions, a, rep, "random")
    assert fa2.root == fa.root and fa.path("S0").stat().st_mtime_ns == stamp
