"""Evaluation metrics, numpy in and float out, plus a patient-level bootstrap.

Classification labels are integer class indices ``0..C-1``. Each metric is written out here in numpy (the
tests check them against scikit-learn on random data). A metric that is undefined on its input (an AUC
with one class present, a kappa with no disagreement possible) returns ``nan`` rather than raising.

:data:`METRICS` maps a metric name to a function of one uniform signature ``fn(y_true, scores) -> float``,
which is what :func:`compute_metrics` and :func:`bootstrap_ci` use: for classification ``y_true [N]`` are
class indices and ``scores [N, C]`` class probabilities (the prediction is their argmax); for survival
``y_true [N, 2]`` holds ``(time, event)`` and ``scores [N]`` (or ``[N, 1]``) a risk.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

# ------------------------------------------------------------------------------------------ helpers


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..N of ``x`` with ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # boundaries of runs of equal values in the sorted array
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties in score count one half)."""
    positive = positive.astype(bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(score, dtype=np.float64))
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None = None) -> np.ndarray | None:
    """``[n, n]`` counts of class indices, rows = truth, columns = prediction; ``None`` without labels.

    ``n`` is ``n_classes``, by default the largest index seen plus one.
    """
    y, p = _labels(y_true, y_pred)
    if len(y) == 0:
        return None
    top = int(max(y.max(), p.max()))
    n = int(n_classes) if n_classes is not None else top + 1
    if top >= n:
        raise ValueError(f"class index {top} is out of range for {n} classes")
    return np.bincount(y * n + p, minlength=n * n).reshape(n, n)


def _labels(*arrays: np.ndarray) -> list[np.ndarray]:
    out = [np.asarray(a).astype(np.int64).ravel() for a in arrays]
    if any(len(a) != len(out[0]) for a in out):
        raise ValueError("label arrays differ in length")
    if any(len(a) and a.min() < 0 for a in out):
        raise ValueError("class indices must be non-negative")
    return out


# ------------------------------------------------------------------------------------------ metrics


def macro_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; one-vs-rest, macro-averaged over the classes present in ``y_true``.

    ``scores [N]`` are positive-class scores of a binary problem (``y_true`` in {0, 1}). ``scores [N, C]``
    are per-class scores; with ``C == 2`` only column 1 is used (the binary AUC), with ``C > 2`` each class
    present in ``y_true`` is scored against the rest using its own column, and the AUCs are averaged.
    ``nan`` when fewer than two classes are present.
    """
    (y,) = _labels(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.ndim == 1:
        return _binary_auc(y == 1, s)
    if s.shape[0] != len(y):
        raise ValueError("scores and y_true differ in length")
    if s.shape[1] == 2:
        return _binary_auc(y == 1, s[:, 1])
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    return float(np.mean([_binary_auc(y == c, s[:, c]) for c in present]))


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true``."""
    cm = confusion_matrix(y_true, y_pred)
    if cm is None:
        return float("nan")
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Per-class F1 averaged with weights equal to each class's support in ``y_true`` (0/0 counts as 0)."""
    cm = confusion_matrix(y_true, y_pred)
    if cm is None:
        return float("nan")
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    denom = support + predicted  # F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (support + predicted)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(np.sum(f1 * support) / support.sum())


def quadratic_weighted_kappa(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None = None) -> float:
    """Cohen's kappa with quadratic weights ``(i - j)^2`` over the ordinal grades ``0..n_classes-1``.

    The grades are the class indices themselves, so a grade absent from both arrays still counts in the
    distances (pass ``n_classes``; the default is the largest index seen plus one). ``nan`` when no
    disagreement is possible (all expected weight zero).
    """
    cm = confusion_matrix(y_true, y_pred, n_classes)
    if cm is None:
        return float("nan")
    n = len(cm)
    observed = cm.astype(np.float64)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / observed.sum()
    grades = np.arange(n, dtype=np.float64)
    weights = (grades[:, None] - grades[None, :]) ** 2
    denom = float(np.sum(weights * expected))
    if denom == 0.0:
        return float("nan")
    return float(1.0 - np.sum(weights * observed) / denom)


