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
            with_primary: bool = True, protocol: str | None = None, eval_params: dict | None = None,
            legacy: bool = False, tags: dict | None = None, cached: bool = False) -> str:
    """One finished ``histobench run`` parent run (and its nested stages) as the pipeline logs it.

    ``ci`` is the fold CI of the primary metric (the pooled CI is ``ci`` shifted down by 0.05); ``legacy``
    logs the metric names of runs made before the estimators were named (``_mean``, ``_pooled``, ``_ci_low``
    = the pooled CI). ``eval_params`` are logged as ``eval.*`` params (default: the task's defaults).
    """
    from histobench.leaderboard import expected_eval
    from histobench.registry import get_component

    name = f"{pretext}+timm+abmil" + ("-demo" if demo else "")
    run_tags = {"histobench.demo": demo, **({"histobench.protocol": protocol} if protocol else {}), **(tags or {})}
    with tracker.run(task, name, stage="run", tags=run_tags) as run_id:
        defaults = expected_eval(get_component("task", task).cls, demo)
        tracker.params({"run": {"pretext": pretext, "seed": 0, "demo": demo},
                        "encoder": {"name": "timm"}, "aggregator": {"name": "abmil"},
                        "eval": {**defaults, **(eval_params or {})}})
        if protocol:
            tracker.params({"protocol": {"lr_scale": 0.1}})
        tracker.tags({"histobench.git_sha": "0123456789abcdef0123", "histobench.hw.device": "cpu",
                      "histobench.plugin.pretext": f"{pretext} histobench==0.1.0",
                      "histobench.plugin.task": "tcga histobench-tcga==0.1.0",
                      "histobench.plugins": json.dumps({"histobench": "0.1.0"})})
        if pretrain:
            with tracker.run(task, f"pretrain {pretext}", stage="pretrain", nested=True):
                tracker.metrics({"pretrain/images_per_second": 123.4})
        with tracker.run(task, "extract", stage="extract", nested=True):
            # every slide from the feature cache: no rate is logged, only the counts
            tracker.metrics({"extract/slides_extracted": 0, "extract/slides_cached": 5} if cached
                            else {"extract/tiles_per_second": 456.7, "extract/slides_extracted": 5})
        tracker.tags({"histobench.split_hash": split_hash, "histobench.split_name": "default"})
        for k in range(3):
            with tracker.run(task, f"fold {k}", stage="fold", nested=True):
                tracker.metrics({"macro_auc": auc})
        summary = {}
        for i, metric in enumerate(METRICS):
            if metric == "macro_auc" and not with_primary:
                continue
            value = auc - 0.1 * i
            if legacy:
                summary.update({f"{metric}_mean": value, f"{metric}_sd": 0.02, f"{metric}_pooled": value - 0.05})
                if ci is not None:
                    summary.update({f"{metric}_ci_low": ci[0] - 0.1 * i - 0.05, f"{metric}_ci_high": ci[1] - 0.1 * i - 0.05})
                continue
            summary.update({f"{metric}_fold_mean": value, f"{metric}_fold_sd": 0.02, f"{metric}_mean": value,
                            f"{metric}_sd": 0.02, f"{metric}_pooled": value - 0.05, f"{metric}_n_folds": 3})
            if ci is not None:
                summary.update({f"{metric}_fold_ci_low": ci[0] - 0.1 * i, f"{metric}_fold_ci_high": ci[1] - 0.1 * i,
                                f"{metric}_pooled_ci_low": ci[0] - 0.1 * i - 0.05,
                                f"{metric}_pooled_ci_high": ci[1] - 0.1 * i - 0.05})
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
        "first": log_run(tracker, "dino", 0.90, (0.85, 0.95), pretrain=True,
                         tags={"histobench.pretrain_cohort": "transductive"}),
        "last": log_run(tracker, "simclr", 0.70, (0.60, 0.80), eval_params={"epochs": 5, "device": "cpu"}),  # clearly worse
        "demo": log_run(tracker, "mae", 0.75, (0.70, 0.86), demo=True),  # the demo preset's eval: not marked
        "no_ci": log_run(tracker, "byol", 0.60, None, tags={"histobench.pretrain_cohort": "tcga-brca"}, cached=True),
        "ft_low": log_run(tracker, "dino", 0.80, (0.70, 0.84), protocol="finetune"),  # another protocol: own ranking
        "ft_top": log_run(tracker, "simclr", 0.85, (0.83, 0.90), protocol="finetune", legacy=True),
    }
    with pytest.raises(RuntimeError):
        log_run(tracker, "broken", 0.99, (0.98, 1.0), fail=True)  # FAILED: never listed
    log_run(tracker, "unfinished", 0.95, (0.9, 0.97), with_primary=False)  # no primary metric: not listed
    log_run(tracker, "other-task", 0.99, (0.98, 1.0), task="tcga-brca")
    return tmp, uri, ids


