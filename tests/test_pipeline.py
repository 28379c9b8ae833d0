"""End to end: `histobench run --demo` through the CLI, MLflow's run tree, the leaderboard, resumed stages."""

import pandas as pd
import pytest
from typer.testing import CliRunner

from histobench.cli.app import build_app

runner = CliRunner()

SMALL = ["-o", "task.demo_patients=12", "-o", "task.demo_slide_px=1536", "-o", "task.folds=3", "-o", "eval.epochs=8"]


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    common = ["--task", "tcga-nsclc", "--demo", "--workdir", str(tmp / "work"), "--tracking-uri", uri, *SMALL]
    dino = runner.invoke(build_app(), ["run", "--pretext", "dino", *common, "-o", "train.epochs=1"], env={"COLUMNS": "200"})
    none = runner.invoke(build_app(), ["run", "--pretext", "none", *common], env={"COLUMNS": "200"})
    return tmp, uri, dino, none


def test_run_prints_folds_and_mean(demo_runs):
    _, _, dino, none = demo_runs
    for result in (dino, none):
        assert result.exit_code == 0, result.output
        assert "mean ± sd" in result.output and "95% CI" in result.output
        assert "macro_auc" in result.output
        for fold in range(3):
            assert f"\n│ {fold}" in result.output or f"│ {fold} " in result.output


def test_mlflow_has_parent_and_nested_runs(demo_runs):
    import mlflow
    from mlflow.tracking import MlflowClient

    _, uri, _, _ = demo_runs
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name("tcga-nsclc")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("histobench.stage") == "run"]
    assert len(parents) == 2
    dino_parent = next(r for r in parents if r.data.params["run.pretext"] == "dino")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == dino_parent.info.run_id]
    stages = sorted(r.data.tags["histobench.stage"] for r in children)
    assert stages == ["extract", "fold", "fold", "fold", "pretrain"]
    p, t, m = dino_parent.data.params, dino_parent.data.tags, dino_parent.data.metrics
    assert p["pretext.name"] == "dino" and p["train.epochs"] == "1" and p["task.folds"] == "3"
    assert len(t["histobench.git_sha"]) >= 7 and t["histobench.split_hash"] and t["histobench.weights_hash"]
    assert t["histobench.plugin.pretext"].startswith("dino histobench==")
    assert 0.0 <= m["macro_auc_mean"] <= 1.0 and m["macro_auc_pooled_ci_low"] <= m["macro_auc_pooled"] <= m["macro_auc_pooled_ci_high"]
    fold_aucs = [r.data.metrics["macro_auc"] for r in children if r.data.tags["histobench.stage"] == "fold"]
    assert abs(sum(fold_aucs) / 3 - m["macro_auc_mean"]) < 1e-9
    # both runs were evaluated on the same folds
    none_parent = next(r for r in parents if r.data.params["run.pretext"] == "none")
    assert none_parent.data.tags["histobench.split_hash"] == t["histobench.split_hash"]


def test_leaderboard_lists_both_runs(demo_runs):
    tmp, uri, _, _ = demo_runs
    out = tmp / "results"
    result = runner.invoke(build_app(), ["leaderboard", "--task", "tcga-nsclc", "--tracking-uri", uri, "--out", str(out)],
                           env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out / "tcga-nsclc.csv")
    assert sorted(df["pretext"]) == ["dino", "none"]
    assert list(df["rank"]) == [1, 2]
    scores = [float(s.split(" ± ")[0]) for s in df["macro_auc"]]
    assert scores == sorted(scores, reverse=True)
    md = (out / "tcga-nsclc.md").read_text()
    assert "| rank |" in md and "dino" in md and "do not edit by hand" in md


