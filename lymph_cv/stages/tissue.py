"""Tissue detection on a low-resolution view of a whole slide.

Stained tissue is coloured, glass is white or grey: an Otsu threshold on HSV saturation (with a
floor, so a slide of background and sensor noise does not become half tissue) splits the two;
``method="od"`` thresholds the optical density instead (the summed −ln of the RGB transmission:
also finds dark, weakly coloured tissue, and pen marks).
Specks (tissue components smaller than ``min_object`` of the view's area: dust, debris) are
dropped and small holes (background components not touching the border and smaller than
``min_hole``) filled.  :meth:`TissueMask.tile_fractions` gives each tile of a level-0 grid its
tissue fraction, for the tiler's ``--min-tissue``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Tuple, Union

import cv2
import numpy as np

from lymph_cv.core.fsutil import atomic_write_bytes
from lymph_cv.errors import ConfigError, LymphCVError
from lymph_cv.formats import slides

PathLike = Union[str, os.PathLike]

#: Longer side, in pixels, of the view tissue is detected on.
DEFAULT_MASK_SIDE = 2048
#: Saturation threshold floor (0-255): below it nothing is tissue, whatever Otsu says.
MIN_SATURATION = 20
#: Tissue measures: HSV saturation, or optical density summed over R, G, B.
METHODS = ("saturation", "od")
DEFAULT_METHOD = METHODS[0]
#: Optical density (summed over channels) mapped onto 0-255: this sum is 255 (darker saturates).
OD_RANGE = 3.0
#: Optical-density threshold floor (summed over channels; glass of transmission ~0.9 sums to ~0.3).
MIN_OD = 0.3
#: Components smaller than these fractions of the view's area are specks (dropped) and holes (filled).
DEFAULT_MIN_OBJECT = 1e-4
DEFAULT_MIN_HOLE = 1e-4
#: Gaussian blur (pixels of the view) before thresholding: stain texture should not split tissue.
BLUR_SIGMA = 1.0
#: A tile is kept by the tiler when at least this share of it is tissue (``--min-tissue``).
DEFAULT_MIN_TISSUE = 0.5
#: Mask PNG values.
MASK_ON = 255
#: 8-connectivity for tissue components.
CONNECTIVITY = 8


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask over the whole slide, ``downsample`` level-0 pixels per mask pixel."""

    mask: np.ndarray  # (H, W) bool
    downsample: Tuple[float, float]  # (x, y)
    threshold: float  # the saturation threshold used (0-255)

    @property
    def fraction(self) -> float:
        """Tissue share of the whole slide."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def tile_fractions(self, size: int, stride: int | None = None) -> np.ndarray:
        """(rows, cols) tissue fraction of every whole tile of ``size`` level-0 pixels, origins
        every ``stride`` (default ``size``) from (0, 0); the mask is resampled by area, so each value
        is the mean of the mask over the tile."""
        stride = size if stride is None else stride
        if size <= 0 or stride <= 0:
            raise ConfigError(f"tile size and stride must be positive, got {size} and {stride}")
        height, width = self.mask.shape
        full_w, full_h = width * self.downsample[0], height * self.downsample[1]
        cols = np.arange(0, full_w - size + 1e-9, stride)
        rows = np.arange(0, full_h - size + 1e-9, stride)
        integral = cv2.integral(self.mask.astype(np.uint8)).astype(np.float64)

        def spans(origins: np.ndarray, down: float, limit: int) -> Tuple[np.ndarray, np.ndarray]:
            start = np.clip(np.floor(origins / down).astype(np.int64), 0, limit - 1)
            stop = np.clip(np.ceil((origins + size) / down).astype(np.int64), start + 1, limit)
            return start, stop

        r0, r1 = spans(rows, self.downsample[1], height)
        c0, c1 = spans(cols, self.downsample[0], width)
        total = (integral[r1][:, c1] - integral[r0][:, c1] - integral[r1][:, c0] + integral[r0][:, c0])
        area = (r1 - r0)[:, None] * (c1 - c0)[None, :]
        return total / area


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (0-255, uint8) of an RGB uint8 image."""
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[..., 1]


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Optical density summed over R, G, B, scaled so :data:`OD_RANGE` is 255 (uint8)."""
    lut = -np.log((np.arange(256, dtype=np.float64) + 1) / 256)  # −ln of the transmission, per 8-bit value
    od = lut[rgb].sum(axis=2)
    return np.clip(od * (255 / OD_RANGE) + 0.5, 0, 255).astype(np.uint8)


def _remove_small(mask: np.ndarray, min_pixels: int, keep_border: bool) -> np.ndarray:
    """``mask`` without its components smaller than ``min_pixels`` (those touching the border kept
    when ``keep_border``: background around the tissue is not a hole)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=CONNECTIVITY)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_pixels
    if keep_border:
        x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
        right = x + stats[:, cv2.CC_STAT_WIDTH]
        bottom = y + stats[:, cv2.CC_STAT_HEIGHT]
        keep |= (x == 0) | (y == 0) | (right == mask.shape[1]) | (bottom == mask.shape[0])
    keep[0] = False  # label 0 is the other phase
    return keep[labels]


