"""Per-output locks, so that two processes on one work directory never write the same cached output.

Each cached output of a stage (a slide's tile set, a slide's feature file, a slide's segmentation file, a
pretraining checkpoint folder, the decoded-tile cache) is guarded by ``<output>.lock``, a small JSON file
naming its owner: host, PID, the process's start time (so that a recycled PID is not taken for the owner),
boot id and command line. The pattern, as TRIDENT's per-slide locks do it::

    if not complete(out):
        with OutputLock(out, reporter):
            if not complete(out):      # another process may have made it while we waited
                make(out)

A second process that wants the same output waits (polling, one line "waiting for <output>, locked by pid
N") and then finds the output complete and reuses it. A lock whose owner is gone is taken over, with a line
"took over the lock on <output> left by dead pid N".

How a lock is made: the owner record is written to a private temporary file, which is ``flock``-ed and then
hard-linked to ``<output>.lock`` (``link`` fails if the name exists, so exactly one process wins, and the
file is complete and kernel-locked from the moment it appears). The ``flock`` dies with its process, so a
crashed owner on a local file system is recognised at once, without trusting PIDs; the PID and start-time
check covers file systems without ``flock``. A takeover happens while holding the dead file's ``flock`` and
only if the name still points at that file, so two waiters never both take over, nor delete a fresh lock.

POSIX only (``fcntl``); elsewhere, or where ``link`` or ``flock`` are not supported, it degrades to an
``O_EXCL`` create and the PID check. A lock held by a process on another host is waited for (its PID cannot be
checked from here); the waiting line names the lock file to delete should that host have died.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from histobench.errors import HistobenchError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

# An owner record that cannot be parsed (a file made by the O_EXCL fallback, caught between its creation and
# its write) counts as held for this long after its last change.
_UNREADABLE_GRACE_S = 10.0


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock: enough to tell whether that process is still the one that took it."""

    host: str
    pid: int
    start: str  # the process's start time, from /proc (clock ticks since boot); "" where unknown
    boot: str  # /proc/sys/kernel/random/boot_id; "" where unknown
    command: str
    created: float

    @classmethod
    def current(cls) -> "LockOwner":
        pid = os.getpid()
        return cls(host=socket.gethostname(), pid=pid, start=process_start(pid), boot=_boot_id(),
                   command=" ".join(sys.argv)[:300], created=time.time())

    @classmethod
    def parse(cls, text: str) -> "LockOwner | None":
        try:
            d = json.loads(text)
            return cls(host=str(d["host"]), pid=int(d["pid"]), start=str(d.get("start", "")),
                       boot=str(d.get("boot", "")), command=str(d.get("command", "")),
                       created=float(d.get("created", 0.0)))
        except (ValueError, KeyError, TypeError):
            return None

    def on_this_host(self) -> bool:
        me_boot = _boot_id()
        return self.host == socket.gethostname() and (not self.boot or not me_boot or self.boot == me_boot)

    def alive(self) -> bool | None:
        """True/False for a process on this host (False also when its PID now belongs to another process);
        None for one on another host, which cannot be checked from here."""
        if not self.on_this_host():
            return None
        if not pid_exists(self.pid):
            return False
        now = process_start(self.pid)
        return not (self.start and now and now != self.start)

    def describe(self) -> str:
        where = "" if self.on_this_host() else f" on host {self.host}"
        return f"pid {self.pid}{where}"


def pid_exists(pid: int) -> bool:
    """Whether a process with this PID exists on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def process_start(pid: int) -> str:
    """A process's start time (field 22 of ``/proc/<pid>/stat``, clock ticks after boot); "" where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return ""


_BOOT: list[str] = []


def _boot_id() -> str:
    if not _BOOT:
        try:
            _BOOT.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        except OSError:
            _BOOT.append("")
    return _BOOT[0]


def lock_path(target: str | os.PathLike[str]) -> Path:
    """``<target>.lock`` beside the output (for a folder: beside the folder, not inside it)."""
    p = Path(target)
    return p.with_name(p.name + ".lock")


