"""Issue 16 on a 32-patient cohort: every CI belongs to the value beside it, in the printed table, MLflow and the
leaderboard, and each says which estimator it is.

The cohort is the issue's shape (32 patients, one slide each, LUAD vs LUSC, the task's default 10 folds); the
features are synthetic bags with a weak signal, so per-fold AUCs are coarse and the two estimators differ.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from histobench.cohorts.splits import task_splits
from histobench.evaluate.folds import check_fold_sizes
from histobench.evaluate.protocol import evaluate_features
from histobench.reporting import Reporter
from histobench.tracking import Tracker, search_runs

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest

TASK = "tcga-nsclc"
DIM = 8


def cohort(n: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows, feats = [], {}
    for p in range(n):
        label = "LUSC" if p % 2 else "LUAD"
        sid = f"TCGA-XX-{p:04d}-01Z"
        rows.append({"slide_id": sid, "case_id": f"TCGA-XX-{p:04d}", "path": "", "label": label})
        x = rng.normal(size=(int(rng.integers(10, 30)), DIM)).astype(np.float32)
        x[:, :2] += 0.6 * (label == "LUSC")
        feats[sid] = x
    return pd.DataFrame(rows), feats


def inside(value: float, lo: float, hi: float) -> bool:
    return lo - 1e-9 <= value <= hi + 1e-9


def test_32_patients_each_ci_beside_its_own_estimator(tmp_path, monkeypatch):
    from histobench.cli.common import console
    from histobench.cli.run import print_result
    from histobench.leaderboard import build_leaderboard, notes
    from histobench.pipeline import RunSpec, log_evaluation, resolve

    spec = RunSpec(task=TASK, aggregator="mean-linear", workdir=tmp_path / "work",
                   options={"eval": {"epochs": 10, "lr": 1e-2, "bootstrap": 300, "device": "cpu"}})
    comps = resolve(spec)
    assert comps.task.options.folds == 10 and comps.eval.min_test_per_class == 2
    manifest, feats = cohort()

    # the task's 10 folds leave 1-2 patients of a class per test fold: announced, 8 folds used, saved with a hash
    splits = task_splits(comps.task, manifest, workdir=spec.workdir, seed=0)
    reporter = Reporter()
    used = check_fold_sizes(splits, manifest, comps.task, comps.eval, workdir=spec.workdir, reporter=reporter)
    assert splits.folds == 10 and used.folds == 8 and used.name == "8fold-label-seed0-from10"
    assert len(reporter.messages) == 1 and f"hash {used.hash}" in reporter.messages[0]

    result = evaluate_features(task_kind="subtyping", classes=list(comps.task.classes), manifest=manifest,
                               features=feats, splits=used, aggregator=comps.aggregator, opts=comps.eval)
    assert result.small_folds == "" and result.split_hash == used.hash
    summary = result.summary
    for name, e in summary.items():
        assert e["n_folds"] == 8 and e["n_patients"] == 32
        assert inside(e["fold_mean"], e["fold_ci_low"], e["fold_ci_high"]), (name, e)
        assert inside(e["pooled"], e["pooled_ci_low"], e["pooled_ci_high"]), (name, e)
    auc = summary["macro_auc"]
    assert abs(auc["fold_mean"] - auc["pooled"]) > 0.005  # two estimators, two different numbers

    # 1. the printed table: each value row names its estimator, the CI row under it names its interval
    monkeypatch.setenv("COLUMNS", "200")  # one line per row (the shared console reads it at print time)
    with console.capture() as cap:
        print_result(result.per_fold, summary, "macro_auc", "32 patients")
    text = cap.get()
    lines = [ln for ln in text.splitlines() if ln.startswith("│")]
    cells = {ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[2:-1]] for ln in lines}
    fold_row, fold_ci = cells["fold: mean ± sd over 8 folds"], cells["95% CI: t-interval over folds"]
    pooled_row, pooled_ci = cells["pooled: pooled out-of-fold patients"], cells["95% CI: patient bootstrap"]
    assert lines.index(next(ln for ln in lines if "t-interval over folds" in ln)) == \
        lines.index(next(ln for ln in lines if "mean ± sd over 8 folds" in ln)) + 1
    for value, ci in ((fold_row, fold_ci), (pooled_row, pooled_ci)):
        for v, c in zip(value, ci):
            lo, hi = map(float, re.fullmatch(r"\[(-?[0-9.]+), (-?[0-9.]+)\]", c).groups())
            assert inside(float(v.split(" ± ")[0]), lo - 5e-4, hi + 5e-4), (v, c)
    assert fold_row[0] == f"{auc['fold_mean']:.3f} ± {auc['fold_sd']:.3f}" and pooled_row[0] == f"{auc['pooled']:.3f}"

    # 2. MLflow, through the pipeline's own logging: self-describing names, no CI without its estimator
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    with tracker.run(TASK, "none+timm+mean-linear", stage="run") as run_id:
        tracker.params({"run": {"pretext": "none", "seed": 0, "demo": False}, **comps.resolved()})
        log_evaluation(tracker, spec, comps, manifest, result, used, tmp_path, run_id)
    (run,) = search_runs(TASK, uri)
    m = run["metrics"]
    assert run["tags"]["histobench.split_hash"] == used.hash and run["tags"]["histobench.split_name"] == used.name
    for name in summary:
        assert inside(m[f"{name}_fold_mean"], m[f"{name}_fold_ci_low"], m[f"{name}_fold_ci_high"])
        assert inside(m[f"{name}_pooled"], m[f"{name}_pooled_ci_low"], m[f"{name}_pooled_ci_high"])
        assert f"{name}_ci_low" not in m and f"{name}_ci_high" not in m  # no CI that names no estimator

    # 3. the leaderboard: the fold CI beside the ranked fold mean, the pooled value beside its own CI, both named
    df = build_leaderboard(TASK, uri)
    row = df.iloc[0]
    assert row["macro_auc"] == f"{auc['fold_mean']:.3f} ± {auc['fold_sd']:.3f}"
    lo, hi = map(float, row["macro_auc fold 95% CI"].strip("[]").split(", "))
    assert inside(round(auc["fold_mean"], 3), lo, hi)
    lo, hi = map(float, row["macro_auc pooled 95% CI"].strip("[]").split(", "))
    assert inside(float(row["macro_auc pooled"]), lo, hi)
    assert row["non-default eval"] == "† bootstrap=300, epochs=10, lr=0.01" and row["protocol"] == "frozen-mil"
    note = notes(df, TASK, "macro_auc")[0]
    assert "`macro_auc fold 95% CI`: t-interval over folds" in note
    assert "`macro_auc pooled`: pooled out-of-fold patients, with its own 95% CI (patient bootstrap)" in note
