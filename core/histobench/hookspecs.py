"""Hook specifications: every hook only *registers* components (the simonw/llm pattern).

A plugin implements any subset of these with ``@histobench.hookimpl``. ``register`` takes a component
class (a subclass of one of the bases in :mod:`histobench.components`), never an instance: components are
built later, by name, with validated options.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import typer

hookspec = pluggy.HookspecMarker("histobench")

Register = Callable[[type], None]


@hookspec
def register_encoders(register: Register) -> None:
    """Register patch or region encoders (subclasses of :class:`histobench.components.Encoder`).

    :param register: call ``register(EncoderClass)`` once per encoder.
    """


@hookspec
def register_pretexts(register: Register) -> None:
    """Register self-supervised pretext tasks (subclasses of :class:`histobench.components.Pretext`).

    :param register: call ``register(PretextClass)`` once per pretext.
    """


@hookspec
def register_aggregators(register: Register) -> None:
    """Register slide-level heads (subclasses of :class:`histobench.components.Aggregator`).

    :param register: call ``register(AggregatorClass)`` once per aggregator.
    """


@hookspec
def register_tasks(register: Register) -> None:
    """Register downstream tasks (subclasses of :class:`histobench.components.Task`).

    :param register: call ``register(TaskClass)`` once per task.
    """


@hookspec
def register_segmenters(register: Register) -> None:
    """Register nuclei segmenters (subclasses of :class:`histobench.components.Segmenter`).

    :param register: call ``register(SegmenterClass)`` once per segmenter.
    """


@hookspec
def register_text_encoders(register: Register) -> None:
    """Register text encoders (subclasses of :class:`histobench.components.TextEncoder`).

    :param register: call ``register(TextEncoderClass)`` once per text encoder.
    """


@hookspec
def register_protocols(register: Register) -> None:
    """Register named evaluation protocols (subclasses of :class:`histobench.components.Protocol`).

    :param register: call ``register(ProtocolClass)`` once per protocol.
    """


@hookspec
def register_analyses(register: Register) -> None:
    """Register analyses of trained encoders (subclasses of :class:`histobench.components.Analysis`).

    :param register: call ``register(AnalysisClass)`` once per analysis.
    """


@hookspec
def register_commands(app: "typer.Typer") -> None:
    """Add commands to the CLI.

    :param app: the root Typer app; use ``app.command()`` or ``app.add_typer()``.
    """
