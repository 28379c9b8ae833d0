"""Nuclei per mm² of one slide, and an overlay picture of the nuclei, logged to MLflow.

Segments the slide's tissue tiles with a histobench segmenter (``hed-watershed`` by default), prints the nuclei
count per mm² of tile area and of tissue, and logs ``density.json`` and ``overlay.png`` (a strip of tiles with
every nucleus outlined) as an MLflow run with the stage tag ``segmentation`` in the experiment
``segmentation-checks`` (:mod:`histobench_dirl.density`). A user mistake is one line on stderr and exit code 2.

    python plugins/histobench_dirl/scripts/nuclei_density.py tests/data/slides/CMU-1-Small-Region.svs \\
        --tracking-uri sqlite:///mlflow.db
    python plugins/histobench_dirl/scripts/nuclei_density.py slide.svs --segmenter stardist -o scale=2.0
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("slide", type=Path)
    p.add_argument("--segmenter", default="hed-watershed")
    p.add_argument("-o", "--option", action="append", default=[], help="segmenter option KEY=VALUE (repeatable)")
    p.add_argument("--mpp", type=float, default=0.5, help="µm/px of the tiles (0.5: 20x)")
    p.add_argument("--size", type=int, default=256, help="tile side in pixels")
    p.add_argument("--max-tiles", type=int, default=0, help="segment at most this many evenly spaced tiles (0: all)")
    p.add_argument("--overlay-tiles", type=int, default=4, help="tiles in the overlay picture")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument("--out", type=Path, default=None, help="folder for density.json and overlay.png")
    args = p.parse_args(argv)

    from histobench.errors import HistobenchError
    from histobench.options import parse_options
    from histobench.reporting import RichReporter
    from histobench_dirl.density import log_density, slide_density

    try:
        options = parse_options([f"segmenter.{o}" for o in args.option]).get("segmenter") if args.option else None
        density = slide_density(args.slide, args.segmenter, options, args.mpp, args.size, args.max_tiles,
                                args.overlay_tiles, RichReporter())
        out = args.out or Path(tempfile.mkdtemp(prefix="histobench-density-"))
        run_id, files = log_density(density, out, args.tracking_uri)
    except HistobenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(density.line())
    print(f"files: {', '.join(str(f) for f in files)}")
    if run_id:
        print(f"MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
