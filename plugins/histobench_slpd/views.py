"""Multi-crop views on a grid of patch embeddings (HIPT's DINO-4K recipe, kept by SLPD).

HIPT (Chen et al., CVPR 2022, arXiv:2206.02647, ``HIPT_4K`` pretraining) and SLPD (Yu et al., MICCAI 2023,
code https://github.com/Carboxy/SLPD) augment a region's ``[D, 16, 16]`` feature grid, never its pixels:
2 global views = random 14x14 crop + horizontal flip (p 0.5); ``n_local`` (paper: 8) local views = random
6x6 crop + horizontal flip (p 0.5); no other augmentation. The clustering view is the deterministic centre
14x14 crop. A horizontal flip reverses the column (``w``) axis of the grid.

Everything is drawn per sample from one ``torch.Generator`` and gathered in one indexing operation per view,
so a whole batch is cropped on the training device at once.
"""

from __future__ import annotations

import torch


def crop_grids(grids: torch.Tensor, size: int, generator: torch.Generator | None = None, flip_p: float = 0.5) -> torch.Tensor:
    """Random ``size x size`` crops (one offset per sample) with a horizontal flip of probability ``flip_p``.

    ``grids [B, D, H, W] -> [B, D, size, size]``.
    """
    b, _, h, w = grids.shape
    if size > h or size > w:
        raise ValueError(f"crop side {size} is larger than the {h}x{w} grid")
    dev = grids.device
    top = torch.randint(0, h - size + 1, (b,), generator=generator, device=dev)
    left = torch.randint(0, w - size + 1, (b,), generator=generator, device=dev)
    flip = torch.rand(b, generator=generator, device=dev) < flip_p
    steps = torch.arange(size, device=dev)
    rows = top[:, None] + steps  # [B, size]
    cols = left[:, None] + torch.where(flip[:, None], steps.flip(0), steps)
    batch = torch.arange(b, device=dev)[:, None, None]
    out = grids[batch, :, rows[:, :, None], cols[:, None, :]]  # advanced indices first: [B, size, size, D]
    return out.permute(0, 3, 1, 2).contiguous()


def centre_crop(grids: torch.Tensor, size: int) -> torch.Tensor:
    """The deterministic centre ``size x size`` crop (the clustering view); ``[B, D, H, W] -> [B, D, size, size]``."""
    h, w = grids.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"crop side {size} is larger than the {h}x{w} grid")
    top, left = (h - size) // 2, (w - size) // 2
    return grids[..., top:top + size, left:left + size]


class SLPDGridViews:
    """``__call__(grids [B, D, H, W], generator) -> [global_1, global_2, local_1, ..., local_L]``.

    Args:
        global_size: Global crop side (paper: 14 of a 16x16 grid).
        local_size: Local crop side (paper: 6).
        n_local: Local views per region (paper: 8).
        flip_p: Horizontal-flip probability of every view (paper: 0.5).
    """

    n_global = 2

    def __init__(self, global_size: int = 14, local_size: int = 6, n_local: int = 8, flip_p: float = 0.5):
        self.global_size, self.local_size, self.n_local, self.flip_p = global_size, local_size, n_local, flip_p

    def __call__(self, grids: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        views = [crop_grids(grids, self.global_size, generator, self.flip_p) for _ in range(self.n_global)]
        views += [crop_grids(grids, self.local_size, generator, self.flip_p) for _ in range(self.n_local)]
        return views

    def eval_view(self, grids: torch.Tensor) -> torch.Tensor:
        """The clustering view: the centre ``global_size`` crop."""
        return centre_crop(grids, self.global_size)