def concordance_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray, chunk: int = 2048) -> float:
    """Harrell's C: the share of comparable pairs whose risks are ordered like their survival.

    A pair ``(i, j)`` is comparable when ``time[i] < time[j]`` and ``event[i]`` is true (the earlier time is
    an observed death; pairs with equal times are not compared). It is concordant when ``risk[i] > risk[j]``
    (higher risk, shorter survival) and counts one half when the risks tie. ``nan`` without comparable
    pairs. Vectorised O(N^2) in row chunks of ``chunk``.
    """
    t = np.asarray(time, dtype=np.float64).ravel()
    e = np.asarray(event).astype(bool).ravel()
    r = np.asarray(risk, dtype=np.float64).ravel()
    if not len(t) == len(e) == len(r):
        raise ValueError("time, event and risk differ in length")
    idx = np.flatnonzero(e)
    concordant = 0.0
    comparable = 0
    for start in range(0, len(idx), chunk):
        i = idx[start : start + chunk]
        later = t[None, :] > t[i, None]  # [chunk, N]
        ri, rj = r[i, None], r[None, :]
        comparable += int(later.sum())
        concordant += float(np.sum(later & (ri > rj))) + 0.5 * float(np.sum(later & (ri == rj)))
    return float(concordant / comparable) if comparable else float("nan")


