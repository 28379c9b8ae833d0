"""Batched image augmentation on the training device.

Every function takes a whole batch ``[B, 3, H, W]`` (uint8 in ``0..255`` or float in ``[0, 1]``) and draws
its random parameters per sample from an optional ``torch.Generator`` that lives on the batch's device, so
that a run is reproducible and nothing loops over samples in Python. Photometric functions return floats in
``[0, 1]``; :func:`normalize` comes last.

:class:`MultiCropAugment` is the multi-crop recipe of DINO (Caron et al., "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021, arXiv:2104.14294, Sec. 3 and Appendix), itself the BYOL
photometric recipe (Grill et al., NeurIPS 2020): colour jitter 0.4/0.4/0.2/0.1 with p=0.8, grayscale p=0.2,
Gaussian blur p=1.0 on the first global view and p=0.1 on the second (which is also solarized with p=0.2),
blur p=0.5 on the local views, horizontal flips. Pathology tiles have no canonical orientation, so
``rotations=True`` adds vertical flips and 90° rotations (all eight dihedral poses, equally likely).

Differences from torchvision/PIL, on purpose: crops are sampled once (no rejection loop; a crop that
would not fit is shrunk to fit), resampling is bilinear without antialiasing, colour jitter is applied in
a fixed order (brightness, contrast, saturation, hue) and hue is rotated in YIQ space rather than shifted
in HSV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

Range = tuple[float, float]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ITU-R 601 luma weights (what PIL's "L" conversion and torchvision use).
_LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``0..255`` to float32 ``[0, 1]``; float input is returned as is."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _coin(n: int, p: float | torch.Tensor, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Per-sample booleans, True with probability ``p`` (a float, or a ``[n]`` tensor of probabilities)."""
    u = torch.rand(n, generator=generator, device=device)
    return u < (p.to(device) if isinstance(p, torch.Tensor) else p)


def _select(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), a, b)


def _luma(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


# ------------------------------------------------------------------------------------------- geometry


def crop_theta(
    b: int,
    h: int,
    w: int,
    scale: Range = (0.08, 1.0),
    ratio: Range = (3 / 4, 4 / 3),
    *,
    hflip: float = 0.5,
    vflip: float = 0.0,
    rot90: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``[B, 2, 3]`` affine maps of :func:`random_resized_crop` for ``b`` images of ``h x w`` pixels.

    Draws the random numbers of :func:`random_resized_crop` in the same order (area, aspect, centre, flips,
    rotation), so a crop drawn here and applied with :func:`warp` to images and, with nearest-neighbour, to
    their label maps is exactly the crop :func:`random_resized_crop` would have made of the images.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    area = _uniform(b, scale[0], scale[1], generator, dev) * (h * w)
    log_r = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), generator, dev)
    aspect = torch.exp(log_r)
    cw = torch.sqrt(area * aspect).clamp(max=w)  # crop width and height in pixels
    ch = torch.sqrt(area / aspect).clamp(max=h)
    # centre uniformly among the positions that keep the crop inside the image
    cx = cw / 2 + torch.rand(b, generator=generator, device=dev) * (w - cw)
    cy = ch / 2 + torch.rand(b, generator=generator, device=dev) * (h - ch)

    # output coordinates (u, v) in [-1, 1] map to input (x, y) = centre + half_extent * R @ F @ (u, v)
    fx = torch.where(_coin(b, hflip, generator, dev), -1.0, 1.0)
    fy = torch.where(_coin(b, vflip, generator, dev), -1.0, 1.0)
    if rot90:
        k = torch.randint(0, 4, (b,), generator=generator, device=dev).float()
        cos, sin = torch.cos(k * (math.pi / 2)).round(), torch.sin(k * (math.pi / 2)).round()
    else:
        cos, sin = torch.ones(b, device=dev), torch.zeros(b, device=dev)
    sx, sy = cw / w, ch / h  # half extents in normalised coordinates
    return torch.stack(
        [
            torch.stack([sx * cos * fx, -sx * sin * fy, 2 * cx / w - 1], dim=1),
            torch.stack([sy * sin * fx, sy * cos * fy, 2 * cy / h - 1], dim=1),
        ],
        dim=1,
    )


