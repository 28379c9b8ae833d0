"""Tracking-store trouble (issue 14, part 3): runs of dead processes are marked FAILED, an unreachable store is a
one-line error before any compute, and a store that fails mid-run loses no result (the journal replays it).

The last test stops a real ``mlflow server`` in the middle of ``histobench run``; it is marked ``slow`` (two
server starts take a minute or more on a busy 2-core machine).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from histobench.cli.app import build_app

runner = CliRunner()
SMALL = ["-o", "task.demo_patients=12", "-o", "task.demo_slide_px=1536", "-o", "task.folds=3", "-o", "eval.epochs=8"]
# what these tests measure is the store, not the folds: the smallest demo that still evaluates
TINY = ["-o", "task.demo_patients=6", "-o", "task.demo_slide_px=1536", "-o", "task.folds=2", "-o", "eval.epochs=2",
        "-o", "eval.min_test_per_class=0"]
TASK = "tcga-nsclc"


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri, experiment=TASK):
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else list(client.search_runs([exp.experiment_id], max_results=1000))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- 1. interrupted runs ---------------------------------------------------------------------------------------

def test_owner_is_alive_only_while_its_process_runs():
    from histobench.owner import Owner, me, process_started

    mine = me()
    assert mine.alive() and mine.on_this_host() and mine.started
    assert Owner.from_tags(mine.tags()) == mine
    assert Owner.from_tags({"histobench.stage": "run"}) is None  # a run of an older histobench
    assert not Owner(mine.host, _dead_pid(), "").alive()
    assert not Owner(mine.host, mine.pid, mine.started + "0").alive()  # the same PID, another process
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert Owner(mine.host, sleeper.pid, process_started(sleeper.pid)).alive()
        sleeper.kill()
        sleeper.wait()
        assert not Owner(mine.host, sleeper.pid, process_started(sleeper.pid)).alive()
    finally:
        sleeper.kill()


def test_a_new_run_marks_runs_of_dead_owners_failed_and_leaves_the_others(tracking_uri, tmp_path):
    from histobench.owner import Owner, me, process_started
    from histobench.reporting import Reporter
    from histobench.tracking import Tracker

    client = _client(tracking_uri)
    exp = client.create_experiment(TASK)
    host = me().host
    sleeper = subprocess.Popen(["sleep", "60"])
    owners = {
        "dead": Owner(host, _dead_pid(), "boot:1"),
        "recycled": Owner(host, os.getpid(), "boot:1"),  # this PID, but not the process that started the run
        "live": Owner(host, sleeper.pid, process_started(sleeper.pid)),
        "other-host": Owner(host + "-elsewhere", _dead_pid(), "boot:1"),
    }
    try:
        ids = {name: client.create_run(exp, tags={"histobench.stage": "run", **o.tags()}, run_name=name).info.run_id
               for name, o in owners.items()}
        ids["legacy"] = client.create_run(exp, tags={"histobench.stage": "run"}, run_name="legacy").info.run_id
        ids["not-ours"] = client.create_run(exp, tags=owners["dead"].tags(), run_name="not-ours").info.run_id
        rep = Reporter()
        with Tracker(tracking_uri, reporter=rep).run(TASK, "new", stage="run") as new_id:
            new = client.get_run(new_id)
            assert Owner.from_tags(new.data.tags) == me()  # every run is stamped with its owner
        status = {name: client.get_run(i).info.status for name, i in ids.items()}
        assert status == {"dead": "FAILED", "recycled": "FAILED", "live": "RUNNING", "other-host": "RUNNING",
                          "legacy": "RUNNING", "not-ours": "RUNNING"}
        for name in ("dead", "recycled"):
            assert client.get_run(ids[name]).data.tags["histobench.interrupted"] == "true"
        (line,) = [m for m in rep.messages if "interrupted" in m]
        assert "2 interrupted run(s)" in line and "'dead'" in line and "'recycled'" in line
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_run_owned_by_a_live_process_stays_running(tracking_uri, tmp_path):
    """A concurrent ``histobench`` process holds a run open; another run on the store leaves it RUNNING."""
    from histobench.tracking import Tracker

    ready = tmp_path / "ready"
    script = (f"import time, pathlib\nfrom histobench.tracking import Tracker\n"
              f"with Tracker({tracking_uri!r}).run({TASK!r}, 'concurrent', stage='run') as rid:\n"
              f"    pathlib.Path({str(ready)!r}).write_text(rid)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert proc.poll() is None and time.time() < deadline, "the concurrent run did not start"
            time.sleep(0.2)
        other = ready.read_text()
        with Tracker(tracking_uri).run(TASK, "mine", stage="run"):
            pass
        assert _client(tracking_uri).get_run(other).info.status == "RUNNING"
        proc.kill()
        proc.wait()
        with Tracker(tracking_uri).run(TASK, "after", stage="run"):
            pass
        assert _client(tracking_uri).get_run(other).info.status == "FAILED"  # once its process is gone
    finally:
        proc.kill()


def test_sigkilled_histobench_run_is_marked_failed_by_the_next_run(tmp_path):
    """``histobench run`` is SIGKILLed during pretraining; the next run ends its parent and nested runs FAILED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    work = tmp_path / "work"
    common = ["--task", TASK, "--demo", "--workdir", str(work), "--tracking-uri", uri, *TINY]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    _client(uri).search_experiments()  # the store exists before two processes use it
    proc = subprocess.Popen([sys.executable, "-m", "histobench", "run", "--pretext", "dino", *common,
                             "-o", "train.epochs=50"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "pretraining never started"
            stages = {r.data.tags.get("histobench.stage"): r.info.status for r in _runs(uri)}
            if stages.get("pretrain") == "RUNNING":
                break
            time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    dead = {r.info.run_id: r for r in _runs(uri)}
    assert sorted(r.data.tags["histobench.stage"] for r in dead.values()) == ["pretrain", "run"]
    assert {r.info.status for r in dead.values()} == {"RUNNING"}  # what a SIGKILL leaves behind
    assert {r.data.tags["histobench.owner.pid"] for r in dead.values()} == {str(proc.pid)}

    result = runner.invoke(build_app(), ["run", "--pretext", "none", *common], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "marked 2 interrupted run(s)" in result.output and f"pid {proc.pid}" in result.output
    after = {r.info.run_id: r for r in _runs(uri)}
    for run_id in dead:
        assert after[run_id].info.status == "FAILED"
        assert after[run_id].data.tags["histobench.interrupted"] == "true"
    assert not [r for r in after.values() if r.info.status == "RUNNING"]
    assert sum(r.info.status == "FINISHED" for r in after.values()) == 1 + 1 + 2  # the rerun: parent, extract, folds


# -- 2. an unreachable store -------------------------------------------------------------------------------------

def _unreachable(kind: str, tmp_path: Path) -> str:
    if kind == "closed-port":
        return f"http://127.0.0.1:{_free_port()}"
    if kind == "bogus-scheme":
        return "bogus+store://nowhere/mlflow"
    blocked = tmp_path / "a-file"  # a file where the store's folder should be: unwritable, even for root
    blocked.write_text("")
    return f"sqlite:///{blocked / 'mlflow.db'}"


@pytest.mark.parametrize("kind", ["closed-port", "bogus-scheme", "unwritable-sqlite"])
def test_unreachable_tracking_uri_is_one_line_before_any_compute(kind, tmp_path):
    uri = _unreachable(kind, tmp_path)
    work = tmp_path / "work"
    t0 = time.perf_counter()
    result = runner.invoke(build_app(), ["run", "--pretext", "dino", "--task", TASK, "--demo", "--workdir", str(work),
                                         "--tracking-uri", uri, *SMALL], env={"COLUMNS": "300"})
    seconds = time.perf_counter() - t0
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: tracking store ") and uri in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert seconds < 30, seconds  # not MLflow's minutes of retries
    assert not (work / "tiles").exists() and not (work / "demo").exists()  # nothing was computed


def test_evaluate_checks_the_store_before_reading_the_cohort(tmp_path):
    uri = _unreachable("closed-port", tmp_path)
    feats = tmp_path / "feats"
    feats.mkdir()
    work = tmp_path / "work"
    result = runner.invoke(build_app(), ["evaluate", "--task", TASK, "--demo", "--features", str(feats), "--workdir",
                                         str(work), "--tracking-uri", uri], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and uri in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.output
    assert not (work / "demo").exists()  # the synthetic cohort was not made


# -- 3. a store that fails mid-run -------------------------------------------------------------------------------

class _Down:
    """Stands in for an MLflow client whose server has gone: every call fails."""

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise ConnectionError("Connection refused")

        return fail


def test_store_failing_mid_run_goes_to_the_journal_and_the_next_run_replays_it(tracking_uri, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from histobench import journal as jr
    from histobench.reporting import Reporter
    from histobench.tracking import Tracker

    status = tmp_path / "status.csv"
    status.write_text("slide,problem\na,none\n")
    rep = Reporter()
    tracker = Tracker(tracking_uri, journal_dir=tmp_path / "runs", reporter=rep)
    with tracker.run(TASK, "parent", stage="run") as parent_id:
        tracker.params({"run": {"pretext": "dino", "seed": 0}})
        with tracker.run(TASK, "pretrain dino", stage="pretrain", nested=True) as pre_id:
            tracker.metrics({"loss": 2.0}, step=0)
            tracker._client = _Down()  # the server goes away here
            tracker.metrics({"loss": 1.5}, step=1)
            tracker.artifact(status, "tables")
        status.write_text("slide,problem\nchanged,later\n")  # a shared file changes after it was logged
        for k in range(2):
            with tracker.run(TASK, f"fold {k}", stage="fold", nested=True) as fold_id:
                assert fold_id is None  # started while the store was down
                tracker.params({"fold": k})
                tracker.metrics({"macro_auc": 0.5 + k / 10})
        tracker.metrics({"macro_auc_fold_mean": 0.55})
        tracker.text("hello", "notes/readme.txt")
        fig = plt.figure()
        tracker.figure(fig, "plots/empty.png")
        plt.close(fig)
    assert tracker.offline
    assert sum("failed" in m for m in rep.messages) == 1 and tracker.journal_path.name == "journal.jsonl"
    assert jr.is_pending(jr.read(tracker.journal_path))
    client = _client(tracking_uri)
    assert client.get_run(parent_id).info.status == "RUNNING" and client.get_run(pre_id).info.status == "RUNNING"

    rep2 = Reporter()
    with Tracker(tracking_uri, journal_dir=tmp_path / "runs", reporter=rep2).run(TASK, "next", stage="run"):
        pass
    assert any("logged" in m and parent_id in m for m in rep2.messages), rep2.messages
    assert not any("interrupted" in m for m in rep2.messages)  # replayed, not reaped
    entries = jr.read(tracker.journal_path)
    assert not jr.is_pending(entries) and entries[-1]["op"] == "synced"

    parent, pre = client.get_run(parent_id), client.get_run(pre_id)
    assert parent.info.status == "FINISHED" and pre.info.status == "FINISHED"
    assert parent.data.params["run.pretext"] == "dino" and parent.data.metrics["macro_auc_fold_mean"] == 0.55
    assert [m.value for m in client.get_metric_history(pre_id, "loss")] == [2.0, 1.5]
    folds = sorted((r for r in _runs(tracking_uri) if r.data.tags.get("histobench.stage") == "fold"),
                   key=lambda r: r.info.run_name)
    assert [(r.info.run_name, r.data.params["fold"], r.data.metrics["macro_auc"], r.info.status) for r in folds] == \
        [("fold 0", "0", 0.5, "FINISHED"), ("fold 1", "1", 0.6, "FINISHED")]
    assert {r.data.tags["mlflow.parentRunId"] for r in folds} == {parent_id}
    arts = {a.path for a in client.list_artifacts(parent_id, "notes")} | {a.path for a in client.list_artifacts(parent_id, "plots")}
    assert arts == {"notes/readme.txt", "plots/empty.png"}
    logged = Path(client.download_artifacts(pre_id, "tables/status.csv", str(tmp_path / "dl")))
    assert logged.read_text() == "slide,problem\na,none\n"  # the file as it was when the run logged it

    # a second sync finds nothing left to do
    rep3 = Reporter()
    assert Tracker(tracking_uri, journal_dir=tmp_path / "runs", reporter=rep3).sync(tmp_path / "runs") == 0
    assert len([r for r in _runs(tracking_uri) if r.data.tags.get("histobench.stage") == "fold"]) == 2


# -- the same, with a real MLflow server that the test stops -------------------------------------------------------

def _start_server(root: Path, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            cwd=root, stdout=open(root / "server.log", "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 240
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                _stop_server(proc)
                raise AssertionError("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])
            time.sleep(0.5)


def _stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _watch_and_stop(uri: str, proc: subprocess.Popen, seen: dict, stop: threading.Event) -> None:
    """Stop the server as soon as the run's first nested run (``extract``) is in the store (REST API)."""
    while not stop.is_set():
        try:
            req = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name={TASK}")
            exp = json.load(urllib.request.urlopen(req, timeout=2))["experiment"]["experiment_id"]
            body = json.dumps({"experiment_ids": [exp], "filter": "tags.`histobench.stage` = 'extract'"}).encode()
            req = urllib.request.Request(f"{uri}/api/2.0/mlflow/runs/search", data=body,
                                         headers={"Content-Type": "application/json"})
            if json.load(urllib.request.urlopen(req, timeout=2)).get("runs"):
                seen["at"] = time.time()
                _stop_server(proc)
                return
        except OSError:
            pass
        time.sleep(0.3)


@pytest.mark.slow
def test_real_server_stopped_mid_run_loses_no_result(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    work = tmp_path / "work"
    args = ["run", "--pretext", "none", "--task", TASK, "--demo", "--workdir", str(work), "--tracking-uri", uri, *TINY]

    server = _start_server(root, port)
    seen, stop = {}, threading.Event()
    watcher = threading.Thread(target=_watch_and_stop, args=(uri, server, seen, stop), daemon=True)
    watcher.start()
    try:
        result = runner.invoke(build_app(), args, env={"COLUMNS": "250"})
    finally:
        stop.set()
        watcher.join()
        _stop_server(server)
    assert "at" in seen, "the watcher never saw the extract run"
    assert result.exit_code == 3, result.output  # finished, results on disk, not all in the store
    assert "macro_auc" in result.output and "the next histobench run" in result.output
    (journal,) = work.glob("runs/*/journal.jsonl")
    run_dir = journal.parent
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert (run_dir / "predictions.csv").exists() and len(on_disk["folds"]) == 2

    server = _start_server(root, port)  # the same database, back again
    try:
        result = runner.invoke(build_app(), args, env={"COLUMNS": "250"})
        assert result.exit_code == 0, result.output
        assert f"run {run_dir.name}" in result.output
        client = _client(uri)
        parent = client.get_run(run_dir.name)
        assert parent.info.status == "FINISHED"
        for key, value in on_disk["metrics"].items():
            if value == value:  # NaN is not logged
                assert parent.data.metrics[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
        folds = sorted((r for r in _runs(uri) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                        and r.data.tags["histobench.stage"] == "fold"), key=lambda r: r.info.run_name)
        assert [r.info.run_name for r in folds] == ["fold 0", "fold 1"]
        for run, fold in zip(folds, on_disk["folds"]):
            assert run.info.status == "FINISHED"
            assert {k: v for k, v in fold["metrics"].items() if v == v} == pytest.approx(run.data.metrics)
        assert "predictions.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert not [r for r in _runs(uri) if r.info.status == "RUNNING"]
        assert json.loads(journal.read_text().splitlines()[-1])["op"] == "synced"
    finally:
        _stop_server(server)
