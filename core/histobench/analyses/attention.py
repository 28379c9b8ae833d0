"""``histobench analyze attention``: how sparse and how diverse a ViT's last-block [CLS] attention is.

DiRL (Kapse et al., arXiv 2309.06439) claims that prior-guided dense pretraining spreads a ViT's class-token
attention over more of the tissue than DINO does. This analysis measures that for any ViT encoder (DINO, DiRL,
SLPD's patch encoder, a hub checkpoint) on the task's fixed held-out tile set, as reconstructed in
``shared/methods/dirl.md`` §4.4 (the paper's exact measures are unverified):

* the last block's [CLS]→patch attention of every head (``module.cls_attention(x)``, rows renormalised over the
  patches; :func:`histobench.ssl.attention.vit_cls_attention` recomputes it from the block's ``qkv`` since fused
  attention returns no weights, the spec's pitfall 9);
* per image and head: normalised entropy, mass coverage F(0.6) and F(0.9), Gini; per image: the heads' mean
  pairwise Jensen–Shannon divergence (:mod:`histobench.analyses.attention_metrics`);
* with ``segmenter`` set (e.g. ``oracle`` on demo tiles): nuclei of every tile, grouped into cell types
  (``grouping=types``) or nucleus vs none (``binary``), pooled to token occupancy; then the prior-coverage
  KL(s ‖ m) and the number of groups receiving ≥ 5 % of the attention;
* each metric averaged over heads per image, then mean ± sd over the tiles (per head in the report and CSV);
* with two or more encoders, a paired Wilcoxon signed-rank test over the images for every metric and every pair
  (first minus second), with the median difference and its direction; p-values are not corrected for the
  number of tests;
* overlay PNGs of the attention thresholded at mass 0.6 on a few tiles, one grid per encoder
  (:mod:`histobench.analyses.attention_overlay`).

Logged metrics: ``<metric>/<label>`` (mean over tiles), ``<metric>_sd/<label>``, and for each pair
``wilcoxon_p/<metric>/<a>_vs_<b>`` and ``median_diff/<metric>/<a>_vs_<b>``. Files: ``attention_tiles.csv``
(head-averaged values per tile and encoder), ``attention_heads.csv`` (mean ± sd per head) and
``attention_overlay_<label>.png``.
"""

from __future__ import annotations

import re
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from histobench.analyses import attention_metrics as am
from histobench.components import Analysis, TileRef
from histobench.errors import HistobenchError

if TYPE_CHECKING:  # pragma: no cover
    from histobench.analyze import AnalysedEncoder, AnalysisInputs

NO_SEGMENTER = "none"
OVERLAY_MASS = 0.6
ATTENTION_METRICS = ("entropy", "mass_coverage_0.6", "mass_coverage_0.9", "gini")
PRIOR_METRICS = ("prior_kl", "prior_groups")
IMAGE_METRICS = ("head_js",)
_FILE_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


