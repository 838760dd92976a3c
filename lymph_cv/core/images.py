"""THE image reader: every stage that reads pixels from an image file (patches, ``dbs --images``,
evaluate, report, ``pycaffe.io``) reads them here, so training and evaluation see the same pixels.

* :func:`read_image`: 8-bit 3-channel BGR exactly as ``cv2.imread(path, IMREAD_COLOR)`` (what
  Caffe's ``convert_imageset`` and the tutorial's Matlab patches see), and which conversion
  (grayscale, RGBA, 16-bit, …) it took;
* :func:`read_unit`: float32 BGR in [0, 1] as ``caffe.io.load_image`` (scikit-image's
  ``img_as_float``: integers divided by their type's maximum, so 16-bit precision is kept);
* :func:`read_gray`: 8-bit grayscale as ``IMREAD_GRAYSCALE`` (``convert_imageset -gray``).

The colour-transform hook: each reader takes ``transform``, a function of an (H, W, 3) BGR uint8
image returning one of the same shape and type (stain normalisation plugs in here), applied right
after decoding.  With a transform, :func:`read_unit` and :func:`read_gray` start from the 8-bit BGR
image, so every reader hands the transform the same pixels.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import cv2
import numpy as np

from lymph_cv.core.imagefiles import read_file
from lymph_cv.errors import InputError

PathLike = Union[str, os.PathLike]
#: A colour transform: (H, W, 3) BGR uint8 → (H, W, 3) BGR uint8.
ColourTransform = Callable[[np.ndarray], np.ndarray]

#: Channel-count names in conversion notes.
_CHANNEL_KINDS = {1: "grayscale", 2: "grayscale+alpha", 4: "RGBA"}
#: float32(u / 255) for every 8-bit value (a table lookup is several times faster than dividing).
_UNIT_TABLE = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)

# A bad file is reported once, by us; OpenCV's own decoder chatter on stderr would add lines.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


@dataclass(frozen=True)
class ReadImage:
    """An image read as OpenCV's colour ``imread`` reads it (8-bit BGR) and what was converted."""

    bgr: np.ndarray
    conversion: Optional[str]  # "grayscale", "RGBA", "16-bit", … or None


def file_bytes(path: PathLike) -> np.ndarray:
    """The bytes of an image file (read-only), or an InputError naming it (missing, empty, unreadable).

    Plain ``os.open``/``os.read`` (:func:`~lymph_cv.core.imagefiles.read_file`): a quarter of ``isfile`` +
    ``np.fromfile``'s cost per file, which counts when a fold's 38,528 small patch files are read.
    """
    return np.frombuffer(read_file(path), dtype=np.uint8)


def decode(path: PathLike, flags: int = cv2.IMREAD_UNCHANGED, data: Optional[np.ndarray] = None) -> np.ndarray:
    """``cv2.imdecode`` of a file with the one error policy (``data``: its bytes, if already read)."""
    raw = cv2.imdecode(file_bytes(path) if data is None else data, flags)
    if raw is None or raw.size == 0:
        raise InputError("not an image OpenCV can read (cannot read the image: unreadable, truncated or "
                         "another kind of file)", path)
    return raw


def conversion_of(raw: np.ndarray) -> Optional[str]:
    """What reading ``raw`` (as decoded unchanged) as 8-bit BGR converts, or None."""
    if raw.dtype == np.uint8 and raw.ndim == 3 and raw.shape[2] == 3:
        return None
    kinds = []
    if raw.dtype != np.uint8:
        kinds.append(f"{raw.dtype.itemsize * 8}-bit")
    channels = 1 if raw.ndim == 2 else raw.shape[2]
    kinds.append(_CHANNEL_KINDS.get(channels, f"{channels}-channel"))
    return " ".join(kinds)


def apply_transform(bgr: np.ndarray, transform: Optional[ColourTransform], path: PathLike) -> np.ndarray:
    """``transform(bgr)``, checked to keep the image's shape and 8-bit type."""
    if transform is None:
        return bgr
    out = np.asarray(transform(bgr))
    if out.shape != bgr.shape or out.dtype != np.uint8:
        raise InputError(f"the colour transform returned {out.dtype} {out.shape}, expected uint8 {bgr.shape}", path)
    return np.ascontiguousarray(out)


def read_image(path: PathLike, transform: Optional[ColourTransform] = None) -> ReadImage:
    """8-bit 3-channel BGR exactly like ``cv2.imread(path, IMREAD_COLOR)``, then ``transform``.

    Raises InputError naming the file when it is not an image OpenCV can read.
    """
    data = file_bytes(path)
    raw = decode(path, cv2.IMREAD_UNCHANGED, data)
    conversion = conversion_of(raw)
    bgr = raw if conversion is None else decode(path, cv2.IMREAD_COLOR, data)
    return ReadImage(apply_transform(bgr, transform, path), conversion)


def read_unit(path: PathLike, transform: Optional[ColourTransform] = None, gray: bool = False) -> np.ndarray:
    """float32 (H, W, 3) BGR in [0, 1] as ``caffe.io.load_image`` reads it (before its RGB swap):
    integers divided by their type's maximum, floats kept; grayscale tiled, alpha dropped.
    ``gray``: (H, W, 1), a grayscale file as stored, a colour one through OpenCV's BGR → gray."""
    if transform is not None:
        pixels = read_image(path, transform).bgr
        single = False
    else:
        raw = decode(path)
        single = raw.ndim == 2 or raw.shape[2] == 1
        pixels = raw if single and gray else decode(path, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    if pixels.dtype == np.uint8:
        unit = _UNIT_TABLE[pixels]
    elif np.issubdtype(pixels.dtype, np.integer):
        unit = (pixels.astype(np.float64) / float(np.iinfo(pixels.dtype).max)).astype(np.float32)
    else:
        unit = pixels.astype(np.float32)
    if gray:
        return (unit if single else cv2.cvtColor(unit, cv2.COLOR_BGR2GRAY)).reshape(unit.shape[:2] + (1,))
    return unit


def read_gray(path: PathLike, transform: Optional[ColourTransform] = None) -> np.ndarray:
    """8-bit (H, W) grayscale as ``cv2.imread(path, IMREAD_GRAYSCALE)`` (with a transform: its BGR result
    converted by OpenCV)."""
    if transform is not None:
        return cv2.cvtColor(read_image(path, transform).bgr, cv2.COLOR_BGR2GRAY)
    return decode(path, cv2.IMREAD_GRAYSCALE)
