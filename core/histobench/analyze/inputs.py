"""What an analysis receives and what it returns.

An :class:`~histobench.components.Analysis` gets an :class:`AnalysisInputs`: the encoders it compares (each a
module in eval mode on the analysis device, the histobench component that built it, a label and where its
weights came from), one fixed held-out tile set (uint8 pixels and where each tile lies on its slide), a folder
to write plots and tables into, the device and a seed. It returns an :class:`AnalysisResult`: flat metrics
(logged as MLflow metrics), a JSON-able report (``report.json``) and the files it wrote.

Nothing here imports torch at module level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from histobench.components import Encoder, TileRef
from histobench.reporting import Reporter

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


@dataclass
class AnalysedEncoder:
    """One encoder under analysis.

    ``label`` is unique among the encoders of one analysis (a run's name and short id, or a weights file's
    stem); ``source`` says where the weights came from (an MLflow run id or a file path); ``run_id`` is the
    ``histobench run`` it came from, or ``None`` for a plain weights file.
    """

    label: str
    module: "nn.Module"
    component: Encoder
    source: str
    run_id: str | None = None

    @property
    def name(self) -> str:
        """The encoder component's registry name (``timm``, ...)."""
        return self.component.name


@dataclass
class AnalysisInputs:
    """The encoders and the fixed held-out tile set one analysis runs on.

    ``tiles`` is a uint8 tensor ``[N, 3, S, S]`` at the task's µm/px and tile size; ``tile_refs[i]`` says
    where tile ``i`` lies (slide id and path, level-0 ``x, y``, read geometry), so that an analysis can look
    up per-tile side information (e.g. nuclei masks). ``tile_hash`` identifies the tile set. ``reporter``
    draws the analysis's own progress bars (``with inputs.reporter.stage(...)``); it is silent when the analysis
    is run without one.
    """

    encoders: list[AnalysedEncoder]
    tiles: "torch.Tensor"
    tile_refs: list[TileRef]
    out_dir: Path
    device: "torch.device"
    seed: int = 0
    tile_hash: str = ""
    reporter: Reporter = field(default_factory=Reporter)

    def pixels(self, encoder: AnalysedEncoder, index: Any = None) -> "torch.Tensor":
        """Tiles (all, or ``tiles[index]``) as ``encoder`` takes them: float ``[n, 3, s, s]`` on the CPU,
        resized to its ``transform().size`` and normalised with its mean and std, exactly as extraction does."""
        from histobench.features.extract import prepare_pixels

        images = self.tiles if index is None else self.tiles[index]
        return prepare_pixels(images, encoder.component.transform())

    def batches(self, encoder: AnalysedEncoder, batch_size: int = 64) -> Iterator[tuple[slice, "torch.Tensor"]]:
        """``(rows, pixels on the analysis device)`` for consecutive batches of the tile set."""
        from histobench.features.extract import prepare_pixels

        transform = encoder.component.transform()
        for start in range(0, len(self.tiles), batch_size):
            rows = slice(start, min(start + batch_size, len(self.tiles)))
            yield rows, prepare_pixels(self.tiles[rows].to(self.device), transform)

    def embeddings(self, encoder: AnalysedEncoder, batch_size: int = 64) -> "torch.Tensor":
        """``encoder``'s embeddings of every tile: float ``[N, D]`` on the CPU (fp32, under inference mode)."""
        import torch

        with torch.inference_mode():
            parts = [encoder.module(x).float().cpu() for _, x in self.batches(encoder, batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, int(getattr(encoder.module, "embed_dim", 0)))


@dataclass
class AnalysisResult:
    """What an analysis returns: ``metrics`` (flat name -> float, logged to MLflow; names are made MLflow-safe
    by the runner), ``report`` (anything JSON-able, written as ``report.json``) and ``files`` (plots, CSVs,
    written under ``inputs.out_dir`` and logged as artifacts)."""

    metrics: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
