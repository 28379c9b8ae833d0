"""Survival protocol pieces: the discrete-time model, Cox PH on mean-pooled features, Kaplan-Meier, log-rank.

**Discrete-time model** (on bags, trained by the one loop of :mod:`histobench.evaluate.train`). Follow-up is
cut into ``n_bins`` intervals at the quantiles of the *uncensored* training times (4 bins: cuts at the 25th,
50th and 75th percentiles, the first interval starting at 0 and the last open). The aggregator outputs one
hazard logit per interval, ``h_k = sigmoid(logit_k)`` is the probability of dying in interval ``k`` having
survived the earlier ones, and ``S_k = prod_{j<=k} (1 - h_j)``. The loss is the negative log-likelihood
of Zadeh and Schmid (2021), as used by Chen et al. (PORPOISE, MCAT): a death in interval ``y`` contributes
``-log S_{y-1} - log h_y``; a patient censored in interval ``y`` contributes ``-log S_y`` (survived through
it, the convention of those papers). The risk is ``-sum_k S_k`` (minus the expected number of intervals
survived), so a higher risk means a shorter survival.

**Cox proportional hazards** on the mean of each bag's tile embeddings, standardised on the training
slides, fitted by scikit-survival's ``CoxPHSurvivalAnalysis`` with a ridge penalty (``alpha``) that keeps
the Newton steps finite when the feature width is close to or above the number of patients. Its risk is
the linear predictor ``x^T beta``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch


# ------------------------------------------------------------------------------------------ discrete time


def time_bins(time: np.ndarray, event: np.ndarray, n_bins: int = 4) -> np.ndarray:
    """The ``n_bins - 1`` inner cut points: quantiles of the uncensored times (of all times if none died)."""
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    source = t[e] if e.any() else t
    if n_bins < 2 or len(source) == 0:
        return np.zeros(0)
    return np.quantile(source, np.arange(1, n_bins) / n_bins)


def bin_index(time: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Interval of each time: ``k`` such that ``cuts[k-1] < t <= cuts[k]`` (0 below the first cut)."""
    return np.searchsorted(np.asarray(cuts, dtype=np.float64), np.asarray(time, dtype=np.float64), side="left")


def discrete_time_nll(logits: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":
    """Mean NLL of hazard ``logits [B, K]`` for ``target [B, 2]`` = ``(interval index, event)``."""
    import torch
    import torch.nn.functional as F

    k = target[:, 0].long().clamp(0, logits.shape[1] - 1)
    event = target[:, 1].to(logits.dtype)
    log_h = -F.softplus(-logits)  # log h_k (softplus: logsigmoid is slow on small CPU tensors)
    log_1mh = -F.softplus(logits)  # log (1 - h_k)
    log_s = torch.cumsum(log_1mh, dim=1)  # log S_k
    log_s_prev = torch.cat([torch.zeros_like(log_s[:, :1]), log_s[:, :-1]], dim=1)  # log S_{k-1}, S_{-1} = 1
    idx = k.unsqueeze(1)
    uncensored = -(log_s_prev.gather(1, idx) + log_h.gather(1, idx)).squeeze(1)
    censored = -log_s.gather(1, idx).squeeze(1)
    return (event * uncensored + (1 - event) * censored).mean()


def survival_curves(logits: np.ndarray) -> np.ndarray:
    """``S_k`` for each row of hazard logits ``[N, K]``."""
    h = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    return np.cumprod(1.0 - h, axis=1)


def risk_from_logits(logits: np.ndarray) -> np.ndarray:
    """``-sum_k S_k``: higher means shorter expected survival."""
    return -survival_curves(logits).sum(axis=1)


# ------------------------------------------------------------------------------------------ Cox PH


@dataclass
class CoxModel:
    """A fitted ridge Cox model on standardised mean-pooled features."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray

    def risk(self, x: np.ndarray) -> np.ndarray:
        """Linear predictor of ``x [N, D]`` (higher = shorter survival)."""
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.coef


def fit_cox(x: np.ndarray, time: np.ndarray, event: np.ndarray, alpha: float = 1.0) -> CoxModel:
    """Fit Cox PH with ridge ``alpha`` (scikit-survival's penalty ``alpha/2 ||beta||^2``) on standardised ``x``."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-8] = 1.0
    y = Surv.from_arrays(event=np.asarray(event).astype(bool), time=np.asarray(time, dtype=np.float64))
    model = CoxPHSurvivalAnalysis(alpha=alpha, ties="breslow", n_iter=200)
    with warnings.catch_warnings():  # slow convergence is reported through the c-index, not a warning per fold
        warnings.simplefilter("ignore")
        model.fit((x - mean) / scale, y)
    return CoxModel(mean, scale, np.asarray(model.coef_, dtype=np.float64))


# ------------------------------------------------------------------------------------------ KM, log-rank


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier estimate: ``(t, S(t))`` at each distinct event time, starting from ``(0, 1)``."""
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    times = np.unique(t[e])
    at_risk = np.array([(t >= u).sum() for u in times], dtype=np.float64)
    deaths = np.array([((t == u) & e).sum() for u in times], dtype=np.float64)
    surv = np.cumprod(1.0 - deaths / np.maximum(at_risk, 1))
    return np.r_[0.0, times], np.r_[1.0, surv]


def logrank_test(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> tuple[float, float]:
    """Two-group log-rank test: ``(chi-square statistic, p-value)`` with one degree of freedom."""
    from scipy.stats import chi2

    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    g = np.asarray(group).astype(bool)
    if g.all() or not g.any() or not e.any():
        return float("nan"), float("nan")
    observed = expected = variance = 0.0
    for u in np.unique(t[e]):
        at_risk = t >= u
        n = at_risk.sum()
        n1 = (at_risk & g).sum()
        d = ((t == u) & e).sum()
        d1 = ((t == u) & e & g).sum()
        observed += d1
        expected += d * n1 / n
        if n > 1:
            variance += d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1)
    if variance <= 0:
        return float("nan"), float("nan")
    stat = (observed - expected) ** 2 / variance
    return float(stat), float(chi2.sf(stat, 1))
