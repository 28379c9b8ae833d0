"""DiRL's views: joint image + group-map augmentation on the training device, on whole batches (spec
``shared/methods/dirl.md`` §2.3; Kapse et al., arXiv 2309.06439).

One :class:`~histobench.pretrain.augment.MultiCropAugment` draws every view's crop, flips and 90° rotation
once and applies them to the image (bilinear) and to its group map (nearest neighbour, so groups are never
mixed); colour jitter, grayscale, blur and solarisation touch the image only. Because the masks ride along
on the same random numbers, a DiRL step draws exactly what a DINO step with the same recipe draws.

The lab's DINO recipe, which the spec takes for DiRL: 2 global crops of scale (0.4, 1), no local crops,
horizontal flip (plus vertical flips and 90° rotations for pathology), colour jitter (0.8, 0.8, 0.8, 0.2)
with p = 0.8, grayscale p = 0.2, Gaussian blur p = 0.5 with sigma in [0.1, 2], no solarisation.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from histobench.pretrain.augment import MultiCropAugment


class DiRLViews:
    """``__call__(images uint8 [B,3,H,W], groups long [B,H,W], generator) -> (views, group_views)``."""

    n_global = 2

    def __init__(self, options, mean: Sequence[float], std: Sequence[float]):
        o = options
        self.augment = MultiCropAugment(
            global_size=o.global_crop_size,
            local_size=o.local_crop_size,
            n_global=self.n_global,
            n_local=o.n_local_crops,
            global_scale=tuple(o.global_crop_scale),
            local_scale=tuple(o.local_crop_scale),
            jitter=tuple(o.color_jitter),
            jitter_p=o.color_jitter_p,
            grayscale_p=o.grayscale_p,
            global_blur_p=tuple(o.global_blur_p),
            global_solarize_p=tuple(o.global_solarize_p),
            local_blur_p=o.local_blur_p,
            rotations=o.rotations,
            mean=tuple(mean),
            std=tuple(std),
        )

    def __call__(self, images: torch.Tensor, groups: torch.Tensor, generator: torch.Generator | None = None):
        return self.augment(images, generator, masks=groups)


def occupancy(groups: torch.Tensor, n_groups: int, grid: tuple[int, int]) -> torch.Tensor:
    """Token occupancy ``A [B, K, h*w]`` of a view's group map ``[B, S, S]``: the area share of each group in each
    token's pixels (spec §2.3: ``A[k, t] = (1/P²) Σ_{p in t} M_k(p)``), so ``Σ_k A[k, t] = 1``. The one-hot maps
    are full-resolution (the mask crop is resized before pooling) and averaged over each token's pixels."""
    one_hot = F.one_hot(groups.long().clamp(0, n_groups - 1), n_groups).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(one_hot, grid).flatten(2)