def warp(x: torch.Tensor, theta: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Resample ``x`` ``[B, C, H, W]`` (float) through the affine maps ``theta`` ``[B, 2, 3]`` to ``size x size``.

    ``mode="bilinear"`` for images; ``"nearest"`` for label maps (each output pixel takes the label of the
    input pixel nearest to its source point, so labels are never mixed). Borders reflect.
    """
    grid = F.affine_grid(theta.to(x.dtype), [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="reflection", align_corners=False)


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: Range = (0.08, 1.0),
    ratio: Range = (3 / 4, 4 / 3),
    *,
    hflip: float = 0.5,
    vflip: float = 0.0,
    rot90: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A random crop per sample, resized to ``size x size``, with flips and 90° rotations folded in.

    Args:
        x: ``[B, C, H, W]`` uint8 or float images.
        size: Output side in pixels.
        scale: Range of the crop's area as a fraction of the image area.
        ratio: Range of the crop's width/height aspect ratio (sampled log-uniformly).
        hflip: Probability of a horizontal flip.
        vflip: Probability of a vertical flip.
        rot90: Rotate by a uniformly drawn multiple of 90°.
        generator: Source of randomness, on ``x``'s device.

    Returns:
        Float ``[B, C, size, size]`` (in ``[0, 1]`` for uint8 input). Each output is one affine resampling
        (``F.grid_sample``, bilinear) of its input: :func:`warp` with the maps of :func:`crop_theta`.
    """
    x = to_float(x)
    b, _, h, w = x.shape
    theta = crop_theta(b, h, w, scale, ratio, hflip=hflip, vflip=vflip, rot90=rot90, generator=generator,
                       device=x.device)
    return warp(x, theta, size)


# ----------------------------------------------------------------------------------------- photometric


def color_jitter(
    x: torch.Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    p: float | torch.Tensor = 0.8,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample random brightness, contrast, saturation and hue, applied to each sample with probability ``p``.

    Factors are drawn as in torchvision: brightness, contrast and saturation from ``[1 - v, 1 + v]``, the
    hue shift from ``[-hue, hue]`` of a full turn. Values are clamped to ``[0, 1]`` after each operation.
    """
    x = to_float(x)
    b, dev = x.shape[0], x.device
    apply = _coin(b, p, generator, dev)
    fb = _uniform(b, max(0.0, 1 - brightness), 1 + brightness, generator, dev).view(-1, 1, 1, 1)
    fc = _uniform(b, max(0.0, 1 - contrast), 1 + contrast, generator, dev).view(-1, 1, 1, 1)
    fs = _uniform(b, max(0.0, 1 - saturation), 1 + saturation, generator, dev).view(-1, 1, 1, 1)
    fh = _uniform(b, -hue, hue, generator, dev)
    y = (x * fb).clamp(0, 1)
    mean = _luma(y).mean(dim=(2, 3), keepdim=True)
    y = ((y - mean) * fc + mean).clamp(0, 1)
    gray = _luma(y)
    y = ((y - gray) * fs + gray).clamp(0, 1)
    if hue > 0:
        y = _rotate_hue(y, fh)
    return _select(apply, y, x)


def _rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma plane (I, Q) of YIQ by ``turns`` of a full circle, per sample."""
    yiq64 = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)
    to_yiq = yiq64.to(x.device, x.dtype)
    to_rgb = torch.linalg.inv(yiq64).to(x.device, x.dtype)  # inverted on the CPU, in float64
    angle = turns.to(x.dtype) * (2 * math.pi)
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    rot = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, c, -s], 1), torch.stack([zero, s, c], 1)], 1)
    m = to_rgb @ rot @ to_yiq  # [B, 3, 3]
    b, ch, h, w = x.shape
    return torch.bmm(m, x.reshape(b, ch, h * w)).reshape(b, ch, h, w).clamp(0, 1)


