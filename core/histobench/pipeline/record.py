"""What a run records in MLflow besides its stages' own metrics: provenance tags and the evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from histobench.pipeline.spec import Components, RunSpec
from histobench.registry import get_component

RESULTS_FILE = "results.json"  # WORKDIR/runs/<run id>/: per-fold and summary metrics, as logged to MLflow


def provenance(comps: Components) -> dict[str, str]:
    from histobench import __version__
    from histobench.plugins import plugin_versions
    from histobench.tracking import git_sha, hardware

    names = {"task": comps.task.name, "encoder": comps.encoder.name, "aggregator": comps.aggregator.name}
    for kind in ("pretext", "protocol", "segmenter", "text_encoder"):
        component = getattr(comps, kind)
        if component is not None:
            names[kind] = component.name
    plugins = {}
    for kind, name in names.items():
        entry = get_component(kind, name)
        plugins[f"histobench.plugin.{kind}"] = f"{entry.plugin} {entry.version}"
    return {"histobench.version": __version__, "histobench.git_sha": git_sha(),
            **{f"histobench.hw.{k}": v for k, v in hardware().items()}, **plugins,
            "histobench.plugins": json.dumps(plugin_versions())}


def log_evaluation(tracker, spec: RunSpec, comps: Components, manifest, result, splits, features_root: Path,
                   run_id: str | None, extra_metrics: dict[str, float] | None = None,
                   protocol_artifacts: Path | None = None) -> Path:
    """Log an evaluation into the current parent run: a nested run per fold (and seed), the summary metrics
    with CIs, predictions, the resolved config, the split file, the plots, and the files the protocol left in
    ``protocol_artifacts`` (e.g. fine-tuned weights per fold). Returns the artifact folder.

    The metrics, predictions and config are written to that folder first (``results.json``,
    ``predictions.csv``, ``config.json``), so a tracking store that fails while they are logged loses none."""
    from histobench.evaluate.plots import log_evaluation_artifacts
    from histobench.tracking import write_json

    task = comps.task
    protocol = comps.protocol.name if comps.protocol is not None else "frozen-mil"
    summary = {f"{metric}_{stat}": value for metric, st in result.summary.items() for stat, value in st.items()}
    summary["eval/slides_skipped"] = result.n_skipped
    # the results reach the disk before the store is called: a store that fails now loses nothing
    art = Path(spec.workdir) / "runs" / (run_id or "untracked")
    art.mkdir(parents=True, exist_ok=True)
    write_json({"run_id": run_id, "task": task.name, "primary_metric": task.primary_metric,
                "folds": [{"fold": k, "seed_repeat": s, "metrics": m} for m, (k, s) in zip(result.per_fold, result.per_fold_index)],
                "metrics": {**summary, **(extra_metrics or {})}}, art / RESULTS_FILE)
    result.predictions.to_csv(art / "predictions.csv", index=False)
    write_json({"spec": {k: str(v) for k, v in spec.__dict__.items()}, "resolved": comps.resolved()}, art / "config.json")
    tracker.tags({"histobench.split_hash": splits.hash, "histobench.split_name": splits.name,
                  "histobench.split_leaks": result.n_leaks, "histobench.protocol": protocol,
                  **{f"histobench.estimator.{k}": v for k, v in result.estimator_labels().items()}})
    for fold_metrics, (k, s) in zip(result.per_fold, result.per_fold_index):
        name = f"fold {k}" + (f" seed {s}" if comps.eval.seeds > 1 else "")
        with tracker.run(task.name, name, stage="fold", nested=True):
            tracker.params({"fold": k, "seed_repeat": s, "split_hash": splits.hash})
            tracker.metrics(fold_metrics)
    tracker.metrics({**summary, **(extra_metrics or {})})
    tracker.artifact(art / "predictions.csv")
    tracker.artifact(art / "config.json")
    tracker.artifact(Path(spec.workdir) / "splits" / f"{task.name}-{splits.name}-{splits.hash}.csv", "splits")
    log_evaluation_artifacts(tracker, result, manifest, art, features_root=features_root,
                             mpp=task.options.mpp, tile_size=task.options.tile_size)
    if protocol_artifacts is not None and Path(protocol_artifacts).is_dir():
        for f in sorted(Path(protocol_artifacts).rglob("*")):
            if f.is_file():
                rel = f.parent.relative_to(protocol_artifacts).as_posix()
                tracker.artifact(f, "protocol" if rel == "." else f"protocol/{rel}")
    return art
