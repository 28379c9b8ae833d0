"""Whole-slide image reading: a thin, typed wrapper around OpenSlide.

Everything the rest of histobench needs from a slide goes through :class:`Slide`: its pyramid geometry, its
level-0 resolution in µm/px, RGB regions (alpha composited on white) and thumbnails. OpenSlide is imported lazily,
inside :func:`open_slide`, so that importing this module costs nothing.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from histobench.errors import HistobenchError

# A TIFF resolution that converts to a pixel size outside this range (µm/px) is not a microscope's: scanners and
# image editors write 72 or 96 dpi by default. Such values are treated as "unknown" rather than trusted.
_PLAUSIBLE_MPP = (0.01, 100.0)


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite an RGBA uint8 array [h, w, 4] on white; fully transparent pixels become white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.size == 0 or alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.uint16)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class Slide:
    """An open whole-slide image. Create it with :func:`open_slide`; use it as a context manager or ``close()`` it."""

    def __init__(self, path: Path, handle: Any, mpp_override: float | None) -> None:
        self._path = path
        self._osr = handle
        self._mpp_override = mpp_override

    # -- identity and geometry -------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._path

    @property
    def slide_id(self) -> str:
        """The file name without its extension (``CMU-1-Small-Region.svs`` -> ``CMU-1-Small-Region``)."""
        return self._path.stem

    @property
    def _handle(self) -> Any:
        if self._osr is None:
            raise HistobenchError(f"slide {self._path} is closed")
        return self._osr

    @property
    def properties(self) -> dict[str, str]:
        """All OpenSlide properties (vendor-specific keys included) as a plain dict."""
        return dict(self._handle.properties)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 size as (width, height) in pixels."""
        return tuple(self._handle.dimensions)  # type: ignore[return-value]

    @property
    def level_count(self) -> int:
        return int(self._handle.level_count)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(d) for d in self._handle.level_dimensions)  # type: ignore[misc]

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._handle.level_downsamples)

    @property
    def vendor(self) -> str | None:
        """OpenSlide's format name (``aperio``, ``hamamatsu``, ``dicom``, ``generic-tiff``, ...)."""
        return self._handle.properties.get("openslide.vendor")

    @property
    def objective_power(self) -> float | None:
        value = self._handle.properties.get("openslide.objective-power")
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    @property
    def mpp(self) -> float:
        """Level-0 resolution in µm per pixel.

        Taken from, in this order:

        1. the ``mpp`` given to :func:`open_slide` (the CLI's ``--mpp``);
        2. OpenSlide's ``openslide.mpp-x`` / ``openslide.mpp-y`` (their mean when both are present);
        3. vendor keys OpenSlide did not normalise: ``aperio.MPP``, DICOM ``PixelSpacing`` (mm, so x1000);
        4. the TIFF resolution tags ``tiff.XResolution`` (and ``tiff.YResolution``) with ``tiff.ResolutionUnit``
           ``centimeter`` or ``inch``, when they give a plausible microscope resolution (0.01-100 µm/px).

        The objective power is never used to guess a pixel size: scanners differ too much (a "20x" scan is
        anything from 0.45 to 0.55 µm/px).

        Raises HistobenchError naming the slide when none of these is available.
        """
        if self._mpp_override is not None:
            return self._mpp_override
        props = self._handle.properties
        values = []
        for key in ("openslide.mpp-x", "openslide.mpp-y"):
            try:
                v = float(props[key])
            except (KeyError, ValueError):
                continue
            if math.isfinite(v) and v > 0:
                values.append(v)
        if values:
            return float(sum(values) / len(values))
        vendor_mpp = _mpp_from_vendor_keys(props)
        if vendor_mpp is not None:
            return vendor_mpp
        tiff_mpp = _mpp_from_tiff_resolution(props)
        if tiff_mpp is not None:
            return tiff_mpp
        raise HistobenchError(
            f"slide {self._path} has no pixel size (µm/px) in its metadata; pass it with --mpp (e.g. --mpp 0.25)"
        )

    @property
    def mpp_source(self) -> str:
        """Where :attr:`mpp` comes from (``--mpp``, a property name, ``tiff resolution``); ``unknown`` if nowhere."""
        if self._mpp_override is not None:
            return "--mpp"
        props = self._handle.properties
        if any(_positive(props.get(k)) for k in ("openslide.mpp-x", "openslide.mpp-y")):
            return "openslide.mpp-x/y"
        if _mpp_from_vendor_keys(props) is not None:
            return "aperio.MPP" if _positive(props.get("aperio.MPP")) else "dicom PixelSpacing"
        if _mpp_from_tiff_resolution(props) is not None:
            return "tiff resolution"
        return "unknown"

    @property
    def magnification(self) -> tuple[float | None, str]:
        """Objective power and where it came from: the slide's metadata (``openslide.objective-power``,
        ``aperio.AppMag``, ``hamamatsu.SourceLens``), else an estimate from the pixel size (10 / mpp, the usual
        0.25 µm/px = 40x convention, labelled ``estimated from µm/px``), else ``(None, "unknown")``."""
        props = self._handle.properties
        for key in ("openslide.objective-power", "aperio.AppMag", "hamamatsu.SourceLens"):
            v = _positive(props.get(key))
            if v:
                return v, key
        try:
            return round(10.0 / self.mpp, 1), "estimated from µm/px"
        except HistobenchError:
            return None, "unknown"

    @property
    def associated_images(self) -> dict[str, tuple[int, int]]:
        """Label, macro, thumbnail ... images stored beside the pyramid: name -> (width, height)."""
        return {name: tuple(img.size) for name, img in self._handle.associated_images.items()}  # type: ignore[misc]

    def colour_warning(self) -> str | None:
        """A reason to distrust the decoded colours, or None.

        Some DICOM WSI converters store JPEG frames whose pixels are YCbCr but label them
        ``PhotometricInterpretation RGB``; OpenSlide then hands back YCbCr values as RGB (white glass reads as
        about (240, 128, 128)). This is reported, never silently "fixed".
        """
        props = self._handle.properties
        if self.vendor != "dicom":
            return None
        photometric = props.get("dicom.PhotometricInterpretation", "")
        jpeg = props.get("dicom.TransferSyntaxUID", "").startswith("1.2.840.10008.1.2.4.5")
        if photometric != "RGB" or not jpeg:
            return None
        thumb, _ = self.thumbnail(128)
        px = thumb.reshape(-1, 3).astype(np.int16)
        bright = px[px[:, 0] > 200]
        if len(bright) < 0.1 * len(px):
            return None
        chroma = np.median(bright[:, 1:], axis=0)
        if np.all(np.abs(chroma - 128) <= 12):
            return ("colours look like YCbCr labelled RGB (JPEG frames with PhotometricInterpretation RGB; "
                    "background decodes as ~(240, 128, 128)); re-convert the slide or treat its colours as wrong")
        return None

    def info(self) -> dict[str, Any]:
        """A plain summary for ``histobench slides info``: vendor, levels, dimensions, µm/px, magnification."""
        try:
            mpp: float | None = self.mpp
        except HistobenchError:
            mpp = None
        mag, mag_source = self.magnification
        return {
            "path": str(self._path),
            "vendor": self.vendor,
            "levels": self.level_count,
            "dimensions": self.dimensions,
            "level_dimensions": self.level_dimensions,
            "level_downsamples": self.level_downsamples,
            "mpp": mpp,
            "mpp_source": self.mpp_source,
            "magnification": mag,
            "magnification_source": mag_source,
            "associated_images": self.associated_images,
            "colour_warning": self.colour_warning(),
        }

    # -- pixels ----------------------------------------------------------------------------------------------
    def read_region(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """Read a ``w`` x ``h`` region at pyramid ``level`` whose top-left is (x0, y0) in level-0 pixels.

        Returns uint8 RGB [h, w, 3]; transparent pixels (outside the scanned area) are white.
        """
        if not 0 <= level < self.level_count:
            raise HistobenchError(f"slide {self._path} has no level {level} (it has {self.level_count})")
        if w <= 0 or h <= 0:
            raise HistobenchError(f"cannot read an empty region ({w}x{h}) from slide {self._path}")
        try:
            img = self._handle.read_region((int(x0), int(y0)), int(level), (int(w), int(h)))
        except Exception as exc:  # openslide.OpenSlideError: a corrupt tile, for instance
            raise HistobenchError(f"cannot read region ({x0}, {y0}) of slide {self._path}: {exc}") from exc
        return _rgba_to_rgb(np.asarray(img))

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        """An RGB thumbnail whose longer side is at most ``max_side`` px.

        Returns ``(image, downsample)``: uint8 [h, w, 3] and the factor from level 0 to the thumbnail
        (level-0 width / thumbnail width). The thumbnail is read from the smallest pyramid level that is still at
        least as large, then area-resampled, so it is cheap even for large slides.
        """
        from PIL import Image

        if max_side <= 0:
            raise HistobenchError(f"thumbnail size must be positive, got {max_side}")
        w0, h0 = self.dimensions
        target = max(w0, h0) / max_side
        if target <= 1.0:
            return self.read_region(0, 0, 0, w0, h0), 1.0
        tw = max(1, int(round(w0 / target)))
        th = max(1, int(round(h0 / target)))
        level = int(self._handle.get_best_level_for_downsample(target))
        lw, lh = self.level_dimensions[level]
        region = self.read_region(0, 0, level, lw, lh)
        if (lw, lh) != (tw, th):
            region = np.asarray(Image.fromarray(region).resize((tw, th), Image.Resampling.BOX))
        return region, w0 / tw

    # -- lifetime --------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._osr is not None:
            self._osr.close()
            self._osr = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._osr is None else f"{self.dimensions[0]}x{self.dimensions[1]}, {self.level_count} levels"
        return f"Slide({str(self._path)!r}, {state})"


def _positive(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _mpp_from_vendor_keys(props: Any) -> float | None:
    v = _positive(props.get("aperio.MPP"))
    if v is not None:
        return v
    key = "dicom.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[{}]"
    spacing = [_positive(props.get(key.format(i))) for i in (0, 1)]
    spacing = [s * 1000.0 for s in spacing if s is not None]  # mm -> µm
    if spacing:
        mpp = sum(spacing) / len(spacing)
        lo, hi = _PLAUSIBLE_MPP
        return mpp if lo <= mpp <= hi else None
    return None


def _mpp_from_tiff_resolution(props: Any) -> float | None:
    unit = str(props.get("tiff.ResolutionUnit", "")).strip().lower()
    um_per_unit = {"centimeter": 1e4, "cm": 1e4, "inch": 25400.0, "in": 25400.0}.get(unit)
    if um_per_unit is None:
        return None
    values = []
    for key in ("tiff.XResolution", "tiff.YResolution"):
        try:
            res = float(props[key])
        except (KeyError, ValueError):
            continue
        if math.isfinite(res) and res > 0:
            values.append(um_per_unit / res)
    if not values:
        return None
    mpp = sum(values) / len(values)
    lo, hi = _PLAUSIBLE_MPP
    return mpp if lo <= mpp <= hi else None


def open_slide(path: str | os.PathLike[str], mpp: float | None = None) -> Slide:
    """Open a whole-slide image with OpenSlide.

    ``mpp`` overrides the level-0 pixel size (µm/px) found in the file's metadata (see :attr:`Slide.mpp`).
    ``path`` may be a DICOM WSI folder (one file per pyramid level): any ``.dcm`` file of it opens the whole
    pyramid, so the first one (by name) is used.
    Raises HistobenchError("cannot open slide <path>: <reason>") for a missing file or one OpenSlide cannot read.
    """
    p = Path(path)
    if mpp is not None:
        if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
            raise HistobenchError(f"cannot open slide {p}: mpp must be a positive number, got {mpp!r}")
        mpp = float(mpp)
    if not p.exists():
        raise HistobenchError(f"cannot open slide {p}: no such file")
    if p.is_dir():
        dcm = sorted(q for q in p.iterdir() if q.suffix.lower() == ".dcm" and q.is_file())
        if not dcm:
            raise HistobenchError(f"cannot open slide {p}: it is a folder without .dcm files (only DICOM WSI may be a folder)")
        return _open_file(dcm[0], mpp, shown=p)
    return _open_file(p, mpp, shown=p)


# The first bytes of formats that OpenSlide cannot read but that turn up in slide folders.
_SIGNATURES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
               (b"BM", "a BMP image"), (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive"))


def _describe_format(p: Path) -> str:
    """What the file looks like from its first bytes, for the one-line error: ``a PNG image``, ``text``, ..."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return "unreadable"
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return f"{p.suffix or 'no extension'} file holding {what}"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "a TIFF file OpenSlide cannot read; truncated or not tiled"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f"{p.suffix or 'no extension'} file holding text"
    return f"{p.suffix or 'no extension'} file of an unknown format"


def _open_file(p: Path, mpp: float | None, shown: Path) -> Slide:
    try:
        import openslide
    except ImportError as exc:  # pragma: no cover - openslide is a hard dependency
        raise HistobenchError(f"cannot open slide {p}: openslide is not installed ({exc})") from exc
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise HistobenchError(f"cannot open slide {shown}: {exc.strerror or exc}") from exc
    if size == 0:
        raise HistobenchError(f"cannot open slide {shown}: empty file (0 bytes)")
    try:
        handle = openslide.OpenSlide(str(p))
    except Exception as exc:  # OpenSlideUnsupportedFormatError, OpenSlideError, OSError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, openslide.OpenSlideUnsupportedFormatError):
            reason = f"unsupported or corrupt file format ({_describe_format(p)})"
        raise HistobenchError(f"cannot open slide {shown}: {reason}") from exc
    return Slide(shown, handle, mpp)
