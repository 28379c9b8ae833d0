"""The ``knn-hierarchical`` protocol: the weighted vote, tile -> slide -> patient voting, the core's metrics, and
a ``histobench run --protocol knn-hierarchical`` whose row is ranked apart from frozen-mil (HLSS spec §4, check 10)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from histobench.cohorts.splits import make_splits
from histobench.evaluate.knn import LEVEL_METRICS, KNNHierarchical, knn_probabilities, vote_levels
from histobench.evaluate.options import EvalOptions
from histobench.evaluate.protocols import ProtocolInputs
from histobench.registry import create
from histobench.reporting import Reporter

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = ["-o", "task.demo_patients=12", "-o", "task.demo_slide_px=1536", "-o", "task.folds=3", "-o", "eval.epochs=4",
         "-o", "eval.bootstrap=50"]


def test_hand_made_neighbours():
    # bank: three unit vectors of class 0 near e0, one of class 1 at e1; query at e0
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    # k = 2: neighbours rows 0 (sim 1) and 1 (sim 0.8), both class 0 -> scores (1, 0) -> softmax
    p = knn_probabilities(bank, labels, q, 2, k=2, tau=0.07)
    np.testing.assert_allclose(p.numpy(), torch.softmax(torch.tensor([[1.0, 0.0]], dtype=torch.float64), 1).numpy())
    # k = 3 adds row 2 (sim 0.6, class 1): weights exp(sim / tau), L1-normalised, then softmax
    w = np.exp(np.array([1.0, 0.8, 0.6]) / 0.07)
    s = np.array([w[0] + w[1], w[2]]) / w.sum()
    want = np.exp(s) / np.exp(s).sum()
    np.testing.assert_allclose(knn_probabilities(bank, labels, q, 2, k=3, tau=0.07).numpy()[0], want, rtol=1e-6)
    # chunking gives the same rows; k larger than the bank uses the whole bank
    qs = torch.nn.functional.normalize(torch.randn(7, 2, generator=torch.Generator().manual_seed(0)), dim=1)
    a = knn_probabilities(bank, labels, qs, 2, k=10, chunk=3)
    b = knn_probabilities(bank, labels, qs, 2, k=4, chunk=100)
    torch.testing.assert_close(a, b)
    assert a.shape == (7, 2) and torch.allclose(a.sum(1), torch.ones(7, dtype=a.dtype))


def test_vote_levels_sums_tiles():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7], [0.45, 0.55]])
    owner = np.array(["s1", "s1", "s2", "s2", "s3"], dtype=object)
    slides, patients = vote_levels(probs, owner, {"s1": "p1", "s2": "p1", "s3": "p2"})
    np.testing.assert_allclose(slides["s1"], [1.5, 0.5])
    np.testing.assert_allclose(patients["p1"], probs[:4].sum(0))  # the patient sums all its tiles
    assert patients["p1"].argmax() == 0 and slides["s2"].argmax() == 1


def cohort(n_patients: int, signal: float, seed: int = 0, dim: int = 8):
    """Two classes; patients of 1-2 slides of 20 tiles; tiles are noise plus a class direction on dim 0."""
    rng = np.random.default_rng(seed)
    rows, feats = [], {}
    for p in range(n_patients):
        y = p % 2
        for s in range(1 + p % 2):
            sid = f"S{p:03d}-{s}"
            x = rng.normal(size=(20, dim)).astype(np.float32)
            x[:, 0] += signal * (1 if y else -1)
            feats[sid] = x
            rows.append({"slide_id": sid, "case_id": f"P{p:03d}", "path": "", "label": ["LUAD", "LUSC"][y]})
    return pd.DataFrame(rows), feats


def run_protocol(manifest, feats, folds=4, **options):
    task = create("task", "tcga-nsclc")
    pin = ProtocolInputs(task=task, manifest=manifest, splits=make_splits(manifest, folds=folds, seed=0),
                         aggregator=create("aggregator", "mean-linear"), eval=EvalOptions(bootstrap=50),
                         reporter=Reporter(), features=feats)
    return KNNHierarchical(**options).evaluate(pin), pin


def test_separable_cohort_patient_beats_patch():
    manifest, feats = cohort(24, signal=1.0)  # tiles overlap a lot, whole patients do not
    res, _ = run_protocol(manifest, feats, k=20)
    assert len(res.per_fold) == 4
    assert set(res.per_fold[0]) == {"macro_auc", "balanced_accuracy", "weighted_f1", *LEVEL_METRICS}
    s = res.summary
    patch, slide, patient = (s[f"{lvl}_accuracy"]["fold_mean"] for lvl in ("patch", "slide", "patient"))
    assert 0.6 < patch < 0.95, patch  # individual tiles are often wrong ...
    assert patient >= slide >= patch and patient == 1.0, (patch, slide, patient)  # ... their votes are not
    assert s["macro_auc"]["pooled"] == 1.0 and "pooled" not in s["patch_accuracy"]  # level metrics: fold estimator
    assert s["patch_mca"]["n_folds"] == 4 and s["patch_mca"]["fold_ci_low"] <= s["patch_mca"]["fold_mean"]
    p = res.predictions
    assert list(p.columns) == ["slide_id", "case_id", "fold", "seed", "label", "prob_LUAD", "prob_LUSC"]
    assert len(p) == len(manifest) and p["slide_id"].is_unique
    np.testing.assert_allclose(p[["prob_LUAD", "prob_LUSC"]].sum(axis=1), 1.0)
    assert res.estimator_labels()["pooled"].startswith("pooled out-of-fold patients")


def test_patient_prediction_is_argmax_of_summed_patch_probabilities():
    manifest, feats = cohort(16, signal=0.4, seed=3)  # weak signal: levels disagree somewhere
    res, pin = run_protocol(manifest, feats, folds=2, k=15)
    for k in (0, 1):
        train = [s for s, c in zip(manifest["slide_id"], manifest["case_id"]) if c not in pin.splits.cases(k, "test")]
        test = manifest[manifest["case_id"].isin(pin.splits.cases(k, "test"))]
        bank = torch.nn.functional.normalize(torch.from_numpy(np.concatenate([feats[s] for s in train])), dim=1)
        lab = {s: int(y == "LUSC") for s, y in zip(manifest["slide_id"], manifest["label"])}
        bank_y = torch.tensor([lab[s] for s in train for _ in range(20)])
        correct = []
        for case, rows in test.groupby("case_id"):
            x = torch.nn.functional.normalize(torch.from_numpy(np.concatenate([feats[s] for s in rows["slide_id"]])), dim=1)
            probs = knn_probabilities(bank, bank_y, x, 2, k=15).numpy()
            correct.append(probs.sum(0).argmax() == lab[rows["slide_id"].iloc[0]])
        assert res.per_fold[k]["patient_accuracy"] == pytest.approx(np.mean(correct))
    # the slide rows are the L1-normalised tile sums: argmax agrees with a direct recomputation above
    assert 0.0 < res.summary["patch_accuracy"]["fold_mean"] < 1.0


def test_survival_task_is_refused():
    from histobench.errors import HistobenchError

    task = create("task", "tcga-luad-survival")
    manifest, feats = cohort(8, 1.0)
    pin = ProtocolInputs(task=task, manifest=manifest, splits=make_splits(manifest, folds=2, seed=0),
                         aggregator=create("aggregator", "mean-linear"), eval=EvalOptions(), reporter=Reporter(),
                         features=feats)
    with pytest.raises(HistobenchError, match="survival"):
        KNNHierarchical().evaluate(pin)


def test_run_with_knn_protocol_end_to_end(tmp_path):
    import mlflow

    from histobench.cli.app import build_app
    from histobench.leaderboard import build_leaderboard

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["run", "--pretext", "none", "--task", "tcga-nsclc", "--demo", "--workdir", str(tmp_path / "work"),
              "--tracking-uri", uri, *SMALL]
    runner = CliRunner()
    knn = runner.invoke(build_app(), [*common, "--protocol", "knn-hierarchical", "-o", "eval.k=20"],
                        env={"COLUMNS": "240"})
    assert knn.exit_code == 0, knn.output
    assert "patient_accuracy" in knn.output
    mil = runner.invoke(build_app(), common, env={"COLUMNS": "240"})
    assert mil.exit_code == 0, mil.output
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("tcga-nsclc")
    runs = {r.data.tags["histobench.protocol"]: r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("histobench.stage") == "run"}
    assert set(runs) == {"knn-hierarchical", "frozen-mil"}
    m = runs["knn-hierarchical"].data
    assert m.params["protocol.k"] == "20"
    assert 0.0 <= m.metrics["patient_accuracy_fold_mean"] <= 1.0 and "macro_auc_pooled" in m.metrics
    board = build_leaderboard("tcga-nsclc", uri)
    assert list(board["protocol"]) == ["frozen-mil", "knn-hierarchical"]  # one group each
    # the neighbours vote: no aggregator is trained, and the row does not name the resolved default
    assert list(board["aggregator"]) == [runs["frozen-mil"].data.params["aggregator.name"], "—"]
    assert runs["knn-hierarchical"].data.tags["mlflow.runName"] == "none+timm-demo@knn-hierarchical"
