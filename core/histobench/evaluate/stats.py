"""Statistics on out-of-fold predictions: the estimators a run reports, their CIs, and paired tests.

Everything here works on a predictions table (the ``predictions.csv`` a run logs): one row per test slide
and seed, ``slide_id, case_id, fold, seed`` and, for classification, ``label`` (class index) and
``prob_<class>``; for survival ``time, event, risk`` (discrete-time model) and ``cox_risk`` (Cox PH).

**Two estimators, each with its own CI.** A run reports every metric twice, and every CI belongs to the
value it is printed and logged beside (:data:`ESTIMATORS` names each one for humans, :func:`estimator_label`
fills in the fold count):

* ``fold``: the mean ± sd over folds of the per-fold metric (each fold's value averaged over seed repeats
  first), with a two-sided t-interval over the folds, clipped to the metric's range. It treats the folds as
  independent samples; they share training patients, so the interval is optimistic (Bengio & Grandvalet,
  JMLR 2004: no unbiased estimator of the variance of k-fold CV exists). Logged as ``<m>_fold_mean``,
  ``<m>_fold_sd``, ``<m>_fold_ci_low``, ``<m>_fold_ci_high`` (``<m>_mean``/``<m>_sd`` are kept as the same
  fold values for older readers).
* ``pooled`` (classification): the metric of the pooled out-of-fold predictions (all folds and seeds
  together), with a percentile CI from a bootstrap over patients. Logged as ``<m>_pooled``,
  ``<m>_pooled_ci_low``, ``<m>_pooled_ci_high``.
* ``fold_boot`` (survival): risks from different folds come from different models and are not on one
  scale (a Cox linear predictor in particular), so survival has no pooled c-index. Its second estimator is
  the mean over (fold, seed) of the per-fold metric with a patient bootstrap drawn *within* each fold
  (each fold keeps its number of patients). Logged as ``<m>_fold_boot`` and ``<m>_fold_boot_ci_*``.

:func:`statistic` and :func:`bootstrap` compute a task kind's bootstrapped estimator (``pooled`` or
``fold_boot``, see :func:`bootstrap_estimator`).

**Bootstrap.** Patients are resampled with replacement (a drawn patient brings all its slides and seeds);
for survival the draws are made within each fold. Replicates where the metric is undefined are dropped. The
CI is the 2.5/97.5 percentile interval. A paired comparison of two runs on the same splits draws the *same*
patients for both runs in each replicate and takes the percentile interval of the difference; its fold
estimator is the mean of the per-fold differences with a paired t-interval over folds.
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

ESTIMATORS: dict[str, tuple[str, str]] = {
    "fold": ("mean ± sd over {n} folds", "t-interval over folds"),
    "pooled": ("pooled out-of-fold patients", "patient bootstrap"),
    "fold_boot": ("mean over {n} folds", "patient bootstrap within folds"),
    "pooled_test": ("log-rank test on pooled out-of-fold patients, each split at its fold's median risk", "no CI"),
}
"""The one place that names each estimator for humans: ``key -> (what the value is, what its 95% CI is)``.

``key`` is the prefix of the summary entries and of the MLflow metrics (``<metric>_<key>...``); ``{n}`` is
the number of folds. ``pooled_test`` is ``logrank_p``'s ``pooled`` entry (a p-value, no CI)."""

METRIC_RANGE: dict[str, tuple[float, float]] = {"qwk": (-1.0, 1.0)}
"""Range of a metric where it is not [0, 1] (t-intervals are clipped to it); ``logrank_p`` gets no interval."""


def estimator_label(key: str, n_folds: int | None = None, *, ci: bool = False) -> str:
    """The human label of an estimator (``ci=True``: of its 95% CI), e.g. ``"mean ± sd over 10 folds"``."""
    if key not in ESTIMATORS:
        raise HistobenchError(f"unknown estimator {key!r}; estimators: {', '.join(ESTIMATORS)}")
    text = ESTIMATORS[key][1 if ci else 0]
    return text.replace("{n}", str(n_folds) if n_folds is not None else "k")


