"""Per-nucleus features of one segmented tile: the morphology and stain table the DiRL grouping clusters.

Shape: area, centroid, bounding box and eccentricity as scikit-image's ``regionprops`` defines them (computed
for all nuclei of a tile at once from pixel moments), and solidity (area over convex hull area). Stain
comes from colour deconvolution into haematoxylin, eosin and DAB optical densities with the Ruifrok-Johnston
matrix (``skimage.color.rgb2hed``; Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 2001): the mean and standard
deviation of the haematoxylin OD inside each nucleus, and the mean eosin OD in a ring of :data:`RING_PX` pixels
around it (background pixels only, each given to its nearest nucleus), the cytoplasm and stroma next to it. These are the
features of the DiRL spec's pseudo-types (``shared/methods/dirl.md`` §3.2, G1).
"""

from __future__ import annotations

import numpy as np

RING_PX = 3

# column -> dtype of the table; the cache stores one array per column
COLUMNS: dict[str, str] = {
    "tile": "int32",            # row of the tile in its slide's tile set
    "instance": "int32",        # label in the tile's instance map
    "type": "int16",            # majority type id of the nucleus' pixels; -1 when the segmenter gives no types
    "area_px": "int32",
    "area_um2": "float32",
    "centroid_y": "float32",    # tile pixels
    "centroid_x": "float32",
    "bbox_y0": "int16", "bbox_x0": "int16", "bbox_y1": "int16", "bbox_x1": "int16",  # half-open, tile pixels
    "eccentricity": "float32",
    "solidity": "float32",
    "h_od_mean": "float32",
    "h_od_std": "float32",
    "e_ring_od_mean": "float32",  # NaN when the ring is empty (a nucleus enclosed by other nuclei)
}


def empty_table() -> dict[str, np.ndarray]:
    return {k: np.zeros(0, dtype=v) for k, v in COLUMNS.items()}


def nucleus_features(tile: np.ndarray, instances: np.ndarray, types: np.ndarray | None, mpp: float,
                     tile_index: int) -> dict[str, np.ndarray]:
    """The feature table (column -> array, one row per nucleus, ordered by label) of one tile.

    ``tile`` is uint8 RGB [H, W, 3], ``instances`` the label map [H, W] (0 = background), ``types`` the type map
    or ``None``, ``mpp`` the tile's µm/px. Area, centroid and eccentricity are those of scikit-image's
    ``regionprops`` (eccentricity from the eigenvalues of the inertia tensor), computed for all nuclei at once;
    solidity is the pixel area over the area of the convex hull of the nucleus' pixel squares. A background
    pixel belongs to the eosin ring of the nearest nucleus within :data:`RING_PX` pixels (Euclidean distance).
    """
    from scipy import ndimage
    from skimage.color import rgb2hed

    lab = np.asarray(instances).astype(np.int64, copy=False)
    if not lab.any():
        return empty_table()
    n = int(lab.max())
    flat = lab.ravel()
    area = np.bincount(flat, minlength=n + 1).astype(np.float64)
    ids = np.flatnonzero(area[1:]) + 1  # labels present in the tile
    a = area[ids]
    hgt, wid = lab.shape
    yy, xx = np.mgrid[0:hgt, 0:wid]
    y, x = yy.ravel().astype(np.float64), xx.ravel().astype(np.float64)

    def mean_of(values: np.ndarray, labels: np.ndarray = flat) -> np.ndarray:
        return np.bincount(labels, weights=values, minlength=n + 1)[ids] / a

    cy, cx = mean_of(y), mean_of(x)
    # central second moments (per pixel, as regionprops' inertia tensor) -> eccentricity
    syy = np.maximum(mean_of(y * y) - cy * cy, 0.0)
    sxx = np.maximum(mean_of(x * x) - cx * cx, 0.0)
    sxy = mean_of(x * y) - cx * cy
    half_tr, det_root = (syy + sxx) / 2, np.sqrt(((syy - sxx) / 2) ** 2 + sxy ** 2)
    l1, l2 = half_tr + det_root, np.maximum(half_tr - det_root, 0.0)
    ecc = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / np.where(l1 > 0, l1, 1), 0, 1)), 0.0)

    hed = rgb2hed(tile)
    h_od, e_od = hed[..., 0].ravel(), hed[..., 1].ravel()
    h_mean = mean_of(h_od)
    h_std = np.sqrt(np.maximum(mean_of(h_od * h_od) - h_mean * h_mean, 0.0))
    # the ring: background pixels within RING_PX of a nucleus, each given to its nearest nucleus
    dist, (iy, ix) = ndimage.distance_transform_edt(lab == 0, return_indices=True)
    ring = (lab == 0) & (dist <= RING_PX)
    owner = np.where(ring, lab[iy, ix], 0).ravel()
    ring_n = np.bincount(owner, minlength=n + 1)[ids].astype(np.float64)
    ring_sum = np.bincount(owner, weights=e_od, minlength=n + 1)[ids]
    with np.errstate(invalid="ignore", divide="ignore"):
        e_ring = np.where(ring_n > 0, ring_sum / ring_n, np.nan)

    if types is not None:
        t = np.asarray(types).astype(np.int64, copy=False).ravel()
        counts = np.bincount(flat * 256 + t, minlength=(n + 1) * 256).reshape(n + 1, 256)[ids]
        typ = counts.argmax(axis=1)
    else:
        typ = np.full(len(ids), -1)

    boxes = ndimage.find_objects(lab)
    bbox = np.array([[b[0].start, b[1].start, b[0].stop, b[1].stop] for b in (boxes[i - 1] for i in ids)])
    solidity = np.array([_solidity(lab[boxes[i - 1]] == i, int(area[i])) for i in ids])
    return {k: np.asarray(v).astype(COLUMNS[k]) for k, v in {
        "tile": np.full(len(ids), tile_index), "instance": ids, "type": typ, "area_px": a,
        "area_um2": a * mpp * mpp, "centroid_y": cy, "centroid_x": cx,
        "bbox_y0": bbox[:, 0], "bbox_x0": bbox[:, 1], "bbox_y1": bbox[:, 2], "bbox_x1": bbox[:, 3],
        "eccentricity": ecc, "solidity": solidity, "h_od_mean": h_mean, "h_od_std": h_std,
        "e_ring_od_mean": e_ring}.items()}


def _solidity(mask: np.ndarray, area: int) -> float:
    """``area`` over the area of the convex hull of the pixel squares of ``mask``; 1 for a single pixel row
    or column (a rectangle is its own hull)."""
    from scipy.spatial import ConvexHull, QhullError

    h, w = mask.shape
    if h == 1 or w == 1:
        return 1.0
    rows = np.flatnonzero(mask.any(axis=1))
    m = mask[rows]
    left, right = m.argmax(axis=1), w - m[:, ::-1].argmax(axis=1)  # the hull needs each row's outer corners only
    corners = np.concatenate([np.stack([rows, left], 1), np.stack([rows + 1, left], 1),
                              np.stack([rows, right], 1), np.stack([rows + 1, right], 1)]).astype(np.float64)
    try:
        hull = ConvexHull(corners)
    except QhullError:
        return 1.0
    return float(min(area / hull.volume, 1.0))  # in 2-D, ``volume`` is the area


def concat_tables(tables: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows of several tables, in order."""
    if not tables:
        return empty_table()
    return {k: np.concatenate([t[k] for t in tables]).astype(v, copy=False) for k, v in COLUMNS.items()}
