"""Leaderboards generated from MLflow runs (never hand-edited).

One row per finished ``histobench run`` (or ``histobench evaluate``) of a task, grouped by evaluation
protocol (tag ``histobench.protocol``; runs without it are ``frozen-mil``, which comes first) and ranked
within each protocol by one stated estimator: the primary metric's mean over folds (the ``fold`` estimator
of :mod:`histobench.evaluate.stats`). Columns: every task metric as fold ``mean ± sd``; the primary
metric's fold 95% CI (t-interval over folds) beside it; ``top group``, a check mark for rows whose fold CI
overlaps the protocol's top row's, i.e. rows not clearly worse than the best (overlapping intervals are a
conservative screen; ``histobench compare A B`` gives the paired test); the primary metric's second
estimator (``pooled`` out-of-fold patients, or ``fold_boot`` for survival) with its own patient-bootstrap
CI; ``non-default eval`` (``†`` and the ``eval.*`` values that differ from the task's defaults, the demo
preset's for demo runs); the pretraining cohort (``transductive``: the evaluation cohort, labels never
seen); the compute spent; and provenance (run id, git sha, plugin versions, split hash, protocol options).

Runs logged before the estimators were named carry ``<m>_mean``, ``<m>_sd``, ``<m>_pooled`` and
``<m>_ci_low``/``<m>_ci_high`` (the CI of ``pooled``); they are read as such (no fold CI).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from histobench.registry import get_component
from histobench.tracking import search_runs

FORMATS = ("table", "md", "csv", "html", "json")
DEFAULT_PROTOCOL = "frozen-mil"
IGNORED_EVAL = frozenset({"device"})
"""``eval.*`` fields that do not change the protocol (where it ran), left out of the non-default check."""


def _children(task: str, tracking_uri: str | None) -> dict[str, dict[str, dict[str, Any]]]:
    """``parent run id -> stage -> child run`` for the pretrain and extract stages."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for stage in ("pretrain", "extract"):
        for r in search_runs(task, tracking_uri, stage=stage):
            parent = r["tags"].get("mlflow.parentRunId")
            if parent:
                out.setdefault(parent, {})[stage] = r
    return out


def _encoder_label(params: dict[str, str]) -> str:
    """The encoder's name; for a cut network (``encoder.truncate_at``) also its architecture and cut point, and
    for an encoder of several named models (``encoder.model``) the model."""
    name = params.get("encoder.name", "?")
    cut = params.get("encoder.truncate_at")
    cut = None if cut in (None, "", "None") else cut
    model = params.get("encoder.model") or (params.get("encoder.arch") if cut else None)
    detail = " ".join(([model] if model else []) + ([f"@{cut}"] if cut else []))
    return f"{name} ({detail})" if detail else name


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None or value != value else f"{value:.{digits}f}"


def _plugins(tags: dict[str, str]) -> str:
    plugins = {k.split(".", 2)[2]: v for k, v in tags.items() if k.startswith("histobench.plugin.")}
    return "; ".join(f"{k}={v}" for k, v in sorted(plugins.items()))


def _estimates(m: dict[str, float], metric: str, task_kind: str) -> dict[str, Any]:
    """A metric's two estimators from a run's MLflow metrics (new names, else the older ones)."""
    key = "fold_boot" if task_kind == "survival" else "pooled"
    new = f"{metric}_{key}_ci_low" in m or f"{metric}_fold_mean" in m
    return {
        "mean": m.get(f"{metric}_fold_mean", m.get(f"{metric}_mean")),
        "sd": m.get(f"{metric}_fold_sd", m.get(f"{metric}_sd")),
        "lo": m.get(f"{metric}_fold_ci_low"), "hi": m.get(f"{metric}_fold_ci_high"),
        "key": key,
        "second": m.get(f"{metric}_{key}", None if new else m.get(f"{metric}_pooled")),
        "second_lo": m.get(f"{metric}_{key}_ci_low", None if new else m.get(f"{metric}_ci_low")),
        "second_hi": m.get(f"{metric}_{key}_ci_high", None if new else m.get(f"{metric}_ci_high")),
    }


