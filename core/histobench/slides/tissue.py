"""Tissue detection on a slide thumbnail: saturation + Otsu, cleaned up with morphology.

:func:`tissue_mask` is for brightfield (H&E, IHC) slides: tissue is coloured on white or light-grey glass;
near-white and near-black pixels (glass, slide edges, out-of-scan areas) and pen marks (strongly blue or green
ink) are never tissue. :func:`slide_kind` tells a fluorescence slide (bright signal on a dark background) from
a brightfield one; for those, :func:`tissue_mask` falls back to an Otsu cut of brightness (the caller reports
that the slide is not brightfield H&E).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Saturation (0-255) below which nothing counts as stained tissue, whatever Otsu says. Keeps an all-background
# thumbnail (glass, scanner noise) from being split into "tissue" and "not tissue".
MIN_SATURATION = 20
# A pixel whose channels are all above this is glass / empty background.
WHITE_LEVEL = 220
# A pixel whose channels are all below this is black (pen marks, out-of-scan areas, slide edges).
BLACK_LEVEL = 35


def otsu_threshold(values: np.ndarray, bins: int = 256, value_range: tuple[float, float] = (0, 256)) -> float | None:
    """Otsu's threshold of ``values``: the cut that maximises the between-class variance.

    Returns the threshold (pixels ``>= t`` are the upper class), or None when the values cannot be split
    (empty or constant input).
    """
    values = np.asarray(values).ravel()
    if values.size == 0:
        return None
    hist, edges = np.histogram(values, bins=bins, range=value_range)
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return None
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)  # weight of the lower class when cutting after bin i
    w1 = total - w0
    m0 = np.cumsum(hist * centers)
    mu_total = m0[-1]
    valid = (w0 > 0) & (w1 > 0)
    if not valid.any():
        return None
    mean0 = np.where(valid, m0 / np.where(w0 > 0, w0, 1), 0)
    mean1 = np.where(valid, (mu_total - m0) / np.where(w1 > 0, w1, 1), 0)
    between = np.where(valid, w0 * w1 * (mean0 - mean1) ** 2, -1.0)
    i = int(np.argmax(between))
    return float(edges[i + 1])


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation scaled to 0-255 (as PIL's HSV conversion): 255 * (max - min) / max."""
    mx = rgb.max(axis=-1).astype(np.float32)
    mn = rgb.min(axis=-1).astype(np.float32)
    return np.where(mx > 0, 255.0 * (mx - mn) / np.maximum(mx, 1), 0.0).astype(np.float32)


def slide_kind(rgb: np.ndarray) -> str:
    """``"brightfield"``, ``"fluorescence"`` (mostly dark background, like DAPI/FITC scans) or ``"empty"``.

    Brightfield glass is bright: the median pixel of a thumbnail is light whenever glass makes up a good part of
    it. A fluorescence scan is dark almost everywhere, signal included: its median maximum channel is low.
    """
    rgb = np.asarray(rgb)[..., :3]
    if rgb.size == 0:
        return "empty"
    mx = rgb.max(axis=-1)
    if np.median(mx) < 60 and np.mean(mx < 60) > 0.5:
        return "fluorescence"
    if rgb.min(axis=-1).min() >= WHITE_LEVEL or mx.max() <= BLACK_LEVEL:
        return "empty"
    return "brightfield"


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of blue or green marker ink: saturated colours that H&E never makes.

    Eosin and haematoxylin are red-violet: their red channel stays close to or above their green one and blue
    exceeds red only moderately. Blue ink has blue far above red; green ink has green above both.
    """
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    blue = (b > r + 50) & (b > g + 20) & (r < 140)
    green = (g > r + 20) & (g > b + 10)
    return blue | green


def tissue_mask(rgb: np.ndarray, *, min_area_frac: float = 0.001) -> np.ndarray:
    """Boolean tissue mask [h, w] of an RGB thumbnail (uint8 [h, w, 3]).

    Steps: HSV saturation thresholded with Otsu (never below ``MIN_SATURATION``); near-white and near-black pixels
    and pen ink (:func:`pen_mask`) excluded; morphological closing then opening; holes filled; connected
    components smaller than ``min_area_frac`` of the image removed. An image with no tissue (all glass) gives an
    all-False mask. A fluorescence thumbnail (:func:`slide_kind`) is cut by brightness instead of saturation.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] not in (3, 4):
        raise ValueError(f"tissue_mask expects an RGB image [h, w, 3], got shape {rgb.shape}")
    rgb = rgb[..., :3]
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    h, w = rgb.shape[:2]
    if h == 0 or w == 0:
        return np.zeros((h, w), dtype=bool)

    if slide_kind(rgb) == "fluorescence":
        # Nuclear stains light up nuclei, not the tissue between them: blur brightness to the scale of a few
        # cells, then Otsu on a log scale separates the faint tissue glow from the black background.
        sigma = max(2.0, 0.01 * min(h, w))
        glow = np.log1p(ndimage.gaussian_filter(rgb.max(axis=-1).astype(np.float32), sigma))
        t = otsu_threshold(glow, value_range=(0.0, float(np.log(256.0))))
        t = float(np.log1p(8.0)) if t is None else max(t, float(np.log1p(8.0)))
        mask = glow >= t
    else:
        sat = _saturation(rgb)
        not_white = rgb.min(axis=-1) < WHITE_LEVEL
        not_black = rgb.max(axis=-1) > BLACK_LEVEL
        candidates = not_white & not_black & ~pen_mask(rgb)
        if not candidates.any():
            return np.zeros((h, w), dtype=bool)
        t = otsu_threshold(sat)
        t = MIN_SATURATION if t is None else max(t, MIN_SATURATION)
        mask = (sat >= t) & candidates
    if not mask.any():
        return mask

    # Structuring element scaled to the thumbnail: ~0.3% of the shorter side, at least 3x3.
    r = max(1, int(round(min(h, w) * 0.003)))
    struct = np.ones((2 * r + 1, 2 * r + 1), dtype=bool)
    # Pad with edge values so that tissue touching the image border is neither eroded nor dilated there.
    padded = np.pad(mask, r, mode="edge")
    padded = ndimage.binary_closing(padded, structure=struct)
    padded = ndimage.binary_opening(padded, structure=struct)
    mask = ndimage.binary_fill_holes(padded[r:-r, r:-r])

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= max(1.0, min_area_frac * h * w)
    keep[0] = False
    return keep[labels]
