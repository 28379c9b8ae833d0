"""The stages of a run, each a function that ``run`` and the single-stage commands share.

cohort (:func:`load_cohort`) -> folds (:func:`make_splits`, before any pretraining) -> tiles (:func:`tile_cohort`,
or regions for a grid encoder, :mod:`histobench.pipeline.regions`) -> nuclei masks (:func:`segment_stage`, for
pretexts that require them) -> pretraining (:func:`pretrain_stage`) -> features (:func:`extract_stage`) ->
the evaluation protocol (:func:`evaluate_stage`). Every stage caches its output under the work directory, keyed
by everything that changes it, so a rerun (or a crashed run started again) only does what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histobench.components import Task
from histobench.errors import HistobenchError
from histobench.pipeline.spec import Components, RunSpec, digest
from histobench.reporting import Reporter

# --------------------------------------------------------------------------------------------- stages


def _save_status(status, spec: RunSpec) -> None:
    """Append the status records to ``WORKDIR/status.csv``; under ``torchrun`` rank 0 alone writes it."""
    if _rank()[0] == 0:
        status.save(Path(spec.workdir) / "status.csv")


def _problem(spec: RunSpec, reporter: Reporter, status, slide_id: str, stage: str, reason: str) -> None:
    """Record one unusable slide; with ``--fail-fast`` stop on it (what is written stays written)."""
    status.add(slide_id, stage, "skipped", reason)
    if spec.fail_fast:
        _save_status(status, spec)
        raise HistobenchError(f"slide {slide_id} ({stage}): {reason} (--fail-fast)")
    reporter.warn(f"slide {slide_id} ({stage}): {reason}")


def load_cohort(spec: RunSpec, task: Task, reporter: Reporter, status=None):
    """The task's manifest: the synthetic stand-in with ``--demo``, else the cohort under the data root.

    Rows that cannot be used (unknown ids, missing columns, bad labels or survival times) are recorded in
    ``status`` and dropped; the run goes on with the rest.
    """
    from histobench.cohorts.manifest import allow_outside_from_env, check_paths, data_root, validate_manifest
    from histobench.cohorts.status import StatusTable, validate_manifest_rows

    status = status if status is not None else StatusTable()
    if spec.demo:
        out = Path(spec.workdir) / "demo" / task.name
        with reporter.stage(f"demo cohort {task.name}", total=None, unit="slides"):
            df = task.demo_cohort(out, seed=0)
    else:
        root = data_root(spec.data_root)
        df = task.cohort(root)
        check_paths(df, [root], allow_outside=spec.allow_outside_data_root or allow_outside_from_env(),
                    source=f"the cohort of task {task.name}")
    df = validate_manifest(df, ["label"] if task.task_kind != "survival" else ["time", "event"], source=f"task {task.name}")
    df, problems = validate_manifest_rows(df, task, check_known_ids=not spec.demo)
    for slide_id, reason in problems:
        _problem(spec, reporter, status, slide_id, "manifest", reason)
    if problems:  # recorded now: a command that stops before its next stage still leaves them in status.csv
        _save_status(status, spec)
    if df.empty:
        raise HistobenchError(f"no usable slide in the cohort of task {task.name} ({status.summary()})")
    reporter.info(f"cohort {task.name}: {len(df)} slides, {df['case_id'].nunique()} patients")
    return df.reset_index(drop=True)


def tile_slides(spec: RunSpec, manifest, reporter: Reporter, status, stage: str, out_dir: Path, make, empty: str):
    """Run ``make(slide) -> TileSet`` on every usable slide of the manifest, caching one ``.npz`` per slide.

    A slide that is missing, unreadable, truncated, without resolution or without tissue is recorded in the
    status table (``WORKDIR/status.csv``) and skipped; ``--fail-fast`` stops at the first one instead.
    """
    from histobench.cohorts.status import check_slide
    from histobench.faults import fault_point
    from histobench.locks import OutputLock, remove_temporaries
    from histobench.pretrain.data import SlideTiles
    from histobench.slides.reader import open_slide
    from histobench.slides.tiling import slide_fingerprint

    slides = []
    with reporter.stage(stage, total=len(manifest), unit="slides") as st:
        for row in manifest.itertuples():
            path = out_dir / f"{row.slide_id}.npz"
            st.advance()
            try:
                # a cached tile set counts only for the same slide file (same content fingerprint)
                source = slide_fingerprint(row.path) if Path(row.path).exists() else None
                tiles = _cached_tiles(path, source, reporter)
                if tiles is None:
                    reason = check_slide(row)
                    if reason:
                        _problem(spec, reporter, status, row.slide_id, stage, reason)
                        continue
                    # one process tiles a slide; another that wants it waits, then reuses its file
                    with OutputLock(path, reporter):
                        tiles = _cached_tiles(path, source, reporter)
                        if tiles is None:
                            remove_temporaries(path, (".{name}.*.tmp",))  # left by a killed writer
                            with open_slide(row.path) as slide:
                                tiles = make(slide)
                            tiles.source = source
                            tiles.save(path)
                    fault_point("tile.slide")
            except HistobenchError as err:
                _problem(spec, reporter, status, row.slide_id, stage, str(err))
                continue
            if len(tiles) == 0:
                _problem(spec, reporter, status, row.slide_id, stage, empty)
            else:
                status.add(row.slide_id, stage, "ok", f"{len(tiles)} tiles")
                slides.append(SlideTiles(row.slide_id, Path(row.path), tiles, case_id=str(row.case_id)))
    _save_status(status, spec)
    if not slides:
        raise HistobenchError(f"no slide of the cohort has tissue ({status.summary()})")
    return slides


def _cached_tiles(path: Path, source: str | None, reporter: Reporter):
    """The tile set cached at ``path`` if it is readable and was made from the same slide file; else None.

    An unreadable file (truncated, not a tile set) is reported and redone, never trusted."""
    from histobench.slides.tiling import TileSet

    if not source or not path.exists():
        return None
    try:
        tiles = TileSet.load(path)
    except HistobenchError as err:
        reporter.warn(f"{err}; tiling the slide again")
        return None
    return tiles if tiles.source == source else None


def tile_cohort(manifest, task: Task, workdir: Path, reporter: Reporter, spec: RunSpec | None = None, status=None):
    """Tile every slide at the task's µm/px and size (cached per slide); returns ``[SlideTiles]``."""
    from histobench.cohorts.status import StatusTable
    from histobench.slides.tiling import tile_slide

    spec = spec or RunSpec(task=task.name, workdir=Path(workdir))
    status = status if status is not None else StatusTable()
    o = task.options
    out_dir = Path(workdir) / "tiles" / f"mpp{o.mpp:g}-px{o.tile_size}-t{o.min_tissue:g}"
    slides = tile_slides(spec, manifest, reporter, status, "tile", out_dir,
                          lambda slide: tile_slide(slide, mpp=o.mpp, tile_size=o.tile_size, min_tissue=o.min_tissue),
                          f"no tissue tiles at {o.mpp:g} µm/px")
    n = sum(len(s.tiles) for s in slides)
    skipped = len(manifest) - len(slides)
    reporter.info(f"tiles: {n} from {len(slides)} slides ({skipped} skipped) at {o.mpp:g} µm/px, {o.tile_size} px")
    return slides


