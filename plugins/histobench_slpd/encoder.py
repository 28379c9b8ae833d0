"""HIPT's region ViT ("ViT-4K", ``vit4k_xs``): a transformer over a grid of patch embeddings.

Chen et al., "Scaling Vision Transformers to Gigapixel Images via Hierarchical Self-Supervised Learning",
CVPR 2022, arXiv:2206.02647; code https://github.com/mahmoodlab/HIPT (``HIPT_4K/vision_transformer4k.py``).
SLPD (Yu et al., MICCAI 2023, arXiv:2307.10696; code https://github.com/Carboxy/SLPD) retrains this network
from scratch.

A 4096 px region at 20x is a 16x16 grid of 256 px patches, each already embedded by a frozen ViT-256
(384-d [CLS]), stored channels first as ``[384, 16, 16]``. The region ViT reads that grid as its tokens:
``phi = Linear(in_dim -> dim) + GELU`` per grid cell, a [CLS] token, a learnt position embedding for a
``pos_grid x pos_grid`` grid (14: the side of the pretraining global crop) plus the [CLS] slot, pre-norm
blocks (dim 192, 6 heads, MLP ratio 4, qkv bias, LayerNorm eps 1e-6, linearly increasing stochastic depth),
a final LayerNorm; the output is the [CLS] vector. Other grid sizes (6x6 local crops, the full 16x16 region
at inference) get the position embedding resized bicubically. Grid cells become tokens in row-major order
(``[B, D, h, w] -> flatten(h, w)``); whatever builds the grids must keep that order between pretraining and
inference (spec pitfall 13).

Init follows HIPT: truncated normal (std 0.02) for linear weights, position embedding and [CLS]; zero biases;
LayerNorm at 1/0. HIPT resizes with ``scale_factor`` (+0.1 to dodge float rounding); we resize to the target
size directly, which gives the same grid.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from pydantic import Field

from histobench.components import Encoder, GridGeometry, InputTransform, StrictOptions
from histobench.lazy import lazy_attributes, torch_class

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


class HIPTRegionEncoder(Encoder):
    """HIPT's ViT-4K region encoder: a ViT over a [D_in, h, w] grid of frozen patch embeddings -> [CLS]."""

    name = "hipt-vit4k"
    aliases = ("slpd-vit4k",)
    input_kind = "grid"
    presets = {
        # in_dim 96 = embed_dim of the timm encoder's demo preset (its features can feed this encoder);
        # the demo grids are 8x8 regions with 6x6 global crops, so the position embedding is learnt at 6x6.
        # Demo patches: 64 px at 0.25 µm/px, so an 8x8 region is 128 µm and a 512 µm demo slide holds up to 16.
        "demo": {"in_dim": 96, "dim": 64, "depth": 2, "num_heads": 2, "grid_size": 8, "pos_grid": 6,
                 "patch_encoder_preset": "demo", "patch_mpp": 0.25, "patch_px": 64},
    }

    class Options(StrictOptions):
        in_dim: int = Field(384, ge=1, description="Patch-embedding width D_in (HIPT ViT-256: 384).")
        dim: int = Field(192, ge=1, description="Token width (vit4k_xs: 192).")
        depth: int = Field(6, ge=1, description="Transformer blocks (vit4k_xs: 6).")
        num_heads: int = Field(6, ge=1, description="Attention heads (vit4k_xs: 6).")
        mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width / dim.")
        drop_path_rate: float = Field(0.1, ge=0, lt=1, description="Stochastic depth at the last block (student: 0.1).")
        pos_grid: int = Field(14, ge=1, description="Grid side the position embedding is learnt for (global crop: 14).")
        grid_size: int = Field(16, ge=1, description="Side of a full region grid (4096 px / 256 px = 16).")
        checkpoint: str | None = Field(None, description="Local state dict (e.g. an SLPD teacher backbone).")
        # The frozen patch level of the hierarchy (HIPT's ViT-256): what turns pixels into the grids.
        patch_encoder: str = Field("timm", description="Encoder (a registered name) that embeds each patch.")
        patch_encoder_options: dict = Field(default_factory=dict, description="Options of the patch encoder (e.g. arch, pretrained, checkpoint).")
        patch_encoder_preset: str | None = Field(None, description="Preset of the patch encoder's options (e.g. demo).")
        patch_pretext: str = Field("none", description="Pretrain the patch encoder first in the same run with this pretext (e.g. dino), or none.")
        patch_mpp: float = Field(0.5, gt=0, description="µm/px of the patches (HIPT: 0.5, i.e. 20x).")
        patch_px: int = Field(256, ge=8, description="Patch side in pixels (HIPT: 256); a region is grid_size x grid_size patches.")
        min_tissue: float = Field(0.25, ge=0, le=1, description="Minimum tissue fraction of a kept region.")

    def grid_geometry(self) -> GridGeometry:
        o = self.options
        return GridGeometry(patch_mpp=o.patch_mpp, patch_px=o.patch_px, grid=o.grid_size, min_tissue=o.min_tissue,
                            in_dim=o.in_dim, patch_encoder=o.patch_encoder,
                            patch_encoder_options=dict(o.patch_encoder_options),
                            patch_encoder_preset=o.patch_encoder_preset, patch_pretext=o.patch_pretext)

    def transform(self) -> InputTransform:
        """Grids are not pixels: ``size`` is the full region grid side; mean/std are unused (the patch encoder normalised)."""
        return InputTransform(size=self.options.grid_size)

    def weights_tag(self) -> str:
        from pathlib import Path

        return f"file:{Path(self.options.checkpoint).name}" if self.options.checkpoint else "random"

    def build(self) -> "nn.Module":
        import torch

        from histobench.errors import HistobenchError

        o = self.options
        if o.dim % o.num_heads:
            raise HistobenchError(f"encoder.dim={o.dim} is not divisible by encoder.num_heads={o.num_heads}")
        module = _module_class()(in_dim=o.in_dim, dim=o.dim, depth=o.depth, num_heads=o.num_heads,
                                 mlp_ratio=o.mlp_ratio, drop_path_rate=o.drop_path_rate, pos_grid=o.pos_grid)
        if o.checkpoint:
            state = torch.load(o.checkpoint, map_location="cpu", weights_only=True)
            for key in ("teacher", "state_dict", "model"):
                if isinstance(state.get(key), dict):
                    state = state[key]
            for prefix in ("module.", "backbone."):
                if state and all(k.startswith(prefix) for k in state):
                    state = {k[len(prefix):]: v for k, v in state.items()}
            module.load_state_dict(state, strict=True)
        return module


