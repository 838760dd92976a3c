"""LevelDB tables written natively (formats/leveldb_tables.py, the C module ldbwrite): the databases
LevelDB itself opens, iterates, checks and compacts hold exactly the records a LevelDB-written
database of the same puts holds; keys that stop increasing go on through LevelDB; the direct
images → databases path gives the same bytes with and without the native paths."""
from __future__ import annotations

import os
import random
import shutil

import numpy as np
import plyvel
import pytest

from datautil import list_workdir
from lymph_cv.formats import leveldb_tables, ldbwrite, store
from lymph_cv.stages import dbs, folds, patches

#: Value sizes around the 64 KiB block: empty, small, a patch record, larger than a block.
SIZES = (0, 1, 17, 3898, 70_000)


def _crc32c_reference(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _records(count: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    return [(store.make_key(i, f"subs/img_{rng.randrange(10**6)}_sub_{i}.tif"), rng.randbytes(rng.choice(SIZES)))
            for i in range(count)]


def _write(path, records, native: bool, monkeypatch, batch: int = 100) -> None:
    monkeypatch.setenv(leveldb_tables.NATIVE_ENV, "1" if native else "0")
    with store.open_writer(path, "leveldb") as writer:
        for start in range(0, len(records), batch):
            chunk = records[start : start + batch]
            writer.put_many([k for k, _ in chunk], [v for _, v in chunk])


def _contents(path) -> list[tuple[bytes, bytes]]:
    db = plyvel.DB(os.fspath(path), paranoid_checks=True)
    try:
        return list(db.iterator(verify_checksums=True))
    finally:
        db.close()


def test_crc32c_matches_the_definition():
    assert ldbwrite.crc32c(b"123456789") == 0xE3069283  # the check value of CRC-32C
    data = random.Random(1).randbytes(5000)
    for start, end in ((0, 5000), (3, 4093), (7, 8)):  # unaligned heads and tails
        assert ldbwrite.crc32c(data[start:end]) == _crc32c_reference(data[start:end])
    assert ldbwrite.crc32c(data[100:], ldbwrite.crc32c(data[:100])) == ldbwrite.crc32c(data)


def test_tables_hold_what_leveldb_writes(tmp_path, monkeypatch):
    records = _records(3000)
    _write(tmp_path / "native", records, True, monkeypatch)
    _write(tmp_path / "leveldb", records, False, monkeypatch)
    assert any(name.endswith(".ldb") for name in os.listdir(tmp_path / "native"))
    assert not any(name.endswith(".log") and os.path.getsize(tmp_path / "native" / name)
                   for name in os.listdir(tmp_path / "native"))  # nothing went through LevelDB's log
    assert _contents(tmp_path / "native") == _contents(tmp_path / "leveldb") == records
    with store.open_reader(tmp_path / "native") as reader:
        assert len(reader) == len(records) and reader.get(records[1234][0]) == records[1234][1]
    # LevelDB works on it as on its own: overwrites, deletes, a full compaction, a reopen.
    db = plyvel.DB(os.fspath(tmp_path / "native"))
    db.put(records[5][0], b"new")
    db.delete(records[6][0])
    db.put(b"~after", b"x")
    db.compact_range()
    db.close()
    expected = dict(records) | {records[5][0]: b"new", b"~after": b"x"}
    del expected[records[6][0]]
    assert _contents(tmp_path / "native") == sorted(expected.items())


def test_many_tables_and_a_manifest_over_several_log_blocks(tmp_path):
    folder = tmp_path / "db"
    folder.mkdir()
    records = [(b"%08d_%s" % (i, b"k" * 200), b"v%d" % i) for i in range(400)]
    writer = leveldb_tables.TableWriter(folder, table_bytes=1, block_size=1)  # one record per table
    assert writer.add([k for k, _ in records], [v for _, v in records]) == len(records)
    assert writer.finish() == len(records)
    assert (folder / "MANIFEST-000001").stat().st_size > 2 * 32768
    assert len([n for n in os.listdir(folder) if n.endswith(".ldb")]) == len(records)
    assert _contents(folder) == records


@pytest.mark.parametrize("native", [True, False])
def test_keys_that_stop_increasing_go_on_through_leveldb(tmp_path, monkeypatch, native):
    records = _records(500)
    later = [records[10], (records[20][0], b"replaced"), (b"00000000", b"first")] + _records(50, seed=2)
    _write(tmp_path / "db", records + later, native, monkeypatch, batch=37)
    assert _contents(tmp_path / "db") == sorted(dict(records + later).items())


def test_fixed_width_values(tmp_path, monkeypatch):
    monkeypatch.setenv(leveldb_tables.NATIVE_ENV, "1")
    table = np.random.default_rng(0).integers(0, 256, (300, 50), np.uint8)
    keys = [store.make_key(i, "x") for i in range(300)]
    with store.open_writer(tmp_path / "db", "leveldb") as writer:
        writer.put_fixed(keys[:200], table[:200], 50)
        writer.put_fixed(keys[:1] + keys[200:], table[199:], 50)  # a repeated key mid-batch
    expected = dict(zip(keys[:200], map(bytes, table[:200]))) | dict(zip(keys[:1] + keys[200:], map(bytes, table[199:])))
    assert _contents(tmp_path / "db") == sorted(expected.items())


def test_pread_rows(tmp_path):
    data = np.arange(10 * 6, dtype=np.uint8).reshape(10, 6)
    path = tmp_path / "rows"
    path.write_bytes(data.tobytes())
    out = np.zeros((3, 10), np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        leveldb_tables.pread_rows(fd, np.array([7, 0, 7], np.int64), 6, out, 2)
        assert (out[:, 2:8] == data[[7, 0, 7]]).all() and not out[:, :2].any() and not out[:, 8:].any()
        with pytest.raises(EOFError):
            leveldb_tables.pread_rows(fd, np.array([10], np.int64), 6, out[:1], 0)
        with pytest.raises(ValueError):
            leveldb_tables.pread_rows(fd, np.array([1, 2], np.int64), 6, out, 0)  # 2 rows, 3 slots
    finally:
        os.close(fd)


def test_direct_path_same_bytes_native_or_not(tmp_path, monkeypatch):
    """``dbs --images``: tables and rows read with pread, or LevelDB's writes and the mapped array."""
    source = list_workdir(tmp_path / "src", width=120, height=100)
    built = {}
    for native in ("1", "0"):
        monkeypatch.setenv(leveldb_tables.NATIVE_ENV, native)
        work = tmp_path / f"native{native}"
        manifest = patches.extract_patches(source / "data", work / "subs", workers=1, write_patches=False)
        folds.make_folds(manifest, work, k=2, seed=0)
        dbs.build_dbs(work, seed=3, workers=2, images=source / "data")
        built[native] = work
    for fold in (1, 2):
        for side in ("train", "test"):
            assert _contents(built["1"] / f"DB_{side}_{fold}") == _contents(built["0"] / f"DB_{side}_{fold}")
        mean = f"DB_train_w32_{fold}.binaryproto"
        assert (built["1"] / mean).read_bytes() == (built["0"] / mean).read_bytes()
    assert any(n.endswith(".ldb") for n in os.listdir(built["1"] / "DB_train_1"))
    shutil.rmtree(tmp_path / "src")
