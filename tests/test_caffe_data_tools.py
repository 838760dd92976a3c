"""The drop-in tools: gflags syntax, convert_imageset / compute_image_mean, the tutorial's step-3 script."""
from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import REPO_ROOT
from datautil import list_workdir
from lymph_cv.stages import dbs, folds
from lymph_cv.formats import gflags, store
from lymph_cv.formats.caffe import caffe_pb2
from lymph_cv.formats.caffe.datum import parse_datum
from lymph_cv.commands import compute_image_mean, convert_imageset
from lymph_cv.errors import ConfigError

SPEC = {
    "shuffle": gflags.Flag(bool, False),
    "backend": gflags.Flag(str, "lmdb"),
    "resize_width": gflags.Flag(int, 0),
}


@pytest.mark.parametrize("argv, expected", [
    (["-shuffle", "-backend", "leveldb", "a", "b"], {"shuffle": True, "backend": "leveldb"}),
    (["--shuffle", "--backend=leveldb", "a", "b"], {"shuffle": True, "backend": "leveldb"}),
    (["a", "-backend=leveldb", "b", "-shuffle=true"], {"shuffle": True, "backend": "leveldb"}),
    (["-shuffle", "-noshuffle", "a", "b"], {"shuffle": False}),
    (["--shuffle=false", "a", "--resize_width", "32", "b"], {"shuffle": False, "resize_width": 32}),
    (["-resize_width=-3", "a", "--", "-b"], {"resize_width": -3}),
])
def test_gflags_syntax(argv, expected):
    values, positional = gflags.parse(argv, SPEC)
    assert {k: values[k] for k in expected} == expected
    assert positional in (["a", "b"], ["a", "-b"])


