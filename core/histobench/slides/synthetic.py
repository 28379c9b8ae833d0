"""Synthetic H&E-like whole-slide images with a planted, learnable morphological signal, and demo cohorts.

A synthetic slide is a real pyramidal, tiled, JPEG-compressed TIFF that OpenSlide opens as ``generic-tiff``,
with its pixel size in the TIFF resolution tags (centimetre units, so OpenSlide reports ``openslide.mpp-x``).

Content: white glass; one or two irregular tissue blobs (about 40-55% of the area) of pink, fibrous stroma with
scattered spindle-shaped fibroblast nuclei and small round lymphocytes. A "tumour" region covering
``signal_fraction`` of the tissue has a morphology that depends on the class:

* class 0, glandular: glands of cuboidal/columnar epithelium, nuclei in a ring around a pale lumen, in stroma;
* class 1, solid: sheets of large, pleomorphic, densely packed nuclei with keratin pearls (pink concentric whorls
  rimmed by flattened nuclei);
* class 2, clear cell: polygonal cells with empty-looking cytoplasm, thin pink membranes and small central nuclei.

All colours come from the same two stains (Beer-Lambert mixing of haematoxylin and eosin optical densities with a
per-slide stain-strength jitter), so the classes differ by arrangement and shape, not by a global colour shift.
The layout (where the tissue and the tumour are) depends on the seed only, never on the class.

Geometry is defined in µm and converted with ``mpp``, so the signal is visible at ~1 µm/px in 64 px tiles.
Everything is vectorised numpy; a 2048 x 2048 slide takes about a second including JPEG encoding.

Every slide comes with its true nuclei (the ground truth of the ``oracle`` segmenter, DiRL's cell prior on
synthetic data): :func:`write_synthetic_slide` writes a sidecar ``<slide>.nuclei.npz`` (:func:`nuclei_sidecar`)
holding the level-0 instance map (one id per painted nucleus, 0 = none; uint16, or uint32 past 65535 nuclei)
and type map (uint8, :data:`NUCLEUS_TYPES`). A pixel belongs to a nucleus where the nucleus covers at least half
of it (inside its ellipse); where nuclei overlap, the one painted darker there wins, as in the image. Recording
the maps draws no random numbers, so the slide's pixels are the same with or without them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from histobench.errors import HistobenchError

GENERATOR_VERSION = 1
MORPHOLOGIES = ("glandular", "solid", "clear-cell")

# Type ids of the nuclei sidecar (0 = no nucleus). Tumour-like: the epithelial nuclei of every tumour
# morphology (gland rings, solid sheets and the flattened nuclei rimming keratin pearls, clear-cell nuclei).
NUCLEUS_TYPES = {0: "none", 1: "tumour", 2: "lymphocyte", 3: "fibroblast"}
_TUMOUR, _LYMPHOCYTE, _FIBROBLAST = 1, 2, 3
NUCLEI_FORMAT_VERSION = 1

# Stain optical-density vectors (RGB), unit norm: haematoxylin (blue-purple) and eosin (pink).
_H_OD = np.array([0.65, 0.70, 0.29])
_E_OD = np.array([0.10, 0.95, 0.30])
_H_OD = _H_OD / np.linalg.norm(_H_OD)
_E_OD = _E_OD / np.linalg.norm(_E_OD)

_LOWRES = 8  # layout fields are computed at 1/8 of level 0 and upsampled


# --------------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------------
def _upsample(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float field to ``shape`` (h, w)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32))
    return np.array(img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth noise with features about ``cell`` px across."""
    from scipy import ndimage

    gh = max(2, int(math.ceil(shape[0] / cell)) + 3)
    gw = max(2, int(math.ceil(shape[1] / cell)) + 3)
    g = ndimage.gaussian_filter(rng.standard_normal((gh, gw)).astype(np.float32), 0.8, mode="wrap")
    out = _upsample(g, (int(round(gh * cell)), int(round(gw * cell))))[_offset_slice(cell, shape)]
    out -= out.mean()
    sd = out.std()
    return out / sd if sd > 0 else out


def _offset_slice(cell: float, shape: tuple[int, int]) -> tuple[slice, slice]:
    o = int(round(cell))
    return slice(o, o + shape[0]), slice(o, o + shape[1])