def _flock(fd: int) -> bool | None:
    """An exclusive non-blocking ``flock``: True if taken, False if another open file holds it, None if the
    platform or file system does not support it."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


class OutputLock:
    """The lock of one output path. ``with OutputLock(path, reporter):`` waits for it; :meth:`try_acquire`
    takes it only if free (or left by a dead process). Not re-entrant: one holder per output per process."""

    def __init__(self, target: str | os.PathLike[str], reporter: Any = None, *, poll: float = 0.2,
                 max_poll: float = 2.0, timeout: float | None = None):
        self.target = Path(target)
        self.path = lock_path(self.target)
        self.reporter = reporter
        self.poll, self.max_poll, self.timeout = poll, max_poll, timeout
        self.owner: LockOwner | None = None  # the other holder seen by the last failed attempt
        self.waited = 0.0  # seconds the last acquire() waited
        self.took_over: list[int] = []  # PIDs of dead owners whose lock this one took over
        self._fd: int | None = None
        self._ino: int | None = None

    # ------------------------------------------------------------------------------------------ public
    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free or its owner is dead; False if a live process holds it."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(1000):
            if self._create():
                return True
            verdict = self._inspect()
            if verdict == "held":
                return False
            # "gone" (released meanwhile) or "taken over": try to create it again
        raise HistobenchError(f"cannot take the lock {self.path}: it keeps changing hands")  # pragma: no cover

    def acquire(self) -> "OutputLock":
        """Wait until the lock is ours (one reporter line if it is busy); :class:`HistobenchError` after
        ``timeout`` seconds, if given."""
        t0 = time.monotonic()
        delay, said = self.poll, False
        while not self.try_acquire():
            waited = time.monotonic() - t0
            if not said:
                self._say("info", f"waiting for {self.target}, locked by {self._holder()}")
                said = True
            if self.timeout is not None and waited >= self.timeout:
                raise HistobenchError(f"gave up after {waited:.0f} s waiting for {self.target}, locked by "
                                      f"{self._holder()}; delete {self.path} if that process is gone")
            time.sleep(delay)
            delay = min(delay * 1.5, self.max_poll)
        self.waited = time.monotonic() - t0
        return self

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and drop the ``flock``."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            try:
                if os.stat(self.path).st_ino == self._ino:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        finally:
            os.close(fd)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a lock object dropped without release (an error path): do not leak it
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ----------------------------------------------------------------------------------------- private
    def _say(self, level: str, message: str) -> None:
        if self.reporter is not None:
            getattr(self.reporter, level)(message)

    def _holder(self) -> str:
        if self.owner is None:
            return f"an unknown process (see {self.path})"
        text = self.owner.describe()
        if self.owner.alive() is None:
            text += f" (delete {self.path} if that host's process is gone)"
        return text

    def _record(self) -> bytes:
        return json.dumps(asdict(LockOwner.current()), sort_keys=True).encode()

    def _create(self) -> bool:
        """Make the lock file, complete and ``flock``-ed, under its name; False if the name exists."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        linked = False
        try:
            os.write(fd, self._record())
            _flock(fd)
            try:
                os.link(tmp, self.path)
                linked = True
            except FileExistsError:
                return False
            except OSError:  # no hard links here: an exclusive create, written right after
                return self._create_excl()
        finally:
            if not linked:
                os.close(fd)
            tmp.unlink(missing_ok=True)
        self._fd, self._ino = fd, os.fstat(fd).st_ino
        return True

    def _create_excl(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return False
        _flock(fd)
        os.write(fd, self._record())
        self._fd, self._ino = fd, os.fstat(fd).st_ino
        return True

    def _inspect(self) -> str:
        """``held`` (a live owner, recorded in ``self.owner``), ``gone`` (the name vanished or changed), or
        ``taken`` (the owner was dead: its file is removed, so the caller creates it again)."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return "gone"
        try:
            st = os.fstat(fd)
            flocked = _flock(fd)
            text = os.pread(fd, 65536, 0).decode("utf-8", "replace")
            self.owner = owner = LockOwner.parse(text)
            if flocked is False:  # its owner's kernel lock is alive
                return "held"
            if not self._same_file(st):  # released (and maybe re-made) since we opened it
                return "gone"
            if owner is None:
                if time.time() - st.st_mtime < _UNREADABLE_GRACE_S or flocked is None:
                    return "held"
                dead_pid = None
            else:
                alive = owner.alive()
                if alive is not False:  # alive, or on another host: wait for it
                    return "held"
                dead_pid = owner.pid
            # the owner is dead and, when flock works, we hold its file's kernel lock: nobody else can be
            # taking it over at the same time
            if not self._same_file(st):
                return "gone"
            os.unlink(self.path)
        finally:
            os.close(fd)
        if dead_pid is not None:
            self.took_over.append(dead_pid)
        recycled = owner is not None and pid_exists(owner.pid)
        who = f"dead pid {dead_pid}" + (" (its PID now belongs to another process)" if recycled else "") \
            if dead_pid is not None else "a process that left an unreadable lock file"
        self._say("warn", f"took over the lock on {self.target} left by {who}")
        return "taken"

    def _same_file(self, st: os.stat_result) -> bool:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)


def output_lock(target: str | os.PathLike[str], reporter: Any = None, **kwargs: Any) -> OutputLock:
    """``with output_lock(path, reporter):`` the lock of one output (see :class:`OutputLock`)."""
    return OutputLock(target, reporter, **kwargs)


def remove_temporaries(target: str | os.PathLike[str], patterns: tuple[str, ...]) -> int:
    """Delete what killed writers of ``target`` left beside it (glob ``patterns`` in its folder, each with
    ``{name}`` for the output's file name). Call it only while holding the output's lock. Returns the count."""
    p = Path(target)
    n = 0
    if not p.parent.is_dir():
        return 0
    for pattern in patterns:
        for old in p.parent.glob(pattern.format(name=p.name, stem=p.stem)):
            try:
                if old.is_dir():
                    continue
                old.unlink()
                n += 1
            except FileNotFoundError:
                pass
    return n


__all__ = ["LockOwner", "OutputLock", "output_lock", "lock_path", "pid_exists", "process_start",
           "remove_temporaries"]
