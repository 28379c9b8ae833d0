"""``histobench slides info|tile``: look at one whole-slide image the way the pipeline will."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from histobench.cli.common import console, err_console, handle_errors
from histobench.cli.output import FormatOpt, OutputFormat, print_json

app = typer.Typer(help="Inspect and tile single whole-slide images.", no_args_is_help=True)

PathArg = Annotated[Path, typer.Argument(help="Slide file (SVS, NDPI, TIFF, ...) or a DICOM WSI folder.")]
MppOpt = Annotated[Optional[float], typer.Option("--slide-mpp", help="Override the slide's level-0 µm/px (when its metadata lacks it or is wrong).")]


@app.command("info")
@handle_errors
def info_cmd(
    path: PathArg,
    slide_mpp: Annotated[Optional[float], typer.Option("--mpp", "--slide-mpp", help="Override the slide's level-0 µm/px.")] = None,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Vendor, pyramid levels, dimensions, µm/px, magnification and associated images of a slide."""
    from histobench.slides.reader import open_slide
    from histobench.slides.tissue import slide_kind

    with open_slide(path, mpp=slide_mpp) as slide:
        info = slide.info()
        thumb, _ = slide.thumbnail(256)
        kind = slide_kind(thumb)
    if fmt == OutputFormat.json:
        print_json({**info, "path": str(info["path"]), "stain": kind})
        return
    mpp = f"{info['mpp']:.4g} ({info['mpp_source']})" if info["mpp"] else "unknown (pass --slide-mpp)"
    mag = f"{info['magnification']:g}x ({info['magnification_source']})" if info["magnification"] else "unknown"
    console.print(Text(str(info["path"]), style="bold"), highlight=False)  # a file name is text, not markup
    console.print(f"vendor: {info['vendor']}", highlight=False)
    console.print(f"levels: {info['levels']}", highlight=False)
    console.print(f"dimensions: {info['dimensions'][0]} x {info['dimensions'][1]} px", highlight=False)
    console.print(f"mpp: {mpp}", highlight=False)
    console.print(f"magnification: {mag}", highlight=False)
    assoc = ", ".join(f"{k} {w}x{h}" for k, (w, h) in info["associated_images"].items()) or "none"
    console.print(f"associated images: {assoc}", highlight=False)
    console.print(f"stain: {kind}" + ("" if kind == "brightfield" else " (not brightfield H&E)"), highlight=False)
    table = Table(title="pyramid", title_justify="left")
    for col in ("level", "width", "height", "downsample", "µm/px"):
        table.add_column(col, justify="right")
    for i, ((w, h), ds) in enumerate(zip(info["level_dimensions"], info["level_downsamples"])):
        table.add_row(str(i), str(w), str(h), f"{ds:.3f}", f"{info['mpp'] * ds:.3f}" if info["mpp"] else "?")
    console.print(table)
    if info["colour_warning"]:
        err_console.print(f"[yellow]warning:[/] {info['colour_warning']}", highlight=False)


@app.command("tile")
@handle_errors
def tile_cmd(
    path: PathArg,
    mpp: Annotated[float, typer.Option("--mpp", help="Target µm/px of the tiles.")] = 0.5,
    size: Annotated[int, typer.Option("--size", help="Tile side in pixels at the target µm/px.")] = 256,
    min_tissue: Annotated[float, typer.Option("--min-tissue", help="Minimum tissue fraction of a kept tile.")] = 0.5,
    out: Annotated[Optional[Path], typer.Option("--out", help="Thumbnail PNG with the tile grid (default: <slide>-tiles.png here).")] = None,
    slide_mpp: MppOpt = None,
) -> None:
    """Tile a slide at a target µm/px: tile count, tissue fraction and a thumbnail PNG with the grid drawn."""
    from histobench.slides.reader import open_slide
    from histobench.slides.tiling import tile_slide
    from histobench.slides.tissue import slide_kind, tissue_mask

    with open_slide(path, mpp=slide_mpp) as slide:
        tiles = tile_slide(slide, mpp=mpp, tile_size=size, min_tissue=min_tissue)
        thumb, ds = slide.thumbnail(1024)
        mask = tissue_mask(thumb)
        kind = slide_kind(thumb)
        slide_id, slide_mpp_v = slide.slide_id, slide.mpp
        level_ds = slide.level_downsamples[tiles.level]
    out = out or Path(f"{slide_id}-tiles.png")
    draw_tile_grid(thumb, mask, tiles, ds, out)
    console.print(Text(f"{slide_id}: {len(tiles)} tiles of {size} px at {mpp:g} µm/px "
                  f"(slide {slide_mpp_v:.4g} µm/px; read {tiles.read_size} px at level {tiles.level}, "
                  f"downsample {level_ds:.3f})"), highlight=False)
    frac = float(tiles.tissue_fraction.mean()) if len(tiles) else 0.0
    console.print(f"tissue: {mask.mean():.1%} of the thumbnail; mean tissue fraction of kept tiles {frac:.2f}; "
                  f"stain {kind}", highlight=False)
    console.print(f"thumbnail with the tile grid: {out}", highlight=False, markup=False)


def draw_tile_grid(thumb, mask, tiles, downsample: float, out: Path) -> Path:
    """Save ``thumb`` with the tissue outline tinted and each kept tile's square drawn on it."""
    import numpy as np
    from PIL import Image, ImageDraw

    img = thumb.astype(np.float32)
    img[~mask] = img[~mask] * 0.6 + 255 * 0.4  # fade what is not tissue
    canvas = Image.fromarray(img.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    side = tiles.tile_size_level0 / downsample
    for x, y in tiles.coords:
        x0, y0 = x / downsample, y / downsample
        draw.rectangle([x0, y0, x0 + side, y0 + side], outline=(0, 160, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
