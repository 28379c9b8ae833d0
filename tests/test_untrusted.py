"""Untrusted files and strings (issue 14, item 5).

* The source tree never unpickles a file: no ``pickle``/``joblib``/``dill`` loads, ``torch.load`` only with
  ``weights_only=True``, ``np.load`` never with ``allow_pickle=True``, YAML only through safe loaders. The
  check parses every module of ``core/``, ``plugins/`` and ``benchmarks/`` (AST, so a call split over lines
  is still seen); the few justified exceptions are listed in ``ALLOWED``, each checked for what it claims.
* YAML with a ``!!python/object`` tag runs nothing: ``-o`` values and HLSS description files.
* Run-controlled strings (run names, params, tags, protocol names, metric and task names) reach the
  leaderboard's HTML, Markdown, CSV and terminal table as text: in headless Chromium the payloads below show
  as text and none executes; Markdown keeps one row per run with its pipes escaped; CSV reads back equal.
"""

from __future__ import annotations

import ast
import html
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from histobench.cli.app import build_app

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("core", "plugins", "benchmarks")
TASK = "tcga-nsclc"

SCRIPT = "<script>document.title='PWNED'</script>"
IMG = "<img src=x onerror=\"document.title='PWNED'\">"
SVG = "\"><svg onload=\"document.title='PWNED'\">"
MARKUP = "[/][bold red]loud[/bold red] a|b"
"""Rich markup (a stray closing tag raises in rich) and a Markdown pipe."""
BREAKER = "line1\nline2, \"quoted\" | x"
"""A newline, a comma and quotes (CSV), a pipe (Markdown)."""


# --------------------------------------------------------------------------- the source tree


def _sources() -> list[Path]:
    files = []
    for top in SCANNED:
        files += [p for p in (ROOT / top).rglob("*.py") if "build" not in p.relative_to(ROOT).parts]
    return sorted(files)


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain, else ``""``."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


UNPICKLERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads", "_pickle.load",
              "_pickle.loads", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load",
              "pd.read_pickle", "pandas.read_pickle", "shelve.open", "marshal.load", "marshal.loads",
              "torch.jit.load", "jsonpickle.decode", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all",
              "yaml.unsafe_load_all", "yaml.full_load_all"}
UNSAFE_YAML_LOADERS = {"Loader", "FullLoader", "UnsafeLoader", "CLoader", "CFullLoader", "CUnsafeLoader"}


def findings(path: Path, root: Path = ROOT) -> list[tuple[str, int, str]]:
    """``(relative path, line, what)`` for each way ``path``'s code could unpickle or run a file's content."""
    rel = str(path.relative_to(root))
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "cPickle", "_pickle", "dill", "joblib",
                                                                   "cloudpickle", "shelve", "marshal"):
            names = {a.name for a in node.names}
            if names & {"load", "loads", "Unpickler", "open"}:
                out.append((rel, node.lineno, f"from {node.module} import {', '.join(sorted(names))}"))
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in UNPICKLERS:
            out.append((rel, node.lineno, name))
        elif name == "torch.load":
            if not _is_const(_kw(node, "weights_only"), True):
                out.append((rel, node.lineno, "torch.load without weights_only=True"))
        elif name in ("np.load", "numpy.load"):
            flag = _kw(node, "allow_pickle")
            if flag is not None and not _is_const(flag, False):
                out.append((rel, node.lineno, "np.load with allow_pickle"))
        elif name == "yaml.load":
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            loader_name = _dotted(loader) if loader is not None else ""
            unsafe = loader_name.split(".")[-1] in UNSAFE_YAML_LOADERS or not loader_name.endswith("SafeLoader")
            if loader is None or unsafe:
                shown = ast.unparse(loader) if loader is not None else None
                out.append((rel, node.lineno, f"yaml.load with Loader={shown}"))
        elif name.startswith("mlflow.") and name.endswith(".load_model"):
            out.append((rel, node.lineno, name))
    return out


