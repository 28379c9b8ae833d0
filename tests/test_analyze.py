"""`histobench analyze`: the held-out tile set, loading encoders from runs and files, the runner, the CLI.

The analysis under test is the example plugin's toy ``feature-norms`` (mean and sd of the embeddings' L2 norms);
its values are checked against norms computed here directly from the same tiles and weights.
"""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from histobench.cli.app import build_app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASK = ["--task", "tcga-nsclc", "--demo", "-o", "task.demo_patients=4", "-o", "task.demo_slide_px=1024"]
N_TILES = 24


@pytest.fixture
def example(register_plugin):
    """The example plugin package (tests/example_plugin), registered for one test."""
    path = str(REPO / "tests" / "example_plugin")
    if path not in sys.path:
        sys.path.insert(0, path)
    import histobench_example

    register_plugin(histobench_example, "example")
    return histobench_example


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One work directory and MLflow store for the module (the held-out cohort is generated once)."""
    tmp = tmp_path_factory.mktemp("analyze")
    return tmp / "work", f"sqlite:///{tmp / 'mlflow.db'}"


def _task():
    from histobench.registry import create

    return create("task", "tcga-nsclc", {"demo_patients": 4, "demo_slide_px": 1024}, "demo")


def _tiny_encoder(seed: int, scale: float = 1.0):
    """The timm demo ViT built after seeding ``seed``; ``scale`` multiplies its final LayerNorm's weight (a random
    ViT's embeddings all have norm ~sqrt(D) after that norm, so this is what makes two encoders' norms differ)."""
    from histobench.registry import create

    comp = create("encoder", "timm", None, "demo")
    torch.manual_seed(seed)
    module = comp.build().eval()
    with torch.no_grad():
        module.model.norm.weight.mul_(scale)
    return comp, module


def _norms(comp, module, tiles) -> np.ndarray:
    from histobench.features.extract import prepare_pixels

    with torch.inference_mode():
        return module(prepare_pixels(tiles, comp.transform())).double().norm(dim=1).numpy()


def _analyze(args, work, cols="300"):
    workdir, uri = work
    return runner.invoke(build_app(), ["analyze", *args, "--workdir", str(workdir), "--tracking-uri", uri],
                         env={"COLUMNS": cols})


def _run_id(output: str) -> str:
    return re.search(r"MLflow run (\w+)", output).group(1)


def _error_line(result) -> str:
    """The one error line of a failed command (progress lines drawn before it may precede it)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.output
    return lines[-1]


def _report(work, run_id: str) -> dict:
    return json.loads((work[0] / "analyses" / f"feature-norms-{run_id}" / "report.json").read_text())


def test_held_out_tiles_are_fixed_cached_and_seeded(work):
    from histobench.analyze.tiles import HELD_OUT_SEED, held_out_tiles

    workdir = work[0]
    tiles, refs, h = held_out_tiles(_task(), True, None, workdir, N_TILES, seed=0)
    assert tiles.dtype == torch.uint8 and tuple(tiles.shape) == (N_TILES, 3, 64, 64)
    assert len(refs) == N_TILES and all(r.slide_id.startswith("HELDOUT-DEMO-") for r in refs)
    assert (workdir / "analysis-tiles" / f"{h}.npz").is_file()
    # the held-out cohort is another synthetic cohort than the runs' (seed 0), under its own folder
    assert json.loads((workdir / "demo" / "tcga-nsclc-held-out" / "demo_params.json").read_text())["seed"] == HELD_OUT_SEED
    again, refs2, h2 = held_out_tiles(_task(), True, None, workdir, N_TILES, seed=0)
    assert h2 == h and refs2 == refs and torch.equal(again, tiles)
    # the tiles are the slide's pixels where the refs say
    from histobench.slides.reader import open_slide
    from histobench.slides.tiling import resize_tile

    r = refs[5]
    with open_slide(r.path) as slide:
        direct = resize_tile(slide.read_region(r.x, r.y, r.level, r.read_size, r.read_size), r.tile_size)
    assert np.array_equal(direct.transpose(2, 0, 1), tiles[5].numpy())
    other, refs3, h3 = held_out_tiles(_task(), True, None, workdir, N_TILES, seed=1)
    assert h3 != h and refs3 != refs and not torch.equal(other, tiles)
    fewer, _, h4 = held_out_tiles(_task(), True, None, workdir, 10, seed=0)
    assert h4 != h and len(fewer) == 10


