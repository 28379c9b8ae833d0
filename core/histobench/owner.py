"""Which process owns a run, and whether that process still lives.

A run is stamped with its owner: the host name, the PID and the PID's start time. The start time matters
because PIDs are recycled: a PID that is alive today may belong to a different program than the one that
started the run yesterday. On Linux the start time is the process's start in clock ticks since boot
(``/proc/<pid>/stat``, field 22) prefixed with the kernel's boot id, so it also changes across reboots; where
``/proc`` is missing, ``psutil`` is used if installed, else only the PID is checked.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

HOST_TAG = "histobench.owner.host"
PID_TAG = "histobench.owner.pid"
STARTED_TAG = "histobench.owner.started"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start ticks) of a PID from ``/proc``; ``None`` if there is no such process (or no ``/proc``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], fields[19]


def process_started(pid: int) -> str:
    """A token that identifies the process ``pid`` among all processes this host ever ran ("" if unknown)."""
    if Path("/proc/self/stat").exists():
        st = _proc_stat(pid)
        return f"{_boot_id()}:{st[1]}" if st else ""
    try:
        import psutil

        return f"{psutil.Process(pid).create_time():.2f}"
    except Exception:  # no psutil, or no such process
        return ""


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: str

    def tags(self) -> dict[str, str]:
        return {HOST_TAG: self.host, PID_TAG: str(self.pid), STARTED_TAG: self.started}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> "Owner | None":
        """The owner named by a run's tags; ``None`` for runs without owner tags (older histobench)."""
        try:
            return cls(tags[HOST_TAG], int(tags[PID_TAG]), tags.get(STARTED_TAG, ""))
        except (KeyError, ValueError):
            return None

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """True while the owning process runs. Only meaningful on the owner's host (check :meth:`on_this_host`)."""
        if self.pid <= 0:
            return False
        if self.pid == os.getpid():
            return self.started == me().started
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: it exists
            pass
        if Path("/proc/self/stat").exists():
            st = _proc_stat(self.pid)
            if st is None or st[0] in ("Z", "X"):  # gone, or a zombie nobody reaped yet
                return False
        now = process_started(self.pid)
        return not (now and self.started and now != self.started)  # a recycled PID is another process


def me() -> Owner:
    """This process as an owner."""
    pid = os.getpid()
    return Owner(socket.gethostname(), pid, process_started(pid))
