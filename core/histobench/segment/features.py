"""Per-nucleus features of one segmented tile: the morphology and stain table the DiRL grouping clusters.

Shape comes from scikit-image's ``regionprops`` (area, centroid, bounding box, eccentricity, solidity). Stain
comes from colour deconvolution into haematoxylin, eosin and DAB optical densities with the Ruifrok-Johnston
matrix (``skimage.color.rgb2hed``; Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 2001): the mean and standard
deviation of the haematoxylin OD inside each nucleus, and the mean eosin OD in a ring of :data:`RING_PX` pixels
around it (pixels of other nuclei excluded), the cytoplasm and stroma next to the nucleus. These are the
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
    "e_ring_od_mean": "float32",  # NaN when the ring is empty (a nucleus surrounded by nuclei or the tile edge)
}


def empty_table() -> dict[str, np.ndarray]:
    return {k: np.zeros(0, dtype=v) for k, v in COLUMNS.items()}


def nucleus_features(tile: np.ndarray, instances: np.ndarray, types: np.ndarray | None, mpp: float,
                     tile_index: int) -> dict[str, np.ndarray]:
    """The feature table (column -> array, one row per nucleus, ordered by label) of one tile.

    ``tile`` is uint8 RGB [H, W, 3], ``instances`` the label map [H, W] (0 = background), ``types`` the type map
    or ``None``, ``mpp`` the tile's µm/px.
    """
    from scipy import ndimage
    from skimage.color import rgb2hed
    from skimage.measure import regionprops

    if not instances.any():
        return empty_table()
    hed = rgb2hed(tile)
    h_od, e_od = hed[..., 0], hed[..., 1]
    labelled = instances > 0
    hgt, wid = instances.shape
    ring_struct = np.ones((2 * RING_PX + 1, 2 * RING_PX + 1), dtype=bool)
    yy, xx = np.mgrid[-RING_PX:RING_PX + 1, -RING_PX:RING_PX + 1]
    ring_struct &= yy * yy + xx * xx <= RING_PX * RING_PX  # a disc of radius RING_PX
    rows: dict[str, list] = {k: [] for k in COLUMNS}
    for region in regionprops(instances.astype(np.int32, copy=False)):
        y0, x0, y1, x1 = region.bbox
        inside = region.image  # bool mask in the bbox
        h_vals = h_od[y0:y1, x0:x1][inside]
        # the ring: the nucleus dilated by a disc, inside a bbox padded by RING_PX, minus every nucleus
        py0, px0 = max(y0 - RING_PX, 0), max(x0 - RING_PX, 0)
        py1, px1 = min(y1 + RING_PX, hgt), min(x1 + RING_PX, wid)
        own = np.zeros((py1 - py0, px1 - px0), dtype=bool)
        own[y0 - py0:y1 - py0, x0 - px0:x1 - px0] = inside
        ring = ndimage.binary_dilation(own, structure=ring_struct) & ~labelled[py0:py1, px0:px1]
        e_ring = e_od[py0:py1, px0:px1][ring]
        if types is not None:
            t = np.bincount(types[y0:y1, x0:x1][inside].astype(np.int64)).argmax()
        else:
            t = -1
        cy, cx = region.centroid
        rows["tile"].append(tile_index)
        rows["instance"].append(region.label)
        rows["type"].append(t)
        rows["area_px"].append(region.area)
        rows["area_um2"].append(region.area * mpp * mpp)
        rows["centroid_y"].append(cy)
        rows["centroid_x"].append(cx)
        rows["bbox_y0"].append(y0)
        rows["bbox_x0"].append(x0)
        rows["bbox_y1"].append(y1)
        rows["bbox_x1"].append(x1)
        rows["eccentricity"].append(region.eccentricity)
        rows["solidity"].append(_solidity(region))
        rows["h_od_mean"].append(h_vals.mean())
        rows["h_od_std"].append(h_vals.std())
        rows["e_ring_od_mean"].append(e_ring.mean() if e_ring.size else np.nan)
    return {k: np.asarray(v, dtype=COLUMNS[k]) for k, v in rows.items()}


def _solidity(region) -> float:
    """Area over convex area; 1 for regions too small or too thin for a convex hull (1-2 pixel lines)."""
    try:
        return float(region.solidity)
    except Exception:  # noqa: BLE001 - qhull refuses degenerate (collinear) point sets
        return 1.0


def concat_tables(tables: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows of several tables, in order."""
    if not tables:
        return empty_table()
    return {k: np.concatenate([t[k] for t in tables]).astype(v, copy=False) for k, v in COLUMNS.items()}