def random_grayscale(x: torch.Tensor, p: float | torch.Tensor = 0.2, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """With probability ``p`` per sample, replace all three channels by the luma."""
    x = to_float(x)
    apply = _coin(x.shape[0], p, generator, x.device)
    return _select(apply, _luma(x).expand_as(x), x)


def gaussian_blur(
    x: torch.Tensor,
    p: float | torch.Tensor = 0.5,
    sigma: Range = (0.1, 2.0),
    *,
    kernel_size: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """With probability ``p`` per sample, a Gaussian blur whose sigma (pixels) is drawn from ``sigma``.

    Each sample gets its own separable kernel; the whole batch is blurred by two grouped convolutions with
    reflected borders. ``kernel_size`` defaults to ``2 * ceil(3 * sigma_max) + 1``.
    """
    x = to_float(x)
    b, c, h, w = x.shape
    dev = x.device
    apply = _coin(b, p, generator, dev)
    s = _uniform(b, sigma[0], sigma[1], generator, dev)
    k = kernel_size or 2 * math.ceil(3 * sigma[1]) + 1
    half = min(k // 2, h - 1, w - 1)  # reflection padding needs a pad smaller than the image
    t = torch.arange(-half, half + 1, device=dev, dtype=x.dtype)
    kernel = torch.exp(-(t.view(1, -1) ** 2) / (2 * s.view(-1, 1) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # [B, k]
    kernel = kernel.repeat_interleave(c, dim=0)  # [B*C, k]: one kernel per (sample, channel) group
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (half, half, 0, 0), mode="reflect"), kernel.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, half, half), mode="reflect"), kernel.view(b * c, 1, -1, 1), groups=b * c)
    return _select(apply, y.reshape(b, c, h, w), x)


def solarize(x: torch.Tensor, p: float | torch.Tensor = 0.2, threshold: float = 0.5, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """With probability ``p`` per sample, invert every value at or above ``threshold`` (PIL's 128/255 ≈ 0.5)."""
    x = to_float(x)
    apply = _coin(x.shape[0], p, generator, x.device)
    return _select(apply, torch.where(x >= threshold, 1.0 - x, x), x)


def normalize(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """``(x - mean) / std`` per channel, on float ``[0, 1]`` input (uint8 is converted first)."""
    x = to_float(x)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


# ------------------------------------------------------------------------------------------ multi-crop


@dataclass
class MultiCropAugment:
    """DINO's multi-crop views of a uint8 batch: ``n_global`` large crops, then ``n_local`` small ones.

    ``__call__(images, generator)`` returns ``n_global + n_local`` normalised float tensors
    ``[B, 3, global_size, global_size]`` ... ``[B, 3, local_size, local_size]``. Global view ``i`` uses
    ``global_blur_p[i]`` and ``global_solarize_p[i]`` (the last entry for ``i`` past the end). All global views
    are made in one batched pass, all local views in another.
    """

    global_size: int = 224
    local_size: int = 96
    n_global: int = 2
    n_local: int = 8
    global_scale: Range = (0.4, 1.0)
    local_scale: Range = (0.05, 0.4)
    ratio: Range = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_sigma: Range = (0.1, 2.0)
    global_blur_p: tuple[float, ...] = (1.0, 0.1)
    global_solarize_p: tuple[float, ...] = (0.0, 0.2)
    local_blur_p: float = 0.5
    hflip: float = 0.5
    rotations: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None, masks: torch.Tensor | None = None):
        """The views of ``images``; with ``masks`` (integer label maps ``[B, H, W]``, pixel-aligned with the
        images) also each view's labels: ``(views, mask_views)``, the masks cropped, flipped and rotated exactly
        like their view (nearest neighbour, ``[B, size, size]`` long) and never colour-augmented. The random
        numbers drawn are the same with or without masks."""
        with torch.autocast(images.device.type, enabled=False):  # pixels stay float32 under a bf16 training step
            views, mask_views = self._call(images, generator, masks)
        return views if masks is None else (views, mask_views)

    def _call(self, images: torch.Tensor, generator: torch.Generator | None, masks: torch.Tensor | None = None):
        b = images.shape[0]
        x = to_float(images)
        m = None if masks is None else masks.to(torch.float32).unsqueeze(1)  # labels < 2**24 are exact in float32
        views: list[torch.Tensor] = []
        mask_views: list[torch.Tensor] = []
        if self.n_global:
            pick = [min(i, len(self.global_blur_p) - 1) for i in range(self.n_global)]
            blur_p = torch.tensor([self.global_blur_p[i] for i in pick]).repeat_interleave(b)
            pick = [min(i, len(self.global_solarize_p) - 1) for i in range(self.n_global)]
            sol_p = torch.tensor([self.global_solarize_p[i] for i in pick]).repeat_interleave(b)
            g, gm = self._views(x, self.n_global, self.global_size, self.global_scale, blur_p, sol_p, generator, m)
            views += list(g.split(b))
            mask_views += list(gm.split(b)) if gm is not None else []
        if self.n_local:
            l, lm = self._views(x, self.n_local, self.local_size, self.local_scale, self.local_blur_p, 0.0, generator, m)
            views += list(l.split(b))
            mask_views += list(lm.split(b)) if lm is not None else []
        return views, mask_views

    def _views(self, x, n, size, scale, blur_p, solarize_p, generator, masks=None):
        b, _, h, w = x.shape
        theta = crop_theta(
            b * n, h, w, scale, self.ratio, hflip=self.hflip, vflip=0.5 if self.rotations else 0.0,
            rot90=self.rotations, generator=generator, device=x.device,
        )
        y = warp(x.repeat(n, 1, 1, 1), theta, size)
        y = color_jitter(y, *self.jitter, p=self.jitter_p, generator=generator)
        y = random_grayscale(y, self.grayscale_p, generator=generator)
        y = gaussian_blur(y, blur_p, self.blur_sigma, generator=generator)
        if isinstance(solarize_p, torch.Tensor) or solarize_p > 0:
            y = solarize(y, solarize_p, generator=generator)
        labels = None
        if masks is not None:  # the same maps, nearest neighbour, no photometric step
            labels = warp(masks.repeat(n, 1, 1, 1), theta, size, mode="nearest")[:, 0].round().long()
        return normalize(y, self.mean, self.std), labels
