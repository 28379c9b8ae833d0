"""``histobench run``: cohort -> tiles -> pretraining -> extraction -> evaluation, tracked in MLflow.

Each stage is a function that the single-stage commands (``pretrain``, ``extract``, ``evaluate``) reuse.
Every stage caches its output under the work directory, keyed by everything that changes it, so a rerun
(or a crashed run started again) only does what is missing.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histobench.components import Aggregator, Encoder, Pretext, Task, TrainOptions
from histobench.device import resolve_device
from histobench.errors import HistobenchError
from histobench.options import validate_model
from histobench.registry import create, get_component
from histobench.reporting import Reporter

NO_PRETEXT = "none"


@dataclass
class RunSpec:
    """Everything a run is made of, as the user gave it (names and ``-o`` options by prefix)."""

    task: str
    pretext: str = NO_PRETEXT
    encoder: str | None = None  # None: the pretext's default encoder (timm for tile pretexts)
    aggregator: str | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    demo: bool = False
    seed: int = 0
    workdir: Path = Path("histobench-work")
    data_root: Path | None = None
    tracking_uri: str | None = None
    track: bool = True
    device: str | None = None
    fail_fast: bool = False
    allow_leaky_splits: bool = False
    split: str | None = None  # a published split preset of the task; None: the task's `split` option


@dataclass
class Components:
    """The resolved components and policies of a run."""

    task: Task
    encoder: Encoder
    pretext: Pretext | None
    aggregator: Aggregator
    train: TrainOptions | None
    eval: Any  # EvalOptions

    def resolved(self) -> dict[str, Any]:
        out = {
            "task": {"name": self.task.name, **self.task.options.model_dump()},
            "encoder": {"name": self.encoder.name, **self.encoder.options.model_dump()},
            "aggregator": {"name": self.aggregator.name, **self.aggregator.options.model_dump()},
            "eval": self.eval.model_dump(),
        }
        if self.pretext is not None:
            out["pretext"] = {"name": self.pretext.name, **self.pretext.options.model_dump()}
            out["train"] = self.train.model_dump()
        return out


def resolve(spec: RunSpec) -> Components:
    """Build every component from its name, the ``demo`` preset when ``--demo``, then the ``-o`` options."""
    from histobench.evaluate.options import EvalOptions

    preset = "demo" if spec.demo else None
    opts = spec.options
    task = create("task", spec.task, opts.get("task"), preset)
    pretext = None
    train = None
    if spec.pretext != NO_PRETEXT:
        pretext = create("pretext", spec.pretext, opts.get("pretext"), preset)
    encoder_name = spec.encoder or (type(pretext).default_encoder if pretext else "timm")
    encoder = create("encoder", encoder_name, opts.get("encoder"), preset)
    if pretext is not None:
        cls = type(pretext)
        if ("regions" in cls.requires) != (encoder.input_kind == "grid"):
            raise HistobenchError(
                f"pretext {cls.name!r} needs {'region grids' if 'regions' in cls.requires else 'pixel tiles'} but "
                f"encoder {encoder.name!r} takes {encoder.input_kind}; try --encoder {cls.default_encoder}")
        train = validate_model(TrainOptions, {**cls.train_defaults, **cls.train_presets.get(preset or "", {}),
                                              **opts.get("train", {})}, "train", "the training loop")
    elif opts.get("train") or opts.get("pretext"):
        raise HistobenchError("pretext./train. options were given but --pretext is none")
    aggregator = create("aggregator", spec.aggregator or task.default_aggregator, opts.get("aggregator"), preset)
    ev = validate_model(EvalOptions, {**type(task).eval_defaults, **type(task).eval_presets.get(preset or "", {}),
                                      **opts.get("eval", {})},
                        "eval", "the evaluation protocol")
    return Components(task, encoder, pretext, aggregator, train, ev)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


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
    from histobench.cohorts.manifest import data_root, validate_manifest
    from histobench.cohorts.status import StatusTable, validate_manifest_rows

    status = status if status is not None else StatusTable()
    if spec.demo:
        out = Path(spec.workdir) / "demo" / task.name
        with reporter.stage(f"demo cohort {task.name}", total=None, unit="slides"):
            df = task.demo_cohort(out, seed=0)
    else:
        df = task.cohort(data_root(spec.data_root))
    df = validate_manifest(df, ["label"] if task.task_kind != "survival" else ["time", "event"], source=f"task {task.name}")
    df, problems = validate_manifest_rows(df, task, check_known_ids=not spec.demo)
    for slide_id, reason in problems:
        _problem(spec, reporter, status, slide_id, "manifest", reason)
    if df.empty:
        raise HistobenchError(f"no usable slide in the cohort of task {task.name} ({status.summary()})")
    reporter.info(f"cohort {task.name}: {len(df)} slides, {df['case_id'].nunique()} patients")
    return df.reset_index(drop=True)


def _tile_slides(spec: RunSpec, manifest, reporter: Reporter, status, stage: str, out_dir: Path, make, empty: str):
    """Run ``make(slide) -> TileSet`` on every usable slide of the manifest, caching one ``.npz`` per slide.

    A slide that is missing, unreadable, truncated, without resolution or without tissue is recorded in the
    status table (``WORKDIR/status.csv``) and skipped; ``--fail-fast`` stops at the first one instead.
    """
    from histobench.cohorts.status import check_slide
    from histobench.pretrain.data import SlideTiles
    from histobench.slides.reader import open_slide
    from histobench.slides.tiling import TileSet, slide_fingerprint

    slides = []
    with reporter.stage(stage, total=len(manifest), unit="slides") as st:
        for row in manifest.itertuples():
            path = out_dir / f"{row.slide_id}.npz"
            st.advance()
            try:
                # a cached tile set counts only for the same slide file (same content fingerprint)
                source = slide_fingerprint(row.path) if Path(row.path).exists() else None
                tiles = TileSet.load(path) if source and path.exists() else None
                if tiles is None or tiles.source != source:
                    reason = check_slide(row)
                    if reason:
                        _problem(spec, reporter, status, row.slide_id, stage, reason)
                        continue
                    with open_slide(row.path) as slide:
                        tiles = make(slide)
                    tiles.source = source
                    tiles.save(path)
            except HistobenchError as err:
                _problem(spec, reporter, status, row.slide_id, stage, str(err))
                continue
            if len(tiles) == 0:
                _problem(spec, reporter, status, row.slide_id, stage, empty)
            else:
                status.add(row.slide_id, stage, "ok", f"{len(tiles)} tiles")
                slides.append(SlideTiles(row.slide_id, Path(row.path), tiles))
    _save_status(status, spec)
    if not slides:
        raise HistobenchError(f"no slide of the cohort has tissue ({status.summary()})")
    return slides


def tile_cohort(manifest, task: Task, workdir: Path, reporter: Reporter, spec: RunSpec | None = None, status=None):
    """Tile every slide at the task's µm/px and size (cached per slide); returns ``[SlideTiles]``."""
    from histobench.cohorts.status import StatusTable
    from histobench.slides.tiling import tile_slide

    spec = spec or RunSpec(task=task.name, workdir=Path(workdir))
    status = status if status is not None else StatusTable()
    o = task.options
    out_dir = Path(workdir) / "tiles" / f"mpp{o.mpp:g}-px{o.tile_size}-t{o.min_tissue:g}"
    slides = _tile_slides(spec, manifest, reporter, status, "tile", out_dir,
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
    from histobench.pretrain.data import SlideTiles
    from histobench.slides.tiling import select_tiles

    if not max_tiles:
        return slides
    return [SlideTiles(s.slide_id, s.path, select_tiles(s.tiles, max_tiles, seed), s.mpp) for s in slides]


def pretrain_stage(spec: RunSpec, comps: Components, slides, reporter: Reporter, tracker=None, grids=None):
    """Train the pretext on the cohort's tiles (or on region ``grids``: ``(GridDataset, key)``).

    Returns ``(encoder module, PretrainResult, checkpoint folder)``.
    """
    from histobench.pretrain.data import SlideTileDataset, cache_uint8
    from histobench.pretrain.trainer import pretrain

    train = comps.train
    if grids is not None:
        data, data_key = grids
    else:
        capped = _cap(slides, train.max_tiles_per_slide, spec.seed)
        dataset = SlideTileDataset(capped, decode="jpeg")  # direct JPEG tiles where possible: openslide's pixels, faster
        data_key = _digest([(s.slide_id, s.tiles.key(), len(s.tiles), s.tiles.source) for s in capped])
        cache = Path(spec.workdir) / "tilecache" / f"{data_key}.npy"
        rank, world = _rank()
        if rank == 0:  # one rank decodes the cache; the others wait for it, then read the same file
            data = cache_uint8(dataset, cache, reporter, train.num_workers)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
            if rank:
                data = cache_uint8(dataset, cache, reporter, train.num_workers)
    resolved = comps.resolved()  # only what changes the encoder: not the aggregator or the evaluation policy
    fingerprint = _digest({k: resolved[k] for k in ("encoder", "pretext", "train")} | {"data": data_key, "seed": spec.seed})
    out_dir = Path(spec.workdir) / "pretrain" / f"{comps.pretext.name}-{fingerprint}"
    result = pretrain(comps.pretext, comps.encoder, data, train, out_dir=out_dir, seed=spec.seed,
                      device=spec.device, reporter=reporter, tracker=tracker)
    import torch

    if _rank()[0] == 0:
        torch.save(result.encoder.state_dict(), out_dir / "encoder.pt")
    return result.encoder, result, out_dir


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
    out = Path(spec.workdir) / "features" / cache_key(name, w, mpp or o.mpp, tile_size or o.tile_size)
    res = extract_features(encoder, comps.encoder.transform(), slides, out, encoder_name=name, weights=w,
                           device=spec.device, reporter=reporter, num_workers=0 if spec.demo else None)
    return FeatureDir(out), res, w


# ------------------------------------------------------------------------------------- region encoders


def region_cohort(spec: RunSpec, comps: Components, manifest, reporter: Reporter, status=None):
    """Regions of every slide for a hierarchical (``grid``) encoder, cached per slide: ``[SlideTiles]``
    whose tiles are whole regions (``grid x grid`` patches of ``patch_px`` at ``patch_mpp``)."""
    from histobench.cohorts.status import StatusTable
    from histobench.features.regions import region_tiles

    status = status if status is not None else StatusTable()
    o = comps.encoder.options
    out_dir = Path(spec.workdir) / "regions" / f"mpp{o.patch_mpp:g}-px{o.patch_px}-g{o.grid_size}-t{o.min_tissue:g}"
    regions = _tile_slides(spec, manifest, reporter, status, "regions", out_dir,
                           lambda slide: region_tiles(slide, patch_mpp=o.patch_mpp, patch_px=o.patch_px,
                                                      grid=o.grid_size, min_tissue=o.min_tissue),
                           "no tissue region")
    n = sum(len(r.tiles) for r in regions)
    reporter.info(f"regions: {n} from {len(regions)} slides, {o.grid_size}x{o.grid_size} patches of {o.patch_px} px "
                  f"at {o.patch_mpp:g} µm/px")
    return regions


def patch_grids(spec: RunSpec, comps: Components, regions, reporter: Reporter, tracker=None):
    """Embed every patch of every region with the frozen patch encoder; returns ``{slide_id: [R, D, g, g]}``.

    The patch encoder is built from the region encoder's ``patch_encoder*`` options, optionally pretrained
    first in the same run (``patch_pretext``, e.g. ``dino``) on the regions' patches.
    """
    import torch

    from histobench.features.cache import read_features
    from histobench.features.regions import patches_of, to_grids
    from histobench.pretrain.data import SlideTiles

    o = comps.encoder.options
    preset = o.patch_encoder_preset
    patch_enc = create("encoder", o.patch_encoder, o.patch_encoder_options, preset)
    patches = [SlideTiles(r.slide_id, r.path, patches_of(r.tiles, o.grid_size, o.patch_px)) for r in regions]
    if o.patch_pretext != NO_PRETEXT:
        pre = create("pretext", o.patch_pretext, None, preset)
        sub = Components(comps.task, patch_enc, pre, comps.aggregator, type(pre).train_options(preset), comps.eval)
        with tracker.run(comps.task.name, f"pretrain patches {pre.name}", stage="pretrain", nested=True) if tracker else nullcontext():
            module, _, ckpt = pretrain_stage(spec, sub, patches, reporter, tracker)
        tag = f"{pre.name}-{ckpt.name.rsplit('-', 1)[-1]}"
    else:
        torch.manual_seed(spec.seed)
        module, tag = patch_enc.build(), patch_enc.weights_tag()
    if module.embed_dim != o.in_dim:
        raise HistobenchError(f"patch encoder {o.patch_encoder!r} gives {module.embed_dim}-d patches but encoder "
                              f"{comps.encoder.name!r} expects in_dim={o.in_dim}; set -o encoder.in_dim={module.embed_dim}")
    sub = Components(comps.task, patch_enc, None, comps.aggregator, None, comps.eval)
    feats, _, _ = extract_stage(spec, sub, module, patches, reporter, tag, mpp=o.patch_mpp, tile_size=o.patch_px)
    return {p.slide_id: to_grids(read_features(feats.path(p.slide_id))[0], o.grid_size) for p in patches}


def grid_dataset(comps: Components, manifest, grids: dict):
    """All regions of the cohort as one :class:`GridDataset` (slides contiguous), with slide labels."""
    from histobench.features.regions import GridDataset

    ids = list(grids)
    labels = None
    if comps.task.classes and "label" in manifest.columns:
        index = {c: i for i, c in enumerate(comps.task.classes)}
        by_slide = dict(zip(manifest["slide_id"], manifest["label"].astype(str)))
        labels = np.array([index.get(by_slide.get(i), -1) for i in ids])
    slide_index = np.concatenate([np.full(len(grids[i]), k) for k, i in enumerate(ids)])
    return GridDataset(np.concatenate([grids[i] for i in ids]), slide_index, labels), _digest(
        [(i, grids[i].shape, float(grids[i].sum())) for i in ids])


def region_features(spec: RunSpec, comps: Components, encoder, regions, grids: dict, reporter: Reporter, weights_tag: str):
    """Embed every region with the region encoder: one HDF5 file per slide (features ``[R, D]``, region coords)."""
    import torch

    from histobench import __version__
    from histobench.features.cache import FeatureDir, cache_key, is_complete, weights_hash, write_features

    o = comps.encoder.options
    w = weights_hash(encoder)
    name = f"{comps.encoder.name}:{weights_tag}"
    out = Path(spec.workdir) / "features" / cache_key(name, w, o.patch_mpp, o.patch_px * o.grid_size)
    dev = resolve_device(spec.device)
    encoder = encoder.to(dev).eval()
    with reporter.stage(f"extract {comps.encoder.name}", total=len(regions), unit="slides") as st, torch.inference_mode():
        for r in regions:
            attrs = {"encoder": name, "weights_hash": w, "mpp": o.patch_mpp, "tile_size": o.patch_px * o.grid_size,
                     "slide_fingerprint": r.tiles.source}
            path = out / f"{r.slide_id}.h5"
            if not is_complete(path, attrs):
                g = torch.as_tensor(grids[r.slide_id])
                f = torch.cat([encoder(g[i:i + 256].to(dev)).float().cpu() for i in range(0, len(g), 256)])
                write_features(path, f.numpy(), r.tiles.coords, {**attrs, "histobench_version": __version__,
                                                                 "slide_id": r.slide_id})
            st.advance()
    return FeatureDir(out), w


@dataclass
class CohortInputs:
    """What the encoder reads: tiles of every slide, or, for a ``grid`` encoder, regions and their patch grids."""

    slides: list  # [SlideTiles]: tiles, or whole regions
    grids: dict | None = None  # {slide_id: [R, D, g, g]} for hierarchical encoders


def cohort_inputs(spec: RunSpec, comps: Components, manifest, reporter: Reporter, status=None, tracker=None) -> CohortInputs:
    """Tile the cohort for the encoder: the task's tiles, or regions as grids of frozen patch embeddings."""
    if comps.encoder.input_kind == "grid":  # HIPT, SLPD
        regions = region_cohort(spec, comps, manifest, reporter, status)
        return CohortInputs(regions, patch_grids(spec, comps, regions, reporter, tracker))
    return CohortInputs(tile_cohort(manifest, comps.task, spec.workdir, reporter, spec, status))


def pretrain_inputs(spec: RunSpec, comps: Components, manifest, inputs: CohortInputs, reporter: Reporter, tracker=None):
    """``pretrain_stage`` on whichever inputs the encoder reads."""
    grids = grid_dataset(comps, manifest, inputs.grids) if inputs.grids is not None else None
    return pretrain_stage(spec, comps, inputs.slides, reporter, tracker, grids=grids)


def encode_cohort(spec: RunSpec, comps: Components, encoder, inputs: CohortInputs, reporter: Reporter, weights_tag: str):
    """Features of every slide: ``(FeatureDir, weights hash, ExtractResult or None for region encoders)``."""
    if inputs.grids is not None:
        features, w = region_features(spec, comps, encoder, inputs.slides, inputs.grids, reporter, weights_tag)
        return features, w, None
    features, ext, w = extract_stage(spec, comps, encoder, inputs.slides, reporter, weights_tag)
    return features, w, ext


def evaluate_stage(spec: RunSpec, comps: Components, manifest, features, reporter: Reporter):
    """Patient-level k-fold evaluation of the aggregator on the features; returns ``(EvalResult, Splits)``."""
    from histobench.cohorts.splits import check_leaks, task_splits
    from histobench.evaluate.protocol import evaluate_features

    task = comps.task
    splits = task_splits(task, manifest, workdir=Path(spec.workdir), preset=spec.split, seed=0)
    leaks = check_leaks(splits, manifest, allow_leaks=spec.allow_leaky_splits)
    if leaks:
        reporter.warn(f"split {splits.name!r} has {leaks} patient-fold leaks; evaluating anyway (--allow-leaky-splits)")
    with reporter.stage(f"evaluate {comps.aggregator.name}", total=splits.folds * comps.eval.seeds, unit="folds") as st:
        result = evaluate_features(task_kind=task.task_kind, classes=list(task.classes), manifest=manifest,
                                   features=features, splits=splits, aggregator=comps.aggregator, opts=comps.eval,
                                   metrics=list(task.metrics) or None,
                                   progress=lambda *_: st.advance())
    return result, splits


# ------------------------------------------------------------------------------------------------ run


@dataclass
class RunResult:
    run_id: str | None
    per_fold: list[dict[str, float]]
    summary: dict[str, dict[str, float]]
    primary_metric: str
    seconds: float
    tracking_uri: str


def provenance(comps: Components) -> dict[str, str]:
    from histobench import __version__
    from histobench.plugins import plugin_versions
    from histobench.tracking import git_sha, hardware

    names = {"task": comps.task.name, "encoder": comps.encoder.name, "aggregator": comps.aggregator.name}
    if comps.pretext is not None:
        names["pretext"] = comps.pretext.name
    plugins = {}
    for kind, name in names.items():
        entry = get_component(kind, name)
        plugins[f"histobench.plugin.{kind}"] = f"{entry.plugin} {entry.version}"
    return {"histobench.version": __version__, "histobench.git_sha": git_sha(),
            **{f"histobench.hw.{k}": v for k, v in hardware().items()}, **plugins,
            "histobench.plugins": json.dumps(plugin_versions())}


def log_evaluation(tracker, spec: RunSpec, comps: Components, manifest, result, splits, features_root: Path,
                   run_id: str | None, extra_metrics: dict[str, float] | None = None) -> Path:
    """Log an evaluation into the current parent run: a nested run per fold (and seed), the summary metrics
    with CIs, predictions, the resolved config, the split file and the plots. Returns the artifact folder."""
    from histobench.evaluate.plots import log_evaluation_artifacts
    from histobench.tracking import write_json

    task = comps.task
    tracker.tags({"histobench.split_hash": splits.hash, "histobench.split_name": splits.name,
                  "histobench.split_leaks": result.n_leaks})
    for fold_metrics, (k, s) in zip(result.per_fold, result.per_fold_index):
        name = f"fold {k}" + (f" seed {s}" if comps.eval.seeds > 1 else "")
        with tracker.run(task.name, name, stage="fold", nested=True):
            tracker.params({"fold": k, "seed_repeat": s, "split_hash": splits.hash})
            tracker.metrics(fold_metrics)
    summary = {f"{metric}_{stat}": value for metric, st in result.summary.items() for stat, value in st.items()}
    summary["eval/slides_skipped"] = result.n_skipped
    tracker.metrics({**summary, **(extra_metrics or {})})
    art = Path(spec.workdir) / "runs" / (run_id or "untracked")
    art.mkdir(parents=True, exist_ok=True)
    result.predictions.to_csv(art / "predictions.csv", index=False)
    write_json({"spec": {k: str(v) for k, v in spec.__dict__.items()}, "resolved": comps.resolved()}, art / "config.json")
    tracker.artifact(art / "predictions.csv")
    tracker.artifact(art / "config.json")
    tracker.artifact(Path(spec.workdir) / "splits" / f"{task.name}-{splits.name}-{splits.hash}.csv", "splits")
    log_evaluation_artifacts(tracker, result, manifest, art, features_root=features_root,
                             mpp=task.options.mpp, tile_size=task.options.tile_size)
    return art


def run(spec: RunSpec, reporter: Reporter | None = None) -> RunResult:
    """The whole pipeline for one task and one pretext, logged as one MLflow parent run.

    Under ``torchrun`` every rank prepares the cohort, pretrains (DistributedDataParallel) and extracts (its
    share of the slides); then rank 0 alone evaluates and logs to MLflow, and the other ranks return a
    result without folds.
    """
    from histobench.cohorts.status import StatusTable
    from histobench.pretrain.trainer import init_distributed
    from histobench.tracking import Tracker

    reporter = reporter or Reporter()
    t0 = time.perf_counter()
    rank, _ = init_distributed()
    comps = resolve(spec)
    if not spec.demo:  # a missing data root is a user mistake, not a failed run
        from histobench.cohorts.manifest import data_root

        data_root(spec.data_root)
    tracker = Tracker(spec.tracking_uri, enabled=spec.track and rank == 0)
    task = comps.task
    pretext_name = comps.pretext.name if comps.pretext else NO_PRETEXT
    run_name = f"{pretext_name}+{comps.encoder.name}+{comps.aggregator.name}" + ("-demo" if spec.demo else "")
    with tracker.run(task.name, run_name, stage="run", tags={"histobench.demo": spec.demo}) as run_id:
        tracker.params({"run": {"pretext": pretext_name, "seed": spec.seed, "demo": spec.demo}, **comps.resolved()})
        tracker.tags(provenance(comps))
        status = StatusTable()
        manifest = load_cohort(spec, task, reporter, status)
        inputs = cohort_inputs(spec, comps, manifest, reporter, status, tracker)
        tracker.metrics({"cohort/slides": len(manifest), "cohort/patients": manifest["case_id"].nunique(),
                         "cohort/tiles": sum(len(s.tiles) for s in inputs.slides),
                         "cohort/slides_skipped": len(status.problems())})
        tracker.artifact(Path(spec.workdir) / "status.csv")

        if comps.pretext is not None:
            with tracker.run(task.name, f"pretrain {pretext_name}", stage="pretrain", nested=True):
                tracker.params({"pretext": comps.resolved()["pretext"], "train": comps.train.model_dump()})
                encoder, pre, ckpt_dir = pretrain_inputs(spec, comps, manifest, inputs, reporter, tracker)
                tracker.metrics({"pretrain/images_per_second": pre.images_per_second, "pretrain/steps": pre.steps,
                                 "pretrain/final_loss": pre.history[-1]["loss"] if pre.history else float("nan")})
                tracker.artifact(ckpt_dir / "encoder.pt", "encoder")
            weights_tag = f"{pretext_name}-{ckpt_dir.name.rsplit('-', 1)[-1]}"
        else:
            import torch

            torch.manual_seed(spec.seed)
            encoder = comps.encoder.build()
            weights_tag = comps.encoder.weights_tag()

        with tracker.run(task.name, "extract", stage="extract", nested=True):
            features, w, ext = encode_cohort(spec, comps, encoder, inputs, reporter, weights_tag)
            if ext is not None:
                tracker.metrics({"extract/tiles_per_second": ext.tiles_per_second, "extract/tiles": ext.tiles,
                                 "extract/slides_extracted": ext.extracted, "extract/slides_cached": ext.skipped})
            tracker.params({"encoder": comps.encoder.name, "weights_hash": w, "feature_dir": str(features.root)})
        tracker.tags({"histobench.weights_hash": w})
        if rank != 0:  # every feature file is written (extraction ends on a barrier): rank 0 evaluates
            return RunResult(None, [], {}, task.primary_metric, time.perf_counter() - t0, tracker.uri)

        result, splits = evaluate_stage(spec, comps, manifest, features, reporter)
        log_evaluation(tracker, spec, comps, manifest, result, splits, features.root, run_id,
                       extra_metrics={"wall_seconds": time.perf_counter() - t0})
    return RunResult(run_id, result.per_fold, result.summary, task.primary_metric, time.perf_counter() - t0, tracker.uri)
