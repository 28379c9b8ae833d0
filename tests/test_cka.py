"""CKA (histobench.analyses.cka), layer taps (histobench.analyses.taps) and ``histobench analyze cka``.

The fidelity checks 7.7–7.10 of the HistoTransfer spec (../shared/methods/histotransfer.md): CKA's invariances,
its golden values on a 6×2 / 6×3 example, the minibatch estimator's batch-size independence, and the report of
a network compared with itself and with a copy whose last stage changed; then the CLI end to end.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from histobench.analyses.cka import (MEDIAN_DIST, MinibatchCKA, cka, cka_from_grams, hsic_biased, hsic_unbiased,
                                     linear_cka_features, linear_gram, minibatch_cka, minibatch_slices, rbf_gram,
                                     squared_distances)
from histobench.errors import HistobenchError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

X = np.array([[1, 2], [3, 1], [0, 0], [2, 5], [4, 4], [1, 0]], dtype=float)
Y = np.array([[1, 0, 2], [0, 1, 1], [3, 3, 0], [1, 2, 2], [0, 0, 1], [2, 1, 3]], dtype=float)


# --- 7.8 golden values -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, expected", [
    ({"kernel": "linear", "estimator": "full_biased"}, 0.384822),
    ({"kernel": "linear", "estimator": "full_unbiased"}, -0.027856),
    ({"kernel": "rbf", "estimator": "full_biased"}, 0.821771),  # σ² = 0.25 · median of all 36 squared distances
    ({"kernel": "rbf", "estimator": "full_biased", "bandwidth": MEDIAN_DIST}, 0.716483),  # σ = 0.5 · median distance
])
def test_golden_values(kwargs, expected):
    assert cka(X, Y, **kwargs) == pytest.approx(expected, abs=1e-6)
    assert cka(torch.tensor(X), torch.tensor(Y), **kwargs) == pytest.approx(expected, abs=1e-6)  # tensors alike


def test_the_estimators_by_hand():
    """The HSIC estimators against their definitions written out with explicit matrices."""
    n = 6
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = X @ X.T, Y @ Y.T
    assert hsic_biased(torch.tensor(k), torch.tensor(l)) == pytest.approx(np.trace(k @ h @ l @ h) / 25, rel=1e-12)
    kt, lt, one = k - np.diag(np.diag(k)), l - np.diag(np.diag(l)), np.ones(n)
    by_hand = (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / 20 - 2 / 4 * one @ kt @ lt @ one) / (n * 3)
    assert hsic_unbiased(torch.tensor(k), torch.tensor(l)) == pytest.approx(by_hand, rel=1e-12)
    d2 = squared_distances(X).numpy()
    assert d2.shape == (6, 6) and np.all(np.diag(d2) == 0) and d2[0, 3] == pytest.approx(1 + 9)
    s2 = 0.25 * np.median(((X[:, None] - X[None]) ** 2).sum(-1))
    assert np.allclose(rbf_gram(X).numpy(), np.exp(-d2 / (2 * s2)), atol=1e-14)
    with pytest.raises(HistobenchError, match="more than 3 samples, got 3"):
        hsic_unbiased(torch.eye(3), torch.eye(3))
    with pytest.raises(HistobenchError, match="unknown CKA kernel 'cosine'"):
        cka(X, Y, kernel="cosine")
    with pytest.raises(HistobenchError, match="unknown CKA estimator"):
        cka(X, Y, estimator="jackknife")
    with pytest.raises(HistobenchError, match="same inputs: 6 rows vs 5 rows"):
        cka(X, Y[:5])


# --- 7.7 properties ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xy():
    g = np.random.default_rng(0)
    x = g.normal(size=(40, 10))
    y = np.tanh(x @ g.normal(size=(10, 7))) + 0.5 * g.normal(size=(40, 7))
    return x, y


ALL = [("linear", "full_biased"), ("linear", "full_unbiased"), ("rbf", "full_biased"), ("rbf", "full_unbiased"),
       ("linear", "minibatch_unbiased"), ("rbf", "minibatch_unbiased")]


@pytest.mark.parametrize("kernel, estimator", ALL)
def test_properties(xy, kernel, estimator):
    x, y = xy
    g = np.random.default_rng(1)
    f = lambda a, b: cka(a, b, kernel, estimator, batch_size=10)  # noqa: E731
    base = f(x, y)
    assert 0.2 < abs(base) < 0.99  # a non-trivial pair
    assert f(x, x) == pytest.approx(1.0, abs=1e-12)
    assert f(y, x) == pytest.approx(base, abs=1e-12)
    q, _ = np.linalg.qr(g.normal(size=(10, 10)))
    assert np.allclose(q.T @ q, np.eye(10))
    assert f(x @ q, y) == pytest.approx(base, abs=1e-10)  # orthogonal transform
    assert f(3.7 * x, y) == pytest.approx(base, abs=1e-10)  # isotropic scaling
    assert f(x + g.normal(size=(1, 10)) * 5, y) == pytest.approx(base, abs=1e-10)  # constant row shift
    a = np.diag([1.0, 8.0, 1.0, 1.0, 0.2, 1.0, 1.0, 3.0, 1.0, 1.0]) + 0.3 * g.normal(size=(10, 10))
    assert abs(np.linalg.det(a)) > 1e-3
    assert abs(f(x @ a, y) - base) > 1e-3  # NOT invariant to a generic invertible map (no accidental whitening)


def test_biased_linear_cka_is_in_the_unit_interval_and_the_two_forms_agree():
    g = np.random.default_rng(2)
    values = []
    for trial in range(20):
        n, p, q = g.integers(5, 60), g.integers(1, 30), g.integers(1, 30)
        x, y = g.normal(size=(n, p)), g.normal(size=(n, q)) * g.uniform(0.1, 10)
        if trial % 2:
            y[:, 0] = x[:, 0]  # some pairs share a direction
        feature = linear_cka_features(x, y)
        gram_form = cka_from_grams(linear_gram(x), linear_gram(y))
        assert abs(feature - gram_form) < 1e-10
        values.append(feature)
    assert all(0.0 <= v <= 1.0 for v in values) and max(values) - min(values) > 0.2


def test_a_constant_representation_gives_nan_not_a_crash(xy):
    x, _ = xy
    assert np.isnan(cka(x, np.ones((40, 3))))
    assert np.isnan(cka(x, np.ones((40, 3)), "rbf"))


# --- 7.9 the minibatch estimator ---------------------------------------------------------------------------

def test_minibatch_unbiased_cka_does_not_depend_on_the_batch_size():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 64, generator=g, dtype=torch.float64)
    r = torch.randn(64, 32, generator=g, dtype=torch.float64)
    w = torch.tanh(z @ r / 8) + 0.3 * torch.randn(2000, 32, generator=g, dtype=torch.float64)
    full = cka(z, w, estimator="full_unbiased")
    unbiased = {b: minibatch_cka(z, w, b) for b in (32, 64, 128, 256)}
    biased = {b: minibatch_cka(z, w, b, unbiased=False) for b in (32, 256)}
    assert 0.4 < full < 0.55  # the spec observes ≈ 0.47
    assert max(unbiased.values()) - min(unbiased.values()) < 0.01
    assert all(abs(v - full) < 0.01 for v in unbiased.values())
    assert biased[32] - biased[256] > 0.1  # per-batch biased HSIC drifts with the batch size (≈ 0.74 → 0.53)
    assert cka(z, w, estimator="minibatch_unbiased", batch_size=64) == unbiased[64]


def test_minibatches_are_near_equal_and_never_tiny():
    parts = minibatch_slices(10, 8)
    assert [(s.start, s.stop) for s in parts] == [(0, 5), (5, 10)]
    assert sum(s.stop - s.start for s in minibatch_slices(2001, 256)) == 2001
    assert min(s.stop - s.start for s in minibatch_slices(2001, 256)) >= 4
    with pytest.raises(HistobenchError, match="batch_size=3"):
        minibatch_slices(100, 3)
    acc = MinibatchCKA(2, 1)
    k = linear_gram(np.random.default_rng(0).normal(size=(8, 3)))
    acc.update([k, 2 * k], [k])
    assert acc.batches == 1 and acc.rows == 8
    assert np.allclose(acc.matrix(), [[1.0], [1.0]])


# --- layer taps --------------------------------------------------------------------------------------------

def _encoder(arch: str | None, seed: int = 0):
    """A timm encoder component and its module (the demo ViT when ``arch`` is None), built after seeding."""
    from histobench.registry import create

    comp = create("encoder", "timm", None, "demo") if arch is None else \
        create("encoder", "timm", {"arch": arch, "img_size": 64})
    torch.manual_seed(seed)
    return comp, comp.build().eval()


def test_default_layers_of_the_families():
    from histobench.analyses.taps import LayerTaps, default_layers, display_name

    _, resnet = _encoder("resnet18")
    paths = default_layers(resnet)
    assert [display_name(resnet, p) for p in paths] == ["maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert paths[0] == "model.maxpool"
    blocks = default_layers(resnet, "blocks")
    assert [display_name(resnet, p) for p in blocks][1:] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    _, vit = _encoder(None)
    assert [display_name(vit, p) for p in default_layers(vit)] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    from histobench.analyses.taps import EMBEDDING

    x = torch.randn(3, 3, 64, 64)
    with LayerTaps(resnet, paths + [EMBEDDING]) as taps:
        out = taps(x)
    assert [tuple(v.shape) for v in out.values()] == [(3, 64), (3, 64), (3, 128), (3, 256), (3, 512), (3, 512)]
    assert torch.allclose(out["model.layer4"], out[EMBEDDING], atol=1e-6)  # the embedding pools layer4
    assert torch.allclose(out[EMBEDDING], resnet(x), atol=1e-6)
    with LayerTaps(resnet, ["model.layer2"], reduce="flatten") as taps:
        flat = taps(x)["model.layer2"]
    assert tuple(flat.shape) == (3, 128 * 8 * 8)
    assert torch.allclose(flat.reshape(3, 128, 64).mean(-1), out["model.layer2"], atol=1e-6)
    with LayerTaps(vit, default_layers(vit)) as taps:
        tokens = taps(x)
    assert all(tuple(v.shape) == (3, 96) for v in tokens.values())
    assert not any(h for m in resnet.modules() for h in m._forward_hooks.values())  # the hooks are removed


def test_densenet_and_generic_modules():
    import timm
    from torch import nn

    from histobench.analyses.taps import LayerTaps, default_layers, display_name

    dense = timm.create_model("densenet121", num_classes=0)
    assert [display_name(dense, p) for p in default_layers(dense)] == [
        "features.pool0", "features.denseblock1", "features.transition1", "features.denseblock2",
        "features.transition2", "features.denseblock3", "features.transition3", "features.denseblock4"]
    # a plain Sequential: its children; a truncated model never reaches the layers after the cut
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3))
    assert default_layers(net) == ["0", "1", "2"]

    class Truncated(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.unused = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.body(x).mean((2, 3))

    t = Truncated()
    with LayerTaps(t, ["body", "unused"]) as taps:
        assert taps.reached(torch.randn(2, 3, 8, 8)) == ["body"]
        with pytest.raises(HistobenchError, match="layers unused of Truncated did not run"):
            taps(torch.randn(2, 3, 8, 8))


def test_named_layers_resolve_or_fail_in_one_line():
    from histobench.analyses.taps import resolve_layers

    _, resnet = _encoder("resnet18")
    assert resolve_layers(resnet, ["layer3", "model.layer1.0", "embedding"], "enc") == \
        ["model.layer3", "model.layer1.0", "embedding"]
    with pytest.raises(HistobenchError, match=r"layer 'layer5' is not a module of encoder 'enc'; did you mean .*layer"):
        resolve_layers(resnet, ["layer5"], "enc")
    with pytest.raises(HistobenchError, match="named twice"):
        resolve_layers(resnet, ["layer1", "model.layer1"], "enc")


# --- 7.10 the report ---------------------------------------------------------------------------------------

def _inputs(tmp_path, enc_a, enc_b, n=48, seed=0):
    from histobench.analyze import AnalysedEncoder, AnalysisInputs

    tiles = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    encoders = [AnalysedEncoder(label, module, comp, f"{label}.pt") for label, (comp, module) in
                (("frozen", enc_a), ("tuned", enc_b))]
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return AnalysisInputs(encoders=encoders, tiles=tiles, tile_refs=[None] * n, out_dir=out,
                          device=torch.device("cpu"), seed=seed)


def _run(inputs, **options):
    from histobench.registry import create

    return create("analysis", "cka", options).run(inputs)


LAYERS = ["maxpool", "layer1", "layer2", "layer3", "layer4", "embedding"]


def test_a_network_against_itself_and_against_a_changed_last_stage(tmp_path):
    import pandas as pd

    frozen, same = _encoder("resnet18", 0), _encoder("resnet18", 0)
    result = _run(_inputs(tmp_path, frozen, same))
    m = np.array(result.report["matrix"])
    assert result.report["layers_a"] == result.report["layers_b"] == LAYERS
    assert m.shape == (6, 6) and np.allclose(m, m.T, atol=1e-9) and np.allclose(np.diag(m), 1.0, atol=1e-9)
    assert result.metrics["cka_diag_min"] == pytest.approx(1.0, abs=1e-9)
    assert result.report["batches"] == 1 and result.report["n"] == 48

    tuned = _encoder("resnet18", 0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # "fine-tuned": every parameter of the last stage moved (its last BNs start at zero)
        for p in tuned[1].model.layer4.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    result = _run(_inputs(tmp_path, frozen, tuned), batch_size=16)
    diag = {d["layer"]: d["cka"] for d in result.report["diagonal"]}
    assert list(diag) == LAYERS and result.report["batches"] == 3
    assert all(diag[k] == pytest.approx(1.0, abs=1e-9) for k in LAYERS[:4])  # untouched layers: the same
    assert diag["layer4"] < 1 - 1e-6 and diag["embedding"] < 1 - 1e-6 and max(diag.values()) <= 1 + 1e-9
    assert result.metrics["cka_diag/layer4"] == diag["layer4"] and result.report["most_changed_layer"] in ("layer4", "embedding")
    assert result.metrics["cka_diag_min"] == min(diag.values())

    csv, png = result.files
    assert png.name == "cka_heatmap.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(csv)
    assert len(table) == 36 and list(table[["layer_a", "layer_b"]].iloc[7]) == ["layer1", "layer1"]
    assert set(table["n"]) == {48} and set(table["kernel"]) == {"linear"}
    assert set(table["estimator"]) == {"minibatch_unbiased"} and set(table["batch_size"]) == {16}
    assert set(table["encoder_a"]) == {"frozen"} and set(table["encoder_b"]) == {"tuned"}
    assert np.allclose(table["cka"].to_numpy().reshape(6, 6), np.array(result.report["matrix"]), atol=1e-9)


def test_the_full_estimators_match_cka_of_the_embeddings(tmp_path):
    """The analysis's embedding entry equals the CKA of the two modules' outputs computed here directly."""
    from histobench.features.extract import prepare_pixels

    a, b = _encoder("resnet18", 0), _encoder("resnet18", 1)
    inputs = _inputs(tmp_path, a, b, n=24)
    with torch.inference_mode():
        ea = a[1](prepare_pixels(inputs.tiles, a[0].transform()))
        eb = b[1](prepare_pixels(inputs.tiles, b[0].transform()))
    for kernel, estimator in (("linear", "full_biased"), ("rbf", "full_unbiased")):
        result = _run(inputs, kernel=kernel, estimator=estimator, layers_a="layer2,embedding", batch_size=8)
        assert result.report["layers_a"] == result.report["layers_b"] == ["layer2", "embedding"]
        assert result.report["matrix"][1][1] == pytest.approx(cka(ea, eb, kernel, estimator), abs=1e-6)
    assert result.report["bandwidth"] == "median_sqdist" and result.report["rbf_t"] == 0.5


def test_one_or_three_tiles_are_too_few(tmp_path):
    a = _encoder("resnet18", 0)
    with pytest.raises(HistobenchError, match="needs at least 4 tiles, got 3"):
        _run(_inputs(tmp_path, a, a, n=3))
    with pytest.raises(HistobenchError, match="layer 'layer9' is not a module of encoder 'frozen'"):
        _run(_inputs(tmp_path, a, a, n=8), layers_a="layer9")


# --- the CLI end to end ------------------------------------------------------------------------------------

def test_cli_two_weights_files_to_mlflow(tmp_path):
    from histobench.cli.app import build_app
    from histobench.tracking import download_artifact, get_run

    paths = []
    for name, seed in (("frozen", 0), ("other", 1)):
        _, module = _encoder(None, seed)
        paths.append(tmp_path / f"{name}.pt")
        torch.save(module.state_dict(), paths[-1])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def analyze(*weights):
        args = ["analyze", "cka", *[a for w in weights for a in ("--weights", str(w))], "--encoder", "timm",
                "--task", "tcga-nsclc", "--demo", "-o", "task.demo_patients=4", "-o", "task.demo_slide_px=1024",
                "--tiles", "32", "-o", "analysis.batch_size=16", "--workdir", str(tmp_path / "work"), "--tracking-uri", uri]
        return CliRunner().invoke(build_app(), args, env={"COLUMNS": "300"})

    result = analyze(*paths)
    assert result.exit_code == 0, result.output
    assert "cka_diag/blocks.0" in result.output and "cka_diag_min" in result.output
    run_id = re.search(r"MLflow run (\w+)", result.output).group(1)
    run = get_run(run_id, uri)
    assert run["name"] == "analysis cka" and run["tags"]["histobench.analysis"] == "cka"
    assert run["params"]["analysis.estimator"] == "minibatch_unbiased" and run["params"]["analysis.kernel"] == "linear"
    csv = download_artifact(run_id, "cka.csv", tmp_path / "dl", uri).read_text().splitlines()
    assert len(csv) == 1 + 5 * 5 and csv[0].startswith("layer_a,layer_b,cka,n,kernel,estimator")
    assert csv[1].startswith("blocks.0,blocks.0,") and ",32,linear,minibatch_unbiased," in csv[1]
    png = download_artifact(run_id, "cka_heatmap.png", tmp_path / "dl", uri)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(download_artifact(run_id, "report.json", tmp_path / "dl", uri).read_text())
    diag = [d["cka"] for d in report["report"]["diagonal"]]
    assert len(diag) == 5 and all(d < 1 - 1e-6 for d in diag)  # two random ViTs differ everywhere
    assert run["metrics"]["cka_diag_mean"] == pytest.approx(np.mean(diag), abs=1e-9)
    # one analysis takes exactly two encoders
    bad = analyze(paths[0])
    assert bad.exit_code == 2 and bad.output.strip().splitlines()[-1] == \
        "error: analysis 'cka' takes exactly 2 encoders, got 1 (pass --run RUN_ID or --weights FILE)"