def test_weights_files_through_the_cli(work, tmp_path, example):
    from histobench.analyze.tiles import held_out_tiles
    from histobench.tracking import download_artifact, get_run, search_runs

    paths = []
    for name, seed in (("enc-a", 1), ("enc-b", 2)):
        _, module = _tiny_encoder(seed, scale=seed)
        paths.append(tmp_path / f"{name}.pt")
        torch.save(module.state_dict(), paths[-1])
    result = _analyze(["feature-norms", *TASK, "--tiles", str(N_TILES), "--weights", str(paths[0]),
                       "--weights", str(paths[1]), "-o", "analysis.batch_size=7"], work)
    assert result.exit_code == 0, result.output
    assert "norm_mean/enc-a" in result.output and "norm_sd/enc-b" in result.output
    run_id = _run_id(result.output)

    tiles, _, tile_hash = held_out_tiles(_task(), True, None, work[0], N_TILES, seed=0)
    report = _report(work, run_id)
    assert report["tile_set"] == {"hash": tile_hash, "n": N_TILES, "seed": 0}
    assert [e["label"] for e in report["encoders"]] == ["enc-a", "enc-b"]
    assert [e["source"] for e in report["encoders"]] == [str(p) for p in paths]
    means = []
    for row, seed in zip(report["report"]["encoders"], (1, 2)):
        comp, module = _tiny_encoder(seed, scale=seed)
        norms = _norms(comp, module, tiles)
        assert row["tiles"] == N_TILES and row["dim"] == 96
        assert row["norm_mean"] == pytest.approx(norms.mean(), rel=1e-5)
        assert row["norm_sd"] == pytest.approx(norms.std(ddof=1), rel=1e-4)
        assert report["metrics"][f"norm_mean/{row['label']}"] == pytest.approx(norms.mean(), rel=1e-5)
        means.append(norms.mean())
    assert 1.9 < means[1] / means[0] < 2.1  # two different encoders: b's final norm has twice a's scale

    run = get_run(run_id, work[1])
    assert run["name"] == "analysis feature-norms" and run["experiment"] == "tcga-nsclc"
    assert run["tags"]["histobench.stage"] == "analysis"
    assert run["tags"]["histobench.analysis"] == "feature-norms"
    assert run["tags"]["histobench.tile_set_hash"] == tile_hash
    assert run["tags"]["histobench.analysed_runs"] == ""  # plain files: no run
    assert run["params"]["analysis.batch_size"] == "7" and run["params"]["encoders.1.label"] == "enc-b"
    assert run["metrics"]["norm_mean/enc-a"] == pytest.approx(means[0], rel=1e-5)
    png = download_artifact(run_id, "feature_norms.png", tmp_path / "dl", work[1])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = download_artifact(run_id, "norms.csv", tmp_path / "dl", work[1]).read_text().splitlines()
    assert len(csv) == N_TILES + 1 and csv[0] == "slide_id,x,y,enc-a,enc-b"
    # an analysis never reaches the leaderboard, which reads stage `run` parent runs
    assert [r["run_id"] for r in search_runs("tcga-nsclc", work[1], stage="analysis")] == [run_id]
    assert all(r["run_id"] != run_id for r in search_runs("tcga-nsclc", work[1], stage="run"))


