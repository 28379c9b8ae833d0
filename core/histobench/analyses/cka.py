"""Centered kernel alignment (CKA) between two sets of activations of the same N inputs: pure functions.

CKA (Kornblith, Norouzi, Lee, Hinton, "Similarity of Neural Network Representations Revisited", ICML 2019,
arXiv 1905.00414) compares X ∈ R^{N×p} and Y ∈ R^{N×q} through their N×N kernel (Gram) matrices K and L:
``CKA = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))``. HistoTransfer (Sharma et al., IEEE BHI 2021) uses it to
see which layers of an encoder fine-tuning changed.

* HSIC estimators: the biased ``tr(K H L H) / (N − 1)²`` (Gretton et al. 2005; H = I − 11ᵀ/N) and the
  unbiased one of Song, Smola, Gretton, Bedo, Borgwardt (JMLR 2012), which zeroes the diagonals and needs
  N > 3.
* Kernels: linear (``X Xᵀ``) and RBF ``exp(−‖xᵢ − xⱼ‖² / (2σ²))``. The bandwidth is ``σ² = t² · median of
  all N² squared distances`` (:data:`MEDIAN_SQDIST`, Kornblith et al.'s convention, t = 0.5) or ``σ = t ·
  median of the off-diagonal distances`` (:data:`MEDIAN_DIST`). They give different values, so reports name
  the rule.
* Estimators of :func:`cka`: ``full_biased`` and ``full_unbiased`` on all N rows, and ``minibatch_unbiased``
  (Nguyen, Raghu, Kornblith, ICLR 2021, arXiv 2010.15327). The minibatch one sums the unbiased HSIC of each
  minibatch separately for the three terms and forms the ratio once. Per-batch *biased* HSIC would make the
  value depend on the batch size. :class:`MinibatchCKA` accumulates the sums for a whole matrix of layer pairs
  one batch at a time, so memory stays at one batch.
* Linear CKA has a feature-space form (:func:`linear_cka_features`, ``‖Ȳᵀ X̄‖²_F / (‖X̄ᵀ X̄‖_F ‖Ȳᵀ Ȳ‖_F)`` with
  column-centred X̄, Ȳ) that equals the Gram-space one (:func:`cka_from_grams` with :func:`linear_gram`)
  without forming N×N matrices.

All arithmetic is float64 torch; inputs may be torch tensors or anything ``numpy.asarray`` takes. Results are
Python floats. Nothing here imports torch at module level.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from histobench.errors import HistobenchError

if TYPE_CHECKING:  # pragma: no cover
    import torch

KERNELS = ("linear", "rbf")
ESTIMATORS = ("full_biased", "full_unbiased", "minibatch_unbiased")
MEDIAN_SQDIST = "median_sqdist"  # σ² = t² · median of all N² squared distances (diagonal zeros included)
MEDIAN_DIST = "median_dist"  # σ = t · median of the N(N−1) off-diagonal distances
BANDWIDTHS = (MEDIAN_SQDIST, MEDIAN_DIST)
DEFAULT_RBF_T = 0.5


def as_float64(x: Any) -> "torch.Tensor":
    """``x`` as a 2-D float64 tensor ``[N, features]`` (a 1-D input is one feature per row)."""
    import torch

    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    t = t.to(torch.float64)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        t = t.reshape(len(t), -1)
    return t


def center_gram(k: "torch.Tensor") -> "torch.Tensor":
    """``H K H`` with ``H = I − 11ᵀ/N``: rows and columns of ``k`` minus their means."""
    k = k - k.mean(dim=0, keepdim=True)
    return k - k.mean(dim=1, keepdim=True)


def linear_gram(x: Any) -> "torch.Tensor":
    """The linear kernel ``X Xᵀ`` (float64, ``[N, N]``)."""
    x = as_float64(x)
    return x @ x.T


def squared_distances(x: Any) -> "torch.Tensor":
    """All N² squared Euclidean distances between the rows of ``x`` (exact zeros on the diagonal, none negative)."""
    x = as_float64(x)
    sq = (x * x).sum(dim=1)
    d = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    d = d.clamp_min(0.0)
    d.fill_diagonal_(0.0)
    return d


def rbf_sigma2(d2: "torch.Tensor", t: float = DEFAULT_RBF_T, bandwidth: str = MEDIAN_SQDIST) -> float:
    """σ² of the RBF kernel from the squared-distance matrix ``d2`` by the ``bandwidth`` rule (see the module)."""
    import numpy as np

    d = d2.detach().cpu().numpy()
    if bandwidth == MEDIAN_SQDIST:  # numpy's median: the mean of the two middle values for an even count
        sigma2 = t * t * float(np.median(d))
    elif bandwidth == MEDIAN_DIST:
        off = d[~np.eye(len(d), dtype=bool)]
        sigma2 = (t * float(np.median(np.sqrt(off)))) ** 2
    else:
        raise HistobenchError(f"unknown RBF bandwidth rule {bandwidth!r}; choose {' or '.join(BANDWIDTHS)}")
    return sigma2


def rbf_gram(x: Any, t: float = DEFAULT_RBF_T, bandwidth: str = MEDIAN_SQDIST) -> "torch.Tensor":
    """The RBF kernel ``exp(−‖xᵢ − xⱼ‖² / (2σ²))`` with σ² from :func:`rbf_sigma2`.

    When every distance is zero (all rows equal) the kernel is all ones, the limit of a vanishing bandwidth's
    complement: a constant representation, whose centred kernel is zero.
    """
    import torch

    d2 = squared_distances(x)
    sigma2 = rbf_sigma2(d2, t, bandwidth)
    if not sigma2 > 0.0:
        return torch.ones_like(d2)
    return torch.exp(-d2 / (2.0 * sigma2))


def gram(x: Any, kernel: str = "linear", rbf_t: float = DEFAULT_RBF_T, bandwidth: str = MEDIAN_SQDIST) -> "torch.Tensor":
    """The ``kernel`` (``linear`` or ``rbf``) Gram matrix of the rows of ``x``."""
    if kernel == "linear":
        return linear_gram(x)
    if kernel == "rbf":
        return rbf_gram(x, rbf_t, bandwidth)
    raise HistobenchError(f"unknown CKA kernel {kernel!r}; choose {' or '.join(KERNELS)}")


def hsic_biased(k: "torch.Tensor", l: "torch.Tensor") -> float:
    """The biased HSIC estimator ``tr(K H L H) / (N − 1)²`` of two ``[N, N]`` kernel matrices."""
    k, l = as_float64(k), as_float64(l)
    n = k.shape[0]
    if n < 2:
        raise HistobenchError(f"HSIC needs at least 2 samples, got {n}")
    # tr(HKH · L) with HKH symmetric: the elementwise product's sum
    return float((center_gram(k) * l).sum()) / (n - 1) ** 2


def hsic_unbiased(k: "torch.Tensor", l: "torch.Tensor") -> float:
    """The unbiased HSIC estimator of Song et al. (JMLR 2012) of two ``[N, N]`` kernel matrices, N > 3.

    With K̃, L̃ the kernels with zeroed diagonals:
    ``[tr(K̃ L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((N−1)(N−2)) − 2/(N−2) · 1ᵀK̃L̃1] / (N(N−3))``.
    """
    k, l = as_float64(k).clone(), as_float64(l).clone()
    n = k.shape[0]
    if n < 4:
        raise HistobenchError(f"the unbiased HSIC estimator needs more than 3 samples, got {n}")
    k.fill_diagonal_(0.0)
    l.fill_diagonal_(0.0)
    trace = (k * l.T).sum()
    sums = k.sum() * l.sum() / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * (k.sum(dim=0) @ l.sum(dim=1))  # 1ᵀ K̃ L̃ 1
    return float(trace + sums - cross) / (n * (n - 3))


def _ratio(kl: float, kk: float, ll: float) -> float:
    """``kl / sqrt(kk · ll)``; NaN when either self-term is not positive (a constant representation)."""
    if not (kk > 0.0 and ll > 0.0):
        return float("nan")
    return kl / math.sqrt(kk * ll)


def cka_from_grams(k: "torch.Tensor", l: "torch.Tensor", unbiased: bool = False) -> float:
    """CKA of two kernel matrices with the biased (default) or the unbiased HSIC estimator."""
    hsic = hsic_unbiased if unbiased else hsic_biased
    return _ratio(hsic(k, l), hsic(k, k), hsic(l, l))


def linear_cka_features(x: Any, y: Any) -> float:
    """Biased linear CKA in feature space: ``‖Ȳᵀ X̄‖²_F / (‖X̄ᵀ X̄‖_F · ‖Ȳᵀ Ȳ‖_F)`` with column-centred X̄, Ȳ.

    Equal to ``cka_from_grams(linear_gram(x), linear_gram(y))`` without the N×N matrices (cheaper when the
    feature dimensions are below N).
    """
    x, y = as_float64(x), as_float64(y)
    if len(x) != len(y):
        raise HistobenchError(f"CKA compares the same inputs: {len(x)} rows vs {len(y)} rows")
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    kl = float((y.T @ x).square().sum())
    kk = float((x.T @ x).norm())  # ‖X̄ᵀX̄‖_F
    ll = float((y.T @ y).norm())
    if not (kk > 0.0 and ll > 0.0):
        return float("nan")
    return kl / (kk * ll)


def minibatch_slices(n: int, batch_size: int) -> list[slice]:
    """``n`` rows cut into ``ceil(n / batch_size)`` consecutive slices of near-equal size (none under 4 when
    ``n`` ≥ 4 and ``batch_size`` ≥ 4), so that the unbiased estimator never meets a tiny last batch."""
    if batch_size < 4:
        raise HistobenchError(f"the minibatch CKA estimator needs batches of at least 4 rows, got batch_size={batch_size}")
    parts = max(1, math.ceil(n / batch_size))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


class MinibatchCKA:
    """Minibatch CKA for every pair (a, b) of ``n_a`` layers of one network and ``n_b`` layers of another.

    Each :meth:`update` takes the two lists of Gram matrices of one minibatch (the same inputs through both
    networks) and adds that batch's HSIC of every pair and of every layer with itself. :meth:`matrix` then
    forms ``M[a, b] = Σ HSIC(K_a, L_b) / sqrt(Σ HSIC(K_a, K_a) · Σ HSIC(L_b, L_b))`` once (Nguyen et al. 2021).
    ``unbiased=False`` sums per-batch biased HSIC instead, a batch-size dependent estimate kept for comparison.
    """

    def __init__(self, n_a: int, n_b: int, unbiased: bool = True):
        self.n_a, self.n_b, self.unbiased = n_a, n_b, unbiased
        self.cross = [[0.0] * n_b for _ in range(n_a)]
        self.self_a = [0.0] * n_a
        self.self_b = [0.0] * n_b
        self.batches = 0
        self.rows = 0

    def update(self, grams_a: Sequence["torch.Tensor"], grams_b: Sequence["torch.Tensor"]) -> None:
        hsic = hsic_unbiased if self.unbiased else hsic_biased
        if len(grams_a) != self.n_a or len(grams_b) != self.n_b:
            raise ValueError(f"expected {self.n_a} and {self.n_b} Gram matrices, got {len(grams_a)} and {len(grams_b)}")
        for a, k in enumerate(grams_a):
            self.self_a[a] += hsic(k, k)
            for b, l in enumerate(grams_b):
                self.cross[a][b] += hsic(k, l)
        for b, l in enumerate(grams_b):
            self.self_b[b] += hsic(l, l)
        self.batches += 1
        self.rows += int(grams_a[0].shape[0]) if grams_a else 0

    def matrix(self) -> list[list[float]]:
        """``M[a][b]`` (NaN where a layer's summed self-HSIC is not positive)."""
        return [[_ratio(self.cross[a][b], self.self_a[a], self.self_b[b]) for b in range(self.n_b)]
                for a in range(self.n_a)]


def minibatch_cka(x: Any, y: Any, batch_size: int, kernel: str = "linear", rbf_t: float = DEFAULT_RBF_T,
                  bandwidth: str = MEDIAN_SQDIST, unbiased: bool = True, order: Iterable[int] | None = None) -> float:
    """Minibatch CKA of ``x`` and ``y`` over consecutive batches of at most ``batch_size`` rows (in ``order`` if
    given, e.g. a random permutation); the RBF bandwidth is set within each batch."""
    import torch

    x, y = as_float64(x), as_float64(y)
    if len(x) != len(y):
        raise HistobenchError(f"CKA compares the same inputs: {len(x)} rows vs {len(y)} rows")
    if order is not None:
        idx = torch.as_tensor(list(order), dtype=torch.long)
        x, y = x[idx], y[idx]
    acc = MinibatchCKA(1, 1, unbiased=unbiased)
    for rows in minibatch_slices(len(x), batch_size):
        acc.update([gram(x[rows], kernel, rbf_t, bandwidth)], [gram(y[rows], kernel, rbf_t, bandwidth)])
    return acc.matrix()[0][0]


def cka(x: Any, y: Any, kernel: str = "linear", estimator: str = "full_biased", *, rbf_t: float = DEFAULT_RBF_T,
        bandwidth: str = MEDIAN_SQDIST, batch_size: int = 256) -> float:
    """CKA of two representations of the same N inputs (``[N, p]`` and ``[N, q]``).

    ``kernel``: ``linear`` or ``rbf`` (bandwidth ``rbf_t`` and the ``bandwidth`` rule); ``estimator``:
    ``full_biased``, ``full_unbiased`` (N > 3) or ``minibatch_unbiased`` (consecutive batches of at most
    ``batch_size`` rows; shuffle the rows first when their order is structured).
    """
    x, y = as_float64(x), as_float64(y)
    if len(x) != len(y):
        raise HistobenchError(f"CKA compares the same inputs: {len(x)} rows vs {len(y)} rows")
    if kernel not in KERNELS:
        raise HistobenchError(f"unknown CKA kernel {kernel!r}; choose {' or '.join(KERNELS)}")
    if estimator == "minibatch_unbiased":
        return minibatch_cka(x, y, batch_size, kernel, rbf_t, bandwidth)
    if estimator not in ESTIMATORS:
        raise HistobenchError(f"unknown CKA estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if kernel == "linear" and estimator == "full_biased":
        return linear_cka_features(x, y)
    unbiased = estimator == "full_unbiased"
    return cka_from_grams(gram(x, kernel, rbf_t, bandwidth), gram(y, kernel, rbf_t, bandwidth), unbiased)

