"""``hlss-attributes``: what HLSS's text-initialised heads say about each class (interpretability, spec §6).

For the held-out tile set of ``histobench analyze``, each tile's attribute activations are the raw outputs of
the trained patch, slide and patient heads (``head_level(u)``, ``u`` = the L2-normalised backbone embedding,
through the adapter when the run used one): at initialisation, the cosine between the tile and each attribute's
text embedding. The analysis averages them per class and draws one heatmap per level (classes x attributes,
attributes in description-file order), writes the table as CSV, and reports each class's top attributes per level.
Labels are read for the analysis only, never in training.

Where things come from: the heads from an HLSS pretraining checkpoint (``-o analysis.checkpoint=...``: the
``checkpoint.pt`` of a ``WORKDIR/pretrain/hlss-…`` folder or the folder itself; by default the folder of an
analysed ``--weights .../encoder.pt``), the classes from a manifest (``-o analysis.labels=CSV`` with
``slide_id, label``; by default the ``manifest.csv`` beside the slides, which the demo cohorts have).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from histobench.components import Analysis
from histobench.errors import HistobenchError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch

LEVELS = ("patch", "slide", "patient")


def load_heads(path: str | Path) -> tuple[Any, dict[str, list[str]]]:
    """``(TextHeads on the CPU, attribute names per level)`` from an HLSS checkpoint (file or pretrain folder)."""
    import torch

    from histobench_hlss.heads import TextHeads

    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise HistobenchError(f"hlss-attributes: no HLSS checkpoint at {path} (set -o analysis.checkpoint=WORKDIR/"
                              f"pretrain/hlss-…/checkpoint.pt)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    pre = state.get("pretext", state) if isinstance(state, dict) else {}
    if not isinstance(pre, dict) or "heads" not in pre or "bank_names" not in pre:
        raise HistobenchError(f"hlss-attributes: {path} is not an HLSS pretraining checkpoint (no heads)")
    heads_state = pre["heads"]
    banks = {lvl: heads_state[f"bank_{lvl}"] for lvl in LEVELS}
    adapter = "adapter.weight" in heads_state
    in_dim = int(heads_state["adapter.weight"].shape[1]) if adapter else int(banks["patch"].shape[1])
    heads = TextHeads(banks, in_dim, adapter)
    heads.load_state_dict(heads_state)
    return heads.eval(), {lvl: list(pre["bank_names"][lvl]) for lvl in LEVELS}


def read_labels(path: str | Path) -> dict[str, str]:
    import pandas as pd

    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not {"slide_id", "label"} <= set(df.columns):
        raise HistobenchError(f"hlss-attributes: labels file {path} needs the columns slide_id, label")
    return dict(zip(df["slide_id"], df["label"]))


def slide_labels(tile_refs, labels_file: str | None) -> list[str | None]:
    """The class of each tile's slide, from ``labels_file`` or the ``manifest.csv`` beside the slides."""
    from histobench.analyze.tiles import PREFIX

    table: dict[str, str] = {}
    if labels_file:
        table = read_labels(labels_file)
    else:
        for folder in dict.fromkeys(Path(r.path).parent for r in tile_refs):
            for cand in (folder / "manifest.csv", folder.parent / "manifest.csv"):
                if cand.is_file():
                    table.update(read_labels(cand))
                    break
    out = []
    for r in tile_refs:
        sid = str(r.slide_id)
        out.append(table.get(sid, table.get(sid[len(PREFIX):] if sid.startswith(PREFIX) else sid)))
    if not any(v not in (None, "") for v in out):
        raise HistobenchError("hlss-attributes: no tile's slide has a label; set -o analysis.labels=CSV "
                              "(columns slide_id, label)")
    return out


def attribute_activations(z: "torch.Tensor", heads) -> dict[str, "torch.Tensor"]:
    """Raw head outputs per level for backbone embeddings ``z`` ``[N, D]`` (L2-normalised here)."""
    import torch

    with torch.no_grad():
        return {k: v.float() for k, v in heads.activations(torch.nn.functional.normalize(z.float(), dim=1)).items()}


