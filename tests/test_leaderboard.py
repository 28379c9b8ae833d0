"""`histobench leaderboard`: ranking, the top group, compute and provenance columns, md/csv/html outputs.

Runs are logged straight into a fresh SQLite MLflow store with :class:`histobench.tracking.Tracker`, with the
keys :func:`histobench.pipeline.run` and :func:`histobench.pipeline.log_evaluation` write; the HTML page is
rendered in headless Chromium when the binary is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pandas as pd
import pytest
from typer.testing import CliRunner

from histobench.cli.app import build_app
from histobench.tracking import Tracker

runner = CliRunner()
TASK = "tcga-nsclc"
METRICS = ("macro_auc", "balanced_accuracy", "weighted_f1")


def log_run(tracker: Tracker, pretext: str, auc: float, ci: tuple[float, float] | None, *, task: str = TASK,
            demo: bool = False, pretrain: bool = False, fail: bool = False, split_hash: str = "abc123",
            with_primary: bool = True) -> str:
    """One finished ``histobench run`` parent run (and its nested stages) as the pipeline logs it."""
    name = f"{pretext}+timm+abmil" + ("-demo" if demo else "")
    with tracker.run(task, name, stage="run", tags={"histobench.demo": demo}) as run_id:
        tracker.params({"run": {"pretext": pretext, "seed": 0, "demo": demo},
                        "encoder": {"name": "timm"}, "aggregator": {"name": "abmil"}})
        tracker.tags({"histobench.git_sha": "0123456789abcdef0123", "histobench.hw.device": "cpu",
                      "histobench.plugin.pretext": f"{pretext} histobench==0.1.0",
                      "histobench.plugin.task": "tcga histobench-tcga==0.1.0",
                      "histobench.plugins": json.dumps({"histobench": "0.1.0"})})
        if pretrain:
            with tracker.run(task, f"pretrain {pretext}", stage="pretrain", nested=True):
                tracker.metrics({"pretrain/images_per_second": 123.4})
        with tracker.run(task, "extract", stage="extract", nested=True):
            tracker.metrics({"extract/tiles_per_second": 456.7})
        tracker.tags({"histobench.split_hash": split_hash, "histobench.split_name": "default"})
        for k in range(3):
            with tracker.run(task, f"fold {k}", stage="fold", nested=True):
                tracker.metrics({"macro_auc": auc})
        summary = {}
        for i, metric in enumerate(METRICS):
            if metric == "macro_auc" and not with_primary:
                continue
            value = auc - 0.1 * i
            summary.update({f"{metric}_mean": value, f"{metric}_sd": 0.02, f"{metric}_pooled": value})
            if ci is not None:
                summary.update({f"{metric}_ci_low": ci[0] - 0.1 * i, f"{metric}_ci_high": ci[1] - 0.1 * i})
        tracker.metrics({**summary, "wall_seconds": 90.0})
        if fail:
            raise RuntimeError("the run broke at the end")
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("leaderboard")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tracker = Tracker(uri)
    ids = {
        "second": log_run(tracker, "none", 0.88, (0.80, 0.93)),  # CI reaches the top row's: top group
        "first": log_run(tracker, "dino", 0.90, (0.85, 0.95), pretrain=True),
        "last": log_run(tracker, "simclr", 0.70, (0.60, 0.80)),  # clearly worse
        "demo": log_run(tracker, "mae", 0.75, (0.70, 0.86), demo=True),
        "no_ci": log_run(tracker, "byol", 0.60, None),
    }
    with pytest.raises(RuntimeError):
        log_run(tracker, "broken", 0.99, (0.98, 1.0), fail=True)  # FAILED: never listed
    log_run(tracker, "unfinished", 0.95, (0.9, 0.97), with_primary=False)  # no primary metric: not listed
    log_run(tracker, "other-task", 0.99, (0.98, 1.0), task="tcga-brca")
    return tmp, uri, ids


def invoke(*args: str):
    return runner.invoke(build_app(), ["leaderboard", *args], env={"COLUMNS": "300"})


@pytest.fixture(scope="module")
def written(store):
    tmp, uri, ids = store
    out = tmp / "results"
    result = invoke("--task", TASK, "--format", "html", "--format", "md", "--format", "csv",
                    "--out", str(out), "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    return out, result, ids


def test_csv_ranks_runs_by_the_primary_metric(written):
    out, result, ids = written
    assert sorted(p.name for p in out.iterdir()) == [f"{TASK}.csv", f"{TASK}.html", f"{TASK}.md"]
    assert "written:" in result.output and "│" not in result.output  # no "table" format asked for
    df = pd.read_csv(out / f"{TASK}.csv", keep_default_na=False)
    assert list(df["run_id"]) == [ids[k] for k in ("first", "second", "demo", "last", "no_ci")]
    assert list(df["rank"]) == [1, 2, 3, 4, 5]
    assert list(df["pretext"]) == ["dino", "none", "mae", "simclr", "byol"]
    assert list(df["top group"]) == ["✓", "✓", "✓", "", ""]
    assert list(df["demo"]) == [False, False, True, False, False]
    first = df.iloc[0]
    assert first["macro_auc"] == "0.900 ± 0.020" and first["weighted_f1"] == "0.700 ± 0.020"
    assert first["macro_auc 95% CI"] == "[0.850, 0.950]" and df.iloc[4]["macro_auc 95% CI"] == ""
    cols = list(df.columns)
    assert cols.index("top group") == cols.index("macro_auc 95% CI") + 1
    # compute and provenance
    assert first["pretrain hours"].endswith("(CPU)") and float(first["pretrain img/s"]) == 123.4
    assert df.iloc[1]["pretrain hours"] == "" and df.iloc[1]["pretrain img/s"] == ""
    assert (df["extract tiles/s"].astype(float) == 456.7).all() and (df["minutes"].astype(float) == 1.5).all()
    assert (df["git_sha"] == "0123456789ab").all() and (df["split_hash"] == "abc123").all()
    assert first["plugins"] == "pretext=dino histobench==0.1.0; task=tcga histobench-tcga==0.1.0"
    assert (df["encoder"] == "timm").all() and (df["aggregator"] == "abmil").all()


def test_markdown_has_one_row_per_run(written):
    out, _, ids = written
    md = (out / f"{TASK}.md").read_text()
    assert md.startswith(f"# {TASK} leaderboard") and "do not edit by hand" in md
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| rank | pretext |") and len(lines) == 1 + len(ids)
    assert lines[1].startswith("| 1 | dino |") and ids["first"] in lines[1]


def test_no_demo_and_table_format(store):
    tmp, uri, ids = store
    out = tmp / "no-demo"
    result = invoke("--task", TASK, "--no-demo", "--format", "table", "--format", "csv", "--out", str(out),
                    "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out / f"{TASK}.csv")
    assert ids["demo"] not in set(df["run_id"]) and len(df) == 4
    assert f"{TASK} leaderboard (by macro_auc)" in result.output and "dino" in result.output
    assert not (out / f"{TASK}.md").exists()


def test_bad_format_empty_task_and_unknown_task(store):
    tmp, uri, _ = store
    result = invoke("--task", TASK, "--format", "pdf", "--tracking-uri", uri, "--out", str(tmp / "x"))
    assert result.exit_code == 2 and "unknown --format 'pdf'" in result.output
    result = invoke("--task", "tcga-rcc", "--tracking-uri", uri, "--out", str(tmp / "rcc"))
    assert result.exit_code == 0 and "no finished runs for task tcga-rcc" in result.output
    assert not (tmp / "rcc").exists()
    result = invoke("--task", "no-such-task", "--tracking-uri", uri)
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_html_is_self_contained(written):
    out, _, ids = written
    page = (out / f"{TASK}.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    for external in ("http://", "https://", "//cdn", "src=", "href=", "@import", "url(", "<script", "<link"):
        assert external not in page, external
    rows = re.findall(r'<tr(?: class="top")? data-run-id="([0-9a-f]+)">', page)
    assert rows == [ids[k] for k in ("first", "second", "demo", "last", "no_ci")]


def test_html_renders_in_headless_chromium(written, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium binary (Debian package 'chromium')")
    out, _, ids = written
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", (out / f"{TASK}.html").as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert '<table id="leaderboard">' in dom
    rows = re.findall(r"<tr([^>]*)>", dom)
    run_rows = [re.search(r'data-run-id="([^"]*)"', r) for r in rows]
    assert [m.group(1) for m in run_rows if m] == [ids[k] for k in ("first", "second", "demo", "last", "no_ci")]
    assert sum('class="top"' in r for r in rows) == 3
    cells = re.findall(r'<td[^>]*data-col="top group"[^>]*>([^<]*)</td>', dom)
    assert cells == ["✓", "✓", "✓", "", ""]
