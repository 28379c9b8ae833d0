"""Statistics on out-of-fold predictions: the headline statistic, patient-level bootstrap CIs, paired tests.

Everything here works on a predictions table (the ``predictions.csv`` a run logs): one row per test slide
and seed, ``slide_id, case_id, fold, seed`` and, for classification, ``label`` (class index) and
``prob_<class>``; for survival ``time, event, risk`` (discrete-time model) and ``cox_risk`` (Cox PH).

**The statistic.** For classification it is the metric of the pooled out-of-fold predictions (all folds
and seeds together). For survival, risks from different folds come from different models and are not on
one scale (a Cox linear predictor in particular), so the statistic is the *mean over (fold, seed) of the
per-fold metric*, each fold's value computed on its own test patients only.

**Bootstrap.** Patients are resampled with replacement (a drawn patient brings all its slides and seeds);
for survival the draws are made within each fold (each fold keeps its number of patients), matching the
fold-wise statistic. Replicates where the metric is undefined are dropped. The CI is the 2.5/97.5
percentile interval. A paired comparison of two runs on the same splits draws the *same* patients for both
runs in each replicate and takes the percentile interval of the difference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from histobench.errors import HistobenchError
from histobench.evaluate.metrics import METRICS

SURVIVAL_RISKS = {"": "risk", "cox_": "cox_risk"}
"""Survival metric prefix -> the risk column it is computed on (``c_index`` vs ``cox_c_index``)."""

SURVIVAL_METRICS = ("c_index", "c_index_uno")
"""The metrics defined on ``(time, event)`` and a risk."""


def _seed_col(pred: pd.DataFrame) -> pd.Series:
    return pred["seed"] if "seed" in pred.columns else pd.Series(0, index=pred.index)


def metric_on_rows(pred: pd.DataFrame, task_kind: str, metric: str, classes: list[str] | None = None) -> float:
    """One metric on a set of prediction rows, without any fold logic."""
    if task_kind == "survival":
        for prefix, col in sorted(SURVIVAL_RISKS.items(), key=lambda kv: -len(kv[0])):
            base = metric[len(prefix):]
            if metric.startswith(prefix) and base in SURVIVAL_METRICS:
                y = pred[["time", "event"]].to_numpy(dtype=np.float64)
                return METRICS[base](y, pred[col].to_numpy(dtype=np.float64))
        names = [p + m for p in SURVIVAL_RISKS for m in SURVIVAL_METRICS]
        raise HistobenchError(f"unknown survival metric {metric!r}; metrics: {', '.join(names)}")
    if metric not in METRICS or metric in SURVIVAL_METRICS:
        raise HistobenchError(f"unknown metric {metric!r}; metrics: {', '.join(METRICS)}")
    cols = [f"prob_{c}" for c in classes] if classes else [c for c in pred.columns if c.startswith("prob_")]
    return METRICS[metric](pred["label"].to_numpy(), pred[cols].to_numpy(dtype=np.float64))


def per_fold_values(pred: pd.DataFrame, task_kind: str, metric: str, classes: list[str] | None = None) -> pd.Series:
    """The metric of each fold (averaged over seeds), indexed by fold."""
    values = {}
    for (fold, _), rows in pred.groupby([pred["fold"], _seed_col(pred)], sort=True):
        values.setdefault(int(fold), []).append(metric_on_rows(rows, task_kind, metric, classes))
    return pd.Series({k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in values.items()})


def statistic(pred: pd.DataFrame, task_kind: str, metric: str, classes: list[str] | None = None) -> float:
    """The headline value (see the module docstring): pooled for classification, fold-wise mean for survival."""
    if task_kind != "survival":
        return metric_on_rows(pred, task_kind, metric, classes)
    values = [metric_on_rows(rows, task_kind, metric, classes)
              for _, rows in pred.groupby([pred["fold"], _seed_col(pred)], sort=True)]
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


class _Resampler:
    """Draws patient multiplicities (all patients, or within each fold) and turns them into row indices."""

    def __init__(self, frames: list[pd.DataFrame], by_fold: bool, seed: int):
        first = pd.concat([f[["case_id", "fold"]] for f in frames]).astype({"case_id": str})
        owner = first.drop_duplicates("case_id").set_index("case_id")["fold"]
        self.cases = owner.index.to_numpy()
        code = {c: i for i, c in enumerate(self.cases)}
        self.row_codes = [f["case_id"].astype(str).map(code).to_numpy() for f in frames]
        strata = owner.to_numpy() if by_fold else np.zeros(len(owner), dtype=int)
        self.groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
        self.rng = np.random.default_rng(seed)

    def draw(self) -> list[np.ndarray]:
        counts = np.zeros(len(self.cases), dtype=np.int64)
        for members in self.groups:
            np.add.at(counts, members[self.rng.integers(len(members), size=len(members))], 1)
        return [np.repeat(np.arange(len(codes)), counts[codes]) for codes in self.row_codes]


def _interval(values: list[float], alpha: float) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(v, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap(pred: pd.DataFrame, task_kind: str, metric: str, classes: list[str] | None = None, *,
              n: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile CI of :func:`statistic` over patient resamples (within folds for survival)."""
    if n <= 0 or pred.empty:
        return float("nan"), float("nan")
    sampler = _Resampler([pred], by_fold=task_kind == "survival", seed=seed)
    values = []
    for _ in range(n):
        (rows,) = sampler.draw()
        values.append(statistic(pred.iloc[rows], task_kind, metric, classes))
    return _interval(values, alpha)


