"""histobench.locks: one writer per output, waiting with a reporter line, and takeover of dead owners' locks."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from histobench.errors import HistobenchError
from histobench.locks import LockOwner, OutputLock, lock_path, process_start
from histobench.reporting import Reporter

PY = sys.executable


def _child(code: str, *args: str) -> subprocess.Popen:
    """A python child running ``code`` (with ``from histobench.locks import OutputLock`` done)."""
    src = "import sys, time, os, signal\nfrom histobench.locks import OutputLock\n" + textwrap.dedent(code)
    return subprocess.Popen([PY, "-c", src, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _dead_pid() -> int:
    p = subprocess.Popen([PY, "-c", "pass"])
    p.wait()  # reaped: the PID is free
    return p.pid


def _write_owner(target, **fields) -> None:
    me = LockOwner.current()
    record = {"host": me.host, "pid": me.pid, "start": me.start, "boot": me.boot, "command": "test",
              "created": time.time(), **fields}
    lock_path(target).write_text(json.dumps(record))


def test_acquire_writes_the_owner_and_release_removes_it(tmp_path):
    target = tmp_path / "slide.npz"
    with OutputLock(target) as lock:
        assert lock.held and lock.path == tmp_path / "slide.npz.lock"
        owner = json.loads(lock.path.read_text())
        assert owner["pid"] == os.getpid() and owner["start"] == process_start(os.getpid())
        assert owner["host"] and owner["command"]
    assert not lock.path.exists() and not lock.held
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary file is left either
    # a folder's lock sits beside it, not inside it
    assert OutputLock(tmp_path / "pretrain" / "dino-abc").path == tmp_path / "pretrain" / "dino-abc.lock"


def test_a_live_holder_blocks_and_a_waiter_reuses_its_output(tmp_path):
    target = tmp_path / "feat.h5"
    child = _child("""
        lock = OutputLock(sys.argv[1]).acquire()
        print("locked", flush=True)
        time.sleep(1.5)
        open(sys.argv[1], "w").write("done")
        lock.release()
    """, str(target))
    assert child.stdout.readline().strip() == "locked"
    probe = OutputLock(target)
    assert not probe.try_acquire() and probe.owner.pid == child.pid and probe.owner.alive() is True
    rep = Reporter()
    t0 = time.monotonic()
    with OutputLock(target, rep, poll=0.05) as lock:
        waited = time.monotonic() - t0
        assert target.read_text() == "done"  # the waiter finds the finished output
    assert child.wait(10) == 0
    assert 0.5 < waited < 8 and lock.waited == pytest.approx(waited, abs=0.2)
    assert rep.messages == [f"waiting for {target}, locked by pid {child.pid}"]


def test_a_sigkilled_owner_is_taken_over_and_the_log_says_so(tmp_path):
    target = tmp_path / "tiles.npz"
    child = _child("""
        lock = OutputLock(sys.argv[1]).acquire()
        os.kill(os.getpid(), signal.SIGKILL)
    """, str(target))
    assert child.wait(30) == -signal.SIGKILL
    assert lock_path(target).exists()  # a crash leaves its lock file behind
    rep = Reporter()
    t0 = time.monotonic()
    with OutputLock(target, rep) as lock:
        assert time.monotonic() - t0 < 1.0  # taken over at once, not after a timeout
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        assert lock.took_over == [child.pid]
    assert rep.messages == [f"warning: took over the lock on {target} left by dead pid {child.pid}"]


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "no-flock"])
def test_a_dead_or_recycled_pid_is_taken_over(tmp_path, monkeypatch, flock):
    import histobench.locks as locks

    if not flock:  # a file system without flock: the PID and its start time decide
        monkeypatch.setattr(locks, "_flock", lambda fd: None)
    dead = tmp_path / "a.npz"
    pid = _dead_pid()
    _write_owner(dead, pid=pid, start="1")
    rep = Reporter()
    with OutputLock(dead, rep) as lock:
        assert lock.took_over == [pid]
    assert rep.messages[-1].endswith(f"left by dead pid {pid}")

    # a PID that exists again, but started at another time, is not the owner (recycled PID)
    sleeper = subprocess.Popen([PY, "-c", "import time; time.sleep(30)"])
    try:
        recycled = tmp_path / "b.npz"
        _write_owner(recycled, pid=sleeper.pid, start="12345")
        rep = Reporter()
        assert OutputLock(recycled, rep).try_acquire()
        assert "its PID now belongs to another process" in rep.messages[-1]
        # ... and the same PID with its real start time holds the lock
        alive = tmp_path / "c.npz"
        _write_owner(alive, pid=sleeper.pid, start=process_start(sleeper.pid))
        # (the sleeper holds no kernel lock on it: the record alone says its owner is alive)
        assert not OutputLock(alive).try_acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lock_held_on_another_host_is_waited_for_with_a_timeout(tmp_path):
    target = tmp_path / "x.h5"
    _write_owner(target, host="gpu-node-17", pid=4242, boot="")
    lock = OutputLock(target, Reporter(), poll=0.05, timeout=0.3)
    with pytest.raises(HistobenchError) as err:
        lock.acquire()
    msg = str(err.value)
    assert "pid 4242 on host gpu-node-17" in msg and str(lock_path(target)) in msg and "\n" not in msg
    assert lock_path(target).exists()  # never deleted: its owner may be alive


def test_unreadable_lock_file_is_held_while_fresh_then_taken_over(tmp_path, monkeypatch):
    import histobench.locks as locks

    target = tmp_path / "y.npz"
    lock_path(target).write_text("{not json")
    assert not OutputLock(target).try_acquire()
    monkeypatch.setattr(locks, "_UNREADABLE_GRACE_S", 0.0)
    rep = Reporter()
    assert OutputLock(target, rep).try_acquire()
    assert "unreadable lock file" in rep.messages[-1]


def test_many_processes_take_turns_and_never_overlap(tmp_path):
    """Four processes increment a counter file 5 times each under the lock, with a read-sleep-write race
    window; a stale lock of a dead process is there at the start, so all of them race to take it over."""
    target = tmp_path / "counter"
    target.write_text("0")
    _write_owner(target, pid=_dead_pid(), start="1")
    code = """
        from pathlib import Path
        p = Path(sys.argv[1])
        for _ in range(5):
            with OutputLock(p, poll=0.01, max_poll=0.05):
                n = int(p.read_text())
                time.sleep(0.01)
                p.write_text(str(n + 1))
    """
    children = [_child(code, str(target)) for _ in range(4)]
    for c in children:
        assert c.wait(120) == 0, c.stderr.read()
    assert target.read_text() == "20"
    assert not lock_path(target).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["counter"]
