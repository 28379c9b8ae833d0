"""The slide-level evaluation protocol: per-fold aggregator training on cached features, metrics, CIs.

Slides are the units (each slide is one bag with the manifest's label); patients are what the folds group.
Each fold trains a freshly built aggregator on the slides of its train and val patients (the one policy has
a fixed epoch budget, so val is not held out for early stopping) and predicts the slides of its test
patients. Metrics are computed per fold and on the pooled out-of-fold predictions, whose 95% CI comes from a
bootstrap over patients.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from histobench.cohorts.splits import Splits
from histobench.components import Aggregator
from histobench.errors import HistobenchError
from histobench.evaluate.metrics import DEFAULT_METRICS, METRICS, bootstrap_ci
from histobench.evaluate.options import EvalOptions
from histobench.evaluate.train import fit_aggregator, predict

Progress = Callable[[str, int, int], None]


@dataclass
class EvalResult:
    """What one evaluation of one feature set on one task produced."""

    task_kind: str
    classes: list[str]
    per_fold: list[dict[str, float]]
    """Metrics of each fold's test slides, in fold order."""
    summary: dict[str, dict[str, float]]
    """Per metric: ``mean`` and ``sd`` over folds, ``pooled`` (on all out-of-fold predictions), ``ci_low``,
    ``ci_high`` (patient-level bootstrap 95% CI of the pooled value) and ``n_folds``."""
    predictions: pd.DataFrame
    """One row per test slide: ``slide_id, case_id, fold, label`` (class index), ``prob_<class>``..."""
    n_skipped: int
    """Slides left out: labels not in ``classes``, in no test fold, missing features, or empty bags."""
    split_hash: str
    split_name: str = ""
    skipped: dict[str, int] = field(default_factory=dict)
    """``n_skipped`` by reason: ``unlabeled``, ``not_in_splits`` (in no fold's test side), ``missing_features``,
    ``empty``."""
    n_leaks: int = 0
    """Patients on two sides of a fold according to the splits audit (0 for :func:`make_splits`)."""
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    """Tile attention of a few test slides per fold (``slide_id -> [N]``), for heatmaps."""

    @property
    def metrics(self) -> list[str]:
        return list(self.summary)


