"""Metrics against scikit-learn and a brute-force c-index; the patient-level bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

from histobench.evaluate.metrics import (
    METRICS,
    balanced_accuracy,
    bootstrap_ci,
    compute_metrics,
    concordance_index,
    macro_auc,
    quadratic_weighted_kappa,
    weighted_f1,
)

SEEDS = [0, 1, 2, 3, 4]


def probs(rng, n, c):
    logits = rng.normal(size=(n, c))
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_auc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y * 0.5, 1)  # rounding makes ties
    assert macro_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    p = np.stack([1 - s, s], axis=1)
    assert macro_auc(y, p) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_multiclass_auc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 300)
    p = probs(rng, 300, 4)
    expected = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert macro_auc(y, p) == pytest.approx(expected, abs=1e-12)


def test_auc_skips_absent_classes_and_sign():
    rng = np.random.default_rng(0)
    y = rng.choice([0, 2, 3], 120)
    p = probs(rng, 120, 4)
    expected = np.mean([roc_auc_score(y == c, p[:, c]) for c in (0, 2, 3)])
    assert macro_auc(y, p) == pytest.approx(expected, abs=1e-12)
    assert macro_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert macro_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert np.isnan(macro_auc([1, 1, 1], [0.1, 0.2, 0.3]))


@pytest.mark.parametrize("seed", SEEDS)
def test_label_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    c = 6
    y = rng.integers(0, c, 250)
    pred = np.where(rng.random(250) < 0.5, y, rng.integers(0, c, 250))
    pred[pred == 5] = 4  # a class never predicted
    assert balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert weighted_f1(y, pred) == pytest.approx(f1_score(y, pred, average="weighted", zero_division=0), abs=1e-12)
    qwk = cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(c)))
    assert quadratic_weighted_kappa(y, pred, n_classes=c) == pytest.approx(qwk, abs=1e-12)
    assert quadratic_weighted_kappa(y, y, n_classes=c) == pytest.approx(1.0)


def brute_cindex(time, event, risk):
    num = den = 0.0
    for i in range(len(time)):
        for j in range(len(time)):
            if event[i] and time[i] < time[j]:
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return num / den


@pytest.mark.parametrize("seed", SEEDS)
def test_cindex_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 80
    time = rng.integers(1, 40, n).astype(float)  # tied times
    event = rng.random(n) < 0.6
    risk = np.round(rng.normal(size=n), 1)  # tied risks
    assert concordance_index(time, event, risk, chunk=7) == pytest.approx(brute_cindex(time, event, risk), abs=1e-12)


def test_cindex_sign():
    rng = np.random.default_rng(0)
    time = rng.permutation(50).astype(float) + 1
    event = np.ones(50, dtype=bool)
    assert concordance_index(time, event, -time) == 1.0
    assert concordance_index(time, event, time) == 0.0
    assert concordance_index(time, event, np.zeros(50)) == 0.5
    assert METRICS["c_index"](np.stack([time, event], 1), -time) == 1.0


def test_compute_metrics_and_registry():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    p = probs(rng, 90, 3)
    out = compute_metrics("subtyping", y, p)
    assert set(out) == {"macro_auc", "balanced_accuracy", "weighted_f1"}
    assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
    g = compute_metrics("grading", y, p)
    assert g["qwk"] == pytest.approx(cohen_kappa_score(y, p.argmax(1), weights="quadratic", labels=[0, 1, 2]))
    with pytest.raises(ValueError):
        compute_metrics("subtyping", y, p, metrics=["nope"])


def test_bootstrap_resamples_patients():
    rng = np.random.default_rng(0)
    cases = np.repeat([f"p{i}" for i in range(60)], 3)
    y = np.repeat(rng.integers(0, 2, 60), 3)
    p = np.clip(y * 0.3 + rng.random(180) * 0.7, 0, 1)
    scores = np.stack([1 - p, p], 1)
    lo, hi = bootstrap_ci(METRICS["macro_auc"], cases, y, scores, n=300, seed=1)
    point = METRICS["macro_auc"](y, scores)
    assert lo < point < hi and hi - lo < 0.3
    assert bootstrap_ci(METRICS["macro_auc"], cases, y, scores, n=300, seed=1) == (lo, hi)
    # every replicate keeps a patient's rows together: a metric that counts rows per patient sees only 3s
    seen = []

    def rows_per_patient(g):
        seen.append(set(np.unique(g, return_counts=True)[1] % 3))
        return 0.0

    bootstrap_ci(rows_per_patient, cases, cases, n=20, seed=0)
    assert all(s == {0} for s in seen)
    assert all(np.isnan(bootstrap_ci(METRICS["macro_auc"], cases, y, scores, n=0)))