def paired_comparison(pred_a: pd.DataFrame, pred_b: pd.DataFrame, task_kind: str, metric: str,
                      classes: list[str] | None = None, *, n: int = 1000, seed: int = 0,
                      alpha: float = 0.05) -> dict[str, Any]:
    """Compare run A with run B evaluated on the same folds: ``A - B`` with a paired CI and a Wilcoxon p.

    Returns ``a``, ``b`` and ``difference`` (the :func:`statistic` of each and their difference),
    ``ci_low``/``ci_high`` (paired patient bootstrap of the difference), ``folds`` (a table of per-fold
    values and differences), ``wilcoxon_p`` (two-sided signed-rank test of the per-fold differences; ``nan``
    with fewer than two non-zero differences) and ``n_folds``.
    """
    from scipy.stats import wilcoxon

    shared = set(pred_a["case_id"].astype(str)) & set(pred_b["case_id"].astype(str))
    if not shared:
        raise HistobenchError("the two runs share no test patients")
    fa = per_fold_values(pred_a, task_kind, metric, classes)
    fb = per_fold_values(pred_b, task_kind, metric, classes)
    folds = pd.DataFrame({"a": fa, "b": fb}).dropna()
    folds["difference"] = folds["a"] - folds["b"]
    p = float("nan")
    nonzero = folds["difference"].to_numpy()
    if np.count_nonzero(nonzero) >= 2:
        p = float(wilcoxon(nonzero, zero_method="wilcox", alternative="two-sided").pvalue)
    a = statistic(pred_a, task_kind, metric, classes)
    b = statistic(pred_b, task_kind, metric, classes)
    lo = hi = float("nan")
    if n > 0:
        sampler = _Resampler([pred_a, pred_b], by_fold=task_kind == "survival", seed=seed)
        diffs = []
        for _ in range(n):
            ra, rb = sampler.draw()
            diffs.append(statistic(pred_a.iloc[ra], task_kind, metric, classes)
                         - statistic(pred_b.iloc[rb], task_kind, metric, classes))
        lo, hi = _interval(diffs, alpha)
    return {"metric": metric, "a": a, "b": b, "difference": a - b, "ci_low": lo, "ci_high": hi,
            "wilcoxon_p": p, "n_folds": int(len(folds)), "folds": folds}