def test_rerun_reuses_cached_stages(demo_runs):
    tmp, uri, _, _ = demo_runs
    common = ["--task", "tcga-nsclc", "--demo", "--workdir", str(tmp / "work"), "--tracking-uri", uri, *SMALL]
    result = runner.invoke(build_app(), ["extract", *[c for c in common if c not in ("--tracking-uri", uri)]],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "0 slides extracted" in result.output
    # `extract --weights` of `run`'s own pretraining finds the features `run` extracted with those weights
    weights = next((tmp / "work" / "pretrain").glob("dino-*/encoder.pt"))
    result = runner.invoke(build_app(), ["extract", "--weights", str(weights),
                                         *[c for c in common if c not in ("--tracking-uri", uri)]], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "0 slides extracted" in result.output


def test_slpd_region_path_end_to_end(tmp_path):
    """SLPD through the CLI: regions -> frozen patch grids -> SLPD on the one loop -> region bags -> folds."""
    import h5py
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--task", "tcga-nsclc", "--demo", "--workdir", str(tmp_path / "work"), "--tracking-uri", uri,
              "-o", "task.demo_patients=8", "-o", "task.folds=2", "-o", "eval.epochs=5"]
    result = runner.invoke(build_app(), ["run", "--pretext", "slpd", *common, "-o", "train.epochs=4"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "mean ± sd" in result.output
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name("tcga-nsclc")
    runs = client.search_runs([exp.experiment_id])
    pre = next(r for r in runs if r.data.tags.get("histobench.stage") == "pretrain")
    # clustering ran after the warm-up (demo warm_epoch 2 < 3 = the last epoch) and logged its diagnostics
    eligible = [m.value for m in client.get_metric_history(pre.info.run_id, "epoch/eligible_slides")]
    assert eligible and all(v >= 1 for v in eligible)
    parent = next(r for r in runs if r.data.tags.get("histobench.stage") == "run")
    assert parent.data.params["encoder.name"] == "hipt-vit4k" and parent.data.params["run.pretext"] == "slpd"
    feature_dirs = list((tmp_path / "work" / "features").glob("hipt-vit4k*"))
    assert len(feature_dirs) == 1
    files = sorted(feature_dirs[0].glob("*.h5"))
    assert files
    with h5py.File(files[0]) as f:
        assert f["features"].shape[1] == 64  # the demo region encoder's width
        assert f["features"].shape[0] == f["coords"].shape[0] >= 1
        assert f.attrs["tile_size"] == 8 * 64  # a region is 8 x 8 patches of 64 px
    # the random-init region encoder baseline reuses the cached regions and patch grids
    base = runner.invoke(build_app(), ["run", "--pretext", "none", "--encoder", "hipt-vit4k", *common], env={"COLUMNS": "200"})
    assert base.exit_code == 0, base.output


def test_pretext_and_encoder_kinds_must_match(tmp_path):
    result = runner.invoke(build_app(), ["run", "--pretext", "slpd", "--encoder", "timm", "--task", "tcga-nsclc", "--demo",
                                         "--workdir", str(tmp_path)], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert "pretext 'slpd' needs region grids but encoder 'timm' takes pixels; try --encoder hipt-vit4k" in result.output


def test_run_skips_a_corrupt_slide_and_fail_fast_stops(tmp_path):
    """A truncated slide is recorded in status.csv and skipped; --fail-fast stops on it, naming it, and keeps files."""
    work = tmp_path / "work"
    args = ["--task", "tcga-nsclc", "--demo", "--workdir", str(work), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
            "-o", "task.demo_patients=8", "-o", "task.folds=2", "-o", "eval.epochs=2"]
    # make the demo cohort, then truncate one slide as an interrupted download would
    from histobench.registry import create

    task = create("task", "tcga-nsclc", {"demo_patients": 8}, preset="demo")
    manifest = task.demo_cohort(work / "demo" / "tcga-nsclc", seed=0)
    victim = manifest.iloc[3]
    data = open(victim["path"], "rb").read()
    open(victim["path"], "wb").write(data[: len(data) // 3])

    stopped = runner.invoke(build_app(), ["run", *args, "--fail-fast"], env={"COLUMNS": "300"})
    assert stopped.exit_code == 2
    assert f"slide {victim['slide_id']}" in stopped.output and "--fail-fast" in stopped.output
    tiled_before = sorted(p.name for p in (work / "tiles").rglob("*.npz"))
    assert tiled_before  # what was tiled before the stop is kept

    result = runner.invoke(build_app(), ["run", *args], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    status = pd.read_csv(work / "status.csv")
    bad = status[status["slide_id"] == victim["slide_id"]]
    assert set(bad["status"]) == {"skipped"} and bad["reason"].str.len().min() > 0
    assert (status[status["slide_id"] != victim["slide_id"]]["status"] == "ok").all()
    assert set(tiled_before) <= {p.name for p in (work / "tiles").rglob("*.npz")}


def test_single_stage_commands_take_the_region_path(tmp_path):
    """`pretrain --pretext slpd` defaults to the pretext's region encoder; `extract` encodes regions for it."""
    common = ["--task", "tcga-nsclc", "--demo", "--workdir", str(tmp_path / "work"), "-o", "task.demo_patients=6"]
    pre = runner.invoke(build_app(), ["pretrain", "--pretext", "slpd", *common, "-o", "train.epochs=3"],
                        env={"COLUMNS": "300"})
    assert pre.exit_code == 0, pre.output
    weights = next((tmp_path / "work" / "pretrain").glob("slpd-*/encoder.pt"))
    assert "encoder weights:" in pre.output
    ext = runner.invoke(build_app(), ["extract", "--encoder", "hipt-vit4k", "--weights", str(weights), *common],
                        env={"COLUMNS": "300"})
    assert ext.exit_code == 0, ext.output
    assert "regions encoded" in ext.output
    # named after the pretraining, as `run` names it: a later `run` finds these features
    assert len(list((tmp_path / "work" / "features").glob(f"hipt-vit4k-{weights.parent.name}-*/*.h5"))) >= 1


def test_regenerated_slides_are_tiled_and_extracted_again(tmp_path):
    """Caches follow slide content: the same slide ids with other pixels (another demo signal fraction in the
    same workdir) get new tiles and new features, and the unchanged cohort then reuses both."""
    common = ["--task", "tcga-nsclc", "--demo", "--workdir", str(tmp_path / "work"), "-o", "task.demo_patients=4",
              "-o", "task.demo_slide_px=1024"]

    def extract(fraction):
        result = runner.invoke(build_app(), ["extract", *common, "-o", f"task.demo_signal_fraction={fraction}"],
                               env={"COLUMNS": "300"})
        assert result.exit_code == 0, result.output
        return result.output

    first = extract(0.35)
    n = int(first.split(" slides extracted")[0].split()[-1])
    assert n >= 4 and f"{n} slides extracted, 0 cached" in first
    assert f"{n} slides extracted, 0 cached" in extract(0.1)  # new pixels under the same slide ids
    assert f"0 slides extracted, {n} cached" in extract(0.1)