def _hlss_loader_is_safe() -> bool:
    import yaml

    from histobench_hlss.descriptions import _yaml_loader

    return issubclass(_yaml_loader(), yaml.SafeLoader)


ALLOWED = {
    # HLSS description files are YAML read with UniqueKeyLoader, a yaml.SafeLoader subclass that also refuses
    # repeated keys; the check below proves the subclassing, and test_hlss_descriptions_refuse_python_tags the
    # behaviour.
    ("plugins/histobench_hlss/descriptions.py", "yaml.load with Loader=_yaml_loader()"): _hlss_loader_is_safe,
}


def test_no_file_is_ever_unpickled_or_unsafely_yaml_loaded():
    files = _sources()
    assert len(files) > 100  # the scan sees the tree
    found = [f for p in files for f in findings(p)]
    allowed = {(rel, what) for rel, _, what in found} & set(ALLOWED)
    bad = [f for f in found if (f[0], f[2]) not in ALLOWED]
    assert not bad, "unsafe loads (pickle runs code; use weights_only=True, allow_pickle=False, yaml.safe_load):\n" + \
        "\n".join(f"{rel}:{line}: {what}" for rel, line, what in bad)
    for key in allowed:
        assert ALLOWED[key](), f"allow-list entry no longer holds: {key}"
    assert set(ALLOWED) <= allowed, f"stale allow-list entries: {set(ALLOWED) - allowed}"


@pytest.mark.parametrize("snippet,what", [
    ("import pickle\npickle.load(open('f', 'rb'))\n", "pickle.load"),
    ("import torch\ntorch.load(\n  'f',\n  map_location='cpu')\n", "torch.load without weights_only=True"),
    ("import torch\ntorch.load('f', weights_only=False)\n", "torch.load without weights_only=True"),
    ("import numpy as np\nnp.load('f.npy', allow_pickle=True)\n", "np.load with allow_pickle"),
    ("import yaml\nyaml.load(open('f'), Loader=yaml.Loader)\n", "yaml.load with Loader=yaml.Loader"),
    ("import yaml\nyaml.load(open('f'))\n", "yaml.load with Loader=None"),
    ("import yaml\nyaml.full_load(open('f'))\n", "yaml.full_load"),
    ("import joblib\njoblib.load('m.joblib')\n", "joblib.load"),
    ("import pandas as pd\npd.read_pickle('f.pkl')\n", "pd.read_pickle"),
])
def test_the_scan_catches_each_unsafe_load(tmp_path, snippet, what):
    path = tmp_path / "core" / "bad.py"
    path.parent.mkdir()
    path.write_text(snippet)
    assert [f[2] for f in findings(path, tmp_path)] == [what]
    ok = tmp_path / "core" / "ok.py"
    ok.write_text("import torch, numpy as np, yaml\ntorch.load('f', map_location='cpu', weights_only=True)\n"
                  "np.load('f.npy', allow_pickle=False)\nnp.load('g.npz')\nyaml.safe_load('a: 1')\n"
                  "yaml.load('a: 1', Loader=yaml.SafeLoader)\n")
    assert findings(ok, tmp_path) == []


def test_option_values_are_safe_yaml(tmp_path):
    from histobench.options import parse_options, parse_value

    marker = tmp_path / "ran"
    payload = f"!!python/object/apply:os.system ['touch {marker}']"
    value = parse_value(payload)
    assert value == payload and not marker.exists()  # kept as the string it was, nothing ran
    assert parse_options([f"pretext.k={payload}"]) == {"pretext": {"k": payload}}
    assert parse_value("[1, 2]") == [1, 2] and parse_value("1e-4") == 1e-4  # plain YAML still parsed
    assert not marker.exists()


def test_hlss_descriptions_refuse_python_tags(tmp_path):
    from histobench.errors import HistobenchError
    from histobench_hlss.descriptions import load_descriptions

    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"task: x\nlevels: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(HistobenchError, match=r"evil\.yaml is not valid YAML"):
        load_descriptions(path)
    assert not marker.exists()