@pytest.fixture(scope="module")
def demo_run(work):
    """A finished `histobench run --pretext none` on the demo (small settings), in the module's store."""
    workdir, uri = work
    args = ["run", "--pretext", "none", "--task", "tcga-nsclc", "--demo", "--workdir", str(workdir), "--tracking-uri", uri,
            "-o", "task.demo_patients=4", "-o", "task.demo_slide_px=1024", "-o", "task.folds=2", "-o", "eval.epochs=2", "-o", "eval.min_test_per_class=0",
            "--seed", "3"]
    result = runner.invoke(build_app(), args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return _run_id(result.output)


def test_a_finished_run_is_rebuilt_with_its_seed(work, demo_run, example):
    from histobench.analyze.tiles import held_out_tiles
    from histobench.leaderboard import build_leaderboard
    from histobench.tracking import get_run, search_runs

    result = _analyze(["feature-norms", *TASK, "--tiles", str(N_TILES), "--run", demo_run], work)
    assert result.exit_code == 0, result.output
    run_id = _run_id(result.output)
    report = _report(work, run_id)
    name = get_run(demo_run, work[1])["name"]
    assert report["encoders"] == [{"label": f"{name}:{demo_run[:8]}", "encoder": "timm", "source": demo_run,
                                   "run_id": demo_run}]
    tiles, _, _ = held_out_tiles(_task(), True, None, work[0], N_TILES, seed=0)
    comp, module = _tiny_encoder(3)  # `run --pretext none --seed 3` evaluated the encoder built after seeding 3
    assert report["report"]["encoders"][0]["norm_mean"] == pytest.approx(_norms(comp, module, tiles).mean(), rel=1e-5)
    tags = get_run(run_id, work[1])["tags"]
    assert tags["histobench.stage"] == "analysis" and tags["histobench.analysed_runs"] == demo_run
    assert [r["run_id"] for r in search_runs("tcga-nsclc", work[1], stage="run")] == [demo_run]
    assert len(build_leaderboard("tcga-nsclc", work[1])) == 1  # the run; no analysis row


def _fake_pretrained_run(uri: str, tmp_path: Path, with_weights: bool, seed: int = 0) -> tuple[str, dict]:
    """A `histobench run` as MLflow stores it (params, config.json, nested pretrain run with encoder.pt),
    logged directly: the cheap stand-in for a run with pretraining."""
    from histobench.tracking import Tracker, write_json

    comp, module = _tiny_encoder(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(1.5)  # "pretrained": other weights than a fresh build
    tracker = Tracker(uri)
    with tracker.run("tcga-nsclc", "dino+timm+abmil-demo", stage="run") as run_id:
        tracker.params({"run": {"pretext": "dino", "seed": seed, "demo": True}})
        write_json({"spec": {}, "resolved": {"encoder": {"name": "timm", **comp.options.model_dump()}}},
                   tmp_path / "config.json")
        tracker.artifact(tmp_path / "config.json")
        with tracker.run("tcga-nsclc", "pretrain dino", stage="pretrain", nested=True):
            if with_weights:
                torch.save(module.state_dict(), tmp_path / "encoder.pt")
                tracker.artifact(tmp_path / "encoder.pt", "encoder")
    return run_id, module.state_dict()


def test_a_pretrained_run_loads_its_pretrain_weights(tracking_uri, tmp_path):
    from histobench.analyze.encoders import from_run

    run_id, state = _fake_pretrained_run(tracking_uri, tmp_path, with_weights=True)
    enc = from_run(run_id, torch.device("cpu"), tracking_uri)
    assert enc.run_id == run_id and enc.label == f"dino+timm+abmil-demo:{run_id[:8]}" and not enc.module.training
    loaded = enc.module.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_run_without_its_weights_is_a_one_line_error(work, tracking_uri, tmp_path, example):
    run_id, _ = _fake_pretrained_run(tracking_uri, tmp_path, with_weights=False)
    result = _analyze(["feature-norms", *TASK, "--run", run_id], (work[0], tracking_uri))
    line = _error_line(result)
    assert f"run {run_id}: its pretrain run" in line and "encoder/encoder.pt" in line


@pytest.mark.parametrize("args, needle", [
    ([], "takes 1 to 4 encoders, got 0 (pass --run RUN_ID or --weights FILE)"),
    ([a for i in range(5) for a in ("--weights", f"w{i}.pt")], "takes 1 to 4 encoders, got 5"),
    (["--run", "0123456789abcdef0123456789abcdef"], "no MLflow run '0123456789abcdef0123456789abcdef'"),
    (["--weights", "missing.pt"], "weights file missing.pt does not exist"),
    (["--weights", "x.pt", "-o", "pretext.k=3"], "not pretext"),
    (["--run", "x", "-o", "encoder.img_size=32"], "no --weights was given"),
    (["--weights", "x.pt", "-o", "analysis.batch_size=0"], "option analysis.batch_size=0"),
])
def test_user_mistakes_are_one_line_errors(work, example, args, needle):
    result = _analyze(["feature-norms", *TASK, *args], work, cols="400")
    assert needle in _error_line(result)


def test_weights_that_do_not_fit_name_the_file(work, tmp_path, example):
    bad = tmp_path / "other.pt"
    torch.save({"not_a_layer.weight": torch.zeros(3)}, bad)
    result = _analyze(["feature-norms", *TASK, "--weights", str(bad)], work, cols="400")
    assert f"weights file {bad} does not fit encoder 'timm'" in _error_line(result)


def test_unknown_analysis_is_a_one_line_error(work):
    result = _analyze(["no-such-analysis", *TASK, "--weights", "x.pt"], work, cols="400")
    assert "unknown analysis 'no-such-analysis'" in _error_line(result)


class _Probe:
    """A throwaway plugin with an analysis that writes a file in a sub-folder and names it relatively."""

    from histobench import hookimpl

    @staticmethod
    @hookimpl
    def register_analyses(register):
        from histobench.analyze import AnalysisResult
        from histobench.components import Analysis

        class Probe(Analysis):
            """Writes sub/probe.txt; metric names with characters MLflow refuses; or returns a wrong type."""

            name = "probe"
            max_encoders = 1

            class Options(Analysis.Options):
                broken: bool = False

            def run(self, inputs):
                if self.options.broken:
                    return {"metrics": {}}
                (inputs.out_dir / "sub").mkdir()
                (inputs.out_dir / "sub" / "probe.txt").write_text(f"{len(inputs.tiles)} tiles")
                px = inputs.pixels(inputs.encoders[0], slice(0, 2))
                return AnalysisResult(metrics={"mean+px [a]": float(px.mean()), "n": len(inputs.tiles)},
                                      report={"shape": list(px.shape)}, files=["sub/probe.txt"])

        register(Probe)


def test_runner_relative_workdir_files_and_metric_names(tmp_path, tracking_uri, register_plugin, monkeypatch):
    from histobench.analyze.runner import run_analysis
    from histobench.errors import HistobenchError
    from histobench.registry import create
    from histobench.tracking import download_artifact, get_run

    register_plugin(_Probe(), "probe-plugin")
    monkeypatch.chdir(tmp_path)
    comp, module = _tiny_encoder(0)
    from histobench.analyze import AnalysedEncoder

    enc = AnalysedEncoder("e", module, comp, "e.pt")
    tiles = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    out = run_analysis(create("analysis", "probe"), [enc], tiles, [None] * 5, "h123", task="tcga-nsclc",
                       workdir=Path("w"), device=torch.device("cpu"), tracking_uri=tracking_uri)
    assert out.out_dir.is_absolute() and out.out_dir.parent == tmp_path / "w" / "analyses"
    assert set(out.metrics) == {"mean_px _a_", "n"} and out.metrics["n"] == 5.0
    report = json.loads((out.out_dir / "report.json").read_text())
    assert report["report"] == {"shape": [2, 3, 64, 64]}  # resized to the encoder's 64 px
    run = get_run(out.run_id, tracking_uri)
    assert run["metrics"]["mean_px _a_"] == pytest.approx(out.metrics["mean_px _a_"])
    text = download_artifact(out.run_id, "sub/probe.txt", tmp_path / "dl", tracking_uri).read_text()
    assert text == "5 tiles"
    with pytest.raises(HistobenchError, match="returned dict, not an AnalysisResult"):
        run_analysis(create("analysis", "probe", {"broken": True}), [enc], tiles, [None] * 5, "h123", task="tcga-nsclc",
                     workdir=Path("w"), device=torch.device("cpu"), track=False)
    with pytest.raises(HistobenchError, match=r"takes exactly 1 encoder, got 2$"):
        run_analysis(create("analysis", "probe"), [enc, enc], tiles, [None] * 5, "h123", task="tcga-nsclc",
                     workdir=Path("w"), device=torch.device("cpu"), track=False)


def test_real_data_holds_out_fold_0s_test_patients(tmp_path):
    """Without --demo the held-out slides are the test patients of fold 0 of the task's own splits."""
    from histobench.analyze.tiles import held_out_manifest
    from histobench.cohorts.splits import task_splits
    from histobench.components import Task
    from histobench.reporting import Reporter
    from histobench.slides.synthetic import make_demo_cohort

    class Cohort(Task):
        """A task whose 'real' cohort is a small synthetic one under the data root."""

        name = "held-out-probe"
        classes = ("LUAD", "LUSC")

        def cohort(self, data_root):
            df = make_demo_cohort(data_root, classes=list(self.classes), n_patients=9, seed=0, size=(512, 512))
            return df.assign(path=[str(Path(data_root) / p) for p in df["path"]])

    task = Cohort({"folds": 3})
    (tmp_path / "data").mkdir()
    held = held_out_manifest(task, False, tmp_path / "data", tmp_path / "work", Reporter())
    manifest = task.cohort(tmp_path / "data")
    test = task_splits(task, manifest, workdir=tmp_path / "work", seed=0).cases(0, "test")
    assert sorted(held["case_id"].unique()) == test and 0 < len(test) < 9
    assert sorted(held["slide_id"]) == sorted(manifest.loc[manifest["case_id"].isin(test), "slide_id"])
