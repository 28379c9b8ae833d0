"""``histobench segment``: tile a task's cohort and segment its nuclei into the segmentation cache.

The tiles are the ones ``histobench run`` makes (same cohort, same tiling, same cache). Nothing is logged to
MLflow: the cache folder is the output, and pretexts that need masks read it.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from histobench.cli.common import DataRootOpt, DemoOpt, OptionsOpt, TaskOpt, WorkdirOpt, _completer, console, reporter
from histobench.cli.run import DEFAULT_WORKDIR

SEGMENT_PREFIXES = ("segmenter", "task")


def segment_cmd(
    task: TaskOpt,
    segmenter: Annotated[str, typer.Option("--segmenter", "-s", help="Nuclei segmenter (histobench segmenters list).",
                                           autocompletion=_completer("segmenter"))],
    option: OptionsOpt = None,
    demo: DemoOpt = False,
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    data_root: DataRootOpt = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=0, help="Worker processes (spawned); 0: this "
                                                   "process; default: 0 for small cohorts, else up to 8.")] = None,
) -> None:
    """Segment the nuclei of every tile of a task's cohort (cached per slide; a rerun only does what is missing).

    Example: histobench segment --task tcga-nsclc --demo --segmenter oracle -o segmenter.min_area=4
    """
    from histobench.errors import OptionError
    from histobench.options import parse_options
    from histobench.pipeline import RunSpec, load_cohort, tile_cohort
    from histobench.registry import create
    from histobench.segment import segment_cohort

    opts = parse_options(option)
    other = sorted(set(opts) - set(SEGMENT_PREFIXES))
    if other:
        raise OptionError(f"histobench segment takes only segmenter. and task. options, not {other[0]}.")
    seg = create("segmenter", segmenter, opts.get("segmenter"), "demo" if demo else None)
    spec = RunSpec(task=task, options={"task": opts.get("task", {})}, demo=demo, workdir=workdir,
                   data_root=data_root, track=False)
    rep = reporter()
    task_ = create("task", task, opts.get("task"), "demo" if demo else None)  # as `run` resolves it
    manifest = load_cohort(spec, task_, rep)
    slides = tile_cohort(manifest, task_, spec.workdir, rep, spec)
    res = segment_cohort(seg, slides, spec.workdir, rep, workers=workers)
    console.print(
        f"{res.slides} slides, {res.tiles} tiles: {res.cached} cached ({100 * res.hit_rate:.0f} %), "
        f"{res.segmented} segmented, {res.failed} failed; {res.nuclei_per_tile:.1f} nuclei/tile; "
        f"{res.tiles_per_second:.1f} tiles/s",
        highlight=False)
    console.print(f"cache: {res.root}", highlight=False, soft_wrap=True)