def _rank() -> tuple[int, int]:
    """``(rank, world size)`` of this process (``(0, 1)`` outside ``torchrun``)."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _cap(slides, max_tiles: int, seed: int):
    from dataclasses import replace

    from histobench.slides.tiling import select_tiles

    if not max_tiles:
        return slides
    return [replace(s, tiles=select_tiles(s.tiles, max_tiles, seed)) for s in slides]


def pretrain_stage(spec: RunSpec, comps: Components, slides, reporter: Reporter, tracker=None, grids=None,
                   segmentation=None, cohort_task: str | None = None):
    """Train the pretext on the cohort's tiles (or on region ``grids``: ``(GridDataset, key)``).

    With ``segmentation`` (:func:`segment_stage`'s result, for pretexts that require ``masks``) every tile's
    nuclei maps join its batch. ``cohort_task`` names the task whose cohort the slides are (default: the run's).
    Returns ``(encoder module, PretrainResult, checkpoint folder)``.
    """
    from histobench.components import CohortMeta
    from histobench.pretrain.data import SlideTileDataset, cache_uint8
    from histobench.pretrain.trainer import pretrain

    train = comps.train
    if grids is not None:
        data, data_key = grids
        cohort = (CohortMeta(tuple(data.slide_ids), tuple(data.patient_ids), cohort_task or comps.task.name)
                  if hasattr(data, "patient_ids") else None)
    else:
        capped = _cap(slides, train.max_tiles_per_slide, spec.seed)
        dataset = SlideTileDataset(capped, decode="jpeg")  # direct JPEG tiles where possible: openslide's pixels, faster
        data_key = digest([(s.slide_id, s.tiles.key(), len(s.tiles), s.tiles.source) for s in capped])
        tile_cache = Path(spec.workdir) / "tilecache" / f"{data_key}.npy"
        data = _on_rank_zero_first(lambda: _locked(tile_cache, reporter, lambda: cache_uint8(
            dataset, tile_cache, reporter, train.num_workers)))
        if segmentation is not None:
            from histobench.pretrain.data import cache_masks

            mask_key = digest([data_key, segmentation.identity])
            mask_cache = Path(spec.workdir) / "maskcache" / mask_key
            tiles_data = data
            data = _on_rank_zero_first(lambda: _locked(mask_cache, reporter, lambda: cache_masks(
                tiles_data, capped, segmentation, mask_cache, reporter)))
            data_key = mask_key
        cohort = CohortMeta(tuple(s.slide_id for s in capped), tuple(s.case_id or s.slide_id for s in capped),
                            cohort_task or comps.task.name)
    resolved = comps.resolved()  # only what changes the encoder: not the aggregator or the evaluation policy
    keys = [k for k in ("encoder", "pretext", "train", "text_encoder") if k in resolved]
    fingerprint = digest({k: resolved[k] for k in keys} | {"data": data_key, "seed": spec.seed})
    out_dir = Path(spec.workdir) / "pretrain" / f"{comps.pretext.name}-{fingerprint}"
    seg_info = {} if segmentation is None else {"identity": segmentation.identity, **segmentation.info}

    def run_pretext():
        # a second process on the same checkpoint folder waits, then resumes from the finished checkpoint
        result = pretrain(comps.pretext, comps.encoder, data, train, out_dir=out_dir, seed=spec.seed,
                          device=spec.device, reporter=reporter, tracker=tracker, cohort=cohort,
                          text_encoder=comps.text_encoder, segmentation=seg_info, cache_dir=Path(spec.workdir) / "cache")
        if _rank()[0] == 0:
            from histobench.pretrain.trainer import save_atomic, write_error

            try:
                save_atomic(result.encoder.state_dict(), out_dir / "encoder.pt")
            except (OSError, RuntimeError) as err:  # a full disk: one line; the last checkpoint resumes the run
                raise write_error(out_dir / "encoder.pt", err, "the training checkpoint beside it is kept, and "
                                  "the same command finishes from it", what="encoder") from err
        return result

    # under torchrun rank 0 alone holds the folder's lock (its ranks train together, and meet at barriers)
    result = _locked(out_dir, reporter, run_pretext) if _rank()[0] == 0 else run_pretext()
    return result.encoder, result, out_dir


def _locked(output: Path, reporter: Reporter, make):
    """``make()`` while holding ``output``'s lock (:mod:`histobench.locks`): one process at a time makes a
    cached output; one that waited finds it complete (each cache's own check) and reuses it."""
    from histobench.locks import OutputLock

    with OutputLock(output, reporter):
        return make()


def _on_rank_zero_first(make):
    """``make()`` on rank 0, then (after a barrier) on the other ranks, which find rank 0's cached file."""
    rank, world = _rank()
    data = make() if rank == 0 else None
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if rank:
            data = make()
    return data


def extract_stage(spec: RunSpec, comps: Components, encoder, slides, reporter: Reporter, weights_tag: str,
                  mpp: float | None = None, tile_size: int | None = None):
    """Encode every tile; returns ``(FeatureDir, ExtractResult, weights hash)``."""
    from histobench.features.cache import FeatureDir, cache_key, weights_hash
    from histobench.features.extract import extract_features

    o = comps.task.options
    if mpp is None:  # the task's tiles (patches of regions come with their own geometry and are never capped)
        slides = _cap(slides, o.max_tiles_per_slide, 0)
    w = weights_hash(encoder)
    name = f"{comps.encoder.name}:{weights_tag}"
    # the options digest: a cut's pooling/activation and the input transform change features, not the state dict
    key = cache_key(f"{name}-{comps.encoder.features_digest()}", w, mpp or o.mpp, tile_size or o.tile_size)
    out = Path(spec.workdir) / "features" / key
    res = extract_features(encoder, comps.encoder.transform(), slides, out, encoder_name=name, weights=w,
                           device=spec.device, reporter=reporter, num_workers=0 if spec.demo else None)
    return FeatureDir(out), res, w


@dataclass
class CohortInputs:
    """What the encoder reads: tiles of every slide, or, for a ``grid`` encoder, regions and their patch grids."""

    slides: list  # [SlideTiles]: tiles, or whole regions
    grids: dict | None = None  # {slide_id: [R, D, g, g]} for hierarchical encoders


def cohort_inputs(spec: RunSpec, comps: Components, manifest, reporter: Reporter, status=None, tracker=None) -> CohortInputs:
    """Tile the cohort for the encoder: the task's tiles, or regions as grids of frozen patch embeddings."""
    from histobench.pipeline.regions import patch_grids, region_cohort

    if comps.encoder.input_kind == "grid":  # HIPT, SLPD
        regions = region_cohort(spec, comps, manifest, reporter, status)
        return CohortInputs(regions, patch_grids(spec, comps, regions, reporter, tracker))
    return CohortInputs(tile_cohort(manifest, comps.task, spec.workdir, reporter, spec, status))


def segment_stage(spec: RunSpec, comps: Components, slides, reporter: Reporter):
    """Nuclei masks of every tile with the run's segmenter (cached per slide; see :mod:`histobench.segment`)."""
    from histobench.segment import segment_cohort

    return segment_cohort(comps.segmenter, slides, Path(spec.workdir), reporter)


def pretrain_inputs(spec: RunSpec, comps: Components, manifest, inputs: CohortInputs, reporter: Reporter, tracker=None,
                    cohort_task: str | None = None):
    """``pretrain_stage`` on whichever inputs the encoder reads (nuclei masks too, when the pretext requires them)."""
    from histobench.pipeline.regions import grid_dataset

    grids = grid_dataset(comps, manifest, inputs.grids) if inputs.grids is not None else None
    segmentation = segment_stage(spec, comps, inputs.slides, reporter) if comps.segmenter is not None else None
    return pretrain_stage(spec, comps, inputs.slides, reporter, tracker, grids=grids, segmentation=segmentation,
                          cohort_task=cohort_task)


def pretrain_cohort(spec: RunSpec, comps: Components, manifest, reporter: Reporter, status=None):
    """The cohort pretraining reads, and how the run record names it.

    By default the evaluation cohort itself (``transductive``: every slide, labels never read); with
    ``--pretrain-task`` another task's cohort (its demo stand-in with ``--demo``), with ``--pretrain-manifest``
    the slides of a manifest (``slide_id, case_id, path``; no labels needed). Either is tiled with the
    evaluation task's tiling. Returns ``(manifest, description)``.
    """
    from histobench.registry import create

    if spec.pretrain_task:
        other = create("task", spec.pretrain_task, None, "demo" if spec.demo else None)
        return load_cohort(spec, other, reporter, status), f"task:{other.name}"
    if spec.pretrain_manifest:
        from histobench.cohorts.manifest import load_manifest

        df = load_manifest(Path(spec.pretrain_manifest), data_root=spec.data_root,
                           allow_outside=spec.allow_outside_data_root)
        reporter.info(f"pretraining cohort {Path(spec.pretrain_manifest).name}: {len(df)} slides, "
                      f"{df['case_id'].nunique()} patients")
        return df, f"manifest:{Path(spec.pretrain_manifest).name}#{digest(df[['slide_id', 'path']].values.tolist())}"
    return manifest, "transductive"


def encode_cohort(spec: RunSpec, comps: Components, encoder, inputs: CohortInputs, reporter: Reporter, weights_tag: str):
    """Features of every slide: ``(FeatureDir, weights hash, ExtractResult or None for region encoders)``."""
    from histobench.pipeline.regions import region_features

    if inputs.grids is not None:
        features, w = region_features(spec, comps, encoder, inputs.slides, inputs.grids, reporter, weights_tag)
        return features, w, None
    features, ext, w = extract_stage(spec, comps, encoder, inputs.slides, reporter, weights_tag)
    return features, w, ext


def make_splits(spec: RunSpec, comps: Components, manifest, reporter: Reporter):
    """The task's patient-level folds for this cohort, made (and audited for leaks) before any pretraining.

    Test folds with fewer than ``eval.min_test_per_class`` patients of a class are said in one line, and the
    folds are remade with fewer of them or refused, as ``eval.small_folds`` says (a published preset is never
    remade); the split name and hash then record it.
    """
    from histobench.cohorts.splits import check_leaks, task_splits
    from histobench.evaluate.folds import check_fold_sizes

    splits = task_splits(comps.task, manifest, workdir=Path(spec.workdir), preset=spec.split, seed=0)
    leaks = check_leaks(splits, manifest, allow_leaks=spec.allow_leaky_splits)
    if leaks:
        reporter.warn(f"split {splits.name!r} has {leaks} patient-fold leaks; evaluating anyway (--allow-leaky-splits)")
    return check_fold_sizes(splits, manifest, comps.task, comps.eval, workdir=Path(spec.workdir), reporter=reporter,
                            preset=spec.split, seed=0)


def evaluate_stage(spec: RunSpec, comps: Components, manifest, features, reporter: Reporter, splits=None,
                   inputs: CohortInputs | None = None, encoder=None, artifacts: Path | None = None):
    """The run's evaluation protocol over the task's folds; returns ``(EvalResult, Splits, ProtocolInputs)``.

    ``features`` are the cached per-slide features (for protocols that read them); ``inputs`` and ``encoder``
    the slides' tiles and the encoder module (for protocols that train or re-extract the encoder in each fold).
    """
    from histobench.evaluate.protocols import ProtocolInputs
    from histobench.faults import fault_point

    protocol = comps.protocol
    need = type(protocol).inputs
    if splits is None:
        splits = make_splits(spec, comps, manifest, reporter)
    if "tiles" in need or "encoder" in need:
        if inputs is None or encoder is None:
            raise HistobenchError(f"protocol {protocol.name!r} needs the slides' tiles and the encoder; "
                                  f"it runs in histobench run, not on a folder of features")

    def extract(module, slides, tag):
        feats, _, _ = extract_stage(spec, comps, module, slides, reporter, tag)
        return feats

    pin = ProtocolInputs(task=comps.task, manifest=manifest, splits=splits, aggregator=comps.aggregator,
                         eval=comps.eval, reporter=reporter, features=features if "features" in need else None,
                         slides=inputs.slides if inputs is not None and "tiles" in need else None,
                         encoder=encoder if "encoder" in need else None, encoder_component=comps.encoder,
                         extract=extract, device=spec.device, artifacts=artifacts)
    label = f"{protocol.name} {comps.aggregator.name}" if protocol.uses_aggregator else protocol.name
    with reporter.stage(f"evaluate {label}", total=splits.folds * comps.eval.seeds,
                        unit="folds") as st:
        def progress(*_):
            st.advance()
            fault_point("evaluate.fold")

        pin.progress = progress
        result = protocol.evaluate(pin)
    return result, splits, pin
