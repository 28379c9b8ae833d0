"""Named evaluation protocols end to end: a third-party protocol through `histobench run --protocol`, its
leaderboard rows apart from frozen-mil, folds made before pretraining, and the pretraining cohort."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar

import pytest
from typer.testing import CliRunner

from histobench import hookimpl
from histobench.cli.app import build_app
from histobench.components import Pretext, StrictOptions
from histobench.plugins import load_plugins

REPO = Path(__file__).resolve().parents[1]
SMALL = ["-o", "task.demo_patients=12", "-o", "task.demo_slide_px=1536", "-o", "task.folds=3", "-o", "eval.epochs=4",
         "-o", "eval.bootstrap=50"]
runner = CliRunner()


class SplitsFirst(Pretext):
    """Records, when pretraining starts, which split files exist and which slides it trains on."""

    name = "test-splits-first"
    workdir: ClassVar[Path | None] = None
    splits_at_setup: ClassVar[list[str]] = []
    slides_seen: ClassVar[tuple[str, ...]] = ()
    train_presets = {"demo": {"epochs": 1, "batch_size": 16, "num_workers": 0, "warmup_epochs": 0}}

    class Options(StrictOptions):
        pass

    def setup(self, encoder, ctx):
        self.encoder = encoder
        type(self).splits_at_setup = sorted(p.name for p in (self.workdir / "splits").glob("*.csv"))
        type(self).slides_seen = ctx.cohort.slide_ids

    def student_modules(self):
        return {"encoder": self.encoder}

    def training_step(self, batch, step):
        return {"loss": self.encoder(batch["images"].float() / 255.0).pow(2).mean()}

    def state_dict(self):
        return {"encoder": self.encoder.state_dict()}

    def load_state_dict(self, state):
        self.encoder.load_state_dict(state["encoder"])

    def trained_encoder(self):
        return self.encoder


class _Plugin:
    @hookimpl
    def register_pretexts(self, register):
        register(SplitsFirst)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A frozen-mil run and a frozen-mean run (the example plugin's protocol) of the same features."""
    path = str(REPO / "tests" / "example_plugin")
    if path not in sys.path:
        sys.path.insert(0, path)
    import histobench_example

    pm = load_plugins()
    pm.register(histobench_example, name="example-protocols")
    tmp = tmp_path_factory.mktemp("protocols")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    common = ["run", "--pretext", "none", "--task", "tcga-nsclc", "--demo", "--workdir", str(tmp / "work"),
              "--tracking-uri", uri, *SMALL]
    try:
        default = runner.invoke(build_app(), common, env={"COLUMNS": "200"})
        mean = runner.invoke(build_app(), [*common, "--protocol", "frozen-mean", "-o", "eval.standardise=true"],
                             env={"COLUMNS": "200"})
        yield tmp, uri, default, mean
    finally:
        pm.unregister(name="example-protocols")


def test_a_plugin_protocol_runs_and_is_recorded(runs):
    import mlflow

    _, uri, default, mean = runs
    assert default.exit_code == 0, default.output
    assert mean.exit_code == 0, mean.output
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("tcga-nsclc")
    parents = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("histobench.stage") == "run"]
    by_protocol = {r.data.tags["histobench.protocol"]: r for r in parents}
    assert set(by_protocol) == {"frozen-mil", "frozen-mean"}
    m = by_protocol["frozen-mean"]
    assert m.data.params["protocol.name"] == "frozen-mean" and m.data.params["protocol.standardise"] == "True"
    usable = m.data.metrics["cohort/slides"] - m.data.metrics["cohort/slides_skipped"]
    assert m.data.metrics["protocol/slides_averaged"] == usable > 10  # the protocol's own metric reached the parent run
    assert m.data.tags["histobench.plugin.protocol"].startswith("example-protocols")
    # same folds for both protocols: the core made them
    assert m.data.tags["histobench.split_hash"] == by_protocol["frozen-mil"].data.tags["histobench.split_hash"]


def test_leaderboard_groups_rows_by_protocol(runs):
    from histobench.leaderboard import build_leaderboard

    _, uri, _, _ = runs
    board = build_leaderboard("tcga-nsclc", uri)
    assert len(board) == 2
    protocols = list(board["protocol"])
    assert protocols == ["frozen-mil", "frozen-mean"]  # frozen-mil's group first, each ranked on its own


def test_folds_exist_before_pretraining_and_the_pretrain_manifest_is_recorded(tmp_path, tracking_uri):
    import mlflow

    import shutil

    # the manifest's slides lie under its own folder (the data root); a path outside it is refused
    slide = shutil.copy(REPO / "tests" / "data" / "slides" / "CMU-1-Small-Region.svs", tmp_path)
    manifest = tmp_path / "pretrain.csv"
    manifest.write_text(f"slide_id,case_id,path\nCMU-1-Small-Region,CMU-1,{slide}\n")
    pm = load_plugins()
    pm.register(_Plugin(), name="test-protocols-2")
    SplitsFirst.workdir = tmp_path / "work"
    try:
        result = runner.invoke(build_app(), [
            "run", "--pretext", "test-splits-first", "--task", "tcga-nsclc", "--demo", "--workdir",
            str(tmp_path / "work"), "--tracking-uri", tracking_uri, *SMALL, "--pretrain-manifest", str(manifest),
            "-o", "train.max_tiles_per_slide=32"], env={"COLUMNS": "200"})
    finally:
        pm.unregister(name="test-protocols-2")
    assert result.exit_code == 0, result.output
    assert any(name.startswith("tcga-nsclc-") for name in SplitsFirst.splits_at_setup)
    assert SplitsFirst.slides_seen == ("CMU-1-Small-Region",)  # the manifest's slide, not the evaluation cohort
    client = mlflow.tracking.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("tcga-nsclc")
    parent = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("histobench.stage") == "run")
    assert parent.data.tags["histobench.pretrain_cohort"].startswith("manifest:pretrain.csv#")


def test_pretrain_task_reads_the_other_task_cohort(tmp_path, monkeypatch):
    from histobench.pipeline import RunSpec, pretrain_cohort, resolve, stages
    from histobench.reporting import Reporter

    asked = []
    monkeypatch.setattr(stages, "load_cohort", lambda spec, task, reporter, status=None: asked.append(task.name) or "brca")
    spec = RunSpec(task="tcga-nsclc", pretext="dino", demo=True, workdir=tmp_path, pretrain_task="tcga-brca")
    assert pretrain_cohort(spec, resolve(spec), "nsclc", Reporter()) == ("brca", "task:tcga-brca")
    assert asked == ["tcga-brca"]


def test_default_runs_say_pretraining_is_transductive(tmp_path, tracking_uri):
    from histobench.pipeline import RunSpec, pretrain_cohort, resolve
    from histobench.reporting import Reporter

    spec = RunSpec(task="tcga-nsclc", pretext="dino", demo=True, workdir=tmp_path)
    manifest = object()
    assert pretrain_cohort(spec, resolve(spec), manifest, Reporter()) == (manifest, "transductive")


def test_protocol_options_and_listing():
    result = runner.invoke(build_app(), ["protocols", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "frozen-mil" in result.output
