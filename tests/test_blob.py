"""BlobProto and mean files: Caffe's shape rule, byte-identical mean files."""
from __future__ import annotations

import numpy as np
import pytest

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.blob import (
    array_to_blob,
    blob_to_array,
    mean_to_bytes,
    read_mean,
    write_mean,
)
from lymph_cv.errors import FormatError

FOLDS = range(1, 6)
FOLD1_CHANNEL_MEANS = (119.34, 97.27, 118.56)  # B, G, R


@pytest.mark.parametrize("fold", FOLDS)
def test_reference_means_decode_and_reencode_identically(reference, fold):
    path = reference / f"DB_train_w32_{fold}.binaryproto"
    mean = read_mean(path)
    assert mean.shape == (3, 36, 36) and mean.dtype == np.float32
    assert mean_to_bytes(mean) == path.read_bytes()


def test_fold1_channel_means(reference):
    mean = read_mean(reference / "DB_train_w32_1.binaryproto")
    np.testing.assert_allclose(mean.reshape(3, -1).mean(axis=1), FOLD1_CHANNEL_MEANS, atol=0.006)


def test_write_mean_round_trip_is_legacy(tmp_path):
    array = np.random.default_rng(0).random((3, 4, 5), dtype=np.float32) * 255
    path = tmp_path / "mean.binaryproto"
    write_mean(path, array)
    np.testing.assert_array_equal(read_mean(path), array)
    blob = caffe_pb2.BlobProto.FromString(path.read_bytes())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 4, 5)
    assert not blob.HasField("shape")


def test_shape_rule_legacy_wins_and_shape_accepted():
    values = np.arange(6, dtype=np.float32)
    modern = array_to_blob(values.reshape(2, 3))
    assert blob_to_array(modern).shape == (2, 3)
    legacy = array_to_blob(values.reshape(2, 3), legacy=True)
    assert blob_to_array(legacy).shape == (1, 1, 2, 3)
    legacy.shape.dim.extend([6])  # legacy dims present ⇒ shape ignored
    assert blob_to_array(legacy).shape == (1, 1, 2, 3)
    doubles = caffe_pb2.BlobProto(double_data=[1.5, 2.5])
    doubles.shape.dim.append(2)
    assert blob_to_array(doubles).dtype == np.float64


def test_mean_from_shape_blob_and_errors(tmp_path):
    path = tmp_path / "m.binaryproto"
    path.write_bytes(array_to_blob(np.ones((3, 2, 2), np.float32)).SerializeToString())
    assert read_mean(path).shape == (3, 2, 2)
    wrong_count = array_to_blob(np.ones(4, np.float32), shape=(2, 2))
    wrong_count.data.append(1.0)
    path.write_bytes(wrong_count.SerializeToString())
    with pytest.raises(FormatError, match="needs 4"):
        read_mean(path)
    path.write_bytes(array_to_blob(np.ones((2, 2), np.float32)).SerializeToString())
    with pytest.raises(FormatError, match="mean file"):
        read_mean(path)
    with pytest.raises(FormatError, match="no such file"):
        read_mean(tmp_path / "missing")


def test_truncated_mean_is_rejected(reference, tmp_path):
    data = (reference / "DB_train_w32_1.binaryproto").read_bytes()
    path = tmp_path / "cut.binaryproto"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=str(path)):
        read_mean(path)
