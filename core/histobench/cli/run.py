"""``histobench run`` and the single-stage commands ``pretrain``, ``extract``, ``evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from histobench.cli.common import (AggregatorOpt, AllowOutsideOpt, DataRootOpt, DemoOpt, DeviceOpt, EncoderOpt, FailFastOpt, LeakyOpt,
                                   OptionsOpt, PretextOpt, PretrainManifestOpt, PretrainTaskOpt, ProtocolOpt, SeedOpt,
                                   SegmenterOpt, SplitOpt, TaskOpt, TextEncoderOpt, TrackingOpt, WorkdirOpt, console,
                                   err_console, is_rank_zero, reporter)

DEFAULT_WORKDIR = Path("histobench-work")
EXIT_NOT_LOGGED = 3  # `run` finished, but the tracking store failed mid-run: results wait in the run's journal


def _spec(task, pretext, encoder, aggregator, option, demo, seed, workdir, data_root, tracking_uri, device, track=True,
          **more):
    from histobench.options import parse_options
    from histobench.pipeline import RunSpec

    return RunSpec(task=task, pretext=pretext, encoder=encoder, aggregator=aggregator, options=parse_options(option),
                   demo=demo, seed=seed, workdir=workdir, data_root=data_root, tracking_uri=tracking_uri,
                   track=track, device=device, **more)


def print_result(per_fold, summary, primary: str, title: str) -> None:
    """Per-fold values, then each estimator's row with its own 95% CI row under it, labelled from one table
    (:data:`histobench.evaluate.stats.ESTIMATORS`)."""
    from histobench.evaluate.stats import estimator_label, summary_estimators

    def num(entry, key, fmt="{:.3f}"):
        v = entry.get(key, float("nan"))
        return "" if v != v else fmt.format(v)

    all_metrics = list(summary)
    keys = list(dict.fromkeys(k for m in all_metrics for k in summary_estimators(summary[m])))
    n = int(summary[primary].get("n_folds", 0)) if primary in summary else None
    rows: list[tuple[str, dict[str, str]]] = [(str(i), {m: f"{fm.get(m, float('nan')):.3f}" for m in all_metrics})
                                              for i, fm in enumerate(per_fold)]
    rules: set[int] = set()  # rows with a rule above them: each estimator's first
    for key in keys:
        rules.add(len(rows))
        cells = {}
        for m in all_metrics:
            e = summary[m]
            if key not in summary_estimators(e):
                cells[m] = ""
            elif key == "fold":
                cells[m] = f"{num(e, 'fold_mean')} ± {num(e, 'fold_sd')}".strip(" ±")
            else:
                cells[m] = num(e, key, "{:.4g}" if key == "pooled_test" else "{:.3f}")
        rows.append((f"{key}: {estimator_label(key, n)}", cells))
        if key != "pooled_test":
            lo, hi = f"{key}_ci_low", f"{key}_ci_high"
            rows.append((f"  95% CI: {estimator_label(key, n, ci=True)}",
                         {m: f"[{num(summary[m], lo)}, {num(summary[m], hi)}]" if num(summary[m], lo) else ""
                          for m in all_metrics}))
    # numbers are never cut: the metric columns are as wide as their longest cell, and when they do not all
    # fit the terminal (or a pipe's 80 columns) they go to further tables, each with the fold column
    header = {m: m + (" *" if m == primary else "") for m in all_metrics}
    need = {m: max([len(header[m])] + [len(c[m]) for _, c in rows]) + 3 for m in all_metrics}
    room = max(console.width - 24, 1)
    chunks: list[list[str]] = [[]]
    for m in all_metrics:
        if chunks[-1] and sum(need[x] for x in chunks[-1]) + need[m] > room:
            chunks.append([])
        chunks[-1].append(m)
    for j, metrics in enumerate(chunks):
        part = f" ({j + 1}/{len(chunks)})" if len(chunks) > 1 else ""
        table = Table(title=title + part, title_justify="left")
        table.add_column("fold", min_width=8)
        for m in metrics:
            table.add_column(header[m], justify="right", min_width=need[m] - 3, no_wrap=True)
        for r, (label, cells) in enumerate(rows):
            if r in rules:
                table.add_section()
            table.add_row(label, *(cells[m] for m in metrics))
        console.print(table)


def run_cmd(
    task: TaskOpt,
    pretext: PretextOpt = "none",
    encoder: EncoderOpt = None,
    aggregator: AggregatorOpt = None,
    option: OptionsOpt = None,
    demo: DemoOpt = False,
    seed: SeedOpt = 0,
    tracking_uri: TrackingOpt = None,
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    data_root: DataRootOpt = None,
    allow_outside_data_root: AllowOutsideOpt = False,
    device: DeviceOpt = None,
    split: SplitOpt = None,
    fail_fast: FailFastOpt = False,
    allow_leaky_splits: LeakyOpt = False,
    protocol: ProtocolOpt = None,
    segmenter: SegmenterOpt = None,
    text_encoder: TextEncoderOpt = None,
    pretrain_task: PretrainTaskOpt = None,
    pretrain_manifest: PretrainManifestOpt = None,
) -> None:
    """Pretrain, extract, evaluate and log one pretext on one task.

    Example: histobench run --pretext dino --task tcga-nsclc --demo -o train.epochs=2
    """
    from histobench.pipeline import run

    spec = _spec(task, pretext, encoder, aggregator, option, demo, seed, workdir, data_root, tracking_uri, device,
                 allow_outside_data_root=allow_outside_data_root,
                 split=split, fail_fast=fail_fast, allow_leaky_splits=allow_leaky_splits, protocol=protocol,
                 segmenter=segmenter, text_encoder=text_encoder, pretrain_task=pretrain_task,
                 pretrain_manifest=pretrain_manifest)
    result = run(spec, reporter())
    if not is_rank_zero():  # under torchrun rank 0 evaluates and reports
        return
    print_result(result.per_fold, result.summary, result.primary_metric,
                 f"{task} · pretext {pretext} · {result.seconds:.0f} s")
    if result.offline:  # results computed and on disk; the store has part of the run, the journal the rest
        err_console.print(f"[yellow]warning:[/] tracking store {escape(str(result.tracking_uri))} failed during the run: "
                          f"results are in {escape(str(result.journal.parent))}; the next histobench run on this store logs them "
                          f"(exit code {EXIT_NOT_LOGGED})", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_NOT_LOGGED)
    if result.run_id:
        console.print(f"MLflow run [bold]{result.run_id}[/] at {escape(str(result.tracking_uri))}", highlight=False,
                      soft_wrap=True)


def pretrain_cmd(
    task: TaskOpt,
    pretext: PretextOpt,
    encoder: EncoderOpt = None,
    option: OptionsOpt = None,
    demo: DemoOpt = False,
    seed: SeedOpt = 0,
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    data_root: DataRootOpt = None,
    allow_outside_data_root: AllowOutsideOpt = False,
    device: DeviceOpt = None,
    segmenter: SegmenterOpt = None,
    text_encoder: TextEncoderOpt = None,
    pretrain_task: PretrainTaskOpt = None,
    pretrain_manifest: PretrainManifestOpt = None,
    fail_fast: FailFastOpt = False,
) -> None:
    """Only pretrain: tile the task's cohort (or --pretrain-task/--pretrain-manifest) and train the pretext;
    prints the encoder weights file."""
    from histobench.errors import HistobenchError
    from histobench.pipeline import cohort_inputs, load_cohort, pretrain_cohort, pretrain_inputs, resolve

    if pretext == "none":
        raise HistobenchError("pretrain needs --pretext")
    spec = _spec(task, pretext, encoder, None, option, demo, seed, workdir, data_root, None, device, track=False,
                 allow_outside_data_root=allow_outside_data_root, fail_fast=fail_fast,
                 segmenter=segmenter, text_encoder=text_encoder, pretrain_task=pretrain_task,
                 pretrain_manifest=pretrain_manifest)
    rep = reporter()
    comps = resolve(spec)
    manifest = None if (pretrain_task or pretrain_manifest) else load_cohort(spec, comps.task, rep)
    manifest, _ = pretrain_cohort(spec, comps, manifest, rep)
    _, result, out_dir = pretrain_inputs(spec, comps, manifest, cohort_inputs(spec, comps, manifest, rep), rep)
    if is_rank_zero():
        console.print(f"{result.steps} steps, {result.images_per_second:.1f} img/s; encoder weights: "
                      f"{escape(str(out_dir / 'encoder.pt'))}", highlight=False, soft_wrap=True)


def extract_cmd(
    task: TaskOpt,
    encoder: EncoderOpt = "timm",
    weights: Annotated[Optional[Path], typer.Option("--weights", help="Encoder state dict (e.g. from histobench pretrain).")] = None,
    option: OptionsOpt = None,
    demo: DemoOpt = False,
    seed: SeedOpt = 0,
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    data_root: DataRootOpt = None,
    allow_outside_data_root: AllowOutsideOpt = False,
    device: DeviceOpt = None,
    fail_fast: FailFastOpt = False,
) -> None:
    """Only extract: encode the task's tiles into one HDF5 file per slide; prints the folder."""
    import torch

    from histobench.errors import HistobenchError
    from histobench.pipeline import cohort_inputs, encode_cohort, load_cohort, resolve

    spec = _spec(task, "none", encoder, None, option, demo, seed, workdir, data_root, None, device, track=False,
                 allow_outside_data_root=allow_outside_data_root, fail_fast=fail_fast)
    rep = reporter()
    comps = resolve(spec)
    torch.manual_seed(seed)
    module = comps.encoder.build()
    tag = comps.encoder.weights_tag()
    if weights is not None:
        if not weights.exists():
            raise HistobenchError(f"weights file {weights} does not exist")
        from histobench.weights import load_strict

        load_strict(module, torch.load(weights, map_location="cpu", weights_only=True),
                    f"weights file {weights} does not fit encoder {encoder!r}")
        # weights from `histobench pretrain` keep its tag, so that `histobench run` finds these features
        tag = weights.parent.name if (weights.parent / "checkpoint.pt").exists() else f"file-{weights.stem}"
    manifest = load_cohort(spec, comps.task, rep)
    features, _, res = encode_cohort(spec, comps, module, cohort_inputs(spec, comps, manifest, rep), rep, tag)
    done = f"{res.extracted} slides extracted, {res.skipped} cached, {res.tiles_per_second:.0f} tiles/s" if res else "regions encoded"
    if is_rank_zero():
        console.print(f"{done}: {escape(str(features.root))}", highlight=False, soft_wrap=True)


