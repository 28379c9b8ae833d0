"""``histobench run``: cohort -> folds -> tiles -> (masks) -> pretraining -> extraction -> protocol, in MLflow."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from histobench.pipeline.record import log_evaluation, provenance
from histobench.pipeline.spec import NO_PRETEXT, RunSpec, resolve
from histobench.pipeline.stages import (cohort_inputs, encode_cohort, evaluate_stage, load_cohort, make_splits,
                                        pretrain_cohort, pretrain_inputs)
from histobench.reporting import Reporter


@dataclass
class RunResult:
    run_id: str | None
    per_fold: list[dict[str, float]]
    summary: dict[str, dict[str, float]]
    primary_metric: str
    seconds: float
    tracking_uri: str
    journal: Path | None = None  # WORKDIR/runs/<run id>/journal.jsonl: every call made to the tracking store
    offline: bool = False  # the store failed mid-run: results are on disk, the journal waits for the next run


def run(spec: RunSpec, reporter: Reporter | None = None) -> RunResult:
    """The whole pipeline for one task and one pretext, logged as one MLflow parent run.

    The folds are made right after the cohort is read, before any pretraining. Pretraining reads the
    evaluation cohort itself by default (transductive: every slide, labels never read), or the cohort named by
    ``--pretrain-task`` / ``--pretrain-manifest``; the run records which (tag ``histobench.pretrain_cohort``).

    Under ``torchrun`` every rank prepares the cohort, pretrains (DistributedDataParallel) and extracts (its
    share of the slides); then rank 0 alone evaluates and logs to MLflow, and the other ranks return a
    result without folds.
    """
    from histobench.cohorts.status import StatusTable
    from histobench.pretrain.trainer import init_distributed
    from histobench.tracking import Tracker

    reporter = reporter or Reporter()
    t0 = time.perf_counter()
    rank, _ = init_distributed()
    comps = resolve(spec)
    if not spec.demo:  # a missing data root is a user mistake, not a failed run
        from histobench.cohorts.manifest import data_root

        data_root(spec.data_root)
    # the store is checked (and pending journals replayed) when the parent run starts, before any compute
    tracker = Tracker(spec.tracking_uri, enabled=spec.track and rank == 0, journal_dir=Path(spec.workdir) / "runs",
                      reporter=reporter)
    task = comps.task
    pretext_name = comps.pretext.name if comps.pretext else NO_PRETEXT
    uses_aggregator = comps.protocol.uses_aggregator
    run_name = f"{pretext_name}+{comps.encoder.name}" + (f"+{comps.aggregator.name}" if uses_aggregator else "")
    run_name += "-demo" if spec.demo else ""
    if comps.protocol is not None and comps.protocol.name != "frozen-mil":
        run_name += f"@{comps.protocol.name}"
    with tracker.run(task.name, run_name, stage="run", tags={"histobench.demo": spec.demo}) as run_id:
        tracker.params({"run": {"pretext": pretext_name, "seed": spec.seed, "demo": spec.demo}, **comps.resolved()})
        tracker.tags({**provenance(comps), "histobench.protocol": comps.protocol.name,
                      "histobench.aggregator_used": str(uses_aggregator)})
        status = StatusTable()
        manifest = load_cohort(spec, task, reporter, status)
        splits = make_splits(spec, comps, manifest, reporter)
        inputs = cohort_inputs(spec, comps, manifest, reporter, status, tracker)
        tracker.metrics({"cohort/slides": len(manifest), "cohort/patients": manifest["case_id"].nunique(),
                         "cohort/tiles": sum(len(s.tiles) for s in inputs.slides),
                         "cohort/slides_skipped": len(status.problems())})
        tracker.artifact(Path(spec.workdir) / "status.csv")

        if comps.pretext is not None:
            pre_manifest, cohort_name = pretrain_cohort(spec, comps, manifest, reporter, status)
            pre_inputs = inputs if pre_manifest is manifest else cohort_inputs(spec, comps, pre_manifest, reporter,
                                                                               status, tracker)
            tracker.tags({"histobench.pretrain_cohort": cohort_name})
            with tracker.run(task.name, f"pretrain {pretext_name}", stage="pretrain", nested=True):
                tracker.params({"pretext": comps.resolved()["pretext"], "train": comps.train.model_dump(),
                                "pretrain_cohort": cohort_name})
                encoder, pre, ckpt_dir = pretrain_inputs(spec, comps, pre_manifest, pre_inputs, reporter, tracker,
                                                         cohort_task=spec.pretrain_task)
                tracker.metrics({"pretrain/images_per_second": pre.images_per_second, "pretrain/steps": pre.steps,
                                 "pretrain/final_loss": pre.history[-1]["loss"] if pre.history else float("nan")})
                tracker.artifact(ckpt_dir / "encoder.pt", "encoder")
            weights_tag = f"{pretext_name}-{ckpt_dir.name.rsplit('-', 1)[-1]}"
        else:
            import torch

            torch.manual_seed(spec.seed)
            encoder = comps.encoder.build()
            weights_tag = comps.encoder.weights_tag()

        with tracker.run(task.name, "extract", stage="extract", nested=True):
            features, w, ext = encode_cohort(spec, comps, encoder, inputs, reporter, weights_tag)
            if ext is not None:
                # a rate only for slides this run encoded: all-cached is not a speed of 0 tiles/s
                rate = {"extract/tiles_per_second": ext.tiles_per_second} if ext.extracted else {}
                tracker.metrics({**rate, "extract/tiles": ext.tiles, "extract/slides_extracted": ext.extracted,
                                 "extract/slides_cached": ext.skipped})
            tracker.params({"encoder": comps.encoder.name, "weights_hash": w, "feature_dir": str(features.root)})
        tracker.tags({"histobench.weights_hash": w})
        if rank != 0:  # every feature file is written (extraction ends on a barrier): rank 0 evaluates
            return RunResult(None, [], {}, task.primary_metric, time.perf_counter() - t0, tracker.uri)

        protocol_dir = Path(spec.workdir) / "runs" / (run_id or "untracked") / "protocol"
        result, splits, pin = evaluate_stage(spec, comps, manifest, features, reporter, splits=splits, inputs=inputs,
                                             encoder=encoder, artifacts=protocol_dir)
        log_evaluation(tracker, spec, comps, manifest, result, splits, features.root, run_id,
                       extra_metrics={"wall_seconds": time.perf_counter() - t0, **pin.metrics},
                       protocol_artifacts=protocol_dir)
    return RunResult(run_id, result.per_fold, result.summary, task.primary_metric, time.perf_counter() - t0, tracker.uri,
                     journal=tracker.journal_path, offline=tracker.offline)