def _ci(lo: float | None, hi: float | None) -> str:
    return f"[{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""


def expected_eval(cls, demo: bool) -> dict[str, str]:
    """The task's default ``eval.*`` params as the tracker logs them (strings): ``EvalOptions`` defaults, the
    task's ``eval_defaults``, then its ``eval_presets["demo"]`` for demo runs (as ``pipeline.resolve`` merges)."""
    from histobench.evaluate.options import EvalOptions

    merged = {**cls.eval_defaults, **(cls.eval_presets.get("demo", {}) if demo else {})}
    dumped = EvalOptions(**merged).model_dump()
    return {k: json.dumps(v) if isinstance(v, (list, tuple)) else str(v) for k, v in dumped.items()}


def non_default_eval(params: dict[str, str], cls, demo: bool) -> str:
    """``"† field=value, ..."`` for logged ``eval.*`` params that differ from the defaults; ``""`` when none
    does; ``"not logged"`` for a run without ``eval.*`` params. Fields a run did not log are not compared."""
    logged = {k[5:]: v for k, v in params.items() if k.startswith("eval.")}
    if not logged:
        return "not logged"
    expected = expected_eval(cls, demo)
    diff = [f"{k}={v}" for k, v in sorted(logged.items())
            if k in expected and k not in IGNORED_EVAL and v != expected[k]]
    return ("† " + ", ".join(diff)) if diff else ""


def build_leaderboard(task: str, tracking_uri: str | None = None, include_demo: bool = True):
    """The leaderboard of ``task`` as a DataFrame: rows grouped by protocol, ranked within each (see the
    module docstring); empty when no run has the primary metric."""
    import pandas as pd

    cls = get_component("task", task).cls
    primary = cls.primary_metric
    kind = cls.task_kind
    children = _children(task, tracking_uri)
    rows = []
    for r in search_runs(task, tracking_uri, stage="run"):
        demo = r["params"].get("run.demo", "False") == "True"
        if demo and not include_demo:
            continue
        m, p, t = r["metrics"], r["params"], r["tags"]
        head = _estimates(m, primary, kind)
        if head["mean"] is None:
            continue
        pretext = p.get("run.pretext", "?")
        row: dict[str, Any] = {
            "protocol": t.get("histobench.protocol") or DEFAULT_PROTOCOL,
            "pretext": pretext,
            "encoder": _encoder_label(p),
            # a protocol that trains no aggregator (kNN voting) shows none, not the default it was resolved with
            "aggregator": "—" if t.get("histobench.aggregator_used") == "False" else p.get("aggregator.name", "?"),
            "seed": p.get("run.seed", ""),
            "demo": demo,
        }
        metrics = list(dict.fromkeys([primary, *cls.metrics]))
        if kind == "survival":
            metrics += [f"cox_{x}" for x in metrics if _estimates(m, f"cox_{x}", kind)["mean"] is not None]
        for metric in metrics:
            e = _estimates(m, metric, kind)
            if e["mean"] is not None:
                row[metric] = f"{e['mean']:.3f} ± {_fmt(e['sd'])}"
            if metric == primary:
                row[f"{primary} fold 95% CI"] = _ci(e["lo"], e["hi"])
        key = head["key"]
        row[f"{primary} {key}"] = _fmt(head["second"])
        row[f"{primary} {key} 95% CI"] = _ci(head["second_lo"], head["second_hi"])
        row["_score"], row["_lo"], row["_hi"] = head["mean"], head["lo"], head["hi"]
        row["non-default eval"] = non_default_eval(p, cls, demo)
        row["pretrain cohort"] = t.get("histobench.pretrain_cohort") or ("transductive" if pretext != "none" else "")
        kids = children.get(r["run_id"], {})
        pre = kids.get("pretrain")
        device = t.get("histobench.hw.device", "")
        if pre and pre.get("end_time") and pre.get("start_time"):
            hours = (pre["end_time"] - pre["start_time"]) / 3.6e6
            row["pretrain hours"] = f"{hours:.3f} ({'GPU' if device and device != 'cpu' else 'CPU'})"
        else:
            row["pretrain hours"] = ""
        row["pretrain img/s"] = _fmt((pre or {}).get("metrics", {}).get("pretrain/images_per_second", m.get("pretrain/images_per_second")), 1)
        ext = kids.get("extract", {}).get("metrics", {})
        if ext.get("extract/slides_extracted") == 0 and ext.get("extract/slides_cached"):
            row["extract tiles/s"] = "cached"  # every slide from the feature cache (older runs logged 0 tiles/s)
        else:
            row["extract tiles/s"] = _fmt(ext.get("extract/tiles_per_second", m.get("extract/tiles_per_second")), 1)
        row["minutes"] = _fmt(m.get("wall_seconds", float("nan")) / 60, 1)
        row["device"] = device
        row["run_id"] = r["run_id"]
        row["git_sha"] = t.get("histobench.git_sha", "")[:12]
        row["split_hash"] = t.get("histobench.split_hash", "")
        row["protocol options"] = "; ".join(f"{k[9:]}={v}" for k, v in sorted(p.items()) if k.startswith("protocol."))
        row["plugins"] = _plugins(t)
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    groups = []
    for protocol in sorted(df["protocol"].unique(), key=lambda x: (x != DEFAULT_PROTOCOL, x)):
        g = df[df["protocol"] == protocol].sort_values("_score", ascending=False, kind="stable").reset_index(drop=True)
        top_lo = g.loc[0, "_lo"]
        top_lo = float("nan") if top_lo is None else float(top_lo)
        hi = g["_hi"].map(lambda v: float("nan") if v is None else float(v))
        top = (hi >= top_lo).to_numpy() | (g.index == 0)
        g.insert(list(g.columns).index(f"{primary} fold 95% CI") + 1, "top group", ["✓" if x else "" for x in top])
        g.insert(0, "rank", range(1, len(g) + 1))
        groups.append(g)
    return pd.concat(groups, ignore_index=True).drop(columns=["_score", "_lo", "_hi"])


