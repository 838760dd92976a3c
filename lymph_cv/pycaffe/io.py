"""``caffe.io``: images, resizing, oversampling, the input Transformer, blob and datum helpers.

Images are H×W×K float32 arrays, RGB, values in [0, 1] as ``load_image`` returns them.
Resizing is order-1 (bilinear) with scikit-image's half-pixel mapping ``src = (dst + 0.5)·in/out − 0.5``
and no anti-aliasing (as scikit-image did in 2015); samples beyond the border repeat the edge pixel.

Mean handling follows the tutorial's pycaffe (February 2015, ``set_mean(mode='elementwise')``): a
C×H'×W' mean whose size differs from the input's is *resized* to it, e.g. the 3×36×36 mean file
to the 3×32×32 deploy input.  (Caffe since 2017 does the same; versions between raised an error.)
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, Optional, Sequence, Tuple

import cv2
import numpy as np
from scipy import ndimage

from lymph_cv.formats.caffe import caffe_pb2  # noqa: F401 - pycaffe exposes the messages as caffe.io.caffe_pb2
from lymph_cv.formats.caffe.blob import array_to_blob, blob_shape, has_legacy_dims
from lymph_cv.formats.caffe.datum import array_to_datum as _array_to_datum
from lymph_cv.formats.caffe.datum import datum_to_array
from lymph_cv.core.images import read_unit
from lymph_cv.errors import ConfigError

__all__ = ["caffe_pb2", "load_image", "resize_image", "oversample", "Transformer", "blobproto_to_array",
           "array_to_blobproto", "arraylist_to_blobprotovector_str", "blobprotovector_str_to_arraylist",
           "array_to_datum", "datum_to_array", "BlobShapeError"]

#: Crops per image from :func:`oversample`: 4 corners and the centre, then their mirrors.
OVERSAMPLE_CROPS = 10
#: Channel counts resized as images (others go through scipy's zoom, as pycaffe does).
IMAGE_CHANNELS = (1, 3)
_INTERPOLATION = {0: cv2.INTER_NEAREST_EXACT, 1: cv2.INTER_LINEAR}
# cv2's resize handles at most this many channels at once.
_CV2_MAX_CHANNELS = 512


def load_image(filename: str | os.PathLike, color: bool = True) -> np.ndarray:
    """An image file as float32 H×W×3 RGB in [0, 1] (H×W×1 when ``color`` is False)."""
    if not color:
        return read_unit(filename, gray=True)
    return np.ascontiguousarray(read_unit(filename)[:, :, ::-1])  # the reader gives BGR; skimage (and pycaffe) RGB


def resize_image(im: np.ndarray, new_dims: Sequence[int], interp_order: int = 1) -> np.ndarray:
    """Resize H×W×K ``im`` to ``new_dims`` (height, width); float32 result.

    For 1 or 3 channels: order-1 bilinear (or order-0 nearest) with half-pixel centres; other
    channel counts use ``scipy.ndimage.zoom`` as pycaffe does.  A constant image stays constant.
    """
    im = np.asarray(im)
    height, width = int(new_dims[0]), int(new_dims[1])
    if im.ndim != 3:
        raise ConfigError(f"resize_image expects an H x W x K array, got shape {im.shape}")
    if im.shape[-1] in IMAGE_CHANNELS and interp_order in _INTERPOLATION:
        if im.shape[:2] == (height, width):
            return im.astype(np.float32)
        low, high = float(im.min()), float(im.max())
        if high == low:
            return np.full((height, width, im.shape[-1]), low, dtype=np.float32)
        resized = cv2.resize(np.ascontiguousarray(im, dtype=np.float32), (width, height),
                             interpolation=_INTERPOLATION[interp_order])
        return resized.reshape(height, width, im.shape[-1])
    scale = (height / im.shape[0], width / im.shape[1], 1.0)
    return ndimage.zoom(im.astype(np.float32), scale, order=interp_order)


def oversample(images: Iterable[np.ndarray], crop_dims: Sequence[int]) -> np.ndarray:
    """Ten crops per image (N×H×W×K → 10N×h×w×K): corners (row-major) and centre, then the same
    five mirrored left-right."""
    images = [np.asarray(image) for image in images]
    crop_h, crop_w = int(crop_dims[0]), int(crop_dims[1])
    crops = []
    for image in images:
        height, width = image.shape[:2]
        if crop_h > height or crop_w > width:
            raise ConfigError(f"crop {crop_h}x{crop_w} larger than the {height}x{width} image")
        starts = [(h, w) for h in (0, height - crop_h) for w in (0, width - crop_w)]
        starts.append((int(height / 2.0 - crop_h / 2.0), int(width / 2.0 - crop_w / 2.0)))
        plain = [image[h:h + crop_h, w:w + crop_w] for h, w in starts]
        crops.extend(plain)
        crops.extend(crop[:, ::-1] for crop in plain)
    if not crops:
        return np.empty((0, crop_h, crop_w, 0), dtype=np.float32)
    return np.stack(crops).astype(np.float32)


class Transformer:
    """Turns H×W×K images into net input (C×H×W) and back, per input blob.

    preprocess: float32 → resize to the input's H×W if needed → transpose → channel swap →
    × raw_scale → − mean → × input_scale.
    """

    def __init__(self, inputs: Dict[str, Sequence[int]]):
        self.inputs = {name: tuple(int(d) for d in shape) for name, shape in inputs.items()}
        self.transpose: Dict[str, Tuple[int, ...]] = {}
        self.channel_swap: Dict[str, Tuple[int, ...]] = {}
        self.raw_scale: Dict[str, float] = {}
        self.mean: Dict[str, np.ndarray] = {}
        self.input_scale: Dict[str, float] = {}

    def _check_input(self, name: str) -> None:
        if name not in self.inputs:
            raise ConfigError(f"{name!r} is not a net input", valid=sorted(self.inputs))

    def set_transpose(self, in_: str, order: Sequence[int]) -> None:
        """Axis order from the image layout to the blob's, e.g. (2, 0, 1) for H×W×K → K×H×W."""
        self._check_input(in_)
        if len(order) != len(self.inputs[in_]) - 1:
            raise ConfigError(f"transpose order {tuple(order)} must have one entry per axis of "
                              f"{self.inputs[in_][1:]}")
        self.transpose[in_] = tuple(order)

    def set_channel_swap(self, in_: str, order: Sequence[int]) -> None:
        """Channel reordering after the transpose, e.g. (2, 1, 0) for RGB → BGR."""
        self._check_input(in_)
        if len(order) != self.inputs[in_][1]:
            raise ConfigError(f"channel swap {tuple(order)} must list the {self.inputs[in_][1]} channels")
        self.channel_swap[in_] = tuple(order)

    def set_raw_scale(self, in_: str, scale: float) -> None:
        """Multiply the image by ``scale`` before the mean (e.g. 255 for [0, 1] images)."""
        self._check_input(in_)
        self.raw_scale[in_] = scale

    def set_input_scale(self, in_: str, scale: float) -> None:
        """Multiply by ``scale`` after the mean."""
        self._check_input(in_)
        self.input_scale[in_] = scale

    def set_mean(self, in_: str, mean: np.ndarray) -> None:
        """Per-channel (1-D) or elementwise (C×H×W) mean; an elementwise mean of another size is
        resized to the input's H×W, as the tutorial's pycaffe did."""
        self._check_input(in_)
        mean = np.asarray(mean, dtype=np.float32)
        shape = self.inputs[in_]
        if mean.ndim == 1:
            if mean.shape[0] != shape[1]:
                raise ConfigError(f"mean has {mean.shape[0]} channels, the input {shape[1]}")
            mean = mean[:, None, None]
        else:
            if mean.ndim == 2:
                mean = mean[None, :, :]
            if mean.ndim != 3 or mean.shape[0] != shape[1]:
                raise ConfigError(f"mean shape {mean.shape} incompatible with input shape {shape}")
            if mean.shape[1:] != shape[2:]:
                mean = resize_image(mean.transpose(1, 2, 0), shape[2:]).transpose(2, 0, 1)
        self.mean[in_] = mean

    def preprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        """An H×W×K image → the C×H×W float32 net input."""
        self._check_input(in_)
        out = np.asarray(data).astype(np.float32, copy=True)
        size = self.inputs[in_][2:]
        if out.shape[:2] != size:
            out = resize_image(out, size)
        if in_ in self.transpose:
            out = out.transpose(self.transpose[in_])
        if in_ in self.channel_swap:
            out = out[list(self.channel_swap[in_]), :, :]
        if in_ in self.raw_scale:
            out = out * np.float32(self.raw_scale[in_])
        if in_ in self.mean:
            out = out - self.mean[in_]
        if in_ in self.input_scale:
            out = out * np.float32(self.input_scale[in_])
        return np.ascontiguousarray(out, dtype=np.float32)

    def deprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        """Undo :meth:`preprocess` (except the resize): net input → H×W×K image."""
        self._check_input(in_)
        out = np.array(data, dtype=np.float32).squeeze()
        if out.ndim == 2:
            out = out[None]
        if in_ in self.input_scale:
            out = out / np.float32(self.input_scale[in_])
        if in_ in self.mean:
            out = out + self.mean[in_]
        if in_ in self.raw_scale:
            out = out / np.float32(self.raw_scale[in_])
        if in_ in self.channel_swap:
            out = out[list(np.argsort(self.channel_swap[in_])), :, :]
        if in_ in self.transpose:
            out = out.transpose(np.argsort(self.transpose[in_]))
        return out