def class_means(acts: dict[str, "torch.Tensor"], labels: list[str | None], names: dict[str, list[str]]) -> "pd.DataFrame":
    """Long table ``level, attribute, class, mean_activation, tiles`` (tiles without a label left out)."""
    import numpy as np
    import pandas as pd

    y = np.array([v if v not in (None, "") else None for v in labels], dtype=object)
    rows = []
    for lvl in LEVELS:
        a = acts[lvl].numpy()
        for cls in sorted({v for v in y if v is not None}):
            sel = y == cls
            means = a[sel].mean(axis=0)
            rows += [{"level": lvl, "attribute": names[lvl][k], "class": cls, "mean_activation": float(means[k]),
                      "tiles": int(sel.sum())} for k in range(a.shape[1])]
    return pd.DataFrame(rows)


def attribute_figure(table: "pd.DataFrame", title: str):
    """One heatmap per level: classes (rows) x attributes (columns, file order), mean activation."""
    from matplotlib.figure import Figure

    classes = list(dict.fromkeys(table["class"]))
    widths = [table[table["level"] == lvl]["attribute"].nunique() for lvl in LEVELS]
    fig = Figure(figsize=(min(4 + 0.28 * sum(widths), 40), 2.2 + 0.35 * len(classes)), dpi=100, layout="constrained")
    axes = fig.subplots(1, 3, width_ratios=[max(w, 1) for w in widths])
    for ax, lvl in zip(axes, LEVELS):
        t = table[table["level"] == lvl].pivot(index="class", columns="attribute", values="mean_activation")
        t = t.loc[classes, list(dict.fromkeys(table[table["level"] == lvl]["attribute"]))]
        im = ax.imshow(t.to_numpy(), aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xticks(range(t.shape[1]), list(t.columns), rotation=90, fontsize=5)
        ax.set_title(f"{lvl} attributes", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title, fontsize=9)
    return fig


class HLSSAttributes(Analysis):
    """Mean activation of each HLSS text attribute (patch, slide, patient heads) per class, as heatmaps."""

    name = "hlss-attributes"
    min_encoders = 1
    max_encoders = 4

    class Options(Analysis.Options):
        checkpoint: str | None = Field(None, description="HLSS pretraining checkpoint.pt or its folder (default: "
                                       "the folder of an analysed --weights file).")
        labels: str | None = Field(None, description="CSV with slide_id, label (default: manifest.csv beside the slides).")
        top: int = Field(3, ge=1, description="Top attributes per class and level in the report.")
        batch_size: int = Field(64, ge=1, description="Tiles per forward pass.")

    def run(self, inputs):
        from histobench.analyze import AnalysisResult

        labels = slide_labels(inputs.tile_refs, self.options.labels)
        files, report, metrics = [], {"encoders": []}, {}
        for enc in inputs.encoders:
            ckpt = self.options.checkpoint
            if ckpt is None:
                src = Path(str(enc.source))
                if not src.is_file():
                    raise HistobenchError(f"hlss-attributes: encoder {enc.label!r} comes from {enc.source}; set "
                                          f"-o analysis.checkpoint=WORKDIR/pretrain/hlss-…/checkpoint.pt")
                ckpt = src.parent
            heads, names = load_heads(ckpt)
            acts = attribute_activations(inputs.embeddings(enc, self.options.batch_size), heads)
            table = class_means(acts, labels, names)
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in enc.label)
            csv = inputs.out_dir / f"attributes_{safe}.csv"
            table.to_csv(csv, index=False)
            png = inputs.out_dir / f"attributes_{safe}.png"
            attribute_figure(table, f"HLSS attribute activation per class: {enc.label}").savefig(png)
            files += [csv, png]
            top = {}
            for (lvl, cls), rows in table.groupby(["level", "class"], sort=False):
                best = rows.nlargest(self.options.top, "mean_activation")
                top.setdefault(lvl, {})[cls] = list(best["attribute"])
                spread = table[table["level"] == lvl].groupby("attribute")["mean_activation"]
                metrics[f"{lvl}/class_spread/{enc.label}"] = float((spread.max() - spread.min()).mean())
            report["encoders"].append({"label": enc.label, "checkpoint": str(ckpt), "top_attributes": top,
                                       "tiles_labelled": int(sum(v not in (None, "") for v in labels))})
        return AnalysisResult(metrics=metrics, report=report, files=files)
