"""Caffe ``BlobProto`` ⇄ numpy, and mean files (``.binaryproto``).

Caffe's reading rule: if any legacy dimension (num, channels, height, width) is present the
blob is 4-D with those dimensions, otherwise its shape is ``shape.dim``; values come from
``double_data`` when that is non-empty, else from ``data``.  ``compute_image_mean`` writes
the legacy form (1 × C × H × W, no ``shape``), and so does :func:`write_mean`.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.files import parse_binary, read_bytes
from lymph_cv.errors import FormatError
from lymph_cv.formats.caffe.mean import LEGACY_NDIM, mean_to_bytes, write_mean  # noqa: F401 (this module's API too)

LEGACY_FIELDS = ("num", "channels", "height", "width")
#: What a mean file must look like, for error messages.
MEAN_EXPECTED = "expected a Caffe mean file (BlobProto, 1 x C x H x W)"


def _float32_list(array: np.ndarray) -> list:
    """Values as float32-exact Python floats (a list extends a repeated field ~6x faster than numpy)."""
    return np.asarray(array, dtype=np.float32).ravel().tolist()


def has_legacy_dims(blob: caffe_pb2.BlobProto) -> bool:
    """True when any of num/channels/height/width is present (then they define the shape)."""
    return any(blob.HasField(name) for name in LEGACY_FIELDS)


def blob_shape(blob: caffe_pb2.BlobProto) -> Tuple[int, ...]:
    """The blob's shape by Caffe's rule (legacy 4-D dims win over ``shape``)."""
    if has_legacy_dims(blob):
        return tuple(int(getattr(blob, name)) for name in LEGACY_FIELDS)
    return tuple(int(d) for d in blob.shape.dim)


def shape_compatible(blob: caffe_pb2.BlobProto, shape: Sequence[int]) -> bool:
    """Caffe's check that ``blob`` fits a blob of ``shape``: legacy dims match when right-aligned with
    1-padding; else the exact shape."""
    given = blob_shape(blob)
    if has_legacy_dims(blob):
        if len(shape) > LEGACY_NDIM:
            return False
        return given == (1,) * (LEGACY_NDIM - len(shape)) + tuple(shape)
    return given == tuple(shape)


def blob_to_array(blob: caffe_pb2.BlobProto) -> np.ndarray:
    """Blob values as an array of the blob's shape (float32, or float64 from ``double_data``)."""
    shape = blob_shape(blob)
    if len(blob.double_data):
        values = np.asarray(blob.double_data, dtype=np.float64)
    else:
        values = np.asarray(blob.data, dtype=np.float32)
    count = int(np.prod(shape, dtype=np.int64))  # 1 for a 0-axis (scalar) blob, as in Caffe
    if any(d < 0 for d in shape) or values.size != count:
        raise FormatError(f"blob holds {values.size} values but its shape {shape} needs {count}")
    return values.reshape(shape)


def set_blob_shape(blob: caffe_pb2.BlobProto, shape: Sequence[int], legacy: bool) -> None:
    """Write ``shape`` into ``blob`` as legacy 4-D dims (left-padded with 1) or as ``shape.dim``."""
    shape = tuple(int(d) for d in shape)
    if legacy:
        if len(shape) > LEGACY_NDIM:
            raise FormatError(f"a legacy blob has at most {LEGACY_NDIM} dimensions, got {shape}")
        padded = (1,) * (LEGACY_NDIM - len(shape)) + shape
        for name, dim in zip(LEGACY_FIELDS, padded):
            setattr(blob, name, dim)
    else:
        blob.shape.dim.extend(shape)


def array_to_blob(array: np.ndarray, legacy: bool = False, shape: Sequence[int] = ()) -> caffe_pb2.BlobProto:
    """A BlobProto holding ``array`` as float32 ``data``.

    ``legacy`` writes num/channels/height/width (as compute_image_mean and the tutorial-era
    Caffe did) instead of ``shape``; ``shape`` overrides the dimensions written (same count).
    """
    array = np.asarray(array)
    dims = tuple(shape) if len(shape) else array.shape
    if int(np.prod(dims, dtype=np.int64)) != array.size:
        raise FormatError(f"shape {tuple(dims)} does not fit an array of {array.size} values")
    blob = caffe_pb2.BlobProto()
    set_blob_shape(blob, dims, legacy)
    blob.data.extend(_float32_list(array))
    return blob


def parse_blob(data: bytes, path: Union[str, os.PathLike, None] = None) -> caffe_pb2.BlobProto:
    """Parse serialized BlobProto bytes (FormatError naming ``path`` when they are not one)."""
    return parse_binary(caffe_pb2.BlobProto, data, path, MEAN_EXPECTED)


def mean_array(blob: caffe_pb2.BlobProto, path: Union[str, os.PathLike, None] = None) -> np.ndarray:
    """The (C, H, W) float32 mean of a mean-file blob; FormatError when it is not one."""
    try:
        array = blob_to_array(blob)
    except FormatError as exc:
        raise FormatError(f"{MEAN_EXPECTED}; {exc.detail}", path) from exc
    if array.ndim == LEGACY_NDIM and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or array.size == 0:
        raise FormatError(f"{MEAN_EXPECTED}; got shape {blob_shape(blob)}", path)
    return array.astype(np.float32, copy=False)


def read_mean(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read a mean ``.binaryproto`` as a float32 (C, H, W) array (channels in BGR order)."""
    return mean_array(parse_blob(read_bytes(path, MEAN_EXPECTED), path), path)


def store_array(blob: caffe_pb2.BlobProto, array: np.ndarray, legacy: Optional[bool] = None) -> None:
    """Put ``array``'s values into ``blob``, keeping the blob's dimension convention.

    With ``legacy`` None, a blob whose current shape has the same element count keeps its
    dims unchanged (so a decoded legacy 1×1×M×K weight is written back as exactly that), and
    other blobs get ``array``'s shape in the convention they already used.  An explicit
    ``legacy`` always rewrites the dims: legacy 4-D when true, ``shape`` when false.
    """
    array = np.asarray(array)
    use_legacy = has_legacy_dims(blob) if legacy is None else legacy
    old_shape = blob_shape(blob)
    keep = legacy is None and bool(old_shape) and int(np.prod(old_shape, dtype=np.int64)) == array.size
    if not keep:
        for name in LEGACY_FIELDS:
            blob.ClearField(name)
        blob.ClearField("shape")
        set_blob_shape(blob, array.shape, use_legacy)
    blob.ClearField("double_data")
    blob.ClearField("data")
    blob.data.extend(_float32_list(array))

