"""LevelDB and LMDB stores: real files on disk, Caffe's keys, key order, overwrite rules."""
from __future__ import annotations

import os

import pytest

from lymph_cv.errors import FormatError, StoreError
from lymph_cv.formats.store import BACKENDS, detect_backend, make_key, open_reader, open_writer


def _records(n):
    # Written in a shuffled order: the reader must return them sorted by key.
    order = [(i * 7) % n for i in range(n)]
    return [(make_key(i, f"CLL/img_{i}.tif"), bytes([i % 256]) * (i % 5 + 1)) for i in order]


def test_make_key_is_caffes_format():
    assert make_key(42, "CLL_x_sub_3.tif") == b"00000042_CLL_x_sub_3.tif"


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_in_key_order(tmp_path, backend):
    path = tmp_path / f"DB_{backend}"
    records = _records(2503)
    with open_writer(path, backend, commit_every=1000) as writer:
        for key, value in records:
            writer.put(key, value)
        assert not path.exists()  # built under a temporary name
    assert len(writer) == len(records)
    assert detect_backend(path) == backend
    with open_reader(path) as reader:
        assert reader.backend == backend
        assert len(reader) == len(records)
        items = list(reader)
        assert items == sorted(records)
        assert reader.keys(3) == [key for key, _ in sorted(records)[:3]]
        assert list(reader.values()) == [value for _, value in sorted(records)]
        assert reader.get(make_key(5, "CLL/img_5.tif")) == dict(records)[make_key(5, "CLL/img_5.tif")]
        assert reader.get(b"missing") is None
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_lmdb_files_and_map_growth(tmp_path):
    path = tmp_path / "lmdb"
    value = os.urandom(64 * 1024)
    small = 1 << 20  # far too small: the map must grow several times
    with open_writer(path, "lmdb", commit_every=50, lmdb_map_size=small) as writer:
        for i in range(100):
            writer.put(make_key(i, "x"), value)
    assert {"data.mdb", "lock.mdb"} <= set(os.listdir(path))
    assert (path / "data.mdb").stat().st_size > 4 * small
    with open_reader(path, "lmdb") as reader:
        assert len(reader) == 100 and reader.get(make_key(99, "x")) == value


@pytest.mark.parametrize("backend", BACKENDS)
def test_existing_db_refused_unless_overwrite(tmp_path, backend):
    path = tmp_path / "db"
    with open_writer(path, backend) as writer:
        writer.put(b"a", b"1")
    with pytest.raises(StoreError, match="--overwrite") as info:
        with open_writer(path, backend):
            pass
    assert str(path) in str(info.value)
    # A failing overwrite keeps the old database intact.
    with pytest.raises(RuntimeError):
        with open_writer(path, backend, overwrite=True) as writer:
            writer.put(b"b", b"2")
            raise RuntimeError("crash")
    with open_reader(path) as reader:
        assert list(reader) == [(b"a", b"1")]
    with open_writer(path, backend, overwrite=True) as writer:
        writer.put(b"b", b"2")
    with open_reader(path) as reader:
        assert list(reader) == [(b"b", b"2")]
    assert [p.name for p in tmp_path.iterdir()] == ["db"]


def test_detect_backend_rejects_other_things(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_bytes(b"x")
    for name in ("empty", "file", "missing"):
        with pytest.raises(FormatError, match="LevelDB .* LMDB"):
            detect_backend(tmp_path / name)


def test_reader_backend_mismatch_and_bad_backend(tmp_path):
    path = tmp_path / "db"
    with open_writer(path, "leveldb") as writer:
        writer.put(b"k", b"v")
    with pytest.raises(StoreError, match="leveldb"):
        with open_reader(path, "lmdb"):
            pass
    with pytest.raises(StoreError, match="valid: leveldb, lmdb"):
        with open_writer(tmp_path / "other", "rocksdb"):
            pass


def test_leveldb_held_by_a_writer_cannot_be_read(tmp_path):
    import plyvel

    path = tmp_path / "db"
    with open_writer(path, "leveldb") as writer:
        writer.put(b"k", b"v")
    holder = plyvel.DB(str(path))  # LevelDB allows one process-wide opener at a time
    try:
        with pytest.raises(StoreError, match="cannot open LevelDB"):
            with open_reader(path):
                pass
    finally:
        holder.close()


def test_truncated_lmdb_is_a_format_error_not_a_crash(tmp_path):
    path = tmp_path / "lmdb"
    with open_writer(path, "lmdb") as writer:
        for i in range(300):
            writer.put(make_key(i, "x"), os.urandom(1000))
    data = (path / "data.mdb").read_bytes()
    (path / "data.mdb").write_bytes(data[:3 * 4096])  # both meta pages kept, the records cut off
    # Without the check LMDB maps past the end of the file and the process dies of SIGBUS.
    with pytest.raises(FormatError, match="truncated LMDB"):
        with open_reader(path, "lmdb"):
            pass
    (path / "data.mdb").write_bytes(data)
    with open_reader(path, "lmdb") as reader:
        assert len(reader) == 300


def test_overwrite_never_replaces_a_folder_that_is_not_a_database(tmp_path):
    folder = tmp_path / "work"
    (folder / "subs").mkdir(parents=True)
    (folder / "subs" / "a.tif").write_bytes(b"precious")
    with pytest.raises(StoreError, match="not a LevelDB/LMDB database; refusing to replace it"):
        with open_writer(folder, "leveldb", overwrite=True) as writer:
            writer.put(b"a", b"1")
    assert (folder / "subs" / "a.tif").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    (tmp_path / "empty").mkdir()
    with open_writer(tmp_path / "empty", "lmdb", overwrite=True) as writer:  # an empty folder may be used
        writer.put(b"a", b"1")


def test_lmdb_increasing_commits_appended_the_rest_put(tmp_path):
    import threading

    path = tmp_path / "lmdb"
    increasing = [(make_key(i, "x"), os.urandom(3000 + i)) for i in range(0, 600, 2)]
    lower = [(make_key(i, "x"), os.urandom(10)) for i in range(1, 300, 2)]  # below keys already written
    with open_writer(path, "lmdb", commit_every=100) as writer:
        for key, value in increasing + lower:
            writer.put(key, value)
        writer.put_many([make_key(1000, "x"), make_key(999, "x")], [b"a", b"b"])  # one commit out of order
    assert not [t for t in threading.enumerate() if t.name.startswith("flush ")]  # the flushing thread ended
    with open_reader(path, "lmdb") as reader:
        assert list(reader) == sorted(increasing + lower + [(make_key(1000, "x"), b"a"), (make_key(999, "x"), b"b")])
