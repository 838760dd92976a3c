"""Datum encode/decode: raw uint8, float_data, encoded images; the fast path equals protobuf's."""
from __future__ import annotations

import numpy as np
import pytest

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.datum import (
    array_to_datum,
    datum_to_array,
    encoded_datum,
    parse_datum,
    serialize_datum,
)
from lymph_cv.errors import FormatError


@pytest.mark.parametrize("shape,label", [((3, 36, 36), 2), ((1, 5, 7), 0), ((3, 200, 3), -1), ((3, 1, 1), 300)])
def test_fast_serialize_equals_protobuf_and_round_trips(shape, label):
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = serialize_datum(array, label)
    datum = array_to_datum(array, label)
    assert data == datum.SerializeToString()
    assert datum.HasField("encoded") and not datum.encoded
    pixels, got = parse_datum(data)
    assert got == label and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, array)


def test_non_contiguous_array_is_written_channel_major():
    hwc = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    chw = hwc.transpose(2, 0, 1)
    pixels, _ = parse_datum(serialize_datum(chw, 1))
    np.testing.assert_array_equal(pixels, chw)


def test_float_datum_round_trip():
    array = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 2, 2)
    data = array_to_datum(array, 1).SerializeToString()
    pixels, label = parse_datum(data)
    assert label == 1 and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, array)


def test_encoded_datum_decodes_with_opencv():
    import cv2

    hwc = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", hwc)
    assert ok
    datum = encoded_datum(png.tobytes(), 2)
    pixels, label = parse_datum(datum.SerializeToString())
    assert label == 2
    np.testing.assert_array_equal(pixels, hwc.transpose(2, 0, 1))


def test_bad_inputs():
    with pytest.raises(FormatError):
        parse_datum(b"\x22\xff\xff\x01abc")  # data field longer than the bytes
    bad = caffe_pb2.Datum(channels=3, height=2, width=2, data=b"123", label=0)
    with pytest.raises(FormatError, match="expected C\\*H\\*W = 12"):
        datum_to_array(bad)
    with pytest.raises(FormatError, match="negative dimensions"):  # was numpy's ValueError
        datum_to_array(caffe_pb2.Datum(channels=-1, height=-1, width=1, data=b"1"))
    with pytest.raises(FormatError, match="cannot decode"):
        datum_to_array(encoded_datum(b"not an image", 0))
    with pytest.raises(FormatError, match="uint8"):
        serialize_datum(np.zeros((1, 2, 2), np.float32), 0)
    with pytest.raises(FormatError, match="C, H, W"):
        serialize_datum(np.zeros((2, 2), np.uint8), 0)


def test_packed_and_unpacked_float_data_both_read():
    import struct

    values = [0.5, -1.0, 2.0, 3.0]
    header = b"\x08\x01\x10\x02\x18\x02"  # channels 1, height 2, width 2
    packed = header + b"\x32\x10" + struct.pack("<4f", *values) + b"\x28\x01"
    unpacked = header + b"".join(b"\x35" + struct.pack("<f", v) for v in values) + b"\x28\x01"
    for data in (packed, unpacked):
        pixels, label = parse_datum(data)
        assert label == 1
        np.testing.assert_array_equal(pixels, np.float32(values).reshape(1, 2, 2))
