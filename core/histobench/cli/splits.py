"""``histobench splits make|audit``: patient-level splits and the leakage audit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from histobench.cli.common import console, handle_errors

app = typer.Typer(help="Make patient-level splits and audit splits for patients on two sides.", no_args_is_help=True)


def _manifest(task_name: str | None, manifest: Path | None):
    """The cohort to split: a manifest CSV, or the task's label table (no slides needed) for TCGA tasks."""
    import pandas as pd

    from histobench.errors import HistobenchError

    if manifest is not None:
        if not manifest.exists():
            raise HistobenchError(f"manifest {manifest} does not exist")
        return pd.read_csv(manifest, dtype={"slide_id": str, "case_id": str})
    if task_name is None:
        raise HistobenchError("give --manifest, or --task to use the task's own label table")
    from histobench.registry import create

    task = create("task", task_name)
    if not hasattr(task, "labels"):
        raise HistobenchError(f"task {task_name} has no shipped label table; pass --manifest")
    table = task.labels()
    if "slide_id" not in table.columns:
        raise HistobenchError(f"task {task_name} labels patients, not slides; pass --manifest of your slides")
    return table


@app.command("audit")
@handle_errors
def audit_cmd(
    task: Annotated[Optional[str], typer.Option("--task", "-t", help="Task whose preset (or default splits) to audit.")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="A published split preset of the task (e.g. hipt-10fold); default: histobench's own splits.")] = None,
    splits_file: Annotated[Optional[Path], typer.Option("--splits", help="A splits CSV written by histobench (instead of --task/--preset).")] = None,
    manifest: Annotated[Optional[Path], typer.Option("--manifest", help="Cohort manifest (default: the task's label table).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the default splits.")] = 0,
    show: Annotated[int, typer.Option("--show", help="Patients to list per fold.")] = 5,
) -> None:
    """Every patient with slides on two sides of a fold (train/val/test), per fold."""
    import tempfile

    from histobench.cohorts.splits import Splits, leaks_per_fold, task_splits

    df = _manifest(task, manifest) if (task or manifest) else None
    if splits_file is not None:
        splits = Splits.load(splits_file)
    else:
        from histobench.registry import create

        comp = create("task", task or "", None)
        with tempfile.TemporaryDirectory() as tmp:
            splits = task_splits(comp, df, workdir=Path(tmp), preset=preset, seed=seed)
    audit = splits.audit(df)
    per_fold = leaks_per_fold(splits, df)
    table = Table(title=f"leakage audit of {splits.name} (hash {splits.hash})", title_justify="left")
    for col in ("fold", "leaking patients", "train+test", "patients (first)"):
        table.add_column(col, overflow="fold")
    for fold, n in per_fold.items():
        rows = audit[audit["fold"] == fold]
        tt = sum("train" in str(v) and "test" in str(v) for v in rows["sides"])
        names = ", ".join(f"{c} ({s})" for c, s in zip(rows["case_id"][:show], rows["sides"][:show]))
        table.add_row(str(fold), str(n), str(tt), Text(names))  # patient ids as text, never markup
    console.print(table)
    total = sum(per_fold.values())
    verdict = "no patient on two sides" if total == 0 else f"{total} patient-folds leak"
    console.print(f"{splits.name}: {splits.folds} folds, {verdict}", highlight=False)


@app.command("make")
@handle_errors
def make_cmd(
    task: Annotated[str, typer.Option("--task", "-t", help="Task (its folds and stratification).")],
    manifest: Annotated[Optional[Path], typer.Option("--manifest", help="Cohort manifest (default: the task's label table).")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="A published split preset instead of histobench's own.")] = None,
    workdir: Annotated[Path, typer.Option("--workdir", help="The splits go to WORKDIR/splits/.", envvar="HISTOBENCH_WORKDIR")] = Path("histobench-work"),
    seed: Annotated[int, typer.Option("--seed")] = 0,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of each fold's training patients moved to validation.")] = 0.0,
) -> None:
    """Write the task's splits (patient-level, stratified, seeded) and print their content hash."""
    from histobench.cohorts.splits import leaks_per_fold, task_splits
    from histobench.registry import create

    comp = create("task", task)
    df = _manifest(task, manifest)
    splits = task_splits(comp, df, workdir=workdir, preset=preset, seed=seed, val_fraction=val_fraction)
    leaks = sum(leaks_per_fold(splits, df).values())
    path = Path(workdir) / "splits" / f"{comp.name}-{splits.name}-{splits.hash}.csv"
    console.print(f"{splits.name}: {splits.folds} folds, hash {splits.hash}, leaks {leaks}; written to {path}",
                  highlight=False, markup=False)