def tissue_mask(rgb: np.ndarray, min_object: float = DEFAULT_MIN_OBJECT, min_hole: float = DEFAULT_MIN_HOLE,
                method: str = DEFAULT_METHOD) -> Tuple[np.ndarray, float]:
    """(mask, threshold): tissue pixels of an RGB uint8 view by Otsu on saturation (``method="od"``:
    on optical density), specks smaller than ``min_object`` and holes smaller than ``min_hole``
    (fractions of the view's area) removed.  The threshold is on the measure's 0-255 scale."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or rgb.size == 0:
        raise ConfigError(f"expected an (H, W, 3) uint8 image, got {rgb.dtype} {rgb.shape}")
    for name, value in (("min_object", min_object), ("min_hole", min_hole)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be a fraction in [0, 1), got {value}")
    if method not in METHODS:
        raise ConfigError(f"unknown tissue method {method!r}", valid=METHODS)
    measure = saturation(rgb) if method == "saturation" else optical_density(rgb)
    floor = MIN_SATURATION if method == "saturation" else MIN_OD * 255 / OD_RANGE
    sat = cv2.GaussianBlur(measure, (0, 0), BLUR_SIGMA)
    otsu, _ = cv2.threshold(sat, 0, MASK_ON, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = max(float(otsu), float(floor))
    mask = sat > threshold
    area = mask.size
    mask = _remove_small(mask, int(np.ceil(min_object * area)), keep_border=False)
    holes = _remove_small(~mask, int(np.ceil(min_hole * area)), keep_border=True)
    return ~holes, threshold


def detect_tissue(path: PathLike, max_side: int = DEFAULT_MASK_SIDE, min_object: float = DEFAULT_MIN_OBJECT,
                  min_hole: float = DEFAULT_MIN_HOLE, method: str = DEFAULT_METHOD) -> TissueMask:
    """The tissue mask of the slide at ``path``, detected on a view at most ``max_side`` pixels long
    (``method``: :data:`METHODS`)."""
    if max_side <= 0:
        raise ConfigError(f"mask side must be positive, got {max_side}")
    with slides.open_slide(path) as slide:
        rgb, downsample = slides.read_low_resolution(slide, max_side)
    mask, threshold = tissue_mask(rgb, min_object, min_hole, method)
    return TissueMask(mask=mask, downsample=downsample, threshold=threshold)


def write_mask_png(path: PathLike, mask: np.ndarray) -> None:
    """Write a boolean mask as an 8-bit PNG (tissue white), atomically."""
    ok, data = cv2.imencode(".png", np.where(mask, MASK_ON, 0).astype(np.uint8))
    if not ok:
        raise LymphCVError("cannot encode the mask as PNG", path)
    atomic_write_bytes(path, data)
