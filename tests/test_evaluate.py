"""Aggregators (ABMIL, mean-linear), the training loop and the end-to-end evaluation protocol."""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from histobench.cohorts.splits import make_splits
from histobench.components import Aggregator
from histobench.evaluate.metrics import macro_auc
from histobench.evaluate.options import EvalOptions
from histobench.evaluate.protocol import evaluate_features
from histobench.evaluate.train import class_weights, fit_aggregator, pad_bags, predict
from histobench_mil.abmil import ABMIL
from histobench_mil.mean_linear import MeanLinear

DIM = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def synthetic_bags(n_bags: int, seed: int, signal: float = 2.0, fraction: float = 0.2):
    """Gaussian tiles; in positive bags ``fraction`` of the tiles are shifted by ``signal`` on 4 dimensions."""
    rng = np.random.default_rng(seed)
    bags, labels = [], rng.integers(0, 2, n_bags)
    for y in labels:
        n = int(rng.integers(20, 80))
        x = rng.normal(size=(n, DIM)).astype(np.float32)
        if y:
            hit = rng.choice(n, max(1, int(round(fraction * n))), replace=False)
            x[hit, :4] += signal
        bags.append(x)
    return bags, labels


def heads():
    return [ABMIL(), ABMIL(ABMIL.preset("demo")), MeanLinear(), MeanLinear(dropout=0.2)]


def test_plugin_module_does_not_import_torch():
    import subprocess

    code = "import sys, histobench_mil; assert 'torch' not in sys.modules, 'torch imported'; print(histobench_mil.ABMIL.name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=None)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "abmil"


def test_hook_registers_both():
    import histobench_mil

    got = []
    histobench_mil.register_aggregators(got.append)
    assert got == [ABMIL, MeanLinear]
    assert all(issubclass(c, Aggregator) for c in got) and {c.name for c in got} == {"abmil", "mean-linear"}


