"""Progress and messages for long stages. The only module outside ``cli/`` that imports rich.

Library code takes a :class:`Reporter` (or ``None`` for silence) and calls ``stage`` / ``advance`` /
``info``; the CLI passes a :class:`RichReporter`, tests a :class:`Reporter` that prints nothing.
"""

from __future__ import annotations

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


class RichReporter(Reporter):
    """Rich progress bars with throughput and ETA, and coloured messages."""

    def __init__(self, console=None) -> None:
        super().__init__()
        from rich.console import Console

        self.console = console or Console(stderr=True)

    def info(self, message: str) -> None:
        super().info(message)
        self.console.print(message, highlight=False)

    def warn(self, message: str) -> None:
        super().warn(message)
        self.console.print(f"[yellow]warning:[/] {message}", highlight=False)

    @contextmanager
    def stage(self, description: str, total: int | None = None, unit: str = "it") -> Iterator[Stage]:
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

    def _advance(self, stage: Stage, n: int) -> None:
        if getattr(self, "_progress", None) is not None:
            self._progress.update(stage.task_id, advance=n, rate=f"{stage.rate:,.1f} {stage.unit}/s")

    def _set(self, stage: Stage, fields: dict) -> None:
        if getattr(self, "_progress", None) is not None:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            self._progress.update(stage.task_id, extra=text)
