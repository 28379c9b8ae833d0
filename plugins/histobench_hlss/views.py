"""HLSS's views, made on the training device from a uint8 batch (spec ``/work/shared/methods/hlss.md`` §2.1).

The released code draws each augmentation independently with probability 0.5 per image; :func:`hlss_views` keeps
the ones that make sense for H&E tiles, batched with the core's :mod:`histobench.pretrain.augment` pieces:
random resized crop (scale 0.08-1; otherwise the whole tile, resized), horizontal and vertical flips, additive
Gaussian noise (sd ~ U[0.01, 0.1], clamped), autocontrast (per-channel min-max stretch), sharpness x2
(torchvision's smoothing kernel), Gaussian blur (kernel 5, sigma 1), then normalisation and random erasing
(area 0.02-0.33 of the view, aspect 0.3-3.3, set to 0 = the mean colour after normalisation).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from histobench.pretrain.augment import _coin, _select, _uniform, crop_theta, gaussian_blur, normalize, to_float, warp


def autocontrast(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Per sample with probability ``p``: stretch each channel to [0, 1] (a flat channel is left as is)."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    y = torch.where(span > 1e-6, (x - lo) / span.clamp(min=1e-6), x)
    return _select(_coin(x.shape[0], p, generator, x.device), y, x)


def sharpen(x: torch.Tensor, p: float, factor: float, generator: torch.Generator | None) -> torch.Tensor:
    """Per sample with probability ``p``: torchvision's ``adjust_sharpness`` (blend with a 3x3 smoothing)."""
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device, dtype=x.dtype) / 13.0
    c = x.shape[1]
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(c, 1, 3, 3), groups=c)
    y = (smooth + factor * (x - smooth)).clamp(0, 1)
    return _select(_coin(x.shape[0], p, generator, x.device), y, x)


def add_noise(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Per sample with probability ``p``: additive Gaussian noise of sd ~ U[0.01, 0.1], clamped to [0, 1]."""
    sd = _uniform(x.shape[0], 0.01, 0.1, generator, x.device).view(-1, 1, 1, 1)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return _select(_coin(x.shape[0], p, generator, x.device), (x + sd * noise).clamp(0, 1), x)


def erase(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Per sample with probability ``p``: zero one rectangle of 2-33 % of the area, aspect 0.3-3.3."""
    b, _, h, w = x.shape
    dev = x.device
    area = _uniform(b, 0.02, 0.33, generator, dev) * (h * w)
    aspect = torch.exp(_uniform(b, math.log(0.3), math.log(3.3), generator, dev))
    eh = torch.sqrt(area * aspect).clamp(1, h)
    ew = torch.sqrt(area / aspect).clamp(1, w)
    top = torch.rand(b, generator=generator, device=dev) * (h - eh)
    left = torch.rand(b, generator=generator, device=dev) * (w - ew)
    ys = torch.arange(h, device=dev, dtype=x.dtype).view(1, h, 1)
    xs = torch.arange(w, device=dev, dtype=x.dtype).view(1, 1, w)
    inside = ((ys >= top.view(-1, 1, 1)) & (ys < (top + eh).view(-1, 1, 1))
              & (xs >= left.view(-1, 1, 1)) & (xs < (left + ew).view(-1, 1, 1)))
    apply = _coin(b, p, generator, dev).view(-1, 1, 1)
    return x.masked_fill((inside & apply).unsqueeze(1), 0.0)


def hlss_views(images: torch.Tensor, views: int, size: int, p: float, mean: Sequence[float], std: Sequence[float],
               generator: torch.Generator | None = None) -> torch.Tensor:
    """``views`` augmented copies of every image: ``[N * views, 3, size, size]``, image-major (its views adjacent)."""
    with torch.autocast(images.device.type, enabled=False):
        x = to_float(images).repeat_interleave(views, dim=0)
        n, _, h, w = x.shape
        dev = x.device
        whole = crop_theta(n, h, w, (1.0, 1.0), (1.0, 1.0), hflip=p, vflip=p, generator=generator, device=dev)
        crop = crop_theta(n, h, w, (0.08, 1.0), hflip=p, vflip=p, generator=generator, device=dev)
        use_crop = _coin(n, p, generator, dev).view(-1, 1, 1)
        x = warp(x, torch.where(use_crop, crop, whole), size)
        x = add_noise(x, p, generator)
        x = autocontrast(x, p, generator)
        x = sharpen(x, p, 2.0, generator)
        x = gaussian_blur(x, p, (1.0, 1.0), kernel_size=5, generator=generator)
        return erase(normalize(x, mean, std), p, generator)
