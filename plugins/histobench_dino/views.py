"""DINO's multi-crop views, made on the training device from a uint8 batch.

:class:`DINOViews` maps the pretext's options onto :class:`histobench.pretrain.augment.MultiCropAugment`
(the paper's recipe: 2 global crops of scale (0.4, 1), local crops of scale (0.05, 0.4), BYOL's colour
jitter, grayscale, blur and solarisation) and normalises with the encoder's mean and std.
"""

from __future__ import annotations

from typing import Sequence

import torch

from histobench.pretrain.augment import MultiCropAugment


class DINOViews:
    """``__call__(images uint8 [B, 3, H, W], generator) -> [global_1, global_2, local_1, ...]`` (normalised floats)."""

    n_global = 2

    def __init__(self, options, mean: Sequence[float], std: Sequence[float]):
        self.augment = MultiCropAugment(
            global_size=options.global_crop_size,
            local_size=options.local_crop_size,
            n_global=self.n_global,
            n_local=options.n_local_crops,
            global_scale=tuple(options.global_crop_scale),
            local_scale=tuple(options.local_crop_scale),
            rotations=options.rotations,
            mean=tuple(mean),
            std=tuple(std),
        )

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        return self.augment(images, generator)
