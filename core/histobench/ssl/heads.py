"""Projection heads of student–teacher pretexts: DINO's head (Caron et al., ICCV 2021, arXiv:2104.14294, Sec. 3.1
and Appendix) and the backbone + head pair that runs multi-crop views.

A 3-layer MLP ``in -> hidden -> hidden -> bottleneck`` with GELU, then L2 normalisation, then a
weight-normalised linear layer ``bottleneck -> out_dim`` without bias. The last layer's weight is
``g * v / ||v||`` row by row; with ``norm_last_layer`` (the paper's default for ViT-S) ``g`` is fixed to 1,
so every output is a cosine similarity, which the paper found stabilises training. The MLP is initialised
with a truncated normal (std 0.02) and zero biases; ``v`` keeps ``nn.Linear``'s default initialisation.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DINOProjectionHead(nn.Module):
    """``forward(x [B, in_dim]) -> [B, out_dim]`` logits (cosine similarities when ``norm_last_layer``).

    Args:
        in_dim: Backbone feature width.
        out_dim: Number of prototypes ``K`` (paper: 65536).
        hidden_dim: MLP hidden width (paper: 2048).
        bottleneck_dim: Width before the last layer (paper: 256).
        n_layers: MLP layers before the bottleneck output (paper: 3).
        norm_last_layer: Fix the last layer's weight-norm gain ``g`` to 1.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 n_layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(n_layers, 1) - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        direction = nn.Linear(bottleneck_dim, out_dim, bias=False).weight.detach().clone()
        self.last_layer_v = nn.Parameter(direction)  # [out_dim, bottleneck_dim]
        self.last_layer_g = nn.Parameter(torch.ones(out_dim), requires_grad=not norm_last_layer)
        self.norm_last_layer = norm_last_layer

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The weight-normalised last layer's parameters (frozen during DINO's first epoch; see
        :func:`histobench.ssl.teacher.cancel_last_layer_grads`)."""
        return [self.last_layer_v, self.last_layer_g]

    def last_layer_weight(self) -> torch.Tensor:
        """``[out_dim, bottleneck_dim]``: ``g * v / ||v||`` row by row (SLPD applies it to stored prototypes)."""
        return self.last_layer_g.unsqueeze(1) * self.last_layer_v / self.last_layer_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        return F.linear(z, self.last_layer_weight())


class BackboneWithHead(nn.Module):
    """A backbone followed by a head; ``forward_views`` runs each run of same-size views as one batch."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def forward_views(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One forward per group of consecutive views with the same resolution; outputs split back per view."""
        out: list[torch.Tensor] = []
        start = 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            group = views[start:end]
            out += list(self(torch.cat(list(group))).split([v.shape[0] for v in group]))
            start = end
        return out