@pytest.mark.parametrize("head", heads(), ids=lambda h: f"{h.name}-{h.options}")
def test_shapes_padding_invariance_and_attention(head):
    torch.manual_seed(0)
    net = head.build(DIM, 3).eval()
    rng = np.random.default_rng(0)
    bags = [torch.from_numpy(rng.normal(size=(n, DIM)).astype(np.float32)) for n in (5, 9, 2)]
    x, mask = pad_bags(bags)
    x = torch.where(mask.unsqueeze(-1), x, torch.full_like(x, 1e4))  # garbage in the padding
    x[2, -1, 0] = float("nan")
    with torch.no_grad():
        out, att = net(x, mask)
        assert out.shape == (3, 3) and att.shape == (3, 9)
        assert torch.isfinite(out).all()
        assert torch.all(att[~mask] == 0)
        torch.testing.assert_close(att.sum(dim=1), torch.ones(3))
        for i, b in enumerate(bags):
            alone, a_alone = net(b.unsqueeze(0), None)
            torch.testing.assert_close(out[i], alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(att[i, : len(b)], a_alone[0], atol=1e-6, rtol=1e-5)


def test_mean_linear_attention_is_uniform_and_net_pickles():
    net = MeanLinear().build(DIM, 2)
    x, mask = pad_bags([torch.ones(4, DIM), torch.ones(2, DIM)])
    _, att = net(x, mask)
    torch.testing.assert_close(att[1], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    clone = pickle.loads(pickle.dumps(ABMIL().build(DIM, 2)))
    assert type(clone).__name__ == "GatedAttentionMIL"


def test_class_weights():
    np.testing.assert_allclose(class_weights(np.array([0, 0, 0, 1]), 3), [4 / 6, 2.0, 0.0])
    np.testing.assert_allclose(class_weights(np.array([0, 1]), 2, "none"), [1, 1])


def test_abmil_learns_sparse_signal_and_batched_predict_matches_single():
    bags, y = synthetic_bags(120, seed=0)
    test_bags, test_y = synthetic_bags(80, seed=1)
    opts = EvalOptions(epochs=12, lr=1e-3, batch_size=8, max_tiles=32, seed=0, device="cpu")
    torch.manual_seed(0)
    net = fit_aggregator(ABMIL(ABMIL.preset("demo")).build(DIM, 2), bags, y, opts, n_outputs=2)
    out, att = predict(net, test_bags, batch_size=16)
    assert out.shape == (80, 2) and len(att) == 80 and att[0].shape == (len(test_bags[0]),)
    auc = macro_auc(test_y, out[:, 1] - out[:, 0])
    assert auc > 0.9, auc
    single, att1 = predict(net, test_bags, batch_size=1)
    np.testing.assert_allclose(out, single, atol=1e-5, rtol=1e-5)
    for a, b in zip(att, att1):
        np.testing.assert_allclose(a, b, atol=1e-6)
        assert a.sum() == pytest.approx(1.0, abs=1e-5)


def test_training_is_deterministic_and_leaves_global_rng_alone():
    bags, y = synthetic_bags(24, seed=2)
    opts = EvalOptions(epochs=2, batch_size=5, max_tiles=10, seed=3, device="cpu")
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        net = ABMIL(ABMIL.preset("demo")).build(DIM, 2)
        state = torch.random.get_rng_state()
        net = fit_aggregator(net, bags, y, opts, n_outputs=2)
        assert torch.equal(state, torch.random.get_rng_state())
        outs.append(predict(net, bags)[0])
    np.testing.assert_array_equal(outs[0], outs[1])


def test_callable_loss_slots_in():
    bags, y = synthetic_bags(12, seed=4)
    seen = {}

    def mse(out, target):
        seen["dtype"] = target.dtype
        return ((out[:, 0] - target) ** 2).mean()

    net = fit_aggregator(MeanLinear().build(DIM, 1), bags, y.astype(float), EvalOptions(epochs=1, device="cpu"), n_outputs=1, loss=mse)
    assert seen["dtype"] == torch.float32 and predict(net, bags)[0].shape == (12, 1)
    with pytest.raises(ValueError):
        fit_aggregator(MeanLinear().build(DIM, 1), bags, y, EvalOptions(epochs=1), n_outputs=1, loss="cox?")


def synthetic_cohort(n_patients: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows, feats = [], {}
    for p in range(n_patients):
        label = "LUSC" if p % 2 else "LUAD"
        for s in range(1 + int(rng.random() < 0.3)):
            sid = f"S{p:03d}-{s}"
            rows.append({"slide_id": sid, "case_id": f"P{p:03d}", "path": f"{sid}.tif", "label": label})
            n = int(rng.integers(20, 60))
            x = rng.normal(size=(n, DIM)).astype(np.float32)
            if label == "LUSC":
                x[rng.choice(n, n // 5, replace=False), :4] += 2.0
            feats[sid] = x
    return pd.DataFrame(rows), feats


def test_evaluate_features_end_to_end(tmp_path):
    manifest, feats = synthetic_cohort()
    dropped = manifest["slide_id"].iloc[3]
    del feats[dropped]
    manifest = pd.concat([manifest, pd.DataFrame([{"slide_id": "X", "case_id": "P000", "path": "", "label": "other"}])])
    splits = make_splits(manifest[manifest["slide_id"] != "X"], folds=5, seed=0)
    calls = []
    opts = EvalOptions(epochs=15, lr=1e-3, batch_size=8, max_tiles=32, bootstrap=200, device="cpu")
    res = evaluate_features(
        task_kind="subtyping", classes=["LUAD", "LUSC"], manifest=manifest, features=feats, splits=splits,
        aggregator=ABMIL(ABMIL.preset("demo")), opts=opts, progress=lambda msg, i, n: calls.append((i, n)),
    )
    assert len(res.per_fold) == 5 and calls[-1] == (5, 5)
    assert set(res.per_fold[0]) == {"macro_auc", "balanced_accuracy", "weighted_f1"}
    assert res.n_skipped == 2 and res.skipped == {"unlabeled": 1, "missing_features": 1, "empty": 0, "not_in_splits": 0}
    assert res.split_hash == splits.hash and res.n_leaks == 0
    assert res.summary["macro_auc"]["mean"] > 0.8, res.summary
    s = res.summary["macro_auc"]
    fold_values = [f["macro_auc"] for f in res.per_fold]
    assert s["fold_mean"] == s["mean"] == pytest.approx(np.mean(fold_values), abs=1e-12)
    assert s["fold_sd"] == s["sd"] == pytest.approx(np.std(fold_values, ddof=1), abs=1e-12) and s["n_folds"] == 5
    assert s["fold_ci_low"] <= s["fold_mean"] <= s["fold_ci_high"] <= 1.0  # each CI around its own value
    assert s["pooled_ci_low"] <= s["pooled"] <= s["pooled_ci_high"] and s["n_patients"] == 60
    assert "ci_low" not in s and res.small_folds == ""
    assert res.estimator_labels() == {"fold": "mean ± sd over 5 folds; 95% CI: t-interval over folds",
                                      "pooled": "pooled out-of-fold patients; 95% CI: patient bootstrap"}
    p = res.predictions
    assert list(p.columns) == ["slide_id", "case_id", "fold", "seed", "label", "prob_LUAD", "prob_LUSC"]
    assert len(p) == len(manifest) - 2 and p["slide_id"].is_unique and dropped not in set(p["slide_id"])
    np.testing.assert_allclose(p[["prob_LUAD", "prob_LUSC"]].sum(axis=1), 1.0, atol=1e-9)
    for k in range(5):  # each test slide belongs to a test patient of its fold
        assert set(p.loc[p["fold"] == k, "case_id"]) <= set(splits.cases(k, "test"))
    assert 5 <= len(res.attention) <= 10
    sid, a = next(iter(res.attention.items()))
    assert a.shape == (len(feats[sid]),) and a.sum() == pytest.approx(1.0, abs=1e-5)
    # plots: written under out_dir/plots and handed to the tracker (a disabled one logs nothing)
    from histobench.evaluate.plots import log_evaluation_artifacts
    from histobench.tracking import Tracker

    written = log_evaluation_artifacts(Tracker(enabled=False), res, manifest, tmp_path)
    assert sorted(p.name for p in written) == ["confusion.png", "roc.png"]
    assert all(p.parent == tmp_path / "plots" and p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_plots_roc_points_and_heatmap():
    from sklearn.metrics import roc_curve

    from histobench.evaluate.plots import _roc_points, plot_attention_heatmap, plot_confusion, plot_km, plot_roc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    score = np.round(y + rng.normal(size=200), 1)  # with ties
    fpr, tpr = _roc_points(y == 1, score)
    ref_fpr, ref_tpr, _ = roc_curve(y, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    probs = np.stack([1 - 1 / (1 + np.exp(-score)), 1 / (1 + np.exp(-score))], 1)
    fig = plot_roc(y, probs, ["LUAD", "LUSC"])
    assert len(fig.axes[0].lines) == 2 and "AUC" in fig.axes[0].get_legend().get_texts()[0].get_text()
    fig = plot_confusion(y, probs.argmax(1), ["LUAD", "LUSC"])
    texts = sorted(int(t.get_text()) for t in fig.axes[0].texts)
    assert sum(texts) == 200
    t, e = rng.exponential(10, 50), rng.random(50) < 0.7
    fig = plot_km(t, e, t < np.median(t))
    assert "log-rank p" in fig.axes[0].get_title()
    thumb = np.full((64, 96, 3), 230, dtype=np.uint8)  # thumbnail at downsample 16 of a 1536 x 1024 slide
    coords = np.array([[0, 0], [256, 0], [512, 512]])
    fig = plot_attention_heatmap(thumb, coords, np.array([0.1, 0.3, 0.6]), tile_size_level0=256, downsample=16)
    heat = fig.axes[0].images[1].get_array()
    assert heat.shape == (64, 96) and heat[0, 0] == 0.0 and heat[0, 16] == pytest.approx(0.4) and heat[32, 32] == 1.0
    assert heat.mask[63, 95] and heat.mask[20, 0]  # no tile there


def test_evaluate_features_mean_linear_grading_runs():
    manifest, feats = synthetic_cohort(30, seed=1)
    manifest["label"] = (manifest["label"] == "LUSC").astype(int)
    splits = make_splits(manifest, folds=3, seed=0)
    res = evaluate_features(
        task_kind="grading", classes=["0", "1"], manifest=manifest, features=feats, splits=splits,
        aggregator=MeanLinear(), opts=EvalOptions(epochs=3, bootstrap=0, device="cpu"),
    )
    assert set(res.summary) == {"qwk", "balanced_accuracy", "macro_auc"} and res.n_skipped == 0
    assert np.isnan(res.summary["qwk"]["pooled_ci_low"])  # no bootstrap: no pooled CI
    assert np.isfinite(res.summary["qwk"]["fold_ci_low"])  # the t-interval needs no replicates


def test_evaluate_counts_slides_outside_the_splits_and_warns_on_leaks():
    manifest, feats = synthetic_cohort(30, seed=2)
    splits = make_splits(manifest[manifest["case_id"] != "P029"], folds=3, seed=0)
    leaky = splits.table.copy()
    victim = splits.cases(0, "test")[0]
    leaky = pd.concat([leaky[~((leaky["fold"] == 0) & (leaky["case_id"] == victim))],
                       pd.DataFrame({"fold": [0, 0], "split": ["train", "test"], "case_id": [victim, victim]})])
    from histobench.cohorts.splits import Splits

    opts = EvalOptions(epochs=1, bootstrap=0, device="cpu")
    with pytest.warns(UserWarning, match="two sides"):
        res = evaluate_features(task_kind="subtyping", classes=["LUAD", "LUSC"], manifest=manifest, features=feats,
                                splits=Splits(leaky), aggregator=MeanLinear(), opts=opts)
    assert res.n_leaks == 1
    assert res.skipped["not_in_splits"] == int((manifest["case_id"] == "P029").sum()) > 0


def test_no_usable_slide_says_why_with_counts_and_the_ids_on_both_sides():
    from histobench.errors import HistobenchError
    from histobench.evaluate.protocol import labelled_slides

    manifest, feats = synthetic_cohort()
    splits = make_splits(manifest, folds=5, seed=0)
    other = {f"TCGA-{sid}": x for sid, x in feats.items()}  # feature files named by another convention
    with pytest.raises(HistobenchError) as info:
        labelled_slides("subtyping", ["LUAD", "LUSC"], manifest, other, splits)
    first = manifest["slide_id"].iloc[0]
    assert str(info.value) == (f"no slide has both a label and features: of {len(manifest)} manifest slides, "
                               f"{len(manifest)} missing features; manifest slide ids look like {first!r}, feature "
                               f"files like {'TCGA-' + first!r}")
