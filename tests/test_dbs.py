"""Step 3: databases from patch files and straight from images, mean files, bad inputs."""
from __future__ import annotations

import errno
import re
import json
import os

import cv2
import numpy as np
import pytest

from datautil import list_workdir
from lymph_cv.stages import dbs, folds, patches, synth
from lymph_cv.formats import leveldb_tables, store
from lymph_cv.formats.caffe.blob import read_mean
from lymph_cv.formats.caffe.datum import parse_datum
from lymph_cv.errors import InputError, LymphCVError, StoreError


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A 2-fold work folder: 6 synthetic images of 120×100 → 12 patches each, lists, no DBs."""
    return list_workdir(tmp_path_factory.mktemp("work"), width=120, height=100)


def _fresh(workdir, tmp_path):
    """A copy of the work folder's lists (not its patches) so each test builds its own DBs."""
    import shutil

    for name in workdir.iterdir():
        if name.suffix == ".txt" or name.name == "folds.json":
            shutil.copy(name, tmp_path / name.name)
    (tmp_path / "subs").symlink_to(workdir / "subs")
    return tmp_path


def _records(path):
    with store.open_reader(path) as reader:
        return list(reader)


def _patch(workdir, name):
    return cv2.imread(str(workdir / name), cv2.IMREAD_COLOR).transpose(2, 0, 1)


def test_unshuffled_db_is_the_list_in_order(workdir, tmp_path):
    entries = dbs.read_image_list(workdir / "train_w32_1.txt")
    result = dbs.convert_list(workdir, workdir / "train_w32_1.txt", tmp_path / "db", backend="leveldb")
    assert result.records == len(entries)
    records = _records(tmp_path / "db")
    assert [k for k, _ in records] == [store.make_key(i, e.name) for i, e in enumerate(entries)]
    for (key, value), entry in zip(records[:5], entries):
        pixels, label = parse_datum(value)
        assert label == entry.label and pixels.shape == (3, 36, 36)
        assert np.array_equal(pixels, _patch(workdir, entry.name))


def test_build_dbs_shuffled_permutation_and_mean(workdir, tmp_path):
    work = _fresh(workdir, tmp_path)
    results = dbs.build_dbs(work, seed=7, workers=1)
    assert len(results) == 4
    record = json.loads((work / "dbs.json").read_text())
    assert record["seed"] == 7 and record["backend"] == "leveldb"
    for fold in (1, 2):
        for side in ("train", "test"):
            entries = dbs.read_image_list(work / f"{side}_w32_{fold}.txt")
            records = _records(work / f"DB_{side}_{fold}")
            assert len(records) == len(entries)  # record count = list length
            names = [k.split(b"_", 1)[1].decode() for k, _ in records]
            assert names != [e.name for e in entries] and sorted(names) == sorted(e.name for e in entries)
            order = dbs.shuffled_order(len(entries), 7)
            assert names == [entries[j].name for j in order]
            assert [parse_datum(v)[1] for _, v in records] == [entries[j].label for j in order]
        train = dbs.read_image_list(work / f"train_w32_{fold}.txt")
        stack = np.stack([_patch(workdir, e.name) for e in train]).astype(np.float64)
        mean = read_mean(work / f"DB_train_w32_{fold}.binaryproto")
        assert mean.dtype == np.float32 and mean.shape == (3, 36, 36)
        assert np.abs(mean - stack.mean(0)).max() < 1e-4
    (tmp_path / "again").mkdir()
    again = _fresh(workdir, tmp_path / "again")
    dbs.build_dbs(again, seed=7, workers=2)
    assert _records(again / "DB_train_2") == _records(work / "DB_train_2")


def test_direct_from_images_equals_files_path(workdir, tmp_path):
    (tmp_path / "a").mkdir()
    files = _fresh(workdir, tmp_path / "a")
    # The direct work folder has a manifest but no patch files at all.
    direct = tmp_path / "b"
    manifest = patches.extract_patches(workdir / "data", direct / "subs", workers=1, write_patches=False)
    assert [p.name for p in (direct / "subs").iterdir()] == [patches.MANIFEST_NAME]
    folds.make_folds(manifest, direct, k=2, seed=0)
    assert (direct / "test_w32_2.txt").read_text() == (files / "test_w32_2.txt").read_text()
    dbs.build_dbs(files, seed=3, workers=1, backend="lmdb")
    dbs.build_dbs(direct, seed=3, workers=2, backend="lmdb", images=workdir / "data")
    assert store.detect_backend(direct / "DB_test_1") == "lmdb"
    for fold in (1, 2):
        for side in ("train", "test"):
            assert _records(files / f"DB_{side}_{fold}") == _records(direct / f"DB_{side}_{fold}")
        mean = f"DB_train_w32_{fold}.binaryproto"
        assert (files / mean).read_bytes() == (direct / mean).read_bytes()
    assert json.loads((direct / "dbs.json").read_text())["source"] == "images"
    assert not [p for p in direct.iterdir() if p.name.startswith(".")]  # the patch array is gone


