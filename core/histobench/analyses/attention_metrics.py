"""Sparsity and diversity of a ViT's [CLS]→patch attention: pure numpy functions.

DiRL (Kapse et al., "Attention De-sparsification Matters: Inducing Diversity in Digital Pathology
Representation Learning", arXiv 2309.06439) argues that DINO-style ViTs put most of the last block's class-token
attention on a few salient structures. The measures below follow the reconstruction in
``shared/methods/dirl.md`` §4.4; the paper's exact choice is unverified. Each takes attention rows ``a[..., N]``
over the N patch tokens (any leading shape, e.g. ``[images, heads]``), renormalises them to sum to 1 and
returns one value per row:

* :func:`normalised_entropy` ``E = −Σ a log a / log N`` ∈ [0, 1] (1: uniform; 0: one token).
* :func:`mass_coverage` ``F(p) = k(p) / N`` with ``k(p)`` the fewest top-ranked tokens holding mass ≥ p
  (p = 0.6 is the threshold of DINO's attention masks, Caron et al., ICCV 2021, §4.2.1). :func:`threshold_mask`
  gives those tokens.
* :func:`gini` ``G = Σᵢ (2i − N − 1) a₍ᵢ₎ / (N Σ a)`` over the ascending-sorted row (0: even; (N−1)/N: one token).
* :func:`prior_coverage`: with a token occupancy ``A[k, t]`` of K groups (the area share of group k in token t,
  columns summing to 1; :func:`token_occupancy`), attention mass per group ``m_k = Σ_t a[t] A[k, t]`` and area
  share ``s_k = Σ_t A[k, t] / N``; returns ``KL(s ‖ m)`` in nats over the groups with ``s_k > 0`` (0 when attention
  follows tissue composition) and the number of groups with ``m_k ≥ 0.05``.
* :func:`head_js_divergence`: the mean Jensen–Shannon divergence over all pairs of heads, in bits (∈ [0, 1]).

:func:`paired_wilcoxon` compares two encoders image by image (scipy's signed-rank test); :func:`summary`
gives mean ± sd over the tile set.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from histobench.errors import HistobenchError

COVERAGE_LEVELS = (0.6, 0.9)
GROUP_MASS_MIN = 0.05  # a group "receives attention" when it holds at least this much of it
_TINY = 1e-12
_TOLERANCE = 1e-9  # cumulative sums of floats that should reach p exactly


def as_rows(attention: Any) -> np.ndarray:
    """``attention`` as float64 rows over the last axis, each renormalised to sum to 1.

    Raises:
        HistobenchError: negative entries, a row summing to 0, or fewer than 2 tokens.
    """
    a = np.asarray(attention, dtype=np.float64)
    if a.ndim == 0 or a.shape[-1] < 2:
        raise HistobenchError(f"attention rows need at least 2 tokens (got shape {a.shape})")
    if not np.isfinite(a).all() or (a < 0).any():
        raise HistobenchError("attention has negative or non-finite entries")
    total = a.sum(axis=-1, keepdims=True)
    if (total <= 0).any():
        raise HistobenchError("an attention row sums to 0")
    return a / total


def normalised_entropy(attention: Any) -> np.ndarray:
    """``−Σ a log a / log N`` per row (``0 log 0 = 0``)."""
    a = as_rows(attention)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(a > 0, a * np.log(a), 0.0)
    return 0.0 - terms.sum(axis=-1) / math.log(a.shape[-1])  # 0.0 - x: no -0.0 for a one-hot row


def _top_counts(a: np.ndarray, p: float) -> np.ndarray:
    if not 0 < p <= 1:
        raise HistobenchError(f"mass level p must lie in (0, 1], got {p}")
    ranked = -np.sort(-a, axis=-1)
    cumulative = np.cumsum(ranked, axis=-1)
    # the first rank where the cumulative mass reaches p (the last rank always does: rows sum to 1)
    return np.minimum((cumulative < p - _TOLERANCE).sum(axis=-1) + 1, a.shape[-1])


def mass_coverage(attention: Any, p: float) -> np.ndarray:
    """``F(p) = k(p) / N`` per row: the fraction of tokens needed, largest first, to hold attention mass ``p``."""
    a = as_rows(attention)
    return _top_counts(a, p) / a.shape[-1]


def threshold_mask(attention: Any, p: float = 0.6) -> np.ndarray:
    """Boolean ``[..., N]``: the ``k(p)`` largest tokens of each row (DINO's thresholded attention; ties broken
    by token order)."""
    a = as_rows(attention)
    k = _top_counts(a, p)
    order = np.argsort(-a, axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(a.shape[-1]).reshape((1,) * (a.ndim - 1) + (-1,)), axis=-1)
    return ranks < k[..., None]


def gini(attention: Any) -> np.ndarray:
    """The Gini coefficient of each row: ``Σᵢ (2i − N − 1) a₍ᵢ₎ / (N Σ a)``, ``a`` sorted ascending, i = 1..N."""
    a = np.sort(as_rows(attention), axis=-1)
    n = a.shape[-1]
    weights = 2 * np.arange(1, n + 1) - n - 1
    return (a * weights).sum(axis=-1) / n  # rows sum to 1


def prior_coverage(attention: Any, occupancy: Any, min_mass: float = GROUP_MASS_MIN) -> tuple[np.ndarray, np.ndarray]:
    """``(KL(s ‖ m), groups with m_k ≥ min_mass)`` per row.

    Args:
        attention: ``[..., N]`` attention rows.
        occupancy: ``[K, N]`` (one image, broadcast over the rows) or ``[..., K, N]`` matching ``attention``'s
            leading shape: the share of each token's area that group k covers (columns sum to 1).
        min_mass: The attention mass a group must receive to be counted.
    """
    a = as_rows(attention)
    occ = np.asarray(occupancy, dtype=np.float64)
    if occ.ndim < 2 or occ.shape[-1] != a.shape[-1]:
        raise HistobenchError(f"occupancy of shape {occ.shape} does not fit attention over {a.shape[-1]} tokens")
    mass = np.einsum("...n,...kn->...k", a, occ)  # m_k
    share = occ.sum(axis=-1) / a.shape[-1]  # s_k
    share = np.broadcast_to(share, mass.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(share > 0, share * np.log(share / np.maximum(mass, _TINY)), 0.0)
    return terms.sum(axis=-1), (mass >= min_mass).sum(axis=-1).astype(np.float64)


def _kl_bits(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * np.log2(p / np.maximum(q, _TINY)), 0.0).sum(axis=-1)


def head_js_divergence(attention: Any) -> np.ndarray:
    """Mean Jensen–Shannon divergence (bits) over all pairs of heads: ``[..., heads, N] -> [...]``.

    0 when every head attends alike; 1 when the heads' maps are pairwise disjoint. One head gives 0.
    """
    a = as_rows(attention)
    if a.ndim < 2:
        raise HistobenchError("head diversity needs attention of shape [..., heads, tokens]")
    heads = a.shape[-2]
    if heads < 2:
        return np.zeros(a.shape[:-2])
    i, j = np.triu_indices(heads, k=1)
    p, q = a[..., i, :], a[..., j, :]
    mid = (p + q) / 2
    js = (_kl_bits(p, mid) + _kl_bits(q, mid)) / 2
    return js.mean(axis=-1)


def area_weights(pixels: int, cells: int) -> np.ndarray:
    """``[cells, pixels]``: the share of cell ``i``'s extent covered by pixel ``p`` when ``pixels`` unit pixels are
    cut into ``cells`` equal intervals (rows sum to 1; exact when ``pixels`` is not a multiple of ``cells``)."""
    edges = np.arange(cells + 1) * (pixels / cells)
    lo, hi = edges[:-1, None], edges[1:, None]
    p = np.arange(pixels)[None, :]
    overlap = np.clip(np.minimum(hi, p + 1) - np.maximum(lo, p), 0, None)
    return overlap / (pixels / cells)


def token_occupancy(groups: Any, n_groups: int, grid: tuple[int, int]) -> np.ndarray:
    """``A [K, h*w]`` (row-major tokens): the area share of each group in each token of an ``h × w`` grid laid
    over a group-id map ``[H, W]`` (ids 0..K−1) that covers the same field of view as the encoder's input."""
    g = np.asarray(groups)
    if g.ndim != 2:
        raise HistobenchError(f"a group map must be 2-D, got shape {g.shape}")
    if g.size and (int(g.min()) < 0 or int(g.max()) >= n_groups):
        raise HistobenchError(f"group ids span {int(g.min())}..{int(g.max())}, expected 0..{n_groups - 1}")
    h, w = grid
    wy, wx = area_weights(g.shape[0], h), area_weights(g.shape[1], w)
    onehot = (g[None] == np.arange(n_groups)[:, None, None]).astype(np.float64)  # [K, H, W]
    occ = np.einsum("ip,kpq,jq->kij", wy, onehot, wx)
    return occ.reshape(n_groups, h * w)


