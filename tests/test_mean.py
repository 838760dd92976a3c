"""compute_image_mean's native path (lymph_cv.formats.ldbscan, issue 17): the same bytes as the
numpy path and as Caffe's float32 running sum, and every trigger of the fallback on a real DB."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import plyvel
import pytest

from lymph_cv.errors import LymphCVError
from lymph_cv.formats import ldbscan, leveldb_tables, store
from lymph_cv.formats.caffe import mean as mean_module
from lymph_cv.formats.caffe import meanscan
from lymph_cv.formats.caffe.datum import encoded_datum, serialize_datum

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "compute_image_mean")


def _images(count: int, shape=(3, 6, 5), seed: int = 0, low: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, 256, (count, *shape), dtype=np.uint8)


def _write(path, images, backend="leveldb", start: int = 0):
    with store.open_writer(path, backend) as writer:
        for i, image in enumerate(images, start):
            writer.put(store.make_key(i, f"case/p{i}.png"), serialize_datum(image, i % 3))


def _naive_sum(images) -> np.ndarray:
    total = np.zeros(images[0].size, np.float32)
    for image in images:
        total += image.reshape(-1)  # Caffe: one float32 rounding per record and pixel
    return total


def _same_as_numpy(path, images=None) -> meanscan.NativeMean:
    result = meanscan.native_mean_of_db(path)
    mean, count = mean_module.mean_of_db(path, native=False)
    assert result.count == count and result.shape == mean.shape
    assert result.mean == mean.astype("<f4").tobytes()
    assert list(result.channel_means) == mean_module.channel_means(mean)
    if images is not None:
        total = _naive_sum(images)
        assert result.sum == total.astype("<f4").tobytes()
        assert result.mean == (total / np.float32(len(images))).astype("<f4").tobytes()
    return result


def _scan(path, threads: int = 0):
    with store.open_reader(path) as reader:
        return ldbscan.scan_tables([os.fspath(t) for t in reader.live_tables()], threads)


def _sessions(path, batches, **options):
    """One plyvel session per batch of (key, value or None to delete): each reopen replays the
    previous session's log into a table of its own."""
    for batch in batches:
        db = plyvel.DB(os.fspath(path), create_if_missing=True, **options)
        for key, value in batch:
            if value is None:
                db.delete(key)
            else:
                db.put(key, value)
        db.close()


def test_tables_scanned_natively_with_caffes_bytes_at_any_thread_count(tmp_path):
    images = _images(700, (3, 16, 16))  # 768 pixels: up to three lanes of 256
    _sessions(tmp_path / "db", [[(store.make_key(i, "p"), serialize_datum(images[i], 1)) for i in range(s, s + 100)]
                                for s in range(0, 700, 100)])  # 7 tables, disjoint key ranges
    with store.open_reader(tmp_path / "db") as reader:
        assert len(reader.live_tables()) >= 2
    assert _same_as_numpy(tmp_path / "db", images).way == "tables"
    results = {_scan(tmp_path / "db", threads)[2] for threads in (1, 2, 3, 8)}
    with store.open_reader(tmp_path / "db") as reader:  # more tables than kept open: reopened chunk by chunk
        results.add(ldbscan.scan_tables([os.fspath(t) for t in reader.live_tables()], 2, keep_open=1)[2])
    assert len(results) == 1


def test_many_chunks_summed_lane_by_lane_in_key_order(tmp_path):
    # ~36 MiB: dozens of chunks, each read and summed by one thread, each of its two lanes (512
    # pixels) after that lane of the chunk before; bright records pass 2^24, where every add
    # rounds, so only key order per pixel gives these bytes
    images = _images(72000, (2, 16, 16), seed=9, low=240)
    _write(tmp_path / "db", images)
    total = _naive_sum(images)
    assert total.max() > 2**24
    for threads in (1, 2, 3):
        count, shape, summed, _, _ = _scan(tmp_path / "db", threads)
        assert (count, shape, summed) == (72000, (2, 16, 16), total.astype("<f4").tobytes())


def test_running_sum_past_2_24_rounds_like_caffe(tmp_path):
    # bright records pass 2^24 after ~69,000 records: from there each float32 add rounds
    images = _images(72000, (1, 16, 20), seed=1, low=230)
    _write(tmp_path / "db", images)
    result = _same_as_numpy(tmp_path / "db", images)
    assert result.way == "tables" and np.frombuffer(result.sum, "<f4").max() > 2**24
    assert result.sum != images.reshape(len(images), -1).sum(0, dtype=np.int64).astype("<f4").tobytes()


def test_lmdb_values_summed_natively(tmp_path):
    images = _images(3000, seed=2)
    _write(tmp_path / "db", images, "lmdb")
    assert _same_as_numpy(tmp_path / "db", images).way == "values"


