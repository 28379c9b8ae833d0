"""Gated attention-based deep multiple-instance learning (ABMIL).

Ilse, Tomczak and Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018, arXiv:1802.04712.
Each tile embedding ``x_k`` is embedded ``h_k = Dropout(ReLU(W x_k + b))``; its attention score is
``w^T (tanh(V h_k) * sigmoid(U h_k))`` (the paper's gated attention, Eq. 9), soft-maxed over the bag's real
tiles; the bag embedding ``sum_k a_k h_k`` goes through a linear classifier.

Defaults: the paper's LeNet variant uses a 500-d embedding and a 128-d attention space; on frozen
foundation-model features the common choice (CLAM, Lu et al. 2021, and most pathology benchmarks since)
is a 256-d embedding with dropout 0.25, which we take; the 128-d attention space is the paper's. The
``nn.Module`` is :class:`GatedAttentionMIL`, created on first use so that importing this plugin does not
import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from histobench.components import Aggregator, StrictOptions
from histobench.lazy import lazy_attributes, torch_class

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


class ABMIL(Aggregator):
    """Gated attention MIL (Ilse et al., ICML 2018): attention-weighted mean of embedded tiles, then linear."""

    name = "abmil"
    aliases = ("gated-abmil",)
    presets = {"demo": {"hidden_dim": 64, "attention_dim": 32, "dropout": 0.1}}

    class Options(StrictOptions):
        hidden_dim: int = Field(256, ge=1, description="Tile embedding width (paper: 500 for LeNet; CLAM: 256).")
        attention_dim: int = Field(128, ge=1, description="Width of the gated attention space (paper: 128).")
        dropout: float = Field(0.25, ge=0, lt=1, description="Dropout after the tile embedding (CLAM: 0.25).")

    def build(self, in_dim: int, n_outputs: int) -> "nn.Module":
        o = self.options
        return _net_class()(in_dim, n_outputs, o.hidden_dim, o.attention_dim, o.dropout)


@torch_class
def _net_class() -> type:
    import torch
    from torch import nn

    class GatedAttentionMIL(nn.Module):
        """``forward(x [B, N, D], mask [B, N] or None) -> (logits [B, K], attention [B, N])``."""

        def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int, attention_dim: int, dropout: float):
            super().__init__()
            self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
            self.attention_v = nn.Linear(hidden_dim, attention_dim)
            self.attention_u = nn.Linear(hidden_dim, attention_dim)
            self.attention_w = nn.Linear(attention_dim, 1)
            self.classifier = nn.Linear(hidden_dim, n_outputs)

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            if mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            keep = mask.unsqueeze(-1)
            h = self.embed(x.masked_fill(~keep, 0.0)).masked_fill(~keep, 0.0)  # padded tiles contribute nothing
            scores = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))).squeeze(-1)
            attention = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
            pooled = torch.bmm(attention.unsqueeze(1), h).squeeze(1)
            return self.classifier(pooled), attention

    return GatedAttentionMIL


__getattr__ = lazy_attributes(__name__, GatedAttentionMIL=_net_class)  # pickles as {module}.GatedAttentionMIL