ORDER = ("first", "second", "demo", "last", "no_ci", "ft_top", "ft_low")


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


def test_csv_ranks_runs_by_the_primary_metric_within_each_protocol(written):
    out, result, ids = written
    assert sorted(p.name for p in out.iterdir()) == [f"{TASK}.csv", f"{TASK}.html", f"{TASK}.md"]
    assert "written:" in result.output and "│" not in result.output  # no "table" format asked for
    df = pd.read_csv(out / f"{TASK}.csv", keep_default_na=False)
    assert list(df["run_id"]) == [ids[k] for k in ORDER]
    assert list(df["protocol"]) == ["frozen-mil"] * 5 + ["finetune"] * 2  # the default protocol first
    assert list(df["rank"]) == [1, 2, 3, 4, 5, 1, 2]
    assert list(df["pretext"]) == ["dino", "none", "mae", "simclr", "byol", "simclr", "dino"]
    # top group: the fold CI overlaps its own protocol's top row's (a legacy top row has no fold CI)
    assert list(df["top group"]) == ["✓", "✓", "✓", "", "", "✓", ""]
    assert list(df["demo"]) == [False, False, True, False, False, False, False]
    first = df.iloc[0]
    assert first["macro_auc"] == "0.900 ± 0.020" and first["weighted_f1"] == "0.700 ± 0.020"
    assert first["macro_auc fold 95% CI"] == "[0.850, 0.950]" and df.iloc[4]["macro_auc fold 95% CI"] == ""
    assert float(first["macro_auc pooled"]) == 0.85 and first["macro_auc pooled 95% CI"] == "[0.800, 0.900]"
    legacy = df.iloc[5]  # old names: _mean is the fold mean, _ci_low/_ci_high the pooled CI
    assert legacy["macro_auc"] == "0.850 ± 0.020" and legacy["macro_auc fold 95% CI"] == ""
    assert float(legacy["macro_auc pooled"]) == 0.8 and legacy["macro_auc pooled 95% CI"] == "[0.780, 0.850]"
    cols = list(df.columns)
    assert cols.index("top group") == cols.index("macro_auc fold 95% CI") + 1
    assert cols.index("macro_auc pooled 95% CI") == cols.index("macro_auc pooled") + 1
    # non-default eval: the demo run is compared with the demo preset; device does not count
    assert list(df["non-default eval"]) == ["", "", "", "† epochs=5", "", "", ""]
    assert list(df["pretrain cohort"]) == ["transductive", "", "transductive", "transductive", "tcga-brca",
                                           "transductive", "transductive"]
    assert df.iloc[5]["protocol options"] == "lr_scale=0.1" and first["protocol options"] == ""
    # compute and provenance
    assert first["pretrain hours"].endswith("(CPU)") and float(first["pretrain img/s"]) == 123.4
    assert df.iloc[1]["pretrain hours"] == "" and df.iloc[1]["pretrain img/s"] == ""
    assert list(df["extract tiles/s"]) == ["456.7"] * 4 + ["cached", "456.7", "456.7"]  # cached: not 0 tiles/s
    assert (df["minutes"].astype(float) == 1.5).all()
    assert (df["git_sha"] == "0123456789ab").all() and (df["split_hash"] == "abc123").all()
    assert first["plugins"] == "pretext=dino histobench==0.1.0; task=tcga histobench-tcga==0.1.0"
    assert (df["encoder"] == "timm").all() and (df["aggregator"] == "abmil").all()


def test_non_default_eval_compares_strings_as_logged():
    from histobench.leaderboard import expected_eval, non_default_eval
    from histobench.registry import get_component

    cls = get_component("task", TASK).cls
    assert expected_eval(cls, demo=False)["lr"] == "0.0002" and expected_eval(cls, demo=True)["epochs"] == "40"
    assert non_default_eval({"eval.lr": "0.0002", "eval.epochs": "20"}, cls, demo=False) == ""
    assert non_default_eval({"eval.lr": "0.001", "eval.epochs": "20"}, cls, demo=False) == "† lr=0.001"
    assert non_default_eval({"eval.epochs": "20"}, cls, demo=True) == "† epochs=20"  # demo preset: 40
    assert non_default_eval({"eval.gone": "1", "eval.device": "cuda"}, cls, demo=False) == ""  # unknown / ignored fields
    assert non_default_eval({"run.seed": "0"}, cls, demo=False) == "not logged"