class AttentionAnalysis(Analysis):
    """Sparsity and diversity of ViT encoders' last-block [CLS] attention (DiRL §4.4), with paired Wilcoxon tests."""

    name = "attention"
    min_encoders = 1
    max_encoders = 4

    class Options(Analysis.Options):
        batch_size: int = Field(64, ge=1, description="Tiles per forward pass.")
        overlay_tiles: int = Field(6, ge=0, le=64, description="Tiles drawn in each encoder's overlay grid (0: none).")
        segmenter: str = Field(NO_SEGMENTER, description="Segmenter whose nuclei give the prior-coverage metrics "
                                                         "(e.g. oracle on demo tiles); none skips them.")
        segmenter_options: dict[str, Any] = Field(default_factory=dict, description="Options of that segmenter.")
        grouping: Literal["types", "binary"] = Field(
            "types", description="Groups of the prior: the segmenter's cell types plus no-nucleus, or nucleus vs none.")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.options.segmenter != NO_SEGMENTER:  # a misspelt segmenter or option fails before any loading
            from histobench.registry import create

            create("segmenter", self.options.segmenter, self.options.segmenter_options)

    def run(self, inputs: "AnalysisInputs"):
        from histobench.analyze import AnalysisResult

        reporter = inputs.reporter  # progress bars with throughput for the per-tile loops (silent in tests)
        for enc in inputs.encoders:
            if not callable(getattr(enc.module, "cls_attention", None)):
                raise HistobenchError(f"encoder {enc.label} ({enc.name}) has no [CLS] attention (cls_attention): "
                                      "the attention analysis needs a ViT encoder")
        prior = self._prior(inputs, reporter)
        per_encoder, attention = [], {}
        for enc in inputs.encoders:
            att, grid = encoder_attention(enc, inputs, self.options.batch_size, reporter)
            attention[enc.label] = (att, grid)
            per_encoder.append((enc.label, grid, image_metrics(att, grid, prior)))
        names = list(ATTENTION_METRICS) + (list(PRIOR_METRICS) if prior else []) + list(IMAGE_METRICS)

        metrics: dict[str, float] = {}
        rows = []
        for label, grid, values in per_encoder:
            row: dict[str, Any] = {"label": label, "grid": list(grid), "tokens": grid[0] * grid[1],
                                   "heads": int(attention[label][0].shape[1]), "tiles": len(inputs.tiles)}
            for m in names:
                mean, sd, n = am.summary(values[m].mean(axis=1) if values[m].ndim == 2 else values[m])
                row[m] = {"mean": mean, "sd": sd, "n": n}
                if values[m].ndim == 2:
                    row[m]["per_head"] = [dict(zip(("mean", "sd", "n"), am.summary(values[m][:, h])))
                                          for h in range(values[m].shape[1])]
                metrics[f"{m}/{label}"] = mean
                metrics[f"{m}_sd/{label}"] = sd
            rows.append(row)

        tests = []
        for (la, _, va), (lb, _, vb) in combinations(per_encoder, 2):
            for m in names:
                res = am.paired_wilcoxon(_per_image(va[m]), _per_image(vb[m]))
                tests.append({"metric": m, "first": la, "second": lb, **res})
                metrics[f"wilcoxon_p/{m}/{la}_vs_{lb}"] = res["p"]
                metrics[f"median_diff/{m}/{la}_vs_{lb}"] = res["median_difference"]
                reporter.info(f"{m}: {la} {res['direction']} {lb} (median difference {res['median_difference']:+.4g}, "
                              f"Wilcoxon p = {res['p']:.3g}, n = {res['n']})")

        files = [write_tile_table(inputs, per_encoder, names), write_head_table(inputs.out_dir, rows, names)]
        files += self._overlays(inputs, attention)
        report = {"metrics": names, "encoders": rows, "tests": tests, "overlay_mass": OVERLAY_MASS,
                  "prior": prior.info if prior else None}
        return AnalysisResult(metrics=metrics, report=report, files=files)

    # ------------------------------------------------------------------------------------------- parts
    def _prior(self, inputs: "AnalysisInputs", reporter) -> "Prior | None":
        o = self.options
        if o.segmenter == NO_SEGMENTER:
            return None
        from histobench.registry import create

        segmenter = create("segmenter", o.segmenter, o.segmenter_options)
        tiles = inputs.tiles.permute(0, 2, 3, 1).contiguous().numpy()
        maps, failures = segment_tiles(segmenter, tiles, inputs.tile_refs, reporter)
        return Prior.from_maps(maps, o.grouping, segmenter.name, failures)

    def _overlays(self, inputs: "AnalysisInputs", attention: dict[str, tuple[np.ndarray, tuple[int, int]]]) -> list[Path]:
        from histobench.analyses.attention_overlay import overlay_grid

        n = min(self.options.overlay_tiles, len(inputs.tiles))
        if n == 0:
            return []
        idx = np.unique(np.linspace(0, len(inputs.tiles) - 1, n).round().astype(int))
        tiles = inputs.tiles[idx].permute(0, 2, 3, 1).numpy()
        labels = [f"{inputs.tile_refs[i].slide_id}\n({inputs.tile_refs[i].x}, {inputs.tile_refs[i].y})" for i in idx]
        files, used = [], set()
        with inputs.reporter.stage("attention overlays", total=len(attention), unit="encoders") as st:
            for label, (att, grid) in attention.items():
                stem = _FILE_UNSAFE.sub("_", label).strip("_") or "encoder"
                while stem in used:
                    stem += "_"
                used.add(stem)
                files.append(overlay_grid(tiles, att[idx], grid, inputs.out_dir / f"attention_overlay_{stem}.png",
                                          title=f"{label}: last-block [CLS] attention, top {OVERLAY_MASS:.0%} of the mass",
                                          p=OVERLAY_MASS, row_labels=labels))
                st.advance()
        return files