class BlobShapeError(ConfigError, ValueError):
    """A BlobProto whose dims do not fit its values (pycaffe raises ValueError here)."""


def blobproto_to_array(blob: "caffe_pb2.BlobProto", return_diff: bool = False) -> np.ndarray:
    """A BlobProto's data (or diff) as an array: legacy 4-D dims when present, else ``shape``
    (no dims at all: a scalar, so a blob of several values without dims is a ValueError)."""
    values = blob.diff if return_diff else (blob.double_data if len(blob.double_data) else blob.data)
    array = np.asarray(values, dtype=np.float64 if (not return_diff and len(blob.double_data)) else np.float32)
    shape = blob_shape(blob)
    if array.size != int(np.prod(shape, dtype=np.int64)):
        kind = "legacy" if has_legacy_dims(blob) else "shape"
        raise BlobShapeError(f"blob holds {array.size} values, its {kind} dims {shape} need "
                             f"{int(np.prod(shape, dtype=np.int64))}")
    return array.reshape(shape)


def arraylist_to_blobprotovector_str(arraylist: Sequence[np.ndarray]) -> bytes:
    """Arrays as a serialized BlobProtoVector."""
    vector = caffe_pb2.BlobProtoVector()
    vector.blobs.extend(array_to_blobproto(array) for array in arraylist)
    return vector.SerializeToString()


def blobprotovector_str_to_arraylist(text: bytes) -> list:
    """A serialized BlobProtoVector as a list of arrays."""
    vector = caffe_pb2.BlobProtoVector()
    vector.ParseFromString(text)
    return [blobproto_to_array(blob) for blob in vector.blobs]


def array_to_blobproto(arr: np.ndarray, diff: Optional[np.ndarray] = None) -> "caffe_pb2.BlobProto":
    """An array (and optional diff of the same shape) as a BlobProto with ``shape`` dims."""
    arr = np.asarray(arr)
    blob = array_to_blob(arr)
    if diff is not None:
        diff = np.asarray(diff)
        if diff.shape != arr.shape:
            raise ConfigError(f"diff shape {diff.shape} differs from data shape {arr.shape}")
        blob.diff.extend(diff.astype(np.float32).ravel())
    return blob


def array_to_datum(arr: np.ndarray, label: Optional[int] = None) -> "caffe_pb2.Datum":
    """A C×H×W array as a Datum (uint8 → ``data``, else ``float_data``); label if given."""
    datum = _array_to_datum(arr, 0 if label is None else label)
    if label is None:
        datum.ClearField("label")
    return datum
