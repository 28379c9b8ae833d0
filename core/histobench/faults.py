"""Fault points: named places where a test can make histobench die as abruptly as a power cut or the OOM killer.

``fault_point("extract.batch")`` costs one dictionary lookup when ``HISTOBENCH_FAULT`` is unset. With
``HISTOBENCH_FAULT="extract.batch:3"`` the process sends itself SIGKILL the third time it reaches that point:
no ``finally`` block, no ``atexit`` handler and no buffered write runs, which is exactly what a crash leaves
behind. Several points may be armed at once, separated by commas. The fault-injection suite
(``tests/test_faults.py``) kills ``histobench run`` and the single-stage commands this way, then checks that
the same command, run again, finishes with the same metrics and that no cached file was lost or left corrupt.

The points (see :data:`POINTS`) sit where an interruption is most likely to hurt: between writing a file's
bytes and renaming it into place, in the middle of a feature file, a checkpoint, an epoch or a fold, and in
the middle of logging to MLflow.
"""

from __future__ import annotations

import os
import signal

ENV = "HISTOBENCH_FAULT"
TRACE_ENV = "HISTOBENCH_FAULT_TRACE"  # a file: at exit, how often each point was passed (JSON), for the suite

# name -> where it is; the suite draws its moments from these
POINTS: dict[str, str] = {
    "tile.slide": "after each slide's tile set is in place (tiling)",
    "tile.rename": "a tile set's temporary file is written, not yet renamed",
    "pretrain.step": "after each optimizer step (mid-epoch)",
    "pretrain.checkpoint_half": "half of a checkpoint's bytes are written to its temporary file",
    "pretrain.checkpoint_rename": "a checkpoint's temporary file is complete, not yet renamed",
    "extract.batch": "after each batch of features is appended to an unfinished feature file",
    "evaluate.fold": "after each evaluation fold",
    "evaluate.epoch": "after each epoch of an aggregator's training, inside a fold",
    "track.log": "inside Tracker.metrics / Tracker.artifact, before MLflow is called",
}

_armed: dict[str, int] | None = None  # parsed once per process: {name: n}
_counts: dict[str, int] = {}


def parse(spec: str) -> dict[str, int]:
    """``"a:3,b:1"`` -> ``{"a": 3, "b": 1}`` (a name without a count means its first passage)."""
    out: dict[str, int] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, n = part.rpartition(":") if ":" in part else (part, "", "1")
        try:
            count = int(n)
        except ValueError:
            raise ValueError(f"{ENV}={spec!r}: {part!r} is not NAME:N") from None
        if count < 1:
            raise ValueError(f"{ENV}={spec!r}: N must be at least 1 in {part!r}")
        out[name] = count
    return out


def _load() -> dict[str, int]:
    global _armed
    spec = os.environ.get(ENV, "")
    _armed = parse(spec) if spec else {}
    trace = os.environ.get(TRACE_ENV)
    if trace:  # count every point (the suite learns how many passages a run has, to draw its moments)
        import atexit

        _armed = {**{name: 0 for name in POINTS}, **_armed}  # 0: counted, never fired
        atexit.register(_write_trace, trace, os.getpid())
    return _armed


def _write_trace(path: str, pid: int) -> None:
    import json

    if os.getpid() == pid:  # not in a forked child that inherited the handler
        with open(path, "w") as fh:
            json.dump(_counts, fh)


def armed(name: str | None = None) -> bool:
    """Whether any fault (or the one named) is armed in this process."""
    table = _armed if _armed is not None else _load()
    return any(n > 0 for n in table.values()) if name is None else table.get(name, 0) > 0


def fault_point(name: str) -> None:
    """Die by SIGKILL if ``HISTOBENCH_FAULT`` arms ``name`` and this is its n-th passage; else nothing."""
    table = _armed if _armed is not None else _load()
    if not table or name not in table:
        return
    n = _counts.get(name, 0) + 1
    _counts[name] = n
    if n == table[name]:
        os.kill(os.getpid(), signal.SIGKILL)


def reset() -> None:
    """Forget the parsed environment and the counts (for tests that change ``HISTOBENCH_FAULT``)."""
    global _armed
    _armed = None
    _counts.clear()


__all__ = ["ENV", "POINTS", "armed", "fault_point", "parse", "reset"]