def _censoring_survival_before(time: np.ndarray, event: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Kaplan-Meier estimate of the censoring survival ``G(t-)`` just before each time in ``at``."""
    c_times = np.unique(time[~event])
    if len(c_times) == 0:
        return np.ones(len(at))
    at_risk = (time[None, :] >= c_times[:, None]).sum(axis=1).astype(np.float64)
    censored = ((time[None, :] == c_times[:, None]) & ~event[None, :]).sum(axis=1).astype(np.float64)
    g = np.cumprod(1.0 - censored / at_risk)  # G just after each censoring time
    k = np.searchsorted(c_times, at, side="left")  # censoring times strictly before `at`
    return np.where(k > 0, g[np.maximum(k - 1, 0)], 1.0)


def concordance_index_uno(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, tau: float | None = None, chunk: int = 2048
) -> float:
    """Uno's C: Harrell's pairs weighted by ``G(time[i]-)^-2``, the inverse squared censoring survival.

    ``G`` is the Kaplan-Meier estimate of the censoring distribution on the same patients (so the metric
    is a function of its own input, like the others, and a bootstrap replicate re-estimates it). Only pairs
    whose earlier time is below ``tau`` count (default: all). Ties as in :func:`concordance_index`.
    Uno et al., Statistics in Medicine 2011.
    """
    t = np.asarray(time, dtype=np.float64).ravel()
    e = np.asarray(event).astype(bool).ravel()
    r = np.asarray(risk, dtype=np.float64).ravel()
    if not len(t) == len(e) == len(r):
        raise ValueError("time, event and risk differ in length")
    keep = e & (t < tau) if tau is not None else e
    idx = np.flatnonzero(keep)
    g = _censoring_survival_before(t, e, t[idx])
    if np.any(g <= 0):
        return float("nan")
    w = 1.0 / g**2
    num = den = 0.0
    for start in range(0, len(idx), chunk):
        i = idx[start : start + chunk]
        wi = w[start : start + chunk, None]
        later = t[None, :] > t[i, None]
        ri, rj = r[i, None], r[None, :]
        den += float(np.sum(wi * later))
        num += float(np.sum(wi * (later & (ri > rj)))) + 0.5 * float(np.sum(wi * (later & (ri == rj))))
    return float(num / den) if den > 0 else float("nan")


# ------------------------------------------------------------------------------------------ registry


def _probs(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"classification metrics need class probabilities [N, C], got shape {s.shape}")
    return s


def _survival(y_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] != 2:
        raise ValueError("survival metrics need y_true [N, 2] of (time, event)")
    return y[:, 0], y[:, 1]


def _auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    return macro_auc(y_true, _probs(scores))


def _bacc(y_true: np.ndarray, scores: np.ndarray) -> float:
    return balanced_accuracy(y_true, _probs(scores).argmax(axis=1))


def _f1(y_true: np.ndarray, scores: np.ndarray) -> float:
    return weighted_f1(y_true, _probs(scores).argmax(axis=1))


def _qwk(y_true: np.ndarray, scores: np.ndarray) -> float:
    s = _probs(scores)
    return quadratic_weighted_kappa(y_true, s.argmax(axis=1), n_classes=s.shape[1])


def _cindex(y_true: np.ndarray, scores: np.ndarray) -> float:
    time, event = _survival(y_true)
    return concordance_index(time, event, np.asarray(scores, dtype=np.float64).reshape(len(time), -1)[:, 0])


def _cindex_uno(y_true: np.ndarray, scores: np.ndarray) -> float:
    time, event = _survival(y_true)
    return concordance_index_uno(time, event, np.asarray(scores, dtype=np.float64).reshape(len(time), -1)[:, 0])


MetricFn = Callable[[np.ndarray, np.ndarray], float]

METRICS: dict[str, MetricFn] = {
    "macro_auc": _auc,
    "balanced_accuracy": _bacc,
    "weighted_f1": _f1,
    "qwk": _qwk,
    "c_index": _cindex,
    "c_index_uno": _cindex_uno,
}
"""Metric name -> ``fn(y_true, scores) -> float`` (see the module docstring for the two input shapes)."""

DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "subtyping": ("macro_auc", "balanced_accuracy", "weighted_f1"),
    "grading": ("qwk", "balanced_accuracy", "macro_auc"),
    "survival": ("c_index", "c_index_uno"),
}
"""The metrics :func:`compute_metrics` reports for each task kind when none are named."""


def compute_metrics(
    task_kind: str, y_true: np.ndarray, scores: np.ndarray, *, metrics: Sequence[str] | None = None
) -> dict[str, float]:
    """The named metrics (default: :data:`DEFAULT_METRICS` of ``task_kind``) as ``{name: value}``."""
    if task_kind not in DEFAULT_METRICS:
        raise ValueError(f"unknown task kind {task_kind!r}; kinds: {', '.join(DEFAULT_METRICS)}")
    names = tuple(metrics) if metrics else DEFAULT_METRICS[task_kind]
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; metrics: {', '.join(METRICS)}")
    return {m: METRICS[m](y_true, scores) for m in names}


# ------------------------------------------------------------------------------------------ bootstrap


def bootstrap_ci(
    metric_fn: Callable[..., float],
    groups: Sequence[str] | np.ndarray,
    *arrays: np.ndarray,
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``metric_fn(*arrays)``, resampling whole groups (patients) with replacement.

    ``groups [N]`` gives each row's patient; ``arrays`` are row-aligned (``y_true``, ``scores``, ...). A
    patient drawn twice contributes all its rows twice. Replicates where the metric is undefined (``nan``,
    e.g. one class drawn) are dropped; ``(nan, nan)`` if none is left or ``n == 0``.
    """
    g = np.asarray(groups).astype(str).ravel()
    arrays = tuple(np.asarray(a) for a in arrays)
    if any(len(a) != len(g) for a in arrays):
        raise ValueError("groups and arrays differ in length")
    if n <= 0 or len(g) == 0:
        return float("nan"), float("nan")
    uniq, inverse = np.unique(g, return_inverse=True)
    order = np.argsort(inverse, kind="mergesort")
    counts = np.bincount(inverse, minlength=len(uniq))
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    rng = np.random.default_rng(seed)
    values = np.empty(n, dtype=np.float64)
    for b in range(n):
        drawn = rng.integers(len(uniq), size=len(uniq))
        lengths = counts[drawn]
        first = np.cumsum(lengths) - lengths  # where each drawn group begins in the replicate
        within = np.arange(lengths.sum()) - np.repeat(first, lengths)
        rows = order[np.repeat(starts[drawn], lengths) + within]
        values[b] = metric_fn(*(a[rows] for a in arrays))
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)
