"""Shared CLI pieces: option aliases, completion, the error boundary, consoles."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from histobench.cli.output import EnvConsole
from histobench.errors import HistobenchError, disk_full_reason

console = EnvConsole()
err_console = EnvConsole(stderr=True)


def handle_errors(fn: Callable) -> Callable:
    """Turn a :class:`HistobenchError` into one red line on stderr and exit code 2 (never a traceback)."""

    from rich.markup import escape  # an error names user files and values: print them as text

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        code = 0
        try:
            return fn(*args, **kwargs)
        except HistobenchError as err:
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            code = 2
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: finished stages are cached; run the same command to resume")
            code = 130
            raise typer.Exit(130) from None
        except typer.Exit as done:
            code = done.exit_code
            raise
        except OSError as err:  # a full disk or a file-size limit, from any writer: one line, naming the file
            reason = disk_full_reason(err)
            if reason is None:
                code = None
                raise
            where = f" {err.filename}" if err.filename else " a file"
            err_console.print(f"[bold red]error:[/] cannot write{escape(where)}: {escape(reason)}; finished stages "
                              f"are kept", highlight=False, soft_wrap=True)
            code = 2
            raise typer.Exit(2) from None
        except BaseException:
            code = None  # a bug: its traceback is printed as usual
            raise
        finally:
            _leave_if_hdf5_abandoned(code)

    return wrapper


def _leave_if_hdf5_abandoned(code: int | None) -> None:
    """After a feature file's write failed for want of space, HDF5 would crash the interpreter's shutdown
    (:func:`histobench.features.cache.hdf5_abandoned`): leave now, with the command's exit code, once
    everything printed is flushed. Files and journals were written and synced before; a run left RUNNING
    in MLflow is marked interrupted by the next run."""
    cache = sys.modules.get("histobench.features.cache")
    if code is None or cache is None or not cache.hdf5_abandoned():
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _completer(kind: str):
    def complete(incomplete: str) -> list[str]:
        from histobench.registry import get_components

        try:
            return [n for n in get_components(kind) if n.startswith(incomplete)]
        except Exception:  # completion must never crash the shell
            return []

    return complete


TaskOpt = Annotated[str, typer.Option("--task", "-t", help="Task name (histobench tasks list).", autocompletion=_completer("task"))]
PretextOpt = Annotated[str, typer.Option("--pretext", "-p", help="Pretext name (histobench pretexts list), or 'none'.", autocompletion=_completer("pretext"))]
EncoderOpt = Annotated[Optional[str], typer.Option("--encoder", "-e", help="Encoder name (histobench encoders list); default: the pretext's (timm for tile pretexts).", autocompletion=_completer("encoder"))]
AggregatorOpt = Annotated[Optional[str], typer.Option("--aggregator", "-a", help="Aggregator (default: the task's).", autocompletion=_completer("aggregator"))]
OptionsOpt = Annotated[Optional[list[str]], typer.Option("--option", "-o", help="prefix.key=value, prefix one of encoder, pretext, aggregator, task, train, eval, segmenter, text_encoder. Repeatable.")]
DemoOpt = Annotated[bool, typer.Option("--demo", help="Use the task's synthetic stand-in cohort and CPU-sized presets.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of pretraining and aggregator training.")]
TrackingOpt = Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or MLflow's local store).", envvar="MLFLOW_TRACKING_URI")]
WorkdirOpt = Annotated[Path, typer.Option("--workdir", help="Where tiles, checkpoints and features are cached.", envvar="HISTOBENCH_WORKDIR")]
DataRootOpt = Annotated[Optional[Path], typer.Option("--data-root", help="Folder with the task's slides.", envvar="HISTOBENCH_DATA_ROOT")]
AllowOutsideOpt = Annotated[bool, typer.Option("--allow-outside-data-root", help="Read slides whose manifest paths resolve outside the data root (absolute paths, '..', symlinks out); refused by default.", envvar="HISTOBENCH_ALLOW_OUTSIDE_DATA_ROOT")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="torch device (default: cuda if available, else cpu).")]


def is_rank_zero() -> bool:
    """False in the non-zero ranks of a ``torchrun`` launch: they work silently, rank 0 reports."""
    return os.environ.get("RANK", "0") == "0"


def reporter():
    from histobench.reporting import Reporter, RichReporter

    return RichReporter(err_console.get()) if is_rank_zero() else Reporter()


def is_tty() -> bool:
    return sys.stdout.isatty()
FailFastOpt = Annotated[bool, typer.Option("--fail-fast", help="Stop at the first unusable slide instead of skipping it.")]
LeakyOpt = Annotated[bool, typer.Option("--allow-leaky-splits", help="Evaluate on a split where a patient sits on two sides (logged).")]
ProtocolOpt = Annotated[Optional[str], typer.Option("--protocol", help="Evaluation protocol (histobench protocols list); default frozen-mil. Its options: -o eval.NAME=VALUE.", autocompletion=_completer("protocol"))]
SegmenterOpt = Annotated[Optional[str], typer.Option("--segmenter", help="Nuclei segmenter for pretexts that need masks (histobench segmenters list); default: the pretext's.", autocompletion=_completer("segmenter"))]
TextEncoderOpt = Annotated[Optional[str], typer.Option("--text-encoder", help="Text encoder for pretexts that need text (histobench text-encoders list); default: the pretext's.", autocompletion=_completer("text_encoder"))]
PretrainTaskOpt = Annotated[Optional[str], typer.Option("--pretrain-task", help="Pretrain on this task's cohort instead of the evaluation cohort (labels never read).", autocompletion=_completer("task"))]
PretrainManifestOpt = Annotated[Optional[Path], typer.Option("--pretrain-manifest", help="Pretrain on the slides of this manifest CSV (slide_id, case_id, path) instead of the evaluation cohort.")]
SplitOpt = Annotated[Optional[str], typer.Option("--split", help="A published split preset of the task (e.g. hipt-10fold); default: the task's own patient-level folds.")]
