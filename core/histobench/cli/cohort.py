"""``histobench cohort import-gdc|import-panda|import-csv|check``: build and check cohort manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from histobench.cli.common import AllowOutsideOpt, DataRootOpt, console, err_console, handle_errors

app = typer.Typer(help="Build cohort manifests (GDC, PANDA, CSV) and check them slide by slide.", no_args_is_help=True)

OutOpt = Annotated[Path, typer.Option("--out", "-O", help="Manifest CSV to write.")]
SlidesOpt = Annotated[Optional[Path], typer.Option("--slides", help="Folder with the slide files (searched recursively); rows without a file are dropped.")]


def _write(manifest, report, out: Path) -> None:
    from histobench.slides.synthetic import _atomic_write_text

    out = Path(out)
    _atomic_write_text(out, manifest.to_csv(index=False))
    if report.dropped:
        dropped = out.with_name(out.stem + "-dropped.csv")
        _atomic_write_text(dropped, report.to_frame().to_csv(index=False))
    # slide ids, paths and reasons come from the user's files: printed as text (markup=False)
    console.print(report.summary(), highlight=False, markup=False)
    for line in report.lines():
        err_console.print(line, highlight=False, markup=False)
    console.print(f"manifest: {out}" + (f" (dropped rows: {out.stem}-dropped.csv)" if report.dropped else ""),
                  highlight=False, markup=False)


@app.command("import-gdc")
@handle_errors
def import_gdc_cmd(
    sample_sheet: Annotated[Path, typer.Option("--sample-sheet", help="GDC sample sheet (TSV) of the slide files.")],
    out: OutOpt = Path("manifest.csv"),
    slides: SlidesOpt = None,
    clinical: Annotated[Optional[Path], typer.Option("--clinical", help="GDC clinical TSV (survival from vital status and days).")] = None,
    cdr: Annotated[Optional[Path], typer.Option("--cdr", help="TCGA-CDR table (OS, OS.time) for survival.")] = None,
    all_slides: Annotated[bool, typer.Option("--all-slides", help="Keep frozen (TS/BS) slides too, not only diagnostic DX slides.")] = False,
) -> None:
    """A manifest from a GDC sample sheet: DX slides, patient = first 12 barcode characters, label = project."""
    from histobench.cohorts.importers import import_gdc

    manifest, report = import_gdc(sample_sheet, slides=slides, clinical=clinical, cdr=cdr,
                                  diagnostic_only=not all_slides)
    _write(manifest, report, out)


@app.command("import-panda")
@handle_errors
def import_panda_cmd(
    train_csv: Annotated[Path, typer.Option("--train-csv", help="PANDA's train.csv.")],
    out: OutOpt = Path("manifest.csv"),
    slides: SlidesOpt = None,
) -> None:
    """A manifest from PANDA's train.csv: label = ISUP grade 0-5, inconsistent Gleason scores dropped."""
    from histobench.cohorts.importers import import_panda

    manifest, report = import_panda(train_csv, slides=slides)
    _write(manifest, report, out)


@app.command("import-csv")
@handle_errors
def import_csv_cmd(
    csv: Annotated[Path, typer.Argument(help="A CSV with one row per slide.")],
    out: OutOpt = Path("manifest.csv"),
    slides: SlidesOpt = None,
    slide_col: Annotated[str, typer.Option(help="Column with the slide id (file name without extension).")] = "slide_id",
    case_col: Annotated[str, typer.Option(help="Column with the patient id.")] = "case_id",
    path_col: Annotated[Optional[str], typer.Option(help="Column with the slide path (else found under --slides).")] = None,
    label_col: Annotated[Optional[str], typer.Option(help="Column with the class or grade.")] = None,
    time_col: Annotated[Optional[str], typer.Option(help="Column with the survival time (months).")] = None,
    event_col: Annotated[Optional[str], typer.Option(help="Column with the event (1 death, 0 censored).")] = None,
) -> None:
    """A manifest from any CSV, naming which columns hold the slide, patient, path and labels."""
    from histobench.cohorts.importers import import_csv

    manifest, report = import_csv(csv, slides=slides, slide_col=slide_col, case_col=case_col, path_col=path_col,
                                  label_col=label_col, time_col=time_col, event_col=event_col)
    _write(manifest, report, out)


@app.command("check")
@handle_errors
def check_cmd(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV (relative paths are relative to its folder).")],
    task: Annotated[Optional[str], typer.Option("--task", "-t", help="Check labels against this task's classes / survival columns.")] = None,
    status: Annotated[Path, typer.Option("--status", help="Status CSV to append the per-slide records to.")] = Path("status.csv"),
    slide_mpp: Annotated[Optional[float], typer.Option("--slide-mpp", help="µm/px for slides whose metadata lacks it.")] = None,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first bad slide.")] = False,
    data_root: DataRootOpt = None,
    allow_outside_data_root: AllowOutsideOpt = False,
) -> None:
    """Check every row and slide of a manifest; one line per problem, all recorded in the status CSV.

    Slide paths must lie inside the manifest's folder or --data-root unless --allow-outside-data-root."""
    import pandas as pd

    from histobench.cohorts.status import StatusTable, check_slide, validate_manifest_rows
    from histobench.errors import HistobenchError

    comp = None
    if task:
        from histobench.registry import create

        comp = create("task", task)
    if not manifest.exists():
        raise HistobenchError(f"manifest {manifest} does not exist")
    try:
        df = pd.read_csv(manifest, dtype={"slide_id": str, "case_id": str, "path": str})
    except Exception as exc:  # pandas raises several kinds on a file that is not a CSV
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HistobenchError(f"manifest {manifest} is not a readable CSV: {first}") from None
    from histobench.cohorts.manifest import check_paths

    table = StatusTable()
    good, problems = validate_manifest_rows(df, comp, source=f"manifest {manifest}")
    joined = good.assign(path=[str(p if Path(p).is_absolute() else manifest.parent / p) for p in good["path"].astype(str)])
    check_paths(joined, [manifest.parent, data_root], allow_outside=allow_outside_data_root,
                source=f"manifest {manifest}")
    try:
        for sid, reason in problems:
            rec = table.add(sid, "manifest", "skipped", reason)
            err_console.print(rec.line(), highlight=False, markup=False)
            if fail_fast:
                raise HistobenchError(rec.line())
        for row in good.to_dict("records"):
            p = Path(row["path"])
            row["path"] = str(p if p.is_absolute() else manifest.parent / p)
            warnings: list[str] = []
            reason = check_slide(row, mpp=slide_mpp, warnings=warnings)
            rec = table.add(row["slide_id"], "check", "skipped" if reason else "ok", reason or "; ".join(warnings))
            if reason or warnings:
                err_console.print(rec.line(), highlight=False, markup=False)
            if reason and fail_fast:
                raise HistobenchError(rec.line())
    finally:
        table.save(status)
    console.print(table.summary() + f" (records appended to {status})", highlight=False, markup=False)
