"""What the CLI writes, for people and for scripts.

* Consoles follow the environment of the moment: ``NO_COLOR`` (https://no-color.org; any non-empty value)
  turns off every style escape, not only colours, even where ``FORCE_COLOR`` / ``TTY_COMPATIBLE`` force a
  terminal; a console is rebuilt when that setting or the stream's terminal-ness changes (so a test runner's
  environment applies).
* ``--format json`` prints one JSON document on stdout and nothing else (messages go to stderr).
* :func:`print_records` draws a table whose name columns are never broken: a name column is exactly as wide
  as its longest name, a list-of-names column as its longest item (one item per line), and only free-text
  columns wrap. When the names leave the free text too little room (a pipe is 80 columns; a narrow
  terminal less), the records are printed one block each instead, each line soft-wrapped (no line break is
  ever inserted inside a name).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from enum import Enum
from typing import Annotated, Any, Iterable, Sequence

import typer
from rich.console import Console

from histobench.reporting import make_console, no_color

MIN_TEXT_WIDTH = 12
"""The narrowest a free-text column may become before the records are printed as blocks instead."""


class EnvConsole:
    """A stand-in for a rich :class:`~rich.console.Console` that follows the environment.

    Attribute access goes to a console built by :func:`make_console`, rebuilt when ``NO_COLOR``, ``COLUMNS`` /
    ``LINES`` or whether the stream is a terminal change (rich fixes its colour system and a ``COLUMNS`` width
    when a console is made). The same console is returned while none changes, so live progress displays and
    prints share one console.
    """

    def __init__(self, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Console | None = None
        self._key: tuple | None = None

    @staticmethod
    def _env() -> tuple:
        return no_color(), os.environ.get("COLUMNS"), os.environ.get("LINES")

    def get(self) -> Console:
        """The console for now."""
        current = self._console
        if current is not None and self._key == (*self._env(), current.is_terminal):
            return current
        current = make_console(self._stderr)
        self._console, self._key = current, (*self._env(), current.is_terminal)
        return current

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


FormatOpt = Annotated[OutputFormat, typer.Option("--format", "-f", help="table (for people) or json (one JSON document on stdout, for scripts).", case_sensitive=False)]


def print_json(data: Any) -> None:
    """``data`` as one indented JSON document on stdout (values JSON cannot hold are written as strings)."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def jsonable(value: Any) -> Any:
    """A default or preset value as JSON holds it: plain values as they are, tuples as lists, others as repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, Enum):
        return jsonable(value.value)
    return repr(value)


NAME, NAMES, TEXT = "name", "names", "text"
"""Column kinds for :func:`print_records`: one name (never broken), a list of names (one per line, none
broken), free text (wraps)."""


def _cell(value: Any, kind: str) -> str:
    if kind == NAMES:
        items = value if isinstance(value, (list, tuple)) else [value] if value not in (None, "") else []
        return "\n".join(str(v) for v in items)
    return "" if value is None else str(value)


def _name_width(header: str, cells: Iterable[str]) -> int:
    return max([len(header), *(len(line) for c in cells for line in c.split("\n"))])


def print_records(console, title: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]],
                  heading: str = "{0}") -> str:
    """Print ``rows`` under ``columns`` (``(header, kind)`` pairs) as a table or, when the names would not
    fit beside the free text, as one block per record: a ``heading`` line (a format string of the row's cells,
    the first by default), then ``header: value`` for each other non-empty cell. Returns the layout used:
    ``"table"`` or ``"blocks"``.

    Every cell is shown as text (no rich markup is read from it)."""
    from rich.table import Table
    from rich.text import Text

    cells = [[_cell(v, kind) for v, (_, kind) in zip(row, columns)] for row in rows]
    fixed = [_name_width(h, (r[i] for r in cells)) if kind != TEXT else None for i, (h, kind) in enumerate(columns)]
    n_text = sum(w is None for w in fixed)
    needed = sum(w for w in fixed if w is not None) + n_text * MIN_TEXT_WIDTH + 3 * len(columns) + 1
    if needed <= console.width:
        table = Table(title=title, title_justify="left")
        for (header, kind), width in zip(columns, fixed):
            if kind == TEXT:
                table.add_column(header, overflow="fold")
            else:
                table.add_column(header, no_wrap=kind == NAME, overflow="fold", width=width, min_width=width)
        for row in cells:
            table.add_row(*(Text(c) for c in row))
        console.print(table)
        return "table"
    console.print(Text(title, style="bold"), soft_wrap=True)
    for row in cells:
        console.print(Text(heading.format(*row), style="bold"), soft_wrap=True)
        for (header, kind), value in zip(columns[1:], row[1:]):
            if not value:
                continue
            if kind == TEXT:  # wraps between words (never inside one), indented
                text = textwrap.fill(" ".join(value.split()), width=max(console.width, 20),
                                     initial_indent=f"  {header}: ", subsequent_indent="    ",
                                     break_long_words=False, break_on_hyphens=False)
                console.print(Text(text), soft_wrap=True)
            elif "\n" not in value:  # a name: one line, never broken
                console.print(Text(f"  {header}: {value}"), soft_wrap=True)
            else:  # names: one per line
                console.print(Text(f"  {header}:"), soft_wrap=True)
                for item in value.split("\n"):
                    console.print(Text(f"    {item}"), soft_wrap=True)
    return "blocks"
