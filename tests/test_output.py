"""Output people and scripts can use (issue 14, item 6).

* ``--format json`` on every ``list`` / ``show`` command and on ``plugins``: one JSON document on stdout.
* Names never wrap: ``histobench tasks list`` in a pipe (80 columns) and at ``COLUMNS=40`` keeps every task,
  alias, plugin and version whole; :func:`histobench.cli.output.print_records` keeps names whole at any width.
* ``NO_COLOR`` removes every escape, even where ``FORCE_COLOR`` forces a terminal.
* Off a terminal, a long stage prints one plain line with its count, time and throughput.
* Each ``show`` names the ``-o`` prefix that really sets its options (protocols: ``eval.``).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from histobench.cli.app import build_app
from histobench.cli.components import KIND_COMMANDS, OPTION_PREFIX

runner = CliRunner()
ESC = "\x1b["


def invoke(*args: str, **env: str):
    return runner.invoke(build_app(), list(args), env={"COLUMNS": "200", **env})


def histobench(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The installed command in a subprocess, stdout and stderr both pipes."""
    full = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "histobench", *args], capture_output=True, text=True, env=full,
                          timeout=120)


# --------------------------------------------------------------------------- --format json


def _leaf_commands(group, path=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a group (typer vendors its own click)
            yield from _leaf_commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def test_every_list_and_show_command_takes_format_json():
    import typer

    cli = typer.main.get_command(build_app())
    listing = {p: c for p, c in _leaf_commands(cli) if p[-1] in ("list", "show", "info") or p == ("plugins",)}
    assert len(listing) == 2 * len(KIND_COMMANDS) + 2  # every kind's list and show, plugins, slides info
    for path, cmd in listing.items():
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        assert "--format" in opts, f"histobench {' '.join(path)} has no --format"


@pytest.mark.parametrize("command", sorted(KIND_COMMANDS))
def test_list_and_show_print_json_and_nothing_else(command):
    from histobench.registry import get_components

    kind = KIND_COMMANDS[command]
    result = invoke(command, "list", "--format", "json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)  # the whole of stdout is one JSON document
    names = sorted(get_components(kind))
    assert [r["name"] for r in records] == names
    assert all(set(r) == {"name", "aliases", "plugin", "version", "summary"} for r in records)
    assert all(isinstance(r["aliases"], list) for r in records)
    name = names[0]
    result = invoke(command, "show", name, "-f", "json")
    assert result.exit_code == 0, result.output
    rec = json.loads(result.stdout)
    assert rec["name"] == name and rec["kind"] == kind and rec["option_prefix"] == OPTION_PREFIX[kind]
    cls = get_components(kind)[name].cls
    assert [o["name"] for o in rec["options"]] == list(cls.Options.model_fields)
    assert "│" not in result.stdout and ESC not in result.stdout


def test_show_json_carries_defaults_presets_and_training_policy():
    rec = json.loads(invoke("pretexts", "show", "dino", "--format", "json").stdout)
    out_dim = next(o for o in rec["options"] if o["name"] == "out_dim")
    assert out_dim["default"] == 65536 and out_dim["type"] == "int" and out_dim["presets"]["demo"] == 1024
    scale = next(o for o in rec["options"] if o["name"] == "global_crop_scale")
    assert scale["default"] == [0.4, 1.0]  # a tuple default becomes a JSON list
    assert rec["train_option_prefix"] == "train" and "demo" in rec["train_presets"]
    epochs = next(o for o in rec["train_policy"] if o["name"] == "epochs")
    assert epochs["presets"]["demo"] == 3
    te = json.loads(invoke("text-encoders", "show", "hashing", "--format", "json").stdout)
    assert isinstance(te["facts"]["dim"], int) and te["facts"]["shares_image_space"] is False


def test_plugins_json_lists_what_each_plugin_registers():
    records = json.loads(invoke("plugins", "--format", "json").stdout)
    by_name = {r["plugin"]: r for r in records}
    assert by_name["dino"]["distribution"].startswith("histobench==")
    assert {"kind": "pretext", "name": "dino"} in by_name["dino"]["registers"]
    assert "register_pretexts" in by_name["dino"]["hooks"]


def test_json_from_the_installed_command_parses():
    """In a real process, nothing printed while plugins load reaches stdout."""
    done = histobench("plugins", "--format", "json", FORCE_COLOR="1")
    assert done.returncode == 0, done.stderr
    assert {r["plugin"] for r in json.loads(done.stdout)} >= {"core", "dino", "tcga", "timm"}


def test_json_on_stdout_and_errors_on_stderr():
    result = invoke("pretexts", "show", "dinoo", "--format", "json")
    assert result.exit_code == 2 and result.stdout == "" and "Did you mean 'dino'" in result.stderr
    result = invoke("tasks", "list", "--format", "yaml")
    assert result.exit_code == 2 and result.stdout == ""


# --------------------------------------------------------------------------- names never wrap


def _whole(name: str, text: str) -> bool:
    """``name`` appears as a whole token: bounded by start/end of line, spaces, table rules or punctuation."""
    return re.search(rf"(?:^|[\s│:,(]){re.escape(name)}(?:$|[\s│,)])", text, re.M) is not None


@pytest.mark.parametrize("columns", [None, "40"])
def test_tasks_list_in_a_pipe_keeps_every_name_whole(columns):
    listed = histobench("tasks", "list", "--format", "json")  # the same process setup as the table's
    assert listed.returncode == 0, listed.stderr
    records = json.loads(listed.stdout)
    done = histobench("tasks", "list", **({"COLUMNS": columns} if columns else {}))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert ESC not in out
    names = {r["name"] for r in records} | {a for r in records for a in r["aliases"]} | \
        {r["plugin"] for r in records} | {r["version"] for r in records}
    assert len(names) > 10
    broken = [n for n in names if not _whole(n, out)]
    assert not broken, f"names broken across lines: {broken}\n{out}"
    assert "tcga-blca-survi\n" not in out and "tcga-blca-survi " not in out
    width = int(columns or 80)
    for line in out.splitlines():  # only a name longer than the width may pass it
        assert len(line) <= width or any(n in line for n in names), line


@pytest.mark.parametrize("width", [24, 40, 60, 80, 100, 140, 220])
def test_print_records_never_breaks_a_name_at_any_width(width):
    from rich.console import Console

    from histobench.cli.output import NAME, NAMES, TEXT, print_records

    long_name = "tcga-extraordinarily-long-survival-task"  # longer than the narrowest width
    rows = [["tcga-blca-survival", ["blca-survival", "blca-os"], "histobench==0.1.0", "word " * 30],
            [long_name, [], "histobench-plugin==12.3.4", "TCGA-XX overall survival: OS time and event."],
            ["panda", ["isup"], "histobench==0.1.0", ""]]
    cols = [("name", NAME), ("aliases", NAMES), ("version", NAME), ("summary", TEXT)]
    buf = io.StringIO()
    layout = print_records(Console(file=buf, width=width, color_system=None), "tasks", cols, rows)
    out = buf.getvalue()
    # names 39 + 13 + 25 wide, 12 for the summary, 13 for the rules: a table from 102 columns
    assert layout == ("table" if width >= 102 else "blocks")
    for name in ("tcga-blca-survival", "blca-survival", "blca-os", "histobench==0.1.0", long_name,
                 "histobench-plugin==12.3.4", "panda", "isup"):
        assert _whole(name, out), (name, out)
    if layout == "table":
        assert out.count("│ tcga-blca-survival") == 1 and all(len(ln) <= width for ln in out.splitlines())


def test_wide_terminal_gets_a_table_with_whole_names():
    out = invoke("tasks", "list", COLUMNS="200").stdout
    assert "│ tcga-blca-survival │ blca-survival │" in out


def test_show_tables_keep_option_names_whole():
    names = [o["name"] for o in json.loads(invoke("pretexts", "show", "dino", "-f", "json").stdout)["options"]]
    for columns in ("40", "80", "200"):
        out = invoke("pretexts", "show", "dino", COLUMNS=columns).stdout
        assert all(_whole(n, out) for n in names), columns


# --------------------------------------------------------------------------- NO_COLOR


def test_no_color_removes_every_escape_even_when_a_terminal_is_forced():
    forced = histobench("tasks", "list", FORCE_COLOR="1", COLUMNS="200")
    assert ESC in forced.stdout  # the control: a forced terminal is styled
    plain = histobench("tasks", "list", FORCE_COLOR="1", NO_COLOR="1", COLUMNS="200")
    assert plain.returncode == 0 and ESC not in plain.stdout and "tcga-nsclc" in plain.stdout
    err = histobench("pretexts", "show", "dinoo", FORCE_COLOR="1", NO_COLOR="1")
    assert err.returncode == 2 and "Did you mean 'dino'" in err.stderr and ESC not in err.stderr
    assert ESC in histobench("tasks", "--help", FORCE_COLOR="1").stdout  # Typer's help, styled when forced
    helped = histobench("tasks", "--help", FORCE_COLOR="1", NO_COLOR="1")
    assert helped.returncode == 0 and "list" in helped.stdout and ESC not in helped.stdout
    usage = histobench("tasks", "lis", FORCE_COLOR="1", NO_COLOR="1")
    assert usage.returncode == 2 and "No such command" in usage.stderr and ESC not in usage.stderr


def test_no_color_applies_to_a_console_made_before_it_was_set(monkeypatch):
    from histobench.cli.output import EnvConsole

    console = EnvConsole()
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    with console.capture() as cap:
        console.print("[bold red]x[/]")
    assert ESC in cap.get()
    monkeypatch.setenv("NO_COLOR", "1")
    with console.capture() as cap:
        console.print("[bold red]x[/]")
    assert cap.get() == "x\n"


# --------------------------------------------------------------------------- plain stage lines

STAGE_SCRIPT = """
from histobench.cli.common import reporter
r = reporter()
with r.stage("extract timm", total=1234, unit="tiles") as st:
    for _ in range(1234):
        st.advance()
with r.stage("pretrain dino", total=40, unit="steps") as st:
    st.advance(40)
    st.set(loss=1.23456, lr=0.001)
with r.stage("demo cohort tcga-nsclc", unit="slides"):
    pass
try:
    with r.stage("evaluate frozen-mil", total=4, unit="folds") as st:
        st.advance()
        raise KeyboardInterrupt
except KeyboardInterrupt:
    pass
r.warn("slide [/x] unreadable")
"""

LINE = r"(?P<n>[\d,]+) (?P<unit>\w+) in (?P<s>\d+\.\d) s \((?P<rate>[\d,]+(?:\.\d+)?(?:e-\d+)?) (?P=unit)/s\)"


def _stage_stderr(tmp_path, **env) -> str:
    log = tmp_path / "stderr.log"
    full = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE")}
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-c", STAGE_SCRIPT], stderr=f, stdout=subprocess.PIPE, text=True,
                              env={**full, **env}, timeout=120)
    assert done.returncode == 0
    return log.read_text()


def test_stages_off_a_terminal_print_one_plain_line_each(tmp_path):
    text = _stage_stderr(tmp_path)
    assert ESC not in text
    lines = text.splitlines()
    assert len(lines) == 5, text
    m = re.fullmatch(rf"extract timm: {LINE}", lines[0])
    assert m and m["n"] == "1,234" and m["unit"] == "tiles"
    assert float(m["rate"].replace(",", "")) > 0
    m = re.fullmatch(rf"pretrain dino: {LINE} loss=1\.235 lr=0\.001", lines[1])
    assert m and m["n"] == "40"
    assert re.fullmatch(r"demo cohort tcga-nsclc: done in \d+\.\d s", lines[2])
    assert re.fullmatch(rf"evaluate frozen-mil: stopped after {LINE}", lines[3]) and " 1 folds" in lines[3]
    assert lines[4] == "warning: slide [/x] unreadable"


def test_stages_on_a_terminal_draw_progress_bars(tmp_path):
    text = _stage_stderr(tmp_path, FORCE_COLOR="1")  # the control: a (forced) terminal gets live bars
    assert ESC in text


def test_stage_line_format():
    from histobench.reporting import stage_line

    assert stage_line("extract", 1234, "tiles", 12.3) == "extract: 1,234 tiles in 12.3 s (100.3 tiles/s)"
    assert stage_line("pretrain", 10, "steps", 2.0, {"loss": 0.5}) == \
        "pretrain: 10 steps in 2.0 s (5.0 steps/s) loss=0.5"
    assert stage_line("cohort", 0, "slides", 1.26) == "cohort: done in 1.3 s"
    assert stage_line("eval", 2, "folds", 4.0, finished=False) == "eval: stopped after 2 folds in 4.0 s (0.5 folds/s)"
    assert stage_line("evaluate", 3, "folds", 24.9) == "evaluate: 3 folds in 24.9 s (0.12 folds/s)"


# --------------------------------------------------------------------------- -o prefixes in show


@pytest.mark.parametrize("command", sorted(KIND_COMMANDS))
def test_show_names_the_real_option_prefix(command):
    from histobench.options import PREFIXES
    from histobench.registry import get_components

    kind = KIND_COMMANDS[command]
    prefix = OPTION_PREFIX[kind]
    assert prefix in PREFIXES
    name = sorted(get_components(kind))[0]
    out = invoke(command, "show", name, COLUMNS="300").stdout
    assert f"(-o {prefix}.NAME=VALUE)" in out
    assert "-o protocol." not in out


def test_protocol_options_go_through_eval():
    """The prefix ``protocols show`` prints is the one a run accepts for a protocol's own option."""
    from histobench.options import parse_options
    from histobench.pipeline.spec import _split_eval_options
    from histobench.registry import get_components

    from histobench.evaluate.options import EvalOptions

    cls = next(e.cls for e in get_components("protocol").values()
               if set(e.cls.Options.model_fields) - set(EvalOptions.model_fields))
    field = next(f for f in cls.Options.model_fields if f not in EvalOptions.model_fields)
    shared, own = _split_eval_options(parse_options([f"{OPTION_PREFIX['protocol']}.{field}=1"])["eval"], cls)
    assert own == {field: 1} and shared == {}
    out = invoke("protocols", "show", cls.name, COLUMNS="300").stdout
    assert f"{cls.name} options (-o eval.NAME=VALUE)" in out and field in out


def test_slides_info_json():
    from pathlib import Path

    slide = Path(__file__).parent / "data" / "slides" / "CMU-1-Small-Region.svs"
    if not slide.is_file():
        pytest.skip("test slide not present")
    result = invoke("slides", "info", str(slide), "--format", "json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["path"] == str(slide) and info["levels"] == len(info["level_dimensions"]) >= 1
    assert info["mpp"] == pytest.approx(0.499, abs=1e-3) and info["stain"] == "brightfield"


def test_paths_with_brackets_are_printed_as_written(tmp_path):
    """A work folder named like rich markup (``[bold]``) is printed as is, not swallowed as styling."""
    work = tmp_path / "w[bold]x[/bold]"
    done = subprocess.run([sys.executable, "-m", "histobench", "extract", "--task", "tcga-nsclc", "--demo", "-o",
                           "task.demo_patients=4", "-o", "task.demo_slide_px=512", "--workdir", str(work)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "400"})
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = [ln for ln in done.stdout.splitlines() if "slides extracted" in ln]
    assert line.endswith(str(work / "features" / line.rsplit("/features/", 1)[-1])), line
    assert "w[bold]x[/bold]" in line


@pytest.mark.parametrize("columns", [60, 80, 120])
def test_a_result_table_never_cuts_a_number_it_splits_instead(monkeypatch, columns):
    """Ten metrics (the knn-hierarchical protocol's) in a pipe's 80 columns: every value and every CI is
    printed whole, in as many tables as it takes, each with the fold column and every estimator row."""
    from histobench.cli.common import console
    from histobench.cli.run import print_result

    names = ["macro_auc", "balanced_accuracy", "weighted_f1", "patch_accuracy", "patch_mca", "slide_accuracy",
             "slide_mca", "patient_accuracy", "patient_mca", "pooled_extra"]
    per_fold = [{m: 0.5 + 0.01 * i + 0.001 * j for j, m in enumerate(names)} for i in range(4)]
    summary = {m: {"fold_mean": 0.515 + 0.001 * j, "fold_sd": 0.0129, "fold_ci_low": 0.4944 + 0.001 * j,
                   "fold_ci_high": 0.5356 + 0.001 * j, "n_folds": 4, "pooled": 0.51, "pooled_ci_low": 0.42,
                   "pooled_ci_high": 0.6} for j, m in enumerate(names)}
    monkeypatch.setenv("COLUMNS", str(columns))
    with console.capture() as cap:
        print_result(per_fold, summary, "macro_auc", "knn")
    text = cap.get()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= columns
    for j, m in enumerate(names):
        assert m in text or (m + " *") in text
        assert f"{0.515 + 0.001 * j:.3f} ± 0.013" in text and f"[{0.4944 + 0.001 * j:.3f}, {0.5356 + 0.001 * j:.3f}]" in text
    tables = text.count("┏")
    assert tables > 1 if columns <= 80 else tables >= 1
    assert text.count("fold: mean ± sd") == tables and text.count("95% CI: patient") == tables


def test_analysis_metric_names_are_folded_never_cut(monkeypatch):
    from histobench.cli.analyze import metrics_table
    from histobench.cli.common import console

    long = "wilcoxon_p/entropy/dirl_timm_abmil-demo:761c48bb_vs_dino_timm_abmil-demo:27a88d7b"
    monkeypatch.setenv("COLUMNS", "60")
    with console.capture() as cap:
        console.print(metrics_table("attention", {long: 3.525e-12, "entropy/a": 1.0}))
    text = cap.get()
    assert "…" not in text and max(map(len, text.splitlines())) <= 60
    first_cells = "".join(ln.split("│")[1].strip() for ln in text.splitlines() if ln.startswith("│"))
    assert long in first_cells and "3.525e-12" in text
