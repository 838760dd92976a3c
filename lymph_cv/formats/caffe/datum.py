"""Caffe ``Datum`` records ⇄ numpy arrays.

A raw datum holds uint8 pixels in channel-major (C, H, W) order, BGR as OpenCV reads them;
``float_data`` is used only when ``data`` is empty; an ``encoded`` datum holds an image
file's bytes.  :func:`serialize_datum` builds the wire format directly: the database
builder writes about a million patches (:mod:`.rawdatum`, without the protobuf runtime).  Parsing uses the protobuf runtime (upb), which
measured faster than a hand-written wire parser.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.rawdatum import check_chw, raw_pixel_offset, serialize_datum, serialize_datums  # noqa: F401
from lymph_cv.errors import FormatError


def array_to_datum(chw: np.ndarray, label: int) -> caffe_pb2.Datum:
    """A Datum of a (C, H, W) array: uint8 → ``data``, anything else → ``float_data``."""
    array = check_chw(np.asarray(chw))
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = (int(d) for d in array.shape)
    if array.dtype == np.uint8:
        datum.data = np.ascontiguousarray(array).tobytes()
    else:
        datum.float_data.extend(array.astype(np.float32).ravel().tolist())
    datum.label = int(label)
    datum.encoded = False
    return datum


def encoded_datum(image_bytes: bytes, label: int, shape: Optional[Tuple[int, int, int]] = None) -> caffe_pb2.Datum:
    """An ``encoded`` Datum holding an image file's bytes (dims set only when ``shape`` given)."""
    datum = caffe_pb2.Datum()
    if shape is not None:
        datum.channels, datum.height, datum.width = (int(d) for d in shape)
    datum.data = bytes(image_bytes)
    datum.label = int(label)
    datum.encoded = True
    return datum


def decode_image(data: bytes) -> np.ndarray:
    """Decode image file bytes to a (C, H, W) uint8 array with the file's own channel count."""
    import cv2

    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise FormatError("encoded datum holds bytes OpenCV cannot decode as an image")
    if image.dtype != np.uint8:
        raise FormatError(f"encoded datum decodes to {image.dtype} pixels; expected 8-bit")
    if image.ndim == 2:
        image = image[:, :, None]
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def datum_to_array(datum: caffe_pb2.Datum) -> np.ndarray:
    """(C, H, W) pixels of a Datum: uint8 from ``data``, float32 from ``float_data``, decoded if encoded."""
    if datum.encoded:
        return decode_image(datum.data)
    shape = (datum.channels, datum.height, datum.width)
    if min(shape) < 0:
        raise FormatError(f"datum has negative dimensions {shape}")
    count = shape[0] * shape[1] * shape[2]
    if datum.data:
        if len(datum.data) != count:
            raise FormatError(f"datum has {len(datum.data)} data bytes, expected C*H*W = {count} for {shape}")
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape)
    if len(datum.float_data) != count:
        raise FormatError(f"datum has {len(datum.float_data)} float_data values, expected C*H*W = {count}")
    return np.asarray(datum.float_data, dtype=np.float32).reshape(shape)


def parse_datum_message(value: bytes) -> caffe_pb2.Datum:
    """Parse serialized bytes as a Datum message (FormatError when they are not one)."""
    datum = caffe_pb2.Datum()
    try:
        datum.ParseFromString(value)
    except Exception as exc:  # the protobuf runtime raises DecodeError or RuntimeError
        raise FormatError(f"not a serialized Caffe Datum ({exc})") from exc
    return datum


def parse_datum(value: bytes) -> Tuple[np.ndarray, int]:
    """(pixels (C, H, W), label) of serialized Datum bytes; the inverse of :func:`serialize_datum`.

    Raw datums give a read-only uint8 array; float and
    encoded ones as :func:`datum_to_array` returns them.
    """
    datum = parse_datum_message(value)
    return datum_to_array(datum), int(datum.label)
