"""HistoTransfer's attention-pooling MIL head (``attention-pool``).

Sharma et al., "HistoTransfer", IEEE BHI 2021, arXiv:2106.07068 (method spec ``histotransfer.md`` §2.4, from
the authors' code): plain, non-gated attention MIL in the style of Ilse, Tomczak and Welling (ICML 2018,
arXiv:1802.04712), without dropout. For a bag of tile features ``x_i`` (d-dimensional):

* embedding ``h_i = ReLU(W2 ReLU(W1 x_i + b1) + b2)``, d -> 256 -> 64;
* attention logit ``s_i = w^T tanh(V h_i + c) + e``, 64 -> 32 -> 1 (one head);
* weights ``a = softmax(s)`` over the bag's real tiles, slide embedding ``z = sum_i a_i h_i``;
* slide logits ``U z + u``; an auxiliary per-tile head ``P h_i + p`` (the paper's patch classifier, trained with
  weight beta = 0 in the released runs, so it never changes the slide output).

For d = 512 and 2 classes: 147,776 + 2,113 + 130 + 130 = 150,149 parameters. ``forward(x, mask)`` follows
the core contract (padded bags, ``mask`` True for real tiles, ``(logits, attention)``); ``forward_all`` also
returns the raw logits ``s``, the embeddings ``h``, ``z`` and the patch logits, which top-k selection
(the raw ``s``) and CKA (the 64-d ``h``) read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from histobench.components import Aggregator, StrictOptions
from histobench.lazy import lazy_attributes, torch_class

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


class AttentionPool(Aggregator):
    """HistoTransfer's attention MIL (Sharma et al. 2021): d->256->64 embedding, tanh attention, no gate, no dropout."""

    name = "attention-pool"
    aliases = ("histotransfer-attention",)
    presets = {"demo": {}}

    class Options(StrictOptions):
        hidden_dim: int = Field(256, ge=1, description="First embedding layer width (paper: 256).")
        embed_dim: int = Field(64, ge=1, description="Tile embedding width L (paper: 64).")
        attention_dim: int = Field(32, ge=1, description="Attention space width D (paper: 32).")
        patch_head: bool = Field(True, description="Keep the auxiliary per-tile classifier (paper: yes; beta = 0).")
        dropout: float = Field(0.0, ge=0, lt=1, description="Dropout after each embedding layer (paper: none).")

    def build(self, in_dim: int, n_outputs: int) -> "nn.Module":
        o = self.options
        return _net_class()(in_dim, n_outputs, o.hidden_dim, o.embed_dim, o.attention_dim, o.patch_head, o.dropout)


@torch_class
def _net_class() -> type:
    import torch
    from torch import nn

    class AttentionPoolMIL(nn.Module):
        """``forward(x [B, N, D], mask [B, N] or None) -> (logits [B, K], attention [B, N])``."""

        def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int = 256, embed_dim: int = 64,
                     attention_dim: int = 32, patch_head: bool = True, dropout: float = 0.0):
            super().__init__()
            self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                       nn.Linear(hidden_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
            self.attention = nn.Sequential(nn.Linear(embed_dim, attention_dim), nn.Tanh(), nn.Linear(attention_dim, 1))
            self.classifier = nn.Linear(embed_dim, n_outputs)
            self.patch_classifier = nn.Linear(embed_dim, n_outputs) if patch_head else None

        def forward_all(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
            """Everything of one pass: ``h`` [B, N, L], raw ``scores`` s [B, N] (padding: -inf), ``attention``
            [B, N], ``z`` [B, L], ``logits`` [B, K] and ``patch_logits`` [B, N, K] (when the head is kept)."""
            if mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            keep = mask.unsqueeze(-1)
            h = self.embed(x.masked_fill(~keep, 0.0)).masked_fill(~keep, 0.0)
            scores = self.attention(h).squeeze(-1).masked_fill(~mask, float("-inf"))
            attention = torch.softmax(scores, dim=1)
            z = torch.bmm(attention.unsqueeze(1), h).squeeze(1)
            out = {"h": h, "scores": scores, "attention": attention, "z": z, "logits": self.classifier(z)}
            if self.patch_classifier is not None:
                out["patch_logits"] = self.patch_classifier(h)
            return out

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.forward_all(x, mask)
            return out["logits"], out["attention"]

    return AttentionPoolMIL


__getattr__ = lazy_attributes(__name__, AttentionPoolMIL=_net_class)  # pickles as {module}.AttentionPoolMIL