_NOTE = ("Generated by `histobench leaderboard --task {task}` from MLflow runs; do not edit by hand. "
         "Rows are grouped by evaluation protocol and ranked within each by {primary}'s mean over folds. "
         "Metric columns: mean ± sd over folds (with seed repeats, a fold's value is their mean). "
         "`{primary} fold 95% CI`: {fold_ci} of that mean; ✓ = it overlaps the protocol's top row's (not clearly "
         "worse; `histobench compare` gives the paired test). `{primary} {second}`: {second_label}, with its own "
         "95% CI ({second_ci}). † = eval.* options that differ from the task's defaults (listed).")

_TRANSDUCTIVE = ("Pretraining is transductive by default (pretrain cohort = transductive): the pretext trains on "
                 "the evaluation cohort's slides and never sees their labels.")


def notes(df, task: str, primary: str) -> list[str]:
    """The lines printed above a leaderboard: what each estimator and CI is, and pretraining's cohort."""
    from histobench.evaluate.stats import estimator_label

    second = "fold_boot" if f"{primary} fold_boot" in df.columns else "pooled"
    lines = [_NOTE.format(task=task, primary=primary, second=second, second_label=estimator_label(second),
                          second_ci=estimator_label(second, ci=True), fold_ci=estimator_label("fold", ci=True))]
    if "pretrain cohort" in df.columns and (df["pretrain cohort"] == "transductive").any():
        lines.append(_TRANSDUCTIVE)
    return lines


def protocols(df) -> list[str]:
    """The protocols of a leaderboard in display order (``frozen-mil`` first)."""
    return list(dict.fromkeys(df["protocol"])) if "protocol" in df.columns else []


_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]|"} | {"<": "&lt;", ">": "&gt;", "&": "&amp;"})


def md_cell(value: object) -> str:
    """A value as the text of one Markdown table cell, shown as written: Markdown punctuation is backslash-
    escaped (a pipe cannot end the cell, brackets make no link), ``<``/``>``/``&`` become entities (no HTML
    reaches the renderer), and line breaks become spaces (one row stays one line)."""
    return " ".join(str(value).split("\n")).replace("\r", " ").translate(_MD_SPECIAL)


