"""``histobench analyze cka``: layer-by-layer CKA between two encoders on the fixed held-out tile set.

HistoTransfer (Sharma et al., IEEE BHI 2021, arXiv 2106.07068) compares a frozen and a fine-tuned encoder with
centered kernel alignment (Kornblith et al., ICML 2019) to see which layers fine-tuning changed. This analysis
computes ``M[a, b] = CKA(layer a of encoder 1, layer b of encoder 2)`` over the same N tiles
(:mod:`histobench.analyses.cka` for the estimators, :mod:`histobench.analyses.taps` for the layers).

The default estimator is the minibatch one of Nguyen, Raghu and Kornblith (ICLR 2021, arXiv 2010.15327). Its
sums of unbiased HSIC grow one batch at a time, so memory stays at one batch of activations and Gram
matrices. Batches are a seeded random permutation of the tile set (the set is stored in slide order, and
one-slide batches would estimate within-slide similarity), cut into near-equal parts of at most
``batch_size`` tiles. The ``full_*`` estimators keep every tile's reduced activations and form N×N Gram
matrices. With the RBF kernel the bandwidth is set within each batch (or once, for the full estimators).

Outputs under the analysis folder: ``cka.csv`` (one row per layer pair with its value, N, kernel,
estimator, bandwidth rule, batch size, reduction and the two encoders) and ``cka_heatmap.png`` (layer
names on the axes). Metrics: the mean of the whole matrix and, when both encoders have as many layers, the
diagonal (per layer, mean, min). A network compared with itself gives a symmetric matrix with a unit
diagonal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from histobench.components import Analysis
from histobench.errors import HistobenchError

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    from histobench.analyze import AnalysedEncoder, AnalysisInputs


def _names(text: str | None) -> list[str] | None:
    if text is None or not text.strip():
        return None
    return [n.strip() for n in text.split(",") if n.strip()]


class CKAAnalysis(Analysis):
    """Linear or RBF CKA between every layer of one encoder and every layer of another (heatmap + CSV)."""

    name = "cka"
    min_encoders = 2
    max_encoders = 2

    class Options(Analysis.Options):
        kernel: Literal["linear", "rbf"] = Field("linear", description="Kernel of the CKA.")
        estimator: Literal["full_biased", "full_unbiased", "minibatch_unbiased"] = Field(
            "minibatch_unbiased", description="HSIC estimator: on all tiles (biased or unbiased), or unbiased summed over minibatches.")
        rbf_t: float = Field(0.5, gt=0, description="RBF bandwidth factor t (see bandwidth).")
        bandwidth: Literal["median_sqdist", "median_dist"] = Field(
            "median_sqdist", description="RBF bandwidth rule: sigma^2 = t^2 * median of all squared distances, or sigma = t * median off-diagonal distance.")
        batch_size: int = Field(64, ge=4, description="Tiles per forward pass and per minibatch of the estimator.")
        reduce: Literal["avgpool", "flatten"] = Field("avgpool", description="Activation map -> vector: average over positions/tokens, or keep all values.")
        depth: Literal["stages", "blocks"] = Field("stages", description="Default layers of a ResNet: each stage, or each residual block.")
        layers_a: str | None = Field(None, description="Comma-separated module names of encoder 1 (default: stem, stages/blocks, embedding).")
        layers_b: str | None = Field(None, description="Comma-separated module names of encoder 2 (default: layers_a if given, else its default layers).")
        embedding: bool = Field(True, description="Add the final pooled embedding to the default layers.")

    def _layers(self, enc: "AnalysedEncoder", given: list[str] | None, probe) -> tuple[list[str], list[str]]:
        """(module paths, display names) of the layers of ``enc`` this analysis taps."""
        from histobench.analyses.taps import EMBEDDING, LayerTaps, default_layers, display_name, resolve_layers

        if given is not None:
            paths = resolve_layers(enc.module, given, enc.label)
        else:
            paths = default_layers(enc.module, self.options.depth) + ([EMBEDDING] if self.options.embedding else [])
            with LayerTaps(enc.module, paths, self.options.reduce) as taps:  # drop those a truncated model skips
                paths = taps.reached(probe)
        if not paths:
            raise HistobenchError(f"encoder {enc.label!r} has no layer to compare; name them with analysis.layers_a/_b")
        return paths, [display_name(enc.module, p) for p in paths]

    def run(self, inputs: "AnalysisInputs"):
        import numpy as np
        import torch

        from histobench.analyses.cka import MinibatchCKA, minibatch_slices, gram
        from histobench.analyses.taps import LayerTaps
        from histobench.analyze import AnalysisResult

        o = self.options
        enc_a, enc_b = inputs.encoders
        n = len(inputs.tiles)
        full = o.estimator != "minibatch_unbiased"
        unbiased = o.estimator != "full_biased"
        if n < (4 if unbiased else 2):
            raise HistobenchError(f"the {o.estimator} CKA estimator needs at least {4 if unbiased else 2} tiles, got {n} (raise --tiles)")
        probe_a = inputs.pixels(enc_a, slice(0, 2)).to(inputs.device)
        probe_b = inputs.pixels(enc_b, slice(0, 2)).to(inputs.device)
        given_a = _names(o.layers_a)
        given_b = _names(o.layers_b) or given_a
        paths_a, names_a = self._layers(enc_a, given_a, probe_a)
        paths_b, names_b = self._layers(enc_b, given_b, probe_b)

        order = torch.from_numpy(np.random.default_rng(inputs.seed).permutation(n))
        parts = [slice(0, n)] if full else minibatch_slices(n, o.batch_size)
        acc = MinibatchCKA(len(paths_a), len(paths_b), unbiased=unbiased)
        where = torch.device("cpu") if inputs.device.type == "mps" else inputs.device  # MPS has no float64

        def grams(feats: dict[str, torch.Tensor], paths: list[str]) -> list[torch.Tensor]:
            return [gram(feats[p].to(where, torch.float64), o.kernel, o.rbf_t, o.bandwidth) for p in paths]

        with LayerTaps(enc_a.module, paths_a, o.reduce) as taps_a, LayerTaps(enc_b.module, paths_b, o.reduce) as taps_b:
            for part in parts:
                idx = order[part]
                feats_a = self._forward(inputs, enc_a, taps_a, idx)
                feats_b = self._forward(inputs, enc_b, taps_b, idx)
                acc.update(grams(feats_a, paths_a), grams(feats_b, paths_b))
        matrix = acc.matrix()

        csv = self._write_csv(inputs.out_dir / "cka.csv", matrix, names_a, names_b, n, enc_a.label, enc_b.label)
        png = self._write_heatmap(inputs.out_dir / "cka_heatmap.png", matrix, names_a, names_b, n, enc_a.label, enc_b.label)
        metrics: dict[str, float] = {"cka_mean": float(np.nanmean(matrix)) if np.isfinite(matrix).any() else float("nan")}
        diagonal = []
        if len(names_a) == len(names_b):
            for i, (a, b) in enumerate(zip(names_a, names_b)):
                key = a if a == b else f"{a}~{b}"
                diagonal.append({"layer": key, "cka": matrix[i][i]})
                metrics[f"cka_diag/{key}"] = matrix[i][i]
            values = np.array([d["cka"] for d in diagonal], dtype=float)
            metrics["cka_diag_mean"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
            metrics["cka_diag_min"] = float(np.nanmin(values)) if np.isfinite(values).any() else float("nan")
        report = {"n": n, "kernel": o.kernel, "estimator": o.estimator, "bandwidth": o.bandwidth if o.kernel == "rbf" else None,
                  "rbf_t": o.rbf_t if o.kernel == "rbf" else None, "batch_size": o.batch_size, "batches": acc.batches,
                  "reduce": o.reduce, "encoder_a": enc_a.label, "encoder_b": enc_b.label, "layers_a": names_a,
                  "layers_b": names_b, "matrix": [[_json(v) for v in row] for row in matrix],
                  "diagonal": [{"layer": d["layer"], "cka": _json(d["cka"])} for d in diagonal]}
        if diagonal:
            finite = [d for d in diagonal if np.isfinite(d["cka"])]
            if finite:
                report["most_changed_layer"] = min(finite, key=lambda d: d["cka"])["layer"]
        return AnalysisResult(metrics=metrics, report=report, files=[csv, png])

    def _forward(self, inputs: "AnalysisInputs", enc: "AnalysedEncoder", taps, idx):
        """The tapped activations of ``enc`` on tiles ``idx`` (in sub-batches of ``batch_size`` for the full
        estimators, which see every tile at once)."""
        import torch

        chunks = [idx[i:i + self.options.batch_size] for i in range(0, len(idx), self.options.batch_size)]
        outs = [taps(inputs.pixels(enc, chunk).to(inputs.device)) for chunk in chunks]
        return {p: torch.cat([o[p] for o in outs]) for p in outs[0]}

    def _write_csv(self, path: "Path", matrix, names_a, names_b, n: int, label_a: str, label_b: str) -> "Path":
        import pandas as pd

        o = self.options
        rows = [{"layer_a": a, "layer_b": b, "cka": matrix[i][j], "n": n, "kernel": o.kernel, "estimator": o.estimator,
                 "bandwidth": o.bandwidth if o.kernel == "rbf" else "", "rbf_t": o.rbf_t if o.kernel == "rbf" else "",
                 "batch_size": o.batch_size, "reduce": o.reduce, "encoder_a": label_a, "encoder_b": label_b}
                for i, a in enumerate(names_a) for j, b in enumerate(names_b)]
        pd.DataFrame(rows).to_csv(path, index=False, float_format="%.10g")
        return path

    def _write_heatmap(self, path: "Path", matrix, names_a, names_b, n: int, label_a: str, label_b: str) -> "Path":
        import numpy as np
        from matplotlib.figure import Figure  # the object API: no pyplot state, no display needed

        o = self.options
        m = np.array(matrix, dtype=float)
        fig = Figure(figsize=(2.2 + 0.55 * len(names_b), 1.8 + 0.45 * len(names_a)), dpi=110, layout="constrained")
        ax = fig.add_subplot()
        image = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="magma", origin="upper")
        ax.set_xticks(range(len(names_b)), names_b, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(names_a)), names_a, fontsize=7)
        ax.set_xlabel(label_b, fontsize=8)
        ax.set_ylabel(label_a, fontsize=8)
        if m.size <= 400:
            for (i, j), v in np.ndenumerate(m):
                ax.text(j, i, "nan" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if np.isfinite(v) and v > 0.6 else "white")
        rule = f", RBF t={o.rbf_t:g} ({o.bandwidth})" if o.kernel == "rbf" else ""
        ax.set_title(f"{o.kernel} CKA, {o.estimator}{rule}, N={n}", fontsize=8)
        fig.colorbar(image, ax=ax, shrink=0.8)
        fig.savefig(path)
        return path


def _json(v: float) -> float | None:
    """A JSON-safe float (``None`` for NaN)."""
    import math

    return float(v) if math.isfinite(v) else None
