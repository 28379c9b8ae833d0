"""``histobench leaderboard``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from histobench.cli.common import TaskOpt, TrackingOpt, console
from histobench.cli.output import NAME, TEXT, print_records
from histobench.errors import HistobenchError

WRAPPING = frozenset({"non-default eval", "pretrain cohort"})
"""Terminal columns of free text (they may wrap); every other column holds names or numbers (never broken)."""


def leaderboard_cmd(
    task: TaskOpt,
    tracking_uri: TrackingOpt = None,
    fmt: Annotated[Optional[list[str]], typer.Option("--format", "-f", help="table, md, csv, html or json (repeatable; default: table, md and csv).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for <task>.md, .csv, .html and .json.")] = Path("results"),
    include_demo: Annotated[bool, typer.Option("--demo/--no-demo", help="Include --demo runs.")] = True,
) -> None:
    """Rank the task's finished runs within each evaluation protocol by its primary metric's mean over folds:
    print a table per protocol and/or write Markdown, CSV, HTML, JSON."""
    from histobench.leaderboard import FORMATS, build_leaderboard, notes, protocols, write_leaderboard
    from histobench.registry import get_component

    formats = tuple(fmt or ("table", "md", "csv"))
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise HistobenchError(f"unknown --format {bad[0]!r}; formats: {', '.join(FORMATS)}")
    entry = get_component("task", task)
    name, primary = entry.cls.name, entry.cls.primary_metric
    df = build_leaderboard(name, tracking_uri, include_demo=include_demo)
    if df.empty:
        console.print(f"no finished runs for task {name} yet", highlight=False, markup=False)
        return
    paths = write_leaderboard(df, name, out, tuple(f for f in formats if f != "table"))
    if "table" in formats:
        # provenance columns stay in the files; the terminal shows the ranking and a short run id
        shown = df.drop(columns=[c for c in ("plugins", "git_sha", "split_hash", "device", "protocol options")
                                 if c in df.columns])
        if "run_id" in shown.columns:
            shown = shown.assign(run_id=shown["run_id"].str[:12])
        for protocol in protocols(shown):
            part = shown[shown["protocol"] == protocol].drop(columns="protocol")
            # names, numbers and intervals are never broken; a narrow terminal or a pipe gets a block per run
            columns = [(str(c), TEXT if c in WRAPPING else NAME) for c in part.columns]
            print_records(console, f"{name} leaderboard · protocol {protocol} (by {primary}, mean over folds)",
                          columns, [list(row) for row in part.astype(str).itertuples(index=False)],
                          heading="#{0} " + " + ".join(f"{{{list(part.columns).index(c)}}}" for c in
                                                       ("pretext", "encoder", "aggregator") if c in part.columns))
        for line in notes(df, name, primary):
            console.print(line, highlight=False, markup=False)
    if paths:
        console.print("written: " + ", ".join(str(p) for p in paths), highlight=False, markup=False)
