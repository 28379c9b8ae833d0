"""``histobench leaderboard``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from histobench.cli.common import TaskOpt, TrackingOpt, console


def leaderboard_cmd(
    task: TaskOpt,
    tracking_uri: TrackingOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for <task>.md and <task>.csv.")] = Path("results"),
    include_demo: Annotated[bool, typer.Option("--demo/--no-demo", help="Include --demo runs.")] = True,
) -> None:
    """Rank the task's finished runs by its primary metric; print and write Markdown and CSV."""
    from histobench.leaderboard import build_leaderboard, write_leaderboard
    from histobench.registry import get_component

    entry = get_component("task", task)
    df = build_leaderboard(entry.cls.name, tracking_uri, include_demo=include_demo)
    if df.empty:
        console.print(f"no finished runs for task {entry.cls.name} yet")
        return
    paths = write_leaderboard(df, entry.cls.name, out)
    table = Table(title=f"{entry.cls.name} leaderboard (by {entry.cls.primary_metric})", title_justify="left")
    for col in df.columns:
        table.add_column(col, overflow="fold")
    for row in df.astype(str).itertuples(index=False):
        table.add_row(*row)
    console.print(table)
    console.print("written: " + ", ".join(str(p) for p in paths), highlight=False)
