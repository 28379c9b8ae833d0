"""Patient-level bootstrap CIs and the paired comparison of two runs (histobench.evaluate.stats)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from histobench.errors import HistobenchError
from histobench.evaluate import stats


def classification_predictions(n_patients: int, seed: int, signal: float = 1.0, folds: int = 5,
                               slides_per_patient: int = 1) -> pd.DataFrame:
    """Out-of-fold predictions of a binary task: ``prob_B`` rises with the label by ``signal`` (logit scale)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n_patients)
    logit = signal * (2 * label - 1) + rng.normal(size=n_patients)
    p = 1 / (1 + np.exp(-logit))
    rows = []
    for i in range(n_patients):
        for s in range(slides_per_patient):
            rows.append({"slide_id": f"S{i}-{s}", "case_id": f"P{i}", "fold": i % folds, "seed": 0,
                         "label": int(label[i]), "prob_A": 1 - p[i], "prob_B": p[i]})
    return pd.DataFrame(rows)


def survival_predictions(n_patients: int, seed: int, folds: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n_patients)
    t = rng.exponential(20 * np.exp(-x))
    c = rng.exponential(30, size=n_patients)
    return pd.DataFrame({"slide_id": [f"S{i}" for i in range(n_patients)],
                         "case_id": [f"P{i}" for i in range(n_patients)],
                         "fold": np.arange(n_patients) % folds, "seed": 0, "time": np.minimum(t, c),
                         "event": (t <= c).astype(int), "risk": x + rng.normal(size=n_patients),
                         "cox_risk": 10 * x})