# ------------------------------------------------------------------------------------------- attention
def encoder_attention(enc: "AnalysedEncoder", inputs: "AnalysisInputs", batch_size: int,
                      reporter=None) -> tuple[np.ndarray, tuple[int, int]]:
    """``(float64 [N_tiles, heads, h*w], (h, w))``: ``enc``'s last-block [CLS]→patch attention of every tile."""
    import torch

    from histobench.reporting import Reporter

    reporter = reporter or Reporter()
    parts, grid = [], None
    with reporter.stage(f"attention of {enc.label}", total=len(inputs.tiles), unit="tiles") as st:
        for rows, x in inputs.batches(enc, batch_size):
            try:
                with torch.inference_mode():
                    a = enc.module.cls_attention(x)
            except HistobenchError as err:
                raise HistobenchError(f"encoder {enc.label}: {err}") from None
            if grid is None:
                grid = _grid(enc, x, int(a.shape[-1]))
            parts.append(a.double().cpu().numpy())
            st.advance(rows.stop - rows.start)
    if not parts:
        raise HistobenchError("the attention analysis got no tiles")
    return np.concatenate(parts), grid


def _grid(enc: "AnalysedEncoder", x, tokens: int) -> tuple[int, int]:
    token_grid = getattr(enc.module, "token_grid", None)
    if callable(token_grid):
        h, w = (int(v) for v in token_grid(x))
    else:
        h = w = int(round(tokens ** 0.5))
    if h * w != tokens:
        raise HistobenchError(f"encoder {enc.label}: {tokens} attention entries do not fill its {h}x{w} patch grid")
    return h, w


def _per_image(values: np.ndarray) -> np.ndarray:
    return values.mean(axis=1) if values.ndim == 2 else values


def image_metrics(attention: np.ndarray, grid: tuple[int, int], prior: "Prior | None" = None) -> dict[str, np.ndarray]:
    """Every metric per image: ``[N, heads]`` for the per-head ones, ``[N]`` for the heads' JS divergence;
    prior-coverage metrics (NaN for a tile the segmenter failed on) when ``prior`` is given."""
    a = am.as_rows(attention)
    out = {"entropy": am.normalised_entropy(a), "gini": am.gini(a)}
    for p in am.COVERAGE_LEVELS:
        out[f"mass_coverage_{p:g}"] = am.mass_coverage(a, p)
    if prior is not None:
        kl = np.full(a.shape[:2], np.nan)
        groups = np.full(a.shape[:2], np.nan)
        for i, g in enumerate(prior.maps):
            if g is not None:
                kl[i], groups[i] = am.prior_coverage(a[i], am.token_occupancy(g, prior.n_groups, grid))
        out["prior_kl"], out["prior_groups"] = kl, groups
    out["head_js"] = am.head_js_divergence(a)
    return out


# ------------------------------------------------------------------------------------------- the prior
class Prior:
    """Group-id maps of the tiles (``None`` where segmentation failed), their group count and a summary."""

    def __init__(self, maps: list[np.ndarray | None], n_groups: int, info: dict[str, Any]):
        self.maps, self.n_groups, self.info = maps, n_groups, info

    @classmethod
    def from_maps(cls, maps: list[tuple[np.ndarray, np.ndarray | None] | None], grouping: str, segmenter: str,
                  failures: list[tuple[int, str]]) -> "Prior":
        ok = [m for m in maps if m is not None]
        if grouping == "types":
            if any(types is None for _, types in ok):
                raise HistobenchError(f"segmenter {segmenter!r} gives no cell types; use -o analysis.grouping=binary")
            n_types = max([int(t.max()) if t.size else 0 for _, t in ok] + [1])
        else:
            n_types = 1
        groups = [None if m is None else am.group_map(m[0], m[1], grouping, n_types) for m in maps]
        names = ["no nucleus"] + (["nucleus"] if grouping == "binary" else [f"type {k}" for k in range(1, n_types + 1)])
        area = np.zeros(n_types + 1)
        for g in groups:
            if g is not None:
                area += np.bincount(g.ravel(), minlength=n_types + 1) / g.size
        info = {"segmenter": segmenter, "grouping": grouping, "groups": names,
                "area_share": (area / max(len(ok), 1)).round(6).tolist(), "tiles": len(maps),
                "segmented": len(ok), "failed": [{"tile": i, "reason": r} for i, r in failures]}
        return cls(groups, n_types + 1, info)


