"""The ``attention`` analysis: golden values of every metric, the paired test on two crafted ViTs, the CLI.

Two encoders with known attention: the demo ViT whose last block has its query and key projections zeroed
(every logit equal, so the [CLS] attention is exactly uniform over the patches) and the same ViT with those
projections scaled up (peaked attention). The uniform one must have entropy 1, F(p) = ceil(pN)/N, Gini 0 and,
with the oracle prior, prior KL 0; the paired Wilcoxon test must find it the less sparse one.
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from histobench.analyses import attention_metrics as am
from histobench.cli.app import build_app
from histobench.errors import HistobenchError
from histobench.segment.oracle import OracleSegmenter

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASK = ["--task", "tcga-nsclc", "--demo", "-o", "task.demo_patients=4", "-o", "task.demo_slide_px=1024"]
N_TILES = 32  # of the 36 tiles the 4 held-out demo patients have at 1024 px
DIM = 96  # the timm demo ViT: 64 px, patch 8 (8 x 8 = 64 tokens), width 96, 3 heads


def _coverage(n: int, p: float) -> float:
    return math.ceil(round(p * n, 9)) / n


# ------------------------------------------------------------------------------------------- golden values
@pytest.mark.parametrize("n", [2, 7, 64, 196])
def test_uniform_attention(n):
    u = np.full(n, 1.0 / n)
    assert am.normalised_entropy(u) == pytest.approx(1.0, abs=1e-12)
    for p in (0.6, 0.9):
        assert am.mass_coverage(u, p) == pytest.approx(_coverage(n, p), abs=1e-12)
        assert am.threshold_mask(u, p).sum() == round(_coverage(n, p) * n)
    assert am.gini(u) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n", [2, 7, 64, 196])
def test_one_hot_attention(n):
    a = np.zeros(n)
    a[n // 2] = 1.0
    assert am.normalised_entropy(a) == 0.0
    assert am.mass_coverage(a, 0.6) == am.mass_coverage(a, 0.9) == pytest.approx(1 / n)
    assert am.gini(a) == pytest.approx((n - 1) / n, abs=1e-12)
    assert np.flatnonzero(am.threshold_mask(a, 0.6)).tolist() == [n // 2]


def test_a_hand_made_row_renormalised_and_batched():
    a = np.array([0.5, 0.25, 0.25, 0.0])
    assert am.normalised_entropy(a) == pytest.approx(0.75)  # 1.5 bits over log2(4) = 2
    assert am.mass_coverage(a, 0.6) == 0.5 and am.mass_coverage(a, 0.9) == 0.75 and am.mass_coverage(a, 0.5) == 0.25
    assert am.gini(a) == pytest.approx((-3 * 0 - 0.25 + 0.25 + 3 * 0.5) / 4)  # 0.375
    assert am.threshold_mask(a, 0.6).tolist() == [True, True, False, False]  # ties: the earlier token
    # unnormalised rows are renormalised; leading axes are kept
    batch = np.stack([np.stack([7 * a, np.full(4, 3.0), np.eye(4)[1]])] * 2)  # [2 images, 3 heads, 4]
    e = am.normalised_entropy(batch)
    assert e.shape == (2, 3) and e[1].tolist() == pytest.approx([0.75, 1.0, 0.0])
    assert am.mass_coverage(batch, 0.6)[0].tolist() == pytest.approx([0.5, 0.75, 0.25])
    with pytest.raises(HistobenchError, match="sums to 0"):
        am.gini(np.zeros((2, 4)))
    with pytest.raises(HistobenchError, match="negative"):
        am.normalised_entropy([0.5, -0.1, 0.6])


def test_head_jensen_shannon():
    n = 16
    u = np.full(n, 1 / n)
    assert am.head_js_divergence(np.stack([u, u, u])) == pytest.approx(0.0, abs=1e-12)
    assert am.head_js_divergence(np.eye(n)[:2]) == pytest.approx(1.0)  # disjoint maps: 1 bit
    p, q = np.array([0.5, 0.5, 0, 0]), np.array([0, 0.5, 0.5, 0])
    assert am.head_js_divergence(np.stack([p, q])) == pytest.approx(0.5)  # M = (.25, .5, .25, 0)
    # three heads: the mean of the pairs (p, p) = 0, (p, q) = 0.5, (p, q) = 0.5
    assert am.head_js_divergence(np.stack([[p, p, q]] * 3)).tolist() == pytest.approx([1 / 3] * 3)
    assert am.head_js_divergence(np.stack([p])) == 0.0


def test_prior_coverage_on_a_crafted_case():
    # 4 tokens: tokens 0, 1 are nucleus (group 1), 2, 3 no nucleus (group 0); s = (0.5, 0.5)
    occ = np.array([[0, 0, 1, 1], [1, 1, 0, 0]], dtype=float)
    kl, groups = am.prior_coverage([0.4, 0.4, 0.1, 0.1], occ)  # m = (0.2, 0.8)
    assert kl == pytest.approx(0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)) and groups == 2
    kl, groups = am.prior_coverage(np.full(4, 0.25), occ)  # attention follows the area exactly
    assert kl == pytest.approx(0.0, abs=1e-12) and groups == 2
    kl, groups = am.prior_coverage([0.97, 0.0, 0.03, 0.0], occ)  # m = (0.03, 0.97): one group over 5 %
    assert kl == pytest.approx(0.5 * math.log(0.5 / 0.03) + 0.5 * math.log(0.5 / 0.97)) and groups == 1
    # a group absent from the tile (s_k = 0) adds nothing; a mixed token splits its attention by area
    occ3 = np.array([[0, 0, 1, 0.5], [1, 1, 0, 0.5], [0, 0, 0, 0]])
    kl, groups = am.prior_coverage([0.1, 0.1, 0.1, 0.7], occ3)  # s = (3/8, 5/8, 0), m = (0.45, 0.55, 0)
    assert kl == pytest.approx(3 / 8 * math.log(3 / 8 / 0.45) + 5 / 8 * math.log(5 / 8 / 0.55)) and groups == 2
    # batched: [images, heads, N] against one occupancy per image [images, 1, K, N]
    kl, groups = am.prior_coverage(np.stack([[[0.4, 0.4, 0.1, 0.1], [0.25] * 4]] * 2), occ[None, None])
    assert kl.shape == (2, 2) and kl[:, 1] == pytest.approx([0, 0], abs=1e-12)


def test_token_occupancy_and_group_maps():
    g = np.zeros((16, 16), dtype=int)
    g[:8, :8] = 1  # the top-left quarter: exactly the first token of a 2 x 2 grid
    occ = am.token_occupancy(g, 2, (2, 2))
    assert occ.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]
    g = np.zeros((10, 10), dtype=int)
    g[:, :5] = 2  # 3 x 3 grid over 10 px: tokens 3.33 px wide, the middle column is split 5/3.33 - 1 = 1/2
    occ = am.token_occupancy(g, 3, (3, 3)).reshape(3, 3, 3)
    assert np.allclose(occ.sum(axis=0), 1.0) and np.allclose(occ[1], 0)
    assert np.allclose(occ[2][:, 0], 1) and np.allclose(occ[2][:, 1], 0.5) and np.allclose(occ[2][:, 2], 0)
    assert occ[2].sum() * (100 / 9) == pytest.approx(50)  # areas add up to the 50 pixels of group 2
    inst = np.array([[0, 1], [2, 2]])
    types = np.array([[3, 1], [0, 2]])
    assert am.group_map(inst, None, "binary").tolist() == [[0, 1], [1, 1]]
    assert am.group_map(inst, types, "types").tolist() == [[0, 1], [0, 2]]  # type 0 in a nucleus: none
    with pytest.raises(HistobenchError, match="needs a type map"):
        am.group_map(inst, None, "types")


def test_paired_wilcoxon_direction_and_edge_cases():
    rng = np.random.default_rng(0)
    y = rng.random(30)
    res = am.paired_wilcoxon(y + 0.1 + 0.01 * rng.standard_normal(30), y)
    assert res["direction"] == ">" and res["p"] < 1e-5 and res["n"] == 30
    assert res["median_difference"] == pytest.approx(0.1, abs=0.01)
    assert am.paired_wilcoxon(y, y + 0.1)["direction"] == "<"
    same = am.paired_wilcoxon(y, y)
    assert same["p"] == 1.0 and same["direction"] == "=" and same["nonzero"] == 0
    x = y.copy()
    x[:5] = np.nan  # tiles without a value (a failed segmentation) are dropped pairwise
    assert am.paired_wilcoxon(x, y)["n"] == 25
    assert am.summary([1.0, 3.0, np.nan]) == (2.0, pytest.approx(math.sqrt(2)), 2)


# ------------------------------------------------------------------------------------------- two ViTs
def _vit(seed: int, qk_scale: float):
    """The timm demo ViT after seeding ``seed``, its last block's query and key projections times ``qk_scale``
    (0: every [CLS] logit equal, uniform attention)."""
    from histobench.registry import create

    comp = create("encoder", "timm", None, "demo")
    torch.manual_seed(seed)
    module = comp.build().eval()
    with torch.no_grad():
        qkv = module.model.blocks[-1].attn.qkv
        qkv.weight[: 2 * DIM].mul_(qk_scale)
        qkv.bias[: 2 * DIM].mul_(qk_scale)
    return comp, module


@pytest.fixture(scope="module")
def vits():
    return {"peaked": _vit(1, 12.0), "uniform": _vit(2, 0.0)}


def _inputs(vits, tmp_path, n=24, size=64, refs=None):
    from histobench.analyze import AnalysedEncoder, AnalysisInputs
    from histobench.components import TileRef

    g = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    encs = [AnalysedEncoder(label=k, module=m, component=c, source=k) for k, (c, m) in vits.items()]
    refs = refs or [TileRef("s", Path("s.tif"), i, 0, 0, size, size, 1.0) for i in range(n)]
    return AnalysisInputs(encoders=encs, tiles=tiles, tile_refs=refs, out_dir=tmp_path, device=torch.device("cpu"))


def test_uniform_vit_beats_peaked_vit_in_the_paired_test(vits, tmp_path):
    from histobench.analyses.attention import AttentionAnalysis, encoder_attention, image_metrics

    inputs = _inputs(vits, tmp_path)
    att, grid = encoder_attention(inputs.encoders[1], inputs, batch_size=10)
    assert att.shape == (24, 3, 64) and grid == (8, 8)
    assert np.allclose(att, 1 / 64, atol=1e-12)  # zeroed q/k: exactly uniform
    values = image_metrics(att, grid)
    assert np.allclose(values["entropy"], 1) and np.allclose(values["mass_coverage_0.6"], 39 / 64)
    assert np.allclose(values["mass_coverage_0.9"], 58 / 64) and np.allclose(values["gini"], 0, atol=1e-12)
    assert np.allclose(values["head_js"], 0, atol=1e-12)

    result = AttentionAnalysis(overlay_tiles=3).run(inputs)
    m = result.metrics
    assert m["entropy/uniform"] == pytest.approx(1.0) and m["entropy_sd/uniform"] == pytest.approx(0, abs=1e-9)
    assert m["entropy/peaked"] < 0.9 and m["gini/peaked"] > 0.2 and m["head_js/peaked"] > 0.05
    assert m["mass_coverage_0.6/peaked"] < 39 / 64
    # peaked minus uniform: lower entropy and coverage, higher Gini, every image, so p is tiny
    tests = {t["metric"]: t for t in result.report["tests"]}
    assert set(tests) == {"entropy", "mass_coverage_0.6", "mass_coverage_0.9", "gini", "head_js"}
    for name, direction in (("entropy", "<"), ("mass_coverage_0.6", "<"), ("gini", ">"), ("head_js", ">")):
        t = tests[name]
        assert (t["first"], t["second"], t["direction"], t["n"]) == ("peaked", "uniform", direction, 24)
        assert t["p"] < 0.05 and m[f"wilcoxon_p/{name}/peaked_vs_uniform"] == t["p"]
    assert m["median_diff/entropy/peaked_vs_uniform"] < 0
    row = result.report["encoders"][0]
    assert row["label"] == "peaked" and row["heads"] == 3 and len(row["entropy"]["per_head"]) == 3
    assert np.mean([h["mean"] for h in row["entropy"]["per_head"]]) == pytest.approx(m["entropy/peaked"])
    names = sorted(f.name for f in result.files)
    assert names == ["attention_heads.csv", "attention_overlay_peaked.png", "attention_overlay_uniform.png",
                     "attention_tiles.csv"]
    assert (tmp_path / "attention_overlay_peaked.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (tmp_path / "attention_tiles.csv").read_text().splitlines()
    assert len(lines) == 25 and "peaked:entropy" in lines[0] and "prior_kl" not in lines[0]
    assert len((tmp_path / "attention_heads.csv").read_text().splitlines()) == 1 + 2 * 3


def test_an_encoder_without_attention_is_one_line(vits, tmp_path):
    from histobench.analyses.attention import AttentionAnalysis
    from histobench.analyze import AnalysedEncoder
    from histobench.registry import create

    comp = create("encoder", "timm", {"arch": "test_resnet", "img_size": 32})
    cnn = comp.build().eval()
    inputs = _inputs(vits, tmp_path, n=2, size=32)
    inputs.encoders = [AnalysedEncoder(label="cnn-a", module=cnn, component=comp, source="x")]
    with pytest.raises(HistobenchError, match=r"^encoder cnn-a: .*no transformer blocks") as err:
        AttentionAnalysis().run(inputs)
    assert "\n" not in str(err.value)
    inputs.encoders[0].module = torch.nn.Linear(3, 3)
    with pytest.raises(HistobenchError, match=r"encoder cnn-a \(timm\) has no \[CLS\] attention"):
        AttentionAnalysis().run(inputs)


def test_prior_groups_and_segmenter_errors():
    from histobench.analyses.attention import AttentionAnalysis, Prior

    inst = np.array([[0, 1], [2, 2]], dtype=np.uint16)
    types = np.array([[0, 1], [3, 3]], dtype=np.uint8)
    prior = Prior.from_maps([(inst, types), None], "types", "oracle", [(1, "ValueError: bad tile")])
    assert prior.n_groups == 4 and prior.maps[1] is None and prior.info["segmented"] == 1
    assert prior.info["groups"] == ["no nucleus", "type 1", "type 2", "type 3"]
    assert prior.info["area_share"] == [0.25, 0.25, 0.0, 0.5]
    assert Prior.from_maps([(inst, None)], "binary", "x", []).n_groups == 2
    with pytest.raises(HistobenchError, match="segmenter 'stardist' gives no cell types; use -o analysis.grouping=binary"):
        Prior.from_maps([(inst, None)], "types", "stardist", [])
    with pytest.raises(HistobenchError, match="nope"):
        AttentionAnalysis(segmenter="nope")
    with pytest.raises(HistobenchError, match="min_area"):
        AttentionAnalysis(segmenter="oracle", segmenter_options={"min_area": -1})


# ------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def work(tmp_path_factory, vits):
    """A work directory and MLflow store for the module, and the two ViTs' weight files."""
    tmp = tmp_path_factory.mktemp("attention")
    paths = []
    for name in ("peaked", "uniform"):
        paths.append(tmp / f"{name}.pt")
        torch.save(vits[name][1].state_dict(), paths[-1])
    return tmp / "work", f"sqlite:///{tmp / 'mlflow.db'}", paths


