"""Progress and messages for long stages. The only module outside ``cli/`` that imports rich.

Library code takes a :class:`Reporter` (or ``None`` for silence) and calls ``stage`` / ``advance`` /
``info``; the CLI passes a :class:`RichReporter`, tests a :class:`Reporter` that prints nothing.

A :class:`RichReporter` draws live progress bars only on a terminal. Where its stream is not one (a log
file, a pipe, a batch scheduler's output), each stage prints one plain line when it ends, with its count,
time and throughput (:func:`stage_line`), and no escape codes.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator


class Stage:
    """A handle on one running stage: ``advance(n)`` and ``set(**fields)`` (shown next to the bar)."""

    def __init__(self, reporter: "Reporter", task_id: int | None, total: int | None, unit: str):
        self.reporter, self.task_id, self.total, self.unit = reporter, task_id, total, unit
        self.done = 0
        self.started = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.reporter._advance(self, n)

    def set(self, **fields: object) -> None:
        self.reporter._set(self, fields)

    @property
    def rate(self) -> float:
        """Items per second since the stage started."""
        return self.done / max(time.perf_counter() - self.started, 1e-9)


class Reporter:
    """Silent reporter: records messages, shows nothing."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def info(self, message: str) -> None:
        self.messages.append(message)

    def warn(self, message: str) -> None:
        self.messages.append("warning: " + message)

    @contextmanager
    def stage(self, description: str, total: int | None = None, unit: str = "it") -> Iterator[Stage]:
        yield Stage(self, None, total, unit)

    def _advance(self, stage: Stage, n: int) -> None:
        pass

    def _set(self, stage: Stage, fields: dict) -> None:
        pass


def no_color() -> bool:
    """True when ``NO_COLOR`` (https://no-color.org) is set to a non-empty value."""
    return os.environ.get("NO_COLOR", "") != ""


def make_console(stderr: bool = False):
    """A rich console for the current environment; with ``NO_COLOR`` it writes no style escapes at all (rich's
    own ``no_color`` drops colours but keeps bold and underline)."""
    from rich.console import Console

    if no_color():
        return Console(stderr=stderr, color_system=None, no_color=True)
    return Console(stderr=stderr)


def _fields_text(fields: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


def stage_line(description: str, done: int, unit: str, seconds: float, fields: dict | None = None,
               finished: bool = True) -> str:
    """A stage's summary as one line: ``extract: 1,234 tiles in 12.3 s (100.3 tiles/s)``; a stage that counted
    nothing says ``done in 1.2 s``; one that raised says ``stopped after``; its last ``set`` fields follow."""
    rate = done / max(seconds, 1e-9)
    if done or not finished:
        shown = f"{rate:,.1f}" if rate >= 1 else f"{rate:.2g}"  # a slow stage keeps two digits: 0.12 folds/s
        body = f"{done:,} {unit} in {seconds:.1f} s ({shown} {unit}/s)"
        body = body if finished else "stopped after " + body
    else:
        body = f"done in {seconds:.1f} s"
    extra = _fields_text(fields or {})
    return f"{description}: {body}" + (f" {extra}" if extra else "")


class RichReporter(Reporter):
    """Rich progress bars with throughput and ETA, and coloured messages; on a stream that is not a terminal,
    one plain line per stage at its end (:func:`stage_line`)."""

    def __init__(self, console=None) -> None:
        super().__init__()
        self.console = console or make_console(stderr=True)
        self._fields: dict[int, dict] = {}

    @property
    def live(self) -> bool:
        """Whether stages are drawn as live progress bars (the console is an interactive terminal)."""
        return bool(self.console.is_terminal and not self.console.is_dumb_terminal)

    def info(self, message: str) -> None:
        super().info(message)
        self.console.print(message, highlight=False, markup=False)  # messages name slides and files: plain text

    def warn(self, message: str) -> None:
        from rich.text import Text

        super().warn(message)
        self.console.print(Text.assemble(("warning:", "yellow"), " ", message), highlight=False)

    @contextmanager
    def stage(self, description: str, total: int | None = None, unit: str = "it") -> Iterator[Stage]:
        if not self.live:
            with self._plain_stage(description, total, unit) as stage:
                yield stage
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        columns = [
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[extra]}"),
        ]
        with Progress(*columns, console=self.console, transient=False) as progress:
            task_id = progress.add_task(description, total=total, rate="", extra="")
            stage = Stage(self, task_id, total, unit)
            self._progress = progress
            try:
                yield stage
            finally:
                self._progress = None

    @contextmanager
    def _plain_stage(self, description: str, total: int | None, unit: str) -> Iterator[Stage]:
        stage = Stage(self, None, total, unit)
        self._fields[id(stage)] = {}
        finished = False
        try:
            yield stage
            finished = True
        finally:
            fields = self._fields.pop(id(stage), {})
            line = stage_line(description, stage.done, unit, time.perf_counter() - stage.started, fields, finished)
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    def _advance(self, stage: Stage, n: int) -> None:
        if getattr(self, "_progress", None) is not None:
            self._progress.update(stage.task_id, advance=n, rate=f"{stage.rate:,.1f} {stage.unit}/s")

    def _set(self, stage: Stage, fields: dict) -> None:
        if id(stage) in self._fields:
            self._fields[id(stage)].update(fields)
        elif getattr(self, "_progress", None) is not None:
            self._progress.update(stage.task_id, extra=_fields_text(fields))
