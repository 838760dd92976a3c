"""Caffe's Data layer semantics: key order with wrap-around, mean at the crop offset, crops, mirror."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.blob import write_mean
from lymph_cv.net.datalayer import DataLayer, RecordCache
from lymph_cv.errors import ConfigError, StoreError
from trainutil import write_db

C, H, W = 3, 10, 10


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    root = tmp_path_factory.mktemp("dl")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, C, H, W), dtype=np.uint8)
    labels = [4, 1, 3, 0, 2]
    write_db(root / "db", images, labels)
    write_db(root / "db_lmdb", images, labels, backend="lmdb")
    mean = rng.uniform(0, 255, size=(C, H, W)).astype(np.float32)
    write_mean(root / "mean.binaryproto", mean)
    return root, images, np.array(labels), mean


def layer(crop=0, mirror=False, batch=3, scale=None, mean_file="mean.binaryproto", mean_value=(),
          source="db") -> caffe_pb2.LayerParameter:
    param = caffe_pb2.LayerParameter(name="data", type="Data", top=["data", "label"])
    param.data_param.source = source
    param.data_param.batch_size = batch
    t = param.transform_param
    t.crop_size = crop
    t.mirror = mirror
    if scale is not None:
        t.scale = scale
    if mean_file:
        t.mean_file = mean_file
    t.mean_value.extend(mean_value)
    return param


def build(root: Path, phase=caffe_pb2.TRAIN, seed=3, **kwargs) -> DataLayer:
    return DataLayer(layer(**kwargs), phase, seed, resolve=lambda p: root / p, cache=RecordCache())


def test_key_order_and_wraparound_mid_batch(db):
    root, images, labels, mean = db
    data = build(root, mean_file="")
    got = [data.batch_arrays(b)[1].tolist() for b in range(4)]
    assert got == [[4, 1, 3], [0, 2, 4], [1, 3, 0], [2, 4, 1]]
    first, _ = data.batch_arrays(1)
    np.testing.assert_array_equal(first[2], images[0].astype(np.float32))  # the wrap lands mid-batch
    assert data.output_shape == (3, C, H, W)


def test_lmdb_reads_the_same(db):
    root, *_ = db
    a = build(root, source="db", crop=6, mirror=True).batch_arrays(2)
    b = build(root, source="db_lmdb", crop=6, mirror=True).batch_arrays(2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_test_phase_centre_crop_mean_at_offset_and_scale(db):
    root, images, _, mean = db
    data = build(root, phase=caffe_pb2.TEST, crop=6, scale=0.5)
    out, _ = data.batch_arrays(0)
    off = (H - 6) // 2
    window = (slice(None), slice(off, off + 6), slice(off, off + 6))
    expected = (images[:3][(slice(None),) + window].astype(np.float32) - mean[window]) * np.float32(0.5)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out.dtype == np.float32 and data.output_shape == (3, C, 6, 6)


def test_train_random_crops_cover_inclusive_range_and_mirror(db):
    root, images, _, mean = db
    crop = 7
    data = build(root, crop=crop, mirror=True, batch=5)
    seen_offsets, seen_flips = set(), set()
    for b in range(40):
        out, _ = data.batch_arrays(b)
        for i in range(5):
            # find the (offset, flip) that explains this sample: crop(x − mean) then flip
            diff = images[i].astype(np.float32) - mean
            matches = [(h, w, f) for h in range(H - crop + 1) for w in range(W - crop + 1) for f in (0, 1)
                       if np.allclose(out[i], diff[:, h:h + crop, w:w + crop][..., ::-1] if f
                                      else diff[:, h:h + crop, w:w + crop])]
            assert matches, f"batch {b} sample {i} is not a mirrored/plain crop of x − mean"
            seen_offsets.add(matches[0][:2])
            seen_flips.add(matches[0][2])
    assert {h for h, _ in seen_offsets} == set(range(H - crop + 1))  # 0..H−crop inclusive
    assert {w for _, w in seen_offsets} == set(range(W - crop + 1))
    assert seen_flips == {0, 1}


def test_batches_are_a_pure_function_of_seed_and_index(db):
    root, *_ = db
    a = build(root, crop=6, mirror=True, seed=11)
    b = build(root, crop=6, mirror=True, seed=11)
    c = build(root, crop=6, mirror=True, seed=12)
    np.testing.assert_array_equal(a.batch_arrays(9)[0], b.batch_arrays(9)[0])
    assert not np.array_equal(a.batch_arrays(9)[0], c.batch_arrays(9)[0])
    tops = a.batch(1)
    assert set(tops) == {"data", "label"} and tops["label"].dtype.is_floating_point


def test_mirror_also_applies_in_test_phase_like_caffe(db):
    root, images, *_ = db
    data = build(root, phase=caffe_pb2.TEST, mirror=True, mean_file="", batch=5)
    flipped = set()
    for b in range(10):
        out, _ = data.batch_arrays(b)
        flipped |= {i for i in range(5) if np.array_equal(out[i], images[i][..., ::-1])}
    assert flipped


def test_mean_value_per_channel_and_errors(db):
    root, images, *_ = db
    data = build(root, phase=caffe_pb2.TEST, mean_file="", mean_value=(10, 20, 30))
    out, _ = data.batch_arrays(0)
    expected = images[:3].astype(np.float32) - np.array([10, 20, 30], np.float32).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(out, expected)
    with pytest.raises(ConfigError, match="cannot both"):
        build(root, mean_value=(1,))
    with pytest.raises(ConfigError, match="1 or one per channel"):
        build(root, mean_file="", mean_value=(1, 2))
    with pytest.raises(ConfigError, match="crop_size 11 exceeds"):
        build(root, crop=11)
    write_mean(root / "small_mean.binaryproto", np.zeros((C, 4, 4), np.float32))
    with pytest.raises(ConfigError, match="small_mean.binaryproto: mean has shape"):
        build(root, mean_file="small_mean.binaryproto")
    with pytest.raises(StoreError, match="not a lmdb|lmdb"):
        param = layer(source="db")
        param.data_param.backend = caffe_pb2.DataParameter.LMDB
        DataLayer(param, caffe_pb2.TRAIN, 0, resolve=lambda p: root / p)


def test_database_larger_than_memory_is_memory_mapped(db, monkeypatch):
    import lymph_cv.net.datalayer as datalayer

    root, images, labels, _ = db
    monkeypatch.setattr(datalayer, "available_memory", lambda: 1000)  # far less than 5 × 300 bytes
    records = datalayer.load_records(root / "db")
    assert isinstance(records.images, np.memmap)
    np.testing.assert_array_equal(records.images, images)
    np.testing.assert_array_equal(records.labels, labels)


def test_rand_skip_offsets_the_cursor_reproducibly(db):
    root, _, labels, _ = db
    param = layer(mean_file="")
    param.data_param.rand_skip = 4
    skips = {DataLayer(param, caffe_pb2.TRAIN, seed, resolve=lambda p: root / p).skip for seed in range(20)}
    assert skips <= set(range(4)) and len(skips) > 1
    data = DataLayer(param, caffe_pb2.TRAIN, 5, resolve=lambda p: root / p)
    again = DataLayer(param, caffe_pb2.TRAIN, 5, resolve=lambda p: root / p)
    assert data.skip == again.skip
    expected = [labels[(data.skip + i) % 5] for i in range(3)]
    assert data.batch_arrays(0)[1].tolist() == expected