def _analyze(work, *extra):
    workdir, uri, (a, b) = work
    args = ["analyze", "attention", "--weights", str(a), "--weights", str(b), "--encoder", "timm", *TASK,
            "--tiles", str(N_TILES), "--workdir", str(workdir), "--tracking-uri", uri, *extra]
    result = runner.invoke(build_app(), args, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    run_id = re.search(r"MLflow run (\w+)", result.output).group(1)
    report = json.loads((workdir / "analyses" / f"attention-{run_id}" / "report.json").read_text())
    return result.output, run_id, report


def _printed(output: str, name: str) -> float:
    return float(re.search(rf"│ {re.escape(name)} +│ +(\S+) │", output).group(1))


def test_the_cli_prints_and_logs_metrics_p_values_and_overlays(work, tmp_path):
    from histobench.tracking import download_artifact, get_run

    output, run_id, report = _analyze(work)
    metrics = report["metrics"]
    assert _printed(output, "entropy/uniform") == pytest.approx(1.0)
    assert _printed(output, "entropy/peaked") == pytest.approx(metrics["entropy/peaked"], rel=1e-3)
    assert metrics["entropy/peaked"] < 0.9
    assert _printed(output, "mass_coverage_0.6/uniform") == pytest.approx(39 / 64, rel=1e-3)
    p = _printed(output, "wilcoxon_p/entropy/peaked_vs_uniform")
    assert p == pytest.approx(metrics["wilcoxon_p/entropy/peaked_vs_uniform"], rel=1e-3) and p < 0.05
    assert metrics["median_diff/entropy/peaked_vs_uniform"] < 0
    assert "prior_kl/peaked" not in metrics and report["report"]["prior"] is None
    assert report["tile_set"]["n"] == N_TILES and report["options"]["segmenter"] == "none"

    run = get_run(run_id, work[1])
    assert run["tags"]["histobench.analysis"] == "attention" and run["params"]["analysis.segmenter"] == "none"
    for key in ("entropy/peaked", "gini/uniform", "head_js/peaked", "wilcoxon_p/gini/peaked_vs_uniform"):
        assert run["metrics"][key] == pytest.approx(metrics[key])
    for name in ("attention_overlay_peaked.png", "attention_overlay_uniform.png"):
        assert download_artifact(run_id, name, tmp_path / "dl", work[1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tiles_csv = download_artifact(run_id, "attention_tiles.csv", tmp_path / "dl", work[1]).read_text().splitlines()
    assert len(tiles_csv) == N_TILES + 1 and tiles_csv[0].startswith("slide_id,x,y,peaked:entropy")


def test_the_oracle_segmenter_adds_prior_coverage(work):
    from histobench.tracking import get_run

    output, run_id, report = _analyze(work, "-o", "analysis.segmenter=oracle", "-o", "analysis.overlay_tiles=0")
    metrics = report["metrics"]
    prior = report["report"]["prior"]
    assert prior["segmenter"] == "oracle" and prior["segmented"] == N_TILES and prior["failed"] == []
    assert prior["groups"][0] == "no nucleus" and len(prior["groups"]) == 4  # the demo's three cell types
    assert 0 < prior["area_share"][0] < 1 and sum(prior["area_share"]) == pytest.approx(1, abs=1e-4)
    # uniform attention gives every group exactly its area: KL 0, and every group over 5 % of the area counts
    assert metrics["prior_kl/uniform"] == pytest.approx(0, abs=1e-9)
    assert _printed(output, "prior_kl/peaked") == pytest.approx(metrics["prior_kl/peaked"], rel=1e-3)
    assert metrics["prior_kl/peaked"] > 0.01
    assert 1 <= metrics["prior_groups/uniform"] <= 4 and metrics["prior_groups/peaked"] >= 1
    test = next(t for t in report["report"]["tests"] if t["metric"] == "prior_kl")
    assert test["direction"] == ">" and test["p"] < 0.05
    assert get_run(run_id, work[1])["metrics"]["prior_kl/peaked"] == pytest.approx(metrics["prior_kl/peaked"])
    assert not list((work[0] / "analyses" / f"attention-{run_id}").glob("*.png"))  # overlay_tiles=0


class OwnProcessOracle(OracleSegmenter):
    """The oracle as a segmenter that must run in its own process (as StarDist does); fails on ``x == -1``."""

    name = "oracle-own-process"
    own_process = True

    def segment(self, tile, ref=None):
        if ref.x == -1:
            raise ValueError("no such tile")
        return super().segment(tile, ref)


def test_an_own_process_segmenter_runs_in_a_worker_and_records_failed_tiles(work):
    from dataclasses import replace

    from histobench.analyses.attention import segment_tiles
    from histobench.analyze.tiles import held_out_tiles
    from histobench.registry import create

    task = create("task", "tcga-nsclc", {"demo_patients": 4, "demo_slide_px": 1024}, "demo")
    tiles, refs, _ = held_out_tiles(task, True, None, work[0], N_TILES, seed=0)  # cached by the CLI tests
    hwc = tiles[:4].permute(0, 2, 3, 1).numpy()
    here, failed = segment_tiles(OracleSegmenter(), hwc, refs[:4])
    assert failed == [] and sum(int(inst.max()) for inst, _ in here) > 0
    refs = [refs[0], replace(refs[1], x=-1), refs[2], refs[3]]
    there, failed = segment_tiles(OwnProcessOracle(), hwc, refs)
    assert failed == [(1, "ValueError: no such tile")] and there[1] is None
    for i in (0, 2, 3):
        assert np.array_equal(there[i][0], here[i][0]) and np.array_equal(there[i][1], here[i][1])
