"""Atomic writes: a final name only ever holds finished output."""
from __future__ import annotations

import json

import pytest

from lymph_cv.core.fsutil import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text


def test_atomic_write_bytes_and_text_replace_the_file(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_text(target, "twö")
    assert target.read_text(encoding="utf-8") == "twö"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.bin"]


def test_atomic_write_json_is_sorted_with_newline(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"b": 1, "a": [1, 2]})
    text = target.read_text()
    assert text.endswith("\n") and text.index('"a"') < text.index('"b"')
    assert json.loads(text) == {"a": [1, 2], "b": 1}


def test_error_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temp:
            temp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_directory_is_built_aside_then_replaces_the_old_one(tmp_path):
    target = tmp_path / "db"
    target.mkdir()
    (target / "old").write_text("1")
    with atomic_path(target) as temp:
        temp.mkdir()
        (temp / "new").write_text("2")
        assert not (target / "new").exists()
    assert [p.name for p in target.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["db"]


def test_nothing_written_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "never"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_remove_stale_temporaries_keeps_live_writers(tmp_path):
    import os
    import subprocess

    from lymph_cv.core.fsutil import remove_stale_temporaries, temp_sibling

    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp_path / f".DB_train_1.tmp-{gone.pid}-deadbeef"
    stale.mkdir()
    live = temp_sibling(tmp_path / "DB_test_1")
    live.mkdir()
    plain = tmp_path / "DB_train_2"
    plain.mkdir()
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert live.exists() and plain.exists() and not stale.exists()
    assert str(os.getpid()) in live.name


def test_a_file_never_replaces_a_folder_nor_a_folder_a_file(tmp_path):
    from lymph_cv.errors import LymphCVError
    from lymph_cv.core.fsutil import make_dirs

    folder = tmp_path / "images"
    (folder / "CLL").mkdir(parents=True)
    (folder / "CLL" / "a.tif").write_bytes(b"keep")
    with pytest.raises(LymphCVError, match="is a folder; expected a file name"):
        atomic_write_bytes(folder, b"mean")
    assert (folder / "CLL" / "a.tif").read_bytes() == b"keep"
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(LymphCVError, match="is a file; expected a folder"):
        atomic_write_bytes(plain / "m.binaryproto", b"mean")
    with pytest.raises(LymphCVError, match="is a file; expected a folder"):
        with atomic_path(plain) as temp:
            temp.mkdir()
    assert plain.read_text() == "x"
    with pytest.raises(LymphCVError, match="cannot create folder"):
        make_dirs("/proc/no-such-folder/x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "plain"]
