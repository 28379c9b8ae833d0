"""Running one analysis: check the encoders, draw the tile set, run it, write ``report.json``, log to MLflow.

The MLflow run lives in the task's experiment with stage tag ``analysis`` (the leaderboard reads only stage
``run`` parent runs, so analyses never appear there), is named ``analysis <NAME>``, and carries the tags
``histobench.analysis`` (the analysis), ``histobench.analysed_runs`` (comma-separated run ids) and
``histobench.tile_set_hash``; its params are the analysis options, the encoders' labels and sources and the
tile set; its metrics the analysis's; its artifacts ``report.json`` and the analysis's files.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histobench.analyze.inputs import AnalysedEncoder, AnalysisInputs, AnalysisResult
from histobench.components import Analysis
from histobench.errors import HistobenchError
from histobench.reporting import Reporter

STAGE = "analysis"
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :/]")  # MLflow metric names allow these characters only


@dataclass
class AnalysisRun:
    """The outcome of :func:`run_analysis`: the result, where it was written, and its MLflow run."""

    result: AnalysisResult
    metrics: dict[str, float]  # the logged (MLflow-safe) names
    out_dir: Path
    run_id: str | None
    tile_hash: str
    tracking_uri: str
    seconds: float


def metric_name(name: str) -> str:
    """``name`` with every character MLflow refuses in a metric name replaced by ``_``."""
    return _UNSAFE.sub("_", str(name))


def count_bounds(cls: type[Analysis]) -> str:
    lo, hi = cls.min_encoders, cls.max_encoders
    if hi is None:
        return f"at least {lo}"
    return f"exactly {lo}" if lo == hi else f"{lo} to {hi}"


def check_count(cls: type[Analysis], n: int) -> None:
    """One line when ``n`` encoders do not fit the analysis's ``min_encoders``/``max_encoders``."""
    if n < cls.min_encoders or (cls.max_encoders is not None and n > cls.max_encoders):
        hint = " (pass --run RUN_ID or --weights FILE)" if n < cls.min_encoders else ""
        raise HistobenchError(f"analysis {cls.name!r} takes {count_bounds(cls)} encoder{'s' * (cls.max_encoders != 1)}, "
                              f"got {n}{hint}")


def _checked(name: str, result: Any, out_dir: Path) -> tuple[AnalysisResult, dict[str, float]]:
    import json
    import math

    if not isinstance(result, AnalysisResult):
        raise HistobenchError(f"analysis {name!r} returned {type(result).__name__}, not an AnalysisResult")
    metrics: dict[str, float] = {}
    for key, value in result.metrics.items():
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise HistobenchError(f"analysis {name!r} gave metric {key!r} a non-number {value!r}") from None
        safe = metric_name(key)
        if safe in metrics:
            raise HistobenchError(f"analysis {name!r}: metrics {key!r} and another name both log as {safe!r}")
        metrics[safe] = value if math.isfinite(value) else float("nan")
    try:
        json.dumps(result.report, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise HistobenchError(f"analysis {name!r} returned a report that is not JSON-able ({err})") from None
    files = [Path(f) if Path(f).is_absolute() else out_dir / f for f in result.files]  # relative: to out_dir
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise HistobenchError(f"analysis {name!r} listed files it did not write: {', '.join(missing)}")
    result.files = files
    return result, metrics


def run_analysis(analysis: Analysis, encoders: list[AnalysedEncoder], tiles, tile_refs, tile_hash: str, *,
                 task: str, workdir: Path, device, seed: int = 0, tracking_uri: str | None = None, track: bool = True,
                 reporter: Reporter | None = None, extra_params: dict[str, Any] | None = None) -> AnalysisRun:
    """Run ``analysis`` on ``encoders`` and the tile set; log it as an ``analysis`` run of ``task``'s experiment."""
    from histobench import __version__
    from histobench.registry import get_component
    from histobench.tracking import Tracker, git_sha, write_json

    reporter = reporter or Reporter()
    cls = type(analysis)
    check_count(cls, len(encoders))
    t0 = time.perf_counter()
    run_ids = [e.run_id for e in encoders if e.run_id]
    entry = get_component("analysis", cls.name)
    tracker = Tracker(tracking_uri, enabled=track)
    tags = {"histobench.analysis": cls.name, "histobench.analysed_runs": ",".join(run_ids),
            "histobench.tile_set_hash": tile_hash, "histobench.version": __version__, "histobench.git_sha": git_sha(),
            "histobench.plugin.analysis": f"{entry.plugin} {entry.version}"}
    with tracker.run(task, f"analysis {cls.name}", stage=STAGE, tags=tags) as run_id:
        # absolute, so that the files an analysis lists are found whatever the current folder
        out_dir = Path(workdir).resolve() / "analyses" / f"{cls.name}-{run_id or time.strftime('%Y%m%d-%H%M%S')}"
        out_dir.mkdir(parents=True, exist_ok=True)
        tracker.params({"analysis": {"name": cls.name, **analysis.options.model_dump(mode="json")},
                        "encoders": {str(i): {"label": e.label, "name": e.name, "source": e.source}
                                     for i, e in enumerate(encoders)},
                        "tiles": {"n": len(tiles), "size": int(tiles.shape[-1]), "seed": seed, "hash": tile_hash},
                        **(extra_params or {})})
        inputs = AnalysisInputs(encoders=encoders, tiles=tiles, tile_refs=list(tile_refs), out_dir=out_dir,
                                device=device, seed=seed, tile_hash=tile_hash, reporter=reporter)
        # the analysis draws its own progress bars for its long loops (inputs.reporter); no bar around it, since
        # a live bar here would sit on top of them
        reporter.info(f"analysis {cls.name}: {len(encoders)} encoders × {len(tiles)} tiles")
        raw = analysis.run(inputs)
        result, metrics = _checked(cls.name, raw, out_dir)
        report = {"analysis": cls.name, "options": analysis.options.model_dump(mode="json"), "task": task,
                  "tile_set": {"hash": tile_hash, "n": len(tiles), "seed": seed},
                  "encoders": [{"label": e.label, "encoder": e.name, "source": e.source, "run_id": e.run_id}
                               for e in encoders],
                  "metrics": metrics, "report": result.report, "mlflow_run_id": run_id}
        write_json(report, out_dir / "report.json")
        tracker.metrics(metrics)
        tracker.artifact(out_dir / "report.json")
        for f in result.files:  # files under out_dir keep their sub-folder in the artifact store
            rel = f.resolve().relative_to(out_dir) if f.resolve().is_relative_to(out_dir) else Path(f.name)
            tracker.artifact(f, None if rel.parent == Path(".") else rel.parent.as_posix())
    return AnalysisRun(result, metrics, out_dir, run_id, tile_hash, tracker.uri, time.perf_counter() - t0)