def _md_table(df) -> list[str]:
    header = "| " + " | ".join(md_cell(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(md_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return [header, sep, *body]


def to_markdown(df, task: str, primary: str) -> str:
    """A title, the notes, then a section per protocol with its own ranked table."""
    parts = [f"# {md_cell(task)} leaderboard", ""]
    for line in notes(df, task, primary):
        parts += [line, ""]
    for protocol in protocols(df):
        parts += [f"## protocol {md_cell(protocol)}", "", *_md_table(df[df["protocol"] == protocol]), ""]
    return "\n".join(parts)


_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #ddd;padding:.35em .7em;text-align:left;white-space:nowrap}
th{background:#f4f4f4;position:sticky;top:0}tr.top td{background:#f2fbf2}
td.prov{font-family:monospace;font-size:12px;color:#555}p.note{color:#555;max-width:70em}"""


PROV_CLASS = ' class="prov"'


_CSP = "default-src 'none'; style-src 'unsafe-inline'"
"""The page's Content-Security-Policy: no script, image, frame or fetch may run or load even if a string
escaped its cell (defence in depth; every run-controlled string is escaped with ``html.escape``)."""


def to_html(df, task: str, primary: str) -> str:
    """A single self-contained page (inline CSS, no scripts, no external assets): a section per protocol,
    one ``<tr>`` per run. Every string from the runs (names, params, tags, metric names) is HTML-escaped,
    in text and in attributes, and the page's Content-Security-Policy forbids scripts."""
    esc = html.escape
    prov = {"run_id", "git_sha", "split_hash", "plugins", "protocol options"}
    head = "".join(f"<th>{esc(str(c))}</th>" for c in df.columns)
    sections = []
    for protocol in protocols(df):
        rows = []
        for rec in df[df["protocol"] == protocol].to_dict("records"):
            cls = ' class="top"' if rec.get("top group") else ""
            cells = "".join(f'<td{PROV_CLASS if c in prov else ""} data-col="{esc(str(c))}">{esc(str(v))}</td>'
                            for c, v in rec.items())
            rows.append(f'<tr{cls} data-run-id="{esc(str(rec.get("run_id", "")))}">{cells}</tr>')
        sections.append(f'<h2>protocol {esc(protocol)}</h2>\n<table class="leaderboard" data-protocol="{esc(protocol)}">'
                        f"<thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(rows) + "\n</tbody></table>")
    note = "".join(f'<p class="note">{esc(line)}</p>' for line in notes(df, task, primary))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}"><title>{esc(task)} leaderboard</title>'
            f"<style>{_CSS}</style></head><body><h1>{esc(task)} leaderboard</h1>{note}\n"
            + "\n".join(sections) + "\n</body></html>\n")


def to_json(df) -> str:
    """The rows as a JSON list of objects, one per run in rank order; a missing value is ``null`` (never NaN,
    which JSON cannot hold)."""
    records = [{k: (None if isinstance(v, float) and v != v else v.item() if hasattr(v, "item") else v)
                for k, v in rec.items()} for rec in df.to_dict("records")]
    return json.dumps(records, indent=2, ensure_ascii=False) + "\n"


def _atomic(path: Path, text: str) -> Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_leaderboard(df, task: str, out_dir: Path, formats: tuple[str, ...] = ("md", "csv"),
                      primary: str | None = None) -> list[Path]:
    """Write ``<task>.<md|csv|html>`` atomically for each of ``formats`` ("table" writes nothing); returns paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    primary = primary or get_component("task", task).cls.primary_metric
    paths = []
    for fmt in formats:
        if fmt == "md":
            paths.append(_atomic(out_dir / f"{task}.md", to_markdown(df, task, primary)))
        elif fmt == "csv":
            paths.append(_atomic(out_dir / f"{task}.csv", df.to_csv(index=False)))
        elif fmt == "html":
            paths.append(_atomic(out_dir / f"{task}.html", to_html(df, task, primary)))
        elif fmt == "json":
            paths.append(_atomic(out_dir / f"{task}.json", to_json(df)))
    return paths