@torch_class
def _module_class() -> type:
    import torch
    import torch.nn.functional as F
    from timm.layers import DropPath
    from timm.models.vision_transformer import Block
    from torch import nn

    class HIPTViT4K(nn.Module):
        """``forward(grid [B, in_dim, h, w]) -> [B, dim]`` ([CLS] after the final LayerNorm); tokens and [CLS] attention
        as :class:`histobench_timm.encoder.TimmBackbone` gives them, one token per grid cell."""

        def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float,
                     drop_path_rate: float, pos_grid: int):
            super().__init__()
            self.in_dim, self.embed_dim, self.pos_grid = in_dim, dim, pos_grid
            self.phi = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU())
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, dim))
            self.blocks = nn.ModuleList(
                Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
                for _ in range(depth)
            )
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            self.apply(self._init)
            self.set_drop_path(drop_path_rate)

        @staticmethod
        def _init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        def set_drop_path(self, rate: float) -> bool:
            """Stochastic depth rising linearly from 0 at the first block to ``rate`` at the last."""
            n = len(self.blocks)
            for i, block in enumerate(self.blocks):
                r = rate * i / max(n - 1, 1)
                block.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
                block.drop_path2 = DropPath(r) if r > 0 else nn.Identity()
            return True

        def position_embedding(self, h: int, w: int) -> torch.Tensor:
            """``[1, 1 + h*w, dim]``: the learnt table, resized bicubically when the grid is not ``pos_grid``²."""
            if h == w == self.pos_grid:
                return self.pos_embed
            cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
            g = grid_pos.reshape(1, self.pos_grid, self.pos_grid, -1).permute(0, 3, 1, 2)
            g = F.interpolate(g.float(), size=(h, w), mode="bicubic", align_corners=False).to(grid_pos.dtype)
            return torch.cat([cls_pos, g.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

        num_prefix_tokens = 1  # the [CLS] token; then one token per grid cell

        def token_grid(self, x: torch.Tensor) -> tuple[int, int]:
            """``(h, w)``: one token per cell of the input grid."""
            return int(x.shape[-2]), int(x.shape[-1])

        def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
            """``[B, h*w, dim]``: the grid tokens of :meth:`forward_tokens`."""
            return self.forward_tokens(x)[:, 1:]

        def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
            """``[B, heads, h*w]``: the last block's [CLS]→cell attention, rows summing to 1."""
            from histobench.ssl.attention import vit_cls_attention

            return vit_cls_attention(self, x, name="hipt-vit4k")

        def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
            """``[B, 1 + h*w, dim]``: normed [CLS] then the grid tokens in row-major order."""
            b, _, h, w = x.shape
            tokens = self.phi(x.flatten(2).transpose(1, 2))
            tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1) + self.position_embedding(h, w)
            for block in self.blocks:
                tokens = block(tokens)
            return self.norm(tokens)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.forward_tokens(x)[:, 0]

    return HIPTViT4K


__getattr__ = lazy_attributes(__name__, HIPTViT4K=_module_class)  # pickles as {module}.HIPTViT4K
