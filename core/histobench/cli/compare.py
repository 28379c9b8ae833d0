"""``histobench compare``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from histobench.cli.common import TrackingOpt, console


def compare_cmd(
    run_a: Annotated[str, typer.Argument(help="MLflow run id of run A.")],
    run_b: Annotated[str, typer.Argument(help="MLflow run id of run B.")],
    tracking_uri: TrackingOpt = None,
    metric: Annotated[Optional[str], typer.Option("--metric", "-m", help="Metric (default: the task's primary one).")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Paired patient-bootstrap replicates.")] = 1000,
) -> None:
    """Paired comparison of two runs on the same folds: A - B with a bootstrap CI and a Wilcoxon p over folds."""
    from histobench.evaluate.compare import compare_runs

    r = compare_runs(run_a, run_b, tracking_uri, metric=metric, n=bootstrap)
    folds = r["folds"]
    table = Table(title=f"{r['task']} · {r['metric']} · A - B (splits {r['split_hash']})", title_justify="left")
    for col in ("fold", f"A {r['name_a']}", f"B {r['name_b']}", "A - B"):
        table.add_column(col, justify="right")
    for k, row in folds.iterrows():
        table.add_row(str(k), f"{row['a']:.3f}", f"{row['b']:.3f}", f"{row['difference']:+.3f}")
    table.add_section()
    table.add_row("overall", f"{r['a']:.3f}", f"{r['b']:.3f}", f"{r['difference']:+.3f}")
    console.print(table)
    console.print(f"difference {r['difference']:+.4f}, 95% paired bootstrap CI [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]; "
                  f"Wilcoxon signed-rank p = {r['wilcoxon_p']:.4g} over {r['n_folds']} folds", highlight=False)