def _label_index(manifest: pd.DataFrame, classes: list[str]) -> pd.Series:
    """The class index of each manifest row (by the label's string form); -1 where it is not a class."""
    if "label" not in manifest.columns:
        raise HistobenchError("the manifest has no 'label' column")
    index = {str(c): i for i, c in enumerate(classes)}
    labels = manifest["label"]
    as_text = labels.map(lambda v: str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
    return as_text.map(index).where(labels.notna(), np.nan).fillna(-1).astype(int)


def evaluate_features(
    *,
    task_kind: str,
    classes: list[str],
    manifest: pd.DataFrame,
    features: Mapping[str, np.ndarray],
    splits: Splits,
    aggregator: Aggregator,
    opts: EvalOptions,
    progress: Progress | None = None,
    metrics: list[str] | None = None,
    attention_per_fold: int = 2,
) -> EvalResult:
    """Evaluate ``features`` (``slide_id -> [N, D]``) on a classification task over ``splits``.

    ``task_kind`` is ``subtyping`` or ``grading`` (survival is not implemented yet). ``metrics`` defaults
    to the task kind's :data:`~histobench.evaluate.metrics.DEFAULT_METRICS`. ``progress(message, done,
    total)`` is called after each fold. Fold ``k`` is trained with seed ``opts.seed + k``.
    """
    import torch

    if task_kind == "survival":
        raise HistobenchError("survival evaluation is not implemented yet")
    if task_kind not in DEFAULT_METRICS:
        raise HistobenchError(f"unknown task kind {task_kind!r}")
    names = list(metrics or DEFAULT_METRICS[task_kind])
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise HistobenchError(f"unknown metric(s) {unknown}; metrics: {', '.join(METRICS)}")
    classes = [str(c) for c in classes]
    for col in ("slide_id", "case_id"):
        if col not in manifest.columns:
            raise HistobenchError(f"the manifest has no {col!r} column")

    # ------------------------------------------------------------------ usable slides and their bags
    m = manifest.assign(slide_id=manifest["slide_id"].astype(str), case_id=manifest["case_id"].astype(str))
    m = m.drop_duplicates("slide_id").assign(y=_label_index(m.drop_duplicates("slide_id"), classes).values)
    skipped = {"unlabeled": int((m["y"] < 0).sum()), "missing_features": 0, "empty": 0, "not_in_splits": 0}
    m = m[m["y"] >= 0]
    test_side = splits.table[splits.table["split"] == "test"]
    in_splits = m["slide_id"].isin(test_side["slide_id"]) if splits.slide_level else m["case_id"].isin(test_side["case_id"])
    skipped["not_in_splits"] = int((~in_splits).sum())
    m = m[in_splits]
    bags: dict[str, np.ndarray] = {}
    for sid in m["slide_id"]:
        if sid not in features:
            skipped["missing_features"] += 1
            continue
        arr = np.asarray(features[sid], dtype=np.float32)
        if arr.ndim != 2 or len(arr) == 0:
            skipped["empty"] += 1
            continue
        bags[sid] = arr
    m = m[m["slide_id"].isin(bags)].reset_index(drop=True)
    if m.empty:
        raise HistobenchError("no slide has both a label and features")
    dims = {a.shape[1] for a in bags.values()}
    if len(dims) != 1:
        raise HistobenchError(f"feature widths differ between slides: {sorted(dims)}")
    in_dim = dims.pop()

    leaks = splits.audit(manifest)
    if len(leaks):
        warnings.warn(
            f"splits {splits.name!r} put {leaks['case_id'].nunique()} patient(s) on two sides of a fold "
            f"(e.g. {leaks['case_id'].iloc[0]} in fold {leaks['fold'].iloc[0]}); results are optimistic",
            stacklevel=2,
        )

    def fold_slides(k: int, sides: tuple[str, ...]) -> pd.DataFrame:
        if splits.slide_level:
            ids = {s for side in sides for s in splits.slides(k, side) or []}
            return m[m["slide_id"].isin(ids)]
        cases = {c for side in sides for c in splits.cases(k, side)}
        return m[m["case_id"].isin(cases)]

    # ------------------------------------------------------------------ folds
    n_out = len(classes)
    per_fold: list[dict[str, float]] = []
    frames: list[pd.DataFrame] = []
    attention: dict[str, np.ndarray] = {}
    folds = sorted(int(f) for f in splits.table["fold"].unique())
    for done, k in enumerate(folds, start=1):
        train = fold_slides(k, ("train", "val"))
        test = fold_slides(k, ("test",))
        if train.empty or test.empty:
            raise HistobenchError(f"fold {k} has no {'training' if train.empty else 'test'} slides with features")
        fold_opts = opts.model_copy(update={"seed": opts.seed + k})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(fold_opts.seed)
            module = aggregator.build(in_dim, n_out)
        module = fit_aggregator(
            module, [bags[s] for s in train["slide_id"]], train["y"].to_numpy(), fold_opts, n_outputs=n_out
        )
        logits, att = predict(module, [bags[s] for s in test["slide_id"]])
        probs = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
        y = test["y"].to_numpy()
        per_fold.append({name: METRICS[name](y, probs) for name in names})
        frame = pd.DataFrame({"slide_id": test["slide_id"].values, "case_id": test["case_id"].values, "fold": k, "label": y})
        for c, cls in enumerate(classes):
            frame[f"prob_{cls}"] = probs[:, c]
        frames.append(frame)
        for sid, a in list(zip(test["slide_id"], att))[:attention_per_fold]:
            if a is not None:
                attention[sid] = a
        if progress is not None:
            progress(f"fold {k}", done, len(folds))

    # ------------------------------------------------------------------ summary
    predictions = pd.concat(frames, ignore_index=True)
    y_all = predictions["label"].to_numpy()
    p_all = predictions[[f"prob_{c}" for c in classes]].to_numpy()
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        values = np.array([f[name] for f in per_fold], dtype=np.float64)
        finite = values[np.isfinite(values)]
        lo, hi = bootstrap_ci(METRICS[name], predictions["case_id"].to_numpy(), y_all, p_all, n=opts.bootstrap, seed=opts.seed)
        summary[name] = {
            "mean": float(finite.mean()) if len(finite) else float("nan"),
            "sd": float(finite.std(ddof=1)) if len(finite) > 1 else float("nan"),
            "pooled": METRICS[name](y_all, p_all),
            "ci_low": lo,
            "ci_high": hi,
            "n_folds": int(len(finite)),
        }
    return EvalResult(
        task_kind=task_kind,
        classes=classes,
        per_fold=per_fold,
        summary=summary,
        predictions=predictions,
        n_skipped=int(sum(skipped.values())),
        split_hash=splits.hash,
        split_name=splits.name,
        skipped=skipped,
        n_leaks=int(leaks["case_id"].nunique()) if len(leaks) else 0,
        attention=attention,
    )