def group_map(instances: Any, types: Any | None, grouping: str, n_types: int | None = None) -> np.ndarray:
    """Group id per pixel: ``binary`` (0 no nucleus, 1 nucleus) or ``types`` (0 no nucleus, else the cell type;
    type 0 inside a nucleus, an unknown type, counts as no nucleus)."""
    inst = np.asarray(instances)
    if grouping == "binary":
        return (inst > 0).astype(np.int64)
    if grouping != "types":
        raise HistobenchError(f"grouping must be 'types' or 'binary', got {grouping!r}")
    if types is None:
        raise HistobenchError("grouping 'types' needs a type map")
    g = np.where(inst > 0, np.asarray(types), 0).astype(np.int64)
    if n_types is not None and g.size and int(g.max()) > n_types:
        raise HistobenchError(f"type id {int(g.max())} exceeds the {n_types} types of the grouping")
    return g


def summary(values: Any) -> tuple[float, float, int]:
    """``(mean, sd with ddof=1, n)`` over the finite values (sd 0 for one value; NaNs for none)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, int(len(v))


def paired_wilcoxon(first: Any, second: Any) -> dict[str, Any]:
    """Wilcoxon signed-rank test (two-sided) of ``first − second`` over paired images.

    Pairs with a non-finite value are dropped; zero differences are dropped too (Wilcoxon's original rule,
    scipy's ``zero_method="wilcox"``). Returns ``p`` (1.0 when no pair differs), ``statistic``, ``n`` (pairs
    used), ``median_difference`` (first − second, over the finite pairs) and ``direction`` (``">"``, ``"<"`` or
    ``"="``: the sign of the median difference).
    """
    from scipy.stats import wilcoxon

    x, y = np.asarray(first, dtype=np.float64).ravel(), np.asarray(second, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise HistobenchError(f"paired samples differ in length ({len(x)} vs {len(y)})")
    keep = np.isfinite(x) & np.isfinite(y)
    d = x[keep] - y[keep]
    median = float(np.median(d)) if len(d) else float("nan")
    nonzero = int((d != 0).sum())
    if nonzero == 0:
        p, stat = 1.0, float("nan")
    else:
        res = wilcoxon(d, zero_method="wilcox", alternative="two-sided")
        p, stat = float(res.pvalue), float(res.statistic)
    direction = "=" if not len(d) or median == 0 else (">" if median > 0 else "<")
    return {"p": p, "statistic": stat, "n": int(len(d)), "nonzero": nonzero, "median_difference": median,
            "direction": direction}


__all__ = ["COVERAGE_LEVELS", "GROUP_MASS_MIN", "as_rows", "normalised_entropy", "mass_coverage", "threshold_mask",
           "gini", "prior_coverage", "head_js_divergence", "area_weights", "token_occupancy", "group_map", "summary",
           "paired_wilcoxon"]
