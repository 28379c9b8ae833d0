"""Nuclei segmenters for DiRL's cell prior: ``hed-watershed`` (no weights) and ``stardist`` (StarDist 2D).

DiRL (Kapse et al., arXiv 2309.06439) builds its dense pretext on a nuclei segmentation of every training
tile; the authors' lab uses HoVer-Net. This plugin implements the reconstruction "DiRL-R" of
``shared/methods/dirl.md``, whose harness segmenter is StarDist (§3.2), with a classical fallback:

* :class:`HEDWatershedSegmenter` (``hed-watershed``): colour deconvolution into haematoxylin, eosin and DAB
  optical densities with the Ruifrok-Johnston matrix (``skimage.color.rgb2hed``; Ruifrok & Johnston, Anal.
  Quant. Cytol. Histol. 2001), a Gaussian-smoothed haematoxylin channel thresholded by Otsu's method (or a
  percentile) above a fixed optical-density floor, then a marker-controlled watershed on the distance
  transform (one marker per distance peak) that splits touching nuclei, and small-object removal. Sizes are
  options in µm and µm², converted with the tile's µm/px (``TileRef.mpp``). No weights: it runs on any H&E.
* :class:`StarDistSegmenter` (``stardist``): star-convex polygons (Schmidt et al., MICCAI 2018) with the
  pretrained ``2D_versatile_he`` model (trained on 40x H&E: MoNuSeg 2018 and TNBC) or a local model folder.
  Input is normalised per tile by the (1, 99.8) percentiles over all channels, as the model expects; a tile
  whose percentile range is under ``min_contrast`` grey levels is blank (normalising it would stretch JPEG
  noise into "nuclei", which a tiny model duly finds). The ``scale`` option resizes the tile before
  prediction (2.0 for 20x, ~0.5 µm/px tiles, so that nuclei have the size the model was trained on) and
  StarDist maps the labels back to the tile. TensorFlow is the optional extra ``histobench[stardist]``; the
  segmenter runs in its own spawned process, never next to torch's triton.

:func:`overlay` draws instance outlines on a tile, for looking at either segmenter's output.

Neither segmenter gives cell types (``types`` is ``None``): the DiRL grouping derives pseudo-types from the
per-nucleus morphology table the segmentation stage computes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from histobench.components import Segmenter, TileRef
from histobench.errors import HistobenchError

DEFAULT_MPP = 0.5  # µm/px assumed when segment() gets no TileRef (20x)
STARDIST_EXTRA = "pip install 'histobench[stardist]'"


def _relabel(labels: np.ndarray, min_area: int = 0) -> np.ndarray:
    """Labels renumbered 1..n in order of their old ids, dropping those under ``min_area`` pixels."""
    lab = np.asarray(labels).astype(np.int64, copy=False)
    if not lab.any():
        return np.zeros(lab.shape, np.uint16)
    ids, inverse, counts = np.unique(lab, return_inverse=True, return_counts=True)
    keep = (ids > 0) & (counts >= max(int(min_area), 1))
    if int(keep.sum()) > 0xFFFF:
        raise ValueError(f"{int(keep.sum())} nuclei in one tile, more than the 65535 the cache can store")
    new = np.cumsum(keep) * keep
    return new[inverse.reshape(lab.shape)].astype(np.uint16)


def overlay(tile: np.ndarray, instances: np.ndarray, color: tuple[int, int, int] = (0, 255, 0)) -> np.ndarray:
    """``tile`` (uint8 RGB [H, W, 3]) with the outline of each nucleus of ``instances`` ([H, W] labels, 0 =
    none) drawn in ``color``; a new uint8 array of the tile's shape."""
    from skimage.segmentation import find_boundaries

    img = np.asarray(tile)
    lab = np.asarray(instances)
    if img.ndim != 3 or img.shape[2] != 3 or lab.shape != img.shape[:2]:
        raise ValueError(f"overlay needs a [H, W, 3] tile and [H, W] labels, got {img.shape} and {lab.shape}")
    out = img.astype(np.uint8, copy=True)
    out[find_boundaries(lab, mode="inner")] = np.asarray(color, dtype=np.uint8)
    return out


