"""The tracking journal: every call a run makes to the tracking store, one JSON line each, appended and fsynced.

``WORKDIR/runs/<run id>/journal.jsonl`` holds, in order:

- ``open``: the store's URI, the experiment and the owner process;
- one line per call (``start``, ``bind``, ``params``, ``tags``, ``metrics``, ``artifact``, ``text``, ``figure``,
  ``end``), each with a sequence number ``seq`` and the local key of the run it belongs to;
- ``offline`` (``from``: the first call the store did not take) if the store failed mid-run; after it,
  ``superseded`` marks an artifact call whose file was copied beside the journal (the copy is replayed);
- during a later replay, ``replayed`` after each pending call that reached the store, then ``synced``.

A journal is *pending* when it has an ``offline`` line and no ``synced`` line. The calls from ``offline.from``
on, less those already ``replayed``, are what the store still lacks. The format is the project's own; the idea
is a write-ahead log, as in databases (Mohan et al., "ARIES", ACM TODS 1992).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

FILENAME = "journal.jsonl"
DATA_OPS = ("start", "params", "tags", "metrics", "artifact", "end")


class Journal:
    """Append-only writer of one journal file; every line reaches the disk before :meth:`append` returns."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entries = read(self.path)
        self.seq = max((e.get("seq", -1) for e in entries), default=-1) + 1
        self._fh = open(self.path, "a", encoding="utf-8")

    def append(self, entry: dict[str, Any]) -> int:
        """Write one line; returns its sequence number."""
        seq = self.seq
        self.seq += 1
        self._fh.write(json.dumps({"seq": seq, **entry}, default=str) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        return seq

    def close(self) -> None:
        self._fh.close()


def read(path: Path) -> list[dict[str, Any]]:
    """The journal's lines; a last line cut short by a crash is dropped."""
    out = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def header(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return next((e for e in entries if e.get("op") == "open"), {})


def is_pending(entries: list[dict[str, Any]]) -> bool:
    ops = {e.get("op") for e in entries}
    return "offline" in ops and "synced" not in ops


def pending_calls(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The calls the store still lacks, in order."""
    start = min((e["from"] for e in entries if e.get("op") == "offline"), default=None)
    if start is None:
        return []
    done = {e["of"] for e in entries if e.get("op") in ("replayed", "superseded")}
    return [e for e in entries if e.get("op") in DATA_OPS and e["seq"] >= start and e["seq"] not in done]


def run_ids(entries: list[dict[str, Any]]) -> dict[str, str]:
    """Local run key -> store run id, for every run the store has (bound during the run or at replay)."""
    ids = {e["key"]: e["run_id"] for e in entries if e.get("op") == "bind"}
    ids.update({e["key"]: e["run_id"] for e in entries if e.get("op") == "replayed" and e.get("run_id")})
    return ids


def journals(root: Path) -> Iterator[Path]:
    """Every journal under ``root`` (``WORKDIR/runs``)."""
    root = Path(root)
    if root.is_dir():
        yield from sorted(root.glob(f"*/{FILENAME}"))
