"""Paired comparison of two tracked runs evaluated on the same folds (``histobench compare``)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from histobench.errors import HistobenchError


def compare_runs(run_a: str, run_b: str, tracking_uri: str | None = None, *, metric: str | None = None,
                 n: int = 1000, seed: int = 0) -> dict[str, Any]:
    """``A - B`` on the task's primary metric (or ``metric``) by both estimators (the fold mean with a paired
    t-interval over folds and a Wilcoxon test, and the ``pooled``/``fold_boot`` value with a paired patient
    bootstrap): see :func:`histobench.evaluate.stats.paired_comparison`.

    Both runs must belong to the same task and carry the same ``histobench.split_hash`` tag: a paired test
    on different folds would compare different patients. Adds ``task``, ``run_a``, ``run_b``, ``split_hash``.
    """
    import pandas as pd

    from histobench.evaluate.stats import paired_comparison
    from histobench.registry import get_component
    from histobench.tracking import download_artifact, get_run

    if run_a == run_b:
        raise HistobenchError("compare needs two different runs")
    ra, rb = get_run(run_a, tracking_uri), get_run(run_b, tracking_uri)
    if ra["experiment"] != rb["experiment"]:
        raise HistobenchError(f"run {run_a} is on task {ra['experiment']!r} but run {run_b} on {rb['experiment']!r}")
    ha, hb = ra["tags"].get("histobench.split_hash"), rb["tags"].get("histobench.split_hash")
    if not ha or ha != hb:
        raise HistobenchError(f"runs used different splits (split hash {ha} vs {hb}); a paired comparison needs the same folds")
    cls = get_component("task", ra["experiment"]).cls
    name = metric or cls.primary_metric
    with tempfile.TemporaryDirectory() as tmp:
        preds = [pd.read_csv(download_artifact(r, "predictions.csv", Path(tmp) / r, tracking_uri)) for r in (run_a, run_b)]
    out = paired_comparison(preds[0], preds[1], cls.task_kind, name, [str(c) for c in cls.classes] or None, n=n, seed=seed)
    out.update({"task": ra["experiment"], "run_a": run_a, "run_b": run_b, "split_hash": ha,
                "name_a": ra["name"], "name_b": rb["name"]})
    return out
