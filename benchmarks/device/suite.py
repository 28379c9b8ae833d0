"""Bookkeeping of the device suite (``benchmarks/device/run.sh``): one JSON per part, the summary, the preflight.

``run.sh`` runs each part (a benchmark script, ``pytest -m gpu``) as its own process under its own time
budget; this module does everything around those processes, with the standard library only (``start`` and
``preflight`` also import torch):

``start``      probes the device and the commit once and opens the suite's state file (JSON lines);
``preflight``  checks, before any benchmark, that what the parts import is importable (with versions), that
               the built-in plugins load through their entry points, and (unless ``--dry-run``) that CUDA works;
``record``     turns one finished part (exit status, seconds, the benchmark's own JSON or pytest's JUnit XML)
               into ``DEST/<part>.json`` with ``device``, ``date`` and ``commit``, and appends it to the state;
``absent``     notes a part whose script does not exist (yet), so that the summary still lists it;
``summary``    prints the one-screen table (part, status, seconds, budget, headline ratio) and, when the
               folder would hold more files than the GPU tool returns (8), packs the part JSONs into
               ``parts.json``; exits 1 when a part failed or ran out of time;
``distinfo``   writes histobench's ``dist-info`` (metadata and entry points, from ``pyproject.toml``) into a
               folder on ``PYTHONPATH``: the fallback when ``pip install`` of the tree fails on the device.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.util
import json
import math
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MAX_FILES = 8  # files that come back from the GPU tool's $OUT
LOG_NAME = "suite.log"
PACK_NAME = "parts.json"

# What the parts import on the device: torch's stack is preinstalled there, the rest travels as wheels.
REQUIRED = ("torch", "torchvision", "timm", "numpy", "h5py", "tifffile", "imagecodecs", "openslide", "pydantic",
            "pluggy", "yaml", "PIL", "sklearn", "scipy", "pytest")
# Versions reported (from their metadata, without importing them) where installed.
REPORTED = ("typer", "rich", "pandas", "matplotlib", "pytest-timeout", "setuptools")
# Not needed by any part, and not carried (see fetch_wheels.sh): reported as found or absent, never imported.
NOT_CARRIED = ("mlflow", "sksurv")

# Which keys of a benchmark's JSON make its headline, and the targets beside them.
HEADLINE_KEYS = {"extract_speed": ("ratio_vs_ceiling", "ratio_vs_clam"), "dirl_speed": ("overhead",)}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _read_state(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return lines[0], lines[1:]


def _append(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------------- start


def _device_name(dry_run: bool) -> str:
    if dry_run:  # run.sh hides CUDA in a dry run; no need to import torch to know
        return "cpu (dry run)"
    try:
        import torch
    except ImportError:
        return "unknown (torch does not import)"
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)"


def _commit() -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from common import git_commit  # honours HISTOBENCH_COMMIT where the tree has no .git
    except ImportError:
        import os

        return os.environ.get("HISTOBENCH_COMMIT") or "unknown"
    return git_commit()


def cmd_start(a) -> int:
    header = {"device": _device_name(a.dry_run), "commit": _commit(), "started": _now(),
              "mode": "dry-run" if a.dry_run else "full"}
    Path(a.state).write_text(json.dumps(header) + "\n")
    print(f"device suite ({header['mode']}) on {header['device']}, commit {header['commit']}, {header['started']}")
    return 0


# --------------------------------------------------------------------------------------------- preflight


def _version(mod) -> str:
    for attr in ("__version__", "VERSION", "version"):
        v = getattr(mod, attr, None)
        if isinstance(v, str):
            return v
    from importlib import metadata

    for dist in metadata.packages_distributions().get(mod.__name__, []):
        return metadata.version(dist)
    return "?"


def preflight(dry_run: bool) -> tuple[dict[str, Any], list[str]]:
    """What the suite needs, checked: ``(report, problems)``; an empty ``problems`` means ready."""
    report: dict[str, Any] = {"python": sys.version.split()[0], "modules": {}, "absent": []}
    problems = []
    for name in REQUIRED:
        try:
            mod = importlib.import_module(name)
        except Exception as err:  # noqa: BLE001  (a broken install raises more than ImportError)
            report["absent"].append(name)
            problems.append(f"{name} does not import: {err}")
            continue
        report["modules"][name] = _version(mod)
    from importlib import metadata

    for dist in REPORTED:
        try:
            report["modules"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            report["absent"].append(dist)
    for name in NOT_CARRIED:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:  # the dry run's stand-in for a missing package
            found = False
        if not found:
            report["absent"].append(name)
    if "openslide" in report["modules"]:
        import openslide

        report["openslide_library"] = getattr(openslide, "__library_version__", "?")
    if "imagecodecs" in report["modules"]:
        import imagecodecs

        if not imagecodecs.JPEG8.available:
            problems.append("imagecodecs has no JPEG codec (tifffile cannot write the synthetic slides)")
    try:
        import histobench
        from histobench.plugins import load_plugins

        pm = load_plugins()
        loaded = sorted(pm.get_name(p) for p in pm.get_plugins())
        report["histobench"] = str(Path(histobench.__file__).parent)
        report["plugins"] = loaded
        wanted = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["histobench"])
        missing = sorted(set(wanted) - set(loaded))
        if missing:
            problems.append(f"built-in plugins not found through their entry points: {', '.join(missing)}")
    except Exception as err:  # noqa: BLE001
        problems.append(f"histobench plugins do not load: {err}")
    if "torch" in report["modules"]:
        import torch

        report["cuda"] = torch.cuda.is_available()
        if report["cuda"]:
            props = torch.cuda.get_device_properties(0)
            report.update(gpu=props.name, capability=f"{props.major}.{props.minor}", torch_cuda=torch.version.cuda,
                          gpu_memory_gb=round(props.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count())
        elif not dry_run:
            problems.append("torch sees no CUDA device")
    report["problems"] = problems
    return report, problems


def cmd_preflight(a) -> int:
    report, problems = preflight(a.dry_run)
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    for p in problems:
        print(f"preflight: {p}", file=sys.stderr)
    return 1 if problems else 0


# ------------------------------------------------------------------------------------------------ record


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def headline(part: str, result: dict[str, Any] | None) -> str:
    """The numbers that say whether a part met its target, on one line."""
    if not isinstance(result, dict):
        return ""
    if part == "preflight":
        where = f"cuda {result.get('gpu')}" if result.get("cuda") else "no cuda"
        return f"{len(result.get('plugins', []))} plugins, {where}, {len(result.get('problems', []))} problems"
    if "tests" in result and "passed" in result:  # pytest
        return (f"{result['passed']} passed, {result['failed']} failed, {result['errors']} errors, "
                f"{result['skipped']} skipped")
    keys = HEADLINE_KEYS.get(result.get("benchmark", ""))
    if keys is None:
        keys = ("ratio",) if "ratio" in result else tuple(k for k in result if k.startswith("ratio"))
    targets = result.get("targets") or {}
    bits = []
    for k in keys:
        v = result.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            continue
        target = targets.get(k, result.get("target_ratio") if k == "ratio" else None)
        bits.append(f"{k} {_fmt(v)}" + (f" (target {_fmt(target)})" if isinstance(target, (int, float)) else ""))
    return ", ".join(bits)


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and per-test outcomes of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    cases = []
    for tc in root.iter("testcase"):
        outcome, message = "passed", None
        for child in tc:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "")[:300]
                break
        cases.append({"name": f"{tc.get('classname')}::{tc.get('name')}", "outcome": outcome,
                      "seconds": float(tc.get("time") or 0), **({"message": message} if message else {})})
    count = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failed", "error", "skipped")}
    return {"tests": len(cases), "passed": count["passed"], "failed": count["failed"], "errors": count["error"],
            "skipped": count["skipped"], "cases": cases}


def status_of(rc: int) -> str:
    if rc == 0:
        return "ok"
    return "timeout" if rc in (124, 137) else "failed"


def cmd_record(a) -> int:
    header, _ = _read_state(a.state)
    result, note = None, ""
    source = Path(a.junit) if a.junit else Path(a.raw) if a.raw else None
    if source is not None and source.exists():
        try:
            result = parse_junit(source) if a.junit else json.loads(source.read_text())
        except (ValueError, ET.ParseError) as err:
            note = f"unreadable result {source.name}: {err}"
    status = status_of(a.rc)
    if status == "ok" and result is None:
        status, note = "failed", note or "exit status 0 but no result was written"
    row = {"part": a.part, "status": status, "returncode": a.rc, "seconds": round(a.seconds, 1),
           "budget_seconds": a.budget, "mode": header["mode"], "device": header["device"], "date": _now(),
           "commit": header["commit"], "command": a.command,
           "headline": headline(a.part, result) or note or ("ran out of its time budget" if status == "timeout" else ""),
           "result": result}
    dest = Path(a.dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{a.part}.json").write_text(json.dumps(row, indent=2) + "\n")
    _append(a.state, {k: row[k] for k in ("part", "status", "seconds", "budget_seconds", "headline")})
    return 0


def cmd_absent(a) -> int:
    _append(a.state, {"part": a.part, "status": "absent", "seconds": None, "budget_seconds": a.budget,
                      "headline": a.reason})
    return 0


# ----------------------------------------------------------------------------------------------- summary


def pack(dest: Path, parts: list[str]) -> bool:
    """Fold the part JSONs into ``parts.json`` when they and the log would exceed :data:`MAX_FILES`."""
    files = [dest / f"{p}.json" for p in parts if (dest / f"{p}.json").exists()]
    if len(files) + 1 <= MAX_FILES:
        return False
    bundle = {f.stem: json.loads(f.read_text()) for f in files}
    (dest / PACK_NAME).write_text(json.dumps(bundle, indent=2) + "\n")
    for f in files:
        f.unlink()
    return True


def summary_table(header: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    out = [f"device suite ({header['mode']}) on {header['device']}, commit {header['commit']}, "
           f"started {header['started']}",
           f"{'part':<18}{'status':<9}{'seconds':>8}{'budget':>8}  headline"]
    total = budget = 0.0
    for r in rows:
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        total += r["seconds"] or 0
        budget += r["budget_seconds"] if r["status"] != "absent" else 0
        out.append(f"{r['part']:<18}{r['status']:<9}{secs:>8}{r['budget_seconds']:>8}  {r['headline']}")
    out.append(f"{'total':<27}{total:>8.1f}{budget:>8.0f}")
    return "\n".join(out)


def cmd_summary(a) -> int:
    header, rows = _read_state(a.state)
    dest = Path(a.dest)
    print(summary_table(header, rows))
    ran = [r["part"] for r in rows if r["status"] != "absent"]
    if pack(dest, ran):
        print(f"results: {dest}/{PACK_NAME} (the {len(ran)} part JSONs, packed: more than {MAX_FILES} files would "
              f"not all come back) and {dest}/{LOG_NAME}")
    else:
        print(f"results: {len(ran)} part JSONs and {LOG_NAME} in {dest}")
    bad = [r["part"] for r in rows if r["status"] in ("failed", "timeout")]
    if bad:
        print(f"not ok: {', '.join(bad)} (see {LOG_NAME})")
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------- distinfo


def write_distinfo(target: Path) -> Path:
    """``histobench-<version>.dist-info`` with METADATA and entry_points.txt, as pip would install them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    info = Path(target) / f"{project['name']}-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    lines = []
    for group, eps in {"console_scripts": project.get("scripts", {}), **project.get("entry-points", {})}.items():
        if eps:
            lines += [f"[{group}]", *(f"{k} = {v}" for k, v in eps.items()), ""]
    (info / "entry_points.txt").write_text("\n".join(lines))
    (info / "INSTALLER").write_text("histobench-device-suite\n")
    return info


