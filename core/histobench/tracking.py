"""MLflow tracking, through this one module (the only place that imports mlflow).

One experiment per task; one parent run per ``histobench run``; nested runs for pretraining, extraction and
each evaluation fold. The store is MLflow's own default (a local SQLite file) unless ``MLFLOW_TRACKING_URI``
or ``--tracking-uri`` says otherwise.

Faults: a store that cannot be reached is a one-line error before any compute; a store that fails mid-run
costs no result (the calls wait in a journal, :mod:`histobench.journal`, and the next run replays them); a run
whose process died (SIGKILL, power loss) is marked FAILED by the next run on the same host, which knows the
owner is gone from its PID and start time (:mod:`histobench.owner`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from histobench.faults import fault_point

PARENT_TAG = "histobench.stage"
INTERRUPTED_TAG = "histobench.interrupted"  # set on a run marked FAILED because its process died


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_sha() -> str:
    """The git commit of the histobench source tree (``unknown`` outside a checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip()
        if out.returncode == 0 and sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def hardware() -> dict[str, str]:
    """A short description of the machine for provenance."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": str(os.cpu_count())}
    try:
        import torch

        info["torch"] = torch.__version__
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        pass
    return info


def _artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of a local SQLite store go to ``mlartifacts/`` next to the database file.

    MLflow's own default is ``./mlruns`` in the current directory, which scatters artifacts over wherever
    a command happened to be run. ``None`` for any other store (a server or a file store decides itself).
    """
    db = _sqlite_path(tracking_uri)
    return None if db is None else (Path(db).resolve().parent / "mlartifacts").as_uri()


def _store_key(tracking_uri: str) -> str:
    """The URI with a SQLite file made absolute: two runs started in different folders name one store alike."""
    db = _sqlite_path(tracking_uri)
    return tracking_uri if db is None else "sqlite:///" + str(Path(db).resolve())


def _sqlite_path(tracking_uri: str) -> str | None:
    """The database file of a ``sqlite:///`` URI (``None`` for other stores and in-memory databases)."""
    from urllib.parse import unquote

    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = unquote(tracking_uri[len("sqlite:///"):].split("?", 1)[0])
    return None if not db or db == ":memory:" else db


# Bounded waits on an HTTP store. MLflow retries a failed request 7 times with a doubling backoff (minutes);
# histobench asks once, briefly, before any compute, and at most 3 times during a run, after which it keeps
# the run's calls in the journal. A value the user set in the environment wins.
_PROBE_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_RUN_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_SPILL_LIMIT = 256 * 2**20  # artifacts up to this size are copied beside a pending journal


@contextmanager
def _bounded(env: dict[str, str]) -> Iterator[None]:
    added = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def _now_ms() -> int:
    return int(time.time() * 1000)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created with :func:`_artifact_root` as its artifact root if new."""
    from mlflow.exceptions import MlflowException

    from histobench.errors import HistobenchError

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_root(uri))
        except MlflowException:  # created meanwhile by another process
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage != "active":
        raise HistobenchError(f"experiment {name!r} is deleted in the tracking store {uri}; restore it or use another store")
    return exp.experiment_id


@dataclass
class _Open:
    key: str  # the run's key in the journal (its MLflow id when the store created it)
    run_id: str | None  # None for a run started while the store was down
    experiment_id: str


class Tracker:
    """Logs runs to MLflow. ``Tracker(enabled=False)`` logs nothing (for library use and tests).

    With ``journal_dir`` (``WORKDIR/runs``) every call is also written to ``journal_dir/<run id>/journal.jsonl``
    (:mod:`histobench.journal`). If the store then fails mid-run, the tracker warns once, keeps the remaining
    calls in the journal only (:attr:`offline` becomes true) and the run goes on; a later top-level run on the
    same store replays pending journals first (:meth:`sync`). Without a journal a store error propagates.

    A top-level run also checks the store first (a :class:`HistobenchError` naming the URI if it cannot be
    reached) and marks RUNNING histobench runs of its experiment whose owner process is gone FAILED
    (tag ``histobench.interrupted``). Every run is stamped with its owner (:mod:`histobench.owner`).
    """

    def __init__(self, tracking_uri: str | None = None, enabled: bool = True, journal_dir: Path | None = None,
                 reporter: Any = None):
        self.enabled = enabled
        self.tracking_uri = tracking_uri
        self.journal_dir = Path(journal_dir) if journal_dir is not None else None
        self.reporter = reporter
        self.offline = False
        self.journal_path: Path | None = None
        self._mlflow = None
        self._client = None
        self._journal = None
        self._stack: list[_Open] = []
        if enabled:
            import mlflow

            self._mlflow = mlflow
            if tracking_uri:
                mlflow.set_tracking_uri(tracking_uri)

    @property
    def uri(self) -> str:
        if not self._mlflow:
            return ""
        return self.tracking_uri or self._mlflow.get_tracking_uri()

    def _say(self, message: str) -> None:
        if self.reporter is not None:
            self.reporter.warn(message)
        else:
            import logging

            logging.getLogger("histobench").warning(message)

    # -- runs -------------------------------------------------------------------------------------------------

    @contextmanager
    def run(self, experiment: str, name: str, stage: str, nested: bool = False, tags: dict[str, str] | None = None) -> Iterator[str | None]:
        """Start a run (nested under the open one, if any); yields its run id (``None`` for a run started while
        the store was down). The run ends FAILED if the block raises."""
        if not self.enabled:
            yield None
            return
        run_id = self._open_nested(name, stage, tags) if self._stack else self._open_top(experiment, name, stage, tags)
        try:
            yield run_id
        except BaseException:
            self._close("FAILED")
            raise
        else:
            self._close("FINISHED")

    def _run_tags(self, name: str, stage: str, tags: dict[str, Any] | None, parent_id: str | None) -> dict[str, str]:
        from mlflow.tracking.context import registry
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        from histobench.owner import me

        user = {PARENT_TAG: stage, **(tags or {}), **me().tags(), MLFLOW_RUN_NAME: name}
        if parent_id is not None:
            user[MLFLOW_PARENT_RUN_ID] = parent_id
        return {k: str(v) for k, v in registry.resolve_tags(user).items()}

    def _open_top(self, experiment: str, name: str, stage: str, tags: dict[str, Any] | None) -> str:
        """Check the store (bounded), replay pending journals, mark dead owners' runs FAILED, start the run."""
        from mlflow.tracking import MlflowClient

        from histobench.errors import HistobenchError
        from histobench.journal import Journal
        from histobench.owner import me

        uri = self.uri
        tries = 3 if uri.startswith("sqlite:") else 1  # two processes creating one SQLite store race on its schema
        for attempt in range(tries):
            try:
                with _bounded(_PROBE_HTTP):
                    client = MlflowClient(tracking_uri=uri)
                    client.search_experiments(max_results=1)
                break
            except Exception as err:
                if attempt + 1 < tries and Path(_sqlite_path(uri) or "/").is_file():
                    time.sleep(1.0)
                    continue
                raise HistobenchError(f"tracking store {uri} cannot be reached ({_one_line(err)}); start it, or pass "
                                      "another --tracking-uri") from None
        self._client, self.offline = client, False
        if self.journal_dir is not None:
            self.sync(self.journal_dir)
        try:
            with _bounded(_PROBE_HTTP):
                exp_id = _experiment_id(client, experiment, uri)
                self._reap(exp_id, experiment)
                run_tags = self._run_tags(name, stage, tags, None)
                run = client.create_run(exp_id, tags=run_tags, run_name=name)
        except HistobenchError:
            raise
        except Exception as err:
            raise HistobenchError(f"tracking store {uri} refused to start a run ({_one_line(err)})") from None
        run_id = run.info.run_id
        self._stack.append(_Open(run_id, run_id, exp_id))
        if self.journal_dir is not None:
            self.journal_path = self.journal_dir / run_id / "journal.jsonl"
            self._journal = Journal(self.journal_path)
            owner = me()
            self._journal.append({"op": "open", "uri": uri, "store": _store_key(uri), "experiment": experiment,
                                  "experiment_id": exp_id,
                                  "owner": {"host": owner.host, "pid": owner.pid, "started": owner.started}})
            self._journal.append({"op": "start", "key": run_id, "parent": None, "experiment_id": exp_id,
                                  "name": name, "tags": run_tags, "time": run.info.start_time})
            self._journal.append({"op": "bind", "key": run_id, "run_id": run_id})
        return run_id

    def _open_nested(self, name: str, stage: str, tags: dict[str, Any] | None) -> str | None:
        parent = self._stack[-1]
        run_tags = self._run_tags(name, stage, tags, parent.run_id)
        key = uuid.uuid4().hex
        seq = self._log({"op": "start", "key": key, "parent": parent.key, "experiment_id": parent.experiment_id,
                         "name": name, "tags": run_tags, "time": _now_ms()})
        run_id = None
        if not self.offline:
            try:
                with _bounded(_RUN_HTTP):
                    run_id = self._client.create_run(parent.experiment_id, tags=run_tags, run_name=name).info.run_id
            except Exception as err:
                self._go_offline(err, seq)
        if run_id is not None:
            self._log({"op": "bind", "key": key, "run_id": run_id})
        self._stack.append(_Open(key, run_id, parent.experiment_id))
        return run_id

    def _close(self, status: str) -> None:
        cur = self._stack.pop()
        end = _now_ms()
        seq = self._log({"op": "end", "key": cur.key, "status": status, "time": end})
        if not self.offline:
            try:
                with _bounded(_RUN_HTTP):
                    self._client.set_terminated(cur.run_id, status, end_time=end)
            except Exception as err:
                if status == "FINISHED":
                    self._go_offline(err, seq)
                elif self._journal is not None:  # an error is already on its way up: do not hide it
                    self._go_offline(err, seq, quiet=True)
        if not self._stack and self._journal is not None:
            self._journal.close()
            self._journal = None

    # -- the journal ------------------------------------------------------------------------------------------

    def _log(self, entry: dict[str, Any]) -> int:
        return self._journal.append(entry) if self._journal is not None else -1

    def _go_offline(self, err: BaseException, seq: int, quiet: bool = False) -> None:
        """The store failed at journal line ``seq``: from there on, calls go to the journal only."""
        if self._journal is None:
            raise err
        self.offline = True
        self._journal.append({"op": "offline", "from": seq, "error": _one_line(err)})
        if not quiet:
            self._say(f"tracking store {self.uri} failed ({_one_line(err)}); the run goes on and its calls wait "
                      f"in {self.journal_path}: the next histobench run on this store logs them")

    def _store(self, entry: dict[str, Any], call: Callable[[], Any]) -> bool:
        """Journal ``entry``, then make the store call unless offline. False when the store did not take it."""
        seq = self._log(entry)
        if self.offline:
            return False
        try:
            with _bounded(_RUN_HTTP):
                call()
            return True
        except Exception as err:
            self._go_offline(err, seq)
            return False

    def _spill(self, filename: str) -> Path:
        """A fresh path beside the journal for a file the store has not taken yet."""
        folder = self.journal_path.parent / "pending" / str(self._journal.seq)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / Path(filename).name

    def _pending_artifact(self, cur: _Open, path: Path, subdir: str | None) -> None:
        """Journal an artifact the store has not taken: a copy of it if small (the original may change)."""
        import shutil

        path = Path(path).resolve()
        if path.stat().st_size <= _SPILL_LIMIT:
            copy = self._spill(path.name)
            shutil.copy2(path, copy)
            path = copy
        self._log({"op": "artifact", "key": cur.key, "path": str(path), "subdir": subdir})

    # -- what a run logs --------------------------------------------------------------------------------------

    def params(self, params: dict[str, Any]) -> None:
        if not (self.enabled and self._stack):
            return
        from mlflow.entities import Param

        cur = self._stack[-1]
        flat = {k: str(json.dumps(v) if isinstance(v, (list, tuple)) else v)[:6000] for k, v in _flatten(params).items()}

        def call() -> None:
            items = list(flat.items())
            for start in range(0, len(items), 90):  # MLflow caps a batch at 100 params
                self._client.log_batch(cur.run_id, params=[Param(k, v) for k, v in items[start:start + 90]])

        self._store({"op": "params", "key": cur.key, "params": flat}, call)

    def tags(self, tags: dict[str, Any]) -> None:
        if not (self.enabled and self._stack):
            return
        from mlflow.entities import RunTag

        cur = self._stack[-1]
        flat = {k: str(v) for k, v in _flatten(tags).items()}
        self._store({"op": "tags", "key": cur.key, "tags": flat},
                    lambda: self._client.log_batch(cur.run_id, tags=[RunTag(k, v) for k, v in flat.items()]))

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not (self.enabled and self._stack):
            return
        from mlflow.entities import Metric

        fault_point("track.log")
        cur = self._stack[-1]
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if not clean:
            return
        ts = _now_ms()
        self._store({"op": "metrics", "key": cur.key, "metrics": clean, "step": step or 0, "time": ts},
                    lambda: self._client.log_batch(cur.run_id, metrics=[Metric(k, v, ts, step or 0) for k, v in clean.items()]))

    def artifact(self, path: Path, subdir: str | None = None) -> None:
        if not (self.enabled and self._stack and Path(path).exists()):
            return
        fault_point("track.log")
        cur = self._stack[-1]
        if self.offline:
            self._pending_artifact(cur, Path(path), subdir)
            return
        entry = {"op": "artifact", "key": cur.key, "path": str(Path(path).resolve()), "subdir": subdir}
        seq = self._journal.seq if self._journal is not None else -1
        if not self._store(entry, lambda: self._client.log_artifact(cur.run_id, str(path), artifact_path=subdir)):
            self._log({"op": "superseded", "of": seq})  # replay the copy below, not a file that may change
            self._pending_artifact(cur, Path(path), subdir)

    def text(self, text: str, filename: str) -> None:
        if not (self.enabled and self._stack):
            return
        cur = self._stack[-1]
        if not self._store({"op": "text", "key": cur.key, "filename": filename},
                           lambda: self._client.log_text(cur.run_id, text, filename)):
            copy = self._spill(filename)
            copy.write_text(text, encoding="utf-8")
            self._log({"op": "artifact", "key": cur.key, "path": str(copy), "subdir": _parent(filename)})

    def figure(self, fig: Any, filename: str) -> None:
        if not (self.enabled and self._stack):
            return
        cur = self._stack[-1]
        if not self._store({"op": "figure", "key": cur.key, "filename": filename},
                           lambda: self._client.log_figure(cur.run_id, fig, filename)):
            copy = self._spill(filename)
            fig.savefig(copy)
            self._log({"op": "artifact", "key": cur.key, "path": str(copy), "subdir": _parent(filename)})

    # -- interrupted runs and pending journals ----------------------------------------------------------------

    def _reap(self, experiment_id: str, experiment: str) -> None:
        """Mark RUNNING histobench runs whose owner process on this host is gone FAILED, in one log line."""
        from histobench.owner import Owner

        try:
            runs = self._client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                            max_results=5000)
        except Exception as err:  # not worth failing a run for
            self._say(f"could not look for interrupted runs in {self.uri} ({_one_line(err)})")
            return
        dead = []
        for r in runs:
            owner = Owner.from_tags(r.data.tags)
            if PARENT_TAG not in r.data.tags or owner is None or not owner.on_this_host() or owner.alive():
                continue
            try:
                self._client.set_tag(r.info.run_id, INTERRUPTED_TAG, "true")
                self._client.set_terminated(r.info.run_id, "FAILED")
            except Exception as err:
                self._say(f"could not mark interrupted run {r.info.run_id} FAILED ({_one_line(err)})")
                continue
            dead.append(f"{r.info.run_name!r} ({r.info.run_id[:8]}, pid {owner.pid})")
        if dead:
            self._say(f"marked {len(dead)} interrupted run(s) of experiment {experiment!r} FAILED, their process "
                      f"is gone: {', '.join(dead)}")

    def sync(self, journal_dir: Path) -> int:
        """Replay every pending journal under ``journal_dir`` written for this store whose run has ended (or whose
        process on this host is gone); returns how many were synced. One line per journal says what happened."""
        import fcntl

        from histobench import journal as jr
        from histobench.owner import Owner

        client = self._client
        if client is None:
            from mlflow.tracking import MlflowClient

            client = self._client = MlflowClient(tracking_uri=self.uri)
        synced = 0
        for path in jr.journals(journal_dir):
            entries = jr.read(path)
            head = jr.header(entries)
            if not jr.is_pending(entries) or head.get("store") != _store_key(self.uri):
                continue  # written for another store (a relative SQLite path counts from where the run started)
            owner = Owner(**head["owner"]) if "owner" in head else None
            top = next((e["key"] for e in entries if e.get("op") == "start" and e.get("parent") is None), None)
            ended = any(e.get("op") == "end" and e.get("key") == top for e in entries)
            if not ended and owner is not None and (not owner.on_this_host() or owner.alive()):
                continue  # the run may still be going on (here, or on another host)
            with open(path, "a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # another process is replaying it
                try:
                    n = self._replay(client, path, jr.read(path))
                except Exception as err:
                    self._say(f"could not replay {path} into {self.uri} yet ({_one_line(err)}); the next run retries")
                    continue
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
            if n is not None:
                synced += 1
                self._say(f"logged {n} call(s) of run {path.parent.name} that were waiting in {path} into {self.uri}")
        return synced

    def _replay(self, client: Any, path: Path, entries: list[dict[str, Any]]) -> int | None:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        from histobench import journal as jr

        if not jr.is_pending(entries):
            return None
        ids = jr.run_ids(entries)
        journal = jr.Journal(path)
        calls = jr.pending_calls(entries)
        with _bounded(_RUN_HTTP):
            for e in calls:
                op, key = e["op"], e["key"]
                if op == "start":
                    if key not in ids:
                        tags = dict(e["tags"])
                        if e.get("parent") in ids:
                            tags[MLFLOW_PARENT_RUN_ID] = ids[e["parent"]]
                        ids[key] = client.create_run(e["experiment_id"], start_time=e["time"], tags=tags,
                                                     run_name=e["name"]).info.run_id
                    journal.append({"op": "replayed", "of": e["seq"], "key": key, "run_id": ids[key]})
                    continue
                run_id = ids[key]
                if op == "params":
                    items = list(e["params"].items())
                    for start in range(0, len(items), 90):
                        client.log_batch(run_id, params=[Param(k, v) for k, v in items[start:start + 90]])
                elif op == "tags":
                    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in e["tags"].items()])
                elif op == "metrics":
                    client.log_batch(run_id, metrics=[Metric(k, v, e["time"], e["step"]) for k, v in e["metrics"].items()])
                elif op == "artifact":
                    client.log_artifact(run_id, e["path"], artifact_path=e["subdir"])
                elif op == "end":
                    client.set_terminated(run_id, e["status"], end_time=e["time"])
                    if INTERRUPTED_TAG in client.get_run(run_id).data.tags:  # marked meanwhile by another run
                        client.delete_tag(run_id, INTERRUPTED_TAG)
                journal.append({"op": "replayed", "of": e["seq"]})
        journal.append({"op": "synced", "uri": self.uri, "time": _now_ms()})
        journal.close()
        return len(calls)


