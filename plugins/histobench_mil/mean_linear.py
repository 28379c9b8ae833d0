"""Mean pooling + linear layer: multinomial logistic regression on the bag's mean embedding.

The simplest slide-level probe, trained by the same loop as every head; its L2 penalty is the loop's
AdamW weight decay (``eval.weight_decay``). Its "attention" is uniform over the real tiles, so heatmap
code can treat every head alike. The ``nn.Module`` is :class:`MeanPoolLinear`, created on first use so that
importing this plugin does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from histobench.components import Aggregator, StrictOptions
from histobench.lazy import lazy_attributes, torch_class

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


class MeanLinear(Aggregator):
    """Masked mean pooling of the bag, then one linear layer (multinomial logistic regression)."""

    name = "mean-linear"
    aliases = ("mean-pool",)

    class Options(StrictOptions):
        dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the pooled embedding (0: plain logistic regression).")

    def build(self, in_dim: int, n_outputs: int) -> "nn.Module":
        return _net_class()(in_dim, n_outputs, self.options.dropout)


@torch_class
def _net_class() -> type:
    import torch
    from torch import nn

    class MeanPoolLinear(nn.Module):
        """``forward(x [B, N, D], mask [B, N] or None) -> (logits [B, K], uniform attention [B, N])``."""

        def __init__(self, in_dim: int, n_outputs: int, dropout: float = 0.0):
            super().__init__()
            self.dropout = nn.Dropout(dropout)
            self.linear = nn.Linear(in_dim, n_outputs)

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            if mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            weights = mask.to(x.dtype) / mask.sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)
            pooled = torch.bmm(weights.unsqueeze(1), x.masked_fill(~mask.unsqueeze(-1), 0.0)).squeeze(1)
            return self.linear(self.dropout(pooled)), weights

    return MeanPoolLinear


__getattr__ = lazy_attributes(__name__, MeanPoolLinear=_net_class)  # pickles as {module}.MeanPoolLinear