def bootstrap_estimator(task_kind: str, metric: str = "") -> str:
    """Which estimator :func:`statistic` computes for a task kind: ``pooled``, or ``fold_boot`` for survival."""
    if metric == "logrank_p":
        return "pooled_test"
    return "fold_boot" if task_kind == "survival" else "pooled"


def summary_estimators(entry: dict[str, Any]) -> list[str]:
    """The estimators present in one metric's summary entry, in display order (``fold`` first)."""
    keys = ["fold"] if "fold_mean" in entry else []
    if "pooled" in entry:
        keys.append("pooled" if "pooled_ci_low" in entry else "pooled_test")
    if "fold_boot" in entry:
        keys.append("fold_boot")
    return keys


def t_interval(values, *, alpha: float = 0.05, bounds: tuple[float, float] | None = (0.0, 1.0)) -> tuple[float, float]:
    """Two-sided ``1 - alpha`` t-interval of the mean of ``values`` (finite ones), clipped to ``bounds``.

    ``nan`` with fewer than two finite values. The mean always lies inside (clipping keeps it, as the mean
    of values inside ``bounds`` is inside them).
    """
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return float("nan"), float("nan")
    half = float(t.ppf(1 - alpha / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    lo, hi = float(v.mean()) - half, float(v.mean()) + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return lo, hi


def fold_estimate(values, metric: str = "", *, alpha: float = 0.05) -> dict[str, float]:
    """The ``fold`` estimator of per-fold values (one per fold): mean, sd, t-interval and the fold count."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    lo, hi = (float("nan"), float("nan")) if metric == "logrank_p" else t_interval(
        finite, alpha=alpha, bounds=METRIC_RANGE.get(metric, (0.0, 1.0)))
    return {"fold_mean": float(finite.mean()) if len(finite) else float("nan"),
            "fold_sd": float(finite.std(ddof=1)) if len(finite) > 1 else float("nan"),
            "fold_ci_low": lo, "fold_ci_high": hi, "n_folds": int(len(finite))}


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
    """The bootstrapped estimator's value (module docstring): ``pooled`` for classification, ``fold_boot``
    (mean over (fold, seed) of the per-fold metric) for survival."""
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
    """Percentile CI of :func:`statistic` over patient resamples (within folds for survival): the CI of the
    ``pooled`` (``fold_boot``) estimator, never of the fold mean ± sd."""
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
    """Compare run A with run B evaluated on the same folds: ``A - B`` by both estimators, each with its CI.

    Returns ``a``, ``b`` and ``difference`` (the :func:`statistic` of each run, i.e. the ``estimator``
    ``pooled`` for classification and ``fold_boot`` for survival, and their difference), ``ci_low``/``ci_high``
    (paired patient bootstrap of that difference); ``fold_a``, ``fold_b``, ``fold_difference`` (means over
    folds of each run's per-fold values and of the per-fold differences) with ``fold_ci_low``/``fold_ci_high``
    (paired t-interval over the folds' differences); ``folds`` (a table of per-fold values and differences),
    ``wilcoxon_p`` (two-sided signed-rank test of the per-fold differences; ``nan`` with fewer than two
    non-zero differences) and ``n_folds``.
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
    low, high = METRIC_RANGE.get(metric, (0.0, 1.0))
    flo, fhi = t_interval(folds["difference"], alpha=alpha, bounds=(low - high, high - low))
    diffs = folds["difference"].to_numpy()
    return {"metric": metric, "estimator": bootstrap_estimator(task_kind, metric), "a": a, "b": b,
            "difference": a - b, "ci_low": lo, "ci_high": hi,
            "fold_a": float(folds["a"].mean()) if len(folds) else float("nan"),
            "fold_b": float(folds["b"].mean()) if len(folds) else float("nan"),
            "fold_difference": float(diffs.mean()) if len(diffs) else float("nan"),
            "fold_ci_low": flo, "fold_ci_high": fhi,
            "wilcoxon_p": p, "n_folds": int(len(folds)), "folds": folds}
