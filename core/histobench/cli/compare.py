"""``histobench compare``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from histobench.cli.common import TrackingOpt, console


def compare_cmd(
    run_a: Annotated[str, typer.Argument(help="MLflow run id of run A.")],
    run_b: Annotated[str, typer.Argument(help="MLflow run id of run B.")],
    tracking_uri: TrackingOpt = None,
    metric: Annotated[Optional[str], typer.Option("--metric", "-m", help="Metric (default: the task's primary one).")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Paired patient-bootstrap replicates.")] = 1000,
) -> None:
    """Paired comparison of two runs on the same folds: A - B by each estimator, each with its own 95% CI."""
    from histobench.evaluate.compare import compare_runs
    from histobench.evaluate.stats import estimator_label

    r = compare_runs(run_a, run_b, tracking_uri, metric=metric, n=bootstrap)
    folds, n, key = r["folds"], r["n_folds"], r["estimator"]
    # run names come from the tracking store: shown as text, never read as rich markup
    table = Table(title=Text(f"{r['task']} · {r['metric']} · A - B (splits {r['split_hash']})"), title_justify="left")
    for col in ("fold", f"A {r['name_a']}", f"B {r['name_b']}", "A - B"):
        table.add_column(Text(col), justify="right")
    for k, row in folds.iterrows():
        table.add_row(str(k), f"{row['a']:.3f}", f"{row['b']:.3f}", f"{row['difference']:+.3f}")
    table.add_section()
    table.add_row(f"fold: {estimator_label('fold', n)}".replace(" ± sd", ""),
                  f"{r['fold_a']:.3f}", f"{r['fold_b']:.3f}", f"{r['fold_difference']:+.3f}")
    table.add_row(f"{key}: {estimator_label(key, n)}", f"{r['a']:.3f}", f"{r['b']:.3f}", f"{r['difference']:+.3f}")
    console.print(table)
    console.print(f"fold: mean difference over {n} folds {r['fold_difference']:+.4f}, 95% CI "
                  f"[{r['fold_ci_low']:+.4f}, {r['fold_ci_high']:+.4f}] (paired t-interval over folds); "
                  f"Wilcoxon signed-rank p = {r['wilcoxon_p']:.4g} over {n} folds", highlight=False)
    console.print(f"{key}: difference {r['difference']:+.4f} ({estimator_label(key, n)}), 95% CI "
                  f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] (paired {estimator_label(key, n, ci=True)})",
                  highlight=False)
