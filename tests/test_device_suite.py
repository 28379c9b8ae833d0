"""The device suite (``benchmarks/device/run.sh``) runs end to end as a CPU dry run, and its bookkeeping holds.

The dry run is the same script the GPU machine runs, with ``--quick`` sizes, no CUDA and no installs, and with
MLflow and scikit-survival made unimportable as they are on the device; so a part that breaks, or that starts
needing a package that does not travel, fails here rather than in the GPU machine's few minutes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "device" / "run.sh"
FIXED = ["preflight", "pretrain", "pretrain_compile", "extract", "slpd", "pytest_gpu"]  # always run
OPTIONAL = ["dirl", "hlss", "finetune"]  # run when benchmarks/<part>_speed.py exists


def _commit() -> str:
    """What the suite records as the commit: git's sha here, HISTOBENCH_COMMIT where the tree has no .git."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "test-commit"


def _suite():
    spec = importlib.util.spec_from_file_location("device_suite", ROOT / "benchmarks" / "device" / "suite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "HISTOBENCH_COMMIT": "test-commit", **(env or {})}
    full.pop("OUT", None)
    return subprocess.run(["bash", str(RUN), *args], capture_output=True, text=True, env=full, timeout=timeout,
                          cwd=ROOT)


def _table() -> dict[str, int]:
    proc = _run("--list")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(None, 2) for line in proc.stdout.splitlines()]
    table = {r[0]: int(r[1]) for r in rows}
    assert table.pop("total") == sum(table.values())
    return table


def test_budget_table_fits_the_device_command():
    table = _table()
    assert list(table) == ["preflight", "pretrain", "pretrain_compile", "extract", "slpd", *OPTIONAL, "pytest_gpu"]
    assert sum(table.values()) <= 480  # of the GPU tool's 600 s a command, the rest is installs and start-up
    assert all(b > 0 for b in table.values())
    for script in ("pretrain_speed", "extract_speed", "slpd_speed"):
        assert (ROOT / "benchmarks" / f"{script}.py").exists()