# ------------------------------------------------------------------------------------------ hed-watershed
class HEDWatershedSegmenter(Segmenter):
    """Nuclei from the haematoxylin channel (HED colour deconvolution) and a distance-transform watershed."""

    name = "hed-watershed"
    version = "1"

    class Options(Segmenter.Options):
        mpp: float = Field(DEFAULT_MPP, gt=0, description="µm/px assumed when a tile comes without its TileRef "
                                                           "(the tile's own µm/px is used otherwise).")
        smooth_um: float = Field(0.5, ge=0, description="Sigma of the Gaussian smoothing of the haematoxylin "
                                                        "channel, µm (0: none).")
        threshold: Literal["otsu", "percentile", "fixed"] = Field(
            "otsu", description="Foreground threshold on the smoothed haematoxylin OD: Otsu's over the tile, "
                                "the `percentile` of the tile's values, or `min_od` alone (fixed).")
        percentile: float = Field(85.0, gt=0, lt=100, description="Percentile for threshold=percentile.")
        min_od: float = Field(0.08, ge=0, description="Floor of the threshold (rgb2hed haematoxylin units): a "
                                                     "tile of stroma or glass alone gives no nuclei.")
        max_od: float = Field(0.15, gt=0, description="Cap of Otsu's and the percentile threshold (rgb2hed "
                                                      "haematoxylin units): a tile of many dark nuclei keeps its "
                                                      "paler ones.")
        min_area_um2: float = Field(8.0, ge=0, description="Nuclei smaller than this (µm²) are dropped.")
        min_distance_um: float = Field(2.5, gt=0, description="Smallest distance between two nucleus centres "
                                                              "(watershed markers), µm.")
        fill_holes: bool = Field(True, description="Fill holes in the foreground before the watershed.")

    def segment(self, tile: np.ndarray, ref: TileRef | None = None) -> tuple[np.ndarray, None]:
        from scipy import ndimage as ndi
        from skimage.color import rgb2hed
        from skimage.feature import peak_local_max
        from skimage.filters import gaussian, threshold_otsu
        from skimage.segmentation import watershed

        o = self.options
        img = np.asarray(tile)
        if img.ndim != 3 or img.shape[2] < 3:
            raise ValueError(f"expected an RGB tile [H, W, 3], got shape {img.shape}")
        mpp = float(ref.mpp) if ref is not None and ref.mpp and ref.mpp > 0 else o.mpp
        hem = rgb2hed(img[..., :3])[..., 0]
        if o.smooth_um > 0:
            hem = gaussian(hem, sigma=o.smooth_um / mpp, preserve_range=True)
        if float(hem.max() - hem.min()) <= 1e-6:  # a flat tile (glass, a uniform colour) has no nuclei
            return np.zeros(img.shape[:2], np.uint16), None
        if o.threshold == "otsu":
            thr = threshold_otsu(hem)
        elif o.threshold == "percentile":
            thr = float(np.percentile(hem, o.percentile))
        else:
            thr = o.min_od
        mask = hem > max(min(float(thr), o.max_od), o.min_od)
        if o.fill_holes:
            mask = ndi.binary_fill_holes(mask)
        min_area = int(round(o.min_area_um2 / (mpp * mpp)))
        if not mask.any():
            return np.zeros(img.shape[:2], np.uint16), None

        components, n = ndi.label(mask)
        dist = ndi.distance_transform_edt(mask)
        min_dist = max(1, int(round(o.min_distance_um / mpp)))
        peaks = peak_local_max(dist, min_distance=min_dist, labels=components, exclude_border=False)
        markers = np.zeros(mask.shape, np.int64)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        # a component without a peak (a thin sliver) keeps one marker at its deepest pixel
        has = np.zeros(n + 1, bool)
        has[components[tuple(peaks.T)]] = True
        missing = np.flatnonzero(~has[1:]) + 1
        if len(missing):
            where = ndi.maximum_position(dist, components, missing)
            for k, (y, x) in enumerate(where):
                markers[y, x] = len(peaks) + 1 + k
        labels = watershed(-dist, markers, mask=mask)
        return _relabel(labels, min_area), None


# ------------------------------------------------------------------------------------------------ stardist
def stardist_missing() -> str | None:
    """A one-line reason when StarDist or TensorFlow is not installed (found without importing them), else None."""
    from importlib.util import find_spec

    for module in ("stardist", "tensorflow"):
        try:
            found = find_spec(module) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken install
            found = False
        if not found:
            return f"the stardist segmenter needs StarDist and TensorFlow ({module} is not installed): {STARDIST_EXTRA}"
    return None


def _model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix in (".h5", ".keras") or p.name in
                                                                    ("config.json", "thresholds.json")))