def _parent(filename: str) -> str | None:
    parent = Path(filename).parent.as_posix()
    return None if parent in ("", ".") else parent


def search_runs(experiment: str, tracking_uri: str | None = None, stage: str = "run") -> list[dict[str, Any]]:
    """Finished runs of an experiment (one dict per run: id, name, params, metrics, tags, times)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{stage}' and attributes.status = 'FINISHED'",
                              max_results=5000)
    return [
        {
            "run_id": r.info.run_id,
            "name": r.info.run_name,
            "start_time": r.info.start_time,
            "end_time": r.info.end_time,
            "params": dict(r.data.params),
            "metrics": dict(r.data.metrics),
            "tags": dict(r.data.tags),
        }
        for r in runs
    ]


def write_json(obj: Any, path: Path) -> Path:
    """Write JSON atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(f.name, path)
    return path


def get_run(run_id: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """One run as a dict (id, name, experiment, params, metrics, tags); raises ``HistobenchError`` if unknown."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from histobench.errors import HistobenchError

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    try:
        r = client.get_run(run_id)
    except MlflowException:
        raise HistobenchError(f"no MLflow run {run_id!r} at {mlflow.get_tracking_uri()}") from None
    exp = client.get_experiment(r.info.experiment_id)
    return {"run_id": r.info.run_id, "name": r.info.run_name, "experiment": exp.name if exp else "",
            "params": dict(r.data.params), "metrics": dict(r.data.metrics), "tags": dict(r.data.tags)}


def download_artifact(run_id: str, path: str, dst: Path, tracking_uri: str | None = None) -> Path:
    """Download one artifact of a run into ``dst``; raises ``HistobenchError`` if the run has no such file."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from histobench.errors import HistobenchError

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    Path(dst).mkdir(parents=True, exist_ok=True)
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # a tqdm bar on stderr would garble CLI output
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))
    except (MlflowException, OSError):
        raise HistobenchError(f"run {run_id} has no artifact {path!r}") from None
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
