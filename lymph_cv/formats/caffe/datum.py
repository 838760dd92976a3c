"""Caffe ``Datum`` records ⇄ numpy arrays.

A raw datum holds uint8 pixels in channel-major (C, H, W) order, BGR as OpenCV reads them;
``float_data`` is used only when ``data`` is empty; an ``encoded`` datum holds an image
file's bytes.  :func:`serialize_datum` builds the wire format directly: the database
builder writes about a million patches.  Parsing uses the protobuf runtime (upb), which
measured faster than a hand-written wire parser.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import numpy as np

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.wire import encode_varint as _varint
from lymph_cv.errors import FormatError

# Tags (field number << 3 | wire type) of the Datum fields, as in caffe.proto.
_TAG_CHANNELS, _TAG_HEIGHT, _TAG_WIDTH = 0x08, 0x10, 0x18
_TAG_DATA, _TAG_LABEL, _TAG_ENCODED_FALSE = 0x22, 0x28, b"\x38\x00"
#: One-byte varints hold 0..127; the trailer is then label tag, label, ``encoded: false`` (4 bytes).
_ONE_BYTE_VARINT, _ONE_BYTE_TRAILER = 0x80, 4


def _check_chw(array: np.ndarray) -> np.ndarray:
    if array.ndim != 3:
        raise FormatError(f"a datum needs a (C, H, W) array, got shape {array.shape}")
    return array


@functools.lru_cache(maxsize=64)
def _raw_header(channels: int, height: int, width: int) -> bytes:
    """channels, height, width and the data field's tag and length: fixed per patch shape."""
    return b"".join(
        (
            bytes((_TAG_CHANNELS,)), _varint(channels),
            bytes((_TAG_HEIGHT,)), _varint(height),
            bytes((_TAG_WIDTH,)), _varint(width),
            bytes((_TAG_DATA,)), _varint(channels * height * width),
        )
    )


def raw_pixel_offset(channels: int, height: int, width: int) -> int:
    """Where the pixels start in a raw datum of this shape written by :func:`serialize_datum`."""
    return len(_raw_header(channels, height, width))


@functools.lru_cache(maxsize=1024)
def _raw_trailer(label: int) -> bytes:
    """The label field and Caffe's explicit ``encoded: false``."""
    return bytes((_TAG_LABEL,)) + _varint(label) + _TAG_ENCODED_FALSE


def serialize_datum(chw_uint8: np.ndarray, label: int) -> bytes:
    """Serialized raw Datum of a uint8 (C, H, W) array, exactly as Caffe writes it.

    Identical to ``array_to_datum(...).SerializeToString()`` (``encoded=false`` included);
    assembled from cached header/trailer bytes, about 1.5x faster than the message API.
    """
    array = _check_chw(np.asarray(chw_uint8))
    if array.dtype != np.uint8:
        raise FormatError(f"raw datum pixels must be uint8, got {array.dtype}")
    channels, height, width = array.shape
    # tobytes() always yields C (channel-major) order, whatever the array's strides.
    return _raw_header(channels, height, width) + array.tobytes() + _raw_trailer(int(label))


def serialize_datums(rows: np.ndarray, shape: Tuple[int, int, int], labels: np.ndarray) -> list:
    """:func:`serialize_datum` of every uint8 row (B, C·H·W) of ``shape`` with its label, in bulk.

    Labels 0..127 (one varint byte) give records of one length, assembled as one array and split;
    others fall back to one record at a time.  Same bytes either way.
    """
    rows = np.asarray(rows)
    labels = np.asarray(labels, dtype=np.int64)
    if rows.dtype != np.uint8:
        raise FormatError(f"raw datum pixels must be uint8, got {rows.dtype}")
    if not len(rows) or labels.min() < 0 or labels.max() >= _ONE_BYTE_VARINT:
        return [serialize_datum(row.reshape(shape), int(label)) for row, label in zip(rows, labels)]
    header = _raw_header(*shape)
    size = rows.shape[1]
    width = len(header) + size + _ONE_BYTE_TRAILER
    table = np.empty((len(rows), width), np.uint8)
    table[:, : len(header)] = np.frombuffer(header, np.uint8)
    table[:, len(header) : len(header) + size] = rows
    table[:, -4] = _TAG_LABEL
    table[:, -3] = labels
    table[:, -2:] = np.frombuffer(_TAG_ENCODED_FALSE, np.uint8)
    data = table.tobytes()
    return [data[start : start + width] for start in range(0, len(data), width)]


def array_to_datum(chw: np.ndarray, label: int) -> caffe_pb2.Datum:
    """A Datum of a (C, H, W) array: uint8 → ``data``, anything else → ``float_data``."""
    array = _check_chw(np.asarray(chw))
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
