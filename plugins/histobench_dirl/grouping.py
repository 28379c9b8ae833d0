"""Nuclei -> the K-channel cell prior of DiRL (Kapse et al., arXiv 2309.06439; reconstruction "DiRL-R",
spec ``shared/methods/dirl.md`` §2.2 and §3.2).

Every pixel of a tile gets one of K groups; group 0 is "no nucleus" (stroma, lumen, cytoplasm) and the
others are kinds of nuclei. Three groupings, chosen with the pretext option ``grouping``:

* ``types``: the segmenter's cell types (the synthetic ``oracle``: 1 tumour, 2 lymphocyte, 3 fibroblast;
  HoVer-Net/PanNuke: 1..5), one group per listed type id; a type not listed joins group 0. K = types + 1.
* ``morphology`` (G1, the spec's default for type-free segmenters such as StarDist): k-means with C clusters on
  standardised per-nucleus features of the segmentation cache's table (:data:`FEATURES`: area in µm²,
  eccentricity, solidity, haematoxylin OD mean and std, eosin OD in the ring around the nucleus), fitted
  once on at most ``max_nuclei`` nuclei sampled from the pretraining cohort with a fixed seed. Clusters are
  ordered by (mean area, mean H-OD) so that ids are stable; if one holds less than ``min_fraction`` of the
  nuclei, C = 2 is fitted instead. The fit is a JSON file (features, scaler mean and std, centres, C, sizes)
  next to the segmentation cache, with its sha256 in a ``.sha256`` file beside it; a file whose hash does not
  match is refused with a one-line error naming it. K = C + 1. These are pseudo-types, not cell classes.
* ``binary`` (G2, the ablation): nucleus vs none. K = 2.

Changing the grouping never re-segments: it reads the per-nucleus table the segmentation stage wrote. The
group of every nucleus of a slide is cached per slide (``<segmentation root>/groups/<grouping id>/<slide>.npz``,
checked against a fingerprint of the slide's nucleus table); :class:`GroupLookup` turns those into a
``[tiles, max instance + 1]`` table on the training device, indexed by the batch's global tile row, so the
group map of a batch is one gather.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from histobench.errors import HistobenchError

if TYPE_CHECKING:  # pragma: no cover
    import torch

FEATURES = ("area_um2", "eccentricity", "solidity", "h_od_mean", "h_od_std", "e_ring_od_mean")
GROUPINGS = ("types", "morphology", "binary")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------- k-means (G1)


@dataclass
class MorphologyModel:
    """The fitted G1 pseudo-types: a standardiser and ``C`` ordered k-means centres in standardised units."""

    features: tuple[str, ...]
    mean: np.ndarray  # [F]
    std: np.ndarray  # [F]
    centres: np.ndarray  # [C, F], standardised, ordered by (mean area, mean H-OD)
    seed: int = 0
    n_fit: int = 0
    sizes: list[float] = field(default_factory=list)  # fraction of the fitted nuclei per cluster
    refit: bool = False  # True when the first fit had a cluster under min_fraction and C was lowered

    @property
    def n_clusters(self) -> int:
        return int(len(self.centres))

    def matrix(self, table: dict[str, np.ndarray]) -> np.ndarray:
        """Standardised ``[N, F]`` features of a nucleus table; a missing value (an empty eosin ring) is the mean."""
        x = np.stack([np.asarray(table[f], dtype=np.float64) for f in self.features], axis=1)
        x = np.where(np.isfinite(x), x, self.mean)
        return (x - self.mean) / self.std

    def predict(self, table: dict[str, np.ndarray]) -> np.ndarray:
        """Cluster id ``0..C-1`` of every row of ``table``."""
        if len(table[self.features[0]]) == 0:
            return np.zeros(0, np.int64)
        x = self.matrix(table)
        d = ((x[:, None, :] - self.centres[None]) ** 2).sum(-1)
        return d.argmin(1)

    def to_json(self) -> str:
        return json.dumps({"kind": "histobench-dirl-morphology", "features": list(self.features),
                           "mean": self.mean.tolist(), "std": self.std.tolist(), "centres": self.centres.tolist(),
                           "C": self.n_clusters, "seed": self.seed, "n_fit": self.n_fit, "sizes": self.sizes,
                           "refit": self.refit}, sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "MorphologyModel":
        d = json.loads(text)
        return cls(tuple(d["features"]), np.asarray(d["mean"]), np.asarray(d["std"]), np.asarray(d["centres"]),
                   int(d["seed"]), int(d["n_fit"]), list(d["sizes"]), bool(d.get("refit", False)))


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50, restarts: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding; the best of ``restarts`` by inertia. Returns ``(centres, labels)``."""
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    n = len(x)
    for _ in range(restarts):
        centres = [x[rng.integers(n)]]
        for _ in range(1, k):
            d = np.min(((x[:, None] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
            p = d / d.sum() if d.sum() > 0 else np.full(n, 1.0 / n)
            centres.append(x[rng.choice(n, p=p)])
        c = np.asarray(centres, dtype=np.float64)
        for _ in range(iters):
            labels = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
            new = np.array([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
            if np.allclose(new, c):
                break
            c = new
        labels = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        inertia = float(((x - c[labels]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, c, labels)
    return best[1], best[2]


def fit_morphology(table: dict[str, np.ndarray], n_clusters: int = 3, max_nuclei: int = 200_000, seed: int = 0,
                   min_fraction: float = 0.02, features: Sequence[str] = FEATURES) -> MorphologyModel:
    """Fit G1 on a nucleus table (columns of :mod:`histobench.segment.features`): ≤ ``max_nuclei`` rows sampled
    with ``seed``, features standardised, k-means with ``n_clusters`` (2 when a cluster holds < ``min_fraction``)."""
    n = len(table[features[0]])
    if n < n_clusters:
        raise HistobenchError(f"grouping=morphology needs at least {n_clusters} nuclei to fit {n_clusters} "
                              f"pseudo-types, the segmentation has {n}; use -o pretext.grouping=binary")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=max_nuclei, replace=False)) if n > max_nuclei else np.arange(n)
    raw = np.stack([np.asarray(table[f], dtype=np.float64)[rows] for f in features], axis=1)
    mean = np.nanmean(raw, axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    raw = np.where(np.isfinite(raw), raw, mean)
    std = raw.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    x = (raw - mean) / std
    refit = False
    c = n_clusters
    while True:
        centres, labels = kmeans(x, c, seed)
        sizes = np.bincount(labels, minlength=c) / len(x)
        if sizes.min() >= min_fraction or c <= 2:
            break
        c, refit = 2, True
    area, hod = features.index("area_um2"), features.index("h_od_mean")
    # order by (mean area, mean H-OD) in raw units, so that ids do not depend on the k-means start
    raw_centres = centres * std + mean
    order = np.lexsort((raw_centres[:, hod], raw_centres[:, area]))
    return MorphologyModel(tuple(features), mean, std, centres[order], seed, int(len(rows)),
                           [float(v) for v in sizes[order]], refit)


def read_model(path: Path) -> MorphologyModel:
    """Load a fitted G1 file, checking it against its ``.sha256``; a mismatch is a one-line error naming the file."""
    path = Path(path)
    digest_path = path.with_name(path.name + ".sha256")
    data = path.read_bytes()
    expected = digest_path.read_text().split()[0] if digest_path.exists() else ""
    if _sha256(data) != expected:
        raise HistobenchError(f"grouping file {path} does not match its hash in {digest_path.name}; it was edited or "
                              f"damaged: delete both files to fit the grouping again")
    try:
        return MorphologyModel.from_json(data.decode())
    except Exception as err:  # noqa: BLE001
        raise HistobenchError(f"grouping file {path} is not a DiRL morphology grouping: {err}") from None


def write_model(model: MorphologyModel, path: Path) -> str:
    """Write ``model`` and its sha256 (atomically); returns the hash."""
    path = Path(path)
    data = model.to_json().encode()
    digest = _sha256(data)
    for p, content in ((path, data), (path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n".encode())):
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_bytes(content)
        os.replace(tmp, p)
    return digest


# ------------------------------------------------------------------------------------------ grouping


@dataclass
class Grouping:
    """How nuclei become groups: ``mode`` (:data:`GROUPINGS`), the listed ``types`` (``types`` mode) and the fitted
    ``model`` (``morphology``). ``n_groups`` is K, group 0 being "no nucleus"; ``names`` label the groups."""

    mode: str
    types: tuple[int, ...] = (1, 2, 3)
    model: MorphologyModel | None = None
    model_hash: str = ""

    @property
    def n_groups(self) -> int:
        if self.mode == "types":
            return len(self.types) + 1
        if self.mode == "binary":
            return 2
        return self.model.n_clusters + 1

    @property
    def names(self) -> list[str]:
        if self.mode == "types":
            return ["none"] + [f"type-{t}" for t in self.types]
        if self.mode == "binary":
            return ["none", "nucleus"]
        return ["none"] + [f"pseudo-{c}" for c in range(self.model.n_clusters)]

    @property
    def needs_table(self) -> bool:
        """Whether groups come from the nucleus table (``morphology``) rather than from the pixel maps."""
        return self.mode == "morphology"

    def identity(self) -> str:
        """What the group of a nucleus depends on (besides the segmentation): the grouping cache key."""
        if self.mode == "types":
            return "types-" + "-".join(str(t) for t in self.types)
        if self.mode == "binary":
            return "binary"
        return f"morphology-C{self.model.n_clusters}-{self.model_hash[:12]}"

    def type_lut(self) -> np.ndarray:
        """``[256]`` type id -> group (``types`` mode; unlisted types -> 0)."""
        lut = np.zeros(256, np.int64)
        for g, t in enumerate(self.types, start=1):
            lut[int(t)] = g
        return lut

    def nucleus_groups(self, table: dict[str, np.ndarray]) -> np.ndarray:
        """Group id (1..K-1, or 0 for an unlisted type) of every row of a nucleus table."""
        n = len(table["tile"])
        if self.mode == "binary":
            return np.ones(n, np.int64)
        if self.mode == "types":
            return self.type_lut()[np.clip(np.asarray(table["type"], np.int64), 0, 255)]
        return self.model.predict(table) + 1

    def pixel_groups(self, instances: "torch.Tensor", types: "torch.Tensor") -> "torch.Tensor":
        """Group map ``[B, H, W]`` long from the pixel maps (``types`` and ``binary`` only)."""
        import torch

        if self.mode == "binary":
            return (instances > 0).long()
        if self.mode == "types":
            lut = torch.as_tensor(self.type_lut(), device=types.device)
            return torch.where(instances > 0, lut[types.long()], torch.zeros_like(lut[types.long()]))
        raise ValueError("morphology groups come from the nucleus table (GroupLookup)")


def model_path(root: Path, slide_ids: Sequence[str], n_clusters: int, max_nuclei: int, seed: int,
               min_fraction: float) -> Path:
    """Where the G1 fit of this cohort and setting lives, next to the segmentation cache ``root``."""
    key = _sha256(json.dumps({"slides": sorted(slide_ids), "C": n_clusters, "max": max_nuclei, "seed": seed,
                              "min_fraction": min_fraction, "features": list(FEATURES)}, sort_keys=True).encode())
    return Path(root) / f"grouping-morphology-{key[:16]}.json"


def cohort_table(root: Path, slide_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """The nucleus tables of ``slide_ids`` from the segmentation cache at ``root``, concatenated."""
    from histobench.segment import SegmentationCache
    from histobench.segment.cache import empty_table

    cache = SegmentationCache(root)
    tables = []
    for s in slide_ids:
        if s not in cache:
            raise HistobenchError(f"slide {s} has no segmentation in {cache.root}; run histobench segment")
        with cache.slide(s) as seg:
            tables.append(seg.table)
    if not tables:
        return empty_table()
    return {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}


def make_grouping(mode: str, root: str | os.PathLike[str] | None = None, slide_ids: Sequence[str] = (),
                  types: Sequence[int] = (1, 2, 3), n_clusters: int = 3, max_nuclei: int = 200_000, seed: int = 0,
                  min_fraction: float = 0.02, reporter: Any = None) -> Grouping:
    """The :class:`Grouping` of a run. ``morphology`` loads the cohort's fit from next to the segmentation cache
    ``root`` (checking its hash) or fits it once there."""
    if mode not in GROUPINGS:
        raise HistobenchError(f"unknown grouping {mode!r}; choose one of {', '.join(GROUPINGS)}")
    if mode != "morphology":
        return Grouping(mode, tuple(int(t) for t in types))
    if not root:
        raise HistobenchError("grouping=morphology needs the segmentation cache (the segmentation stage's root); "
                              "use -o pretext.grouping=types or binary without one")
    path = model_path(Path(root), slide_ids, n_clusters, max_nuclei, seed, min_fraction)
    if path.exists():
        model = read_model(path)
        digest = _sha256(path.read_bytes())
    else:
        model = fit_morphology(cohort_table(Path(root), slide_ids), n_clusters, max_nuclei, seed, min_fraction)
        digest = write_model(model, path)
        if reporter is not None:
            sizes = ", ".join(f"{100 * v:.1f}%" for v in model.sizes)
            note = f" (refit with C=2: a cluster held < {100 * min_fraction:g}%)" if model.refit else ""
            reporter.info(f"DiRL grouping: {model.n_clusters} morphology pseudo-types fitted on {model.n_fit} nuclei "
                          f"({sizes}){note}; saved to {path}")
    return Grouping(mode, tuple(int(t) for t in types), model, digest)


# ----------------------------------------------------------------------------------- per-slide cache


def _table_fingerprint(seg) -> str:
    h = hashlib.sha256(str(seg.meta.get("identity")).encode())
    for k in ("tile", "instance", "type", "area_px"):
        h.update(np.ascontiguousarray(seg._file_table[k]).tobytes())
    return h.hexdigest()


def slide_groups(root: str | os.PathLike[str], slide_id: str, grouping: Grouping) -> tuple[dict[str, np.ndarray], bool]:
    """The group of every nucleus of one slide (file tile row, instance, group) and whether it came from the
    per-slide group cache (``<root>/groups/<grouping id>/<slide>.npz``, checked against the nucleus table)."""
    from histobench.segment import SegmentationCache

    cache = SegmentationCache(root)
    if slide_id not in cache:
        raise HistobenchError(f"slide {slide_id} has no segmentation in {cache.root}; run histobench segment")
    with cache.slide(slide_id) as seg:
        fingerprint = _table_fingerprint(seg)
        path = Path(root) / "groups" / grouping.identity() / f"{slide_id}.npz"
        if path.exists():
            try:
                with np.load(path) as z:
                    if str(z["fingerprint"]) == fingerprint:
                        return {"tile": z["tile"], "instance": z["instance"], "group": z["group"]}, True
            except Exception:  # noqa: BLE001 - a damaged entry is recomputed
                pass
        table = seg._file_table
        out = {"tile": np.asarray(table["tile"], np.int64), "instance": np.asarray(table["instance"], np.int64),
               "group": grouping.nucleus_groups(table).astype(np.int64)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, fingerprint=np.array(fingerprint), **out)
    os.replace(tmp, path)
    return out, False


def slide_rows(n_file: int, n_used: int, seed: int) -> np.ndarray:
    """The file rows of a slide's training tiles: all of them, or the pipeline's cap (``select_tiles``: a sorted
    random subset drawn with the run seed) when the training loop uses fewer tiles than the file holds."""
    if n_used == n_file:
        return np.arange(n_file, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_file, size=n_used, replace=False)).astype(np.int64)


class GroupLookup:
    """Per-nucleus groups of the training tiles as a ``[tiles, max instance + 1]`` table on the device.

    Built from the dataset the loop trains on (its ``slide_index``/``tile_index`` and, to check the alignment,
    its ``instances``) and the segmentation cache; :meth:`__call__` maps a batch to its group map.
    """

    def __init__(self, root: str | os.PathLike[str], slide_ids: Sequence[str], dataset: Any, grouping: Grouping,
                 device: "torch.device | str", seed: int = 0):
        import torch

        from histobench.segment import SegmentationCache

        slide_index = np.asarray(dataset.slide_index, dtype=np.int64)
        tile_index = np.asarray(dataset.tile_index, dtype=np.int64)
        n_slides = len(slide_ids)
        counts = np.bincount(slide_index, minlength=n_slides)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        cache = SegmentationCache(root)
        per_slide, self.hits = [], 0
        max_inst = 0
        for s, sid in enumerate(slide_ids):
            groups, hit = slide_groups(root, sid, grouping)
            self.hits += int(hit)
            with cache.slide(sid) as seg:
                n_file = int(seg.meta["n_tiles"])
            rows = slide_rows(n_file, int(counts[s]), seed)
            pos = np.full(n_file, -1, np.int64)
            pos[rows] = np.arange(len(rows))
            keep = pos[groups["tile"]] >= 0
            per_slide.append((pos[groups["tile"][keep]], groups["instance"][keep], groups["group"][keep]))
            if keep.any():
                max_inst = max(max_inst, int(groups["instance"][keep].max()))
        lut = np.zeros((len(slide_index), max_inst + 1), np.uint8)
        for s, (t, i, g) in enumerate(per_slide):
            lut[self.offsets[s] + t, i] = g
        self._check_alignment(dataset, slide_index, tile_index, lut, slide_ids)
        self.lut = torch.as_tensor(lut, device=device)
        self.device_offsets = torch.as_tensor(self.offsets, device=device)

    def _check_alignment(self, dataset, slide_index, tile_index, lut, slide_ids) -> None:
        inst = getattr(dataset, "instances", None)
        if inst is None:
            return
        rows = self.offsets[slide_index] + tile_index
        n = min(len(rows), 64)  # a sample of tiles: every nucleus in the maps must be in the table
        for j in np.linspace(0, len(rows) - 1, n).astype(int):
            m = int(np.asarray(inst[j]).max())
            if m >= lut.shape[1] or (m > 0 and lut[rows[j], m] == 0):
                raise HistobenchError(f"the segmentation cache's nucleus table does not match the training tiles of "
                                      f"slide {slide_ids[slide_index[j]]} (tile {tile_index[j]}); run histobench "
                                      f"segment again")

    def __call__(self, instances: "torch.Tensor", slide_index: "torch.Tensor", tile_index: "torch.Tensor") -> "torch.Tensor":
        """Group map ``[B, H, W]`` long of a batch (instance ids beyond the table are group 0)."""
        import torch

        rows = self.device_offsets[slide_index.long()] + tile_index.long()
        inst = instances.long().clamp(0, self.lut.shape[1] - 1)
        table = self.lut[rows]  # [B, I]
        return torch.gather(table, 1, inst.flatten(1)).view_as(inst).long()
