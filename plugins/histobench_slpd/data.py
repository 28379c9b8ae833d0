"""Region-level training data for SLPD: pre-extracted patch-embedding grids, slide by slide.

HIPT/SLPD never show pixels to the region encoder: each 4096 px region is stored as the ``[D, 16, 16]`` grid
of its 256 px patches' frozen ViT-256 [CLS] vectors (spec section 2.1). :class:`RegionGridDataset` serves
those grids to :func:`histobench.pretrain.trainer.pretrain` (``input_key = "grids"``) and carries the slide
structure SLPD's per-epoch clustering needs. :func:`synthetic_grid_cohort` makes a cohort with known latent
tissue types and slide classes for the fidelity checks (spec section 3, "Synthetic cohort" [ours]).
"""

from __future__ import annotations

import numpy as np
import torch


class RegionGridDataset(torch.utils.data.Dataset):
    """``dataset[i] -> (grid float32 [D, h, w], slide_index, region_index)``.

    Args:
        grids: ``[R, D, h, w]`` float grids (numpy or torch), region ``i`` of the cohort in row ``i``.
        slide_index: ``[R]`` slide of each region, ``0..N-1``; each slide's regions must be contiguous.
        region_index: ``[R]`` position of each region within its slide (``0..n_s-1`` in row order); computed
            when omitted.
        slide_labels: Optional ``[N]`` slide labels (diagnostics only: nearest-slide same-label rate).

    Attributes ``offsets`` (``[N + 1]``: slide ``s`` owns rows ``offsets[s]:offsets[s+1]``), ``slide_index``,
    ``region_index``, ``grids``; so a region's global row is ``offsets[slide_index] + region_index``.
    """

    input_key = "grids"

    def __init__(self, grids, slide_index, region_index=None, slide_labels=None):
        self.grids = torch.as_tensor(np.asarray(grids) if not isinstance(grids, torch.Tensor) else grids,
                                     dtype=torch.float32)
        if self.grids.ndim != 4:
            raise ValueError(f"grids must be [R, D, h, w], got shape {tuple(self.grids.shape)}")
        self.slide_index = np.asarray(slide_index, dtype=np.int64)
        if len(self.slide_index) != len(self.grids):
            raise ValueError("slide_index must have one entry per grid")
        self.offsets = slide_offsets(self.slide_index)
        expected = np.arange(len(self.slide_index)) - self.offsets[self.slide_index]
        if region_index is None:
            region_index = expected
        self.region_index = np.asarray(region_index, dtype=np.int64)
        if not np.array_equal(self.region_index, expected):
            raise ValueError("region_index must count 0..n_s-1 within each slide, in row order")
        self.slide_labels = None if slide_labels is None else np.asarray(slide_labels)
        if self.slide_labels is not None and len(self.slide_labels) != len(self.offsets) - 1:
            raise ValueError(f"slide_labels needs one entry per slide ({len(self.offsets) - 1})")

    def __len__(self) -> int:
        return len(self.grids)

    def __getitem__(self, i: int):
        return self.grids[i], int(self.slide_index[i]), int(self.region_index[i])


def slide_offsets(slide_index) -> np.ndarray:
    """``[N + 1]`` row offsets of slides ``0..N-1`` whose regions are contiguous; raises otherwise."""
    slide_index = np.asarray(slide_index, dtype=np.int64)
    if len(slide_index) == 0:
        return np.zeros(1, dtype=np.int64)
    n = int(slide_index.max()) + 1
    if slide_index.min() < 0:
        raise ValueError("slide indices must be >= 0")
    starts = np.r_[0, np.nonzero(np.diff(slide_index))[0] + 1]
    if len(starts) != len(np.unique(slide_index)):
        raise ValueError("each slide's regions must be contiguous in the dataset (spec pitfall 8)")
    counts = np.bincount(slide_index, minlength=n)
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int64)
    if not np.array_equal(offsets[slide_index[starts]], starts):
        raise ValueError("slides must appear in index order 0..N-1")
    return offsets


def synthetic_grid_cohort(n_slides: int = 32, regions_per_slide: int | tuple[int, int] = (8, 40), dim: int = 96,
                          grid: int = 8, n_classes: int = 2, seed: int = 0, signal: float = 1.0, noise: float = 1.0,
                          slide_effect: float = 0.3) -> RegionGridDataset:
    """A cohort of patch-feature grids with latent tissue types and class-dependent slide mixtures.

    There are ``1 + 2 * n_classes`` tissue types with random means; type 0 is shared by every class and
    class ``c`` adds its own types ``1 + 2c`` and ``2 + 2c``. A slide of class ``c`` draws Dirichlet(1)
    proportions over its 3 types (so it effectively shows 2-3 of them). Each region has one dominant type;
    with probability 0.5 its right half shows a second type drawn from the same mixture. A patch feature is
    ``signal * mu_type + smooth spatial field + slide offset + noise``. Slides alternate classes (balanced);
    ``regions_per_slide`` is a count or an inclusive ``(low, high)`` range. The dataset also carries
    ``region_types`` (``[R]`` dominant type) and ``slide_types`` (``[N, 3]`` the slide's type ids).
    """
    rng = np.random.default_rng(seed)
    n_types = 1 + 2 * n_classes
    means = rng.normal(size=(n_types, dim)).astype(np.float32) * signal
    labels = np.arange(n_slides) % n_classes
    yy, xx = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    grids, slides, types, slide_types = [], [], [], []
    for s, c in enumerate(labels):
        own = np.array([0, 1 + 2 * c, 2 + 2 * c])
        mix = rng.dirichlet(np.ones(3))
        n = int(regions_per_slide) if np.isscalar(regions_per_slide) else int(rng.integers(regions_per_slide[0], regions_per_slide[1] + 1))
        offset = rng.normal(size=dim).astype(np.float32) * slide_effect
        dominant = own[rng.choice(3, size=n, p=mix)]
        for t in dominant:
            cells = np.full((grid, grid), t)
            if rng.random() < 0.5:
                cells[:, grid // 2:] = own[rng.choice(3, p=mix)]
            x = means[cells]  # [grid, grid, dim]
            freq, phase = rng.uniform(0.5, 1.5, size=2), rng.uniform(0, 2 * np.pi)
            field = np.sin(2 * np.pi * (freq[0] * yy + freq[1] * xx) / grid + phase)
            x = x + field[..., None] * rng.normal(size=dim).astype(np.float32) * 0.5
            x = x + offset + rng.normal(size=x.shape).astype(np.float32) * noise
            grids.append(x.transpose(2, 0, 1).astype(np.float32))
            slides.append(s)
            types.append(t)
        slide_types.append(own)
    ds = RegionGridDataset(np.stack(grids), np.array(slides), slide_labels=labels)
    ds.region_types = np.array(types, dtype=np.int64)
    ds.slide_types = np.stack(slide_types)
    return ds