def test_snappy_blocks_decompressed(tmp_path, monkeypatch):
    images = np.repeat(_images(40, seed=3)[:, :, :1], 6, axis=2)  # rows repeat: snappy-compressible
    images = np.concatenate([images, np.zeros((60, 3, 6, 5), np.uint8)])
    monkeypatch.setenv(leveldb_tables.NATIVE_ENV, "0")  # written by LevelDB (the native tables are uncompressed)
    with store.open_writer(tmp_path / "db", "leveldb") as writer:  # Caffe's options: snappy
        for i, image in enumerate(images):
            writer.put(store.make_key(i, "p"), serialize_datum(image, 0))
    monkeypatch.delenv(leveldb_tables.NATIVE_ENV)
    raw = sum(len(serialize_datum(image, 0)) for image in images)
    with store.open_reader(tmp_path / "db") as reader:
        size = sum(os.path.getsize(t) for t in reader.live_tables())
    assert size < raw / 2  # the blocks are compressed
    assert _same_as_numpy(tmp_path / "db", images).way == "tables"


def test_overwritten_keys_fall_back(tmp_path):
    images = _images(50, seed=4)
    first = [(store.make_key(i, "p"), serialize_datum(images[i], 0)) for i in range(50)]
    again = [(store.make_key(5, "p"), serialize_datum(images[7], 0))]
    _sessions(tmp_path / "db", [first + again])  # one memtable: both versions in one table
    with pytest.raises(ldbscan.Unsupported, match="repeated or overlapping"):
        _scan(tmp_path / "db")
    expected = list(images)
    expected[5] = images[7]
    assert _same_as_numpy(tmp_path / "db", expected).way == "values"
    _sessions(tmp_path / "db", [[(store.make_key(9, "p"), serialize_datum(images[8], 0))]])  # a table of its own
    expected[9] = images[8]
    assert _same_as_numpy(tmp_path / "db", expected).way == "values"


def test_deletions_fall_back(tmp_path):
    images = _images(30, seed=5)
    puts = [(store.make_key(i, "p"), serialize_datum(images[i], 0)) for i in range(30)]
    _sessions(tmp_path / "db", [puts + [(store.make_key(3, "p"), None)]])
    with pytest.raises(ldbscan.Unsupported, match="deletion"):
        _scan(tmp_path / "db")
    assert _same_as_numpy(tmp_path / "db", np.delete(images, 3, axis=0)).way == "values"


def test_overlapping_tables_fall_back(tmp_path):
    images = _images(80, seed=6)
    even = [(store.make_key(i, "p"), serialize_datum(images[i], 0)) for i in range(0, 80, 2)]
    odd = [(store.make_key(i, "p"), serialize_datum(images[i], 0)) for i in range(1, 80, 2)]
    _sessions(tmp_path / "db", [even, odd])  # two flushes, interleaved keys
    with store.open_reader(tmp_path / "db") as reader:
        assert len(reader.live_tables()) == 2
    with pytest.raises(ldbscan.Unsupported, match="repeated or overlapping"):
        _scan(tmp_path / "db")
    assert _same_as_numpy(tmp_path / "db", images).way == "values"


def test_other_records_take_the_numpy_path(tmp_path):
    images = _images(4, seed=7)
    with store.open_writer(tmp_path / "db", "leveldb") as writer:
        writer.put(store.make_key(0, "a"), serialize_datum(images[0], 0))
        writer.put(store.make_key(1, "b"), encoded_datum(b"not decoded here", 0).SerializeToString())
    with pytest.raises(meanscan.NativeUnavailable, match="not a raw uint8 Datum"):
        meanscan.native_mean_of_db(tmp_path / "db")
    _write(tmp_path / "sizes", [images[0], images[1][:, :2]])
    with pytest.raises(meanscan.NativeUnavailable, match="record 1 is 3x2x5, the first was 3x6x5"):
        meanscan.native_mean_of_db(tmp_path / "sizes")
    with pytest.raises(LymphCVError, match="record 1: record is 3x2x5, the first was 3x6x5"):
        mean_module.mean_of_db(tmp_path / "sizes")


def test_a_corrupt_block_is_the_numpy_paths_error(tmp_path):
    _write(tmp_path / "db", _images(20, seed=8))
    with store.open_reader(tmp_path / "db") as reader:
        (table,) = map(Path, reader.live_tables())  # paths as strings (no pathlib on the tool's start-up)
    data = bytearray(table.read_bytes())
    footer = data[-48:]
    index_offset = _varints(footer)[2]
    first_block_size = _varints(data[index_offset:], skip_entry_header=True)[1]
    data[first_block_size] = 7  # the first data block's compression byte: no such compression
    table.write_bytes(bytes(data))
    with pytest.raises(ldbscan.Unsupported, match="unknown compression"):
        _scan(tmp_path / "db")
    errors = []
    for native in (True, False):  # plyvel's iterator ends at the bad block: the same error either way
        with pytest.raises(LymphCVError) as caught:
            mean_module.mean_of_db(tmp_path / "db", native=native)
        errors.append(str(caught.value))
    assert errors[0] == errors[1]