# --------------------------------------------------------------------------- the leaderboard


def _log_hostile_run(uri: str) -> str:
    """A finished run whose every run-controlled string is a payload."""
    from histobench.leaderboard import expected_eval
    from histobench.registry import get_component
    from histobench.tracking import Tracker

    tracker = Tracker(uri)
    defaults = expected_eval(get_component("task", TASK).cls, False)
    with tracker.run(TASK, f"{SCRIPT}+{IMG}", stage="run",
                     tags={"histobench.protocol": SVG, "histobench.pretrain_cohort": BREAKER}) as run_id:
        tracker.params({"run": {"pretext": SCRIPT, "seed": MARKUP, "demo": False},
                        "encoder": {"name": IMG, "model": MARKUP}, "aggregator": {"name": SVG},
                        "eval": {**defaults, "epochs": SCRIPT}, "protocol": {"lr": IMG}})
        tracker.tags({"histobench.git_sha": IMG, "histobench.hw.device": SVG, "histobench.split_hash": BREAKER,
                      "histobench.plugin.evil": SCRIPT})
        tracker.metrics({"macro_auc_fold_mean": 0.9, "macro_auc_fold_sd": 0.01, "macro_auc_fold_ci_low": 0.8,
                         "macro_auc_fold_ci_high": 0.95, "macro_auc_pooled": 0.88, "wall_seconds": 60.0})
    return run_id


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    run_id = _log_hostile_run(uri)
    out = tmp / "results"
    result = CliRunner().invoke(build_app(), ["leaderboard", "--task", TASK, "--tracking-uri", uri, "--out", str(out),
                                              "-f", "table", "-f", "html", "-f", "md", "-f", "csv"],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return out, result, run_id


class _Cells(HTMLParser):
    """Text of each ``<td data-col=...>``, the page title, and every start tag seen."""

    def __init__(self):
        super().__init__()
        self.cells, self.tags, self.title, self._col, self._in_title = {}, [], "", None, False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "td":
            self._col = attrs.get("data-col")
            self.cells[self._col] = ""
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        if tag == "td":
            self._col = None
        self._in_title = False

    def handle_data(self, data):
        if self._col is not None:
            self.cells[self._col] += data
        if self._in_title:
            self.title += data


def _parse(page: str) -> _Cells:
    p = _Cells()
    p.feed(page)
    return p


def test_html_page_holds_payloads_as_text(hostile):
    out, _, run_id = hostile
    page = (out / f"{TASK}.html").read_text()
    assert not re.search(r"<(script|img|svg)\b", page, re.I)
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    cells = _parse(page).cells
    assert cells["pretext"] == SCRIPT and cells["aggregator"] == SVG and cells["protocol"] == SVG
    assert cells["encoder"] == f"{IMG} ({MARKUP})" and cells["seed"] == MARKUP
    assert cells["pretrain cohort"] == BREAKER and cells["split_hash"] == BREAKER
    assert cells["non-default eval"] == f"† epochs={SCRIPT}" and cells["protocol options"] == f"lr={IMG}"
    assert cells["git_sha"] == IMG[:12] and cells["device"] == SVG and cells["plugins"] == f"evil={SCRIPT}"
    assert f'data-protocol="{html.escape(SVG)}"' in page and cells["run_id"] == run_id


def test_html_escapes_task_and_metric_names():
    from histobench.leaderboard import to_html

    df = pd.DataFrame([{"rank": 1, "protocol": SVG, SCRIPT: IMG, "run_id": "r1"}])
    page = to_html(df, task=IMG, primary=SCRIPT)
    assert not re.search(r"<(script|img|svg)\b", page, re.I)
    parsed = _parse(page)
    assert parsed.title == f"{IMG} leaderboard" and parsed.cells[SCRIPT] == IMG


def _chromium_dom(browser: str, page: Path, profile: Path) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           "--dump-dom", page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _executed(dom: str) -> list[str]:
    """Signs that a payload ran or became markup in a rendered DOM."""
    signs = []
    parsed = _parse(dom)
    if "PWNED" in parsed.title:
        signs.append(f"title changed to {parsed.title!r}")
    injected = [t for t in parsed.tags if t in ("script", "img", "svg")]
    if injected:
        signs.append(f"elements injected: {injected}")
    return signs


def test_payloads_render_as_text_in_headless_chromium(hostile, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium binary (Debian package 'chromium')")
    out, _, _ = hostile
    # the detector works: the same payloads pasted raw into a page do run
    raw = tmp_path / "raw.html"
    raw.write_text(f"<!DOCTYPE html><html><head><title>clean</title></head><body><div>{IMG}</div></body></html>")
    assert _executed(_chromium_dom(browser, raw, tmp_path / "p1")), "the raw payload page should show execution"
    dom = _chromium_dom(browser, out / f"{TASK}.html", tmp_path / "p2")
    assert _executed(dom) == []
    parsed = _parse(dom)
    assert parsed.title == f"{TASK} leaderboard"
    assert parsed.cells["pretext"] == SCRIPT and parsed.cells["aggregator"] == SVG
    assert parsed.cells["encoder"] == f"{IMG} ({MARKUP})" and parsed.cells["non-default eval"] == f"† epochs={SCRIPT}"


def test_markdown_keeps_one_row_per_run_and_shows_the_text(hostile):
    out, _, run_id = hostile
    md = (out / f"{TASK}.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(rows) == 2 and run_id in rows[1]  # header + the run: the newline did not split the row
    header = [c.strip() for c in re.split(r"(?<!\\)\|", rows[0])[1:-1]]
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", rows[1])[1:-1]]
    assert len(cells) == len(header)  # every pipe inside a value is escaped
    row = dict(zip(header, cells))
    assert row["pretext"] == "&lt;script&gt;document.title='PWNED'&lt;/script&gt;"
    assert row["seed"] == r"\[/\]\[bold red\]loud\[/bold red\] a\|b"
    assert row["pretrain cohort"] == r'line1 line2, "quoted" \| x'
    assert "<script" not in md and "<img" not in md and "<svg" not in md
    assert f"## protocol {html.escape(SVG, quote=False)}" in md


def test_csv_reads_back_every_value(hostile):
    out, _, run_id = hostile
    df = pd.read_csv(out / f"{TASK}.csv", keep_default_na=False, dtype=str)
    assert len(df) == 1
    row = df.iloc[0]
    assert row["pretext"] == SCRIPT and row["pretrain cohort"] == BREAKER and row["seed"] == MARKUP
    assert row["encoder"] == f"{IMG} ({MARKUP})" and row["run_id"] == run_id


def test_terminal_table_prints_markup_as_text(hostile, tmp_path):
    out, result, _ = hostile
    text = result.stdout  # 400 columns do not hold these names side by side: one block per run
    assert f"#1 {SCRIPT} + {IMG} ({MARKUP}) + {SVG}\n" in text and f"\n  seed: {MARKUP}\n" in text
    assert f"protocol {SVG} (by macro_auc" in text and "\x1b[" not in text
    uri = f"sqlite:///{out.parent / 'mlflow.db'}"
    wide = CliRunner().invoke(build_app(), ["leaderboard", "--task", TASK, "--tracking-uri", uri, "--out",
                                            str(tmp_path), "-f", "table"], env={"COLUMNS": "1000"})
    assert wide.exit_code == 0, wide.output
    assert f"│ {MARKUP} │" in wide.stdout and f"│ {SCRIPT} │" in wide.stdout  # a table, cells as written


def test_error_text_with_markup_is_printed_as_written(tmp_path):
    weird = tmp_path / "slide[/][bold]x.svs"
    result = CliRunner().invoke(build_app(), ["slides", "info", str(weird)], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "slide[/][bold]x.svs" in result.output