def cmd_distinfo(a) -> int:
    print(write_distinfo(Path(a.target)))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("start")
    p.add_argument("--state", required=True)
    p.add_argument("--dry-run", action="store_true")
    p = sub.add_parser("preflight")
    p.add_argument("--out")
    p.add_argument("--dry-run", action="store_true")
    p = sub.add_parser("record")
    for flag in ("--state", "--part", "--dest"):
        p.add_argument(flag, required=True)
    p.add_argument("--rc", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--budget", type=int, required=True)
    p.add_argument("--command", default="")
    p.add_argument("--raw", help="The benchmark's own JSON.")
    p.add_argument("--junit", help="pytest's JUnit XML (the pytest part).")
    p = sub.add_parser("absent")
    for flag in ("--state", "--part", "--reason"):
        p.add_argument(flag, required=True)
    p.add_argument("--budget", type=int, required=True)
    p = sub.add_parser("summary")
    p.add_argument("--state", required=True)
    p.add_argument("--dest", required=True)
    p = sub.add_parser("distinfo")
    p.add_argument("--target", required=True)
    a = ap.parse_args(argv)
    return {"start": cmd_start, "preflight": cmd_preflight, "record": cmd_record, "absent": cmd_absent,
            "summary": cmd_summary, "distinfo": cmd_distinfo}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
