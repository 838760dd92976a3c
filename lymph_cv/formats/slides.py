"""Whole-slide images through OpenSlide (``openslide-python`` with the ``openslide-bin`` wheel).

Aperio SVS, generic tiled TIFF and the other formats OpenSlide reads.  A file OpenSlide cannot
open is one :class:`~lymph_cv.errors.FormatError` line naming it.  Pixels come back as RGB uint8
with OpenSlide's transparent areas (outside the scanned region) composited onto white, so they look
like the glass background to tissue detection.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple, Union

from lymph_cv.errors import FormatError, InputError

if TYPE_CHECKING:  # numpy loads when pixels are read, not for `slides info`
    import numpy as np

PathLike = Union[str, os.PathLike]

#: Background value that transparent (unscanned) pixels become: white glass.
BACKGROUND = 255
#: Pixels of one band a low-resolution view is read in (16 Mpx: 64 MiB of RGBA, a few copies at most).
BAND_PIXELS = 16 * 1024 * 1024
#: OpenSlide's standard property names.
_VENDOR = "openslide.vendor"
_MPP_X = "openslide.mpp-x"
_MPP_Y = "openslide.mpp-y"
_OBJECTIVE = "openslide.objective-power"


@dataclass(frozen=True)
class SlideInfo:
    """What ``lymph-cv slides info`` reports about one slide."""

    path: str
    vendor: Optional[str]
    levels: int
    dimensions: Tuple[Tuple[int, int], ...]  # (width, height) per level, level 0 first
    downsamples: Tuple[float, ...]
    mpp_x: Optional[float]  # microns per pixel of level 0
    mpp_y: Optional[float]
    objective_power: Optional[float]
    associated_images: Tuple[str, ...]

    def to_dict(self) -> dict:
        info = asdict(self)
        info["dimensions"] = [list(size) for size in self.dimensions]
        info["downsamples"] = list(self.downsamples)
        info["associated_images"] = list(self.associated_images)
        return info


def open_slide(path: PathLike):
    """An ``openslide.OpenSlide`` of ``path``; a missing, unreadable or non-slide file is one line."""
    import openslide  # the native library loads here, not when the CLI starts

    path = Path(path)
    if not path.exists():
        raise InputError("no such slide file", path)
    if path.is_dir():
        raise InputError("is a folder; expected a slide file", path)
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror or exc})", path) from None
    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError as exc:
        raise FormatError(f"not a readable slide ({_reason(exc)})", path) from None
    if fmt is None:
        raise FormatError("not a slide OpenSlide can read (expected SVS, tiled TIFF, NDPI, MRXS, …)", path)
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError) as exc:
        raise FormatError(f"not a readable {fmt} slide ({_reason(exc)})", path) from None


def _reason(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _number(properties, key: str) -> Optional[float]:
    value = properties.get(key)
    if value in (None, ""):
        return None
    try:
        return float(value)
    except ValueError:
        return None  # a vendor's malformed field is reported as unknown, not as a broken slide


def slide_info(path: PathLike) -> SlideInfo:
    """Vendor, pyramid levels, microns per pixel and objective power of the slide at ``path``."""
    with open_slide(path) as slide:
        props = slide.properties
        return SlideInfo(
            path=os.fspath(path),
            vendor=props.get(_VENDOR),
            levels=slide.level_count,
            dimensions=tuple((int(w), int(h)) for w, h in slide.level_dimensions),
            downsamples=tuple(float(d) for d in slide.level_downsamples),
            mpp_x=_number(props, _MPP_X),
            mpp_y=_number(props, _MPP_Y),
            objective_power=_number(props, _OBJECTIVE),
            associated_images=tuple(sorted(slide.associated_images.keys())),
        )


def format_info(info: SlideInfo) -> str:
    """``slides info``'s text form: one field per line, one line per level."""
    def known(value) -> str:
        return "unknown" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    lines = [
        f"slide: {info.path}",
        f"vendor: {known(info.vendor)}",
        f"microns per pixel: {known(info.mpp_x)} x {known(info.mpp_y)}",
        f"objective power: {known(info.objective_power)}",
        f"levels: {info.levels}",
    ]
    for level, ((width, height), down) in enumerate(zip(info.dimensions, info.downsamples)):
        lines.append(f"  level {level}: {width} x {height} (downsample {down:g})")
    if info.associated_images:
        lines.append(f"associated images: {', '.join(info.associated_images)}")
    return "\n".join(lines) + "\n"


def rgb_of(region) -> np.ndarray:
    """An OpenSlide RGBA PIL image as RGB uint8, transparent pixels composited onto white."""
    import numpy as np

    rgba = np.asarray(region.convert("RGBA"), dtype=np.uint8)
    rgb = np.array(rgba[..., :3])
    alpha = rgba[..., 3]
    partial = alpha < 255
    if partial.any():  # most regions are wholly scanned: blend only the pixels that are not
        a = alpha[partial].astype(np.uint16)[:, None]
        # OpenSlide's PIL images are unpremultiplied RGBA: blend over white by alpha, rounded
        rgb[partial] = ((rgb[partial] * a + BACKGROUND * (255 - a) + 127) // 255).astype(np.uint8)
    return rgb


def level_for_side(slide, max_side: int) -> int:
    """The lowest-resolution level whose longer side is still at least ``max_side`` (level 0 when
    the slide itself is smaller): the least to read for a view ``max_side`` pixels long."""
    chosen = 0
    for level, (width, height) in enumerate(slide.level_dimensions):
        if max(width, height) >= max_side:
            chosen = level
    return chosen


def read_low_resolution(slide, max_side: int) -> Tuple[np.ndarray, Tuple[float, float]]:
    """The whole slide as RGB uint8 with its longer side at most ``max_side``, and the (x, y)
    level-0 pixels per output pixel.  Reads the smallest sufficient pyramid level in bands of at
    most :data:`BAND_PIXELS` pixels, each shrunk by area averaging as it is read, so memory stays
    bounded even for a single-level slide of 10⁵ pixels a side (which is then slow, not fatal)."""
    import cv2
    import numpy as np

    level = level_for_side(slide, max_side)
    width, height = slide.level_dimensions[level]
    down = float(slide.level_downsamples[level])
    scale = min(1.0, max_side / max(width, height))
    out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
    rgb = np.empty((out_h, out_w, 3), np.uint8)
    # whole output rows per band: each band's source rows map onto them exactly (bar rounding)
    rows_per_band = max(1, int(BAND_PIXELS // max(1, width) * out_h // max(1, height)))
    for top in range(0, out_h, rows_per_band):
        bottom = min(out_h, top + rows_per_band)
        y0, y1 = round(top * height / out_h), round(bottom * height / out_h)
        band = rgb_of(slide.read_region((0, round(y0 * down)), level, (width, max(1, y1 - y0))))
        if band.shape[:2] != (bottom - top, out_w):
            band = cv2.resize(band, (out_w, bottom - top), interpolation=cv2.INTER_AREA)
        rgb[top:bottom] = band
    full_w, full_h = slide.level_dimensions[0]
    return rgb, (full_w / rgb.shape[1], full_h / rgb.shape[0])
