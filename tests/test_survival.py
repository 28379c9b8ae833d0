"""Survival: metrics against scikit-survival, the discrete-time model's sign, Cox, log-rank, the protocol."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from histobench.evaluate.metrics import METRICS, concordance_index, concordance_index_uno
from histobench.evaluate.survival import (bin_index, discrete_time_nll, fit_cox, kaplan_meier, logrank_test,
                                          risk_from_logits, time_bins)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def cohort(rng, n, beta=1.0):
    x = rng.normal(size=n)
    t = rng.exponential(20 * np.exp(-beta * x))  # hazard grows with x
    c = rng.exponential(30, size=n)
    return x, np.minimum(t, c), (t <= c)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_harrell_and_uno_match_sksurv(seed):
    from sksurv.metrics import concordance_index_censored, concordance_index_ipcw
    from sksurv.util import Surv

    rng = np.random.default_rng(seed)
    x, t, e = cohort(rng, 150)
    risk = x + rng.normal(size=150)
    assert concordance_index(t, e, risk) == pytest.approx(concordance_index_censored(e, t, risk)[0], abs=1e-12)
    y = Surv.from_arrays(e, t)
    tau = np.quantile(t[e], 0.9)
    ref = concordance_index_ipcw(y, y, risk, tau=tau)[0]
    assert concordance_index_uno(t, e, risk, tau=tau) == pytest.approx(ref, abs=1e-9)
    assert METRICS["c_index_uno"](np.stack([t, e], 1), risk) == pytest.approx(concordance_index_uno(t, e, risk))


def test_discrete_time_risk_sign_and_nll():
    # higher hazards -> lower survival -> higher risk; the risk ranks a planted hazard correctly
    low, high = np.full((1, 4), -2.0), np.full((1, 4), 1.0)
    assert risk_from_logits(high)[0] > risk_from_logits(low)[0]
    rng = np.random.default_rng(0)
    x, t, e = cohort(rng, 300, beta=1.5)
    logits = np.repeat(x[:, None], 4, axis=1) - 1.0
    assert concordance_index(t, e, risk_from_logits(logits)) > 0.65
    # NLL by hand: event in bin 1 -> -log(1-h0) - log h1; censored in bin 1 -> -log(1-h0) - log(1-h1)
    lg = torch.tensor([[0.3, -0.5, 0.1, 0.0], [0.3, -0.5, 0.1, 0.0]])
    h = torch.sigmoid(lg[0])
    target = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    expect = (-(torch.log(1 - h[0]) + torch.log(h[1])) - (torch.log(1 - h[0]) + torch.log(1 - h[1]))) / 2
    torch.testing.assert_close(discrete_time_nll(lg, target), expect)
    cuts = time_bins(t, e, 4)
    assert len(cuts) == 3 and np.all(np.diff(cuts) > 0)
    counts = np.bincount(bin_index(t[e], cuts), minlength=4)
    assert counts.min() >= e.sum() // 4 - 1


def test_cox_sign_and_km_logrank():
    from sksurv.compare import compare_survival
    from sksurv.nonparametric import kaplan_meier_estimator
    from sksurv.util import Surv

    rng = np.random.default_rng(0)
    x, t, e = cohort(rng, 200, beta=1.0)
    feats = np.stack([x, rng.normal(size=200)], 1)
    model = fit_cox(feats, t, e, alpha=0.1)
    assert model.coef[0] > 0.5  # higher x, higher hazard
    assert concordance_index(t, e, model.risk(feats)) > 0.65
    kt, ks = kaplan_meier(t, e)
    rt, rs = kaplan_meier_estimator(e, t)
    np.testing.assert_allclose(ks[1:], rs[np.isin(rt, kt[1:])], atol=1e-12)
    group = x > np.median(x)
    stat, p = logrank_test(t, e, group)
    ref_stat, ref_p = compare_survival(Surv.from_arrays(e, t), group.astype(int))
    assert stat == pytest.approx(ref_stat, rel=1e-9) and p == pytest.approx(ref_p, rel=1e-6)
    assert p < 0.01


def test_survival_protocol_finds_planted_signal():
    from histobench.cohorts.splits import make_splits
    from histobench.evaluate.options import EvalOptions
    from histobench.evaluate.protocol import evaluate_features
    from histobench_mil.mean_linear import MeanLinear

    rng = np.random.default_rng(0)
    n, dim = 90, 8
    x, t, e = cohort(rng, n, beta=1.5)
    feats, rows = {}, []
    for i in range(n):
        bag = rng.normal(size=(int(rng.integers(10, 30)), dim)).astype(np.float32)
        bag[: len(bag) // 2, :2] += x[i]
        feats[f"s{i}"] = bag
        rows.append({"slide_id": f"s{i}", "case_id": f"p{i // 1}", "time": t[i], "event": int(e[i])})
    manifest = pd.DataFrame(rows)
    splits = make_splits(manifest, folds=3, seed=0, stratify="event")
    res = evaluate_features(task_kind="survival", classes=[], manifest=manifest, features=feats, splits=splits,
                            aggregator=MeanLinear(), opts=EvalOptions(epochs=15, lr=5e-3, batch_size=8, bootstrap=30, seeds=2))
    assert set(res.summary) == {"c_index", "c_index_uno", "cox_c_index", "cox_c_index_uno", "logrank_p"}
    assert len(res.per_fold) == 6 and res.per_fold_index[1] == (0, 1)
    s = res.summary["c_index"]
    assert s["mean"] > 0.65 and s["fold_boot_ci_low"] < s["fold_boot"] < s["fold_boot_ci_high"]
    assert res.summary["cox_c_index"]["mean"] > 0.65
    assert res.summary["logrank_p"]["pooled"] < 0.05
    assert {"time", "event", "risk", "cox_risk", "surv_0", "surv_3", "seed"} <= set(res.predictions.columns)
    assert len(res.predictions) == 2 * n
    from histobench.evaluate.plots import evaluation_figures

    figs = evaluation_figures(res)
    assert sorted(figs) == ["km.png", "km_cox.png"]
    title = figs["km.png"].axes[0].get_title()
    assert f"{res.summary['logrank_p']['pooled']:.3g}" in title