def test_unshuffled_build(workdir, tmp_path, runner, cli):
    work = _fresh(workdir, tmp_path)
    result = runner.invoke(cli, ["dbs", str(work), "--no-shuffle", "--workers", "1", "--fold", "1", "--fold", "1"])
    assert result.exit_code == 0, result.stderr
    assert result.output.count("DB_train_1:") == 1  # a repeated --fold is built once
    entries = dbs.read_image_list(work / "test_w32_1.txt")
    assert [k for k, _ in _records(work / "DB_test_1")] == [store.make_key(i, e.name) for i, e in enumerate(entries)]
    assert json.loads((work / "dbs.json").read_text())["shuffle"] is False
    both = runner.invoke(cli, ["dbs", str(work), "--images", str(work), "--root", str(work)])
    assert both.exit_code == 2 and "--root does not apply with --images" in both.stderr
    absent = runner.invoke(cli, ["dbs", str(work), "--workers", "1", "--fold", "9"])
    assert absent.exit_code == 2 and absent.stderr.startswith("error: --fold: fold 9 has no lists")
    assert "(valid: 1, 2)" in absent.stderr


def test_mean_accumulator_matches_caffe_float32_running_sum():
    rng = np.random.default_rng(0)
    rows = rng.integers(230, 256, (90000, 4), dtype=np.uint8)  # passes 2^24 after ~69k bright rows
    accumulator = dbs.MeanAccumulator()
    accumulator.add_batch(rows[:1000], (1, 2, 2))
    for row in rows[1000:1010]:
        accumulator.add(row.reshape(1, 2, 2))
    accumulator.add_batch(rows[1010:], (1, 2, 2))
    expected = np.zeros(4, np.float32)
    for row in rows:
        expected += row  # one float32 rounding per record, as compute_image_mean
    assert expected.max() > 2**24
    assert np.array_equal(accumulator.sum, expected)
    assert np.array_equal(accumulator.mean().ravel(), expected / np.float32(90000))
    assert not np.array_equal(expected, rows.sum(0, dtype=np.int64).astype(np.float32))


def test_channel_means_like_compute_image_mean():
    mean = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    assert dbs.channel_means(mean) == [4.0, 13.0]