def test_markdown_has_a_section_per_protocol_and_states_the_estimators(written):
    out, _, ids = written
    md = (out / f"{TASK}.md").read_text()
    assert md.startswith(f"# {TASK} leaderboard") and "do not edit by hand" in md
    assert "ranked within each by macro_auc's mean over folds" in md
    assert "`macro_auc fold 95% CI`: t-interval over folds of that mean" in md
    assert "`macro_auc pooled`: pooled out-of-fold patients, with its own 95% CI (patient bootstrap)" in md
    assert "Pretraining is transductive by default" in md and "† = eval.* options" in md
    assert md.index("## protocol frozen-mil") < md.index("## protocol finetune")
    frozen, finetune = md.split("## protocol finetune")
    rows = [ln for ln in frozen.splitlines() if ln.startswith("| ")]
    assert rows[0].startswith("| rank | protocol | pretext |") and len(rows) == 1 + 5
    assert rows[1].startswith("| 1 | frozen-mil | dino |") and ids["first"] in rows[1]
    rows = [ln for ln in finetune.splitlines() if ln.startswith("| ")]
    assert len(rows) == 3 and rows[1].startswith("| 1 | finetune | simclr |") and ids["ft_top"] in rows[1]


def test_no_demo_and_table_format(store):
    tmp, uri, ids = store
    out = tmp / "no-demo"
    result = invoke("--task", TASK, "--no-demo", "--format", "table", "--format", "csv", "--out", str(out),
                    "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out / f"{TASK}.csv")
    assert ids["demo"] not in set(df["run_id"]) and len(df) == 6
    out_text = result.output
    assert f"{TASK} leaderboard · protocol frozen-mil (by macro_auc, mean over folds)" in out_text
    assert out_text.index("protocol frozen-mil") < out_text.index("protocol finetune") and "dino" in out_text
    assert "t-interval over folds" in out_text and "Pretraining is transductive by default" in out_text
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
    assert rows == [ids[k] for k in ORDER]
    assert re.findall(r'<table class="leaderboard" data-protocol="([^"]+)">', page) == ["frozen-mil", "finetune"]
    assert page.count("<h2>protocol ") == 2 and "Pretraining is transductive by default" in page


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
    assert dom.count('<table class="leaderboard"') == 2
    rows = re.findall(r"<tr([^>]*)>", dom)
    run_rows = [re.search(r'data-run-id="([^"]*)"', r) for r in rows]
    assert [m.group(1) for m in run_rows if m] == [ids[k] for k in ORDER]
    assert sum('class="top"' in r for r in rows) == 4
    cells = re.findall(r'<td[^>]*data-col="top group"[^>]*>([^<]*)</td>', dom)
    assert cells == ["✓", "✓", "✓", "", "", "✓", ""]


def test_json_holds_the_csv_rows_with_nulls(written, store):
    tmp, uri, ids = store
    out = tmp / "json"
    result = invoke("--task", TASK, "--format", "json", "--out", str(out), "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / f"{TASK}.json").read_text())  # strict JSON: NaN would not parse with the constant hook
    json.loads((out / f"{TASK}.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert [r["run_id"] for r in rows] == [ids[k] for k in ORDER]
    assert rows[0]["rank"] == 1 and rows[0]["demo"] is False and rows[0]["macro_auc"] == "0.900 ± 0.020"
    csv = pd.read_csv(written[0] / f"{TASK}.csv", keep_default_na=False, dtype=str)
    assert list(csv.columns) == list(rows[0])
    assert [r["pretrain cohort"] for r in rows] == list(csv["pretrain cohort"])
    from histobench.leaderboard import to_json

    mixed = json.loads(to_json(pd.DataFrame([{"a": 1.5, "n": 2}, {"b": "x", "n": 3}])))
    assert mixed == [{"a": 1.5, "n": 2, "b": None}, {"a": None, "n": 3, "b": "x"}]


def test_terminal_table_never_breaks_a_value(store):
    tmp, uri, ids = store
    narrow = runner.invoke(build_app(), ["leaderboard", "--task", TASK, "--format", "table", "--tracking-uri", uri],
                           env={"COLUMNS": "80"})
    assert narrow.exit_code == 0, narrow.output
    text = narrow.stdout  # 80 columns: one block per run, headed by rank and components
    assert text.index("#1 dino + timm + abmil\n") < text.index("#2 none + timm + abmil\n")
    assert "  macro_auc fold 95% CI: [0.850, 0.950]\n" in text and f"  run_id: {ids['first'][:12]}\n" in text
    wide = runner.invoke(build_app(), ["leaderboard", "--task", TASK, "--format", "table", "--tracking-uri", uri],
                         env={"COLUMNS": "400"})
    rows = [ln for ln in wide.stdout.splitlines() if ln.startswith("│ 1 ")]
    assert len(rows) == 2 and re.search(r"│ 0\.900 ± 0\.020 │ \[0\.850, 0\.950\] +│", rows[0])  # a table per protocol
