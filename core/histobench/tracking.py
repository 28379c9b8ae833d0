"""MLflow tracking, through this one module (the only place that imports mlflow).

One experiment per task; one parent run per ``histobench run``; nested runs for pretraining, extraction and
each evaluation fold. The store is MLflow's own default (a local SQLite file) unless ``MLFLOW_TRACKING_URI``
or ``--tracking-uri`` says otherwise.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

PARENT_TAG = "histobench.stage"


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
    from urllib.parse import unquote

    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = unquote(tracking_uri[len("sqlite:///"):].split("?", 1)[0])
    if not db or db == ":memory:":
        return None
    return (Path(db).resolve().parent / "mlartifacts").as_uri()


def _set_experiment(mlflow: Any, name: str) -> None:
    """``mlflow.set_experiment(name)``, creating a new experiment with :func:`_artifact_root` as its root."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if client.get_experiment_by_name(name) is None:
        root = _artifact_root(mlflow.get_tracking_uri())
        if root is not None:
            try:
                client.create_experiment(name, artifact_location=root)
            except MlflowException:  # created meanwhile by another process
                pass
    mlflow.set_experiment(name)


class Tracker:
    """Logs runs to MLflow. ``Tracker(enabled=False)`` logs nothing (for library use and tests)."""

    def __init__(self, tracking_uri: str | None = None, enabled: bool = True):
        self.enabled = enabled
        self.tracking_uri = tracking_uri
        self._mlflow = None
        if enabled:
            import mlflow

            self._mlflow = mlflow
            if tracking_uri:
                mlflow.set_tracking_uri(tracking_uri)

    @property
    def uri(self) -> str:
        return self._mlflow.get_tracking_uri() if self._mlflow else ""

    @contextmanager
    def run(self, experiment: str, name: str, stage: str, nested: bool = False, tags: dict[str, str] | None = None) -> Iterator[str | None]:
        """Start a (possibly nested) run; yields its run id. The run ends FAILED if the block raises."""
        if not self.enabled:
            yield None
            return
        mlflow = self._mlflow
        if not nested:
            _set_experiment(mlflow, experiment)
        run = mlflow.start_run(run_name=name, nested=nested, tags={PARENT_TAG: stage, **(tags or {})})
        try:
            yield run.info.run_id
        except BaseException:
            mlflow.end_run(status="FAILED")
            raise
        else:
            mlflow.end_run(status="FINISHED")

    def params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            flat = {k: (json.dumps(v) if isinstance(v, (list, tuple)) else v) for k, v in _flatten(params).items()}
            for start in range(0, len(flat), 90):  # MLflow caps a batch at 100 params
                chunk = dict(list(flat.items())[start:start + 90])
                self._mlflow.log_params({k: str(v)[:6000] for k, v in chunk.items()})

    def tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            self._mlflow.set_tags({k: str(v) for k, v in _flatten(tags).items()})

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
            if clean:
                self._mlflow.log_metrics(clean, step=step)

    def artifact(self, path: Path, subdir: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            self._mlflow.log_artifact(str(path), artifact_path=subdir)

    def text(self, text: str, filename: str) -> None:
        if self.enabled:
            self._mlflow.log_text(text, filename)

    def figure(self, fig: Any, filename: str) -> None:
        if self.enabled:
            self._mlflow.log_figure(fig, filename)


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