def segment_tiles(segmenter, tiles: np.ndarray, refs: list[TileRef], reporter=None, what: str = "held-out tiles"
                  ) -> tuple[list[tuple[np.ndarray, np.ndarray | None] | None], list[tuple[int, str]]]:
    """``segmenter`` on every tile (uint8 ``[N, S, S, 3]``): ``[(instances, types) or None per tile]`` and
    ``[(tile index, reason)]`` for the tiles it failed on. A segmenter with ``own_process`` runs in one spawned
    worker process; others run here. A :class:`HistobenchError` (a user mistake) stops the analysis."""
    from histobench.reporting import Reporter

    reporter = reporter or Reporter()
    with reporter.stage(f"segment {what} ({segmenter.name})", total=len(tiles), unit="tiles") as st:
        if type(segmenter).own_process:
            results = _in_worker(segmenter, tiles, refs)
            st.advance(len(tiles))
        else:
            segmenter.setup()
            results = []
            for tile, ref in zip(tiles, refs):
                results.append(_segment_one(segmenter, tile, ref))
                st.advance()
    maps, failures = [], []
    for i, (ok, value) in enumerate(results):
        if ok:
            maps.append(value)
        else:
            maps.append(None)
            failures.append((i, value))
    if failures:
        reporter.warn(f"segmenter {segmenter.name!r} failed on {len(failures)} of {len(tiles)} tiles "
                      f"(first: {failures[0][1]}); their prior metrics are left out")
    return maps, failures


def _segment_one(segmenter, tile: np.ndarray, ref: TileRef) -> tuple[bool, Any]:
    from histobench.segment.runner import _reason, check_maps

    try:
        inst, types = segmenter.segment(tile, ref)
        return True, check_maps(inst, types, tile.shape[0])
    except HistobenchError as err:
        raise HistobenchError(f"segmenter {segmenter.name!r}: {err}") from None
    except Exception as err:  # noqa: BLE001 - one bad tile is recorded, not fatal
        return False, _reason(err)


_WORKER_SEGMENTER = None


def _worker_segment(path: str, options: dict, tiles: np.ndarray, refs: list[TileRef]) -> list[tuple[bool, Any]]:
    """In a spawned process: build and set up the segmenter once, then segment the tiles."""
    global _WORKER_SEGMENTER
    from histobench.segment.runner import load_class

    if _WORKER_SEGMENTER is None:
        _WORKER_SEGMENTER = load_class(path)(options)
        _WORKER_SEGMENTER.setup()
    return [_segment_one(_WORKER_SEGMENTER, t, r) for t, r in zip(tiles, refs)]


def _in_worker(segmenter, tiles: np.ndarray, refs: list[TileRef]) -> list[tuple[bool, Any]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from histobench.segment.runner import class_path

    path, options = class_path(type(segmenter)), segmenter.options.model_dump(mode="json")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_worker_segment, path, options, tiles, list(refs)).result()
        except BrokenProcessPool:
            raise HistobenchError(f"segmenter {segmenter.name!r}: its worker process died (crash or out of memory)") from None


# ------------------------------------------------------------------------------------------- tables
def write_tile_table(inputs: "AnalysisInputs", per_encoder: list, names: list[str]) -> Path:
    """``attention_tiles.csv``: where each tile lies, then every encoder's head-averaged metrics."""
    import pandas as pd

    refs = inputs.tile_refs
    table = {"slide_id": [r.slide_id for r in refs], "x": [r.x for r in refs], "y": [r.y for r in refs]}
    for label, _, values in per_encoder:
        for m in names:
            table[f"{label}:{m}"] = _per_image(values[m])
    path = inputs.out_dir / "attention_tiles.csv"
    pd.DataFrame(table).to_csv(path, index=False)
    return path


def write_head_table(out_dir: Path, rows: list[dict[str, Any]], names: list[str]) -> Path:
    """``attention_heads.csv``: mean and sd over the tiles of every per-head metric, per encoder and head."""
    import pandas as pd

    records = []
    for row in rows:
        for h in range(row["heads"]):
            rec: dict[str, Any] = {"encoder": row["label"], "head": h}
            for m in names:
                if "per_head" in row[m]:
                    rec[f"{m}_mean"], rec[f"{m}_sd"] = row[m]["per_head"][h]["mean"], row[m]["per_head"][h]["sd"]
            records.append(rec)
    path = Path(out_dir) / "attention_heads.csv"
    pd.DataFrame(records).to_csv(path, index=False)
    return path


__all__ = ["AttentionAnalysis", "encoder_attention", "image_metrics", "segment_tiles", "Prior"]