CLASSES = ["A", "B"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bootstrap_ci_covers_the_point_estimate(seed):
    pred = classification_predictions(120, seed)
    value = stats.statistic(pred, "subtyping", "macro_auc", CLASSES)
    lo, hi = stats.bootstrap(pred, "subtyping", "macro_auc", CLASSES, n=300, seed=seed)
    assert lo < value < hi
    assert 0.5 < value < 1.0 and hi - lo < 0.4


def test_bootstrap_narrows_with_more_patients_and_is_reproducible():
    small = classification_predictions(60, 0)
    large = classification_predictions(600, 0)
    lo_s, hi_s = stats.bootstrap(small, "subtyping", "macro_auc", CLASSES, n=300, seed=0)
    lo_l, hi_l = stats.bootstrap(large, "subtyping", "macro_auc", CLASSES, n=300, seed=0)
    assert hi_l - lo_l < 0.6 * (hi_s - lo_s)  # ~ 1/sqrt(10) in theory
    assert stats.bootstrap(small, "subtyping", "macro_auc", CLASSES, n=300, seed=0) == (lo_s, hi_s)
    assert stats.bootstrap(small, "subtyping", "macro_auc", CLASSES, n=300, seed=1) != (lo_s, hi_s)


def test_bootstrap_resamples_patients_not_slides():
    # Each patient's slide copied three times: the AUC of the copies equals that of the originals, and a
    # patient draw brings all three copies, so the CI is exactly the one-slide-per-patient CI. Resampling
    # slides would treat the copies as independent patients and give a narrower interval.
    one = classification_predictions(80, 3)
    three = classification_predictions(80, 3, slides_per_patient=3)
    assert stats.statistic(three, "subtyping", "macro_auc", CLASSES) == pytest.approx(
        stats.statistic(one, "subtyping", "macro_auc", CLASSES), abs=1e-12)
    ci_one = stats.bootstrap(one, "subtyping", "macro_auc", CLASSES, n=200, seed=0)
    ci_three = stats.bootstrap(three, "subtyping", "macro_auc", CLASSES, n=200, seed=0)
    np.testing.assert_allclose(ci_three, ci_one, atol=1e-12)
    by_slide = three.assign(case_id=three["slide_id"])
    lo, hi = stats.bootstrap(by_slide, "subtyping", "macro_auc", CLASSES, n=200, seed=0)
    assert hi - lo < 0.8 * (ci_one[1] - ci_one[0])


def test_resampler_moves_a_patients_slides_together_and_keeps_fold_sizes():
    pred = classification_predictions(30, 0, folds=3, slides_per_patient=2)
    pred = pd.concat([pred, pred.assign(seed=1)], ignore_index=True)  # a second seed repeat
    for by_fold in (False, True):
        sampler = stats._Resampler([pred], by_fold=by_fold, seed=0)
        for _ in range(20):
            (rows,) = sampler.draw()
            times = np.bincount(rows, minlength=len(pred))
            per_patient = pd.Series(times).groupby(pred["case_id"].to_numpy()).agg(["min", "max", "sum"])
            assert (per_patient["min"] == per_patient["max"]).all()  # 2 slides x 2 seeds drawn alike
            assert per_patient["sum"].sum() == len(pred)  # as many patients as there are
            if by_fold:  # each fold keeps its number of patients
                patients = pd.Series(times[pred["seed"] == 0]).groupby(pred.loc[pred["seed"] == 0, "fold"].to_numpy()).sum()
                assert (patients == 2 * 10).all()


def test_survival_statistic_is_the_mean_of_fold_values_and_ci_covers_it():
    from histobench.evaluate.metrics import concordance_index

    pred = survival_predictions(200, 0)
    per_fold = [concordance_index(g["time"], g["event"], g["risk"]) for _, g in pred.groupby("fold")]
    assert stats.statistic(pred, "survival", "c_index") == pytest.approx(np.mean(per_fold), abs=1e-12)
    pd.testing.assert_series_equal(stats.per_fold_values(pred, "survival", "c_index"),
                                   pd.Series(per_fold, index=[0, 1, 2, 3]), check_exact=False)
    cox = stats.statistic(pred, "survival", "cox_c_index")  # on cox_risk, a different column
    assert cox != stats.statistic(pred, "survival", "c_index") and cox > 0.6
    lo, hi = stats.bootstrap(pred, "survival", "c_index", n=200, seed=0)
    assert lo < stats.statistic(pred, "survival", "c_index") < hi
    with pytest.raises(HistobenchError, match="unknown survival metric"):
        stats.statistic(pred, "survival", "macro_auc")
    with pytest.raises(HistobenchError, match="unknown metric"):
        stats.statistic(classification_predictions(20, 0), "subtyping", "c_index", CLASSES)


def test_paired_comparison_of_a_run_with_itself():
    pred = classification_predictions(100, 0)
    r = stats.paired_comparison(pred, pred.sample(frac=1.0, random_state=0), "subtyping", "macro_auc", CLASSES, n=200)
    assert r["difference"] == pytest.approx(0.0, abs=1e-12)
    assert r["ci_low"] == pytest.approx(0.0, abs=1e-12) and r["ci_high"] == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(r["wilcoxon_p"])  # no non-zero fold differences: no test
    assert r["n_folds"] == 5 and (r["folds"]["difference"].abs() < 1e-12).all()


def test_paired_comparison_of_a_clearly_better_run_and_wilcoxon_matches_scipy():
    from scipy.stats import wilcoxon
    from sklearn.metrics import roc_auc_score

    good = classification_predictions(300, 0, signal=1.5, folds=10)
    rng = np.random.default_rng(1)
    noisy = rng.normal(size=len(good))  # B: the same patients and folds, a much weaker score
    pb = 1 / (1 + np.exp(-(0.2 * (2 * good["label"] - 1) + 1.5 * noisy)))
    bad = good.assign(prob_A=1 - pb, prob_B=pb)
    r = stats.paired_comparison(good, bad, "subtyping", "macro_auc", CLASSES, n=300, seed=0)
    assert r["a"] == pytest.approx(roc_auc_score(good["label"], good["prob_B"]), abs=1e-12)
    assert r["b"] == pytest.approx(roc_auc_score(bad["label"], bad["prob_B"]), abs=1e-12)
    assert r["difference"] == pytest.approx(r["a"] - r["b"])
    assert 0 < r["ci_low"] < r["difference"] < r["ci_high"]
    diffs = [roc_auc_score(g["label"], g["prob_B"]) - roc_auc_score(b["label"], b["prob_B"])
             for (_, g), (_, b) in zip(good.groupby("fold"), bad.groupby("fold"))]
    np.testing.assert_allclose(r["folds"]["difference"], diffs, atol=1e-12)
    assert r["wilcoxon_p"] == pytest.approx(wilcoxon(diffs).pvalue, rel=1e-12)
    assert r["n_folds"] == 10 and r["wilcoxon_p"] < 0.05
    swapped = stats.paired_comparison(bad, good, "subtyping", "macro_auc", CLASSES, n=300, seed=0)
    assert swapped["difference"] == pytest.approx(-r["difference"])
    assert swapped["ci_high"] < 0 and swapped["wilcoxon_p"] == pytest.approx(r["wilcoxon_p"])


def test_paired_comparison_survival_and_disjoint_runs():
    a = survival_predictions(200, 0)
    b = a.assign(risk=np.random.default_rng(5).normal(size=len(a)))  # B's risk carries no signal
    r = stats.paired_comparison(a, b, "survival", "c_index", n=200)
    assert r["difference"] > 0.1 and 0 < r["ci_low"] < r["difference"] < r["ci_high"] and r["n_folds"] == 4
    cox = stats.paired_comparison(a, b, "survival", "cox_c_index", n=50)  # same cox_risk in both runs
    assert cox["difference"] == 0 and cox["ci_low"] == cox["ci_high"] == 0
    other = a.assign(case_id="Q" + a["case_id"])
    with pytest.raises(HistobenchError, match="share no test patients"):
        stats.paired_comparison(a, other, "survival", "c_index", n=10)


def test_t_interval_and_fold_estimate():
    from scipy.stats import t

    values = np.array([0.6, 0.7, 0.8, 0.9, np.nan])
    lo, hi = stats.t_interval(values)
    half = t.ppf(0.975, 3) * np.std(values[:4], ddof=1) / 2
    assert (lo, hi) == pytest.approx((0.75 - half, 0.75 + half), abs=1e-12)
    assert stats.t_interval([0.9, 1.0, 1.0])[1] == 1.0  # clipped to the metric's range, mean still inside
    assert stats.t_interval([0.9, 1.0, 1.0], bounds=None)[1] > 1.0
    assert all(np.isnan(stats.t_interval([0.5])))
    e = stats.fold_estimate(values, "macro_auc")
    assert e["fold_mean"] == pytest.approx(0.75) and e["n_folds"] == 4 and (e["fold_ci_low"], e["fold_ci_high"]) == (lo, hi)
    assert stats.fold_estimate([-0.9, -0.95, -1.0], "qwk")["fold_ci_low"] == -1.0  # qwk lives in [-1, 1]
    assert np.isnan(stats.fold_estimate([0.01, 0.2, 0.03], "logrank_p")["fold_ci_low"])  # no interval for p-values


def test_estimator_labels_name_every_summary_key():
    assert stats.estimator_label("fold", 10) == "mean ± sd over 10 folds"
    assert stats.estimator_label("fold", 10, ci=True) == "t-interval over folds"
    assert stats.estimator_label("pooled", ci=True) == "patient bootstrap"
    assert stats.estimator_label("fold_boot", 4) == "mean over 4 folds"
    assert stats.bootstrap_estimator("subtyping") == "pooled" and stats.bootstrap_estimator("survival") == "fold_boot"
    assert stats.bootstrap_estimator("survival", "logrank_p") == "pooled_test"
    entry = {"fold_mean": 0.8, "pooled": 0.7, "pooled_ci_low": 0.6}
    assert stats.summary_estimators(entry) == ["fold", "pooled"]
    assert stats.summary_estimators({"fold_mean": 0.8, "pooled": 0.01}) == ["fold", "pooled_test"]
    with pytest.raises(HistobenchError, match="unknown estimator 'mean'"):
        stats.estimator_label("mean")


def test_paired_comparison_fold_estimator_has_its_own_ci():
    good = classification_predictions(300, 0, signal=1.5, folds=10)
    rng = np.random.default_rng(1)
    pb = 1 / (1 + np.exp(-(0.2 * (2 * good["label"] - 1) + 1.5 * rng.normal(size=len(good)))))
    bad = good.assign(prob_A=1 - pb, prob_B=pb)
    r = stats.paired_comparison(good, bad, "subtyping", "macro_auc", CLASSES, n=50, seed=0)
    assert r["estimator"] == "pooled"
    assert r["fold_difference"] == pytest.approx(r["folds"]["difference"].mean(), abs=1e-12)
    assert r["fold_a"] - r["fold_b"] == pytest.approx(r["fold_difference"], abs=1e-12)
    assert 0 < r["fold_ci_low"] < r["fold_difference"] < r["fold_ci_high"]
    assert (r["fold_ci_low"], r["fold_ci_high"]) == pytest.approx(stats.t_interval(r["folds"]["difference"], bounds=(-1, 1)))
