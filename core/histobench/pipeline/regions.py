"""The region path of hierarchical (``grid``) encoders such as HIPT's region ViT (SLPD).

A grid encoder declares what it reads with :meth:`~histobench.components.Encoder.grid_geometry`: regions of
``grid x grid`` patches at a µm/px, each patch embedded by a frozen patch encoder (optionally pretrained first in
the same run). :func:`region_cohort` finds the regions, :func:`patch_grids` embeds their patches,
:func:`grid_dataset` stacks them for pretraining and :func:`region_features` encodes every region.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np

from histobench.device import resolve_device
from histobench.errors import HistobenchError
from histobench.pipeline.spec import NO_PRETEXT, Components, RunSpec, digest
from histobench.pipeline.stages import extract_stage, pretrain_stage, tile_slides
from histobench.registry import create
from histobench.reporting import Reporter


def region_cohort(spec: RunSpec, comps: Components, manifest, reporter: Reporter, status=None):
    """Regions of every slide for a hierarchical (``grid``) encoder, cached per slide: ``[SlideTiles]``
    whose tiles are whole regions (``grid x grid`` patches of ``patch_px`` at ``patch_mpp``)."""
    from histobench.cohorts.status import StatusTable
    from histobench.features.regions import region_tiles

    status = status if status is not None else StatusTable()
    g = comps.encoder.grid_geometry()
    out_dir = Path(spec.workdir) / "regions" / f"mpp{g.patch_mpp:g}-px{g.patch_px}-g{g.grid}-t{g.min_tissue:g}"
    regions = tile_slides(spec, manifest, reporter, status, "regions", out_dir,
                          lambda slide: region_tiles(slide, patch_mpp=g.patch_mpp, patch_px=g.patch_px,
                                                     grid=g.grid, min_tissue=g.min_tissue),
                          "no tissue region")
    n = sum(len(r.tiles) for r in regions)
    reporter.info(f"regions: {n} from {len(regions)} slides, {g.grid}x{g.grid} patches of {g.patch_px} px "
                  f"at {g.patch_mpp:g} µm/px")
    return regions


def patch_grids(spec: RunSpec, comps: Components, regions, reporter: Reporter, tracker=None):
    """Embed every patch of every region with the frozen patch encoder; returns ``{slide_id: [R, D, g, g]}``.

    The patch encoder is built from the region encoder's ``patch_encoder*`` options, optionally pretrained
    first in the same run (``patch_pretext``, e.g. ``dino``) on the regions' patches.
    """
    import torch

    from histobench.features.cache import read_features
    from histobench.features.regions import patches_of, to_grids

    g = comps.encoder.grid_geometry()
    preset = g.patch_encoder_preset
    patch_enc = create("encoder", g.patch_encoder, g.patch_encoder_options, preset)
    patches = [replace(r, tiles=patches_of(r.tiles, g.grid, g.patch_px)) for r in regions]
    if g.patch_pretext != NO_PRETEXT:
        pre = create("pretext", g.patch_pretext, None, preset)
        sub = Components(comps.task, patch_enc, pre, comps.aggregator, type(pre).train_options(preset), comps.eval)
        with tracker.run(comps.task.name, f"pretrain patches {pre.name}", stage="pretrain", nested=True) if tracker else nullcontext():
            module, _, ckpt = pretrain_stage(spec, sub, patches, reporter, tracker)
        tag = f"{pre.name}-{ckpt.name.rsplit('-', 1)[-1]}"
    else:
        torch.manual_seed(spec.seed)
        module, tag = patch_enc.build(), patch_enc.weights_tag()
    if module.embed_dim != g.in_dim:
        raise HistobenchError(f"patch encoder {g.patch_encoder!r} gives {module.embed_dim}-d patches but encoder "
                              f"{comps.encoder.name!r} expects in_dim={g.in_dim}; set -o encoder.in_dim={module.embed_dim}")
    sub = Components(comps.task, patch_enc, None, comps.aggregator, None, comps.eval)
    feats, _, _ = extract_stage(spec, sub, module, patches, reporter, tag, mpp=g.patch_mpp, tile_size=g.patch_px)
    return PatchGrids({p.slide_id: to_grids(read_features(feats.path(p.slide_id))[0], g.grid) for p in patches},
                      source=feats.root.name)


class PatchGrids(dict):
    """``{slide_id: [R, D, g, g]}`` plus ``source``: the patch-feature folder they were read from (its name is the
    patch encoder's cache key), so that region features made from other patch embeddings are cached apart."""

    def __init__(self, grids: dict, source: str = ""):
        super().__init__(grids)
        self.source = source


def grid_dataset(comps: Components, manifest, grids: dict):
    """All regions of the cohort as one :class:`GridDataset` (slides contiguous), with slide labels (for
    diagnostics only) and the slides' patients."""
    from histobench.features.regions import GridDataset

    ids = list(grids)
    labels = None
    if comps.task.classes and "label" in manifest.columns:
        index = {c: i for i, c in enumerate(comps.task.classes)}
        by_slide = dict(zip(manifest["slide_id"], manifest["label"].astype(str)))
        labels = np.array([index.get(by_slide.get(i), -1) for i in ids])
    slide_index = np.concatenate([np.full(len(grids[i]), k) for k, i in enumerate(ids)])
    data = GridDataset(np.concatenate([grids[i] for i in ids]), slide_index, labels)
    patient = dict(zip(manifest["slide_id"].astype(str), manifest["case_id"].astype(str)))
    data.slide_ids, data.patient_ids = ids, [patient.get(i, i) for i in ids]
    return data, digest([(i, grids[i].shape, float(grids[i].sum())) for i in ids])


def region_features(spec: RunSpec, comps: Components, encoder, regions, grids: dict, reporter: Reporter, weights_tag: str):
    """Embed every region with the region encoder: one HDF5 file per slide (features ``[R, D]``, region coords)."""
    import torch

    from histobench import __version__
    from histobench.features.cache import FeatureDir, cache_key, is_complete, weights_hash, write_features

    g = comps.encoder.grid_geometry()
    w = weights_hash(encoder)
    # what shapes region features besides the region encoder's weights: its other options, and the patch
    # embeddings it reads (a random region encoder has the same weights whatever the patch encoder was)
    shaped_by = digest({"options": comps.encoder.features_digest(), "patches": getattr(grids, "source", "")})
    name = f"{comps.encoder.name}:{weights_tag}-{shaped_by}"
    out = Path(spec.workdir) / "features" / cache_key(name, w, g.patch_mpp, g.patch_px * g.grid)
    dev = resolve_device(spec.device)
    encoder = encoder.to(dev).eval()
    with reporter.stage(f"extract {comps.encoder.name}", total=len(regions), unit="slides") as st, torch.inference_mode():
        for r in regions:
            attrs = {"encoder": name, "weights_hash": w, "mpp": g.patch_mpp, "tile_size": g.patch_px * g.grid,
                     "slide_fingerprint": r.tiles.source}
            path = out / f"{r.slide_id}.h5"
            if not is_complete(path, attrs):
                x = torch.as_tensor(grids[r.slide_id])
                f = torch.cat([encoder(x[i:i + 256].to(dev)).float().cpu() for i in range(0, len(x), 256)])
                write_features(path, f.numpy(), r.tiles.coords, {**attrs, "histobench_version": __version__,
                                                                 "slide_id": r.slide_id})
            st.advance()
    return FeatureDir(out), w


