"""Evaluation plots (matplotlib, Agg backend): ROC curves, confusion matrix, Kaplan-Meier, attention heatmaps.

Each ``plot_*`` returns a matplotlib ``Figure``; :func:`log_evaluation_artifacts` draws the ones that fit the
task kind from an :class:`~histobench.evaluate.protocol.EvalResult` and logs them as MLflow artifacts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pandas as pd

from histobench.evaluate.metrics import confusion_matrix

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


def _figure(size: tuple[float, float] = (4.5, 4.0)) -> "Figure":
    from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

    return Figure(figsize=size, dpi=110, layout="constrained")


def _roc_points(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-score, kind="mergesort")
    s, p = score[order], positive[order].astype(float)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # thresholds between distinct scores
    tp, fp = np.cumsum(p)[last], np.cumsum(1 - p)[last]
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def plot_roc(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> "Figure":
    """One-vs-rest ROC curve per class (one curve for a binary task) on pooled out-of-fold predictions."""
    from histobench.evaluate.metrics import macro_auc

    y = np.asarray(y_true, dtype=int)
    p = np.asarray(probs, dtype=np.float64)
    fig = _figure()
    ax = fig.add_subplot()
    shown = [1] if p.shape[1] == 2 else range(p.shape[1])
    for c in shown:
        pos = y == c
        if pos.all() or not pos.any():
            continue
        fpr, tpr = _roc_points(pos, p[:, c])
        auc = macro_auc(pos.astype(int), p[:, c])
        ax.plot(fpr, tpr, label=f"{classes[c]} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (out-of-fold)")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_confusion(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> "Figure":
    """Confusion matrix (rows: truth, columns: prediction), counts annotated, colour = row share."""
    n = len(classes)
    cm = confusion_matrix(y_true, y_pred, n)
    cm = np.zeros((n, n), np.int64) if cm is None else cm
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = _figure((1.2 + 0.6 * n, 1.0 + 0.6 * n))
    ax = fig.add_subplot()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=45 if n > 3 else 0)
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title="confusion (out-of-fold)")
    return fig


def plot_km(time: np.ndarray, event: np.ndarray, high_risk: np.ndarray, p_value: float | None = None,
            unit: str = "months") -> "Figure":
    """Kaplan-Meier curves of the low- and high-risk groups, with the log-rank p in the title."""
    from histobench.evaluate.survival import kaplan_meier, logrank_test

    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    g = np.asarray(high_risk).astype(bool)
    if p_value is None:
        p_value = logrank_test(t, e, g)[1]
    fig = _figure()
    ax = fig.add_subplot()
    for label, sel, colour in (("low risk", ~g, "tab:blue"), ("high risk", g, "tab:red")):
        if sel.any():
            kt, ks = kaplan_meier(t[sel], e[sel])
            ax.step(np.r_[kt, t[sel].max()], np.r_[ks, ks[-1]], where="post", c=colour, label=f"{label} (n={sel.sum()})")
            cens = sel & ~e
            ax.plot(t[cens], np.interp(t[cens], kt, ks, right=ks[-1]) if len(kt) else np.ones(cens.sum()), "|", c=colour, ms=6)
    ax.set(xlabel=f"time ({unit})", ylabel="survival probability", ylim=(0, 1.02),
           title=f"Kaplan-Meier by median risk (log-rank p = {p_value:.3g})")
    ax.legend(loc="lower left", fontsize=8)
    return fig


def plot_attention_heatmap(thumbnail_rgb: np.ndarray, coords: np.ndarray, attention: np.ndarray,
                           tile_size_level0: float, downsample: float, title: str = "") -> "Figure":
    """Tile attention over the slide thumbnail.

    ``coords [N, 2]`` are level-0 ``(x, y)`` top-left corners, ``tile_size_level0`` the tile side in level-0
    pixels, ``downsample`` the factor from level 0 to the thumbnail. Attention is min-max scaled per slide.
    """
    img = np.asarray(thumbnail_rgb)
    h, w = img.shape[:2]
    a = np.asarray(attention, dtype=np.float64)
    a = (a - a.min()) / (a.max() - a.min()) if a.max() > a.min() else np.ones_like(a)
    heat = np.full((h, w), np.nan)
    side = max(1, int(round(tile_size_level0 / downsample)))
    for (x, y), v in zip(np.asarray(coords, dtype=np.float64), a):
        c0, r0 = int(x / downsample), int(y / downsample)
        block = heat[r0:r0 + side, c0:c0 + side]
        heat[r0:r0 + side, c0:c0 + side] = np.fmax(block, v)
    fig = _figure((6.0, 6.0 * h / max(w, 1) + 0.4))
    ax = fig.add_subplot()
    ax.imshow(img)
    im = ax.imshow(np.ma.masked_invalid(heat), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.04, label="attention (scaled)")
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    return fig


def save(fig: "Figure", path: Path) -> Path:
    """Write ``fig`` as PNG (creating folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def evaluation_figures(result: Any, manifest: pd.DataFrame | None = None, *, features_root: Path | None = None,
                       mpp: float | None = None, tile_size: int | None = None,
                       max_heatmaps: int = 4) -> dict[str, "Figure"]:
    """The figures for ``result``: ``filename -> Figure``.

    Classification: ``roc.png``, ``confusion.png``; survival: ``km.png`` (discrete-time risk) and
    ``km_cox.png``. Heatmaps ``attention/<slide_id>.png`` for up to ``max_heatmaps`` slides of
    ``result.attention`` when the manifest (``slide_id, path``), the feature folder (coords) and the task's
    ``mpp``/``tile_size`` are given; a slide that cannot be read is skipped.
    """
    from histobench.evaluate.protocol import high_risk_groups, logrank_pooled

    pred = result.predictions
    first = pred[pred["seed"] == pred["seed"].min()] if "seed" in pred else pred
    figs: dict[str, Figure] = {}
    if result.task_kind == "survival":
        for name, col in (("km.png", "risk"), ("km_cox.png", "cox_risk")):
            if col in first:
                figs[name] = plot_km(first["time"], first["event"], high_risk_groups(first, col),
                                     logrank_pooled(first, col))
    else:
        probs = first[[f"prob_{c}" for c in result.classes]].to_numpy()
        figs["roc.png"] = plot_roc(first["label"].to_numpy(), probs, result.classes)
        figs["confusion.png"] = plot_confusion(first["label"].to_numpy(), probs.argmax(axis=1), result.classes)
    if manifest is not None and features_root is not None and mpp and tile_size:
        figs.update(_heatmaps(result.attention, manifest, Path(features_root), mpp, tile_size, max_heatmaps))
    return figs


def _heatmaps(attention: Mapping[str, np.ndarray], manifest: pd.DataFrame, root: Path, mpp: float,
              tile_size: int, limit: int) -> dict[str, "Figure"]:
    from histobench.errors import HistobenchError
    from histobench.features.cache import read_features
    from histobench.slides.reader import open_slide

    paths = dict(zip(manifest["slide_id"].astype(str), manifest["path"])) if "path" in manifest else {}
    out: dict[str, Figure] = {}
    for sid, att in attention.items():
        if len(out) >= limit:
            break
        h5 = root / f"{sid}.h5"
        if sid not in paths or not h5.exists():
            continue
        try:
            _, coords, _ = read_features(h5)
            with open_slide(paths[sid]) as slide:
                thumb, down = slide.thumbnail(1024)
                side0 = tile_size * mpp / slide.mpp
        except (HistobenchError, OSError, KeyError):
            continue
        if len(coords) != len(att):
            continue
        out[f"attention/{sid}.png"] = plot_attention_heatmap(thumb, coords, att, side0, down, title=sid)
    return out


def log_evaluation_artifacts(tracker: Any, result: Any, manifest: pd.DataFrame | None, out_dir: Path, *,
                             features_root: Path | None = None, mpp: float | None = None,
                             tile_size: int | None = None) -> list[Path]:
    """Draw :func:`evaluation_figures`, write them under ``out_dir/plots`` and log them to ``tracker``.

    Files land in the run's artifacts under ``plots/`` (heatmaps under ``plots/attention/``); returns the
    written paths. Works with a disabled tracker (files only).
    """
    written = []
    figs = evaluation_figures(result, manifest, features_root=features_root, mpp=mpp, tile_size=tile_size)
    for name, fig in figs.items():
        path = save(fig, Path(out_dir) / "plots" / name)
        sub = "plots/" + str(Path(name).parent) if Path(name).parent != Path(".") else "plots"
        tracker.artifact(path, sub.rstrip("/."))
        written.append(path)
    return written
