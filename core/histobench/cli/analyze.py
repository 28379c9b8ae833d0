"""``histobench analyze NAME``: an analysis of trained encoders on the task's fixed held-out tile set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from histobench.cli.common import (DataRootOpt, DemoOpt, DeviceOpt, OptionsOpt, TaskOpt, TrackingOpt, WorkdirOpt,
                                   _completer, console, reporter)

DEFAULT_WORKDIR = Path("histobench-work")
DEFAULT_TILES, DEMO_TILES = 512, 64
ANALYZE_PREFIXES = ("analysis", "encoder", "task")

NameArg = Annotated[str, typer.Argument(help="Analysis name (histobench analyses list).", autocompletion=_completer("analysis"))]
RunsOpt = Annotated[Optional[list[str]], typer.Option("--run", "-r", help="A finished `histobench run` (MLflow run id); RUN_ID:foldK for the encoder its protocol fine-tuned in fold K (topk-finetune; RUN_ID:foldK:seedS for a seed repeat). Repeatable.")]
WeightsOpt = Annotated[Optional[list[Path]], typer.Option("--weights", "-w", help="An encoder state dict (e.g. from histobench pretrain). Repeatable; all use --encoder and its -o encoder.KEY=VAL.")]
EncoderNameOpt = Annotated[str, typer.Option("--encoder", "-e", help="Encoder of the --weights files.", autocompletion=_completer("encoder"))]
TilesOpt = Annotated[Optional[int], typer.Option("--tiles", help=f"Tiles in the held-out set (default {DEFAULT_TILES}; {DEMO_TILES} with --demo).")]
AnalyzeOptionsOpt = Annotated[Optional[list[str]], typer.Option("--option", "-o", help="prefix.key=value with prefix analysis, encoder (for --weights) or task. Repeatable.")]
TileSeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the tile sample and of the analysis.")]


def metrics_table(title: str, metrics: dict[str, float]) -> Table:
    """An analysis's flat metrics. A name longer than the terminal allows (``wilcoxon_p/entropy/A_vs_B``) is
    folded onto further lines, never cut; the values are never wrapped."""
    table = Table(title=title, title_justify="left")
    table.add_column("metric", overflow="fold")
    table.add_column("value", justify="right", no_wrap=True, min_width=10)
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4g}")
    return table


def analyze_cmd(
    name: NameArg,
    task: TaskOpt,
    run: RunsOpt = None,
    weights: WeightsOpt = None,
    encoder: EncoderNameOpt = "timm",
    option: AnalyzeOptionsOpt = None,
    demo: DemoOpt = False,
    tiles: TilesOpt = None,
    seed: TileSeedOpt = 0,
    tracking_uri: TrackingOpt = None,
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    data_root: DataRootOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Analyse trained encoders on the task's fixed held-out tile set; logs an `analysis` MLflow run.

    Encoders: each --run (in order), then each --weights file. Example:
    histobench analyze feature-norms --task tcga-nsclc --demo --run RUN_A --run RUN_B
    histobench analyze cka --task tcga-nsclc --demo --run RUN --run RUN:fold0   # what fold 0's fine-tuning changed
    """
    from histobench.analyze.encoders import from_run, from_weights, unique_labels
    from histobench.analyze.runner import check_count, run_analysis
    from histobench.analyze.tiles import held_out_tiles
    from histobench.device import resolve_device
    from histobench.errors import HistobenchError
    from histobench.options import parse_options
    from histobench.registry import create, get_component

    opts = parse_options(option)
    other = sorted(set(opts) - set(ANALYZE_PREFIXES))
    if other:
        raise HistobenchError(f"analyze takes -o options with prefix {', '.join(ANALYZE_PREFIXES)}, not {', '.join(other)}")
    if opts.get("encoder") and not weights:
        raise HistobenchError("-o encoder.KEY=VAL sets the encoder of --weights files, and no --weights was given "
                              "(a --run's encoder comes from the run)")
    preset = "demo" if demo else None
    runs, files = list(run or []), list(weights or [])
    cls = get_component("analysis", name).cls
    check_count(cls, len(runs) + len(files))  # before loading anything
    analysis = create("analysis", name, opts.get("analysis"), preset)
    task_comp = create("task", task, opts.get("task"), preset)
    if files:
        create("encoder", encoder, opts.get("encoder"), preset)  # a bad -o encoder.KEY=VAL fails before any loading
    for path in files:
        if not path.is_file():
            raise HistobenchError(f"weights file {path} does not exist")
    dev = resolve_device(device)
    rep = reporter()
    encoders = []
    with rep.stage("load encoders", total=len(runs) + len(files), unit="encoders") as st:
        for run_id in runs:
            encoders.append(from_run(run_id, dev, tracking_uri))
            st.advance()
        for path in files:
            encoders.append(from_weights(path, encoder, opts.get("encoder"), dev, preset=preset, seed=seed))
            st.advance()
    unique_labels(encoders)
    n = tiles if tiles is not None else (DEMO_TILES if demo else DEFAULT_TILES)
    pixels, refs, tile_hash = held_out_tiles(task_comp, demo, data_root, workdir, n, seed, rep)
    out = run_analysis(analysis, encoders, pixels, refs, tile_hash, task=task_comp.name, workdir=workdir, device=dev,
                       seed=seed, tracking_uri=tracking_uri, reporter=rep,
                       extra_params={"task": {"name": task_comp.name, "demo": demo}})
    console.print(metrics_table(f"{name} · {len(encoders)} encoders · {len(pixels)} tiles ({tile_hash}) · "
                                f"{out.seconds:.0f} s", out.metrics))
    console.print(f"report: {escape(str(out.out_dir / 'report.json'))}", highlight=False, soft_wrap=True)
    if out.run_id:
        console.print(f"MLflow run [bold]{out.run_id}[/] at {escape(str(out.tracking_uri))}", highlight=False,
                      soft_wrap=True)