@pytest.mark.parametrize("argv, words", [
    (["-nope"], "unknown command line flag 'nope'"),
    (["-resize_width", "x"], "illegal value 'x' specified for int32 flag 'resize_width'"),
    (["-shuffle=maybe"], "illegal value 'maybe' specified for bool flag 'shuffle'"),
    (["-backend"], "flag '-backend' is missing its argument"),
    (["-resize_width=2147483648"], "illegal value '2147483648' specified for int32 flag 'resize_width'"),
])
def test_gflags_errors(argv, words):
    with pytest.raises(ConfigError, match=words):
        gflags.parse(argv, SPEC)
    with pytest.raises(gflags.HelpRequested):
        gflags.parse(["--help"], SPEC)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A 2-fold work folder from 6 synthetic images of 100×80 (8 patches each), lists only."""
    return list_workdir(tmp_path_factory.mktemp("tools"), width=100, height=80)


def _records(path):
    with store.open_reader(path) as reader:
        return list(reader)


def test_convert_imageset_flag_forms_agree(work, tmp_path, capsys):
    root = f"{work}/"
    lst = str(work / "train_w32_1.txt")
    assert convert_imageset.main(["-shuffle", "-backend", "leveldb", root, lst, str(tmp_path / "a")]) == 0
    assert convert_imageset.main(["--backend=leveldb", root, "--shuffle", lst, str(tmp_path / "b")]) == 0
    assert convert_imageset.main(["-shuffle=true", "-seed", "0", "--backend", "leveldb", root, lst, str(tmp_path / "c")]) == 0
    a = _records(tmp_path / "a")
    assert a == _records(tmp_path / "b") == _records(tmp_path / "c")
    err = capsys.readouterr().err
    assert "Shuffling data (seed 0)" in err and f"A total of {len(a)} images." in err
    assert convert_imageset.main([root, lst, str(tmp_path / "d")]) == 0  # lmdb, list order
    assert store.detect_backend(tmp_path / "d") == "lmdb"
    entries = dbs.read_image_list(lst)
    assert [k for k, _ in _records(tmp_path / "d")] == [store.make_key(i, e.name) for i, e in enumerate(entries)]


def test_convert_imageset_image_options(work, tmp_path):
    root, lst = f"{work}/", str(work / "test_w32_1.txt")
    first = dbs.read_image_list(lst)[0]
    source = cv2.imread(str(work / first.name))
    assert convert_imageset.main(["-gray", "-resize_width", "20", "-resize_height", "10", root, lst, str(tmp_path / "g")]) == 0
    pixels, _ = parse_datum(_records(tmp_path / "g")[0][1])
    expected = cv2.resize(cv2.imread(str(work / first.name), cv2.IMREAD_GRAYSCALE), (20, 10))
    assert pixels.shape == (1, 10, 20) and np.array_equal(pixels[0], expected)
    # -encoded keeps a .tif file's bytes verbatim; -encode_type png re-encodes.
    assert convert_imageset.main(["-encoded", root, lst, str(tmp_path / "e")]) == 0
    datum = caffe_pb2.Datum.FromString(_records(tmp_path / "e")[0][1])
    assert datum.encoded and datum.data == (work / first.name).read_bytes() and not datum.HasField("channels")
    assert convert_imageset.main(["-encoded", "-encode_type", "png", root, lst, str(tmp_path / "p")]) == 0
    pixels, _ = parse_datum(_records(tmp_path / "p")[0][1])
    assert np.array_equal(pixels, source.transpose(2, 0, 1))


def test_convert_imageset_bad_input(work, tmp_path, capsys):
    root = f"{work}/"
    mixed = tmp_path / "mixed.txt"
    big = tmp_path / "big.tif"
    cv2.imwrite(str(big), np.zeros((40, 40, 3), np.uint8))
    first = dbs.read_image_list(work / "test_w32_1.txt")[0]
    mixed.write_text(f"{first.name}\t0\n../{big.parent.name}/big.tif 1\n")
    assert convert_imageset.main([root, str(mixed), str(tmp_path / "x")]) == 2
    assert "must be a relative path inside the root folder" in capsys.readouterr().err
    sized = tmp_path / "sized.txt"
    (work / "big_sub_1.tif").write_bytes(big.read_bytes())
    sized.write_text(f"{first.name}\t0\nbig_sub_1.tif\t1\n")
    assert convert_imageset.main(["-check_size", root, str(sized), str(tmp_path / "y")]) == 2
    assert "-check_size" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert convert_imageset.main([root, str(sized), str(tmp_path / "y")]) == 0  # sizes may differ without it
    assert convert_imageset.main([root, str(sized), str(tmp_path / "y")]) == 2
    assert "already exists" in capsys.readouterr().err
    missing = tmp_path / "missing.txt"
    missing.write_text("nothere.tif 0\n" + f"{first.name} 0\n")
    assert convert_imageset.main([root, str(missing), str(tmp_path / "z")]) == 2
    assert "nothere.tif" in capsys.readouterr().err
    assert convert_imageset.main(["-skip_bad", root, str(missing), str(tmp_path / "z")]) == 0
    assert [k for k, _ in _records(tmp_path / "z")] == [store.make_key(1, first.name)]  # index 0 consumed
    assert convert_imageset.main(["-bogus", root, str(missing), str(tmp_path / "w")]) == 2
    assert convert_imageset.main([root]) == 2
    assert "expected ROOTFOLDER/ LISTFILE DB_NAME" in capsys.readouterr().err
    nul = tmp_path / "nul.txt"  # os.open's ValueError (embedded null byte) was a traceback
    nul.write_bytes(f"{first.name} 0\n{first.name}\0 1\n".encode())
    assert convert_imageset.main([root, str(nul), str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err
    assert f"error: {nul}: line 2: " in err and "holds a NUL byte" in err and "Traceback" not in err
    assert not (tmp_path / "n").exists()


def test_compute_image_mean(work, tmp_path, capsys):
    dbs.convert_list(work, work / "train_w32_2.txt", tmp_path / "db", backend="leveldb", seed=1,
                     mean_path=tmp_path / "ours.binaryproto")
    assert compute_image_mean.main([str(tmp_path / "db"), str(tmp_path / "mean.binaryproto"), "-backend", "leveldb"]) == 0
    assert (tmp_path / "mean.binaryproto").read_bytes() == (tmp_path / "ours.binaryproto").read_bytes()
    blob = caffe_pb2.BlobProto.FromString((tmp_path / "mean.binaryproto").read_bytes())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 36, 36) and not blob.HasField("shape")
    err = capsys.readouterr().err
    means = dbs.channel_means(dbs.mean_of_db(tmp_path / "db")[0])
    for c, value in enumerate(means):
        assert f"mean_value channel [{c}]: {value:g}" in err
    assert "Number of channels: 3" in err
    assert compute_image_mean.main(["--backend=lmdb", str(tmp_path / "db")]) == 2
    assert "is a leveldb database, not lmdb" in capsys.readouterr().err
    (tmp_path / "folder" / "keep").mkdir(parents=True)
    assert compute_image_mean.main(["-backend", "leveldb", str(tmp_path / "db"), str(tmp_path / "folder")]) == 2
    assert "folder: is a folder; expected a file name" in capsys.readouterr().err.splitlines()[-1]
    assert (tmp_path / "folder" / "keep").is_dir()  # never replaced by the mean file


def test_convert_imageset_bad_output_and_encode_type(work, tmp_path, capsys):
    root, lst = f"{work}/", str(work / "test_w32_1.txt")
    assert convert_imageset.main(["-encoded", "-encode_type", "xyz", root, lst, str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: -encode_type:") and "valid: bmp, jpg" in err and "\n" not in err
    (tmp_path / "file").write_text("x")
    assert convert_imageset.main(["-overwrite", root, lst, str(tmp_path / "file")]) == 2
    assert "file: is a file; expected a folder" in capsys.readouterr().err
    assert convert_imageset.main([root, lst, str(tmp_path / "file" / "db")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("file: is a file; expected a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


STEP3 = """#!/bin/bash
set -e
# The tutorial's step 3, with only the tool path changed.
for kk in 1 2; do
    convert_imageset -shuffle -backend leveldb ./ train_w32_${kk}.txt DB_train_${kk}
    convert_imageset -shuffle -backend leveldb ./ test_w32_${kk}.txt DB_test_${kk}
    compute_image_mean DB_train_${kk} DB_train_w32_${kk}.binaryproto -backend leveldb
