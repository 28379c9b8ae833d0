"""``histobench leaderboard``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from histobench.cli.common import TaskOpt, TrackingOpt, console
from histobench.errors import HistobenchError


def leaderboard_cmd(
    task: TaskOpt,
    tracking_uri: TrackingOpt = None,
    fmt: Annotated[Optional[list[str]], typer.Option("--format", "-f", help="table, md, csv or html (repeatable; default: table, md and csv).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for <task>.md, .csv and .html.")] = Path("results"),
    include_demo: Annotated[bool, typer.Option("--demo/--no-demo", help="Include --demo runs.")] = True,
) -> None:
    """Rank the task's finished runs by its primary metric: print a table and/or write Markdown, CSV, HTML."""
    from histobench.leaderboard import FORMATS, build_leaderboard, write_leaderboard
    from histobench.registry import get_component

    formats = tuple(fmt or ("table", "md", "csv"))
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise HistobenchError(f"unknown --format {bad[0]!r}; formats: {', '.join(FORMATS)}")
    entry = get_component("task", task)
    df = build_leaderboard(entry.cls.name, tracking_uri, include_demo=include_demo)
    if df.empty:
        console.print(f"no finished runs for task {entry.cls.name} yet")
        return
    paths = write_leaderboard(df, entry.cls.name, out, tuple(f for f in formats if f != "table"))
    if "table" in formats:
        table = Table(title=f"{entry.cls.name} leaderboard (by {entry.cls.primary_metric})", title_justify="left")
        # provenance columns stay in the files; the terminal shows the ranking and a short run id
        shown = df.drop(columns=[c for c in ("plugins", "git_sha", "split_hash", "device") if c in df.columns])
        if "run_id" in shown.columns:
            shown = shown.assign(run_id=shown["run_id"].str[:12])
        df = shown
        for col in df.columns:
            table.add_column(col, overflow="fold")
        for row in df.astype(str).itertuples(index=False):
            table.add_row(*row)
        console.print(table)
    if paths:
        console.print("written: " + ", ".join(str(p) for p in paths), highlight=False)