def evaluate_cmd(
    task: TaskOpt,
    features: Annotated[Path, typer.Option("--features", help="Folder of <slide_id>.h5 files (features, coords), e.g. from CLAM or TRIDENT.")],
    aggregator: AggregatorOpt = None,
    option: OptionsOpt = None,
    demo: DemoOpt = False,
    seed: SeedOpt = 0,
    tracking_uri: TrackingOpt = None,
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    data_root: DataRootOpt = None,
    allow_outside_data_root: AllowOutsideOpt = False,
    no_track: Annotated[bool, typer.Option("--no-track", help="Do not log to MLflow.")] = False,
    split: SplitOpt = None,
    allow_leaky_splits: LeakyOpt = False,
    protocol: ProtocolOpt = None,
) -> None:
    """Only evaluate: the task's protocol on a folder of per-slide feature files."""
    from histobench.features.cache import FeatureDir
    from histobench.pipeline import evaluate_stage, load_cohort, log_evaluation, provenance, resolve
    from histobench.tracking import Tracker

    spec = _spec(task, "none", "timm", aggregator, option, demo, seed, workdir, data_root, tracking_uri, None,
                 allow_outside_data_root=allow_outside_data_root,
                 track=not no_track, split=split, allow_leaky_splits=allow_leaky_splits, protocol=protocol)
    rep = reporter()
    comps = resolve(spec)
    feats = FeatureDir(features)
    tracker = Tracker(tracking_uri, enabled=not no_track, journal_dir=Path(workdir) / "runs", reporter=rep)
    with tracker.run(comps.task.name, f"features:{features.name}+{comps.aggregator.name}", stage="run") as run_id:
        manifest = load_cohort(spec, comps.task, rep)  # after the store's check: nothing is computed for a dead store
        resolved = comps.resolved()
        tracker.params({"run": {"pretext": f"features:{features.name}", "seed": seed, "demo": demo},
                        "features": str(features), **{k: resolved[k] for k in ("task", "aggregator", "eval", "protocol")},
                        "encoder": {"name": f"features:{features.name}"}})
        tracker.tags({k: v for k, v in provenance(comps).items() if not k.startswith("histobench.plugin.encoder")})
        result, splits, _ = evaluate_stage(spec, comps, manifest, feats, rep)
        log_evaluation(tracker, spec, comps, manifest, result, splits, feats.root, run_id)
    print_result(result.per_fold, result.summary, comps.task.primary_metric, f"{task} · features {features}")
    if tracker.offline:
        err_console.print(f"[yellow]warning:[/] tracking store {escape(str(tracker.uri))} failed during the run: results "
                          f"are in {escape(str(tracker.journal_path.parent))}; the next histobench run on this store logs them "
                          f"(exit code {EXIT_NOT_LOGGED})", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_NOT_LOGGED)
    if run_id:
        console.print(f"MLflow run [bold]{run_id}[/]")
