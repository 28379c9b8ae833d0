"""The ``topk-finetune`` protocol: HistoTransfer's fidelity checks 7.5, 7.6 and 7.11, errors, and a CLI run.

7.5 pins the stage-2 mechanics (exact top-k selection made once, only those tiles loaded, stage-2 logits equal
to stage-1 logits at step 0, BatchNorm statistics frozen while the weights and the first conv learn); 7.6 is
the synthetic cohort where the signal lives in 4 of 48 tiles and top-k fine-tuning must beat frozen features
(the full version is ``slow``; a smaller seeded one runs by default); 7.11 guards against tile-weighted AUCs.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from histobench.cohorts.splits import Splits, make_splits
from histobench.components import InputTransform
from histobench.errors import HistobenchError
from histobench.evaluate import topk
from histobench.evaluate.options import EvalOptions
from histobench.evaluate.protocols import ProtocolInputs
from histobench.evaluate.topk import TopKFinetune
from histobench.reporting import Reporter
from histobench_mil.abmil import ABMIL

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


# ------------------------------------------------------------------------------------------ helpers


def truncated_resnet18(seed: int = 0) -> nn.Module:
    """Random-init ResNet18 cut after layer2 (stem kept), average-pooled to 128-d: the spec's test encoder."""
    import timm

    torch.manual_seed(seed)
    m = timm.create_model("resnet18", num_classes=0, pretrained=False)
    net = nn.Sequential(m.conv1, m.bn1, m.act1, m.maxpool, m.layer1, m.layer2, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.embed_dim = 128
    return net


def encode(encoder: nn.Module, tiles: dict[str, np.ndarray], transform: InputTransform) -> dict[str, np.ndarray]:
    """Frozen features (eval mode) of every tile: what extraction writes."""
    from histobench.features.extract import prepare_pixels

    encoder.eval()
    out = {}
    with torch.inference_mode():
        for sid, arr in tiles.items():
            out[sid] = encoder(prepare_pixels(torch.from_numpy(np.ascontiguousarray(arr)), transform)).numpy()
    return out


def make_inputs(tiles: dict[str, np.ndarray], labels: dict[str, int], encoder: nn.Module, splits: Splits,
                ev: EvalOptions, kind: str = "subtyping", aggregator=None, tmp: Path | None = None):
    """ProtocolInputs over in-memory tiles (one slide per patient), with a spying extract."""
    transform = InputTransform(size=next(iter(tiles.values())).shape[-1])
    feats = encode(encoder, tiles, transform)
    manifest = pd.DataFrame({"slide_id": list(tiles), "case_id": [f"P{s}" for s in tiles],
                             "label": [("A", "B")[labels[s]] for s in tiles]})
    task = SimpleNamespace(name="toy", task_kind=kind, classes=("A", "B"), metrics=("macro_auc",), options=None)
    extracted: list[str] = []

    def extract(module, slide_ids, tag):
        extracted.extend(slide_ids)
        return encode(module, {s: tiles[s] for s in slide_ids}, transform)

    pin = ProtocolInputs(task=task, manifest=manifest, splits=splits, aggregator=aggregator or ABMIL(dropout=0.0),
                         eval=ev, reporter=Reporter(), features=feats, encoder=encoder, device="cpu",
                         artifacts=tmp / "protocol" if tmp else None)
    return pin, transform, extract, extracted


def toy_cohort(n_slides: int, n_tiles, size: int, seed: int):
    """Random-texture tiles; positive slides carry a bright square in a few tiles (an easy signal)."""
    rng = np.random.default_rng(seed)
    tiles, labels = {}, {}
    for i in range(n_slides):
        n = int(n_tiles[i % len(n_tiles)]) if not np.isscalar(n_tiles) else int(n_tiles)
        x = rng.integers(60, 200, size=(n, 3, size, size), dtype=np.uint8)
        y = i % 2
        if y:
            x[: max(1, n // 4), :, 4:12, 4:12] = 250
        sid = f"S{i:03d}"
        tiles[sid], labels[sid] = x[rng.permutation(n)], y
    return tiles, labels


def patient_splits(tiles, labels, folds=2, seed=0):
    manifest = pd.DataFrame({"slide_id": list(tiles), "case_id": [f"P{s}" for s in tiles],
                             "label": [labels[s] for s in tiles]})
    return make_splits(manifest, folds=folds, seed=seed)


SMALL_EV = EvalOptions(epochs=3, lr=1e-3, batch_size=4, bootstrap=0, device="cpu", min_test_per_class=1)


# ------------------------------------------------------------------------------------------ 7.5 selection


def test_select_topk_is_exact_with_lower_index_on_ties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        s = rng.integers(0, 6, n).astype(np.float32)  # many ties
        k = int(rng.integers(1, 50))
        got = topk.select_topk(s, k)
        assert len(got) == min(k, n) and len(set(got.tolist())) == len(got)
        ref = sorted(range(n), key=lambda i: (-s[i], i))[: min(k, n)]
        assert got.tolist() == ref
        rest = np.setdiff1d(np.arange(n), got)
        if len(rest):
            assert s[got].min() >= s[rest].max()
    assert topk.select_topk(np.array([0.5, 0.5, 0.5]), 2).tolist() == [0, 1]
    with pytest.raises(ValueError):
        topk.select_topk(np.ones(3), 0)


def test_stage2_mechanics_7_5(tmp_path, monkeypatch):
    tiles, labels = toy_cohort(16, (10, 6, 13), 32, seed=1)
    encoder = truncated_resnet18()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    splits = patient_splits(tiles, labels)
    pin, transform, extract, extracted = make_inputs(tiles, labels, encoder, splits, SMALL_EV, tmp=tmp_path)
    opts = TopKFinetune.Options(top_k=4, finetune_epochs=1, finetune_lr=1e-4, finetune_batch_size=2)

    calls, heads, selections = [], [], []
    real_select = topk.select_bags

    def spy_select(head, bags, slide_ids, k, aggregator="aggregator"):
        calls.append(list(slide_ids))
        heads.append(head)
        selections.append(real_select(head, bags, slide_ids, k, aggregator))
        return selections[-1]

    monkeypatch.setattr(topk, "select_bags", spy_select)
    source = topk.ArrayTiles(tiles)
    result = topk.evaluate_topk(pin, opts, lambda _: source, extract, transform, tmp_root=tmp_path)

    # selected once per fold, on train + val slides only, by the stage-1 attention; exactly those tiles loaded
    assert len(calls) == splits.folds == 2
    for fold, (chosen, head, sel) in enumerate(zip(calls, heads, selections)):
        test_ids = {c[1:] for c in splits.cases(fold, "test")}
        assert not test_ids & set(chosen) and len(chosen) == len(tiles) - len(test_ids)
        scores = topk.tile_scores(head, [pin.features[s] for s in chosen])
        for sid, a in zip(chosen, scores):
            assert sel[sid].tolist() == topk.select_topk(a, 4).tolist() and len(sel[sid]) == min(4, len(tiles[sid]))
    assert sorted(source.loaded) == sorted((s, tuple(ids.tolist())) for sel in selections for s, ids in sel.items())
    # the test slides (only they) were re-extracted with the fine-tuned encoder
    assert sorted(extracted) == sorted(result.predictions["slide_id"])
    assert len(result.predictions) == len(tiles) and result.predictions["slide_id"].is_unique  # one row per slide
    assert pin.metrics["topk/leak_audit/passed"] == 1.0
    assert all(pin.metrics[f"topk/leak_audit/{k}"] == 0 for k in
               ("test_slides_selected", "test_slides_trained", "test_slides_in_model_selection", "test_patients_in_training"))
    assert pin.metrics["topk/bags_smaller_than_k"] == 0 and pin.metrics["topk/bags_selected"] == sum(map(len, calls))
    assert "topk/stage1_macro_auc" in pin.metrics and result.stage1.predictions.shape[0] == len(tiles)
    # the run's encoder is untouched; each fold's fine-tuned weights are artifacts
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    for fold in range(2):
        d = tmp_path / "protocol" / f"fold{fold}"
        assert {p.name for p in d.iterdir()} == {"encoder.pt", "aggregator.pt", "finetune.json"}
        saved = torch.load(d / "encoder.pt")
        assert any(not torch.equal(saved[k], before[k]) for k in saved if k.endswith("weight"))
    assert not list(tmp_path.glob("topk-fold*"))  # the per-fold tile caches are gone

    # step 0: stage-2 logits on a top-k bag == stage-1 logits on the same bag (frozen encoder, copied head)
    head = heads[0].eval()
    feats = pin.features
    for sid in calls[0][:4]:
        idx = topk.select_topk(topk.tile_scores(head, [feats[sid]])[0], 4)
        with torch.inference_mode():
            s2 = topk.bag_logits(encoder.eval(), head, [torch.from_numpy(tiles[sid][idx])], transform, torch.device("cpu"))
            s1, _ = head(torch.from_numpy(feats[sid][idx]).unsqueeze(0), None)
        torch.testing.assert_close(s2, s1, atol=1e-5, rtol=0)


def test_one_epoch_freezes_bn_stats_and_trains_the_encoder_down_to_the_first_conv():
    tiles, labels = toy_cohort(8, 6, 32, seed=2)
    encoder = truncated_resnet18()
    head = ABMIL(dropout=0.0).build(128, 2)
    bn = {k: v.clone() for k, v in encoder.state_dict().items() if "running_" in k or "num_batches" in k}
    weights = {k: v.clone() for k, v in encoder.state_dict().items() if k.endswith("weight")}
    transform = InputTransform(size=32)
    ids = sorted(tiles)
    o = TopKFinetune.Options(top_k=6, finetune_epochs=1, finetune_lr=1e-3, finetune_batch_size=2)
    res = topk.finetune(encoder, head, [tiles[s] for s in ids[:6]], np.array([labels[s] for s in ids[:6]]),
                        [tiles[s] for s in ids[6:]], np.array([labels[s] for s in ids[6:]]), n_classes=2,
                        transform=transform, options=o, seed=0, device="cpu")
    tuned = res.encoder.state_dict()
    assert bn and all(torch.equal(tuned[k], v) for k, v in bn.items())  # running stats unchanged
    assert any(not torch.equal(tuned[k], v) for k, v in weights.items())
    assert not torch.equal(tuned["0.weight"], weights["0.weight"])  # the first conv moved
    assert len(res.history) == 1 and res.best_epoch == 1
    assert {"train_loss", "val_loss", "val_accuracy", "val_auc"} <= set(res.history[0])

    # one step by hand: gradients reach the first conv, BN layers stay in eval mode under train_mode
    enc = truncated_resnet18()
    topk.train_mode(enc, head, bn_eval=True)
    assert all(not m.training for m in enc.modules() if isinstance(m, nn.BatchNorm2d))
    assert enc[0].training and head.training
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-5)
    loss = topk.finetune_step(enc, head, opt, [torch.from_numpy(tiles[ids[1]])], torch.tensor([labels[ids[1]]]),
                              nn.CrossEntropyLoss(), transform, torch.device("cpu"))
    assert np.isfinite(loss)
    g = enc[0].weight.grad
    assert g is not None and float(g.abs().sum()) > 0


def test_model_selection_prefers_the_later_epoch_on_ties():
    rows = [{"val_accuracy": 0.5, "val_loss": 0.7, "val_auc": 0.6}, {"val_accuracy": 0.5, "val_loss": 0.9, "val_auc": 0.4}]
    assert topk._better(rows[1], 0.5, "val_accuracy")  # tie -> later
    assert not topk._better(rows[1], -0.7, "val_loss")
    assert not topk._better(rows[1], 0.6, "val_auc")
    assert topk._better(rows[1], 1.0, "last")


# ------------------------------------------------------------------------------------------ errors


def test_top_k_larger_than_every_bag_uses_whole_bags_and_says_how_often(tmp_path):
    tiles, labels = toy_cohort(12, (5, 7), 32, seed=3)
    encoder = truncated_resnet18()
    pin, transform, extract, _ = make_inputs(tiles, labels, encoder, patient_splits(tiles, labels), SMALL_EV)
    source = topk.ArrayTiles(tiles)
    topk.evaluate_topk(pin, TopKFinetune.Options(top_k=100, finetune_epochs=1, finetune_batch_size=4),
                       lambda _: source, extract, transform, tmp_root=tmp_path)
    assert all(len(ids) == len(tiles[s]) for s, ids in source.loaded)  # whole bags
    n = pin.metrics["topk/bags_selected"]
    assert n == len(source.loaded) and pin.metrics["topk/bags_smaller_than_k"] == n
    assert any(f"top_k=100: {int(n)} of {int(n)} selected bags had fewer tiles" in line for line in pin.reporter.messages)


def test_one_class_validation_side_survival_and_attention_free_heads_are_one_line_errors(tmp_path):
    tiles, labels = toy_cohort(8, 6, 32, seed=4)
    encoder = truncated_resnet18()
    ids = sorted(tiles)
    # a published-style split whose fold-0 val side holds one class
    rows = []
    for k in range(2):
        for i, s in enumerate(ids):
            side = "test" if i % 2 == k else ("val" if s in (ids[1 - k], ids[3 - k]) and k == 0 else "train")
            rows.append((k, side, f"P{s}"))
    splits = Splits(pd.DataFrame(rows, columns=["fold", "split", "case_id"]), name="toy")
    pin, transform, extract, _ = make_inputs(tiles, labels, encoder, splits, SMALL_EV)
    opts = TopKFinetune.Options(top_k=2, finetune_epochs=1)
    with pytest.raises(HistobenchError, match=r"fold 0: the validation side holds one class \(B\)"):
        topk.evaluate_topk(pin, opts, lambda _: topk.ArrayTiles(tiles), extract, transform)
    # the core's folds of 4 patients: one training patient per class, so nothing can be held out for validation
    few = {s: tiles[s] for s in ids[:4]}
    pin, transform, extract, _ = make_inputs(few, labels, encoder, patient_splits(few, labels), SMALL_EV)
    with pytest.raises(HistobenchError, match=r"fold 0: the validation side is empty \(no class has two training") as err:
        topk.evaluate_topk(pin, opts, lambda _: topk.ArrayTiles(few), extract, transform)
    assert "\n" not in str(err.value)

    from histobench_mil.mean_linear import MeanLinear

    pin, transform, extract, _ = make_inputs(tiles, labels, encoder, patient_splits(tiles, labels), SMALL_EV,
                                             aggregator=MeanLinear())
    with pytest.raises(HistobenchError, match="aggregator 'mean-linear' gives only uniform tile attention"):
        topk.evaluate_topk(pin, opts, lambda _: topk.ArrayTiles(tiles), extract, transform)

    pin.task = SimpleNamespace(name="toy-survival", task_kind="survival", classes=(), metrics=())
    with pytest.raises(HistobenchError, match="classification tasks .* 'toy-survival' is survival"):
        TopKFinetune().evaluate(pin)


def test_validation_cases_are_stratified_seeded_and_hold_both_classes():
    cases = [f"c{i}" for i in range(20)]
    labels = {c: int(i < 6) for i, c in enumerate(cases)}
    v = topk.validation_cases(cases, labels, 0.2, seed=3)
    assert v == topk.validation_cases(cases, labels, 0.2, seed=3)
    assert sum(labels[c] for c in v) == 1 and sum(1 - labels[c] for c in v) == 3  # round(0.2*6)=1, round(0.2*14)=3
    assert topk.validation_cases(cases[:7], labels, 0.01, seed=0) == topk.validation_cases(cases[:7], labels, 0.01, 0)
    assert len(topk.validation_cases(cases, labels, 0.01, seed=0)) == 2  # at least one of each class


# ------------------------------------------------------------------------------------------ 7.11 metrics


def test_per_slide_auc_matches_a_reference_and_tile_weighting_differs():
    from histobench.evaluate import stats
    from histobench.evaluate.protocol import classification_frame

    rng = np.random.default_rng(0)
    n = 30
    y = np.array([0] * 12 + [1] * 18)
    logits = np.stack([np.zeros(n), rng.normal(size=n) + y * 0.8], axis=1)
    test = pd.DataFrame({"slide_id": [f"s{i}" for i in range(n)], "case_id": [f"p{i}" for i in range(n)], "y": y})
    frame = classification_frame(test, logits, ["A", "B"], 0, 0)
    p = frame["prob_B"].to_numpy()
    pos, neg = p[y == 1], p[y == 0]
    ref = (np.sum(pos[:, None] > neg[None, :]) + 0.5 * np.sum(pos[:, None] == neg[None, :])) / (len(pos) * len(neg))
    assert stats.metric_on_rows(frame, "subtyping", "macro_auc", ["A", "B"]) == pytest.approx(ref, abs=1e-12)
    # the released stage-2 evaluation repeats each slide's score once per tile: a different number
    n_tiles = rng.integers(1, 40, n)
    per_tile = frame.loc[frame.index.repeat(n_tiles)].reset_index(drop=True)
    weighted = stats.metric_on_rows(per_tile, "subtyping", "macro_auc", ["A", "B"])
    assert abs(weighted - ref) > 1e-3


# ------------------------------------------------------------------------------------------ 7.6 synthetic cohort


def motif_cohort(n_slides: int, n_tiles: int, size: int, contrast: float, seed: int, n_signal: int = 4):
    """Textured background tiles with per-tile colour/brightness jitter; positive slides hold ``n_signal`` tiles
    with a small low-contrast ring motif at a random place (12 px across on 32 px tiles, scaled with the tile)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    f = size / 32
    r = np.hypot(yy - 6 * f, xx - 6 * f)
    ring = ((r > 2.5 * f) & (r < 5.0 * f)).astype(np.float32)  # ring stamp at the corner, moved per tile
    span = int(round(12 * f))
    tiles, labels, signal = {}, {}, {}
    for i in range(n_slides):
        y = int(i % 2)
        fx, fy = rng.uniform(0.1, 0.4, (2, n_tiles, 1, 1))
        phase = rng.uniform(0, 2 * np.pi, (n_tiles, 1, 1))
        tex = np.sin(fx * xx + phase) * np.cos(fy * yy) + 0.5 * rng.normal(size=(n_tiles, size, size))
        base = 150 + 25 * tex[:, None] + rng.normal(0, 8, (n_tiles, 3, 1, 1))  # per-tile colour
        base *= rng.uniform(0.85, 1.15, (n_tiles, 1, 1, 1))  # per-tile brightness
        hits = rng.choice(n_tiles, n_signal, replace=False) if y else np.zeros(0, int)
        for t in hits:
            dy, dx = rng.integers(0, size - span, 2)
            stamp = np.roll(np.roll(ring, dy, 0), dx, 1)
            base[t] += contrast * stamp[None] * np.array([-1.0, -1.0, 0.6])[:, None, None]
        sid = f"S{i:03d}"
        tiles[sid] = np.clip(base, 0, 255).astype(np.uint8)
        labels[sid], signal[sid] = y, set(hits.tolist())
    return tiles, labels, signal


def run_7_6(n_slides: int, n_tiles: int, size: int, contrast: float, k: int, seed: int, opts: TopKFinetune.Options,
            ev: EvalOptions):
    """Stage-1 and stage-2 held-out AUCs and the signal precision of positive slides' top-k on one fold."""
    tiles, labels, signal = motif_cohort(n_slides, n_tiles, size, contrast, seed)
    neg, pos = [s for s in sorted(tiles) if not labels[s]], [s for s in sorted(tiles) if labels[s]]
    h = len(neg) // 2
    halves = [(neg[:h], pos[:h]), (neg[h:], pos[h:])]
    rows = []
    for fold in (0, 1):  # two folds: each half is the other's test side; a fifth of the training half validates
        test = set(halves[fold][0] + halves[fold][1])
        tn, tp = halves[1 - fold]
        val = set(tn[: len(tn) // 5] + tp[: len(tp) // 5])
        rows += [(fold, "test" if s in test else "val" if s in val else "train", f"P{s}") for s in sorted(tiles)]
    splits = Splits(pd.DataFrame(rows, columns=["fold", "split", "case_id"]), name="halves")
    encoder = truncated_resnet18(seed)
    pin, transform, extract, _ = make_inputs(tiles, labels, encoder, splits, ev.model_copy(update={"seed": seed}))
    precision = []
    real = topk.select_bags

    def record(head, bags, slide_ids, kk, aggregator="aggregator"):
        sel = real(head, bags, slide_ids, kk, aggregator)
        precision.extend(len(signal[s] & set(sel[s].tolist())) / len(sel[s]) for s in sel if labels[s])
        return sel

    topk.select_bags = record
    try:
        res = topk.evaluate_topk(pin, opts.model_copy(update={"top_k": k}), lambda _: topk.ArrayTiles(tiles), extract,
                                 transform)
    finally:
        topk.select_bags = real
    mean = lambda r: float(np.mean([f["macro_auc"] for f in r.per_fold]))  # noqa: E731
    return mean(res.stage1), mean(res), float(np.mean(precision))


def test_topk_finetuning_beats_frozen_features_small():
    """A seeded, CPU-sized 7.6 (the slow test below is the spec's size): 100 slides (50/50) x 16 tiles of
    3x32x32, 4 motif tiles per positive slide, k = 4, two folds (each half of the cohort tests once)."""
    opts = TopKFinetune.Options(finetune_epochs=8, finetune_lr=1e-3, finetune_batch_size=4)
    ev = EvalOptions(epochs=60, lr=1e-3, batch_size=8, bootstrap=0, device="cpu", min_test_per_class=1)
    auc1, auc2, precision = run_7_6(n_slides=100, n_tiles=16, size=32, contrast=55.0, k=4, seed=0, opts=opts, ev=ev)
    assert precision > 4 / 16  # stage-1 attention finds the motif tiles more often than chance
    assert 0.6 <= auc1 <= 0.8  # frozen random features: weakly informative (measured 0.78)
    assert auc2 >= auc1 + 0.05  # top-k fine-tuning learns the motif (measured 0.93)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("HISTOBENCH_SLOW"), reason="statistical check at the spec's size: HISTOBENCH_SLOW=1")
def test_topk_finetuning_beats_frozen_features_7_6():
    """The spec's 7.6: 200 slides (50/50) x 48 tiles of 3x64x64, 4 motif tiles per positive slide, ResNet18
    (layer2), k = 16; median over 3 seeds of held-out AUC after stage 2 >= stage 1 + 0.05. Measured (seeds 0-2):
    stage 1 0.622 / 0.720 / 0.606, stage 2 0.880 / 0.968 / 0.882, signal precision 0.118 / 0.153 / 0.166; about
    3 minutes per seed on one core."""
    opts = TopKFinetune.Options(finetune_epochs=4, finetune_lr=1e-3, finetune_batch_size=4)
    ev = EvalOptions(epochs=60, lr=1e-3, batch_size=8, bootstrap=0, device="cpu", min_test_per_class=1)
    runs = [run_7_6(n_slides=200, n_tiles=48, size=64, contrast=62.0, k=16, seed=s, opts=opts, ev=ev) for s in range(3)]
    auc1 = [r[0] for r in runs]
    auc2 = [r[1] for r in runs]
    assert all(r[2] > 4 / 48 for r in runs)
    assert 0.6 <= float(np.median(auc1)) <= 0.8
    assert float(np.median(auc2)) >= float(np.median(auc1)) + 0.05


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory, one_torch_thread):
    """A frozen-mil and a topk-finetune demo run on the same folds (12 patients, 3 folds), in one MLflow store."""
    import mlflow
    from typer.testing import CliRunner

    from histobench.cli.app import build_app

    tmp = tmp_path_factory.mktemp("topk-demo")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cohort = ["--task", "tcga-nsclc", "--demo", "--workdir", str(tmp / "work"), "--tracking-uri", uri,
              "-o", "task.demo_patients=12", "-o", "task.demo_slide_px=1536"]
    common = ["run", "--pretext", "none", *cohort, "-o", "task.folds=3", "-o", "eval.epochs=4", "-o", "eval.bootstrap=50"]
    runner = CliRunner()
    frozen = runner.invoke(build_app(), common, env={"COLUMNS": "200"})
    assert frozen.exit_code == 0, frozen.output
    tuned = runner.invoke(build_app(), [*common, "--protocol", "topk-finetune", "-o", "eval.top_k=4",
                                        "-o", "eval.finetune_epochs=1"], env={"COLUMNS": "200"})
    assert tuned.exit_code == 0, tuned.output
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("tcga-nsclc")
    runs = {r.data.tags["histobench.protocol"]: r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("histobench.stage") == "run"}
    return SimpleNamespace(tmp=tmp, uri=uri, cohort=cohort, output=tuned.output, runs=runs, client=client)


def test_cli_run_puts_a_topk_row_on_the_leaderboard_with_fold_weights(demo_runs):
    from histobench.leaderboard import build_leaderboard

    assert "kept fine-tuning epoch 1/1" in demo_runs.output
    assert "extract timm:topk-finetune-fold0-seed0" in demo_runs.output
    runs, client, uri = demo_runs.runs, demo_runs.client, demo_runs.uri
    assert set(runs) == {"frozen-mil", "topk-finetune"}
    r = runs["topk-finetune"]
    assert r.data.params["protocol.top_k"] == "4" and r.data.params["protocol.finetune_lr"] == "0.0001"  # demo preset
    m = r.data.metrics
    assert m["topk/leak_audit/passed"] == 1.0 and m["topk/leak_audit/test_slides_selected"] == 0
    assert m["topk/bags_selected"] > 0 and m["topk/bags_smaller_than_k"] == 0
    assert 0 <= m["macro_auc_fold_mean"] <= 1 and "topk/stage1_macro_auc" in m
    assert r.data.tags["histobench.split_hash"] == runs["frozen-mil"].data.tags["histobench.split_hash"]
    for fold in range(3):
        names = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(r.info.run_id, f"protocol/fold{fold}")}
        assert names == {"encoder.pt", "aggregator.pt", "finetune.json"}
    board = build_leaderboard("tcga-nsclc", uri)
    assert list(board["protocol"]) == ["frozen-mil", "topk-finetune"]  # shown apart, frozen-mil's group first


def test_analyze_cka_compares_a_folds_tuned_encoder_with_its_initialisation(demo_runs):
    """``--run RUN --run RUN:foldK``: the run's encoder as built against the one fine-tuned in fold K."""
    import json
    import re

    from typer.testing import CliRunner

    from histobench.analyze.encoders import from_run, parse_run_ref
    from histobench.cli.app import build_app
    from histobench.tracking import download_artifact, get_run

    uri, tmp = demo_runs.uri, demo_runs.tmp
    tuned_id = demo_runs.runs["topk-finetune"].info.run_id
    frozen_id = demo_runs.runs["frozen-mil"].info.run_id
    cpu = torch.device("cpu")

    # the fold's encoder is exactly the logged artifact; the plain run is its initialisation
    init, fold1 = from_run(tuned_id, cpu, uri), from_run(f"{tuned_id}:fold1", cpu, uri)
    logged = torch.load(download_artifact(tuned_id, "protocol/fold1/encoder.pt", tmp / "dl", uri), weights_only=True)
    state = fold1.module.state_dict()
    assert set(state) == set(logged) and all(torch.equal(state[k], logged[k]) for k in logged)
    changed = [k for k, v in init.module.state_dict().items() if not torch.equal(v, state[k])]
    assert changed and fold1.label.endswith(":fold1") and fold1.source == f"{tuned_id}:protocol/fold1/encoder.pt"
    assert fold1.run_id == tuned_id and init.source == tuned_id
    assert parse_run_ref("abc:fold2:seed1").artifact == "protocol/fold2/seed1/encoder.pt"

    def analyze(*runs):
        args = ["analyze", "cka", *[a for r in runs for a in ("--run", r)], *demo_runs.cohort, "--tiles", "32",
                "-o", "analysis.batch_size=16"]
        return CliRunner().invoke(build_app(), args, env={"COLUMNS": "300"})

    result = analyze(tuned_id, f"{tuned_id}:fold0")
    assert result.exit_code == 0, result.output
    run_id = re.search(r"MLflow run (\w+)", result.output).group(1)
    run = get_run(run_id, uri)
    assert run["tags"]["histobench.analysed_runs"] == f"{tuned_id},{tuned_id}"
    assert run["params"]["encoders.1.source"] == f"{tuned_id}:protocol/fold0/encoder.pt"
    report = json.loads(download_artifact(run_id, "report.json", tmp / "dl", uri).read_text())
    assert report["encoders"][1]["label"].endswith(":fold0") and not report["encoders"][0]["label"].endswith(":fold0")
    diag = [d["cka"] for d in report["report"]["diagonal"]]
    assert len(diag) == 5 and max(diag) <= 1 + 1e-9 and min(diag) < 1 - 1e-6  # fine-tuning moved some layer
    csv = download_artifact(run_id, "cka.csv", tmp / "dl", uri).read_text().splitlines()
    assert len(csv) == 1 + 25 and csv[1].endswith(":fold0")  # encoder_b is the fold's encoder

    for bad, message in ((f"{tuned_id}:fold7", f"has no fine-tuned encoder for fold7 (protocol/fold7/encoder.pt); "
                                               "it has fold0, fold1, fold2"),
                         (f"{frozen_id}:fold0", "its protocol 'frozen-mil' kept no fine-tuned encoder"),
                         (f"{tuned_id}:fold", "is not RUN_ID, RUN_ID:foldK or RUN_ID:foldK:seedS")):
        with pytest.raises(HistobenchError) as err:
            from_run(bad, cpu, uri)
        assert message in str(err.value) and "\n" not in str(err.value)
