"""`histobench compare RUN_A RUN_B`: the paired comparison of two tracked runs on the same folds.

Runs are logged with :class:`histobench.tracking.Tracker` as the pipeline logs them: the split hash tag and a
``predictions.csv`` artifact with the protocol's columns.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from histobench.cli.app import build_app
from histobench.evaluate import stats
from histobench.tracking import Tracker

runner = CliRunner()
TASK = "tcga-nsclc"
CLASSES = ["LUAD", "LUSC"]


def predictions(signal: float, noise_seed: int, n_patients: int = 60, folds: int = 6) -> pd.DataFrame:
    """Out-of-fold predictions for a fixed cohort (the same patients, slides and folds for every run)."""
    rng = np.random.default_rng(0)
    label = rng.integers(0, 2, n_patients)
    two_slides = rng.random(n_patients) < 0.3
    noise = np.random.default_rng(noise_seed)
    rows = []
    for i in range(n_patients):
        for s in range(1 + int(two_slides[i])):
            p = 1 / (1 + np.exp(-(signal * (2 * label[i] - 1) + noise.normal())))
            rows.append({"slide_id": f"S{i:03d}-{s}", "case_id": f"P{i:03d}", "fold": i % folds, "seed": 0,
                         "label": int(label[i]), "prob_LUAD": 1 - p, "prob_LUSC": p})
    return pd.DataFrame(rows)


def log_run(tracker: Tracker, tmp, name: str, pred: pd.DataFrame | None, split_hash: str, task: str = TASK) -> str:
    with tracker.run(task, name, stage="run") as run_id:
        tracker.params({"run": {"pretext": name, "seed": 0, "demo": False}})
        tracker.tags({"histobench.split_hash": split_hash, "histobench.split_name": "default"})
        if pred is not None:
            path = tmp / run_id / "predictions.csv"
            path.parent.mkdir(parents=True)
            pred.to_csv(path, index=False)
            tracker.artifact(path)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tracker = Tracker(uri)
    preds = {"good": predictions(1.5, 1), "weak": predictions(0.3, 2)}
    ids = {
        "good": log_run(tracker, tmp, "good", preds["good"], "hash-one"),
        "weak": log_run(tracker, tmp, "weak", preds["weak"], "hash-one"),
        "other_split": log_run(tracker, tmp, "other", preds["weak"], "hash-two"),
        "no_predictions": log_run(tracker, tmp, "empty", None, "hash-one"),
        "other_task": log_run(tracker, tmp, "brca", preds["weak"], "hash-one", task="tcga-brca"),
    }
    return tmp, uri, ids, preds


def compare(uri: str, *args: str):
    return runner.invoke(build_app(), ["compare", *args, "--tracking-uri", uri], env={"COLUMNS": "200"})


def test_compare_prints_the_paired_difference_ci_and_p(store):
    tmp, uri, ids, preds = store
    result = compare(uri, ids["good"], ids["weak"], "--bootstrap", "300")
    assert result.exit_code == 0, result.output
    expect = stats.paired_comparison(preds["good"], preds["weak"], "subtyping", "macro_auc", CLASSES, n=300, seed=0)
    assert expect["ci_low"] > 0 and expect["n_folds"] == 6
    out = result.output
    line = re.search(r"pooled: difference ([+-][0-9.]+) \(pooled out-of-fold patients\), 95% CI "
                     r"\[([+-][0-9.]+), ([+-][0-9.]+)\] \(paired patient bootstrap\)", out)
    assert line, out
    diff, lo, hi = line.groups()
    assert float(diff) == pytest.approx(expect["difference"], abs=1e-4)
    assert float(lo) == pytest.approx(expect["ci_low"], abs=1e-4)
    assert float(hi) == pytest.approx(expect["ci_high"], abs=1e-4)
    assert float(lo) <= float(diff) <= float(hi)  # the CI of the number it stands beside
    fold = re.search(r"fold: mean difference over (\d+) folds ([+-][0-9.]+), 95% CI \[([+-][0-9.]+), ([+-][0-9.]+)\] "
                     r"\(paired t-interval over folds\); Wilcoxon signed-rank p = ([0-9.e+-]+|nan) over (\d+) folds", out)
    assert fold, out
    n, fdiff, flo, fhi, p, folds = fold.groups()
    assert int(n) == int(folds) == 6 and float(p) == pytest.approx(expect["wilcoxon_p"], rel=1e-3)
    assert float(fdiff) == pytest.approx(expect["folds"]["difference"].mean(), abs=1e-4)
    assert (float(flo), float(fhi)) == pytest.approx((expect["fold_ci_low"], expect["fold_ci_high"]), abs=1e-4)
    assert float(flo) <= float(fdiff) <= float(fhi)
    assert "hash-one" in out and "macro_auc" in out and TASK in out
    for k, row in expect["folds"].iterrows():  # the per-fold table
        cells = [str(k), f"{row['a']:.3f}", f"{row['b']:.3f}", f"{row['difference']:+.3f}"]
        assert re.search(r"│\s+" + r" │\s+".join(map(re.escape, cells)) + " │", out), out
    assert "A good" in out and "B weak" in out
    # the reverse comparison flips the sign
    back = compare(uri, ids["weak"], ids["good"], "--bootstrap", "50")
    assert back.exit_code == 0 and f"pooled: difference {-expect['difference']:+.4f}" in back.output


def test_compare_another_metric(store):
    _, uri, ids, preds = store
    result = compare(uri, ids["good"], ids["weak"], "--metric", "balanced_accuracy", "--bootstrap", "20")
    assert result.exit_code == 0, result.output
    expect = stats.paired_comparison(preds["good"], preds["weak"], "subtyping", "balanced_accuracy", CLASSES, n=0)
    assert f"pooled: difference {expect['difference']:+.4f}" in result.output and "balanced_accuracy" in result.output


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_compare_refuses_different_splits(store):
    _, uri, ids, _ = store
    line = one_line_error(compare(uri, ids["good"], ids["other_split"]))
    assert "hash-one" in line and "hash-two" in line and "different splits" in line


def test_compare_errors(store):
    _, uri, ids, _ = store
    line = one_line_error(compare(uri, ids["good"], "0123456789abcdef0123456789abcdef"))
    assert "no MLflow run '0123456789abcdef0123456789abcdef'" in line
    line = one_line_error(compare(uri, ids["good"], ids["good"]))
    assert "two different runs" in line
    line = one_line_error(compare(uri, ids["good"], ids["no_predictions"]))
    assert "predictions.csv" in line and ids["no_predictions"] in line
    line = one_line_error(compare(uri, ids["good"], ids["other_task"]))
    assert "tcga-nsclc" in line and "tcga-brca" in line
    line = one_line_error(compare(uri, ids["good"], ids["weak"], "--metric", "c_index", "--bootstrap", "5"))
    assert "unknown metric 'c_index'" in line


def test_artifacts_live_next_to_the_sqlite_store(store):
    tmp, _, ids, _ = store
    stored = list((tmp / "mlartifacts").rglob("predictions.csv"))
    assert len(stored) == 4 and any(ids["good"] in str(p) for p in stored)