def _stamp_max(canvas: np.ndarray, cy: np.ndarray, cx: np.ndarray, half: int, fn: Callable,
               record: Callable | None = None) -> None:
    """Draw K small shapes into ``canvas`` with a running maximum.

    ``fn(dy, dx)`` gets float32 offsets [K, s, 1] / [K, 1, s] (pixel centre minus shape centre) and returns the
    shape values [K, s, s]; values <= 0 are skipped. ``record(flat, v, ok)``, when given, also receives the flat
    canvas index [K, s, s], the values and the mask of drawn pixels (the nuclei maps use it).
    """
    if len(cy) == 0:
        return
    h, w = canvas.shape
    o = np.arange(-half, half + 1)
    iy = np.rint(cy).astype(np.int64)[:, None, None] + o[None, :, None]
    ix = np.rint(cx).astype(np.int64)[:, None, None] + o[None, None, :]
    dy = (iy - cy[:, None, None]).astype(np.float32)
    dx = (ix - cx[:, None, None]).astype(np.float32)
    v = fn(dy, dx)
    ok = (v > 0) & (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    flat_all = np.broadcast_to(iy * w + ix, v.shape)
    flat = flat_all[ok]
    np.maximum.at(canvas.reshape(-1), flat, v[ok].astype(canvas.dtype))
    if record is not None:
        record(flat_all, v, ok)


def _k(a: np.ndarray | float, n: int) -> np.ndarray:
    """Per-shape parameter as a float32 [K, 1, 1] array."""
    return np.broadcast_to(np.asarray(a, dtype=np.float32), (n,)).reshape(n, 1, 1)


class NucleusMap:
    """True nuclei of a slide being rendered: a level-0 key canvas where each pixel keeps the nucleus painted
    darkest there (key = quantised painted value << 40 | id), and each id's type.

    :meth:`sub` gives a canvas for a box of the slide that shares the ids (the tumour is drawn in its bounding
    box); :meth:`merge` puts it back with the same maximum the image uses.
    """

    _ID_BITS = 40

    def __init__(self, shape: tuple[int, int], types: list[int] | None = None):
        self.key = np.zeros(shape, dtype=np.int64)
        self.types = types if types is not None else [0]  # types[id]; id 0 is "no nucleus"

    def sub(self, shape: tuple[int, int]) -> "NucleusMap":
        return NucleusMap(shape, self.types)

    def merge(self, box: tuple[slice, slice], other: "NucleusMap") -> None:
        np.maximum(self.key[box], other.key, out=self.key[box])

    def clip(self, mask: np.ndarray) -> None:
        """Drop nucleus pixels outside ``mask`` (as the image does with ``nb *= tb``)."""
        self.key[~mask] = 0

    def recorder(self, n: int, value: np.ndarray, kind: int) -> Callable:
        """A ``record`` callback for :func:`_stamp_max` drawing ``n`` nuclei of type ``kind``."""
        first = len(self.types)
        self.types.extend([kind] * n)
        ids = np.arange(first, first + n, dtype=np.int64).reshape(n, 1, 1)

        def record(flat_all: np.ndarray, v: np.ndarray, ok: np.ndarray) -> None:
            inside = ok & (v >= 0.5 * value)  # at least half of the pixel is covered by the ellipse
            q = np.rint(np.broadcast_to(v, inside.shape)[inside] * 4096).astype(np.int64)
            keys = (q << self._ID_BITS) | np.broadcast_to(ids, inside.shape)[inside]
            np.maximum.at(self.key.reshape(-1), flat_all[inside], keys)

        return record

    def maps(self) -> tuple[np.ndarray, np.ndarray]:
        """``(instances, types)``: ids renumbered 1..n over the nuclei still visible, 0 = none."""
        ids = self.key & ((1 << self._ID_BITS) - 1)
        present = np.zeros(len(self.types), dtype=bool)
        present[ids.ravel()] = True
        present[0] = False
        new = np.cumsum(present) * present  # old id -> new id (0 for hidden nuclei and the background)
        n = int(present.sum())
        inst = new[ids].astype(np.uint16 if n <= 0xFFFF else np.uint32)
        types = np.asarray(self.types, dtype=np.uint8)[ids]
        return inst, types


def _ellipses(
    canvas: np.ndarray,
    cy: np.ndarray,
    cx: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    theta: np.ndarray,
    value: np.ndarray,
    wobble: np.ndarray | float = 0.0,
    phase: np.ndarray | float = 0.0,
    nuclei: NucleusMap | None = None,
    kind: int = 0,
) -> None:
    """Anti-aliased filled ellipses (semi-axes ``a`` along ``theta``, ``b`` across, in px), max-composited.

    With ``nuclei``, each ellipse is also recorded there as a nucleus of type ``kind``."""
    n = len(cy)
    if n == 0:
        return
    a_, b_, t_, v_ = _k(a, n), _k(b, n), _k(theta, n), _k(value, n)
    w_, p_ = _k(wobble, n), _k(phase, n)
    half = int(math.ceil(float(np.max(a)) * (1 + float(np.max(wobble))))) + 2

    def fn(dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
        c, s = np.cos(t_), np.sin(t_)
        u = (dx * c + dy * s) / a_
        v = (dy * c - dx * s) / b_
        r = np.sqrt(u * u + v * v)
        if np.any(w_ > 0):
            r = r / (1 + w_ * np.cos(3 * np.arctan2(v, u) + p_))
        return np.clip((1 - r) * b_ + 0.5, 0, 1) * v_

    _stamp_max(canvas, cy, cx, half, fn, None if nuclei is None else nuclei.recorder(n, v_, kind))


def _discs(
    canvas: np.ndarray,
    cy: np.ndarray,
    cx: np.ndarray,
    radius: np.ndarray,
    rng: np.random.Generator,
    irregular: float = 0.08,
    profile: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> None:
    """Irregular anti-aliased discs; ``profile(d, R)`` (distance and local radius, px) modulates the inside."""
    n = len(cy)
    if n == 0:
        return
    r_ = _k(radius, n)
    p1, p2 = _k(rng.uniform(0, 2 * np.pi, n), n), _k(rng.uniform(0, 2 * np.pi, n), n)
    a2, a3 = _k(rng.uniform(0, irregular, n), n), _k(rng.uniform(0, irregular * 0.6, n), n)
    half = int(math.ceil(float(np.max(radius)) * (1 + 1.6 * irregular))) + 2

    def fn(dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
        d = np.sqrt(dx * dx + dy * dy)
        ang = np.arctan2(dy, dx)
        rr = r_ * (1 + a2 * np.cos(2 * ang + p1) + a3 * np.cos(3 * ang + p2))
        edge = np.clip(rr - d + 0.5, 0, 1)
        return edge if profile is None else edge * profile(d, rr)

    _stamp_max(canvas, cy, cx, half, fn)


def _hex_grid(
    rng: np.random.Generator, shape: tuple[int, int], spacing: float, jitter: float
) -> tuple[np.ndarray, np.ndarray]:
    """Jittered hexagonal lattice points (y, x) covering ``shape``."""
    h, w = shape
    dy = spacing * math.sqrt(3) / 2
    rows = np.arange(-1, int(h / dy) + 2)
    cols = np.arange(-1, int(w / spacing) + 2)
    yy, xx = np.meshgrid(rows, cols, indexing="ij")
    off = rng.uniform(0, spacing, 2)
    y = yy * dy + off[0]
    x = xx * spacing + (yy % 2) * spacing / 2 + off[1]
    y = y.ravel() + rng.uniform(-jitter, jitter, y.size)
    x = x.ravel() + rng.uniform(-jitter, jitter, x.size)
    return y, x


def _poisson_points(rng: np.random.Generator, shape: tuple[int, int], per_px: float) -> tuple[np.ndarray, np.ndarray]:
    n = rng.poisson(shape[0] * shape[1] / per_px)
    return rng.uniform(0, shape[0], n), rng.uniform(0, shape[1], n)


def _inside(mask: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Whether points fall on True pixels of ``mask`` (points outside the image count as False)."""
    h, w = mask.shape
    iy, ix = np.rint(y).astype(np.int64), np.rint(x).astype(np.int64)
    ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    out = np.zeros(len(y), dtype=bool)
    out[ok] = mask[iy[ok], ix[ok]]
    return out


def _sub(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *key]))


# --------------------------------------------------------------------------------------------------------------
# layout: tissue and tumour region (class independent)
# --------------------------------------------------------------------------------------------------------------
def _layout(seed: int, size: tuple[int, int], mpp: float, signal_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Low-resolution (1/8) soft fields: tissue alpha in [0, 1] and the tumour score (tumour where >= 0)."""
    rng = _sub(seed, 1)
    w, h = size
    lh, lw = max(4, int(math.ceil(h / _LOWRES))), max(4, int(math.ceil(w / _LOWRES)))
    y, x = np.mgrid[0:lh, 0:lw].astype(np.float32)
    n_blobs = 1 if rng.random() < 0.5 else 2
    field = np.full((lh, lw), -np.inf, dtype=np.float32)
    for k in range(n_blobs):
        if n_blobs == 1:
            cy, cx = rng.uniform(0.4, 0.6) * lh, rng.uniform(0.4, 0.6) * lw
            r0 = 0.42 * min(lh, lw)
        else:  # side by side along the longer axis
            t = (0.28 if k == 0 else 0.72) + rng.uniform(-0.04, 0.04)
            u = rng.uniform(0.38, 0.62)
            cy, cx = (t * lh, u * lw) if lh > lw else (u * lh, t * lw)
            r0 = 0.3 * min(lh, lw)
        sy, sx = rng.uniform(0.75, 1.25), rng.uniform(0.75, 1.25)
        dy, dx = (y - cy) / sy, (x - cx) / sx
        ang = np.arctan2(dy, dx)
        r = np.ones_like(ang)
        for harm in range(2, 6):
            r += rng.uniform(0, 0.12) * np.cos(harm * ang + rng.uniform(0, 2 * np.pi))
        field = np.maximum(field, 1 - np.sqrt(dx * dx + dy * dy) / (r0 * r))
    field += 0.18 * _smooth_noise(rng, (lh, lw), max(3.0, 40 / (mpp * _LOWRES)))
    target = rng.uniform(0.42, 0.55)
    thr = np.quantile(field, 1 - target)
    tissue = np.clip((field - thr) / 0.03 + 0.5, 0, 1)

    # Tumour: the part of the tissue nearest a random tissue point, roughened with noise.
    inside = tissue > 0.5
    idx = np.flatnonzero(inside.ravel())
    seed_px = idx[rng.integers(len(idx))] if len(idx) else (lh // 2) * lw + lw // 2
    sy0, sx0 = divmod(int(seed_px), lw)
    scale = math.sqrt(max(inside.sum(), 1))
    score = -np.sqrt((y - sy0) ** 2 + (x - sx0) ** 2) / scale
    score += 0.12 * _smooth_noise(rng, (lh, lw), max(3.0, 60 / (mpp * _LOWRES)))
    if inside.any() and signal_fraction > 0:
        cut = np.quantile(score[inside], 1 - min(signal_fraction, 1.0))
    else:
        cut = np.inf
    return tissue.astype(np.float32), (score - cut).astype(np.float32)


def tumor_mask(
    *, seed: int, size: tuple[int, int] = (2048, 2048), mpp: float = 0.25, signal_fraction: float = 0.35
) -> np.ndarray:
    """Boolean tumour mask [h, w] at level 0 of the slide that :func:`write_synthetic_slide` makes with these
    arguments (the layout does not depend on the class)."""
    w, h = size
    tissue, score = _layout(seed, size, mpp, signal_fraction)
    return (_upsample(tissue, (h, w)) > 0.5) & (_upsample(score, (h, w)) >= 0)


# --------------------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------------------
def render_synthetic(
    *,
    class_index: int,
    n_classes: int,
    seed: int,
    size: tuple[int, int] = (2048, 2048),
    mpp: float = 0.25,
    signal_fraction: float = 0.35,
    nuclei: NucleusMap | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Level-0 pixels of a synthetic slide: (rgb uint8 [h, w, 3], tissue mask, tumour mask).

    ``nuclei``, a :class:`NucleusMap` of the slide's (h, w), receives the true nuclei; the pixels do not
    depend on it."""
    if not 2 <= n_classes <= len(MORPHOLOGIES):
        raise HistobenchError(f"synthetic slides support 2 to {len(MORPHOLOGIES)} classes, got n_classes={n_classes}")
    if not 0 <= class_index < n_classes:
        raise HistobenchError(f"class_index {class_index} is out of range for {n_classes} classes")
    w, h = int(size[0]), int(size[1])
    if w < 64 or h < 64:
        raise HistobenchError(f"synthetic slide size must be at least 64x64, got {w}x{h}")
    if not mpp > 0:
        raise HistobenchError(f"synthetic slide mpp must be positive, got {mpp}")
    um = 1.0 / mpp  # px per µm
    shape = (h, w)

    tissue_lr, score_lr = _layout(seed, (w, h), mpp, signal_fraction)
    alpha = _upsample(tissue_lr, shape)
    tissue = alpha > 0.5
    tumour = tissue & (_upsample(score_lr, shape) >= 0)
    alpha = np.clip(alpha, 0, 1)

    rng = _sub(seed, 2)  # texture and cells (class dependent draws come after the shared ones)

    # ---- stroma everywhere: eosin with wavy fibres ---------------------------------------------------------
    yv = np.arange(h, dtype=np.float32)[:, None]
    xv = np.arange(w, dtype=np.float32)[None, :]
    theta = rng.uniform(0, np.pi)
    warp = _smooth_noise(rng, shape, 30 * um)
    lam = 7.0 * um
    fib = np.sin((xv * math.cos(theta) + yv * math.sin(theta)) * (2 * np.pi / lam) + 3.0 * warp)
    med = _smooth_noise(rng, shape, 5 * um)
    E = 0.42 + 0.10 * fib + 0.06 * med
    H = np.full(shape, 0.06, dtype=np.float32) + 0.02 * med
    del fib

    nuc = np.zeros(shape, dtype=np.float32)  # haematoxylin added by nuclei

    # fibroblasts (spindles along the fibres) and lymphocytes, in stroma
    fy, fx = _poisson_points(rng, shape, 450 * um * um)
    ly, lx = _poisson_points(rng, shape, 1400 * um * um)
    fib_angle = theta + np.pi / 2 + rng.normal(0, 0.25, len(fy))
    fib_a = rng.uniform(5.5, 8.0, len(fy)) * um
    fib_b = rng.uniform(1.2, 1.8, len(fy)) * um
    fib_v = rng.uniform(1.3, 1.8, len(fy))
    ly_r = rng.uniform(2.4, 3.0, len(ly)) * um
    ly_v = rng.uniform(1.8, 2.2, len(ly))

    # stromal cells outside the tumour (class independent); the glandular tumour adds its own below
    normal = tissue & ~tumour
    keep = _inside(normal, fy, fx)
    _ellipses(nuc, fy[keep], fx[keep], fib_a[keep], fib_b[keep], fib_angle[keep], fib_v[keep],
              nuclei=nuclei, kind=_FIBROBLAST)
    keep = _inside(normal, ly, lx)
    _ellipses(nuc, ly[keep], lx[keep], ly_r[keep], ly_r[keep] * 0.92, np.zeros(keep.sum()), ly_v[keep],
              nuclei=nuclei, kind=_LYMPHOCYTE)
    del normal

    # ---- tumour ----------------------------------------------------------------------------------------------
    trng = _sub(seed, 3, class_index)
    morph = MORPHOLOGIES[class_index]
    if tumour.any():
        ys, xs = np.nonzero(tumour)
        y0, y1 = int(ys.min()), int(ys.max()) + 1
        x0, x1 = int(xs.min()), int(xs.max()) + 1
        box = (slice(y0, y1), slice(x0, x1))
        bshape = (y1 - y0, x1 - x0)
        tb = tumour[box]
        Et, Ht = E[box].copy(), H[box].copy()
        nb = np.zeros(bshape, dtype=np.float32)
        nbm = nuclei.sub(bshape) if nuclei is not None else None

        if morph == "glandular":
            gy, gx = _hex_grid(trng, bshape, 52 * um, 7 * um)
            keep = _inside(tb, gy, gx)
            gy, gx = gy[keep], gx[keep]
            rg = trng.uniform(17, 23, len(gy)) * um
            rl = rg * trng.uniform(0.35, 0.5, len(gy))
            epi = np.zeros(bshape, dtype=np.float32)
            lum = np.zeros(bshape, dtype=np.float32)
            _discs(epi, gy, gx, rg, trng, irregular=0.08)
            _discs(lum, gy, gx, rl, trng, irregular=0.15)
            epi *= tb
            lum *= tb
            Et = Et * (1 - epi) + 0.30 * epi
            Ht = Ht * (1 - epi) + 0.16 * epi
            Et = Et * (1 - lum) + 0.04 * lum
            Ht = Ht * (1 - lum) + 0.01 * lum
            # nuclei in a ring, long axis radial (columnar epithelium)
            rr = (rl + rg) / 2
            counts = np.maximum(6, np.round(2 * np.pi * rr / (5.5 * um))).astype(np.int64)
            gi = np.repeat(np.arange(len(gy)), counts)
            start = np.repeat(trng.uniform(0, 2 * np.pi, len(gy)), counts)
            step = np.repeat(2 * np.pi / np.maximum(counts, 1), counts)
            pos = np.arange(len(gi)) - np.repeat(np.cumsum(counts) - counts, counts)
            ang = start + pos * step + trng.normal(0, 0.06, len(gi))
            rad = rr[gi] + trng.normal(0, 0.8 * um, len(gi))
            ny_, nx_ = gy[gi] + rad * np.sin(ang), gx[gi] + rad * np.cos(ang)
            n = len(gi)
            _ellipses(nb, ny_, nx_, trng.uniform(3.8, 5.0, n) * um, trng.uniform(1.8, 2.4, n) * um,
                      ang + trng.normal(0, 0.1, n), trng.uniform(1.5, 2.0, n), nuclei=nbm, kind=_TUMOUR)
            # desmoplastic stroma between the glands keeps its fibroblasts and lymphocytes
            between = tb & (epi < 0.05)
            keep = _inside(between, fy - y0, fx - x0)
            _ellipses(nb, fy[keep] - y0, fx[keep] - x0, fib_a[keep], fib_b[keep], fib_angle[keep], fib_v[keep],
                      nuclei=nbm, kind=_FIBROBLAST)
            keep = _inside(between, ly - y0, lx - x0)
            _ellipses(nb, ly[keep] - y0, lx[keep] - x0, ly_r[keep], ly_r[keep] * 0.92, np.zeros(keep.sum()),
                      ly_v[keep], nuclei=nbm, kind=_LYMPHOCYTE)
            nb *= tb
        elif morph == "solid":
            # keratin pearls: concentric eosinophilic whorls
            py, px = _poisson_points(trng, bshape, 5500 * um * um)
            keep = _inside(tb, py, px)
            py, px = py[keep], px[keep]
            pr = trng.uniform(12, 20, len(py)) * um
            pearl = np.zeros(bshape, dtype=np.float32)
            period = 3.5 * um
            _discs(pearl, py, px, pr, trng, irregular=0.1,
                   profile=lambda d, r: 1.0 + 0.5 * (0.5 + 0.5 * np.cos(2 * np.pi * d / period)))
            pearl *= tb
            p_in = np.clip(pearl, 0, 1)
            whorl = np.clip(pearl - 1, 0, 0.5) * 2
            # dense sheet: amphophilic cytoplasm between large nuclei
            Et = Et * (1 - tb) + 0.36 * tb
            Ht = Ht * (1 - tb) + 0.14 * tb
            Et = Et * (1 - p_in) + (0.45 + 0.35 * whorl) * p_in
            Ht = Ht * (1 - p_in) + 0.02 * p_in
            cy, cx = _hex_grid(trng, bshape, 10.5 * um, 1.8 * um)
            keep = _inside(tb, cy, cx) & ~_inside(p_in > 0.3, cy, cx)
            cy, cx = cy[keep], cx[keep]
            n = len(cy)
            a = trng.uniform(3.4, 4.8, n) * um
            _ellipses(nb, cy, cx, a, a * trng.uniform(0.7, 0.95, n), trng.uniform(0, np.pi, n),
                      trng.uniform(1.4, 2.2, n), wobble=trng.uniform(0, 0.12, n), phase=trng.uniform(0, 6.3, n),
                      nuclei=nbm, kind=_TUMOUR)
            # flattened nuclei rimming each pearl, tangential
            counts = np.maximum(5, np.round(2 * np.pi * pr / (7 * um))).astype(np.int64)
            gi = np.repeat(np.arange(len(py)), counts)
            pos = np.arange(len(gi)) - np.repeat(np.cumsum(counts) - counts, counts)
            ang = np.repeat(trng.uniform(0, 2 * np.pi, len(py)), counts) + pos * np.repeat(2 * np.pi / counts, counts)
            rad = pr[gi] + 1.5 * um
            m = len(gi)
            _ellipses(nb, py[gi] + rad * np.sin(ang), px[gi] + rad * np.cos(ang), trng.uniform(3.5, 4.5, m) * um,
                      trng.uniform(1.2, 1.6, m) * um, ang + np.pi / 2, trng.uniform(1.5, 1.9, m), nuclei=nbm, kind=_TUMOUR)
            nb *= tb
        else:  # clear cell: warped square lattice of cells, pink membranes, pale cytoplasm, small central nuclei
            p = 13.0 * um
            wy = 2.5 * um * _smooth_noise(trng, bshape, 25 * um)
            wx = 2.5 * um * _smooth_noise(trng, bshape, 25 * um)
            by = np.arange(bshape[0], dtype=np.float32)[:, None]
            bx = np.arange(bshape[1], dtype=np.float32)[None, :]
            uu = (bx + wx) / p
            vv = (by + wy) / p
            du = np.abs(uu - np.rint(uu)) * p
            dv = np.abs(vv - np.rint(vv)) * p
            memb = np.exp(-((np.minimum(du, dv) / (0.7 * um)) ** 2)) * tb
            del uu, vv, du, dv
            Et = Et * (1 - tb) + (0.26 + 0.40 * memb) * tb
            Ht = Ht * (1 - tb) + (0.06 + 0.05 * memb) * tb
            rows = np.arange(-1, int(bshape[0] / p) + 2)
            cols = np.arange(-1, int(bshape[1] / p) + 2)
            cyy, cxx = np.meshgrid((rows + 0.5) * p, (cols + 0.5) * p, indexing="ij")
            cy, cx = cyy.ravel(), cxx.ravel()
            # undo the warp approximately (one fixed-point step) so nuclei sit inside their cells
            iy = np.clip(np.rint(cy).astype(np.int64), 0, bshape[0] - 1)
            ix = np.clip(np.rint(cx).astype(np.int64), 0, bshape[1] - 1)
            cy, cx = cy - wy[iy, ix], cx - wx[iy, ix]
            cy += trng.uniform(-2, 2, cy.size) * um
            cx += trng.uniform(-2, 2, cx.size) * um
            keep = _inside(tb, cy, cx) & (trng.random(cy.size) < 0.85)
            cy, cx = cy[keep], cx[keep]
            n = len(cy)
            r = trng.uniform(2.0, 2.6, n) * um
            _ellipses(nb, cy, cx, r, r * trng.uniform(0.85, 1.0, n), trng.uniform(0, np.pi, n),
                      trng.uniform(1.9, 2.4, n), nuclei=nbm, kind=_TUMOUR)
            nb *= tb
        E[box] = Et
        H[box] = Ht
        nuc[box] = np.maximum(nuc[box], nb)
        if nbm is not None:
            nbm.clip(tb)
            nuclei.merge(box, nbm)
        del Et, Ht, nb

    # ---- stain mixing ------------------------------------------------------------------------------------------
    srng = _sub(seed, 4)
    fine = srng.standard_normal(shape, dtype=np.float32)
    grain = _smooth_noise(srng, shape, 1.2 * um)
    H += nuc * (1 + 0.18 * grain)
    E *= 1 - 0.55 * np.clip(nuc, 0, 1)
    E *= 1 + 0.06 * fine
    H *= 1 + 0.06 * fine
    s_h, s_e = srng.uniform(0.8, 1.2), srng.uniform(0.8, 1.2)
    h_vec = _H_OD * (1 + srng.normal(0, 0.04, 3))
    e_vec = _E_OD * (1 + srng.normal(0, 0.04, 3))
    bg = 0.03 + 0.004 * fine
    H *= alpha * s_h
    E *= alpha * s_e
    rgb = np.empty((h, w, 3), dtype=np.uint8)
    for c in range(3):
        od = H * np.float32(h_vec[c]) + E * np.float32(e_vec[c]) + bg
        rgb[..., c] = np.clip(255.0 * np.exp(-od), 0, 255).astype(np.uint8)
    return rgb, tissue, tumour


# --------------------------------------------------------------------------------------------------------------
# TIFF writing
# --------------------------------------------------------------------------------------------------------------
def _pyramid(rgb: np.ndarray, tile: int) -> list[np.ndarray]:
    """Level 0 and successive 2x area-downsampled levels, until the image fits in one tile (>= 3 levels)."""
    levels = [rgb]
    while (max(levels[-1].shape[:2]) > tile or len(levels) < 3) and min(levels[-1].shape[:2]) >= 2:
        a = levels[-1]
        h2, w2 = a.shape[0] // 2, a.shape[1] // 2
        b = a[: 2 * h2, : 2 * w2].reshape(h2, 2, w2, 2, 3).astype(np.uint16).sum(axis=(1, 3))
        levels.append(((b + 2) // 4).astype(np.uint8))
    return levels


def write_tiff_pyramid(path: str | os.PathLike[str], rgb: np.ndarray, *, mpp: float, tile: int = 256,
                       quality: int = 90) -> list[tuple[int, int]]:
    """Write ``rgb`` as a tiled, JPEG-compressed pyramidal TIFF (one page per level) that OpenSlide opens as
    ``generic-tiff`` with ``openslide.mpp-x/y`` = ``mpp``. Atomic (temporary file, then rename).

    Returns the level dimensions as (width, height).
    """
    import tifffile

    if tile % 16:
        raise HistobenchError(f"TIFF tile size must be a multiple of 16, got {tile}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    levels = _pyramid(rgb, tile)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with tifffile.TiffWriter(tmp, bigtiff=False) as tw:
            for i, lv in enumerate(levels):
                ds_x = rgb.shape[1] / lv.shape[1]
                ds_y = rgb.shape[0] / lv.shape[0]
                tw.write(
                    lv,
                    tile=(tile, tile),
                    compression="jpeg",
                    compressionargs={"level": quality},
                    photometric="rgb",
                    resolution=(1e4 / (mpp * ds_x), 1e4 / (mpp * ds_y)),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if i == 0 else 1,
                    metadata=None,
                    software=False,
                )
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return [(lv.shape[1], lv.shape[0]) for lv in levels]


def write_synthetic_slide(
    path: str | os.PathLike[str],
    *,
    class_index: int,
    n_classes: int,
    seed: int,
    size: tuple[int, int] = (2048, 2048),
    mpp: float = 0.25,
    signal_fraction: float = 0.35,
    tile: int = 256,
) -> dict:
    """Write one synthetic slide (pyramidal JPEG TIFF) to ``path``; same arguments, same pixels and bytes.

    Its true nuclei go to the sidecar :func:`nuclei_sidecar` ``(path)`` (see :func:`read_nuclei`).
    ``size`` is (width, height) of level 0 in pixels; ``mpp`` its µm/px. Returns a dict with ``path``,
    ``class_index``, ``morphology``, ``seed``, ``mpp``, ``size``, ``levels`` (count), ``level_dimensions``,
    ``tissue_fraction`` (of the image), ``tumor_fraction`` (of the tissue) and ``nuclei`` (count).
    """
    nuclei = NucleusMap((int(size[1]), int(size[0])))
    rgb, tissue, tumour = render_synthetic(
        class_index=class_index, n_classes=n_classes, seed=seed, size=size, mpp=mpp, signal_fraction=signal_fraction,
        nuclei=nuclei,
    )
    instances, types = nuclei.maps()
    del nuclei
    # the sidecar first: a slide file without its sidecar is never left behind by a crash in between
    write_nuclei(nuclei_sidecar(path), instances, types, mpp=mpp)
    dims = write_tiff_pyramid(path, rgb, mpp=mpp, tile=tile)
    n_tissue = int(tissue.sum())
    return {
        "path": str(path),
        "class_index": int(class_index),
        "morphology": MORPHOLOGIES[class_index],
        "seed": int(seed),
        "mpp": float(mpp),
        "size": (int(size[0]), int(size[1])),
        "levels": len(dims),
        "level_dimensions": dims,
        "tissue_fraction": n_tissue / tissue.size,
        "tumor_fraction": float(tumour.sum()) / max(n_tissue, 1),
        "nuclei": int(instances.max()) if instances.size else 0,
    }


def nuclei_sidecar(path: str | os.PathLike[str]) -> Path:
    """Where the true nuclei of the synthetic slide ``path`` are: ``slides/X.tiff`` -> ``slides/X.nuclei.npz``."""
    path = Path(path)
    return path.with_name(path.stem + ".nuclei.npz")


def write_nuclei(path: str | os.PathLike[str], instances: np.ndarray, types: np.ndarray, *, mpp: float) -> Path:
    """Write a nuclei sidecar atomically (compressed npz): ``instances`` and ``types`` [h, w] at level 0, the
    level-0 ``mpp``, the type names and a format version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, format_version=np.int64(NUCLEI_FORMAT_VERSION), instances=instances,
                                types=np.asarray(types, dtype=np.uint8), mpp=np.float64(mpp),
                                type_names=np.array(json.dumps(NUCLEUS_TYPES)))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_nuclei(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, float]:
    """``(instances [h, w], types uint8 [h, w], level-0 mpp)`` of a nuclei sidecar; a one-line
    :class:`HistobenchError` naming the file when it is missing or unreadable."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            inst, types, mpp = z["instances"], z["types"], float(z["mpp"])
            version = int(z["format_version"])
    except FileNotFoundError:
        raise HistobenchError(f"nuclei sidecar {path} does not exist") from None
    except Exception as err:  # noqa: BLE001 - a damaged file raises KeyError, BadZipFile, zlib.error, ValueError...
        raise HistobenchError(f"nuclei sidecar {path} is unreadable: {type(err).__name__}: {err}") from None
    if version != NUCLEI_FORMAT_VERSION or inst.shape != types.shape or inst.ndim != 2:
        raise HistobenchError(f"nuclei sidecar {path} is not a histobench nuclei file (version {version})")
    return inst, types, mpp


# --------------------------------------------------------------------------------------------------------------
# demo cohorts
# --------------------------------------------------------------------------------------------------------------
def _slide_seed(seed: int, patient: int, slide: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 7, patient, slide]).generate_state(1)[0])


def make_demo_cohort(
    out_dir: str | os.PathLike[str],
    *,
    classes: list[str],
    n_patients: int,
    seed: int,
    size: tuple[int, int] = (2048, 2048),
    mpp: float = 0.25,
    slides_per_patient: tuple[int, ...] | list[int] = (1, 1, 1, 2, 3),
    class_indices: list[int] | None = None,
    signal_fraction: float = 0.35,
):
    """Generate a synthetic cohort: ``out_dir/slides/<slide_id>.tiff`` and ``out_dir/manifest.csv``.

    Patient ``i`` (case id ``DEMO-0001``, ...) gets ``slides_per_patient[i % len]`` slides (``DEMO-0001-01``, ...),
    all of the patient's class. Classes are balanced: patients cycle through the classes, then the assignment is
    shuffled with ``seed``; ``class_indices`` (one per patient) forces it instead. The manifest has columns
    ``slide_id, case_id, path`` (relative to ``out_dir``) and ``label`` (the class name).

    Idempotent: when ``out_dir`` already holds a cohort made with the same parameters (``demo_params.json``) and
    all its slides, nothing is regenerated and the existing manifest is returned.
    """
    out = Path(out_dir)
    classes = [str(c) for c in classes]
    n_classes = len(classes)
    if not 2 <= n_classes <= len(MORPHOLOGIES):
        raise HistobenchError(f"demo cohorts support 2 to {len(MORPHOLOGIES)} classes, got {classes}")
    if n_patients < 1:
        raise HistobenchError(f"a demo cohort needs at least one patient, got n_patients={n_patients}")
    pattern = [int(v) for v in slides_per_patient]
    if not pattern or min(pattern) < 1:
        raise HistobenchError(f"slides_per_patient must be positive counts, got {list(slides_per_patient)}")
    if class_indices is not None:
        class_indices = [int(c) for c in class_indices]
        if len(class_indices) != n_patients or not all(0 <= c < n_classes for c in class_indices):
            raise HistobenchError(
                f"class_indices must give one class in 0..{n_classes - 1} for each of the {n_patients} patients"
            )
        assigned = class_indices
    else:
        base = np.arange(n_patients) % n_classes
        assigned = [int(c) for c in np.random.default_rng(seed).permutation(base)]

    params = {
        "generator_version": GENERATOR_VERSION,
        "classes": classes,
        "n_patients": int(n_patients),
        "seed": int(seed),
        "size": [int(size[0]), int(size[1])],
        "mpp": float(mpp),
        "slides_per_patient": pattern,
        "class_indices": assigned,
        "signal_fraction": float(signal_fraction),
    }
    cached = _cached_cohort(out, params)
    if cached is not None:
        return cached

    jobs, df = _patient_slides(
        out, n_patients, pattern, seed,
        lambda i: dict(class_index=assigned[i], n_classes=n_classes, size=size, mpp=mpp, signal_fraction=signal_fraction),
        lambda i: {"label": classes[assigned[i]]})
    return _write_cohort(out, jobs, df, params)


def _patient_slides(out: Path, n_patients: int, pattern: list[int], seed: int,
                    slide_kwargs: Callable[[int], dict], row_fields: Callable[[int], dict]):
    """Slide-writing jobs and manifest rows for a demo cohort: patient ``i`` gets ``pattern[i % len]`` slides.

    ``slide_kwargs(i)`` gives :func:`write_synthetic_slide`'s arguments for patient ``i`` (each slide adds its
    own seed), ``row_fields(i)`` the patient's label columns. Returns ``(jobs, manifest frame)``.
    """
    import pandas as pd

    rows, jobs = [], []
    for i in range(n_patients):
        case_id = f"DEMO-{i + 1:04d}"
        fields = row_fields(i)
        for j in range(pattern[i % len(pattern)]):
            slide_id = f"{case_id}-{j + 1:02d}"
            rel = f"slides/{slide_id}.tiff"
            jobs.append(dict(path=out / rel, seed=_slide_seed(seed, i, j), **slide_kwargs(i)))
            rows.append({"slide_id": slide_id, "case_id": case_id, "path": rel, **fields})
    return jobs, pd.DataFrame(rows, columns=["slide_id", "case_id", "path", *row_fields(0)])


def _cached_cohort(out: Path, params: dict):
    """The manifest of a cohort already generated in ``out`` with exactly ``params``, or None."""
    import pandas as pd

    manifest_path, params_path = out / "manifest.csv", out / "demo_params.json"
    if manifest_path.exists() and params_path.exists():
        try:
            old = json.loads(params_path.read_text())
        except (OSError, ValueError):
            old = None
        if old == params:
            df = pd.read_csv(manifest_path, dtype={"slide_id": str, "case_id": str, "path": str, "label": str})
            # a cohort made before slides had nuclei sidecars is made again (same pixels, same slide bytes)
            if all((out / p).exists() and nuclei_sidecar(out / p).exists() for p in df["path"]):
                return df
    return None


def _write_cohort(out: Path, jobs: list[dict], df, params: dict):
    """Write every slide of ``jobs``, then the manifest and the parameters (last, so a crash regenerates)."""
    # Each slide is independent and deterministic in its own seed: write them on every core. Forked workers
    # run numpy and tifffile only, so no torch state is shared with them.
    # A slide is a pure function of its job: one this process already wrote (for another task's demo, say)
    # is copied instead of rendered again.
    todo = []
    for job in jobs:
        key = _job_key(job)
        done = _WRITTEN.get(key)
        if (done is not None and done.exists() and nuclei_sidecar(done).exists()
                and done != Path(job["path"])):
            Path(job["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(nuclei_sidecar(done), nuclei_sidecar(job["path"]))
            shutil.copyfile(done, job["path"])
        else:
            todo.append(job)
    jobs, keys = todo, [_job_key(j) for j in todo]
    paths = [Path(j["path"]) for j in todo]
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            list(pool.map(_write_job, jobs))
    else:
        for job in jobs:
            _write_job(job)
    _WRITTEN.update(zip(keys, paths))
    _atomic_write_text(out / "manifest.csv", df.to_csv(index=False))
    _atomic_write_text(out / "demo_params.json", json.dumps(params, indent=2, sort_keys=True) + "\n")
    return df


# Grading: the tumour (the "solid" morphology) takes a share of the tissue that grows with the grade, so the
# grade is ordinal in what a slide shows. Grade 0 is benign (no tumour at all).
GRADE_TUMOUR_FRACTION = (0.0, 0.12, 0.22, 0.32, 0.44, 0.56)


def make_grading_cohort(out_dir: str | os.PathLike[str], *, n_patients: int, seed: int,
                        size: tuple[int, int] = (2048, 2048), mpp: float = 0.25,
                        slides_per_patient: tuple[int, ...] | list[int] = (1, 1, 1, 2),
                        grades: int = 6):
    """A synthetic grading cohort: ISUP-like grades ``"0"`` .. ``str(grades - 1)``, balanced over patients.

    The planted signal is ordinal: a grade-``g`` slide has a tumour region of the solid morphology covering
    ``GRADE_TUMOUR_FRACTION[g]`` of its tissue (grade 0: none), so both "is there tumour" and "how much" carry
    the grade. Manifest: ``slide_id, case_id, path, label`` (``label`` the grade as a string).
    """
    if not 2 <= grades <= len(GRADE_TUMOUR_FRACTION):
        raise HistobenchError(f"grading demo cohorts support 2 to {len(GRADE_TUMOUR_FRACTION)} grades, got {grades}")
    if n_patients < grades:
        raise HistobenchError(f"a grading demo cohort needs at least one patient per grade ({grades}), got {n_patients}")
    out = Path(out_dir)
    pattern = [int(v) for v in slides_per_patient]
    assigned = [int(g) for g in np.random.default_rng(seed).permutation(np.arange(n_patients) % grades)]
    fractions = GRADE_TUMOUR_FRACTION if grades == len(GRADE_TUMOUR_FRACTION) else \
        tuple(float(v) for v in np.linspace(0.0, GRADE_TUMOUR_FRACTION[-1], grades))
    params = {"generator_version": GENERATOR_VERSION, "kind": "grading", "n_patients": int(n_patients),
              "seed": int(seed), "size": [int(size[0]), int(size[1])], "mpp": float(mpp),
              "slides_per_patient": pattern, "grades": assigned, "fractions": list(fractions)}
    cached = _cached_cohort(out, params)
    if cached is not None:
        return cached
    jobs, df = _patient_slides(
        out, n_patients, pattern, seed,
        lambda i: dict(class_index=1, n_classes=2, size=size, mpp=mpp, signal_fraction=fractions[assigned[i]]),
        lambda i: {"label": str(assigned[i])})
    return _write_cohort(out, jobs, df, params)


def simulate_survival(feature: np.ndarray, *, seed: int, beta: float = 1.5, median_months: float = 36.0,
                      censor_months: tuple[float, float] = (12.0, 96.0)) -> tuple[np.ndarray, np.ndarray]:
    """Times (months) and events from a proportional-hazards model on a tissue ``feature``.

    Hazard ``h(x) = h0 * exp(beta * z)`` with ``z`` the standardised feature and ``h0`` set so that a patient
    with an average feature has median survival ``median_months``; event times are exponential. Censoring is
    uniform over ``censor_months`` (administrative end of follow-up); ``event`` is 1 when the death comes first.
    """
    x = np.asarray(feature, dtype=np.float64)
    z = (x - x.mean()) / (x.std() or 1.0)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 11]))
    h0 = math.log(2) / median_months
    death = rng.exponential(1.0 / (h0 * np.exp(beta * z)))
    censor = rng.uniform(*censor_months, size=len(z))
    time = np.maximum(np.minimum(death, censor), 0.1)
    return np.round(time, 2), (death <= censor).astype(int)


def make_survival_cohort(out_dir: str | os.PathLike[str], *, n_patients: int, seed: int,
                         size: tuple[int, int] = (2048, 2048), mpp: float = 0.25,
                         slides_per_patient: tuple[int, ...] | list[int] = (1, 1, 1, 2),
                         fraction_range: tuple[float, float] = (0.05, 0.6), beta: float = 1.5):
    """A synthetic survival cohort: each patient's tumour burden sets its hazard.

    Patient ``i`` draws a tumour fraction ``f_i`` (share of its tissue with the solid morphology) uniformly in
    ``fraction_range``; all its slides show that burden. Times and events follow :func:`simulate_survival`
    (higher burden, shorter survival; about a third censored). Manifest: ``slide_id, case_id, path, time``
    (months), ``event`` (1 death, 0 censored) and ``tumour_fraction`` (the planted feature, for checks).
    """
    if n_patients < 4:
        raise HistobenchError(f"a survival demo cohort needs at least 4 patients, got {n_patients}")
    out = Path(out_dir)
    pattern = [int(v) for v in slides_per_patient]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 12]))
    burden = np.round(rng.uniform(*fraction_range, size=n_patients), 4)
    time, event = simulate_survival(burden, seed=seed, beta=beta)
    params = {"generator_version": GENERATOR_VERSION, "kind": "survival", "n_patients": int(n_patients),
              "seed": int(seed), "size": [int(size[0]), int(size[1])], "mpp": float(mpp),
              "slides_per_patient": pattern, "burden": burden.tolist(), "beta": float(beta)}
    cached = _cached_cohort(out, params)
    if cached is not None:
        return cached
    jobs, df = _patient_slides(
        out, n_patients, pattern, seed,
        lambda i: dict(class_index=1, n_classes=2, size=size, mpp=mpp, signal_fraction=float(burden[i])),
        lambda i: {"time": float(time[i]), "event": int(event[i]), "tumour_fraction": float(burden[i])})
    return _write_cohort(out, jobs, df, params)


def _write_job(job: dict) -> dict:
    job = dict(job)
    return write_synthetic_slide(job.pop("path"), **job)


_WRITTEN: dict[str, Path] = {}  # job key -> a file this process wrote for it


def _job_key(job: dict) -> str:
    spec = {k: v for k, v in job.items() if k != "path"}
    return hashlib.sha256(json.dumps([GENERATOR_VERSION, spec], sort_keys=True, default=str).encode()).hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file (used to check that generation is byte-for-byte deterministic)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
