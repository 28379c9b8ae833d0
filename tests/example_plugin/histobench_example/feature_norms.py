"""A toy analysis: how long each encoder's tile embeddings are.

For every encoder, the L2 norm of its embedding of each held-out tile; the report gives their mean and
standard deviation (``ddof=1``), ``norms.csv`` the norm of every tile, and ``feature_norms.png`` a bar plot
with one bar (± sd) per encoder. It shows the whole analysis contract in a few lines; it is no measure of
quality.
"""

from __future__ import annotations

from pydantic import Field

from histobench.components import Analysis


class FeatureNorms(Analysis):
    """Mean and sd of the L2 norm of each encoder's tile embeddings, with a bar plot."""

    name = "feature-norms"
    min_encoders = 1
    max_encoders = 4

    class Options(Analysis.Options):
        batch_size: int = Field(64, ge=1, description="Tiles per forward pass.")

    def run(self, inputs):
        import numpy as np
        import pandas as pd
        from matplotlib.figure import Figure  # the object API: no pyplot state

        from histobench.analyze import AnalysisResult

        rows, norms = [], {}
        for enc in inputs.encoders:
            emb = inputs.embeddings(enc, self.options.batch_size).double()
            n = emb.norm(dim=1).numpy()
            norms[enc.label] = n
            rows.append({"label": enc.label, "dim": int(emb.shape[1]), "tiles": len(n),
                         "norm_mean": float(n.mean()), "norm_sd": float(n.std(ddof=1)) if len(n) > 1 else 0.0})
        table = pd.DataFrame({"slide_id": [r.slide_id for r in inputs.tile_refs], "x": [r.x for r in inputs.tile_refs],
                              "y": [r.y for r in inputs.tile_refs], **norms})
        csv = inputs.out_dir / "norms.csv"
        table.to_csv(csv, index=False)

        fig = Figure(figsize=(1.5 + 1.2 * len(rows), 3.5), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        x = np.arange(len(rows))
        ax.bar(x, [r["norm_mean"] for r in rows], yerr=[r["norm_sd"] for r in rows], capsize=4, color="#4c72b0")
        ax.set_xticks(x, [r["label"] for r in rows], rotation=20, ha="right", fontsize=7)
        ax.set_ylabel("embedding L2 norm (mean ± sd)")
        png = inputs.out_dir / "feature_norms.png"
        fig.savefig(png)

        metrics = {f"{stat}/{r['label']}": r[stat] for r in rows for stat in ("norm_mean", "norm_sd")}
        return AnalysisResult(metrics=metrics, report={"encoders": rows}, files=[csv, png])