def _varints(data, skip_entry_header: bool = False) -> list[int]:
    """The varints at the start of ``data`` (of an index block's first entry: its value's)."""
    from lymph_cv.formats.caffe.wire import decode_varint

    position, values = 0, []
    if skip_entry_header:
        shared, position = decode_varint(data, 0)
        key_length, position = decode_varint(data, position)
        _, position = decode_varint(data, position)
        position += key_length
    while len(values) < 4:
        value, position = decode_varint(data, position)
        values.append(value)
    return values


def test_accumulator_over_values():
    images = _images(9000, seed=9)
    values = [serialize_datum(image, 2) for image in images]
    accumulator = ldbscan.Accumulator(2)
    assert accumulator.add_values(iter(values[:5000])) == 5000
    assert accumulator.add_values([memoryview(v) for v in values[5000:]]) == 4000
    count, shape, total, mean, _ = accumulator.result()
    assert (count, shape) == (9000, (3, 6, 5)) and total == _naive_sum(images).astype("<f4").tobytes()
    broken = ldbscan.Accumulator()
    with pytest.raises(ldbscan.Unsupported):
        broken.add_values([values[0], serialize_datum(images[0][:1], 0)])
    with pytest.raises(ldbscan.Unsupported):
        broken.result()
    with pytest.raises(ldbscan.Unsupported, match="no records"):
        ldbscan.Accumulator().result()


def _tool(db, folder, native: bool):
    folder.mkdir()
    env = dict(os.environ, LYMPH_CV_NATIVE="1" if native else "0")
    probe = ("import runpy, sys\nsys.argv = [sys.argv[0]] + sys.argv[1:]\n"
             f"try:\n    runpy.run_path({TOOL!r}, run_name='__main__')\n"
             "finally:\n    print('NUMPY', 'numpy' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe, "-backend", "leveldb", str(db), "mean.binaryproto"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=folder)
    assert done.returncode == 0, done.stderr
    lines = [line.split("] ", 1)[1] if "] " in line else line for line in done.stderr.splitlines()]
    return lines


def test_tool_native_and_numpy_paths_write_and_log_the_same(tmp_path):
    images = _images(20500, (3, 4, 4), seed=10)
    _write(tmp_path / "db", images)
    native_lines = _tool(tmp_path / "db", tmp_path / "native", native=True)
    numpy_lines = _tool(tmp_path / "db", tmp_path / "numpy", native=False)
    assert (tmp_path / "native" / "mean.binaryproto").read_bytes() == (tmp_path / "numpy" / "mean.binaryproto").read_bytes()
    assert native_lines[:-1] == numpy_lines[:-1]
    assert native_lines[-1] == "NUMPY False" and numpy_lines[-1] == "NUMPY True"
    assert "Processed 20000 files." in native_lines and "Processed 20500 files." in native_lines


def _accumulate(records, floats_at: int):
    accumulator = mean_module.MeanAccumulator()
    table = np.concatenate([np.zeros((len(records), 3), np.uint8), records.reshape(len(records), -1)], axis=1)
    accumulator.add_batch(table[:floats_at, 3:], records.shape[1:])  # strided rows, as the bulk reader gives
    accumulator.add(records[floats_at])
    accumulator.add_float(np.full(records.shape[1:], 0.5, np.float32))
    accumulator.add_batch(records[floats_at + 1 :].reshape(len(records) - floats_at - 1, -1), records.shape[1:])
    return accumulator


@pytest.mark.parametrize("native", ["1", "0"])
def test_mean_accumulator_native_and_numpy_give_caffes_bytes(monkeypatch, native):
    monkeypatch.setenv(meanscan.NATIVE_ENV, native)
    images = _images(70000, (1, 2, 2), seed=11, low=230)  # past 2^24 before the float record
    accumulator = _accumulate(images, 69000)
    expected = _naive_sum(images[:69001])
    expected += np.float32(0.5)
    for image in images[69001:]:
        expected += image.reshape(-1)
    assert np.array_equal(accumulator.sum, expected) and expected.max() > 2**24
    assert accumulator.mean().astype("<f4").tobytes() == (expected / np.float32(70001)).astype("<f4").tobytes()
    only_rows = mean_module.MeanAccumulator()
    only_rows.add_batch(images.reshape(len(images), -1), (1, 2, 2))
    assert np.array_equal(only_rows.sum, _naive_sum(images))
    assert only_rows.uses_native == (native == "1") and not accumulator.uses_native
