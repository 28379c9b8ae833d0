"""The fold-size check (histobench.evaluate.folds): too few test patients of a class is never silent."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from histobench.cohorts.splits import Splits, make_splits
from histobench.errors import HistobenchError
from histobench.evaluate.folds import check_fold_sizes, fold_class_counts
from histobench.evaluate.options import EvalOptions
from histobench.registry import create
from histobench.reporting import Reporter

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def cohort(n_patients: int, extra_slides: int = 0) -> pd.DataFrame:
    """Alternating LUAD/LUSC patients, one slide each (the first ``extra_slides`` patients have two)."""
    rows = []
    for p in range(n_patients):
        for s in range(1 + (p < extra_slides)):
            rows.append({"slide_id": f"S{p:02d}-{s}", "case_id": f"P{p:02d}", "path": "",
                         "label": "LUSC" if p % 2 else "LUAD"})
    return pd.DataFrame(rows)


@pytest.fixture
def nsclc():
    return create("task", "tcga-nsclc", {"folds": 4})


def test_counts_test_patients_per_class_not_slides():
    m = cohort(8, extra_slides=8)  # two slides per patient: still one patient each
    counts = fold_class_counts(make_splits(m, folds=4, seed=0), m, "subtyping", ["LUAD", "LUSC"])
    assert list(counts.columns) == ["LUAD", "LUSC"] and list(counts.index) == [0, 1, 2, 3]
    assert (counts.to_numpy() == 1).all()
    surv = m.assign(time=10.0, event=[1, 0] * 8)  # patients P00..P07: slides alternate event 1, 0 per patient
    counts = fold_class_counts(make_splits(surv, folds=2, seed=0, stratify="event"), surv, "survival")
    assert list(counts.columns) == ["event"] and counts["event"].sum() == 8  # any slide with an event counts


def test_two_test_patients_per_fold_use_fewer_folds(nsclc, tmp_path):
    m = cohort(8)  # 4 folds of 2 test patients, one per class
    splits = make_splits(m, folds=4, seed=0)
    reporter = Reporter()
    out = check_fold_sizes(splits, m, nsclc, EvalOptions(), workdir=tmp_path, reporter=reporter)
    assert out.folds == 2 and out.hash != splits.hash and out.name == "2fold-label-seed0-from4"
    assert (fold_class_counts(out, m, "subtyping", ["LUAD", "LUSC"]).to_numpy() == 2).all()
    (line,) = reporter.messages
    assert "\n" not in line and line.startswith("warning: task tcga-nsclc (8 patients): with 4 folds, test fold")
    assert "holds 1 patient of class" in line and "eval.min_test_per_class=2" in line
    assert f"evaluating 2 folds instead (eval.small_folds=fewer): split {out.name}, hash {out.hash}" in line
    saved = tmp_path / "splits" / f"tcga-nsclc-{out.name}-{out.hash}.csv"  # where a run logs its split file from
    assert Splits.load(saved).hash == out.hash
    # without a reporter the same line is a warning; a cohort that is large enough keeps its splits
    with pytest.warns(UserWarning, match="evaluating 2 folds instead"):
        check_fold_sizes(splits, m, nsclc, EvalOptions())
    big = cohort(16)
    kept = make_splits(big, folds=4, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_fold_sizes(kept, big, nsclc, EvalOptions()) is kept
    assert check_fold_sizes(splits, m, nsclc, EvalOptions(min_test_per_class=0)) is splits  # 0: no check


def test_two_test_patients_per_fold_refused(nsclc, tmp_path):
    m = cohort(8)
    splits = make_splits(m, folds=4, seed=0)
    with pytest.raises(HistobenchError) as err:
        check_fold_sizes(splits, m, nsclc, EvalOptions(small_folds="refuse"), workdir=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "with 4 folds, test fold" in msg and "holds 1 patient of class" in msg
    assert "refusing (eval.small_folds=refuse): use -o task.folds=2, or -o eval.small_folds=fewer" in msg
    assert not (tmp_path / "splits").exists()  # nothing made


def test_unreachable_threshold_and_published_presets(nsclc):
    m = cohort(6)  # 3 per class: even 2 folds leave a fold with 1 of a class
    splits = make_splits(m, folds=3, seed=0)
    reporter = Reporter()
    out = check_fold_sizes(splits, m, nsclc, EvalOptions(), reporter=reporter)
    assert out.folds == 2 and "(still short: with 2 folds" in reporter.messages[0]
    with pytest.raises(HistobenchError, match="use a larger cohort, or -o eval.small_folds=fewer"):
        check_fold_sizes(splits, m, nsclc, EvalOptions(small_folds="refuse"))
    two = make_splits(m, folds=2, seed=0)
    with pytest.raises(HistobenchError, match="fewer than 2 folds is no cross-validation"):
        check_fold_sizes(two, m, nsclc, EvalOptions())
    published = Splits(splits.table, name="hipt-10fold")
    with pytest.raises(HistobenchError, match="published split 'hipt-10fold', which histobench does not re-make"):
        check_fold_sizes(published, m, nsclc, EvalOptions(), preset="hipt-10fold")


def small_features(m: pd.DataFrame) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {s: rng.normal(size=(5, 4)).astype(np.float32) + (lab == "LUSC") for s, lab in zip(m["slide_id"], m["label"])}


def test_evaluate_features_warns_or_refuses_on_small_folds():
    from histobench.evaluate.protocol import evaluate_features
    from histobench_mil.mean_linear import MeanLinear

    m = cohort(8)
    feats = small_features(m)
    splits = make_splits(m, folds=4, seed=0)
    kw = dict(task_kind="subtyping", classes=["LUAD", "LUSC"], manifest=m, features=feats, splits=splits,
              aggregator=MeanLinear())
    with pytest.warns(UserWarning, match=r"split '4fold-label-seed0' \(8 patients with features\): with 4 folds"):
        res = evaluate_features(opts=EvalOptions(epochs=1, bootstrap=0, device="cpu"), **kw)
    assert "holds 1 patient of class" in res.small_folds and res.summary["macro_auc"]["n_folds"] == 4
    with pytest.raises(HistobenchError, match=r"refusing \(eval.small_folds=refuse\)"):
        evaluate_features(opts=EvalOptions(epochs=1, bootstrap=0, device="cpu", small_folds="refuse"), **kw)
    # counted on the slides that have features: a fold large enough in the manifest can be too small here
    big = cohort(16)
    feats = small_features(big)
    splits = make_splits(big, folds=4, seed=0)
    victim = splits.cases(0, "test")[0]
    del feats[big.loc[big["case_id"] == victim, "slide_id"].iloc[0]]
    with pytest.raises(HistobenchError, match="with features"):
        evaluate_features(task_kind="subtyping", classes=["LUAD", "LUSC"], manifest=big, features=feats, splits=splits,
                          aggregator=MeanLinear(), opts=EvalOptions(epochs=1, bootstrap=0, device="cpu", small_folds="refuse"))