@pytest.mark.parametrize("line, words", [
    ("justaname.tif", "expected '<file><TAB or space><integer label>'"),
    ("subs/a.tif\tx", "expected '<file><TAB or space><integer label>'"),
    ("subs/a.tif\t7", "label 7 is outside the 3 classes (0..2)"),
    ("../escape.tif\t0", "must be a relative path inside the root folder"),
    ("/abs/a.tif\t0", "must be a relative path inside the root folder"),
])
def test_bad_list_lines(workdir, tmp_path, runner, cli, line, words):
    work = _fresh(workdir, tmp_path)
    listed = work / "test_w32_2.txt"
    listed.write_text(listed.read_text() + line + "\n")
    result = runner.invoke(cli, ["dbs", str(work), "--workers", "1"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "test_w32_2.txt" in lines[0] and words in lines[0]
    assert not (work / "DB_test_2").exists()


def test_list_split_at_last_whitespace_run(tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_text("a b.tif \t 1\nc.tif 2\n\n  d.tif\t0  \n")
    assert [(e.name, e.label, e.line) for e in dbs.read_image_list(listed)] == [("a b.tif", 1, 1), ("c.tif", 2, 2), ("d.tif", 0, 4)]
    listed.write_text("\n")
    with pytest.raises(InputError, match="list is empty"):
        dbs.read_image_list(listed)


def test_missing_patch_file_and_skip_bad(workdir, tmp_path, runner, cli, caplog):
    work = _fresh(workdir, tmp_path)
    listed = work / "train_w32_1.txt"
    listed.write_text("subs/not_there_sub_1.tif\t0\n" + listed.read_text())
    result = runner.invoke(cli, ["dbs", str(work), "--workers", "1"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not_there_sub_1.tif" in lines[0] and "train_w32_1.txt line 1" in lines[0]
    assert not (work / "DB_train_1").exists() and not (work / "DB_train_w32_1.binaryproto").exists()
    skipped = runner.invoke(cli, ["dbs", str(work), "--workers", "1", "--skip-bad", "--overwrite"])
    assert skipped.exit_code == 0, skipped.stderr
    assert any("1 bad input(s) skipped" in r.getMessage() for r in caplog.records)
    lines = len(dbs.read_image_list(listed))
    assert len(_records(work / "DB_train_1")) == lines - 1


def test_existing_db_needs_overwrite_but_finished_work_is_kept(workdir, tmp_path, runner, cli):
    work = _fresh(workdir, tmp_path)
    assert runner.invoke(cli, ["dbs", str(work), "--workers", "1"]).exit_code == 0
    stamp = (work / "DB_train_1" / "CURRENT").stat().st_mtime_ns
    # Same lists, backend and seed: the finished databases are kept, not an error.
    assert runner.invoke(cli, ["dbs", str(work), "--workers", "1"]).exit_code == 0
    assert (work / "DB_train_1" / "CURRENT").stat().st_mtime_ns == stamp
    other = runner.invoke(cli, ["dbs", str(work), "--workers", "1", "--seed", "5"])
    assert other.exit_code == 2 and "DB_train_1: was built from another list, patch set, backend or seed" in other.stderr
    replaced = runner.invoke(cli, ["dbs", str(work), "--workers", "1", "--seed", "5", "--overwrite", "--fold", "2"])
    assert replaced.exit_code == 0, replaced.stderr
    assert "DB_test_2: " in replaced.output and "DB_test_1" not in replaced.output


@pytest.mark.parametrize("native", ["1", "0"])
def test_no_space_left(workdir, tmp_path, monkeypatch, native):
    work = _fresh(workdir, tmp_path)

    def full(self, *records):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setenv(leveldb_tables.NATIVE_ENV, native)
    monkeypatch.setattr(store._LevelDBWriter, "_write", full)
    monkeypatch.setattr(leveldb_tables.TableWriter, "add", full)
    with pytest.raises(StoreError, match="DB_train_1: no space left on device"):
        dbs.build_dbs(work, workers=1)
    assert not (work / "DB_train_1").exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".")]


def test_no_lists(tmp_path, runner, cli):
    result = runner.invoke(cli, ["dbs", str(tmp_path)])
    assert result.exit_code == 2 and "no train_w32_K.txt" in result.stderr


def test_direct_path_with_an_unreadable_image(workdir, tmp_path, caplog):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(workdir / "data", data)
    broken = sorted((data / "FL").iterdir())[0]
    broken.write_bytes(broken.read_bytes()[:100])
    work = tmp_path / "w"
    manifest = patches.extract_patches(workdir / "data", work / "subs", workers=1, write_patches=False)
    folds.make_folds(manifest, work, k=2, seed=0)
    with pytest.raises(InputError, match=f"{broken.name}: not an image"):
        dbs.build_dbs(work, images=data, workers=1)
    assert not (work / "DB_train_1").exists() and not (work / "DB_test_1").exists()
    results = dbs.build_dbs(work, images=data, workers=1, skip_bad=True)
    lost = patches.patch_count(100, 120)
    assert sum(r.records for r in results) == 2 * (manifest.total_patches - lost)
    assert any("bad input(s) skipped" in r.getMessage() for r in caplog.records)


def test_mean_of_db_mixed_records(tmp_path):
    from lymph_cv.formats.caffe.datum import array_to_datum, encoded_datum, serialize_datum

    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (5, 3, 4, 6), dtype=np.uint8)
    with store.open_writer(tmp_path / "db", "lmdb") as writer:
        writer.put(store.make_key(0, "a"), serialize_datum(images[0], 0))
        ok, png = cv2.imencode(".png", images[1].transpose(1, 2, 0))
        writer.put(store.make_key(1, "b"), encoded_datum(png.tobytes(), 1).SerializeToString())
        writer.put(store.make_key(2, "c"), array_to_datum(images[2].astype(np.float32), 2).SerializeToString())
        writer.put(store.make_key(3, "d"), serialize_datum(images[3], 0))
        writer.put(store.make_key(4, "e"), serialize_datum(images[4], 1))
    mean, count = dbs.mean_of_db(tmp_path / "db")
    assert count == 5 and np.allclose(mean, images.astype(np.float64).mean(0), atol=1e-4)
    with store.open_writer(tmp_path / "bad", "lmdb") as writer:
        writer.put(store.make_key(0, "a"), serialize_datum(images[0], 0))
        writer.put(store.make_key(1, "b"), serialize_datum(images[0][:, :2], 0))
    with pytest.raises(InputError, match="record 1: record is 3x2x6, the first was 3x4x6"):
        dbs.mean_of_db(tmp_path / "bad")


def test_rerun_after_a_failure_keeps_the_databases_that_finished(workdir, tmp_path, runner, cli):
    work = _fresh(workdir, tmp_path)
    listed = work / "train_w32_1.txt"
    good = listed.read_text()
    listed.write_text(good + "subs/missing_sub_1.tif\t0\n")
    failed = runner.invoke(cli, ["dbs", str(work), "--workers", "2"])
    assert failed.exit_code == 2 and "missing_sub_1.tif" in failed.stderr
    listed.write_text(good)
    # Databases finished beside the failing one are recorded, so no --overwrite is needed.
    again = runner.invoke(cli, ["dbs", str(work), "--workers", "2"])
    assert again.exit_code == 0, again.stderr
    assert json.loads((work / "dbs.json").read_text())["dbs"].keys() == {"DB_train_1", "DB_train_2", "DB_test_1", "DB_test_2"}


def test_patch_folder_outside_the_work_folder(workdir, tmp_path):
    work = tmp_path / "work"
    manifest = patches.load_manifest(workdir / "subs")  # patches live in another folder
    folds.make_folds(manifest, work, k=2, seed=0)
    results = dbs.build_dbs(work, workers=1, folds=[2])
    assert sum(r.records for r in results) == manifest.total_patches


@pytest.mark.parametrize("label, words", [
    ("99999999999", "label 99999999999 does not fit Caffe's int32 label"),  # was stored wrapped
    ("1_0", "expected '<file><TAB or space><integer label>'"),  # Python's int() reads 10
    ("\u0663", "expected '<file><TAB or space><integer label>'"),  # an Arabic-Indic three
])
def test_labels_are_ascii_int32(tmp_path, label, words):
    listed = tmp_path / "list.txt"
    listed.write_text(f"a.tif\t-1\nb.tif {label}\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 2: " + re.escape(words)):
        dbs.read_image_list(listed)
    listed.write_text("a.tif\t-1\nb.tif +2\n")
    assert [e.label for e in dbs.read_image_list(listed)] == [-1, 2]


@pytest.mark.parametrize("record", ["[1, 2]", '{"list_root": 5}', '{"manifest": 7}'])
def test_a_foreign_folds_json_is_refused(tmp_path, record):
    (tmp_path / "folds.json").write_text(record)
    with pytest.raises(InputError, match="folds.json: not a folds.json written by `lymph-cv folds`"):
        dbs.folds_record(tmp_path)
    (tmp_path / "dbs.json").write_text("[3]")
    assert dbs.read_dbs_json(tmp_path) == {}


def test_patches_of_another_window_size_are_not_kept(tmp_path):
    synth.generate(tmp_path / "data", per_class=2, cases_per_class=1, width=110, height=90, workers=1)
    work = tmp_path / "w"
    patches.extract_patches(tmp_path / "data", work / "subs", workers=1)
    folds.make_folds(work / "subs", work, k=2, seed=0)
    dbs.build_dbs(work, workers=1, folds=[1])
    # Same names and counts with 34-pixel windows: the lists stay byte-identical.
    listed = (work / "train_w32_1.txt").read_bytes()
    patches.extract_patches(tmp_path / "data", work / "subs", workers=1, patch_size=34)
    folds.make_folds(work / "subs", work, k=2, seed=0)
    assert (work / "train_w32_1.txt").read_bytes() == listed
    with pytest.raises(StoreError, match="was built from another list, patch set, backend or seed"):
        dbs.build_dbs(work, workers=1, folds=[1])
    dbs.build_dbs(work, workers=1, folds=[1], overwrite=True)
    assert read_mean(work / "DB_train_w32_1.binaryproto").shape == (3, 34, 34)


def test_temporaries_of_a_killed_run_are_swept(workdir, tmp_path):
    work = _fresh(workdir, tmp_path)
    dead = work / ".DB_train_1.tmp-999999999-abcdef12"  # no such pid: its writer is gone
    (dead / "x").mkdir(parents=True)
    alive = work / f".DB_test_1.tmp-{os.getpid()}-abcdef12"  # a running writer's: kept
    alive.mkdir()
    dbs.build_dbs(work, workers=1, folds=[1])
    assert not dead.exists() and alive.is_dir()


def test_a_mean_that_cannot_be_written_takes_its_database_with_it(workdir, tmp_path, monkeypatch):
    work = _fresh(workdir, tmp_path)
    (work / "DB_train_w32_1.binaryproto").mkdir()  # the mean's name is taken by a folder
    with pytest.raises(LymphCVError, match="DB_train_w32_1.binaryproto: is a folder"):
        dbs.build_dbs(work, workers=1, folds=[1])
    assert not (work / "DB_train_1").exists()  # else the rerun would ask for --overwrite
    (work / "DB_train_w32_1.binaryproto").rmdir()
    assert len(dbs.build_dbs(work, workers=1, folds=[1])) == 2