def test_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "out"
    proc = _run("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    present = [p for p in OPTIONAL if (ROOT / "benchmarks" / f"{p}_speed.py").exists()]
    ran = FIXED + present
    files = {f.name for f in out.iterdir()}
    if len(ran) + 1 <= 8:
        assert files == {f"{p}.json" for p in ran} | {"suite.log"}
        parts = {p: json.loads((out / f"{p}.json").read_text()) for p in ran}
    else:  # more files than the GPU tool returns: packed into one
        assert files == {"parts.json", "suite.log"}
        parts = json.loads((out / "parts.json").read_text())
    assert sorted(parts) == sorted(ran)
    table = _table()
    for name, rec in parts.items():
        assert rec["status"] == "ok" and rec["returncode"] == 0, (name, rec["headline"])
        assert rec["device"] == "cpu (dry run)" and rec["commit"].startswith(_commit()) and rec["date"].startswith("20")
        assert rec["mode"] == "dry-run" and rec["budget_seconds"] == table[name] and rec["seconds"] > 0
        assert rec["result"] is not None and rec["headline"]
    # what each part ran, read back from its own result
    assert parts["pretrain"]["result"]["setting"]["compile"] is False
    assert parts["pretrain_compile"]["result"]["setting"]["compile"] is True
    for name in ("pretrain", "pretrain_compile", "extract", "slpd"):
        assert parts[name]["result"]["setting"]["quick"] is True
        assert parts[name]["result"]["environment"]["device"] == "cpu"
    assert parts["extract"]["headline"].startswith("ratio_vs_ceiling ")
    pre = parts["preflight"]["result"]
    assert pre["problems"] == [] and pre["cuda"] is False
    assert {"core", "dino", "mil", "slpd", "tcga", "timm"} <= set(pre["plugins"])
    assert {"mlflow", "sksurv"} <= set(pre["absent"])  # hidden in the dry run, as on the device
    pyt = parts["pytest_gpu"]["result"]
    assert pyt["tests"] >= 5 and pyt["failed"] == pyt["errors"] == 0
    assert pyt["skipped"] == pyt["tests"]  # no CUDA here: every gpu test skips
    assert any(c["name"].endswith("test_pretrain_on_cuda_bf16_fused_adamw") for c in pyt["cases"])
    # the log holds every part's output; the summary lists every part, absent ones too
    log = (out / "suite.log").read_text()
    for name in ran:
        assert f"===== {name} (budget {table[name]} s)" in log
    summary = proc.stdout[proc.stdout.index("part              status"):]
    for name in table:
        line = next(line for line in summary.splitlines() if line.startswith(name + " "))
        assert line.split()[1] == ("ok" if name in ran else "absent"), line
    assert "not ok" not in proc.stdout


def test_a_failed_part_is_reported_and_the_rest_go_on(tmp_path):
    out = tmp_path / "out"
    proc = _run("--dry-run", "--out", str(out), "--only", "pretrain,slpd",
                env={"HISTOBENCH_DEVICE_SUITE_FAIL": "pretrain"})
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert {f.name for f in out.iterdir()} == {"pretrain.json", "slpd.json", "suite.log"}
    failed = json.loads((out / "pretrain.json").read_text())
    assert failed["status"] == "failed" and failed["returncode"] == 1 and failed["command"] == "false"
    assert failed["result"] is None and failed["device"] and failed["commit"].startswith(_commit())
    ok = json.loads((out / "slpd.json").read_text())
    assert ok["status"] == "ok" and ok["result"]["benchmark"] == "slpd_speed"
    assert "not ok: pretrain (see suite.log)" in proc.stdout
    assert [line.split()[:2] for line in proc.stdout.splitlines() if line.startswith(("pretrain ", "slpd "))] == [
        ["pretrain", "failed"], ["slpd", "ok"]]


def test_unknown_part_is_refused():
    proc = _run("--dry-run", "--only", "pretrian")
    assert proc.returncode == 2 and "no part named pretrian" in proc.stderr


# ------------------------------------------------------------------------------------- suite.py on its own


def test_status_and_headlines():
    s = _suite()
    assert [s.status_of(rc) for rc in (0, 1, 2, 124, 137)] == ["ok", "failed", "failed", "timeout", "timeout"]
    assert s.headline("pretrain", {"ratio": 0.934, "target_ratio": 0.9}) == "ratio 0.934 (target 0.9)"
    ex = {"benchmark": "extract_speed", "ratio_vs_ceiling": 0.81, "ratio_vs_encoder_only": 0.5, "ratio_vs_clam": 6.25,
          "targets": {"ratio_vs_ceiling": 0.8, "ratio_vs_clam": 5.0}}
    assert s.headline("extract", ex) == "ratio_vs_ceiling 0.81 (target 0.8), ratio_vs_clam 6.25 (target 5)"
    # a new method benchmark without a plain "ratio": its ratio_* keys, non-numbers skipped
    assert s.headline("dirl", {"ratio_vs_bare": 0.95, "ratio_vs_x": None}) == "ratio_vs_bare 0.95"
    assert s.headline("x", None) == ""


def test_parse_junit(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite name="pytest" tests="4">'
                   '<testcase classname="tests.test_gpu" name="a" time="1.5"/>'
                   '<testcase classname="tests.test_gpu" name="b" time="0.1"><failure message="boom"/></testcase>'
                   '<testcase classname="tests.test_gpu" name="c" time="0"><skipped message="needs CUDA"/></testcase>'
                   '<testcase classname="tests.test_gpu" name="d" time="0"><error message="setup"/></testcase>'
                   '</testsuite></testsuites>')
    r = _suite().parse_junit(xml)
    assert (r["tests"], r["passed"], r["failed"], r["skipped"], r["errors"]) == (4, 1, 1, 1, 1)
    assert r["cases"][0] == {"name": "tests.test_gpu::a", "outcome": "passed", "seconds": 1.5}
    assert r["cases"][1]["message"] == "boom"


@pytest.mark.parametrize("n_parts, packed", [(7, False), (8, True)])
def test_pack_keeps_what_the_gpu_tool_returns(tmp_path, n_parts, packed):
    s = _suite()
    names = [f"p{i}" for i in range(n_parts)]
    for i, name in enumerate(names):
        (tmp_path / f"{name}.json").write_text(json.dumps({"part": name, "i": i}))
    (tmp_path / "suite.log").write_text("log")
    assert s.pack(tmp_path, names) is packed
    files = sorted(f.name for f in tmp_path.iterdir())
    assert len(files) <= s.MAX_FILES
    if packed:
        assert files == ["parts.json", "suite.log"]
        assert json.loads((tmp_path / "parts.json").read_text())["p7"] == {"part": "p7", "i": 7}
    else:
        assert len(files) == n_parts + 1


def test_distinfo_fallback_exposes_the_entry_points(tmp_path):
    info = _suite().write_distinfo(tmp_path)
    dists = [d for d in metadata.distributions(path=[str(tmp_path)]) if d.metadata["Name"] == "histobench"]
    assert len(dists) == 1 and info.name == f"histobench-{dists[0].version}.dist-info"
    eps = {ep.name: ep.value for ep in dists[0].entry_points if ep.group == "histobench"}
    assert eps["core"] == "histobench.builtin" and {"dino", "slpd", "timm", "mil", "tcga"} <= set(eps)
    scripts = [ep for ep in dists[0].entry_points if ep.group == "console_scripts"]
    assert [ep.value for ep in scripts] == ["histobench.cli.app:main"]


def test_fetch_wheels_names_exactly_what_the_device_lacks():
    script = ROOT / "benchmarks" / "device" / "fetch_wheels.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    block = text[text.index("WHEELS=(") + len("WHEELS=("):text.index("\n)", text.index("WHEELS=("))]
    pins = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    names = [p.split("==")[0] for p in pins]
    assert all(p.count("==") == 1 for p in pins) and len(set(names)) == len(names)  # one version of each
    assert {"pydantic", "pydantic-core", "openslide-python", "openslide-bin", "imagecodecs"} <= set(names)
    assert not {"mlflow", "scikit-survival", "torch", "torchvision", "timm"} & set(names)  # too big, or there