class StarDistSegmenter(Segmenter):
    """StarDist 2D nuclei (pretrained 2D_versatile_he, or a local model); TensorFlow extra, own process."""

    name = "stardist"
    version = "1"
    own_process = True

    class Options(Segmenter.Options):
        model: str = Field("2D_versatile_he", description="StarDist pretrained model name (fetched once into "
                                                            "~/.keras/models; needs the network the first time).")
        model_dir: str | None = Field(None, description="A local StarDist model folder (config.json and weights); "
                                                        "used instead of `model`.")
        scale: float = Field(2.0, gt=0, description="Resize factor before prediction, labels mapped back: tile "
                                                    "µm/px / 0.25 (2.0 for 20x tiles, 1.0 for 40x).")
        prob_thresh: float | None = Field(None, gt=0, lt=1, description="Object probability threshold "
                                                                        "(default: the model's).")
        nms_thresh: float | None = Field(None, gt=0, lt=1, description="Overlap threshold of the non-maximum "
                                                                       "suppression (default: the model's).")
        norm_low: float = Field(1.0, ge=0, lt=100, description="Lower percentile of the per-tile normalisation.")
        norm_high: float = Field(99.8, gt=0, le=100, description="Upper percentile of the per-tile normalisation.")
        min_contrast: float = Field(20.0, ge=0, description="A tile whose percentile range (grey levels, 0-255) is "
                                                            "narrower is blank: no nuclei, the model is not run "
                                                            "(normalising it would stretch noise into nuclei).")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._model = None

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this segmenter cannot run here with its default options, or None; imports nothing. Either the
        extra is not installed, or the pretrained model is not in the Keras cache (it would need the network)."""
        missing = stardist_missing()
        if missing:
            return missing
        name = cls.Options().model
        cached = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "models" / "StarDist2D" / name
        if not (cached / f"{name}.zip").is_file():
            return (f"the pretrained StarDist model {name} is not in the Keras cache ({cached}) and would need the "
                    f"network; a local model works offline: -o segmenter.model_dir=PATH")
        return None

    def _model_folder(self) -> Path | None:
        if self.options.model_dir is None:
            return None
        folder = Path(self.options.model_dir).expanduser()
        if not folder.is_dir():
            raise HistobenchError(f"stardist: model folder {folder} does not exist (-o segmenter.model_dir=PATH names "
                                  f"a StarDist model folder with config.json and weights)")
        if not (folder / "config.json").is_file():
            raise HistobenchError(f"stardist: {folder} has no config.json, so it is not a StarDist model folder "
                                  f"(-o segmenter.model_dir=PATH)")
        return folder

    def identity(self) -> str:
        """Options, and for a local model the content of its config and weights (retraining into the same
        folder changes the masks, so it must change the cache key)."""
        base = super().identity()
        folder = self._model_folder()
        if folder is None:
            return base
        digest = hashlib.sha256()
        for p in _model_files(folder):
            digest.update(p.name.encode())
            digest.update(p.read_bytes())
        return f"{base}-w{digest.hexdigest()[:8]}"

    def setup(self) -> None:
        folder = self._model_folder()
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        try:
            from stardist.models import StarDist2D
        except ImportError as err:
            raise HistobenchError(f"the stardist segmenter needs StarDist and TensorFlow ({err}): "
                                  f"{STARDIST_EXTRA}") from None
        if folder is not None:
            try:
                self._model = StarDist2D(None, name=folder.name, basedir=str(folder.parent))
            except Exception as err:  # noqa: BLE001 - a damaged folder or weights of another model
                raise HistobenchError(f"stardist: cannot load the model in {folder}: {type(err).__name__}: "
                                      f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from None
            return
        try:
            model = StarDist2D.from_pretrained(self.options.model)
        except Exception as err:  # noqa: BLE001 - offline, a proxy, a partial download
            why = " ".join(str(err).split())[:160] or type(err).__name__
            raise HistobenchError(f"stardist: the pretrained model {self.options.model!r} cannot be fetched "
                                  f"({why}); download it on a machine with network access or set "
                                  f"-o segmenter.model_dir=PATH to a local model folder") from None
        if model is None:  # StarDist prints its list of names and returns None for an unknown one
            raise HistobenchError(f"stardist: no pretrained model named {self.options.model!r} (e.g. "
                                  f"2D_versatile_he); or set -o segmenter.model_dir=PATH")
        self._model = model

    def segment(self, tile: np.ndarray, ref: TileRef | None = None) -> tuple[np.ndarray, None]:
        o = self.options
        img = np.asarray(tile)[..., :3].astype(np.float32)
        lo, hi = np.percentile(img, [o.norm_low, o.norm_high])
        if hi - lo < o.min_contrast:  # glass or a flat colour: per-tile normalisation would invent nuclei
            return np.zeros(img.shape[:2], np.uint16), None
        if self._model is None:
            self.setup()
        from csbdeep.utils import normalize

        x = normalize(img, o.norm_low, o.norm_high, axis=(0, 1, 2))
        labels, _ = self._model.predict_instances(x, axes="YXC", scale=o.scale, prob_thresh=o.prob_thresh,
                                                  nms_thresh=o.nms_thresh, verbose=False,
                                                  show_tile_progress=False)
        return _relabel(labels), None