done
"""


def test_tutorial_step3_script_runs_with_our_tools(work, tmp_path):
    import shutil

    script_dir = tmp_path / "script"
    script_dir.mkdir()
    for name in work.iterdir():
        if name.suffix == ".txt" or name.name == "folds.json":
            shutil.copy(name, script_dir / name.name)
    (script_dir / "subs").symlink_to(work / "subs")
    (script_dir / "step3_make_dbs.sh").write_text(STEP3)
    env = dict(os.environ, PATH=f"{REPO_ROOT / 'tools'}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", "step3_make_dbs.sh"], cwd=script_dir, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "mean_value channel [2]:" in done.stderr
    # Same as `lymph-cv dbs` with its default seed, record for record and byte for byte.
    (tmp_path / "ours").mkdir()
    for name in script_dir.iterdir():
        if name.suffix == ".txt" or name.name == "folds.json":
            shutil.copy(name, tmp_path / "ours" / name.name)
    (tmp_path / "ours" / "subs").symlink_to(work / "subs")
    dbs.build_dbs(tmp_path / "ours", workers=1)
    for k in (1, 2):
        for side in ("train", "test"):
            script_db = _records(script_dir / f"DB_{side}_{k}")
            assert len(script_db) == len(dbs.read_image_list(script_dir / f"{side}_w32_{k}.txt"))
            assert script_db == _records(tmp_path / "ours" / f"DB_{side}_{k}")
        mean = f"DB_train_w32_{k}.binaryproto"
        assert (script_dir / mean).read_bytes() == (tmp_path / "ours" / mean).read_bytes()


@pytest.mark.parametrize("tool", ["convert_imageset", "compute_image_mean"])
def test_checkout_tools_run_without_an_active_venv(tmp_path, tool):
    import shutil

    # `python -S` cannot import lymph_cv's dependencies, like a system python3 with no venv active.
    (tmp_path / "tools").mkdir()
    shutil.copy(REPO_ROOT / "tools" / tool, tmp_path / "tools" / tool)
    alone = subprocess.run([sys.executable, "-S", str(tmp_path / "tools" / tool), "-help"],
                           capture_output=True, text=True, timeout=60)
    assert alone.returncode == 2 and alone.stderr.count("\n") == 1
    assert "cannot import lymph_cv" in alone.stderr and "Traceback" not in alone.stderr
    # Next to a checkout's .venv the tool runs with that venv's python instead.
    (tmp_path / ".venv").symlink_to(os.path.dirname(os.path.dirname(sys.executable)))
    found = subprocess.run([sys.executable, "-S", str(tmp_path / "tools" / tool), "-help"],
                           capture_output=True, text=True, timeout=60)
    assert found.returncode == 0 and f"{tool}: " in found.stdout


def test_help_into_a_closed_pipe_is_quiet():
    tool = subprocess.Popen([sys.executable, "-c", "import sys; from lymph_cv.commands import convert_imageset as c;"
                             "sys.exit(c.main(['-help']))"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tool.stdout.close()  # like `-help | head -0`: closed long before the interpreter has started
    err = tool.stderr.read().decode()
    assert tool.wait(timeout=60) == 0 and "Traceback" not in err, err
